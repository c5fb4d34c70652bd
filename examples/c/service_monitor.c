/* service_monitor [count]: a back-end service lists the registered devices, then reads D2C
 * telemetry from consumer group "monitor" by callback (acknowledging each event and
 * checkpointing at the end) until `count` events arrived (default 20) or 30 s passed.
 *
 * HUBMSG_SERVICE_CONNECTION_STRING: a policy connection string (else: demo mode, where an
 * embedded hub and a device produce the telemetry).
 *
 * Build: see examples/c/README.md. */
#include "example.h"

#include <time.h>

static atomic_long events;

static void on_event(void *context, hubmsg_event *ev) {
    (void)context;
    hubmsg_event_info info;
    TRY(hubmsg_event_get_info(ev, &info));
    const uint8_t *body = NULL;
    size_t len = 0;
    TRY(hubmsg_message_body(hubmsg_event_message(ev), &body, &len));
    printf("[%s p%u #%llu] %.*s\n", info.device_id, info.partition, (unsigned long long)info.sequence_number, (int)len, (const char *)body);
    TRY(hubmsg_event_ack(ev));
    atomic_fetch_add(&events, 1);
}

static void produce(const char *cs, long count) {
    hubmsg_device *dev = NULL;
    TRY(hubmsg_device_new_from_connection_string(cs, &dev));
    for (long i = 0; i < count; i++) {
        char body[32];
        snprintf(body, sizeof body, "reading %ld", i);
        hubmsg_message *msg = NULL;
        TRY(hubmsg_message_new((const uint8_t *)body, strlen(body), &msg));
        TRY(hubmsg_device_send(dev, msg, NULL, NULL));
        hubmsg_message_free(msg);
    }
    TRY(hubmsg_device_flush(dev, 30000));
    hubmsg_device_free(dev);
}

int main(int argc, char **argv) {
    long count = argc > 1 ? atol(argv[1]) : 20;
    demo d = {0};
    const char *cs = getenv("HUBMSG_SERVICE_CONNECTION_STRING");
    if (!cs) {
        demo_start(&d);
        cs = hubmsg_hub_service_connection_string(d.hub);
        char *dev_cs = demo_device(&d, "thermostat-1");
        produce(dev_cs, count);
        hubmsg_string_free(dev_cs);
    }
    hubmsg_service *svc = NULL;
    TRY(hubmsg_service_new(cs, NULL, &svc));

    hubmsg_device_list *list = NULL;
    TRY(hubmsg_service_list_devices(svc, &list));
    for (size_t i = 0; i < hubmsg_device_list_count(list); i++) {
        hubmsg_device_identity_info info;
        TRY(hubmsg_device_identity_get_info(hubmsg_device_list_at(list, i), &info));
        printf("device %s (%s)\n", info.device_id, info.status == HUBMSG_DEVICE_ENABLED ? "enabled" : "disabled");
    }
    hubmsg_device_list_free(list);

    hubmsg_event_callback cb = {NULL, on_event, NULL};
    hubmsg_events *stream = NULL;
    TRY(hubmsg_service_events_open(svc, "monitor", HUBMSG_START_EARLIEST, 0, &cb, &stream));
    for (int waited = 0; atomic_load(&events) < count && waited < 30000; waited += 10) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL); /* the callback thread does the work; the main thread just waits */
    }
    TRY(hubmsg_events_checkpoint(stream)); /* acknowledged events are not read again by "monitor" */
    hubmsg_events_free(stream);
    printf("received %ld events\n", atomic_load(&events));
    hubmsg_service_free(svc);
    if (d.hub) demo_stop(&d);
    return atomic_load(&events) >= count ? 0 : 1;
}
