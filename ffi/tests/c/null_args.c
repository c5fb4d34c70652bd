/* Every exported function with NULL and out-of-range arguments: the documented result code, a
 * last-error message, out-pointers set to NULL, getters returning NULL / 0, and _free(NULL) a
 * no-op. The Rust runner checks that every function declared in hubmsg.h appears in this file. */
#define _POSIX_C_SOURCE 200809L
#include "check.h"

#define NOT_NULL ((void *)0x1) /* a dangling marker: must be overwritten with NULL */

static void results_and_errors(void) {
    CHECK(strcmp(hubmsg_result_str(HUBMSG_OK), "HUBMSG_OK") == 0);
    CHECK(strcmp(hubmsg_result_str(HUBMSG_EMPTY), "HUBMSG_EMPTY") == 0);
    CHECK(strcmp(hubmsg_result_str(HUBMSG_QUEUE_FULL), "HUBMSG_QUEUE_FULL") == 0);
    CHECK(strcmp(hubmsg_result_str(HUBMSG_INTERNAL), "HUBMSG_INTERNAL") == 0);
    CHECK(strcmp(hubmsg_result_str(-9999), "HUBMSG_UNKNOWN") == 0);
    CHECK(hubmsg_version() != NULL && strlen(hubmsg_version()) > 0);
    CHECK(hubmsg_last_error_message() != NULL);
    INVALID(hubmsg_message_new(NULL, 3, NULL));
    CHECK(strstr(hubmsg_last_error_message(), "INVALID_ARGUMENT") != NULL);
    CHECK(strstr(hubmsg_last_error_message(), "out is NULL") != NULL);
}

static void messages(void) {
    hubmsg_message *m = NOT_NULL;
    INVALID(hubmsg_message_new(NULL, 3, &m));
    CHECK(m == NULL);
    OK(hubmsg_message_new(NULL, 0, &m));
    CHECK(m != NULL);
    hubmsg_message *c = NOT_NULL;
    INVALID(hubmsg_message_clone(NULL, &c));
    CHECK(c == NULL);
    INVALID(hubmsg_message_clone(m, NULL));
    INVALID(hubmsg_message_set_message_id(NULL, "x"));
    INVALID(hubmsg_message_set_message_id(m, ""));
    INVALID(hubmsg_message_set_correlation_id(NULL, "x"));
    INVALID(hubmsg_message_set_content_type(NULL, "x"));
    INVALID(hubmsg_message_set_content_encoding(NULL, "x"));
    INVALID(hubmsg_message_set_expiry(NULL, 1));
    INVALID(hubmsg_message_add_property(NULL, "a", "b"));
    INVALID(hubmsg_message_add_property(m, NULL, "b"));
    INVALID(hubmsg_message_add_property(m, "a", NULL));
    INVALID(hubmsg_message_add_property(m, "", "b"));
    INVALID(hubmsg_message_add_property(m, "\xff\xfe", "b")); /* not UTF-8 */
    const uint8_t *data = NOT_NULL;
    size_t len = 7;
    INVALID(hubmsg_message_body(NULL, &data, &len));
    CHECK(data == NULL && len == 0);
    INVALID(hubmsg_message_body(m, NULL, &len));
    INVALID(hubmsg_message_body(m, &data, NULL));
    CHECK(hubmsg_message_message_id(NULL) == NULL);
    CHECK(hubmsg_message_message_id(m) == NULL); /* unset */
    CHECK(hubmsg_message_correlation_id(NULL) == NULL);
    CHECK(hubmsg_message_content_type(NULL) == NULL);
    CHECK(hubmsg_message_content_encoding(NULL) == NULL);
    CHECK(hubmsg_message_expiry(NULL) == 0);
    CHECK(hubmsg_message_creation_time(NULL) == 0);
    CHECK(hubmsg_message_property(NULL, "a") == NULL);
    CHECK(hubmsg_message_property(m, NULL) == NULL);
    CHECK(hubmsg_message_property_count(NULL) == 0);
    const char *k = NOT_NULL, *v = NOT_NULL;
    INVALID(hubmsg_message_property_at(m, 0, &k, &v)); /* out of range */
    CHECK(k == NULL && v == NULL);
    INVALID(hubmsg_message_property_at(NULL, 0, &k, &v));
    INVALID(hubmsg_message_property_at(m, 0, NULL, &v));
    INVALID(hubmsg_message_property_at(m, 0, &k, NULL));
    CHECK(hubmsg_message_system_property(NULL, "x") == NULL);
    CHECK(hubmsg_message_system_property(m, NULL) == NULL);
    hubmsg_message_free(NULL);
    hubmsg_string_free(NULL);
    hubmsg_message_free(m);
}

static void device_options(void) {
    hubmsg_device_options *o = NOT_NULL;
    INVALID(hubmsg_device_options_new(NULL, "d", &o));
    CHECK(o == NULL);
    INVALID(hubmsg_device_options_new("h:1", NULL, &o));
    INVALID(hubmsg_device_options_new("h:1", "d", NULL));
    o = NOT_NULL;
    INVALID(hubmsg_device_options_from_connection_string(NULL, &o));
    CHECK(o == NULL);
    INVALID(hubmsg_device_options_from_connection_string("not a connection string", &o));
    CHECK(o == NULL);
    INVALID(hubmsg_device_options_from_connection_string("HostName=h;SharedAccessKeyName=p;SharedAccessKey=a2V5", &o));
    INVALID(hubmsg_device_options_from_connection_string("HostName=h;DeviceId=d;SharedAccessKey=a2V5", NULL));
    OK(hubmsg_device_options_new("127.0.0.1:1", "d", &o));
    INVALID(hubmsg_device_options_set_key(NULL, "a2V5"));
    INVALID(hubmsg_device_options_set_key(o, NULL));
    INVALID(hubmsg_device_options_set_key(o, "not base64!"));
    INVALID(hubmsg_device_options_set_sas_token(NULL, "x"));
    INVALID(hubmsg_device_options_set_sas_token(o, NULL));
    INVALID(hubmsg_device_options_set_sas_token(o, "garbage"));
    INVALID(hubmsg_device_options_set_outbox_dir(NULL, "/tmp/x"));
    OK(hubmsg_device_options_set_outbox_dir(o, NULL)); /* NULL = the default directory */
    INVALID(hubmsg_device_options_set_outbox_in_memory(NULL, 1));
    OK(hubmsg_device_options_set_outbox_in_memory(o, 1));
    INVALID(hubmsg_device_options_set_outbox_limits(NULL, 1, 1, HUBMSG_OVERFLOW_REJECT));
    INVALID(hubmsg_device_options_set_outbox_limits(o, 0, 1, HUBMSG_OVERFLOW_REJECT));
    INVALID(hubmsg_device_options_set_outbox_limits(o, 1, 0, HUBMSG_OVERFLOW_REJECT));
    INVALID(hubmsg_device_options_set_outbox_limits(o, 1, 1, 2));
    INVALID(hubmsg_device_options_set_outbox_limits(o, 1, 1, -1));
    OK(hubmsg_device_options_set_outbox_limits(o, 1, 1, HUBMSG_OVERFLOW_DROP_OLDEST));
    INVALID(hubmsg_device_options_set_durability(NULL, HUBMSG_DURABILITY_ALWAYS, 0));
    INVALID(hubmsg_device_options_set_durability(o, 3, 0));
    INVALID(hubmsg_device_options_set_durability(o, HUBMSG_DURABILITY_INTERVAL, 0));
    OK(hubmsg_device_options_set_durability(o, HUBMSG_DURABILITY_INTERVAL, 50));
    INVALID(hubmsg_device_options_set_retry(NULL, 1, 2, 2.0, 0, HUBMSG_FOREVER));
    INVALID(hubmsg_device_options_set_retry(o, 3, 2, 2.0, 0, HUBMSG_FOREVER));
    INVALID(hubmsg_device_options_set_retry(o, 1, 2, 0.5, 0, HUBMSG_FOREVER));
    INVALID(hubmsg_device_options_set_retry(o, 1, 2, 1.0 / 0.0, 0, HUBMSG_FOREVER));
    OK(hubmsg_device_options_set_retry(o, 10, 20, 1.0, 5, 1000));
    INVALID(hubmsg_device_options_set_retry_none(NULL));
    INVALID(hubmsg_device_options_set_ca_file(NULL, "x.pem"));
    OK(hubmsg_device_options_set_ca_file(o, NULL));
    hubmsg_device *d = NOT_NULL;
    INVALID(hubmsg_device_new(o, &d)); /* no credential yet */
    CHECK(d == NULL);
    CHECK(strstr(hubmsg_last_error_message(), "credential") != NULL);
    INVALID(hubmsg_device_new(NULL, &d));
    INVALID(hubmsg_device_new(o, NULL));
    d = NOT_NULL;
    INVALID(hubmsg_device_new_from_connection_string(NULL, &d));
    CHECK(d == NULL);
    INVALID(hubmsg_device_new_from_connection_string("HostName=h:1;DeviceId=d;SharedAccessKey=a2V5", NULL));
    INVALID(hubmsg_device_new_from_connection_string("HostName=h:1;DeviceId=a/b;SharedAccessKey=a2V5", &d));
    CHECK(d == NULL);
    hubmsg_device_options_free(NULL);
    hubmsg_device_options_free(o);
}

static void noop_call(void *ctx, int32_t a, const char *b) { (void)ctx; (void)a; (void)b; }

static void device_calls(void) {
    /* A real device pointed at a closed port: it retries in the background, which does not
     * matter for argument checks. */
    hubmsg_device_options *o = NULL;
    OK(hubmsg_device_options_new("127.0.0.1:1", "nobody", &o));
    OK(hubmsg_device_options_set_key(o, "a2V5a2V5a2V5"));
    OK(hubmsg_device_options_set_retry_none(o));
    hubmsg_device *d = NULL;
    OK(hubmsg_device_new(o, &d));
    hubmsg_device_options_free(o);
    hubmsg_message *m = NULL;
    OK(hubmsg_message_new((const uint8_t *)"x", 1, &m));

    hubmsg_delivery *del = NOT_NULL;
    INVALID(hubmsg_device_send(NULL, m, NULL, &del));
    CHECK(del == NULL);
    INVALID(hubmsg_device_send(d, NULL, NULL, NULL));
    hubmsg_outcome_callback no_call = {NULL, NULL, NULL};
    INVALID(hubmsg_device_send(d, m, &no_call, NULL));
    hubmsg_outcome_callback cb = {NULL, noop_call, NULL};
    (void)cb;
    int32_t outcome = 77;
    INVALID(hubmsg_delivery_wait(NULL, 0, &outcome));
    CHECK(outcome == 77);
    CHECK(hubmsg_delivery_message_id(NULL) == NULL);
    hubmsg_delivery_free(NULL);
    OK(hubmsg_device_send(d, m, NULL, &del));
    CHECK(del != NULL);
    INVALID(hubmsg_delivery_wait(del, 0, NULL));
    CHECK_RC(hubmsg_delivery_wait(del, 0, &outcome), HUBMSG_PENDING); /* nobody to deliver to */
    CHECK(hubmsg_delivery_message_id(del) != NULL);
    hubmsg_delivery_free(del);

    INVALID(hubmsg_device_flush(NULL, 0));
    CHECK_RC(hubmsg_device_flush(d, 0), HUBMSG_TIMEOUT);
    int32_t status = -1;
    INVALID(hubmsg_device_status(NULL, &status));
    INVALID(hubmsg_device_status(d, NULL));
    OK(hubmsg_device_status(d, &status));
    CHECK(status >= HUBMSG_STATUS_CONNECTING && status <= HUBMSG_STATUS_CLOSED);
    hubmsg_status_callback scb = {NULL, NULL, NULL};
    INVALID(hubmsg_device_on_status(NULL, &scb));
    INVALID(hubmsg_device_on_status(d, NULL));
    INVALID(hubmsg_device_on_status(d, &scb)); /* call is NULL */
    INVALID(hubmsg_device_reconnect(NULL));
    OK(hubmsg_device_reconnect(d));
    hubmsg_device_stats st;
    INVALID(hubmsg_device_get_stats(NULL, &st));
    INVALID(hubmsg_device_get_stats(d, NULL));
    OK(hubmsg_device_get_stats(d, &st));
    CHECK(st.depth == 1);

    hubmsg_c2d *c = NOT_NULL;
    INVALID(hubmsg_device_recv(NULL, 0, &c));
    CHECK(c == NULL);
    INVALID(hubmsg_device_recv(d, 0, NULL));
    CHECK_RC(hubmsg_device_recv(d, 10, &c), HUBMSG_EMPTY);
    CHECK(c == NULL);
    hubmsg_c2d_callback ccb = {NULL, NULL, NULL};
    INVALID(hubmsg_device_on_c2d(NULL, &ccb));
    INVALID(hubmsg_device_on_c2d(d, NULL));
    INVALID(hubmsg_device_on_c2d(d, &ccb));
    CHECK(hubmsg_c2d_message(NULL) == NULL);
    CHECK(hubmsg_c2d_sequence_number(NULL) == 0);
    INVALID(hubmsg_c2d_complete(NULL));
    INVALID(hubmsg_c2d_abandon(NULL));
    INVALID(hubmsg_c2d_reject(NULL));
    hubmsg_c2d_free(NULL);

    hubmsg_message_free(m);
    hubmsg_device_free(d);
    hubmsg_device_free(NULL);
}

static void service_calls(void) {
    hubmsg_service *s = NOT_NULL;
    INVALID(hubmsg_service_new(NULL, NULL, &s));
    CHECK(s == NULL);
    INVALID(hubmsg_service_new("HostName=h:1;DeviceId=d;SharedAccessKey=a2V5", NULL, &s));
    CHECK(s == NULL);
    INVALID(hubmsg_service_new("HostName=h:1;SharedAccessKeyName=p;SharedAccessKey=a2V5", NULL, NULL));
    hubmsg_message *m = NULL;
    OK(hubmsg_message_new((const uint8_t *)"x", 1, &m));
    uint64_t n = 5;
    INVALID(hubmsg_service_send_c2d(NULL, "d", m, HUBMSG_ACK_NONE, 0, &n));
    CHECK(n == 5);
    hubmsg_feedback *f = NOT_NULL;
    INVALID(hubmsg_service_send_c2d_and_wait(NULL, "d", m, HUBMSG_ACK_FULL, 0, 10, &f));
    CHECK(f == NULL);
    INVALID(hubmsg_service_purge_c2d(NULL, "d", &n));
    hubmsg_feedback_batch *b = NOT_NULL;
    INVALID(hubmsg_service_feedback_next(NULL, 0, &b));
    CHECK(b == NULL);
    hubmsg_feedback_callback fcb = {NULL, NULL, NULL};
    INVALID(hubmsg_service_on_feedback(NULL, &fcb));
    CHECK(hubmsg_feedback_batch_count(NULL) == 0);
    CHECK(hubmsg_feedback_batch_at(NULL, 0) == NULL);
    INVALID(hubmsg_feedback_batch_ack(NULL));
    hubmsg_feedback_batch_free(NULL);
    hubmsg_feedback_info fi;
    INVALID(hubmsg_feedback_get_info(NULL, &fi));
    hubmsg_feedback_free(NULL);
    hubmsg_device_identity *id = NOT_NULL;
    INVALID(hubmsg_service_create_device(NULL, "d", &id));
    CHECK(id == NULL);
    id = NOT_NULL;
    INVALID(hubmsg_service_get_device(NULL, "d", &id));
    CHECK(id == NULL);
    hubmsg_device_list *l = NOT_NULL;
    INVALID(hubmsg_service_list_devices(NULL, &l));
    CHECK(l == NULL);
    INVALID(hubmsg_service_delete_device(NULL, "d"));
    INVALID(hubmsg_service_set_device_status(NULL, "d", HUBMSG_DEVICE_DISABLED, NULL));
    char *cs = NOT_NULL;
    INVALID(hubmsg_service_device_connection_string(NULL, "d", &cs));
    CHECK(cs == NULL);
    hubmsg_device_identity_info ii;
    INVALID(hubmsg_device_identity_get_info(NULL, &ii));
    hubmsg_device_identity_free(NULL);
    CHECK(hubmsg_device_list_count(NULL) == 0);
    CHECK(hubmsg_device_list_at(NULL, 0) == NULL);
    hubmsg_device_list_free(NULL);
    hubmsg_events *ev = NOT_NULL;
    INVALID(hubmsg_service_events_open(NULL, "$Default", HUBMSG_START_EARLIEST, 0, NULL, &ev));
    CHECK(ev == NULL);
    hubmsg_event *e = NOT_NULL;
    INVALID(hubmsg_events_next(NULL, 0, &e));
    CHECK(e == NULL);
    INVALID(hubmsg_events_checkpoint(NULL));
    hubmsg_events_free(NULL);
    CHECK(hubmsg_event_message(NULL) == NULL);
    hubmsg_event_info ei;
    INVALID(hubmsg_event_get_info(NULL, &ei));
    INVALID(hubmsg_event_ack(NULL));
    hubmsg_event_free(NULL);
    hubmsg_service_free(NULL);

    /* A real client (pointed at a closed port) for the checks of its other arguments. */
    OK(hubmsg_service_new("HostName=127.0.0.1:1;SharedAccessKeyName=p;SharedAccessKey=a2V5a2V5", NULL, &s));
    INVALID(hubmsg_service_send_c2d(s, NULL, m, HUBMSG_ACK_NONE, 0, NULL));
    INVALID(hubmsg_service_send_c2d(s, "d", NULL, HUBMSG_ACK_NONE, 0, NULL));
    INVALID(hubmsg_service_send_c2d(s, "d", m, 4, 0, NULL));
    INVALID(hubmsg_service_send_c2d(s, "d", m, -1, 0, NULL));
    INVALID(hubmsg_service_send_c2d_and_wait(s, "d", m, HUBMSG_ACK_FULL, 0, 10, NULL));
    INVALID(hubmsg_service_send_c2d_and_wait(s, "d", m, 9, 0, 10, &f));
    INVALID(hubmsg_service_purge_c2d(s, NULL, NULL));
    INVALID(hubmsg_service_feedback_next(s, 0, NULL));
    INVALID(hubmsg_service_on_feedback(s, NULL));
    INVALID(hubmsg_service_on_feedback(s, &fcb));
    INVALID(hubmsg_service_create_device(s, NULL, NULL));
    INVALID(hubmsg_service_get_device(s, "d", NULL));
    INVALID(hubmsg_service_list_devices(s, NULL));
    INVALID(hubmsg_service_delete_device(s, NULL));
    INVALID(hubmsg_service_set_device_status(s, "d", 2, NULL));
    INVALID(hubmsg_service_device_connection_string(s, "d", NULL));
    INVALID(hubmsg_service_events_open(s, NULL, HUBMSG_START_EARLIEST, 0, NULL, &ev));
    INVALID(hubmsg_service_events_open(s, "$Default", 5, 0, NULL, &ev));
    hubmsg_event_callback ecb = {NULL, NULL, NULL};
    INVALID(hubmsg_service_events_open(s, "$Default", HUBMSG_START_EARLIEST, 0, &ecb, &ev));
    INVALID(hubmsg_service_events_open(s, "$Default", HUBMSG_START_EARLIEST, 0, NULL, NULL));
    hubmsg_service_free(s);
    hubmsg_message_free(m);
}

static void hub_calls(void) {
    hubmsg_hub_options *o = NOT_NULL;
    INVALID(hubmsg_hub_options_new(NULL, &o));
    CHECK(o == NULL);
    INVALID(hubmsg_hub_options_new("/tmp/x", NULL));
    OK(hubmsg_hub_options_new("/tmp/x", &o));
    INVALID(hubmsg_hub_options_set_listen(NULL, "127.0.0.1:0"));
    INVALID(hubmsg_hub_options_set_listen(o, NULL));
    INVALID(hubmsg_hub_options_set_listen(o, "localhost"));
    INVALID(hubmsg_hub_options_set_listen(o, "127.0.0.1:99999"));
    INVALID(hubmsg_hub_options_set_feedback_interval(NULL, 10));
    INVALID(hubmsg_hub_options_set_feedback_interval(o, 0));
    INVALID(hubmsg_hub_options_set_durability(NULL, HUBMSG_DURABILITY_NEVER, 0));
    INVALID(hubmsg_hub_options_set_durability(o, 7, 0));
    hubmsg_hub *h = NOT_NULL;
    INVALID(hubmsg_hub_start(NULL, NULL, &h));
    CHECK(h == NULL);
    INVALID(hubmsg_hub_start("/tmp/x", "nonsense", &h));
    CHECK(h == NULL);
    INVALID(hubmsg_hub_start("/tmp/x", NULL, NULL));
    INVALID(hubmsg_hub_start_with(NULL, &h));
    INVALID(hubmsg_hub_start_with(o, NULL));
    hubmsg_hub_options_free(o);
    hubmsg_hub_options_free(NULL);
    CHECK(hubmsg_hub_address(NULL) == NULL);
    CHECK(hubmsg_hub_service_connection_string(NULL) == NULL);
    char *cs = NOT_NULL;
    INVALID(hubmsg_hub_create_device(NULL, "d", &cs));
    CHECK(cs == NULL);
    cs = NOT_NULL;
    INVALID(hubmsg_hub_device_connection_string(NULL, "d", &cs));
    CHECK(cs == NULL);
    hubmsg_hub_free(NULL);
}

static void log_calls(void) {
    hubmsg_log_callback cb = {NULL, NULL, NULL};
    INVALID(hubmsg_set_log_callback(&cb, HUBMSG_LOG_INFO)); /* call is NULL */
    INVALID(hubmsg_set_log_callback(NULL, 6));
    INVALID(hubmsg_set_log_callback(NULL, -1));
    OK(hubmsg_set_log_callback(NULL, HUBMSG_LOG_OFF));
}

int main(void) {
    RUN(results_and_errors);
    RUN(messages);
    RUN(device_options);
    RUN(device_calls);
    RUN(service_calls);
    RUN(hub_calls);
    RUN(log_calls);
    return 0;
}
