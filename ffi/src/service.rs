//! The service client: C2D send with feedback, feedback batches, D2C events by consumer group
//! with checkpoints, purge, and device identity management.
//!
//! `hubmsg_service` and `hubmsg_events` are thread-safe; their callbacks run on the handle's own
//! callback thread, one at a time, never on a runtime thread, and may free their own handle.
//! Records (`hubmsg_feedback`, `hubmsg_device_identity`, `hubmsg_event`, batches, lists) are
//! plain data, not thread-safe.

use std::ffi::{c_char, c_void, CString};
use std::sync::Arc;
use std::time::Duration;

use hubmsg_core::proto::{AckMode, DeviceIdentity, DeviceStatus, FeedbackRecord, FeedbackStatus, StartPosition};
use hubmsg_core::service::{C2dOptions, Event, FeedbackBatch, ServiceClient, ServiceOptions};
use hubmsg_core::transport::TlsOptions;
use hubmsg_core::{Error, ErrorKind, Result};

use crate::args::{arg_enum, arg_mut, arg_ref, arg_str, free_box, free_handle, ms, opt_str, put_opt, Out};
use crate::callback::Closure;
use crate::message::hubmsg_message;
use crate::result::{guard, guard_or, hubmsg_result, to_cstring, HUBMSG_OK};
use hubmsg_bind::sources::{EventsControl, EventsSource, FeedbackSource};
use hubmsg_bind::{block_on, dispose, runtime, Rt};
use hubmsg_bind::{Dispatcher, Inbox};

/// C2D feedback request: none (default).
pub const HUBMSG_ACK_NONE: i32 = 0;
/// C2D feedback request: on completion.
pub const HUBMSG_ACK_POSITIVE: i32 = 1;
/// C2D feedback request: on dead-lettering (expired, delivery count exceeded, rejected) and purge.
pub const HUBMSG_ACK_NEGATIVE: i32 = 2;
/// C2D feedback request: both.
pub const HUBMSG_ACK_FULL: i32 = 3;

/// Feedback status: completed by the device.
pub const HUBMSG_FEEDBACK_SUCCESS: i32 = 0;
/// Feedback status: the TTL passed before completion.
pub const HUBMSG_FEEDBACK_EXPIRED: i32 = 1;
/// Feedback status: abandoned too many times.
pub const HUBMSG_FEEDBACK_DELIVERY_COUNT_EXCEEDED: i32 = 2;
/// Feedback status: rejected by the device.
pub const HUBMSG_FEEDBACK_REJECTED: i32 = 3;
/// Feedback status: removed by a purge.
pub const HUBMSG_FEEDBACK_PURGED: i32 = 4;

/// Event start position: the group's checkpoint (the beginning if none).
pub const HUBMSG_START_CHECKPOINT: i32 = 0;
/// Event start position: the oldest retained event.
pub const HUBMSG_START_EARLIEST: i32 = 1;
/// Event start position: only events enqueued after the consumer started.
pub const HUBMSG_START_LATEST: i32 = 2;
/// Event start position: from sequence number `from_value` (inclusive) in every partition.
pub const HUBMSG_START_SEQUENCE: i32 = 3;
/// Event start position: from the first event enqueued at or after `from_value` (ms since the
/// Unix epoch).
pub const HUBMSG_START_TIME: i32 = 4;

/// Device identity status: may connect.
pub const HUBMSG_DEVICE_ENABLED: i32 = 0;
/// Device identity status: refused at connect (and dropped if connected).
pub const HUBMSG_DEVICE_DISABLED: i32 = 1;

const ACK_MODES: &[(i32, &str, AckMode)] = &[
    (HUBMSG_ACK_NONE, "HUBMSG_ACK_NONE", AckMode::None),
    (HUBMSG_ACK_POSITIVE, "HUBMSG_ACK_POSITIVE", AckMode::Positive),
    (HUBMSG_ACK_NEGATIVE, "HUBMSG_ACK_NEGATIVE", AckMode::Negative),
    (HUBMSG_ACK_FULL, "HUBMSG_ACK_FULL", AckMode::Full),
];

const DEVICE_STATUSES: &[(i32, &str, DeviceStatus)] = &[
    (HUBMSG_DEVICE_ENABLED, "HUBMSG_DEVICE_ENABLED", DeviceStatus::Enabled),
    (HUBMSG_DEVICE_DISABLED, "HUBMSG_DEVICE_DISABLED", DeviceStatus::Disabled),
];

fn feedback_code(s: FeedbackStatus) -> i32 {
    match s {
        FeedbackStatus::Success => HUBMSG_FEEDBACK_SUCCESS,
        FeedbackStatus::Expired => HUBMSG_FEEDBACK_EXPIRED,
        FeedbackStatus::DeliveryCountExceeded => HUBMSG_FEEDBACK_DELIVERY_COUNT_EXCEEDED,
        FeedbackStatus::Rejected => HUBMSG_FEEDBACK_REJECTED,
        FeedbackStatus::Purged => HUBMSG_FEEDBACK_PURGED,
    }
}

fn device_status_code(s: DeviceStatus) -> i32 {
    DEVICE_STATUSES.iter().find(|d| d.2 == s).map_or(HUBMSG_DEVICE_ENABLED, |d| d.0)
}

// ---------------------------------------------------------------------------------------------
// Records

/// One C2D feedback record. Read it with hubmsg_feedback_get_info(). Plain data: not
/// thread-safe (one thread at a time), no callbacks.
#[allow(non_camel_case_types)]
pub struct hubmsg_feedback {
    strings: [CString; 5],
    status: i32,
}

impl From<&FeedbackRecord> for hubmsg_feedback {
    fn from(r: &FeedbackRecord) -> hubmsg_feedback {
        hubmsg_feedback {
            strings: [&r.original_message_id, &r.device_id, &r.device_generation_id, &r.enqueued_time_utc, &r.description]
                .map(|s| to_cstring(s)),
            status: feedback_code(r.status_code),
        }
    }
}

/// The fields of a feedback record; the strings are owned by the record.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct hubmsg_feedback_info {
    /// Message id of the C2D message.
    pub original_message_id: *const c_char,
    /// Target device.
    pub device_id: *const c_char,
    /// Target device's generation id.
    pub device_generation_id: *const c_char,
    /// When the outcome happened (ISO-8601 UTC).
    pub enqueued_time_utc: *const c_char,
    /// The status as text (`Success`, `Rejected`, …).
    pub description: *const c_char,
    /// A HUBMSG_FEEDBACK_* value.
    pub status: i32,
}

/// Reads a feedback record.
///
/// @param feedback The record.
/// @param out Receives the fields (strings valid while the record lives).
/// @return HUBMSG_OK or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_feedback_get_info(feedback: *const hubmsg_feedback, out: *mut hubmsg_feedback_info) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `feedback`.
        let f = unsafe { arg_ref(feedback, "feedback") }?;
        if out.is_null() {
            return Err(crate::args::null("out"));
        }
        let [a, b, c, d, e] = &f.strings;
        let info = hubmsg_feedback_info {
            original_message_id: a.as_ptr(),
            device_id: b.as_ptr(),
            device_generation_id: c.as_ptr(),
            enqueued_time_utc: d.as_ptr(),
            description: e.as_ptr(),
            status: f.status,
        };
        // SAFETY: checked non-NULL; writable per the C API contract.
        unsafe { out.write(info) };
        Ok(HUBMSG_OK)
    })
}

/// Frees a record from hubmsg_service_send_c2d_and_wait(). NULL is a no-op. Never free a
/// record borrowed from a batch.
///
/// @param feedback The record, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_feedback_free(feedback: *mut hubmsg_feedback) {
    // SAFETY: the C API contract for `feedback`.
    unsafe { free_handle(feedback) }
}

/// A device identity from the registry. Read it with hubmsg_device_identity_get_info(). Plain
/// data: not thread-safe (one thread at a time), no callbacks.
#[allow(non_camel_case_types)]
pub struct hubmsg_device_identity {
    strings: [CString; 4],
    status: i32,
    created_ms: u64,
}

impl From<&DeviceIdentity> for hubmsg_device_identity {
    fn from(d: &DeviceIdentity) -> hubmsg_device_identity {
        hubmsg_device_identity {
            strings: [&d.device_id, &d.generation_id, &d.primary_key, &d.secondary_key].map(|s| to_cstring(s)),
            status: device_status_code(d.status),
            created_ms: d.created_ms,
        }
    }
}

/// The fields of a device identity; the strings are owned by the identity.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct hubmsg_device_identity_info {
    /// Device id.
    pub device_id: *const c_char,
    /// Generation id (tells re-created devices with the same id apart).
    pub generation_id: *const c_char,
    /// Primary symmetric key (base64).
    pub primary_key: *const c_char,
    /// Secondary symmetric key (base64).
    pub secondary_key: *const c_char,
    /// HUBMSG_DEVICE_ENABLED or HUBMSG_DEVICE_DISABLED.
    pub status: i32,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
}

/// Reads a device identity.
///
/// @param identity The identity.
/// @param out Receives the fields (strings valid while the identity lives).
/// @return HUBMSG_OK or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_identity_get_info(
    identity: *const hubmsg_device_identity,
    out: *mut hubmsg_device_identity_info,
) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `identity`.
        let d = unsafe { arg_ref(identity, "identity") }?;
        if out.is_null() {
            return Err(crate::args::null("out"));
        }
        let [a, b, c, e] = &d.strings;
        let info = hubmsg_device_identity_info {
            device_id: a.as_ptr(),
            generation_id: b.as_ptr(),
            primary_key: c.as_ptr(),
            secondary_key: e.as_ptr(),
            status: d.status,
            created_ms: d.created_ms,
        };
        // SAFETY: checked non-NULL; writable per the C API contract.
        unsafe { out.write(info) };
        Ok(HUBMSG_OK)
    })
}

/// Frees an identity. NULL is a no-op. Never free one borrowed from a list.
///
/// @param identity The identity, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_identity_free(identity: *mut hubmsg_device_identity) {
    // SAFETY: the C API contract for `identity`.
    unsafe { free_handle(identity) }
}

/// A list of device identities (from hubmsg_service_list_devices()). Plain data: not
/// thread-safe (one thread at a time), no callbacks.
#[allow(non_camel_case_types)]
pub struct hubmsg_device_list {
    items: Vec<hubmsg_device_identity>,
}

/// The number of identities in a list (0 when `list` is NULL).
///
/// @param list The list.
/// @return The count.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_list_count(list: *const hubmsg_device_list) -> usize {
    // SAFETY: the C API contract for `list`.
    guard_or(0, || Ok(unsafe { arg_ref(list, "list") }?.items.len()))
}

/// The identity at `index` (ordered by device id).
///
/// @param list The list.
/// @param index 0 ≤ index < hubmsg_device_list_count().
/// @return The identity, borrowed from the list (do not free), or NULL when out of range.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_list_at(list: *const hubmsg_device_list, index: usize) -> *const hubmsg_device_identity {
    guard_or(std::ptr::null(), || {
        // SAFETY: the C API contract for `list`.
        let l = unsafe { arg_ref(list, "list") }?;
        l.items
            .get(index)
            .map(|d| d as *const _)
            .ok_or_else(|| Error::invalid(format!("index {index} is out of range (count {})", l.items.len())))
    })
}

/// Frees a list and its identities. NULL is a no-op.
///
/// @param list The list, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_device_list_free(list: *mut hubmsg_device_list) {
    // SAFETY: the C API contract for `list`.
    unsafe { free_handle(list) }
}

// ---------------------------------------------------------------------------------------------
// The client

/// Called with each feedback batch.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct hubmsg_feedback_callback {
    /// Passed to `call` and `drop`; owned by hubmsg once registered.
    pub context: *mut c_void,
    /// Called on the client's callback thread with a batch valid only during the call; call
    /// hubmsg_feedback_batch_ack() once processed (an unacknowledged batch is delivered again).
    pub call: Option<unsafe extern "C-unwind" fn(context: *mut c_void, batch: *mut hubmsg_feedback_batch)>,
    /// Called once with `context` when the callback is released (may be NULL).
    pub drop: Option<unsafe extern "C-unwind" fn(context: *mut c_void)>,
}

type FeedbackFn = unsafe extern "C-unwind" fn(*mut c_void, *mut hubmsg_feedback_batch);

/// A service (back-end) client. Thread-safe: any thread may call it concurrently. Its feedback
/// callback runs on the client's own callback thread (never a runtime thread), which may call any
/// hubmsg function, including hubmsg_service_free() on this client.
#[allow(non_camel_case_types)]
pub struct hubmsg_service {
    client: ServiceClient,
    feedback: Inbox<FeedbackSource>,
    dispatcher: Arc<Dispatcher>,
    rt: Rt,
}

unsafe fn service<'a>(svc: *mut hubmsg_service) -> Result<&'a hubmsg_service> {
    // SAFETY: the C API contract for `svc`.
    unsafe { arg_ref(svc, "svc") }
}

/// Creates a service client and starts connecting in the background.
///
/// @param connection_string A policy connection string
///        (`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`).
/// @param ca_file A PEM file to trust for TLS (forces TLS), or NULL.
/// @param out Receives the client (NULL on failure); free with hubmsg_service_free().
/// @return HUBMSG_OK, HUBMSG_INVALID_ARGUMENT, or HUBMSG_USAGE (runtime thread).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_service_new(
    connection_string: *const c_char,
    ca_file: *const c_char,
    out: *mut *mut hubmsg_service,
) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for all pointers.
        let (out, cs, ca) =
            unsafe { (Out::new(out, "out")?, arg_str(connection_string, "connection_string")?, opt_str(ca_file, "ca_file")?) };
        let mut opts = ServiceOptions::from_connection_string(cs)?;
        opts.tls = ca.map(|f| TlsOptions { ca_file: Some(f.into()) });
        let rt = runtime()?;
        let client = block_on(&rt, "hubmsg_service_new", ServiceClient::connect(opts))??;
        let c = client.clone();
        out.put(hubmsg_service {
            client,
            feedback: Inbox::lazy("feedback batches", move || Ok(FeedbackSource(c.feedback()?))),
            dispatcher: Dispatcher::new("hubmsg-service-cb"),
            rt,
        });
        Ok(HUBMSG_OK)
    })
}

/// Closes the client and frees it. NULL is a no-op. Pending calls on other threads fail with
/// HUBMSG_CLOSED. Safe from inside the client's own callback (see hubmsg_device_free()).
///
/// @param svc The client, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_service_free(svc: *mut hubmsg_service) {
    guard_or((), || {
        // SAFETY: the C API contract for `svc`.
        if let Some(s) = unsafe { free_box(svc) } {
            dispose(move || {
                s.dispatcher.close();
                s.feedback.stop(&s.rt);
                s.rt.block_on(s.client.close());
                s.dispatcher.shutdown();
            });
        }
        Ok(())
    })
}

/// Runs a blocking service call and maps its result.
fn call<T>(s: &hubmsg_service, what: &str, f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    block_on(&s.rt, what, f)?
}

fn c2d_options(ack: i32, ttl_ms: u64) -> Result<C2dOptions> {
    Ok(C2dOptions { ack: arg_enum(ack, "ack", ACK_MODES)?, ttl: (ttl_ms > 0).then(|| Duration::from_millis(ttl_ms)) })
}

/// Sends a C2D message; returns once the hub holds it durably.
///
/// @param svc The client.
/// @param device_id The target device.
/// @param msg The message (not consumed).
/// @param ack A HUBMSG_ACK_* value: which outcomes produce feedback.
/// @param ttl_ms Time to live (1 s – 48 h), or 0 for the message's expiry time or the hub's
///        default (1 h).
/// @param out_sequence_number Optional (may be NULL): receives the message's sequence number in
///        the device queue.
/// @return HUBMSG_OK, HUBMSG_NOT_FOUND (unknown device), HUBMSG_QUEUE_FULL (50 pending),
///         HUBMSG_MESSAGE_TOO_LARGE (> 64 KB), HUBMSG_INVALID_ARGUMENT (TTL, ack),
///         HUBMSG_UNAUTHORIZED, HUBMSG_CLOSED, or HUBMSG_USAGE (runtime thread).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_service_send_c2d(
    svc: *mut hubmsg_service,
    device_id: *const c_char,
    msg: *const hubmsg_message,
    ack: i32,
    ttl_ms: u64,
    out_sequence_number: *mut u64,
) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for all pointers.
        let (s, id, m) = unsafe { (service(svc)?, arg_str(device_id, "device_id")?, arg_ref(msg, "msg")?) };
        let receipt = call(s, "hubmsg_service_send_c2d", s.client.send_c2d_with(id, m.msg.clone(), c2d_options(ack, ttl_ms)?))?;
        // SAFETY: the C API contract for `out_sequence_number`.
        unsafe { put_opt(out_sequence_number, receipt.sequence_number) };
        Ok(HUBMSG_OK)
    })
}

/// Sends a C2D message and waits for its outcome: the feedback record (Success, Rejected,
/// Expired, DeliveryCountExceeded, Purged). The hub notifies this client's connection of the
/// outcome, whatever other service instances read feedback; the record also stays in the
/// hub-wide feedback queue. HUBMSG_TIMEOUT also when the outcome happened while the client was
/// disconnected and the hub restarted before it reconnected (docs/protocol.md, "Outcome
/// notifications").
///
/// @param svc The client.
/// @param device_id The target device.
/// @param msg The message (not consumed; a message id is generated when it has none).
/// @param ack A HUBMSG_ACK_* value; HUBMSG_ACK_NONE is taken as HUBMSG_ACK_FULL.
/// @param ttl_ms Time to live, or 0 (see hubmsg_service_send_c2d()).
/// @param timeout_ms How long to wait for the feedback after the hub accepted the message.
/// @param out Receives the record (NULL on failure); free with hubmsg_feedback_free().
/// @return HUBMSG_OK, HUBMSG_TIMEOUT (no feedback in time; the message was sent), the errors of
///         hubmsg_service_send_c2d().
#[no_mangle]
pub unsafe extern "C" fn hubmsg_service_send_c2d_and_wait(
    svc: *mut hubmsg_service,
    device_id: *const c_char,
    msg: *const hubmsg_message,
    ack: i32,
    ttl_ms: u64,
    timeout_ms: u32,
    out: *mut *mut hubmsg_feedback,
) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for all pointers.
        let (out, s, device, m) = unsafe { (Out::new(out, "out")?, service(svc)?, arg_str(device_id, "device_id")?, arg_ref(msg, "msg")?) };
        let mut opts = c2d_options(ack, ttl_ms)?;
        if opts.ack == AckMode::None {
            opts.ack = AckMode::Full;
        }
        let mut message = m.msg.clone();
        let id = message.message_id.get_or_insert_with(|| uuid::Uuid::new_v4().to_string()).clone();
        hubmsg_bind::ensure_may_block("hubmsg_service_send_c2d_and_wait")?;
        let rx = s.client.await_outcome(&id)?;
        let record = call(s, "hubmsg_service_send_c2d_and_wait", async {
            s.client.send_c2d_with(device, message, opts).await?;
            match tokio::time::timeout(ms(timeout_ms), rx).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(_)) => Err(Error::closed("service client")),
                Err(_) => Err(Error::new(ErrorKind::Timeout, format!("no feedback for message '{id}' within {timeout_ms} ms"))),
            }
        })?;
        out.put((&record).into());
        Ok(HUBMSG_OK)
    })
}

/// Removes every pending C2D message of a device (feedback Purged where requested).
///
/// @param svc The client.
/// @param device_id The device.
/// @param out_count Optional (may be NULL): receives how many were removed.
/// @return HUBMSG_OK, HUBMSG_NOT_FOUND, HUBMSG_INVALID_ARGUMENT, HUBMSG_CLOSED, or HUBMSG_USAGE.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_service_purge_c2d(
    svc: *mut hubmsg_service,
    device_id: *const c_char,
    out_count: *mut u64,
) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for all pointers.
        let (s, id) = unsafe { (service(svc)?, arg_str(device_id, "device_id")?) };
        let n = call(s, "hubmsg_service_purge_c2d", s.client.purge_c2d(id))?;
        // SAFETY: the C API contract for `out_count`.
        unsafe { put_opt(out_count, n) };
        Ok(HUBMSG_OK)
    })
}

/// A batch of feedback records, to acknowledge once processed. Not thread-safe (one thread at a
/// time); a batch lent to a callback is valid only during the call.
#[allow(non_camel_case_types)]
pub struct hubmsg_feedback_batch {
    batch: FeedbackBatch,
    records: Vec<hubmsg_feedback>,
}

impl From<FeedbackBatch> for hubmsg_feedback_batch {
    fn from(batch: FeedbackBatch) -> hubmsg_feedback_batch {
        let records = batch.records.iter().map(Into::into).collect();
        hubmsg_feedback_batch { batch, records }
    }
}

/// Waits up to `timeout_ms` for the next feedback batch (pull mode; the first call subscribes).
/// A client uses either this or hubmsg_service_on_feedback(), not both.
///
/// @param svc The client.
/// @param timeout_ms How long to wait.
/// @param out Receives the batch (NULL on failure or timeout); acknowledge it with
///        hubmsg_feedback_batch_ack() and free it with hubmsg_feedback_batch_free().
/// @return HUBMSG_OK, HUBMSG_EMPTY (timeout), HUBMSG_CLOSED, HUBMSG_INVALID_ARGUMENT, or
///         HUBMSG_USAGE (callback registered, or runtime thread).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_service_feedback_next(
    svc: *mut hubmsg_service,
    timeout_ms: u32,
    out: *mut *mut hubmsg_feedback_batch,
) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for both pointers.
        let (out, s) = unsafe { (Out::new(out, "out")?, service(svc)?) };
        crate::args::recv_into(&s.feedback, &s.rt, timeout_ms, out, hubmsg_feedback_batch::from)
    })
}

/// Receives feedback batches by callback (subscribes now). A client uses either this or
/// hubmsg_service_feedback_next(), not both.
///
/// @param svc The client.
/// @param callback The callback (copied; hubmsg owns its context from now on).
/// @return HUBMSG_OK, HUBMSG_INVALID_ARGUMENT, or HUBMSG_USAGE (already receiving).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_service_on_feedback(svc: *mut hubmsg_service, callback: *const hubmsg_feedback_callback) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for both pointers.
        let (s, cb) = unsafe { (service(svc)?, arg_ref(callback, "callback")?) };
        let cb = Closure::<FeedbackFn>::new("feedback callback", cb.context, cb.call, cb.drop)?;
        s.feedback.set_callback(&s.rt, &s.dispatcher, move |b| {
            // SAFETY: the user's callback with its own context; the batch lives during the call.
            cb.lend(hubmsg_feedback_batch::from(b), |f: FeedbackFn, ctx, p| unsafe { f(ctx, p) });
        })?;
        Ok(HUBMSG_OK)
    })
}

/// The number of records in a batch (0 when `batch` is NULL).
///
/// @param batch The batch.
/// @return The count.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_feedback_batch_count(batch: *const hubmsg_feedback_batch) -> usize {
    // SAFETY: the C API contract for `batch`.
    guard_or(0, || Ok(unsafe { arg_ref(batch, "batch") }?.records.len()))
}

/// The record at `index`.
///
/// @param batch The batch.
/// @param index 0 ≤ index < hubmsg_feedback_batch_count().
/// @return The record, borrowed from the batch (do not free), or NULL when out of range.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_feedback_batch_at(batch: *const hubmsg_feedback_batch, index: usize) -> *const hubmsg_feedback {
    guard_or(std::ptr::null(), || {
        // SAFETY: the C API contract for `batch`.
        let b = unsafe { arg_ref(batch, "batch") }?;
        b.records
            .get(index)
            .map(|r| r as *const _)
            .ok_or_else(|| Error::invalid(format!("index {index} is out of range (count {})", b.records.len())))
    })
}

/// Acknowledges a batch: the hub deletes it. An unacknowledged batch is delivered again.
///
/// @param batch The batch.
/// @return HUBMSG_OK or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_feedback_batch_ack(batch: *mut hubmsg_feedback_batch) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `batch`.
        unsafe { arg_mut(batch, "batch") }?.batch.ack();
        Ok(HUBMSG_OK)
    })
}

/// Frees a batch from hubmsg_service_feedback_next(). NULL is a no-op. Never free a batch
/// borrowed by a callback.
///
/// @param batch The batch, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_feedback_batch_free(batch: *mut hubmsg_feedback_batch) {
    // SAFETY: the C API contract for `batch`.
    unsafe { free_handle(batch) }
}

// ---------------------------------------------------------------------------------------------
// Identities

fn put_identity(out: Option<Out<hubmsg_device_identity>>, d: &DeviceIdentity) {
    if let Some(out) = out {
        out.put(d.into());
    }
}

/// Registers a device with generated keys.
///
/// @param svc The client.
/// @param device_id The new device's id.
/// @param out Optional (may be NULL): receives the identity; free with
///        hubmsg_device_identity_free().
/// @return HUBMSG_OK, HUBMSG_ALREADY_EXISTS, HUBMSG_INVALID_ARGUMENT, HUBMSG_UNAUTHORIZED,
///         HUBMSG_CLOSED, or HUBMSG_USAGE.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_service_create_device(
    svc: *mut hubmsg_service,
    device_id: *const c_char,
    out: *mut *mut hubmsg_device_identity,
) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for all pointers.
        let (out, s, id) = unsafe { (Out::optional(out), service(svc)?, arg_str(device_id, "device_id")?) };
        put_identity(out, &call(s, "hubmsg_service_create_device", s.client.create_device(id))?);
        Ok(HUBMSG_OK)
    })
}

/// Reads a device identity.
///
/// @param svc The client.
/// @param device_id The device.
/// @param out Receives the identity (NULL on failure); free with hubmsg_device_identity_free().
/// @return HUBMSG_OK, HUBMSG_NOT_FOUND, HUBMSG_INVALID_ARGUMENT, HUBMSG_CLOSED, or HUBMSG_USAGE.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_service_get_device(
    svc: *mut hubmsg_service,
    device_id: *const c_char,
    out: *mut *mut hubmsg_device_identity,
) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for all pointers.
        let (out, s, id) = unsafe { (Out::new(out, "out")?, service(svc)?, arg_str(device_id, "device_id")?) };
        put_identity(Some(out), &call(s, "hubmsg_service_get_device", s.client.get_device(id))?);
        Ok(HUBMSG_OK)
    })
}

/// Lists every device identity, ordered by id.
///
/// @param svc The client.
/// @param out Receives the list (NULL on failure); free with hubmsg_device_list_free().
/// @return HUBMSG_OK, HUBMSG_INVALID_ARGUMENT, HUBMSG_UNAUTHORIZED, HUBMSG_CLOSED, or HUBMSG_USAGE.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_service_list_devices(svc: *mut hubmsg_service, out: *mut *mut hubmsg_device_list) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for both pointers.
        let (out, s) = unsafe { (Out::new(out, "out")?, service(svc)?) };
        let list = call(s, "hubmsg_service_list_devices", s.client.list_devices())?;
        out.put(hubmsg_device_list { items: list.iter().map(Into::into).collect() });
        Ok(HUBMSG_OK)
    })
}

/// Deletes a device identity (its connection is dropped).
///
/// @param svc The client.
/// @param device_id The device.
/// @return HUBMSG_OK, HUBMSG_NOT_FOUND, HUBMSG_INVALID_ARGUMENT, HUBMSG_CLOSED, or HUBMSG_USAGE.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_service_delete_device(svc: *mut hubmsg_service, device_id: *const c_char) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for both pointers.
        let (s, id) = unsafe { (service(svc)?, arg_str(device_id, "device_id")?) };
        call(s, "hubmsg_service_delete_device", s.client.delete_device(id))?;
        Ok(HUBMSG_OK)
    })
}

/// Enables or disables a device (a disabled device is disconnected and refused).
///
/// @param svc The client.
/// @param device_id The device.
/// @param status HUBMSG_DEVICE_ENABLED or HUBMSG_DEVICE_DISABLED.
/// @param out Optional (may be NULL): receives the updated identity.
/// @return HUBMSG_OK, HUBMSG_NOT_FOUND, HUBMSG_INVALID_ARGUMENT, HUBMSG_CLOSED, or HUBMSG_USAGE.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_service_set_device_status(
    svc: *mut hubmsg_service,
    device_id: *const c_char,
    status: i32,
    out: *mut *mut hubmsg_device_identity,
) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for all pointers.
        let (out, s, id) = unsafe { (Out::optional(out), service(svc)?, arg_str(device_id, "device_id")?) };
        let status = arg_enum(status, "status", DEVICE_STATUSES)?;
        put_identity(out, &call(s, "hubmsg_service_set_device_status", s.client.set_device_status(id, status))?);
        Ok(HUBMSG_OK)
    })
}

/// The connection string of a registered device (primary key) on this client's hub.
///
/// @param svc The client.
/// @param device_id The device.
/// @param out Receives the string (NULL on failure); free with hubmsg_string_free().
/// @return HUBMSG_OK, HUBMSG_NOT_FOUND, HUBMSG_INVALID_ARGUMENT, HUBMSG_CLOSED, or HUBMSG_USAGE.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_service_device_connection_string(
    svc: *mut hubmsg_service,
    device_id: *const c_char,
    out: *mut *mut c_char,
) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for all pointers.
        let (out, s, id) = unsafe { (Out::new(out, "out")?, service(svc)?, arg_str(device_id, "device_id")?) };
        let identity = call(s, "hubmsg_service_device_connection_string", s.client.get_device(id))?;
        out.put_string(&s.client.device_connection_string(&identity));
        Ok(HUBMSG_OK)
    })
}

// ---------------------------------------------------------------------------------------------
// Events

/// Called with each D2C event.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct hubmsg_event_callback {
    /// Passed to `call` and `drop`; owned by hubmsg once the stream is open.
    pub context: *mut c_void,
    /// Called on the stream's callback thread with an event valid only during the call; call
    /// hubmsg_event_ack() once processed (unacknowledged events are delivered again after a
    /// reconnect).
    pub call: Option<unsafe extern "C-unwind" fn(context: *mut c_void, event: *mut hubmsg_event)>,
    /// Called once with `context` when the stream is freed (may be NULL).
    pub drop: Option<unsafe extern "C-unwind" fn(context: *mut c_void)>,
}

type EventFn = unsafe extern "C-unwind" fn(*mut c_void, *mut hubmsg_event);

/// A consumer-group reader of D2C events. Thread-safe. Its event callback runs on the stream's
/// own callback thread (never a runtime thread), which may call any hubmsg function, including
/// hubmsg_events_free() on this stream.
#[allow(non_camel_case_types)]
pub struct hubmsg_events {
    inbox: Inbox<EventsSource>,
    ctl: EventsControl,
    dispatcher: Arc<Dispatcher>,
    rt: Rt,
}

/// One D2C event. Not thread-safe (one thread at a time); an event lent to a callback is valid
/// only during the call.
#[allow(non_camel_case_types)]
pub struct hubmsg_event {
    message: hubmsg_message,
    device_id: CString,
    event: Event,
}

impl From<Event> for hubmsg_event {
    fn from(event: Event) -> hubmsg_event {
        hubmsg_event { message: hubmsg_message::new(event.message().clone()), device_id: to_cstring(event.device_id()), event }
    }
}

/// Where an event came from.
#[repr(C)]
#[allow(non_camel_case_types)]
pub struct hubmsg_event_info {
    /// The sending device (owned by the event).
    pub device_id: *const c_char,
    /// The partition.
    pub partition: u32,
    /// Sequence number within the partition.
    pub sequence_number: u64,
    /// When the hub stored it, ms since the Unix epoch.
    pub enqueued_time_ms: u64,
}

/// Opens a consumer of `group`. Members of one group share the partitions. `from` applies to the
/// group's first read; later reads resume at the checkpoint.
///
/// @param svc The client (the stream has its own connection and may outlive `svc`).
/// @param group The consumer group (`$Default` or a name).
/// @param from A HUBMSG_START_* value.
/// @param from_value The sequence number or time for HUBMSG_START_SEQUENCE / HUBMSG_START_TIME
///        (ignored otherwise).
/// @param callback NULL for pull mode (hubmsg_events_next()), or the callback that receives
///        every event (copied; hubmsg owns its context from now on).
/// @param out Receives the stream (NULL on failure); free with hubmsg_events_free().
/// @return HUBMSG_OK, HUBMSG_INVALID_ARGUMENT, HUBMSG_CLOSED, or HUBMSG_USAGE (runtime thread).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_service_events_open(
    svc: *mut hubmsg_service,
    group: *const c_char,
    from: i32,
    from_value: u64,
    callback: *const hubmsg_event_callback,
    out: *mut *mut hubmsg_events,
) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for all pointers.
        let (out, s, group, cb) = unsafe { (Out::new(out, "out")?, service(svc)?, arg_str(group, "group")?, callback.as_ref()) };
        let from = match arg_enum(
            from,
            "from",
            &[
                (HUBMSG_START_CHECKPOINT, "HUBMSG_START_CHECKPOINT", 0),
                (HUBMSG_START_EARLIEST, "HUBMSG_START_EARLIEST", 1),
                (HUBMSG_START_LATEST, "HUBMSG_START_LATEST", 2),
                (HUBMSG_START_SEQUENCE, "HUBMSG_START_SEQUENCE", 3),
                (HUBMSG_START_TIME, "HUBMSG_START_TIME", 4),
            ],
        )? {
            0 => StartPosition::Checkpoint,
            1 => StartPosition::Earliest,
            2 => StartPosition::Latest,
            3 => StartPosition::Sequence(from_value),
            _ => StartPosition::Time(from_value),
        };
        let cb = cb.map(|cb| Closure::<EventFn>::new("event callback", cb.context, cb.call, cb.drop)).transpose()?;
        let stream = call(s, "hubmsg_service_events_open", s.client.events(group, from))?;
        let (source, ctl) = EventsSource::new(stream);
        let events = hubmsg_events {
            inbox: Inbox::lazy("events", move || Ok(source)),
            ctl,
            dispatcher: Dispatcher::new("hubmsg-events-cb"),
            rt: s.rt.clone(),
        };
        match cb {
            None => events.inbox.start_pull(&events.rt)?,
            Some(cb) => events.inbox.set_callback(&events.rt, &events.dispatcher, move |e| {
                // SAFETY: the user's callback with its own context; the event lives during the call.
                cb.lend(hubmsg_event::from(e), |f: EventFn, ctx, p| unsafe { f(ctx, p) });
            })?,
        }
        out.put(events);
        Ok(HUBMSG_OK)
    })
}

unsafe fn events<'a>(ev: *mut hubmsg_events) -> Result<&'a hubmsg_events> {
    // SAFETY: the C API contract for `ev`.
    unsafe { arg_ref(ev, "events") }
}

/// Waits up to `timeout_ms` for the next event (streams opened without a callback).
///
/// @param events The stream.
/// @param timeout_ms How long to wait.
/// @param out Receives the event (NULL on failure or timeout); acknowledge it with
///        hubmsg_event_ack() and free it with hubmsg_event_free().
/// @return HUBMSG_OK, HUBMSG_EMPTY (timeout), HUBMSG_CLOSED, HUBMSG_UNAUTHORIZED (the group
///         cannot be read), HUBMSG_INVALID_ARGUMENT, or HUBMSG_USAGE (callback stream, or runtime
///         thread).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_events_next(events: *mut hubmsg_events, timeout_ms: u32, out: *mut *mut hubmsg_event) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for both pointers.
        let (out, e) = unsafe { (Out::new(out, "out")?, self::events(events)?) };
        crate::args::recv_into(&e.inbox, &e.rt, timeout_ms, out, hubmsg_event::from)
    })
}

/// Asks the hub to persist the group's checkpoints (covering every acknowledged event) and waits
/// until they are durable.
///
/// @param events The stream.
/// @return HUBMSG_OK, HUBMSG_CLOSED, HUBMSG_TIMEOUT, HUBMSG_INVALID_ARGUMENT, or HUBMSG_USAGE.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_events_checkpoint(events: *mut hubmsg_events) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `events`.
        let e = unsafe { self::events(events) }?;
        block_on(&e.rt, "hubmsg_events_checkpoint", e.ctl.checkpoint())??;
        Ok(HUBMSG_OK)
    })
}

/// Leaves the group (its partitions move to the other members) and frees the stream. NULL is a
/// no-op. Safe from inside the stream's own callback.
///
/// @param events The stream, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_events_free(events: *mut hubmsg_events) {
    guard_or((), || {
        // SAFETY: the C API contract for `events`.
        if let Some(e) = unsafe { free_box(events) } {
            dispose(move || {
                e.dispatcher.close();
                let _ = e.rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), e.ctl.close()).await });
                e.inbox.stop(&e.rt);
                e.dispatcher.shutdown();
            });
        }
        Ok(())
    })
}

/// The event's message (valid while the event lives; copy with hubmsg_message_clone()).
///
/// @param event The event.
/// @return The message, or NULL when `event` is NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_event_message(event: *const hubmsg_event) -> *const hubmsg_message {
    // SAFETY: the C API contract for `event`.
    guard_or(std::ptr::null(), || Ok(&unsafe { arg_ref(event, "event") }?.message as *const hubmsg_message))
}

/// Reads where an event came from.
///
/// @param event The event.
/// @param out Receives the fields (the string is valid while the event lives).
/// @return HUBMSG_OK or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_event_get_info(event: *const hubmsg_event, out: *mut hubmsg_event_info) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `event`.
        let e = unsafe { arg_ref(event, "event") }?;
        if out.is_null() {
            return Err(crate::args::null("out"));
        }
        let info = hubmsg_event_info {
            device_id: e.device_id.as_ptr(),
            partition: e.event.partition,
            sequence_number: e.event.sequence_number,
            enqueued_time_ms: e.event.enqueued_time_ms(),
        };
        // SAFETY: checked non-NULL; writable per the C API contract.
        unsafe { out.write(info) };
        Ok(HUBMSG_OK)
    })
}

/// Acknowledges an event: the group's checkpoint moves past it once every earlier event of its
/// partition is acknowledged too.
///
/// @param event The event.
/// @return HUBMSG_OK or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_event_ack(event: *mut hubmsg_event) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `event`.
        unsafe { arg_mut(event, "event") }?.event.ack();
        Ok(HUBMSG_OK)
    })
}

/// Frees an event from hubmsg_events_next(). NULL is a no-op. Never free an event borrowed by a
/// callback.
///
/// @param event The event, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_event_free(event: *mut hubmsg_event) {
    // SAFETY: the C API contract for `event`.
    unsafe { free_handle(event) }
}
