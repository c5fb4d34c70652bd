/* receive_commands [count]: a device receives cloud-to-device commands in pull mode
 * (hubmsg_device_recv with a timeout, for firmware that runs its own loop), completes the ones it
 * can execute and rejects the others, until `count` commands arrived (default 5) or 30 s passed
 * without one.
 *
 * HUBMSG_DEVICE_CONNECTION_STRING: the device (else: demo mode, where an embedded hub and a
 * service send the commands with feedback "full" and the outcomes are printed at the end).
 *
 * Build: see examples/c/README.md. */
#include "example.h"

static void send_commands(hubmsg_service *svc, long count) {
    for (long i = 0; i < count; i++) {
        const char *body = i % 4 == 3 ? "self-destruct" : "open-valve";
        char id[32];
        snprintf(id, sizeof id, "cmd-%ld", i);
        hubmsg_message *msg = NULL;
        TRY(hubmsg_message_new((const uint8_t *)body, strlen(body), &msg));
        TRY(hubmsg_message_set_message_id(msg, id));
        TRY(hubmsg_service_send_c2d(svc, "valve-1", msg, HUBMSG_ACK_FULL, 60000, NULL));
        hubmsg_message_free(msg);
    }
}

static void print_feedback(hubmsg_service *svc, long count) {
    long seen = 0;
    while (seen < count) {
        hubmsg_feedback_batch *batch = NULL;
        hubmsg_result rc = hubmsg_service_feedback_next(svc, 30000, &batch);
        TRY(rc);
        if (rc == HUBMSG_EMPTY) break;
        for (size_t i = 0; i < hubmsg_feedback_batch_count(batch); i++, seen++) {
            hubmsg_feedback_info info;
            TRY(hubmsg_feedback_get_info(hubmsg_feedback_batch_at(batch, i), &info));
            printf("feedback: %s -> %s\n", info.original_message_id, info.description);
        }
        TRY(hubmsg_feedback_batch_ack(batch));
        hubmsg_feedback_batch_free(batch);
    }
}

int main(int argc, char **argv) {
    long count = argc > 1 ? atol(argv[1]) : 5;
    demo d = {0};
    char *owned_cs = NULL;
    hubmsg_service *svc = NULL;
    const char *cs = getenv("HUBMSG_DEVICE_CONNECTION_STRING");
    if (!cs) {
        demo_start(&d);
        cs = owned_cs = demo_device(&d, "valve-1");
        TRY(hubmsg_service_new(hubmsg_hub_service_connection_string(d.hub), NULL, &svc));
        send_commands(svc, count);
    }

    hubmsg_device *dev = NULL;
    TRY(hubmsg_device_new_from_connection_string(cs, &dev));
    hubmsg_string_free(owned_cs);
    long received = 0;
    while (received < count) {
        hubmsg_c2d *cmd = NULL;
        hubmsg_result rc = hubmsg_device_recv(dev, 30000, &cmd);
        TRY(rc);
        if (rc == HUBMSG_EMPTY) {
            printf("no command for 30 s; stopping\n");
            break;
        }
        const uint8_t *body = NULL;
        size_t len = 0;
        const hubmsg_message *msg = hubmsg_c2d_message(cmd);
        TRY(hubmsg_message_body(msg, &body, &len));
        int known = len == strlen("open-valve") && memcmp(body, "open-valve", len) == 0;
        printf("command %s: %.*s -> %s\n", hubmsg_message_message_id(msg), (int)len, (const char *)body, known ? "complete" : "reject");
        TRY(known ? hubmsg_c2d_complete(cmd) : hubmsg_c2d_reject(cmd));
        hubmsg_c2d_free(cmd);
        received++;
    }
    printf("received %ld commands\n", received);
    if (svc) print_feedback(svc, received);
    hubmsg_device_free(dev);
    hubmsg_service_free(svc);
    if (d.hub) demo_stop(&d);
    return received == count ? 0 : 1;
}
