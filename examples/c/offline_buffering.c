/* offline_buffering [count]: the device keeps sending while the hub is down; its durable outbox
 * holds the messages, and once the hub is back they are all delivered — none lost.
 *
 * 1. start a hub (embedded, 127.0.0.1 port 0), register the device, stop the hub;
 * 2. send `count` messages (default 100): each send returns once the message is durable locally;
 * 3. start the hub again on the same address and data directory;
 * 4. the device reconnects and delivers; a consumer checks every message id arrived.
 *
 * Build: see examples/c/README.md. Exit status 0 only when nothing was lost. */
#include "example.h"

static const char *status_name(int32_t s) {
    static const char *names[] = {"connecting", "connected", "disconnected", "retrying", "failed", "closed"};
    return s >= 0 && s <= 5 ? names[s] : "?";
}

static atomic_int last_status = -1;

static void on_status(void *context, int32_t status, hubmsg_result error, const char *reason) {
    (void)context, (void)error;
    if (atomic_exchange(&last_status, status) != status && status != HUBMSG_STATUS_RETRYING)
        printf("device: %s %s\n", status_name(status), reason);
}

int main(int argc, char **argv) {
    long count = argc > 1 ? atol(argv[1]) : 100;
    demo d = {0};
    demo_start(&d);
    char address[64], hub_dir[128];
    snprintf(address, sizeof address, "%s", hubmsg_hub_address(d.hub));
    snprintf(hub_dir, sizeof hub_dir, "%s", demo_path(&d, "hub"));
    char *cs = demo_device(&d, "field-unit-7");
    hubmsg_hub_free(d.hub); /* the hub goes down */
    d.hub = NULL;
    printf("hub stopped\n");

    hubmsg_device_options *opts = NULL;
    TRY(hubmsg_device_options_from_connection_string(cs, &opts));
    hubmsg_string_free(cs);
    TRY(hubmsg_device_options_set_outbox_dir(opts, demo_path(&d, "outbox")));
    TRY(hubmsg_device_options_set_outbox_limits(opts, 100000, 64 << 20, HUBMSG_OVERFLOW_REJECT));
    TRY(hubmsg_device_options_set_retry(opts, 50, 500, 2.0, 50, HUBMSG_FOREVER));
    hubmsg_device *dev = NULL;
    TRY(hubmsg_device_new(opts, &dev));
    hubmsg_device_options_free(opts);
    hubmsg_status_callback scb = {NULL, on_status, NULL};
    TRY(hubmsg_device_on_status(dev, &scb));

    for (long i = 0; i < count; i++) {
        char id[32];
        snprintf(id, sizeof id, "offline-%ld", i);
        hubmsg_message *msg = NULL;
        TRY(hubmsg_message_new((const uint8_t *)id, strlen(id), &msg));
        TRY(hubmsg_message_set_message_id(msg, id));
        TRY(hubmsg_device_send(dev, msg, NULL, NULL)); /* durable in the outbox: safe */
        hubmsg_message_free(msg);
    }
    hubmsg_device_stats st;
    TRY(hubmsg_device_get_stats(dev, &st));
    printf("queued %llu messages while the hub was down (delivered so far: %llu)\n", (unsigned long long)st.depth, (unsigned long long)st.delivered);

    TRY(hubmsg_hub_start(hub_dir, address, &d.hub)); /* the hub is back */
    printf("hub restarted on %s\n", address);
    TRY(hubmsg_device_flush(dev, 120000));
    TRY(hubmsg_device_get_stats(dev, &st));
    hubmsg_device_free(dev);

    /* Check at the hub: every id arrived (duplicates are allowed: at-least-once). */
    char *seen = calloc((size_t)count, 1);
    long distinct = 0, duplicates = 0;
    hubmsg_service *svc = NULL;
    TRY(hubmsg_service_new(hubmsg_hub_service_connection_string(d.hub), NULL, &svc));
    hubmsg_events *events = NULL;
    TRY(hubmsg_service_events_open(svc, "$Default", HUBMSG_START_EARLIEST, 0, NULL, &events));
    while (distinct < count) {
        hubmsg_event *ev = NULL;
        hubmsg_result rc = hubmsg_events_next(events, 30000, &ev);
        TRY(rc);
        if (rc == HUBMSG_EMPTY) break;
        const char *id = hubmsg_message_message_id(hubmsg_event_message(ev));
        long n = id && strncmp(id, "offline-", 8) == 0 ? atol(id + 8) : -1;
        if (n >= 0 && n < count) {
            if (seen[n]) duplicates++;
            else distinct++;
            seen[n] = 1;
        }
        TRY(hubmsg_event_ack(ev));
        hubmsg_event_free(ev);
    }
    TRY(hubmsg_events_checkpoint(events));
    hubmsg_events_free(events);
    hubmsg_service_free(svc);
    free(seen);
    demo_stop(&d);
    printf("sent %ld while the hub was down, received %ld distinct, lost %ld (duplicates %ld, retries %llu)\n", count, distinct,
           count - distinct, duplicates, (unsigned long long)st.retries);
    return distinct == count ? 0 : 1;
}
