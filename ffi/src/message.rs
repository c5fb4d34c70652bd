//! `hubmsg_message`: an owned message (body, system properties, application properties) that C
//! builds to send and reads when one arrives.
//!
//! A message is not thread-safe: use it from one thread at a time. Strings returned by its
//! getters stay valid until the message is changed or freed.

use std::ffi::{c_char, CString};
use std::sync::OnceLock;

use hubmsg_core::{Error, Message};

use crate::args::{arg_bytes, arg_mut, arg_ref, arg_str, c_ptr, free_handle, opt_str, Out};
use crate::result::{guard, guard_or, hubmsg_result, to_cstring, HUBMSG_OK};

/// An owned message. Create with hubmsg_message_new(), free with hubmsg_message_free().
/// Not thread-safe (one thread at a time); messages handed to callbacks are borrowed and valid
/// only during the call (keep one with hubmsg_message_clone()).
#[allow(non_camel_case_types)]
pub struct hubmsg_message {
    pub(crate) msg: Message,
    view: OnceLock<View>,
}

/// C strings of the message's fields, built on the first getter call after a change.
struct View {
    message_id: Option<CString>,
    correlation_id: Option<CString>,
    content_type: Option<CString>,
    content_encoding: Option<CString>,
    properties: Vec<(CString, CString)>,
    system: Vec<(CString, CString)>,
}

fn opt_c(s: &Option<String>) -> Option<CString> {
    s.as_deref().map(to_cstring)
}

fn pairs(list: &[(String, String)]) -> Vec<(CString, CString)> {
    list.iter().map(|(k, v)| (to_cstring(k), to_cstring(v))).collect()
}

impl hubmsg_message {
    pub(crate) fn new(msg: Message) -> hubmsg_message {
        hubmsg_message { msg, view: OnceLock::new() }
    }

    fn view(&self) -> &View {
        self.view.get_or_init(|| View {
            message_id: opt_c(&self.msg.message_id),
            correlation_id: opt_c(&self.msg.correlation_id),
            content_type: opt_c(&self.msg.content_type),
            content_encoding: opt_c(&self.msg.content_encoding),
            properties: pairs(&self.msg.properties),
            system: pairs(&self.msg.system),
        })
    }

    fn changed(&mut self) -> &mut Message {
        self.view.take();
        &mut self.msg
    }
}

/// Which optional string field a setter or getter works on.
#[derive(Clone, Copy)]
enum Field {
    MessageId,
    CorrelationId,
    ContentType,
    ContentEncoding,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::MessageId => "message_id",
            Field::CorrelationId => "correlation_id",
            Field::ContentType => "content_type",
            Field::ContentEncoding => "content_encoding",
        }
    }

    fn slot(self, m: &mut Message) -> &mut Option<String> {
        match self {
            Field::MessageId => &mut m.message_id,
            Field::CorrelationId => &mut m.correlation_id,
            Field::ContentType => &mut m.content_type,
            Field::ContentEncoding => &mut m.content_encoding,
        }
    }

    fn get(self, v: &View) -> &Option<CString> {
        match self {
            Field::MessageId => &v.message_id,
            Field::CorrelationId => &v.correlation_id,
            Field::ContentType => &v.content_type,
            Field::ContentEncoding => &v.content_encoding,
        }
    }
}

unsafe fn set_field(msg: *mut hubmsg_message, field: Field, value: *const c_char) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `msg` and `value`.
        let m = unsafe { arg_mut(msg, "msg") }?;
        // SAFETY: as above.
        let value = unsafe { opt_str(value, field.name()) }?;
        if value.is_some_and(str::is_empty) {
            return Err(Error::invalid(format!("{} is empty; pass NULL to clear it", field.name())));
        }
        *field.slot(m.changed()) = value.map(str::to_string);
        Ok(HUBMSG_OK)
    })
}

unsafe fn get_field(msg: *const hubmsg_message, field: Field) -> *const c_char {
    // SAFETY: the C API contract for `msg`.
    guard_or(std::ptr::null(), || Ok(c_ptr(field.get(unsafe { arg_ref(msg, "msg") }?.view()))))
}

/// Creates a message with a copy of `body`.
///
/// @param body The payload bytes (may be NULL when `body_len` is 0).
/// @param body_len Number of bytes at `body`.
/// @param out Receives the new message (NULL on failure); free it with hubmsg_message_free().
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_new(body: *const u8, body_len: usize, out: *mut *mut hubmsg_message) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `out` and `body`.
        let out = unsafe { Out::new(out, "out") }?;
        // SAFETY: as above.
        let body = unsafe { arg_bytes(body, body_len, "body") }?;
        out.put(hubmsg_message::new(Message::new(body.to_vec())));
        Ok(HUBMSG_OK)
    })
}

/// Copies a message (for example one borrowed by a callback, to keep it after the call).
///
/// @param msg The message to copy.
/// @param out Receives the copy (NULL on failure); free it with hubmsg_message_free().
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_clone(msg: *const hubmsg_message, out: *mut *mut hubmsg_message) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `out` and `msg`.
        let out = unsafe { Out::new(out, "out") }?;
        // SAFETY: as above.
        let m = unsafe { arg_ref(msg, "msg") }?;
        out.put(hubmsg_message::new(m.msg.clone()));
        Ok(HUBMSG_OK)
    })
}

/// Frees a message made by hubmsg_message_new() or hubmsg_message_clone(). NULL is a no-op.
/// Never free a message borrowed from a callback or from another handle.
///
/// @param msg The message, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_free(msg: *mut hubmsg_message) {
    // SAFETY: the C API contract for `msg`.
    unsafe { free_handle(msg) }
}

/// Sets the message id (`$.mid`; a UUID is generated on send when unset).
///
/// @param msg The message.
/// @param message_id A non-empty UTF-8 string, or NULL to clear.
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_set_message_id(msg: *mut hubmsg_message, message_id: *const c_char) -> hubmsg_result {
    // SAFETY: forwarded contract.
    unsafe { set_field(msg, Field::MessageId, message_id) }
}

/// Sets the correlation id (`$.cid`).
///
/// @param msg The message.
/// @param correlation_id A non-empty UTF-8 string, or NULL to clear.
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_set_correlation_id(msg: *mut hubmsg_message, correlation_id: *const c_char) -> hubmsg_result {
    // SAFETY: forwarded contract.
    unsafe { set_field(msg, Field::CorrelationId, correlation_id) }
}

/// Sets the content type (`$.ct`, e.g. `application/json`).
///
/// @param msg The message.
/// @param content_type A non-empty UTF-8 string, or NULL to clear.
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_set_content_type(msg: *mut hubmsg_message, content_type: *const c_char) -> hubmsg_result {
    // SAFETY: forwarded contract.
    unsafe { set_field(msg, Field::ContentType, content_type) }
}

/// Sets the content encoding (`$.ce`, e.g. `utf-8`).
///
/// @param msg The message.
/// @param content_encoding A non-empty UTF-8 string, or NULL to clear.
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_set_content_encoding(msg: *mut hubmsg_message, content_encoding: *const c_char) -> hubmsg_result {
    // SAFETY: forwarded contract.
    unsafe { set_field(msg, Field::ContentEncoding, content_encoding) }
}

/// Sets the absolute expiry time (`$.exp`). An expired D2C message is not sent (its outcome is
/// HUBMSG_OUTCOME_EXPIRED); an expired C2D message is dead-lettered.
///
/// @param msg The message.
/// @param expiry_unix_ms Milliseconds since the Unix epoch (UTC), or 0 to clear.
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_set_expiry(msg: *mut hubmsg_message, expiry_unix_ms: u64) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for `msg`.
        let m = unsafe { arg_mut(msg, "msg") }?;
        m.changed().expiry_time_ms = (expiry_unix_ms != 0).then_some(expiry_unix_ms);
        Ok(HUBMSG_OK)
    })
}

/// Appends an application property. Names are case-sensitive; a name used twice is refused when
/// the message is sent.
///
/// @param msg The message.
/// @param name A non-empty UTF-8 name.
/// @param value A UTF-8 value (may be empty).
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_add_property(msg: *mut hubmsg_message, name: *const c_char, value: *const c_char) -> hubmsg_result {
    guard(|| {
        // SAFETY: the C API contract for all three pointers.
        let (m, name, value) = unsafe { (arg_mut(msg, "msg")?, arg_str(name, "name")?, arg_str(value, "value")?) };
        if name.is_empty() {
            return Err(Error::invalid("property name is empty"));
        }
        m.changed().properties.push((name.to_string(), value.to_string()));
        Ok(HUBMSG_OK)
    })
}

/// The body.
///
/// @param msg The message.
/// @param data Receives a pointer to the body bytes, valid while `msg` lives unchanged (NULL on
///        failure; may be non-NULL with length 0).
/// @param len Receives the body length (0 on failure).
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_body(msg: *const hubmsg_message, data: *mut *const u8, len: *mut usize) -> hubmsg_result {
    guard(|| {
        if data.is_null() || len.is_null() {
            return Err(crate::args::null(if data.is_null() { "data" } else { "len" }));
        }
        // SAFETY: both checked non-NULL; writable per the C API contract.
        unsafe {
            *data = std::ptr::null();
            *len = 0;
        }
        // SAFETY: the C API contract for `msg`.
        let m = unsafe { arg_ref(msg, "msg") }?;
        // SAFETY: as above.
        unsafe {
            *data = m.msg.body.as_ptr();
            *len = m.msg.body.len();
        }
        Ok(HUBMSG_OK)
    })
}

/// The message id, or NULL when unset (or `msg` is NULL).
///
/// @param msg The message.
/// @return A string valid while `msg` lives unchanged, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_message_id(msg: *const hubmsg_message) -> *const c_char {
    // SAFETY: forwarded contract.
    unsafe { get_field(msg, Field::MessageId) }
}

/// The correlation id, or NULL when unset (or `msg` is NULL).
///
/// @param msg The message.
/// @return A string valid while `msg` lives unchanged, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_correlation_id(msg: *const hubmsg_message) -> *const c_char {
    // SAFETY: forwarded contract.
    unsafe { get_field(msg, Field::CorrelationId) }
}

/// The content type, or NULL when unset (or `msg` is NULL).
///
/// @param msg The message.
/// @return A string valid while `msg` lives unchanged, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_content_type(msg: *const hubmsg_message) -> *const c_char {
    // SAFETY: forwarded contract.
    unsafe { get_field(msg, Field::ContentType) }
}

/// The content encoding, or NULL when unset (or `msg` is NULL).
///
/// @param msg The message.
/// @return A string valid while `msg` lives unchanged, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_content_encoding(msg: *const hubmsg_message) -> *const c_char {
    // SAFETY: forwarded contract.
    unsafe { get_field(msg, Field::ContentEncoding) }
}

/// The absolute expiry time in ms since the Unix epoch, or 0 when unset (or `msg` is NULL).
///
/// @param msg The message.
/// @return Milliseconds, or 0.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_expiry(msg: *const hubmsg_message) -> u64 {
    // SAFETY: the C API contract for `msg`.
    guard_or(0, || Ok(unsafe { arg_ref(msg, "msg") }?.msg.expiry_time_ms.unwrap_or(0)))
}

/// The creation time in ms since the Unix epoch (set on send), or 0 when unset (or `msg` is
/// NULL).
///
/// @param msg The message.
/// @return Milliseconds, or 0.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_creation_time(msg: *const hubmsg_message) -> u64 {
    // SAFETY: the C API contract for `msg`.
    guard_or(0, || Ok(unsafe { arg_ref(msg, "msg") }?.msg.creation_time_ms.unwrap_or(0)))
}

fn find(list: &[(CString, CString)], name: &str) -> *const c_char {
    list.iter().find(|(k, _)| k.as_bytes() == name.as_bytes()).map_or(std::ptr::null(), |(_, v)| v.as_ptr())
}

/// The value of the first application property called `name`, or NULL when there is none.
///
/// @param msg The message.
/// @param name The property name (case-sensitive).
/// @return A string valid while `msg` lives unchanged, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_property(msg: *const hubmsg_message, name: *const c_char) -> *const c_char {
    guard_or(std::ptr::null(), || {
        // SAFETY: the C API contract for both pointers.
        let (m, name) = unsafe { (arg_ref(msg, "msg")?, arg_str(name, "name")?) };
        Ok(find(&m.view().properties, name))
    })
}

/// The number of application properties (0 when `msg` is NULL).
///
/// @param msg The message.
/// @return The count.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_property_count(msg: *const hubmsg_message) -> usize {
    // SAFETY: the C API contract for `msg`.
    guard_or(0, || Ok(unsafe { arg_ref(msg, "msg") }?.msg.properties.len()))
}

/// The application property at `index` (in the order they were added).
///
/// @param msg The message.
/// @param index 0 ≤ index < hubmsg_message_property_count().
/// @param name Receives the name (valid while `msg` lives unchanged; NULL on failure).
/// @param value Receives the value (valid while `msg` lives unchanged; NULL on failure).
/// @return HUBMSG_OK, or HUBMSG_INVALID_ARGUMENT (NULL pointer, index out of range).
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_property_at(
    msg: *const hubmsg_message,
    index: usize,
    name: *mut *const c_char,
    value: *mut *const c_char,
) -> hubmsg_result {
    guard(|| {
        if name.is_null() || value.is_null() {
            return Err(crate::args::null(if name.is_null() { "name" } else { "value" }));
        }
        // SAFETY: both checked non-NULL; writable per the C API contract.
        unsafe {
            *name = std::ptr::null();
            *value = std::ptr::null();
        }
        // SAFETY: the C API contract for `msg`.
        let m = unsafe { arg_ref(msg, "msg") }?;
        let props = &m.view().properties;
        let (k, v) =
            props.get(index).ok_or_else(|| Error::invalid(format!("property index {index} is out of range (count {})", props.len())))?;
        // SAFETY: as above.
        unsafe {
            *name = k.as_ptr();
            *value = v.as_ptr();
        }
        Ok(HUBMSG_OK)
    })
}

/// The value of a property stamped by the hub (e.g. `iothub-connection-device-id`,
/// `iothub-enqueuedtime`, `iothub-ack`, `iothub-deliverycount`), or NULL when absent.
///
/// @param msg The message.
/// @param name The system property name.
/// @return A string valid while `msg` lives unchanged, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_message_system_property(msg: *const hubmsg_message, name: *const c_char) -> *const c_char {
    guard_or(std::ptr::null(), || {
        // SAFETY: the C API contract for both pointers.
        let (m, name) = unsafe { (arg_ref(msg, "msg")?, arg_str(name, "name")?) };
        Ok(find(&m.view().system, name))
    })
}

/// Frees a string hubmsg returned as `char*` (connection strings). NULL is a no-op.
///
/// @param s The string, or NULL.
#[no_mangle]
pub unsafe extern "C" fn hubmsg_string_free(s: *mut c_char) {
    guard_or((), || {
        if !s.is_null() {
            // SAFETY: the C API contract: `s` came from CString::into_raw in hubmsg.
            drop(unsafe { CString::from_raw(s) });
        }
        Ok(())
    })
}
