//! Conversions between Python values and the engine's: bodies, properties, durations, points in
//! time, start positions, and the [`Message`] built from `send(...)` keyword arguments.
//!
//! Wrong types raise `TypeError` naming the argument and the type received; wrong values raise
//! `InvalidArgumentError` (a `ValueError`). Nothing here panics on user input.

use std::time::Duration;

use hubmsg_core::message::now_ms;
use hubmsg_core::proto::StartPosition;
use hubmsg_core::Message;
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyString};

use crate::errors::invalid;

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// A message body: `bytes`, `bytearray`, `memoryview` (copied) or `str` (UTF-8).
pub(crate) fn body(obj: &Bound<'_, PyAny>) -> PyResult<bytes::Bytes> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(bytes::Bytes::copy_from_slice(b.as_bytes()));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(bytes::Bytes::copy_from_slice(s.to_cow()?.as_bytes()));
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(bytes::Bytes::from(b.to_vec()));
    }
    if type_name(obj) == "memoryview" {
        let b = obj.py().import("builtins")?.getattr("bytes")?.call1((obj,))?;
        return body(&b);
    }
    Err(PyTypeError::new_err(format!("body must be bytes, bytearray, memoryview or str, not {}", type_name(obj))))
}

/// Application properties from a mapping of `str` to `str` (in the mapping's order).
pub(crate) fn properties(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<(String, String)>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(Vec::new()) };
    let items = match obj.cast::<PyDict>() {
        Ok(d) => d.items().into_any(),
        Err(_) if obj.hasattr("items")? => obj.call_method0("items")?,
        Err(_) => return Err(PyTypeError::new_err(format!("properties must be a mapping of str to str, not {}", type_name(obj)))),
    };
    let mut out = Vec::new();
    for item in items.try_iter()? {
        let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item?.extract()?;
        let k: String = k.extract().map_err(|_| PyTypeError::new_err(format!("property names must be str, not {}", type_name(&k))))?;
        let v: String = v
            .extract()
            .map_err(|_| PyTypeError::new_err(format!("property '{k}' must be a str, not {} (convert it with str())", type_name(&v))))?;
        out.push((k, v));
    }
    Ok(out)
}

/// A duration from seconds (`int` / `float`) or a `datetime.timedelta`; `what` names it in
/// errors. Negative, NaN or infinite values are refused.
pub(crate) fn duration(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Duration> {
    let secs: f64 = if obj.hasattr("total_seconds")? {
        obj.call_method0("total_seconds")?.extract()?
    } else {
        obj.extract()
            .map_err(|_| PyTypeError::new_err(format!("{what} must be seconds (int or float) or a timedelta, not {}", type_name(obj))))?
    };
    Duration::try_from_secs_f64(secs).map_err(|_| invalid(format!("{what} must be a finite number of seconds ≥ 0, not {secs}")))
}

/// An optional duration (`None` stays `None`).
pub(crate) fn opt_duration(obj: Option<&Bound<'_, PyAny>>, what: &str) -> PyResult<Option<Duration>> {
    obj.filter(|o| !o.is_none()).map(|o| duration(o, what)).transpose()
}

/// Milliseconds since the Unix epoch of a `datetime` (naive ones are local time, as
/// `datetime.timestamp()` says).
fn datetime_ms(obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    let secs: f64 = obj.call_method0("timestamp")?.extract()?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(invalid(format!("the time {secs} s is before 1970")));
    }
    Ok((secs * 1000.0) as u64)
}

fn is_datetime(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    let dt = obj.py().import("datetime")?.getattr("datetime")?;
    obj.is_instance(&dt)
}

/// An absolute expiry time (ms since the epoch) from a `datetime` or a time to live (seconds
/// or `timedelta`, from now).
pub(crate) fn expiry(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<u64>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(None) };
    if is_datetime(obj)? {
        return datetime_ms(obj).map(Some);
    }
    let ttl = duration(obj, "expiry")?;
    Ok(Some(now_ms().saturating_add(ttl.as_millis() as u64)))
}

/// An aware UTC `datetime` for ms since the epoch.
pub(crate) fn datetime_from_ms(py: Python<'_>, ms: u64) -> PyResult<Py<PyAny>> {
    let dt = py.import("datetime")?;
    let utc = dt.getattr("timezone")?.getattr("utc")?;
    Ok(dt.getattr("datetime")?.call_method1("fromtimestamp", (ms as f64 / 1000.0, utc))?.unbind())
}

/// Where a consumer starts: `"checkpoint"`, `"earliest"`, `"latest"`, a sequence number
/// (`int`) or a `datetime`.
pub(crate) fn start_position(obj: &Bound<'_, PyAny>) -> PyResult<StartPosition> {
    if let Ok(s) = obj.cast::<PyString>() {
        return match &*s.to_cow()? {
            "checkpoint" => Ok(StartPosition::Checkpoint),
            "earliest" => Ok(StartPosition::Earliest),
            "latest" => Ok(StartPosition::Latest),
            other => {
                Err(invalid(format!("start '{other}' is not 'checkpoint', 'earliest', 'latest', a sequence number (int) or a datetime")))
            }
        };
    }
    if obj.is_instance_of::<pyo3::types::PyBool>() {
        return Err(PyTypeError::new_err("start must be a str, an int or a datetime, not bool"));
    }
    if let Ok(n) = obj.extract::<u64>() {
        return Ok(StartPosition::Sequence(n));
    }
    if is_datetime(obj)? {
        return Ok(StartPosition::Time(datetime_ms(obj)?));
    }
    Err(PyTypeError::new_err(format!("start must be a str, an int (sequence number) or a datetime, not {}", type_name(obj))))
}

/// A non-empty optional string argument (`""` is refused: pass `None`).
fn opt_id(v: Option<String>, what: &str) -> PyResult<Option<String>> {
    match v {
        Some(s) if s.is_empty() => Err(invalid(format!("{what} is empty; pass None to leave it unset"))),
        v => Ok(v),
    }
}

/// The fields of one outgoing message, as `send(...)` takes them.
pub(crate) struct Fields<'a, 'py> {
    /// The body.
    pub body: &'a Bound<'py, PyAny>,
    /// Application properties.
    pub properties: Option<&'a Bound<'py, PyAny>>,
    /// `$.mid`.
    pub message_id: Option<String>,
    /// `$.cid`.
    pub correlation_id: Option<String>,
    /// `$.ct`.
    pub content_type: Option<String>,
    /// `$.ce`.
    pub content_encoding: Option<String>,
    /// A `datetime`, or a time to live.
    pub expiry: Option<&'a Bound<'py, PyAny>>,
}

impl Fields<'_, '_> {
    /// The engine message.
    pub(crate) fn message(self) -> PyResult<Message> {
        let mut m = Message::new(body(self.body)?);
        m.properties = properties(self.properties)?;
        m.message_id = opt_id(self.message_id, "message_id")?;
        m.correlation_id = opt_id(self.correlation_id, "correlation_id")?;
        m.content_type = opt_id(self.content_type, "content_type")?;
        m.content_encoding = opt_id(self.content_encoding, "content_encoding")?;
        m.expiry_time_ms = expiry(self.expiry)?;
        Ok(m)
    }
}

/// Pairs as a `dict` (a repeated name keeps its first value).
pub(crate) fn pairs_dict<'py>(py: Python<'py>, pairs: &[(String, String)]) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in pairs {
        if !d.contains(k)? {
            d.set_item(k, v)?;
        }
    }
    Ok(d)
}
