//! JS values ↔ engine values: bodies, properties, times, start positions, option objects.
//!
//! Wrong JS types are `TypeError`s naming the argument and the type received (see
//! [`crate::errors::type_error`]); wrong values are `HUBMSG_INVALID_ARGUMENT` errors. Option
//! objects refuse keys they do not know ([`Checked`]): a misspelt `outboxDir` must not silently
//! give an in-memory outbox. Nothing here panics on user input.

use std::time::Duration;

use hubmsg_core::message::now_ms;
use hubmsg_core::proto::StartPosition;
use hubmsg_core::Message;
use napi::bindgen_prelude::{FromNapiValue, ToNapiValue, TypeName, ValidateNapiValue};
use napi::{sys, ValueType};

use crate::errors::{invalid, type_error};

fn check(status: sys::napi_status, what: &str) -> napi::Result<()> {
    if status == sys::Status::napi_ok {
        Ok(())
    } else {
        Err(napi::Error::new(napi::Status::from(status), format!("{what} failed")))
    }
}

/// The `typeof` of a value.
unsafe fn type_of(env: sys::napi_env, v: sys::napi_value) -> napi::Result<ValueType> {
    let mut t = 0;
    check(unsafe { sys::napi_typeof(env, v, &mut t) }, "napi_typeof")?;
    Ok(ValueType::from(t))
}

/// How a value is named in type errors ("number", "array", "Date", …).
unsafe fn describe(env: sys::napi_env, v: sys::napi_value) -> String {
    let t = unsafe { type_of(env, v) }.unwrap_or(ValueType::Unknown);
    match t {
        ValueType::Undefined => "undefined".into(),
        ValueType::Null => "null".into(),
        ValueType::Boolean => "boolean".into(),
        ValueType::Number => "number".into(),
        ValueType::String => "string".into(),
        ValueType::Symbol => "symbol".into(),
        ValueType::Function => "function".into(),
        ValueType::BigInt => "bigint".into(),
        ValueType::Object if unsafe { is(env, v, sys::napi_is_array) } => "array".into(),
        ValueType::Object if unsafe { is(env, v, sys::napi_is_date) } => "Date".into(),
        _ => "object".into(),
    }
}

type IsFn = unsafe fn(sys::napi_env, sys::napi_value, *mut bool) -> sys::napi_status;

unsafe fn is(env: sys::napi_env, v: sys::napi_value, f: IsFn) -> bool {
    let mut r = false;
    unsafe { f(env, v, &mut r) == sys::Status::napi_ok && r }
}

unsafe fn string(env: sys::napi_env, v: sys::napi_value) -> napi::Result<String> {
    unsafe { String::from_napi_value(env, v) }
}

unsafe fn number(env: sys::napi_env, v: sys::napi_value) -> napi::Result<f64> {
    unsafe { f64::from_napi_value(env, v) }
}

unsafe fn date_ms(env: sys::napi_env, v: sys::napi_value, what: &str) -> napi::Result<u64> {
    let mut ms = 0.0;
    check(unsafe { sys::napi_get_date_value(env, v, &mut ms) }, "napi_get_date_value")?;
    if !ms.is_finite() || ms < 0.0 {
        return Err(invalid(format!("{what} is an invalid Date or before 1970")));
    }
    Ok(ms as u64)
}

/// Implements the napi type traits for a type read by `$from`.
macro_rules! js_input {
    ($ty:ty, $name:literal, $value_type:expr, $from:expr) => {
        impl TypeName for $ty {
            fn type_name() -> &'static str {
                $name
            }
            fn value_type() -> ValueType {
                $value_type
            }
        }
        impl ValidateNapiValue for $ty {}
        impl FromNapiValue for $ty {
            unsafe fn from_napi_value(env: sys::napi_env, v: sys::napi_value) -> napi::Result<Self> {
                let f: unsafe fn(sys::napi_env, sys::napi_value) -> napi::Result<Self> = $from;
                unsafe { f(env, v) }
            }
        }
    };
}

/// A message body: a `Buffer` / `Uint8Array` (copied) or a string (UTF-8).
pub struct Body(
    /// The bytes.
    pub bytes::Bytes,
);

unsafe fn body_from(env: sys::napi_env, v: sys::napi_value) -> napi::Result<Body> {
    match unsafe { type_of(env, v)? } {
        ValueType::String => Ok(Body(bytes::Bytes::from(unsafe { string(env, v)? }))),
        ValueType::Object if unsafe { is(env, v, sys::napi_is_typedarray) } => {
            let (mut ty, mut len, mut data) = (0, 0usize, std::ptr::null_mut());
            let (mut ab, mut off) = (std::ptr::null_mut(), 0usize);
            check(
                unsafe { sys::napi_get_typedarray_info(env, v, &mut ty, &mut len, &mut data, &mut ab, &mut off) },
                "napi_get_typedarray_info",
            )?;
            use sys::TypedarrayType::{int8_array, uint8_array, uint8_clamped_array};
            if ![uint8_array, uint8_clamped_array, int8_array].contains(&ty) {
                return Err(type_error(
                    "body must be a Buffer, a Uint8Array or a string, not another typed array (wrap its .buffer in a Uint8Array)",
                ));
            }
            if len == 0 || data.is_null() {
                return Ok(Body(bytes::Bytes::new()));
            }
            // SAFETY: napi gives the view's data pointer and byte length (1-byte elements); the
            // bytes are copied before returning to JS.
            Ok(Body(bytes::Bytes::copy_from_slice(unsafe { std::slice::from_raw_parts(data as *const u8, len) })))
        }
        _ => Err(type_error(format!("body must be a Buffer, a Uint8Array or a string, not {}", unsafe { describe(env, v) }))),
    }
}

js_input!(Body, "Buffer | Uint8Array | string", ValueType::Unknown, body_from);

/// Application properties: an object of string values (own enumerable keys, in order).
#[derive(Default, Clone)]
pub struct Props(
    /// Name-value pairs in order.
    pub Vec<(String, String)>,
);

/// The own enumerable string keys of an object, as napi values, and how many.
unsafe fn own_keys(env: sys::napi_env, obj: sys::napi_value) -> napi::Result<(sys::napi_value, u32)> {
    let mut names = std::ptr::null_mut();
    check(
        unsafe {
            sys::napi_get_all_property_names(
                env,
                obj,
                sys::KeyCollectionMode::own_only,
                sys::KeyFilter::enumerable | sys::KeyFilter::skip_symbols,
                sys::KeyConversion::numbers_to_strings,
                &mut names,
            )
        },
        "napi_get_all_property_names",
    )?;
    let mut n = 0u32;
    check(unsafe { sys::napi_get_array_length(env, names, &mut n) }, "napi_get_array_length")?;
    Ok((names, n))
}

/// The `i`-th of the keys [`own_keys`] gave.
unsafe fn key_at(env: sys::napi_env, names: sys::napi_value, i: u32) -> napi::Result<sys::napi_value> {
    let mut k = std::ptr::null_mut();
    check(unsafe { sys::napi_get_element(env, names, i, &mut k) }, "napi_get_element")?;
    Ok(k)
}

unsafe fn keys(env: sys::napi_env, obj: sys::napi_value) -> napi::Result<Vec<String>> {
    let (names, n) = unsafe { own_keys(env, obj)? };
    (0..n).map(|i| unsafe { string(env, key_at(env, names, i)?) }).collect()
}

unsafe fn get(env: sys::napi_env, obj: sys::napi_value, key: &str) -> napi::Result<sys::napi_value> {
    let k = unsafe { String::to_napi_value(env, key.to_string())? };
    let mut v = std::ptr::null_mut();
    check(unsafe { sys::napi_get_property(env, obj, k, &mut v) }, "napi_get_property")?;
    Ok(v)
}

/// Whether a value is a plain object (not null, an array, a Date, a typed array or a function).
unsafe fn is_plain_object(env: sys::napi_env, v: sys::napi_value) -> napi::Result<bool> {
    Ok(unsafe { type_of(env, v)? } == ValueType::Object
        && !unsafe { is(env, v, sys::napi_is_array) }
        && !unsafe { is(env, v, sys::napi_is_date) }
        && !unsafe { is(env, v, sys::napi_is_typedarray) })
}

unsafe fn props_from(env: sys::napi_env, v: sys::napi_value) -> napi::Result<Props> {
    if !unsafe { is_plain_object(env, v)? } {
        return Err(type_error(format!("properties must be an object of string values, not {}", unsafe { describe(env, v) })));
    }
    let mut out = Vec::new();
    for k in unsafe { keys(env, v)? } {
        let val = unsafe { get(env, v, &k)? };
        if unsafe { type_of(env, val)? } != ValueType::String {
            return Err(type_error(format!("property '{k}' must be a string, not {} (convert it with String())", unsafe {
                describe(env, val)
            })));
        }
        out.push((k, unsafe { string(env, val)? }));
    }
    Ok(Props(out))
}

js_input!(Props, "Record<string, string>", ValueType::Object, props_from);

impl ToNapiValue for Props {
    unsafe fn to_napi_value(env: sys::napi_env, val: Props) -> napi::Result<sys::napi_value> {
        let mut obj = std::ptr::null_mut();
        check(unsafe { sys::napi_create_object(env, &mut obj) }, "napi_create_object")?;
        let mut seen = std::collections::HashSet::new();
        for (k, v) in val.0 {
            if !seen.insert(k.clone()) {
                continue; // a repeated name keeps its first value
            }
            let key = unsafe { String::to_napi_value(env, k)? };
            let value = unsafe { String::to_napi_value(env, v)? };
            check(unsafe { sys::napi_set_property(env, obj, key, value) }, "napi_set_property")?;
        }
        Ok(obj)
    }
}

/// An expiry: a `Date`, or a time to live in milliseconds from now. Holds the absolute time
/// (ms since the epoch).
pub struct Expiry(
    /// ms since the Unix epoch.
    pub u64,
);

unsafe fn expiry_from(env: sys::napi_env, v: sys::napi_value) -> napi::Result<Expiry> {
    if unsafe { is(env, v, sys::napi_is_date) } {
        return Ok(Expiry(unsafe { date_ms(env, v, "expiry")? }));
    }
    if unsafe { type_of(env, v)? } != ValueType::Number {
        return Err(type_error(format!("expiry must be a Date or a time to live in ms (number), not {}", unsafe { describe(env, v) })));
    }
    let ttl = unsafe { number(env, v)? };
    let ttl = ms_value(ttl, "expiry")?;
    Ok(Expiry(now_ms().saturating_add(ttl.as_millis() as u64)))
}

js_input!(Expiry, "Date | number", ValueType::Unknown, expiry_from);

/// Where a consumer group starts: `'checkpoint'`, `'earliest'`, `'latest'`, a sequence number
/// or a `Date`.
pub struct Start(
    /// The engine's start position.
    pub StartPosition,
);

unsafe fn start_from(env: sys::napi_env, v: sys::napi_value) -> napi::Result<Start> {
    if unsafe { is(env, v, sys::napi_is_date) } {
        return Ok(Start(StartPosition::Time(unsafe { date_ms(env, v, "from")? })));
    }
    match unsafe { type_of(env, v)? } {
        ValueType::String => match unsafe { string(env, v)? }.as_str() {
            "checkpoint" => Ok(Start(StartPosition::Checkpoint)),
            "earliest" => Ok(Start(StartPosition::Earliest)),
            "latest" => Ok(Start(StartPosition::Latest)),
            other => Err(invalid(format!("from '{other}' is not 'checkpoint', 'earliest', 'latest', a sequence number or a Date"))),
        },
        ValueType::Number => {
            let n = unsafe { number(env, v)? };
            if !(n.is_finite() && n >= 0.0 && n.fract() == 0.0 && n <= 9_007_199_254_740_991.0) {
                return Err(invalid(format!("from {n} is not a sequence number (an integer ≥ 0)")));
            }
            Ok(Start(StartPosition::Sequence(n as u64)))
        }
        _ => Err(type_error(format!("from must be 'checkpoint', 'earliest', 'latest', a sequence number or a Date, not {}", unsafe {
            describe(env, v)
        }))),
    }
}

js_input!(Start, "'checkpoint' | 'earliest' | 'latest' | number | Date", ValueType::Unknown, start_from);

/// A point in time given to JS as a `Date`.
pub struct JsDate(
    /// ms since the Unix epoch.
    pub u64,
);

impl TypeName for JsDate {
    fn type_name() -> &'static str {
        "Date"
    }
    fn value_type() -> ValueType {
        ValueType::Object
    }
}

impl ToNapiValue for JsDate {
    unsafe fn to_napi_value(env: sys::napi_env, val: JsDate) -> napi::Result<sys::napi_value> {
        let mut d = std::ptr::null_mut();
        check(unsafe { sys::napi_create_date(env, val.0 as f64, &mut d) }, "napi_create_date")?;
        Ok(d)
    }
}

/// A duration from milliseconds; `what` names it in errors. Negative, NaN or infinite values are
/// refused.
pub(crate) fn ms_value(ms: f64, what: &str) -> napi::Result<Duration> {
    if !ms.is_finite() || ms < 0.0 {
        return Err(invalid(format!("{what} must be a finite number of milliseconds ≥ 0, not {ms}")));
    }
    Ok(Duration::from_secs_f64(ms / 1000.0))
}

/// An optional duration in milliseconds.
pub(crate) fn opt_ms(ms: Option<f64>, what: &str) -> napi::Result<Option<Duration>> {
    ms.map(|v| ms_value(v, what)).transpose()
}

/// A non-empty optional id (`''` is refused: leave it out).
pub(crate) fn opt_id(v: Option<String>, what: &str) -> napi::Result<Option<String>> {
    match v {
        Some(s) if s.is_empty() => Err(invalid(format!("{what} is empty; leave it out to let it be unset"))),
        v => Ok(v),
    }
}

/// The field names of an option object (its napi `camelCase` names) and how it is named in
/// errors.
pub trait Keys {
    /// How errors name the object (`"send options"`).
    const NAME: &'static str;
    /// Every key it knows.
    const KEYS: &'static [&'static str];
}

/// An option object whose keys were checked against [`Keys::KEYS`] before conversion.
pub struct Checked<T>(
    /// The converted object.
    pub T,
);

impl<T: Keys> TypeName for Checked<T> {
    fn type_name() -> &'static str {
        T::NAME
    }
    fn value_type() -> ValueType {
        ValueType::Object
    }
}

impl<T: Keys> ValidateNapiValue for Checked<T> {}

impl<T: Keys + FromNapiValue> FromNapiValue for Checked<T> {
    unsafe fn from_napi_value(env: sys::napi_env, v: sys::napi_value) -> napi::Result<Self> {
        if !unsafe { is_plain_object(env, v)? } {
            return Err(type_error(format!("{} must be an object, not {}", T::NAME, unsafe { describe(env, v) })));
        }
        for k in unsafe { keys(env, v)? } {
            if !T::KEYS.contains(&k.as_str()) {
                return Err(type_error(format!("{} have no option '{k}' (known: {})", T::NAME, T::KEYS.join(", "))));
            }
        }
        match unsafe { T::from_napi_value(env, v) } {
            Ok(t) => Ok(Checked(t)),
            // napi's own conversion errors (a field of the wrong type) as TypeErrors.
            Err(e) if e.status != napi::Status::GenericFailure => Err(type_error(format!("{}: {}", T::NAME, e.reason))),
            Err(e) => Err(e),
        }
    }
}

/// The fields of an outgoing message besides its body.
#[derive(Default)]
pub(crate) struct Fields {
    /// Application properties.
    pub properties: Option<Props>,
    /// `$.mid`.
    pub message_id: Option<String>,
    /// `$.cid`.
    pub correlation_id: Option<String>,
    /// `$.ct`.
    pub content_type: Option<String>,
    /// `$.ce`.
    pub content_encoding: Option<String>,
    /// Absolute expiry.
    pub expiry: Option<Expiry>,
}

impl Fields {
    /// The engine message with `body`.
    pub(crate) fn message(self, body: Body) -> napi::Result<Message> {
        let mut m = Message::new(body.0);
        m.properties = self.properties.unwrap_or_default().0;
        m.message_id = opt_id(self.message_id, "messageId")?;
        m.correlation_id = opt_id(self.correlation_id, "correlationId")?;
        m.content_type = opt_id(self.content_type, "contentType")?;
        m.content_encoding = opt_id(self.content_encoding, "contentEncoding")?;
        m.expiry_time_ms = self.expiry.map(|e| e.0);
        Ok(m)
    }
}

/// One item of `sendMany`: a body, or an object with `body` and the send options.
pub struct OutMessage(
    /// The engine message.
    pub Message,
);

const MESSAGE_KEYS: &[&str] = &["body", "properties", "messageId", "correlationId", "contentType", "contentEncoding", "expiry"];

/// The own enumerable string keys of an object with their values, read by the key values
/// napi gave (no key string is created again to look a value up).
unsafe fn entries(env: sys::napi_env, obj: sys::napi_value) -> napi::Result<Vec<(String, sys::napi_value)>> {
    let (names, n) = unsafe { own_keys(env, obj)? };
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let k = unsafe { key_at(env, names, i)? };
        let mut v = std::ptr::null_mut();
        check(unsafe { sys::napi_get_property(env, obj, k, &mut v) }, "napi_get_property")?;
        out.push((unsafe { string(env, k)? }, v));
    }
    Ok(out)
}

/// A value that may be left out: `undefined` and `null` are `None`.
unsafe fn opt_value<T: FromNapiValue>(env: sys::napi_env, v: sys::napi_value) -> napi::Result<Option<T>> {
    match unsafe { type_of(env, v)? } {
        ValueType::Undefined | ValueType::Null => Ok(None),
        _ => unsafe { T::from_napi_value(env, v) }.map(Some),
    }
}

unsafe fn opt_string_value(env: sys::napi_env, v: sys::napi_value, key: &str) -> napi::Result<Option<String>> {
    match unsafe { type_of(env, v)? } {
        ValueType::Undefined | ValueType::Null => Ok(None),
        ValueType::String => unsafe { string(env, v) }.map(Some),
        _ => Err(type_error(format!("{key} must be a string, not {}", unsafe { describe(env, v) }))),
    }
}

// `sendMany` converts every message of a batch here: the object's keys are read once (each value
// by the key napi gave), unknown keys are refused before any value is converted, and only the
// fields present are converted.
unsafe fn out_message_from(env: sys::napi_env, v: sys::napi_value) -> napi::Result<OutMessage> {
    if !unsafe { is_plain_object(env, v)? } {
        return Ok(OutMessage(Fields::default().message(unsafe { body_from(env, v)? })?));
    }
    let entries = unsafe { entries(env, v)? };
    if let Some((k, _)) = entries.iter().find(|(k, _)| !MESSAGE_KEYS.contains(&k.as_str())) {
        return Err(type_error(format!("a message has no field '{k}' (known: {})", MESSAGE_KEYS.join(", "))));
    }
    let mut body = None;
    let mut fields = Fields::default();
    for (k, val) in entries {
        match k.as_str() {
            "body" => body = Some(unsafe { body_from(env, val)? }),
            "properties" => fields.properties = unsafe { opt_value(env, val)? },
            "messageId" => fields.message_id = unsafe { opt_string_value(env, val, &k)? },
            "correlationId" => fields.correlation_id = unsafe { opt_string_value(env, val, &k)? },
            "contentType" => fields.content_type = unsafe { opt_string_value(env, val, &k)? },
            "contentEncoding" => fields.content_encoding = unsafe { opt_string_value(env, val, &k)? },
            _ => fields.expiry = unsafe { opt_value(env, val)? }, // "expiry": the only key left
        }
    }
    let body = match body {
        Some(b) => b,
        None => {
            let mut undefined = std::ptr::null_mut();
            check(unsafe { sys::napi_get_undefined(env, &mut undefined) }, "napi_get_undefined")?;
            unsafe { body_from(env, undefined)? }
        }
    };
    Ok(OutMessage(fields.message(body)?))
}

js_input!(OutMessage, "Buffer | Uint8Array | string | MessageInit", ValueType::Unknown, out_message_from);

/// The messages of a packed `sendMany` batch (see `DeviceClient::send_many_packed`): message `k`
/// has the next `lengths[k]` bytes of `bodies` (one copy of them all, each body a slice of it)
/// and message id `ids[k]`, checked as `sendMany` checks an item's `messageId`.
pub(crate) fn unpack_messages(bodies: &[u8], lengths: &[u32], ids: Vec<Option<String>>) -> napi::Result<Vec<Message>> {
    if lengths.len() != ids.len() || lengths.iter().map(|&n| n as usize).sum::<usize>() != bodies.len() {
        return Err(invalid(format!(
            "a packed batch of {} lengths (summing to {}), {} ids and {} body bytes does not add up",
            lengths.len(),
            lengths.iter().map(|&n| n as u64).sum::<u64>(),
            ids.len(),
            bodies.len()
        )));
    }
    let all = bytes::Bytes::copy_from_slice(bodies);
    let mut at = 0;
    lengths
        .iter()
        .zip(ids)
        .map(|(&n, message_id)| {
            let body = Body(all.slice(at..at + n as usize));
            at += n as usize;
            Fields { message_id, ..Fields::default() }.message(body)
        })
        .collect()
}
