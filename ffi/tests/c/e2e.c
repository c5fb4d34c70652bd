/* End to end through the C API only: an embedded hub on 127.0.0.1 port 0, identities, D2C with
 * properties and per-message outcomes (callback and handle), consumer groups (pull and
 * callback) with ack and checkpoint, C2D complete / abandon / reject with feedback (pull,
 * callback, awaited), purge, concurrent senders, the log callback, and clients freed from inside
 * their own callbacks. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>

#include "check.h"

static hubmsg_hub *hub;
static hubmsg_service *svc;

static void flag(void *ctx) { atomic_fetch_add((atomic_int *)ctx, 1); }

static hubmsg_message *text_message(const char *body, const char *id) {
    hubmsg_message *m = NULL;
    OK(hubmsg_message_new((const uint8_t *)body, strlen(body), &m));
    if (id) OK(hubmsg_message_set_message_id(m, id));
    return m;
}

static int body_is(const hubmsg_message *m, const char *want) {
    const uint8_t *data = NULL;
    size_t len = 0;
    OK(hubmsg_message_body(m, &data, &len));
    return len == strlen(want) && memcmp(data, want, len) == 0;
}

static hubmsg_device *new_device(const char *id, const char *outbox) {
    char *cs = NULL;
    OK(hubmsg_hub_create_device(hub, id, &cs));
    CHECK(cs != NULL && strstr(cs, id) != NULL);
    hubmsg_device_options *o = NULL;
    OK(hubmsg_device_options_from_connection_string(cs, &o));
    hubmsg_string_free(cs);
    OK(hubmsg_device_options_set_retry(o, 20, 200, 2.0, 10, HUBMSG_FOREVER));
    if (outbox)
        OK(hubmsg_device_options_set_outbox_dir(o, outbox));
    else
        OK(hubmsg_device_options_set_outbox_in_memory(o, 1)); /* these tests need no durability */
    hubmsg_device *d = NULL;
    OK(hubmsg_device_new(o, &d));
    hubmsg_device_options_free(o);
    return d;
}

/* ---- log callback ------------------------------------------------------------------------ */

static atomic_int log_lines, log_dropped, log_hub_started;

static void on_log(void *ctx, int32_t level, const char *target, const char *message) {
    (void)ctx;
    CHECK(level >= HUBMSG_LOG_ERROR && level <= HUBMSG_LOG_TRACE);
    CHECK(target != NULL && message != NULL);
    if (strstr(message, "hub started")) atomic_store(&log_hub_started, 1);
    atomic_fetch_add(&log_lines, 1);
}

static void log_callback_set(void) {
    hubmsg_log_callback cb = {&log_dropped, on_log, flag};
    OK(hubmsg_set_log_callback(&cb, HUBMSG_LOG_INFO));
}

/* ---- hub and identities ---------------------------------------------------------------- */

static void hub_starts_on_port_0(void) {
    char dir[512];
    test_dir(dir, sizeof dir, "e2e-hub");
    hubmsg_hub_options *o = NULL;
    OK(hubmsg_hub_options_new(dir, &o));
    OK(hubmsg_hub_options_set_listen(o, "127.0.0.1:0"));
    OK(hubmsg_hub_options_set_feedback_interval(o, 50));
    OK(hubmsg_hub_start_with(o, &hub));
    hubmsg_hub_options_free(o);
    const char *addr = hubmsg_hub_address(hub);
    CHECK(addr != NULL && strncmp(addr, "127.0.0.1:", 10) == 0 && atoi(addr + 10) > 0);
    const char *cs = hubmsg_hub_service_connection_string(hub);
    CHECK(cs != NULL && strstr(cs, "SharedAccessKeyName=iothubowner") != NULL && strstr(cs, addr) != NULL);
    OK(hubmsg_service_new(cs, NULL, &svc));
    WAIT_UNTIL(atomic_load(&log_hub_started), limit_ms(5000)); /* the log callback saw it */
    char *dcs = NULL;
    CHECK_RC(hubmsg_hub_device_connection_string(hub, "nobody", &dcs), HUBMSG_NOT_FOUND);
    CHECK(dcs == NULL);
}

static void identities(void) {
    hubmsg_device_identity *id = NULL;
    OK(hubmsg_service_create_device(svc, "id-1", &id));
    hubmsg_device_identity_info info;
    OK(hubmsg_device_identity_get_info(id, &info));
    CHECK(strcmp(info.device_id, "id-1") == 0);
    CHECK(info.status == HUBMSG_DEVICE_ENABLED);
    CHECK(strlen(info.primary_key) > 0 && strlen(info.secondary_key) > 0 && strlen(info.generation_id) > 0);
    CHECK(info.created_ms > 0);
    char key[128];
    snprintf(key, sizeof key, "%s", info.primary_key);
    hubmsg_device_identity_free(id);
    CHECK_RC(hubmsg_service_create_device(svc, "id-1", NULL), HUBMSG_ALREADY_EXISTS);
    OK(hubmsg_service_get_device(svc, "id-1", &id));
    OK(hubmsg_device_identity_get_info(id, &info));
    CHECK(strcmp(info.primary_key, key) == 0);
    hubmsg_device_identity_free(id);
    OK(hubmsg_service_create_device(svc, "id-2", NULL));
    hubmsg_device_list *list = NULL;
    OK(hubmsg_service_list_devices(svc, &list));
    size_t n = hubmsg_device_list_count(list), found = 0;
    for (size_t i = 0; i < n; i++) {
        OK(hubmsg_device_identity_get_info(hubmsg_device_list_at(list, i), &info));
        if (strcmp(info.device_id, "id-1") == 0 || strcmp(info.device_id, "id-2") == 0) found++;
    }
    CHECK(found == 2);
    CHECK(hubmsg_device_list_at(list, n) == NULL);
    hubmsg_device_list_free(list);
    OK(hubmsg_service_set_device_status(svc, "id-1", HUBMSG_DEVICE_DISABLED, &id));
    OK(hubmsg_device_identity_get_info(id, &info));
    CHECK(info.status == HUBMSG_DEVICE_DISABLED);
    hubmsg_device_identity_free(id);
    OK(hubmsg_service_set_device_status(svc, "id-1", HUBMSG_DEVICE_ENABLED, NULL));
    char *cs = NULL;
    OK(hubmsg_service_device_connection_string(svc, "id-1", &cs));
    CHECK(strstr(cs, "DeviceId=id-1") != NULL && strstr(cs, key) != NULL);
    hubmsg_string_free(cs);
    OK(hubmsg_service_delete_device(svc, "id-1"));
    id = (hubmsg_device_identity *)1;
    CHECK_RC(hubmsg_service_get_device(svc, "id-1", &id), HUBMSG_NOT_FOUND);
    CHECK(id == NULL);
    CHECK(strstr(hubmsg_last_error_message(), "id-1") != NULL);
    CHECK_RC(hubmsg_service_delete_device(svc, "id-1"), HUBMSG_NOT_FOUND);
}

/* ---- D2C ----------------------------------------------------------------------------------- */

#define N_D2C 40
static atomic_int delivered_cb, outcome_drops, connected_seen, status_drops;

static void on_outcome(void *ctx, int32_t outcome, const char *message_id) {
    (void)ctx;
    CHECK(message_id != NULL && strncmp(message_id, "m-", 2) == 0);
    if (outcome == HUBMSG_OUTCOME_DELIVERED) atomic_fetch_add(&delivered_cb, 1);
}

static void on_status(void *ctx, int32_t status, hubmsg_result error, const char *reason) {
    (void)ctx;
    CHECK(reason != NULL);
    if (status == HUBMSG_STATUS_CONNECTED) atomic_store(&connected_seen, 1);
    if (status == HUBMSG_STATUS_FAILED) CHECK(error < 0);
}

static atomic_int cb_events, cb_events_dropped;

static void on_event(void *ctx, hubmsg_event *e) {
    (void)ctx;
    hubmsg_event_info info;
    OK(hubmsg_event_get_info(e, &info));
    if (strcmp(info.device_id, "sensor") == 0) atomic_fetch_add(&cb_events, 1);
    OK(hubmsg_event_ack(e));
}

static void d2c_send_and_consume(void) {
    char outbox[512];
    test_dir(outbox, sizeof outbox, "e2e-sensor-outbox");
    hubmsg_device *dev = new_device("sensor", outbox);
    hubmsg_status_callback scb = {&status_drops, on_status, flag};
    OK(hubmsg_device_on_status(dev, &scb));
    CHECK_RC(hubmsg_device_on_status(dev, &scb), HUBMSG_USAGE); /* once per client */
    WAIT_UNTIL(atomic_load(&connected_seen), limit_ms(10000));
    int32_t status = -1;
    OK(hubmsg_device_status(dev, &status));
    CHECK(status == HUBMSG_STATUS_CONNECTED);

    hubmsg_delivery *deliveries[N_D2C] = {0};
    for (int i = 0; i < N_D2C; i++) {
        char body[64], id[32], corr[32], seq[16];
        snprintf(body, sizeof body, "reading %d", i);
        snprintf(id, sizeof id, "m-%d", i);
        snprintf(corr, sizeof corr, "c-%d", i);
        snprintf(seq, sizeof seq, "%d", i);
        hubmsg_message *m = text_message(body, id);
        OK(hubmsg_message_set_correlation_id(m, corr));
        OK(hubmsg_message_set_content_type(m, "application/json"));
        OK(hubmsg_message_set_content_encoding(m, "utf-8"));
        OK(hubmsg_message_add_property(m, "seq", seq));
        OK(hubmsg_message_add_property(m, "unit", "°C & more"));
        hubmsg_outcome_callback cb = {&outcome_drops, on_outcome, flag};
        OK(hubmsg_device_send(dev, m, &cb, &deliveries[i]));
        CHECK(strcmp(hubmsg_delivery_message_id(deliveries[i]), id) == 0);
        hubmsg_message_free(m);
    }
    for (int i = 0; i < N_D2C; i++) {
        int32_t outcome = -1;
        OK(hubmsg_delivery_wait(deliveries[i], (uint32_t)limit_ms(10000), &outcome));
        CHECK(outcome == HUBMSG_OUTCOME_DELIVERED);
        hubmsg_delivery_free(deliveries[i]);
    }
    OK(hubmsg_device_flush(dev, (uint32_t)limit_ms(10000)));
    WAIT_UNTIL(atomic_load(&delivered_cb) == N_D2C && atomic_load(&outcome_drops) == N_D2C, limit_ms(5000));
    hubmsg_device_stats st;
    OK(hubmsg_device_get_stats(dev, &st));
    CHECK(st.delivered == N_D2C && st.depth == 0 && st.in_flight == 0 && st.connects >= 1);

    /* A message that expired before sending is not sent: outcome EXPIRED. */
    hubmsg_message *old = text_message("stale", "m-expired");
    OK(hubmsg_message_set_expiry(old, 1));
    CHECK(hubmsg_message_expiry(old) == 1);
    hubmsg_delivery *del = NULL;
    OK(hubmsg_device_send(dev, old, NULL, &del));
    int32_t outcome = -1;
    OK(hubmsg_delivery_wait(del, (uint32_t)limit_ms(10000), &outcome));
    CHECK(outcome == HUBMSG_OUTCOME_EXPIRED);
    hubmsg_delivery_free(del);
    hubmsg_message_free(old);

    /* Pull consumer. */
    hubmsg_events *ev = NULL;
    OK(hubmsg_service_events_open(svc, "$Default", HUBMSG_START_EARLIEST, 0, NULL, &ev));
    for (int i = 0; i < N_D2C; i++) {
        hubmsg_event *e = NULL;
        OK(hubmsg_events_next(ev, (uint32_t)limit_ms(10000), &e));
        const hubmsg_message *m = hubmsg_event_message(e);
        char body[64], id[32], corr[32], seq[16];
        snprintf(body, sizeof body, "reading %d", i);
        snprintf(id, sizeof id, "m-%d", i);
        snprintf(corr, sizeof corr, "c-%d", i);
        snprintf(seq, sizeof seq, "%d", i);
        CHECK(body_is(m, body));
        CHECK(strcmp(hubmsg_message_message_id(m), id) == 0);
        CHECK(strcmp(hubmsg_message_correlation_id(m), corr) == 0);
        CHECK(strcmp(hubmsg_message_content_type(m), "application/json") == 0);
        CHECK(strcmp(hubmsg_message_content_encoding(m), "utf-8") == 0);
        CHECK(strcmp(hubmsg_message_property(m, "seq"), seq) == 0);
        CHECK(strcmp(hubmsg_message_property(m, "unit"), "°C & more") == 0);
        CHECK(hubmsg_message_property(m, "absent") == NULL);
        CHECK(hubmsg_message_property_count(m) == 2);
        const char *k = NULL, *v = NULL;
        OK(hubmsg_message_property_at(m, 1, &k, &v));
        CHECK(strcmp(k, "unit") == 0 && strcmp(v, "°C & more") == 0);
        CHECK(hubmsg_message_creation_time(m) > 0);
        CHECK(strcmp(hubmsg_message_system_property(m, "iothub-connection-device-id"), "sensor") == 0);
        hubmsg_event_info info;
        OK(hubmsg_event_get_info(e, &info));
        CHECK(strcmp(info.device_id, "sensor") == 0 && info.enqueued_time_ms > 0);
        /* keep a copy beyond the event's life */
        hubmsg_message *copy = NULL;
        OK(hubmsg_message_clone(m, &copy));
        OK(hubmsg_event_ack(e));
        hubmsg_event_free(e);
        CHECK(body_is(copy, body));
        hubmsg_message_free(copy);
    }
    hubmsg_event *none = (hubmsg_event *)1;
    CHECK_RC(hubmsg_events_next(ev, 100, &none), HUBMSG_EMPTY);
    CHECK(none == NULL);
    OK(hubmsg_events_checkpoint(ev));
    hubmsg_events_free(ev);
    /* The group resumes after the acknowledged events. */
    OK(hubmsg_service_events_open(svc, "$Default", HUBMSG_START_CHECKPOINT, 0, NULL, &ev));
    CHECK_RC(hubmsg_events_next(ev, 300, &none), HUBMSG_EMPTY);
    hubmsg_events_free(ev);

    /* Callback consumer in another group sees them all; recv on it is a usage error. */
    hubmsg_event_callback ecb = {&cb_events_dropped, on_event, flag};
    OK(hubmsg_service_events_open(svc, "callbacks", HUBMSG_START_EARLIEST, 0, &ecb, &ev));
    CHECK_RC(hubmsg_events_next(ev, 10, &none), HUBMSG_USAGE);
    WAIT_UNTIL(atomic_load(&cb_events) == N_D2C, limit_ms(10000));
    hubmsg_events_free(ev);
    CHECK(atomic_load(&cb_events_dropped) == 1);

    hubmsg_device_free(dev);
    CHECK(atomic_load(&status_drops) == 1);
}

/* ---- C2D by callback, feedback by callback and awaited ----------------------------------- */

static atomic_int fb_ok = -1, fb_no = -1, fb_later = -1, later_deliveries, c2d_drops, fb_drops;

static void on_c2d(void *ctx, hubmsg_c2d *c) {
    (void)ctx;
    const hubmsg_message *m = hubmsg_c2d_message(c);
    CHECK(hubmsg_c2d_sequence_number(c) > 0);
    if (body_is(m, "ok")) {
        OK(hubmsg_c2d_complete(c));
        CHECK_RC(hubmsg_c2d_reject(c), HUBMSG_USAGE);
    } else if (body_is(m, "no")) {
        OK(hubmsg_c2d_reject(c));
    } else if (body_is(m, "later")) {
        /* left unsettled the first time: abandoned for us, delivered again */
        if (atomic_fetch_add(&later_deliveries, 1) == 1) OK(hubmsg_c2d_complete(c));
    }
}

static void on_feedback(void *ctx, hubmsg_feedback_batch *b) {
    (void)ctx;
    for (size_t i = 0; i < hubmsg_feedback_batch_count(b); i++) {
        hubmsg_feedback_info info;
        OK(hubmsg_feedback_get_info(hubmsg_feedback_batch_at(b, i), &info));
        CHECK(strcmp(info.device_id, "lamp") == 0 && strlen(info.enqueued_time_utc) > 0);
        if (strcmp(info.original_message_id, "cb-ok") == 0) atomic_store(&fb_ok, info.status);
        if (strcmp(info.original_message_id, "cb-no") == 0) atomic_store(&fb_no, info.status);
        if (strcmp(info.original_message_id, "cb-later") == 0) atomic_store(&fb_later, info.status);
    }
    OK(hubmsg_feedback_batch_ack(b));
}

static void c2d_callbacks(void) {
    hubmsg_device *dev = new_device("lamp", NULL);
    hubmsg_c2d_callback ccb = {&c2d_drops, on_c2d, flag};
    OK(hubmsg_device_on_c2d(dev, &ccb));
    hubmsg_c2d *c = NULL;
    CHECK_RC(hubmsg_device_recv(dev, 10, &c), HUBMSG_USAGE); /* callback mode */
    hubmsg_service *s2 = NULL;
    OK(hubmsg_service_new(hubmsg_hub_service_connection_string(hub), NULL, &s2));
    hubmsg_feedback_callback fcb = {&fb_drops, on_feedback, flag};
    OK(hubmsg_service_on_feedback(s2, &fcb));
    hubmsg_feedback_batch *b = NULL;
    CHECK_RC(hubmsg_service_feedback_next(s2, 10, &b), HUBMSG_USAGE);
    const char *bodies[3] = {"ok", "no", "later"}, *ids[3] = {"cb-ok", "cb-no", "cb-later"};
    for (int i = 0; i < 3; i++) {
        hubmsg_message *m = text_message(bodies[i], ids[i]);
        uint64_t seq = 0;
        OK(hubmsg_service_send_c2d(s2, "lamp", m, HUBMSG_ACK_FULL, 60000, &seq));
        CHECK(seq > 0);
        hubmsg_message_free(m);
    }
    WAIT_UNTIL(atomic_load(&fb_ok) == HUBMSG_FEEDBACK_SUCCESS && atomic_load(&fb_no) == HUBMSG_FEEDBACK_REJECTED &&
                   atomic_load(&fb_later) == HUBMSG_FEEDBACK_SUCCESS,
               limit_ms(20000));
    CHECK(atomic_load(&later_deliveries) == 2);

    /* Awaited outcome. */
    hubmsg_message *m = text_message("ok", "cb-wait");
    hubmsg_feedback *f = NULL;
    OK(hubmsg_service_send_c2d_and_wait(s2, "lamp", m, HUBMSG_ACK_POSITIVE, 0, (uint32_t)limit_ms(20000), &f));
    hubmsg_feedback_info info;
    OK(hubmsg_feedback_get_info(f, &info));
    CHECK(info.status == HUBMSG_FEEDBACK_SUCCESS);
    CHECK(strcmp(info.original_message_id, "cb-wait") == 0 && strcmp(info.description, "Success") == 0);
    CHECK(strcmp(info.device_id, "lamp") == 0 && strlen(info.device_generation_id) > 0);
    hubmsg_feedback_free(f);
    hubmsg_message_free(m);

    hubmsg_service_free(s2);
    CHECK(atomic_load(&fb_drops) == 1);
    hubmsg_device_free(dev);
    CHECK(atomic_load(&c2d_drops) == 1);
}

/* ---- C2D pull with complete / reject / abandon, feedback pull ---------------------------- */

static void wait_feedback(const char *id, int32_t want) {
    uint64_t until = mono_ms() + (uint64_t)limit_ms(20000);
    for (;;) {
        CHECK(mono_ms() < until);
        hubmsg_feedback_batch *b = NULL;
        hubmsg_result rc = hubmsg_service_feedback_next(svc, 200, &b);
        if (rc == HUBMSG_EMPTY) continue;
        OK(rc);
        int found = 0;
        for (size_t i = 0; i < hubmsg_feedback_batch_count(b); i++) {
            hubmsg_feedback_info info;
            OK(hubmsg_feedback_get_info(hubmsg_feedback_batch_at(b, i), &info));
            if (strcmp(info.original_message_id, id) == 0) {
                CHECK(info.status == want);
                found = 1;
            }
        }
        OK(hubmsg_feedback_batch_ack(b));
        hubmsg_feedback_batch_free(b);
        if (found) return;
    }
}

static hubmsg_c2d *recv_one(hubmsg_device *dev, const char *body) {
    hubmsg_c2d *c = NULL;
    OK(hubmsg_device_recv(dev, (uint32_t)limit_ms(10000), &c));
    CHECK(c != NULL && body_is(hubmsg_c2d_message(c), body));
    return c;
}

static void send_c2d(const char *device, const char *body, const char *id, int32_t ack) {
    hubmsg_message *m = text_message(body, id);
    OK(hubmsg_service_send_c2d(svc, device, m, ack, 60000, NULL));
    hubmsg_message_free(m);
}

static void c2d_pull(void) {
    hubmsg_device *dev = new_device("valve", NULL);
    hubmsg_c2d *c = (hubmsg_c2d *)1;
    CHECK_RC(hubmsg_device_recv(dev, 100, &c), HUBMSG_EMPTY);
    CHECK(c == NULL);

    send_c2d("valve", "complete-me", "p-1", HUBMSG_ACK_FULL);
    c = recv_one(dev, "complete-me");
    CHECK(strcmp(hubmsg_message_system_property(hubmsg_c2d_message(c), "iothub-ack"), "full") == 0);
    OK(hubmsg_c2d_complete(c));
    CHECK_RC(hubmsg_c2d_complete(c), HUBMSG_USAGE);
    hubmsg_c2d_free(c);
    wait_feedback("p-1", HUBMSG_FEEDBACK_SUCCESS);

    send_c2d("valve", "reject-me", "p-2", HUBMSG_ACK_NEGATIVE);
    c = recv_one(dev, "reject-me");
    OK(hubmsg_c2d_reject(c));
    hubmsg_c2d_free(c);
    wait_feedback("p-2", HUBMSG_FEEDBACK_REJECTED);

    send_c2d("valve", "abandon-me", "p-3", HUBMSG_ACK_FULL);
    c = recv_one(dev, "abandon-me");
    CHECK(strcmp(hubmsg_message_system_property(hubmsg_c2d_message(c), "iothub-deliverycount"), "0") == 0);
    OK(hubmsg_c2d_abandon(c));
    hubmsg_c2d_free(c);
    c = recv_one(dev, "abandon-me");
    CHECK(strcmp(hubmsg_message_system_property(hubmsg_c2d_message(c), "iothub-deliverycount"), "1") == 0);
    OK(hubmsg_c2d_complete(c));
    hubmsg_c2d_free(c);
    wait_feedback("p-3", HUBMSG_FEEDBACK_SUCCESS);

    hubmsg_c2d_callback ccb = {NULL, on_c2d, NULL};
    CHECK_RC(hubmsg_device_on_c2d(dev, &ccb), HUBMSG_USAGE); /* pull mode already */
    hubmsg_device_free(dev);

    /* Purge, and the errors of a send. */
    OK(hubmsg_hub_create_device(hub, "sleeper", NULL));
    send_c2d("sleeper", "a", NULL, HUBMSG_ACK_NONE);
    send_c2d("sleeper", "b", NULL, HUBMSG_ACK_NONE);
    uint64_t purged = 0;
    OK(hubmsg_service_purge_c2d(svc, "sleeper", &purged));
    CHECK(purged == 2);
    hubmsg_message *m = text_message("x", NULL);
    CHECK_RC(hubmsg_service_send_c2d(svc, "ghost", m, HUBMSG_ACK_NONE, 0, NULL), HUBMSG_NOT_FOUND);
    CHECK_RC(hubmsg_service_send_c2d(svc, "sleeper", m, HUBMSG_ACK_NONE, 49ull * 3600 * 1000, NULL), HUBMSG_INVALID_ARGUMENT);
    hubmsg_message_free(m);
}

/* ---- many threads, one device ------------------------------------------------------------ */

#define PER_THREAD 150

static void *sender(void *arg) {
    for (int i = 0; i < PER_THREAD; i++) {
        hubmsg_message *m = text_message("t", NULL);
        OK(hubmsg_device_send((hubmsg_device *)arg, m, NULL, NULL));
        hubmsg_message_free(m);
    }
    return NULL;
}

static void concurrent_senders(void) {
    hubmsg_device *dev = new_device("busy", NULL);
    pthread_t t[3];
    for (int i = 0; i < 3; i++) CHECK(pthread_create(&t[i], NULL, sender, dev) == 0);
    for (int i = 0; i < 3; i++) CHECK(pthread_join(t[i], NULL) == 0);
    OK(hubmsg_device_flush(dev, (uint32_t)limit_ms(20000)));
    hubmsg_device_stats st;
    OK(hubmsg_device_get_stats(dev, &st));
    CHECK(st.delivered == 3 * PER_THREAD && st.depth == 0);
    hubmsg_device_free(dev);
}

/* ---- freeing a client from inside its own callback ---------------------------------------- */

struct self_free {
    hubmsg_device *dev;
    _Atomic(hubmsg_events *) events;
    atomic_int calls, dropped;
};

static void c2d_then_free(void *ctx, hubmsg_c2d *c) {
    struct self_free *s = ctx;
    atomic_fetch_add(&s->calls, 1);
    OK(hubmsg_c2d_complete(c));
    hubmsg_device_free(s->dev);
}

static void event_then_free(void *ctx, hubmsg_event *e) {
    struct self_free *s = ctx;
    atomic_fetch_add(&s->calls, 1);
    OK(hubmsg_event_ack(e));
    /* The first event can arrive before hubmsg_service_events_open() returned the handle. */
    hubmsg_events *self = NULL;
    for (int i = 0; i < 10000 && !(self = atomic_load(&s->events)); i++) nap_ms(1);
    CHECK(self != NULL);
    hubmsg_events_free(self);
}

static void self_dropped(void *ctx) { atomic_fetch_add(&((struct self_free *)ctx)->dropped, 1); }

static void free_inside_own_callback(void) {
    static struct self_free dev_state, ev_state;
    dev_state.dev = new_device("selfish", NULL);
    hubmsg_c2d_callback ccb = {&dev_state, c2d_then_free, self_dropped};
    OK(hubmsg_device_on_c2d(dev_state.dev, &ccb));
    send_c2d("selfish", "bye", NULL, HUBMSG_ACK_NONE);
    WAIT_UNTIL(atomic_load(&dev_state.dropped) == 1, limit_ms(15000));
    CHECK(atomic_load(&dev_state.calls) == 1);

    /* An event stream freed by its first event (events exist from d2c_send_and_consume). */
    hubmsg_event_callback ecb = {&ev_state, event_then_free, self_dropped};
    hubmsg_events *ev = NULL;
    OK(hubmsg_service_events_open(svc, "self-free", HUBMSG_START_EARLIEST, 0, &ecb, &ev));
    atomic_store(&ev_state.events, ev);
    WAIT_UNTIL(atomic_load(&ev_state.dropped) == 1, limit_ms(15000));
    CHECK(atomic_load(&ev_state.calls) == 1);
}

int main(void) {
    RUN(log_callback_set);
    RUN(hub_starts_on_port_0);
    RUN(identities);
    RUN(d2c_send_and_consume);
    RUN(c2d_callbacks);
    RUN(c2d_pull);
    RUN(concurrent_senders);
    RUN(free_inside_own_callback);
    hubmsg_service_free(svc);
    hubmsg_hub_free(hub);
    OK(hubmsg_set_log_callback(NULL, HUBMSG_LOG_OFF));
    CHECK(atomic_load(&log_dropped) == 1 && atomic_load(&log_lines) > 0);
    printf("c-test ok log_callback_released\n");
    return 0;
}
