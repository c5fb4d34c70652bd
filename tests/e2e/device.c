/* The C device of the four-language end-to-end test (tests/e2e/run.mjs drives it), built like the
 * C examples (examples/c/example.h, the same flags) against this checkout's library.
 *
 * Environment: HUBMSG_DEVICE_CONNECTION_STRING, E2E_OUTBOX (durable outbox directory), E2E_COUNT
 * (messages), E2E_PREFIX (message ids are PREFIX-0 … PREFIX-(COUNT-1)).
 *
 * Protocol, one JSON object per stdout line:
 *   sends the first half, prints {"half":true}; waits for the line "go" on stdin; sends the rest,
 *   prints {"sent":COUNT}; waits for "stop" (or end of input); flushes, prints
 *   {"done":true,"delivered":…,"depth":…,"connects":…} and exits 0.
 *   Every C2D command is settled as its body says ("complete", "reject", "abandon") and printed
 *   as {"c2d":ID,"action":BODY,"seq":N}. */
#include "example.h" /* first: it sets _XOPEN_SOURCE */

#include <pthread.h>
#include <stdarg.h>

static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

/* One stdout line, whole (the C2D callback thread and the main thread both print). */
static void line(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    pthread_mutex_lock(&out_lock);
    vprintf(fmt, ap);
    fflush(stdout);
    pthread_mutex_unlock(&out_lock);
    va_end(ap);
}

static void on_c2d(void *ctx, hubmsg_c2d *cmd) {
    (void)ctx;
    const hubmsg_message *msg = hubmsg_c2d_message(cmd);
    const uint8_t *body = NULL;
    size_t len = 0;
    TRY(hubmsg_message_body(msg, &body, &len));
    char action[16] = {0};
    memcpy(action, body, len < sizeof action - 1 ? len : sizeof action - 1);
    hubmsg_result rc;
    if (strcmp(action, "complete") == 0) rc = hubmsg_c2d_complete(cmd);
    else if (strcmp(action, "reject") == 0) rc = hubmsg_c2d_reject(cmd);
    else rc = hubmsg_c2d_abandon(cmd);
    /* A settle can fail when the connection dropped meanwhile (the hub redelivers): not fatal. */
    if (rc < 0) fprintf(stderr, "settle %s: %s\n", hubmsg_message_message_id(msg), hubmsg_last_error_message());
    line("{\"c2d\":\"%s\",\"action\":\"%s\",\"seq\":%llu}\n", hubmsg_message_message_id(msg), action,
         (unsigned long long)hubmsg_c2d_sequence_number(cmd));
}

static void wait_for(const char *word) {
    char buf[64];
    while (fgets(buf, sizeof buf, stdin)) {
        if (strncmp(buf, word, strlen(word)) == 0) return;
    }
}

static void send_range(hubmsg_device *dev, const char *prefix, long from, long to) {
    for (long i = from; i < to; i++) {
        char id[64], body[96];
        snprintf(id, sizeof id, "%s-%ld", prefix, i);
        int n = snprintf(body, sizeof body, "{\"lang\":\"c\",\"seq\":%ld}", i);
        hubmsg_message *msg = NULL;
        TRY(hubmsg_message_new((const uint8_t *)body, (size_t)n, &msg));
        TRY(hubmsg_message_set_message_id(msg, id));
        TRY(hubmsg_message_add_property(msg, "lang", "c"));
        TRY(hubmsg_device_send(dev, msg, NULL, NULL)); /* returns once durable in the outbox */
        hubmsg_message_free(msg);
    }
}

int main(void) {
    const char *cs = getenv("HUBMSG_DEVICE_CONNECTION_STRING");
    const char *outbox = getenv("E2E_OUTBOX");
    const char *prefix = getenv("E2E_PREFIX");
    long count = getenv("E2E_COUNT") ? atol(getenv("E2E_COUNT")) : 0;
    if (!cs || !outbox || !prefix || count <= 0) {
        fprintf(stderr, "needs HUBMSG_DEVICE_CONNECTION_STRING, E2E_OUTBOX, E2E_PREFIX and E2E_COUNT > 0\n");
        return 2;
    }
    hubmsg_device_options *opts = NULL;
    TRY(hubmsg_device_options_from_connection_string(cs, &opts));
    TRY(hubmsg_device_options_set_outbox_dir(opts, outbox));
    TRY(hubmsg_device_options_set_retry(opts, 50, 500, 2.0, 50, HUBMSG_FOREVER));
    hubmsg_device *dev = NULL;
    TRY(hubmsg_device_new(opts, &dev));
    hubmsg_device_options_free(opts);
    hubmsg_c2d_callback cb = {.context = NULL, .call = on_c2d, .drop = NULL};
    TRY(hubmsg_device_on_c2d(dev, &cb));

    send_range(dev, prefix, 0, count / 2);
    line("{\"half\":true}\n");
    wait_for("go");
    send_range(dev, prefix, count / 2, count);
    line("{\"sent\":%ld}\n", count);
    wait_for("stop");
    hubmsg_result rc = hubmsg_device_flush(dev, 60000);
    hubmsg_device_stats st;
    TRY(hubmsg_device_get_stats(dev, &st));
    line("{\"done\":true,\"flushed\":%s,\"delivered\":%llu,\"depth\":%llu,\"connects\":%llu,\"c2dDuplicates\":%llu}\n",
           rc == HUBMSG_OK ? "true" : "false", (unsigned long long)st.delivered, (unsigned long long)st.depth,
           (unsigned long long)st.connects, (unsigned long long)st.c2d_duplicates);
    hubmsg_device_free(dev);
    return 0;
}
