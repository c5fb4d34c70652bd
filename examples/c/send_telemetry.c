/* send_telemetry [count]: a device sends `count` telemetry readings (default 10) with properties
 * and counts their outcomes, then waits until all are delivered.
 *
 * HUBMSG_DEVICE_CONNECTION_STRING: the device to send as (else: demo mode with an embedded hub).
 * HUBMSG_OUTBOX_DIR: the directory under which each device keeps its durable outbox
 *                    (`$HUBMSG_OUTBOX_DIR/<host name>/<device id>`; without it the library's default,
 *                    `~/.local/state/hubmsg/outbox/<host name>/<device id>`); demo mode uses the demo directory.
 * HUBMSG_DURABILITY: always (default) | interval | never.
 *
 * Build: see examples/c/README.md (cc … send_telemetry.c $(pkg-config --cflags --libs hubmsg)). */
#include "example.h"

static atomic_long delivered, other_outcomes;

static void on_outcome(void *context, int32_t outcome, const char *message_id) {
    (void)context, (void)message_id;
    if (outcome == HUBMSG_OUTCOME_DELIVERED)
        atomic_fetch_add(&delivered, 1);
    else
        atomic_fetch_add(&other_outcomes, 1);
}

int main(int argc, char **argv) {
    long count = argc > 1 ? atol(argv[1]) : 10;
    demo d = {0};
    char *owned_cs = NULL;
    const char *cs = getenv("HUBMSG_DEVICE_CONNECTION_STRING");
    const char *outbox = NULL; /* NULL: the library's default directory for the device id */
    if (!cs) {
        demo_start(&d);
        cs = owned_cs = demo_device(&d, "sensor-1");
        outbox = demo_path(&d, "outbox");
    }

    hubmsg_device_options *opts = NULL;
    TRY(hubmsg_device_options_from_connection_string(cs, &opts));
    TRY(hubmsg_device_options_set_outbox_dir(opts, outbox));
    const char *durability = getenv("HUBMSG_DURABILITY");
    if (durability && strcmp(durability, "interval") == 0)
        TRY(hubmsg_device_options_set_durability(opts, HUBMSG_DURABILITY_INTERVAL, 100));
    else if (durability && strcmp(durability, "never") == 0)
        TRY(hubmsg_device_options_set_durability(opts, HUBMSG_DURABILITY_NEVER, 0));
    hubmsg_device *dev = NULL;
    TRY(hubmsg_device_new(opts, &dev));
    hubmsg_device_options_free(opts);
    hubmsg_string_free(owned_cs);

    for (long i = 0; i < count; i++) {
        char body[96], seq[24];
        snprintf(body, sizeof body, "{\"temperature\":%.1f,\"seq\":%ld}", 20.0 + (double)(i % 50) / 10.0, i);
        snprintf(seq, sizeof seq, "%ld", i);
        hubmsg_message *msg = NULL;
        TRY(hubmsg_message_new((const uint8_t *)body, strlen(body), &msg));
        TRY(hubmsg_message_set_content_type(msg, "application/json"));
        TRY(hubmsg_message_set_content_encoding(msg, "utf-8"));
        TRY(hubmsg_message_add_property(msg, "unit", "celsius"));
        TRY(hubmsg_message_add_property(msg, "seq", seq));
        hubmsg_outcome_callback cb = {NULL, on_outcome, NULL};
        TRY(hubmsg_device_send(dev, msg, &cb, NULL)); /* returns once durable in the outbox */
        hubmsg_message_free(msg);
    }
    TRY(hubmsg_device_flush(dev, 120000));
    hubmsg_device_stats st;
    TRY(hubmsg_device_get_stats(dev, &st));
    hubmsg_device_free(dev); /* after this every outcome callback has run */
    printf("delivered %ld of %ld (outbox: %llu delivered, %llu pending; %llu connects)\n", atomic_load(&delivered), count,
           (unsigned long long)st.delivered, (unsigned long long)st.depth, (unsigned long long)st.connects);
    if (d.hub) demo_stop(&d);
    return atomic_load(&delivered) == count ? 0 : 1;
}
