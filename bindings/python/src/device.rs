//! `hubmsg.DeviceClient`: D2C sends with per-message outcomes, flush, status, stats, and C2D
//! receive (blocking, iteration, asyncio) with complete / abandon / reject.
//!
//! Thread-safe: any Python thread may send, receive or read stats at the same time (the GIL is
//! released while the engine works). Every method has a blocking form and, for `hubmsg.aio`, an
//! `*_async` form returning an awaitable.
//!
//! A `C2dMessage` that is garbage-collected (or dropped by `close()`) without being settled is
//! released: the client forgets it and the hub delivers it again once its lock expires (60 s by
//! default); it is never locked forever.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hubmsg_bind::sources::C2dSource;
use hubmsg_bind::{outcome_name, Inbox, Life, Rt, SharedOutcome};
use hubmsg_core::device::{C2dMessage, Delivery};
use hubmsg_core::outbox::{Outcome, Overflow};
use hubmsg_core::retry::RetryPolicy;
use hubmsg_core::store::Durability;
use hubmsg_core::transport::TlsOptions;
use hubmsg_core::{ConnectionStatus, Credential, DeviceClient, DeviceOptions, Error, ErrorKind, Message};
use parking_lot::Mutex;
use pyo3::exceptions::{PyStopAsyncIteration, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use tokio::sync::watch;

use crate::aio::{awaitable, check_open, end_is_none, into_py, none, pull_awaitable, run, runtime, wait};
use crate::convert::{duration, Fields};
use crate::errors::{invalid, IntoPyResult};
use crate::message::PyMessage;

// ---------------------------------------------------------------------------------------------
// Options

/// How a client reconnects: exponential backoff `initial_delay × multiplier^n` capped at
/// `max_delay`, plus a random jitter in [0, jitter], until `max_elapsed` seconds passed since the
/// first failure or `max_attempts` attempts were made (None: forever). Times in seconds.
#[pyclass(module = "hubmsg", name = "RetryPolicy", frozen)]
#[derive(Clone)]
pub(crate) struct PyRetryPolicy {
    pub(crate) policy: RetryPolicy,
}

#[pymethods]
impl PyRetryPolicy {
    /// A policy; the defaults are 1 s doubling up to 60 s with 1 s of jitter, forever.
    #[new]
    #[pyo3(signature = (*, initial_delay=None, max_delay=None, multiplier=2.0, jitter=None, max_elapsed=None, max_attempts=None))]
    fn new(
        initial_delay: Option<&Bound<'_, PyAny>>,
        max_delay: Option<&Bound<'_, PyAny>>,
        multiplier: f64,
        jitter: Option<&Bound<'_, PyAny>>,
        max_elapsed: Option<&Bound<'_, PyAny>>,
        max_attempts: Option<u32>,
    ) -> PyResult<PyRetryPolicy> {
        let d = RetryPolicy::default();
        let initial = crate::convert::opt_duration(initial_delay, "initial_delay")?.unwrap_or(d.initial_delay);
        let max = crate::convert::opt_duration(max_delay, "max_delay")?.unwrap_or(d.max_delay);
        if initial > max {
            return Err(invalid(format!("initial_delay {initial:?} is larger than max_delay {max:?}")));
        }
        if !multiplier.is_finite() || multiplier < 1.0 {
            return Err(invalid(format!("multiplier {multiplier} must be a finite number ≥ 1.0")));
        }
        Ok(PyRetryPolicy {
            policy: RetryPolicy {
                initial_delay: initial,
                max_delay: max,
                multiplier,
                jitter: crate::convert::opt_duration(jitter, "jitter")?.unwrap_or(d.jitter),
                max_elapsed: crate::convert::opt_duration(max_elapsed, "max_elapsed")?,
                max_attempts,
                healthy_after: max.clamp(Duration::from_millis(100), Duration::from_secs(10)),
            },
        })
    }

    /// Never reconnect: the first failure moves the client to status "failed" (messages stay
    /// queued; `reconnect()` tries again).
    #[staticmethod]
    fn never() -> PyRetryPolicy {
        PyRetryPolicy { policy: RetryPolicy::none() }
    }

    /// The same delay (seconds) every time, no jitter.
    #[staticmethod]
    fn fixed(delay: &Bound<'_, PyAny>) -> PyResult<PyRetryPolicy> {
        Ok(PyRetryPolicy { policy: RetryPolicy::fixed(duration(delay, "delay")?) })
    }

    fn __repr__(&self) -> String {
        let p = &self.policy;
        format!(
            "RetryPolicy(initial_delay={}, max_delay={}, multiplier={}, jitter={}, max_elapsed={}, max_attempts={})",
            p.initial_delay.as_secs_f64(),
            p.max_delay.as_secs_f64(),
            p.multiplier,
            p.jitter.as_secs_f64(),
            p.max_elapsed.map_or("None".into(), |d| d.as_secs_f64().to_string()),
            p.max_attempts.map_or("None".into(), |n| n.to_string())
        )
    }
}

/// Sets the outbox's place in core's options: `outbox_dir=None` means core's durable default
/// directory of the hub and device id (`OutboxOptions::default_dir`), `in_memory=True` an explicit
/// in-memory outbox; both at once is an error.
fn set_outbox_place(o: &mut hubmsg_core::outbox::OutboxOptions, dir: Option<PathBuf>, in_memory: bool) -> PyResult<()> {
    if dir.is_some() && in_memory {
        return Err(invalid("give either outbox_dir or in_memory=True, not both"));
    }
    o.dir = dir;
    o.in_memory = in_memory;
    Ok(())
}

/// Applies the keyword options of `DeviceClient(...)` (the one list: see `_hubmsg.pyi`).
fn device_options(connection_string: Option<&str>, options: Option<&Bound<'_, PyDict>>) -> PyResult<DeviceOptions> {
    let get = |name: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
        Ok(match options {
            Some(d) => d.get_item(name)?.filter(|v| !v.is_none()),
            None => None,
        })
    };
    const KNOWN: &[&str] = &[
        "host_name",
        "device_id",
        "key",
        "sas_token",
        "outbox_dir",
        "in_memory",
        "durability",
        "max_messages",
        "max_bytes",
        "overflow",
        "retry",
        "ca_file",
        "keep_alive",
        "max_in_flight",
        "connect_timeout",
    ];
    if let Some(d) = options {
        for k in d.keys() {
            let k: String = k.extract()?;
            if !KNOWN.contains(&k.as_str()) {
                return Err(PyTypeError::new_err(format!("DeviceClient() got an unexpected keyword argument '{k}'")));
            }
        }
    }
    let text = |name: &str| -> PyResult<Option<String>> {
        get(name)?.map(|v| v.extract::<String>().map_err(|_| PyTypeError::new_err(format!("{name} must be a str")))).transpose()
    };
    let mut o = match connection_string {
        Some(cs) => {
            if text("host_name")?.is_some() || text("device_id")?.is_some() {
                return Err(invalid("give a connection string or host_name + device_id, not both"));
            }
            DeviceOptions::from_connection_string(cs).py()?
        }
        None => {
            let (Some(host), Some(id)) = (text("host_name")?, text("device_id")?) else {
                return Err(invalid("a device needs a connection string, or host_name and device_id with key or sas_token"));
            };
            DeviceOptions::new(host, id, Credential::SymmetricKey(String::new()))
        }
    };
    match (text("key")?, text("sas_token")?) {
        (Some(_), Some(_)) => return Err(invalid("give key or sas_token, not both")),
        (Some(k), None) => {
            hubmsg_core::auth::sign(&k, b"probe").py()?;
            o.credential = Credential::SymmetricKey(k);
        }
        (None, Some(t)) => {
            hubmsg_core::auth::SasToken::parse(&t).py()?;
            o.credential = Credential::SasToken(t);
        }
        (None, None) if connection_string.is_none() => return Err(invalid("give key= or sas_token= with host_name and device_id")),
        (None, None) => {}
    }
    let dir: Option<PathBuf> = get("outbox_dir")?.map(|v| v.extract()).transpose()?;
    let in_memory: bool = get("in_memory")?.map(|v| v.extract()).transpose()?.unwrap_or(false);
    set_outbox_place(&mut o.outbox, dir, in_memory)?;
    if let Some(d) = text("durability")? {
        o.outbox.durability = d.parse::<Durability>().py()?;
    }
    if let Some(v) = get("max_messages")? {
        o.outbox.max_messages = v.extract()?;
    }
    if let Some(v) = get("max_bytes")? {
        o.outbox.max_bytes = v.extract()?;
    }
    if o.outbox.max_messages == 0 || o.outbox.max_bytes == 0 {
        return Err(invalid("max_messages and max_bytes must be at least 1"));
    }
    if let Some(v) = text("overflow")? {
        o.outbox.overflow = v.parse::<Overflow>().py()?;
    }
    if let Some(v) = get("retry")? {
        o.retry = v.cast::<PyRetryPolicy>().map_err(|_| PyTypeError::new_err("retry must be a hubmsg.RetryPolicy"))?.get().policy.clone();
    }
    if let Some(f) = get("ca_file")? {
        o.tls = Some(TlsOptions { ca_file: Some(f.extract::<PathBuf>()?) });
    }
    if let Some(v) = get("keep_alive")? {
        o.keep_alive = duration(&v, "keep_alive")?;
    }
    if let Some(v) = get("max_in_flight")? {
        o.max_in_flight = v.extract::<usize>()?.max(1);
    }
    if let Some(v) = get("connect_timeout")? {
        o.connect_timeout = duration(&v, "connect_timeout")?;
    }
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// The client

struct Inner {
    client: DeviceClient,
    c2d: Arc<Inbox<C2dSource>>,
    life: Life,
    rt: Rt,
}

impl Inner {
    fn open(&self, what: &str) -> PyResult<()> {
        check_open(&self.life, &self.rt, what)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let client = self.client.clone();
        self.life.close_in_background(&self.rt, async move {
            let _ = client.close().await;
        });
    }
}

/// A device's connection to a hub: durable D2C sends and C2D commands. Create it with
/// `DeviceClient.from_connection_string(cs, outbox_dir=...)` or `DeviceClient(host_name=...,
/// device_id=..., key=...)`; it connects in the background. Close it with `close()` or use it
/// as a context manager.
#[pyclass(module = "hubmsg", name = "DeviceClient", frozen)]
pub(crate) struct PyDevice {
    inner: Arc<Inner>,
}

async fn connect_future(opts: DeviceOptions, rt: Rt) -> hubmsg_core::Result<PyDevice> {
    let client = DeviceClient::connect(opts).await?;
    let c = client.clone();
    Ok(PyDevice {
        inner: Arc::new(Inner {
            client,
            c2d: Arc::new(Inbox::lazy("C2D messages", move || Ok(C2dSource(c.c2d()?)))),
            life: Life::new("device client"),
            rt,
        }),
    })
}

/// One send's inputs as a Python object: a `Message`, or a body.
fn message_of(obj: &Bound<'_, PyAny>) -> PyResult<Message> {
    if let Ok(m) = obj.cast::<PyMessage>() {
        return Ok(m.get().msg.clone());
    }
    Ok(Message::new(crate::convert::body(obj)?))
}

#[pymethods]
impl PyDevice {
    /// Opens the outbox and starts connecting in the background. Give a device connection
    /// string, or host_name + device_id + key (or sas_token). Options: see the class stub.
    #[new]
    #[pyo3(signature = (connection_string=None, **options))]
    fn new(py: Python<'_>, connection_string: Option<&str>, options: Option<&Bound<'_, PyDict>>) -> PyResult<PyDevice> {
        let opts = device_options(connection_string, options)?;
        let rt = runtime()?;
        wait(py, &rt, "DeviceClient()", connect_future(opts, rt.clone()))?.py()
    }

    /// `DeviceClient(connection_string, **options)`.
    #[classmethod]
    #[pyo3(signature = (connection_string, **options))]
    fn from_connection_string(
        cls: &Bound<'_, pyo3::types::PyType>,
        connection_string: &str,
        options: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        Ok(cls.call((connection_string,), options)?.unbind())
    }

    /// An awaitable of a new client (for `hubmsg.aio`): the same arguments as the constructor.
    #[staticmethod]
    #[pyo3(signature = (connection_string=None, **options))]
    fn connect_async<'py>(
        py: Python<'py>,
        connection_string: Option<&str>,
        options: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let opts = device_options(connection_string, options)?;
        let rt = runtime()?;
        awaitable(py, &rt, "DeviceClient.connect", connect_future(opts, rt.clone()), into_py, drop)
    }

    /// The device id.
    #[getter]
    fn device_id(&self) -> &str {
        self.inner.client.device_id()
    }

    /// Queues a message and returns once it is durable in the outbox (per `durability`); the
    /// engine delivers it in the background. Returns its `Delivery` (the outcome to poll or
    /// wait for). Raises QueueFullError (outbox full, overflow "reject"), MessageTooLargeError
    /// (> 256 KB), InvalidArgumentError, StorageError, ClosedError.
    #[pyo3(signature = (body, *, properties=None, message_id=None, correlation_id=None, content_type=None, content_encoding=None, expiry=None))]
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        py: Python<'_>,
        body: &Bound<'_, PyAny>,
        properties: Option<&Bound<'_, PyAny>>,
        message_id: Option<String>,
        correlation_id: Option<String>,
        content_type: Option<String>,
        content_encoding: Option<String>,
        expiry: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyDelivery> {
        let msg = Fields { body, properties, message_id, correlation_id, content_type, content_encoding, expiry }.message()?;
        self.inner.open("DeviceClient.send")?;
        let client = self.inner.client.clone();
        let d = py.detach(move || client.send_blocking(msg)).py()?;
        Ok(PyDelivery::new(d))
    }

    /// `send` as an awaitable (the same arguments). Cancelling it does not stop the write: the
    /// message is queued whole (or refused) and delivered as if the await had completed.
    #[pyo3(signature = (body, *, properties=None, message_id=None, correlation_id=None, content_type=None, content_encoding=None, expiry=None))]
    #[allow(clippy::too_many_arguments)]
    fn send_async<'py>(
        &self,
        py: Python<'py>,
        body: &Bound<'py, PyAny>,
        properties: Option<&Bound<'py, PyAny>>,
        message_id: Option<String>,
        correlation_id: Option<String>,
        content_type: Option<String>,
        content_encoding: Option<String>,
        expiry: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let msg = Fields { body, properties, message_id, correlation_id, content_type, content_encoding, expiry }.message()?;
        self.inner.open("DeviceClient.send")?;
        let client = self.inner.client.clone();
        let queued = detached(&self.inner.rt, async move { client.send(msg).await });
        awaitable(py, &self.inner.rt, "DeviceClient.send", queued, |py, d| into_py(py, PyDelivery::new(d)), drop)
    }

    /// Queues several messages (each a `Message`, bytes or str) in order and returns once all
    /// are durable — they share one fsync, which is how to send fast. Validation errors, and
    /// `QueueFullError` for a batch the outbox has no room for (overflow "reject"), reject the
    /// whole batch before anything is queued.
    fn send_many(&self, py: Python<'_>, messages: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.send_many_impl(py, messages, false)
    }

    /// `send_many` as an awaitable.
    fn send_many_async(&self, py: Python<'_>, messages: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        self.send_many_impl(py, messages, true)
    }

    /// Waits until every queued message reached an outcome (`timeout` seconds, None = forever).
    /// Raises HubmsgTimeoutError when some are still pending (nothing is lost: delivery goes on).
    #[pyo3(signature = (timeout=None))]
    fn flush(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        self.flush_impl(py, timeout, false)
    }

    /// `flush` as an awaitable.
    #[pyo3(signature = (timeout=None))]
    fn flush_async(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        self.flush_impl(py, timeout, true)
    }

    /// The connection status: "connecting", "connected", "disconnected", "retrying", "failed"
    /// or "closed".
    #[getter]
    fn status(&self) -> &'static str {
        status_name(&self.inner.client.status())
    }

    /// The status changes: an iterator (and async iterator) of `Status`, starting with the
    /// current one; it ends after "closed".
    fn status_changes(&self) -> PyStatusStream {
        PyStatusStream { rx: Arc::new(tokio::sync::Mutex::new((self.inner.client.status_watch(), false))), rt: self.inner.rt.clone() }
    }

    /// Counters of the outbox and the connection.
    fn stats(&self) -> PyDeviceStats {
        PyDeviceStats::from(self.inner.client.stats())
    }

    /// Asks a client in status "failed" to try connecting again (e.g. after the device was
    /// re-enabled).
    fn reconnect(&self) -> PyResult<()> {
        self.inner.open("DeviceClient.reconnect")?;
        self.inner.client.reconnect();
        Ok(())
    }

    /// The next C2D message within `timeout` seconds (None: until one arrives), or None on
    /// timeout. The first call subscribes to C2D. Raises ClosedError once the client is closed.
    #[pyo3(signature = (timeout=None))]
    fn receive(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Py<PyC2d>>> {
        let timeout = crate::convert::opt_duration(timeout, "timeout")?;
        self.inner.open("DeviceClient.receive")?;
        let next = self.inner.c2d.next(&self.inner.rt, timeout);
        match wait(py, &self.inner.rt, "DeviceClient.receive", next)?.py()? {
            Some(m) => Ok(Some(PyC2d::wrap(py, m)?)),
            None => Ok(None),
        }
    }

    /// `receive` as an awaitable. Cancel-safe: a cancelled receive loses no message.
    #[pyo3(signature = (timeout=None))]
    fn receive_async<'py>(&self, py: Python<'py>, timeout: Option<&Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyAny>> {
        let timeout = crate::convert::opt_duration(timeout, "timeout")?;
        self.inner.open("DeviceClient.receive")?;
        receive_awaitable(py, &self.inner, timeout, false)
    }

    /// The C2D messages as an iterator (blocking) and async iterator; it ends when the client is
    /// closed.
    fn messages(&self) -> PyResult<PyC2dStream> {
        self.inner.open("DeviceClient.messages")?;
        self.inner.c2d.start_pull(&self.inner.rt).py()?;
        Ok(PyC2dStream { inner: self.inner.clone() })
    }

    /// Waits up to `drain_timeout` (10 s) for messages in flight, persists the outbox and
    /// closes it. Undelivered messages stay in the outbox directory for the next client on it.
    /// Idempotent.
    fn close(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.close_impl(py, false)
    }

    /// `close` as an awaitable.
    fn close_async(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.close_impl(py, true)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
        self.close_impl(py, false).map(drop)
    }

    fn __repr__(&self) -> String {
        format!("<DeviceClient {} {}>", self.inner.client.device_id(), status_name(&self.inner.client.status()))
    }
}

impl PyDevice {
    fn send_many_impl(&self, py: Python<'_>, messages: &Bound<'_, PyAny>, asynchronous: bool) -> PyResult<Py<PyAny>> {
        let msgs = messages.try_iter()?.map(|m| message_of(&m?)).collect::<PyResult<Vec<_>>>()?;
        self.inner.open("DeviceClient.send_many")?;
        let client = self.inner.client.clone();
        let queued = detached(&self.inner.rt, async move { client.send_batch(msgs).await });
        run(py, &self.inner.rt, "DeviceClient.send_many", asynchronous, queued, |py, ds| {
            let list = PyList::empty(py);
            for d in ds {
                list.append(Py::new(py, PyDelivery::new(d))?)?;
            }
            Ok(list.into_any().unbind())
        })
    }

    fn flush_impl(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>, asynchronous: bool) -> PyResult<Py<PyAny>> {
        let timeout = crate::convert::opt_duration(timeout, "timeout")?.unwrap_or(Duration::from_secs(100 * 365 * 86400));
        self.inner.open("DeviceClient.flush")?;
        let client = self.inner.client.clone();
        run(py, &self.inner.rt, "DeviceClient.flush", asynchronous, async move { client.flush(timeout).await }, none)
    }

    fn close_impl(&self, py: Python<'_>, asynchronous: bool) -> PyResult<Py<PyAny>> {
        self.inner.rt.check("DeviceClient.close").py()?;
        if !self.inner.life.close() {
            return if asynchronous {
                crate::aio::run(py, &self.inner.rt, "DeviceClient.close", true, async { Ok(()) }, none)
            } else {
                Ok(py.None())
            };
        }
        let inner = self.inner.clone();
        run(
            py,
            &self.inner.rt,
            "DeviceClient.close",
            asynchronous,
            async move {
                let r = inner.client.close().await;
                // Stopping the pump drops C2D messages not handed out yet (they are released).
                if let Some(pump) = inner.c2d.stop_task() {
                    let _ = pump.await;
                }
                r
            },
            none,
        )
    }
}

/// Runs a send on its own task, so that dropping the returned future (a cancelled await, a
/// Ctrl-C) never drops the engine's send half-way: a send dropped while it waits for its fsync
/// would leave its messages queued but unannounced to the connection (sent only once another
/// send wakes it), so the message is queued whole and delivered as if the wait had completed.
fn detached<T: Send + 'static>(
    rt: &Rt,
    send: impl Future<Output = hubmsg_core::Result<T>> + Send + 'static,
) -> impl Future<Output = hubmsg_core::Result<T>> + Send + 'static {
    let task = rt.spawn(send);
    async move { task.await.map_err(|e| Error::new(ErrorKind::Internal, format!("send task failed: {e}")))? }
}

/// An awaitable of the next C2D message; a message whose awaitable was cancelled goes back to
/// the inbox. `end_is_stop` turns the end of the stream into `StopAsyncIteration`.
fn receive_awaitable<'py>(
    py: Python<'py>,
    inner: &Arc<Inner>,
    timeout: Option<Duration>,
    end_is_stop: bool,
) -> PyResult<Bound<'py, PyAny>> {
    pull_awaitable(
        py,
        &inner.rt,
        &inner.c2d,
        timeout,
        end_is_stop,
        |py, m| Ok(PyC2d::wrap(py, m)?.into_any()),
        |obj| obj.cast::<PyC2d>().ok().and_then(|c| c.get().settle.lock().take()),
    )
}

/// The C2D messages of a device, for `for` and `async for`.
#[pyclass(module = "hubmsg", name = "C2dStream", frozen)]
pub(crate) struct PyC2dStream {
    inner: Arc<Inner>,
}

#[pymethods]
impl PyC2dStream {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyC2d>>> {
        self.inner.rt.check("C2dStream.__next__").py()?;
        let next = self.inner.c2d.next(&self.inner.rt, None);
        end_is_none(wait(py, &self.inner.rt, "C2dStream.__next__", next)?)?.map(|m| PyC2d::wrap(py, m)).transpose()
    }

    fn __aiter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        receive_awaitable(py, &self.inner, None, true)
    }
}

fn status_name(s: &ConnectionStatus) -> &'static str {
    match s {
        ConnectionStatus::Connecting => "connecting",
        ConnectionStatus::Connected => "connected",
        ConnectionStatus::Disconnected { .. } => "disconnected",
        ConnectionStatus::Retrying { .. } => "retrying",
        ConnectionStatus::Failed { .. } => "failed",
        ConnectionStatus::Closed => "closed",
    }
}

/// One connection status: `status` ("connecting", "connected", "disconnected", "retrying",
/// "failed", "closed"), a human `reason`, the error `kind` of a "failed" status, and the
/// `attempt` and `delay` (seconds) of a "retrying" one.
#[pyclass(module = "hubmsg", name = "Status", frozen, get_all)]
pub(crate) struct PyStatus {
    /// "connecting", "connected", "disconnected", "retrying", "failed" or "closed".
    status: &'static str,
    /// Why (the error of "disconnected" and "failed", the plan of "retrying"); may be empty.
    reason: String,
    /// The error kind of a "failed" status (e.g. "UNAUTHORIZED"), else None.
    kind: Option<&'static str>,
    /// The 1-based attempt number of a "retrying" status, else None.
    attempt: Option<u32>,
    /// The delay (seconds) before that attempt, else None.
    delay: Option<f64>,
}

impl From<&ConnectionStatus> for PyStatus {
    fn from(s: &ConnectionStatus) -> PyStatus {
        let mut p = PyStatus { status: status_name(s), reason: String::new(), kind: None, attempt: None, delay: None };
        match s {
            ConnectionStatus::Disconnected { reason } => p.reason = reason.clone(),
            ConnectionStatus::Retrying { attempt, delay } => {
                p.attempt = Some(*attempt);
                p.delay = Some(delay.as_secs_f64());
                p.reason = format!("attempt {attempt} in {:.3} s", delay.as_secs_f64());
            }
            ConnectionStatus::Failed { kind, reason } => {
                p.kind = Some(kind.code());
                p.reason = reason.clone();
            }
            _ => {}
        }
        p
    }
}

#[pymethods]
impl PyStatus {
    fn __repr__(&self) -> String {
        format!("<Status {} {:?}>", self.status, self.reason)
    }

    fn __str__(&self) -> &'static str {
        self.status
    }
}

type StatusRx = Arc<tokio::sync::Mutex<(watch::Receiver<ConnectionStatus>, bool)>>;

/// The status changes of a client (see `DeviceClient.status_changes`).
#[pyclass(module = "hubmsg", name = "StatusStream", frozen)]
pub(crate) struct PyStatusStream {
    rx: StatusRx,
    rt: Rt,
}

/// The next status: the current one first, then each change; `None` after the last.
async fn next_status(rx: StatusRx, timeout: Option<Duration>) -> hubmsg_core::Result<Option<Option<ConnectionStatus>>> {
    {
        let step = async {
            let mut g = rx.lock().await;
            let (rx, started) = &mut *g;
            if !*started {
                *started = true;
                return Some(rx.borrow_and_update().clone());
            }
            match rx.changed().await {
                Ok(()) => Some(rx.borrow_and_update().clone()),
                Err(_) => None,
            }
        };
        Ok(match timeout {
            Some(t) => tokio::time::timeout(t, step).await.ok(),
            None => Some(step.await),
        })
    }
}

#[pymethods]
impl PyStatusStream {
    /// The next status within `timeout` seconds (None: until there is one), or None on timeout
    /// or after the last.
    #[pyo3(signature = (timeout=None))]
    fn next(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>) -> PyResult<Option<PyStatus>> {
        let timeout = crate::convert::opt_duration(timeout, "timeout")?;
        let s = wait(py, &self.rt, "StatusStream.next", next_status(self.rx.clone(), timeout))?.py()?;
        Ok(s.flatten().as_ref().map(PyStatus::from))
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<PyStatus>> {
        let s = wait(py, &self.rt, "StatusStream.__next__", next_status(self.rx.clone(), None))?.py()?;
        Ok(s.flatten().as_ref().map(PyStatus::from))
    }

    fn __aiter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        awaitable(
            py,
            &self.rt,
            "StatusStream.__anext__",
            next_status(self.rx.clone(), None),
            |py, s| match s.flatten() {
                Some(s) => into_py(py, PyStatus::from(&s)),
                None => Err(PyStopAsyncIteration::new_err(())),
            },
            drop,
        )
    }
}

/// Counters of a device client (a snapshot).
#[pyclass(module = "hubmsg", name = "DeviceStats", frozen, get_all)]
pub(crate) struct PyDeviceStats {
    /// Messages in the outbox (queued + in flight).
    depth: usize,
    /// Bytes in the outbox.
    bytes: usize,
    /// Messages sent and not yet acknowledged.
    in_flight: usize,
    /// Messages acknowledged by the hub since the client started.
    delivered: u64,
    /// Messages removed by overflow "drop_oldest" since start.
    dropped: u64,
    /// Messages that expired before sending since start.
    expired: u64,
    /// Messages the receiver refused since start.
    rejected: u64,
    /// Messages recovered from the outbox directory at start.
    recovered: u64,
    /// Successful connects since start.
    connects: u64,
    /// Failed connection attempts and drops that led to a retry.
    retries: u64,
    /// C2D messages handed to the application.
    c2d_received: u64,
    /// C2D redeliveries kept from the application.
    c2d_duplicates: u64,
    /// C2D messages that arrived expired.
    c2d_expired: u64,
    /// SAS token renewals.
    renewals: u64,
    /// The last connection error, if any.
    last_error: Option<String>,
}

impl From<hubmsg_core::device::DeviceStats> for PyDeviceStats {
    fn from(s: hubmsg_core::device::DeviceStats) -> PyDeviceStats {
        let o = s.outbox;
        PyDeviceStats {
            depth: o.depth,
            bytes: o.bytes,
            in_flight: o.in_flight,
            delivered: o.delivered,
            dropped: o.dropped,
            expired: o.expired,
            rejected: o.rejected,
            recovered: o.recovered,
            connects: s.connects,
            retries: s.retries,
            c2d_received: s.c2d_received,
            c2d_duplicates: s.c2d_duplicates,
            c2d_expired: s.c2d_expired,
            renewals: s.renewals,
            last_error: s.last_error,
        }
    }
}

#[pymethods]
impl PyDeviceStats {
    fn __repr__(&self) -> String {
        format!(
            "<DeviceStats depth={} in_flight={} delivered={} dropped={} expired={} connects={} retries={}>",
            self.depth, self.in_flight, self.delivered, self.dropped, self.expired, self.connects, self.retries
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Outcomes

/// The outcome of one sent message: poll `outcome` or `wait()` for it.
#[pyclass(module = "hubmsg", name = "Delivery", frozen)]
pub(crate) struct PyDelivery {
    outcome: SharedOutcome,
}

impl PyDelivery {
    fn new(d: Delivery) -> PyDelivery {
        PyDelivery { outcome: SharedOutcome::new(d) }
    }

    /// The outcome once known, without waiting.
    fn poll(&self) -> Option<hubmsg_core::Result<Outcome>> {
        self.outcome.poll()
    }

    fn wait_future(&self, timeout: Option<Duration>) -> impl Future<Output = hubmsg_core::Result<&'static str>> + Send + 'static {
        let wait = self.outcome.wait(timeout);
        async move { wait.await.map(outcome_name) }
    }
}

#[pymethods]
impl PyDelivery {
    /// The message id (the one given, or the generated UUID).
    #[getter]
    fn message_id(&self) -> &str {
        self.outcome.message_id()
    }

    /// The message's sequence number in the outbox.
    #[getter]
    fn sequence_number(&self) -> u64 {
        self.outcome.sequence_number()
    }

    /// "delivered", "expired", "dropped" or "rejected" once known, else None. Raises
    /// ClosedError when the client closed first (the message stays in the outbox).
    #[getter]
    fn outcome(&self) -> PyResult<Option<&'static str>> {
        self.poll().map(|r| r.map(outcome_name)).transpose().py()
    }

    /// Whether the outcome is known.
    fn done(&self) -> bool {
        self.poll().is_some()
    }

    /// Waits for the outcome (`timeout` seconds, None = forever) and returns it. Raises
    /// HubmsgTimeoutError (still pending) or ClosedError (the client closed first).
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>) -> PyResult<&'static str> {
        let timeout = crate::convert::opt_duration(timeout, "timeout")?;
        let rt = runtime()?;
        wait(py, &rt, "Delivery.wait", self.wait_future(timeout))?.py()
    }

    /// `wait` as an awaitable.
    #[pyo3(signature = (timeout=None))]
    fn wait_async<'py>(&self, py: Python<'py>, timeout: Option<&Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyAny>> {
        let timeout = crate::convert::opt_duration(timeout, "timeout")?;
        let rt = runtime()?;
        awaitable(py, &rt, "Delivery.wait", self.wait_future(timeout), into_py, drop)
    }

    fn __repr__(&self) -> String {
        let o = match self.poll() {
            None => "pending".to_string(),
            Some(Ok(o)) => outcome_name(o).to_string(),
            Some(Err(e)) => e.kind().code().to_lowercase(),
        };
        format!("<Delivery {} {o}>", self.outcome.message_id())
    }
}

// ---------------------------------------------------------------------------------------------
// C2D messages

/// A cloud-to-device message. Settle it once with `complete()`, `abandon()` or `reject()`; one
/// left unsettled (garbage-collected) is released and delivered again once its lock expires.
#[pyclass(module = "hubmsg", name = "C2dMessage", extends = PyMessage, frozen)]
pub(crate) struct PyC2d {
    settle: Mutex<Option<C2dMessage>>,
    sequence_number: u64,
}

impl PyC2d {
    fn wrap(py: Python<'_>, m: C2dMessage) -> PyResult<Py<PyC2d>> {
        let base = PyMessage { msg: m.message.clone() };
        let seq = m.sequence_number;
        Py::new(py, PyClassInitializer::from(base).add_subclass(PyC2d { settle: Mutex::new(Some(m)), sequence_number: seq }))
    }

    fn settle(&self, how: fn(C2dMessage) -> hubmsg_core::Result<()>) -> PyResult<()> {
        let m = self.settle.lock().take().ok_or_else(|| crate::errors::usage("this C2D message was already settled"))?;
        how(m).py()
    }
}

#[pymethods]
impl PyC2d {
    /// The message's sequence number in the device queue (0 when the hub sends none, e.g.
    /// Azure IoT Hub, whose messages can only be completed).
    #[getter]
    fn sequence_number(&self) -> u64 {
        self.sequence_number
    }

    /// Whether it was settled already.
    #[getter]
    fn settled(&self) -> bool {
        self.settle.lock().is_none()
    }

    /// Completes it: the hub removes it (feedback "Success" if asked for). Its id is recorded
    /// durably first, so a redelivery never reaches the application again.
    fn complete(&self) -> PyResult<()> {
        self.settle(C2dMessage::complete)
    }

    /// Abandons it: back to the queue (delivery count + 1; dead-lettered with feedback
    /// "DeliveryCountExceeded" at the maximum).
    fn abandon(&self) -> PyResult<()> {
        self.settle(C2dMessage::abandon)
    }

    /// Rejects it: dead-lettered (feedback "Rejected" if asked for).
    fn reject(&self) -> PyResult<()> {
        self.settle(C2dMessage::reject)
    }
}
