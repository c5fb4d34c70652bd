//! `hubmsg.ServiceClient`: device identities, C2D sends (awaited per message or as feedback
//! batches), purge, and D2C events by consumer group (`EventStream`) with ack and checkpoint.
//!
//! Thread-safe; every request has a blocking form and an `*_async` form for `hubmsg.aio`.

use std::sync::Arc;
use std::time::Duration;

use hubmsg_bind::sources::{EventsControl, EventsSource, FeedbackSource};
use hubmsg_bind::{Inbox, Life, Rt};
use hubmsg_core::proto::{AckMode, CreateDevice, DeviceIdentity, DeviceStatus, FeedbackRecord};
use hubmsg_core::service::{C2dOptions, Event, FeedbackBatch, ServiceClient, ServiceOptions};
use hubmsg_core::transport::TlsOptions;
use hubmsg_core::{Error, ErrorKind, Message};
use parking_lot::Mutex;
use pyo3::prelude::*;

use crate::aio::{awaitable, check_open, end_is_none, into_py, none, pull_awaitable, run, runtime, wait};
use crate::convert::{datetime_from_ms, opt_duration, start_position, Fields};
use crate::errors::{invalid, IntoPyResult};
use crate::message::PyMessage;

/// A device identity from the registry.
#[pyclass(module = "hubmsg", name = "DeviceIdentity", frozen, get_all)]
pub(crate) struct PyIdentity {
    /// Device id.
    device_id: String,
    /// Generation id (tells re-created devices with the same id apart).
    generation_id: String,
    /// "enabled" or "disabled".
    status: &'static str,
    /// Primary symmetric key (base64).
    primary_key: String,
    /// Secondary symmetric key (base64).
    secondary_key: String,
    /// Creation time, ms since the Unix epoch.
    created_ms: u64,
}

impl From<DeviceIdentity> for PyIdentity {
    fn from(d: DeviceIdentity) -> PyIdentity {
        PyIdentity {
            device_id: d.device_id,
            generation_id: d.generation_id,
            status: match d.status {
                DeviceStatus::Enabled => "enabled",
                DeviceStatus::Disabled => "disabled",
            },
            primary_key: d.primary_key,
            secondary_key: d.secondary_key,
            created_ms: d.created_ms,
        }
    }
}

#[pymethods]
impl PyIdentity {
    /// Whether the device may connect.
    #[getter]
    fn enabled(&self) -> bool {
        self.status == "enabled"
    }

    fn __repr__(&self) -> String {
        format!("<DeviceIdentity {} {}>", self.device_id, self.status)
    }
}

/// The hub's receipt of a C2D message: it holds the message durably.
#[pyclass(module = "hubmsg", name = "C2dReceipt", frozen, get_all)]
pub(crate) struct PyReceipt {
    /// The message id (the sender's, or one generated).
    message_id: String,
    /// Its sequence number in the device queue.
    sequence_number: u64,
}

/// One C2D feedback record: what happened to a message sent with `ack`.
#[pyclass(module = "hubmsg", name = "FeedbackRecord", frozen, get_all)]
pub(crate) struct PyFeedback {
    /// The C2D message's id.
    original_message_id: String,
    /// The target device.
    device_id: String,
    /// The target device's generation id.
    device_generation_id: String,
    /// When it happened (ISO-8601 UTC).
    enqueued_time_utc: String,
    /// "Success", "Expired", "DeliveryCountExceeded", "Rejected" or "Purged".
    status: &'static str,
    /// The status as text.
    description: String,
}

impl From<&FeedbackRecord> for PyFeedback {
    fn from(r: &FeedbackRecord) -> PyFeedback {
        PyFeedback {
            original_message_id: r.original_message_id.clone(),
            device_id: r.device_id.clone(),
            device_generation_id: r.device_generation_id.clone(),
            enqueued_time_utc: r.enqueued_time_utc.clone(),
            status: r.status_code.as_str(),
            description: r.description.clone(),
        }
    }
}

#[pymethods]
impl PyFeedback {
    fn __repr__(&self) -> String {
        format!("<FeedbackRecord {} {}>", self.original_message_id, self.status)
    }
}

/// A batch of feedback records; `ack()` it once processed, or it is delivered again.
#[pyclass(module = "hubmsg", name = "FeedbackBatch", frozen)]
pub(crate) struct PyFeedbackBatch {
    id: u64,
    records: Vec<FeedbackRecord>,
    /// Taken back when the batch goes back to its stream (a cancelled await).
    batch: Mutex<Option<FeedbackBatch>>,
}

impl PyFeedbackBatch {
    fn new(batch: FeedbackBatch) -> PyFeedbackBatch {
        PyFeedbackBatch { id: batch.id, records: batch.records.clone(), batch: Mutex::new(Some(batch)) }
    }
}

#[pymethods]
impl PyFeedbackBatch {
    /// The batch id.
    #[getter]
    fn id(&self) -> u64 {
        self.id
    }

    /// The records.
    #[getter]
    fn records(&self) -> Vec<PyFeedback> {
        self.records.iter().map(PyFeedback::from).collect()
    }

    /// Acknowledges the batch (the hub deletes it).
    fn ack(&self) {
        if let Some(b) = self.batch.lock().as_ref() {
            b.ack();
        }
    }

    fn __len__(&self) -> usize {
        self.records.len()
    }
}

struct Inner {
    client: ServiceClient,
    feedback: Arc<Inbox<FeedbackSource>>,
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
        self.life.close_in_background(&self.rt, async move { client.close().await });
    }
}

/// A back-end connection to a hub: device identities, C2D commands with feedback, D2C events by
/// consumer group. Create it with `ServiceClient.from_connection_string(cs)` (a policy
/// connection string); close it with `close()` or use it as a context manager.
#[pyclass(module = "hubmsg", name = "ServiceClient", frozen)]
pub(crate) struct PyService {
    inner: Arc<Inner>,
}

fn ack_mode(s: &str) -> PyResult<AckMode> {
    s.parse::<AckMode>().py()
}

fn identity(py: Python<'_>, d: DeviceIdentity) -> PyResult<Py<PyAny>> {
    into_py(py, PyIdentity::from(d))
}

async fn open_service(opts: ServiceOptions, rt: Rt) -> hubmsg_core::Result<PyService> {
    let client = ServiceClient::connect(opts).await?;
    let c = client.clone();
    Ok(PyService {
        inner: Arc::new(Inner {
            client,
            feedback: Arc::new(Inbox::lazy("feedback batches", move || Ok(FeedbackSource(c.feedback()?)))),
            life: Life::new("service client"),
            rt,
        }),
    })
}

fn service_options(
    connection_string: &str,
    ca_file: Option<std::path::PathBuf>,
    request_timeout: Option<&Bound<'_, PyAny>>,
    retry: Option<&Bound<'_, PyAny>>,
) -> PyResult<ServiceOptions> {
    let mut opts = ServiceOptions::from_connection_string(connection_string).py()?;
    opts.tls = ca_file.map(|f| TlsOptions { ca_file: Some(f) });
    if let Some(r) = retry.filter(|r| !r.is_none()) {
        let r = r
            .cast::<crate::device::PyRetryPolicy>()
            .map_err(|_| pyo3::exceptions::PyTypeError::new_err("retry must be a hubmsg.RetryPolicy"))?;
        opts.retry = r.get().policy.clone();
    }
    if let Some(t) = opt_duration(request_timeout, "request_timeout")? {
        opts.request_timeout = t;
    }
    Ok(opts)
}

#[pymethods]
impl PyService {
    /// Connects (in the background) with a policy connection string
    /// (`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`). `ca_file` trusts a CA (TLS);
    /// `request_timeout` (seconds) bounds every request, across reconnects; `retry` paces
    /// reconnects (a `RetryPolicy`).
    #[new]
    #[pyo3(signature = (connection_string, *, ca_file=None, request_timeout=None, retry=None))]
    fn new(
        py: Python<'_>,
        connection_string: &str,
        ca_file: Option<std::path::PathBuf>,
        request_timeout: Option<&Bound<'_, PyAny>>,
        retry: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyService> {
        let opts = service_options(connection_string, ca_file, request_timeout, retry)?;
        let rt = runtime()?;
        wait(py, &rt, "ServiceClient()", open_service(opts, rt.clone()))?.py()
    }

    /// `ServiceClient(connection_string, ...)`.
    #[classmethod]
    #[pyo3(signature = (connection_string, *, ca_file=None, request_timeout=None, retry=None))]
    fn from_connection_string(
        cls: &Bound<'_, pyo3::types::PyType>,
        connection_string: &str,
        ca_file: Option<std::path::PathBuf>,
        request_timeout: Option<Bound<'_, PyAny>>,
        retry: Option<Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let kw = pyo3::types::PyDict::new(cls.py());
        kw.set_item("ca_file", ca_file)?;
        kw.set_item("request_timeout", request_timeout)?;
        kw.set_item("retry", retry)?;
        Ok(cls.call((connection_string,), Some(&kw))?.unbind())
    }

    /// An awaitable of a new client (for `hubmsg.aio`).
    #[staticmethod]
    #[pyo3(signature = (connection_string, *, ca_file=None, request_timeout=None, retry=None))]
    fn connect_async<'py>(
        py: Python<'py>,
        connection_string: &str,
        ca_file: Option<std::path::PathBuf>,
        request_timeout: Option<&Bound<'py, PyAny>>,
        retry: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let opts = service_options(connection_string, ca_file, request_timeout, retry)?;
        let rt = runtime()?;
        awaitable(py, &rt, "ServiceClient.connect", open_service(opts, rt.clone()), into_py, drop)
    }

    /// The connection status ("connecting", "connected", … as `DeviceClient.status`).
    #[getter]
    fn status(&self) -> &'static str {
        match self.inner.client.status() {
            hubmsg_core::ConnectionStatus::Connecting => "connecting",
            hubmsg_core::ConnectionStatus::Connected => "connected",
            hubmsg_core::ConnectionStatus::Disconnected { .. } => "disconnected",
            hubmsg_core::ConnectionStatus::Retrying { .. } => "retrying",
            hubmsg_core::ConnectionStatus::Failed { .. } => "failed",
            hubmsg_core::ConnectionStatus::Closed => "closed",
        }
    }

    /// Registers a device (generated keys unless given). Raises AlreadyExistsError.
    #[pyo3(signature = (device_id, *, primary_key=None, secondary_key=None, enabled=true))]
    fn create_device(
        &self,
        py: Python<'_>,
        device_id: &str,
        primary_key: Option<String>,
        secondary_key: Option<String>,
        enabled: bool,
    ) -> PyResult<Py<PyAny>> {
        self.create_device_impl(py, false, device_id, primary_key, secondary_key, enabled)
    }

    /// `create_device` as an awaitable.
    #[pyo3(signature = (device_id, *, primary_key=None, secondary_key=None, enabled=true))]
    fn create_device_async(
        &self,
        py: Python<'_>,
        device_id: &str,
        primary_key: Option<String>,
        secondary_key: Option<String>,
        enabled: bool,
    ) -> PyResult<Py<PyAny>> {
        self.create_device_impl(py, true, device_id, primary_key, secondary_key, enabled)
    }

    /// A device's identity. Raises NotFoundError.
    #[pyo3(signature = (device_id))]
    fn get_device(&self, py: Python<'_>, device_id: &str) -> PyResult<Py<PyAny>> {
        self.get_device_impl(py, false, device_id)
    }

    /// `get_device` as an awaitable.
    #[pyo3(signature = (device_id))]
    fn get_device_async(&self, py: Python<'_>, device_id: &str) -> PyResult<Py<PyAny>> {
        self.get_device_impl(py, true, device_id)
    }

    /// Every device, ordered by id.
    #[pyo3(signature = ())]
    fn list_devices(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.list_devices_impl(py, false)
    }

    /// `list_devices` as an awaitable.
    #[pyo3(signature = ())]
    fn list_devices_async(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.list_devices_impl(py, true)
    }

    /// Deletes a device (its connection is dropped). Raises NotFoundError.
    #[pyo3(signature = (device_id))]
    fn delete_device(&self, py: Python<'_>, device_id: &str) -> PyResult<Py<PyAny>> {
        self.delete_device_impl(py, false, device_id)
    }

    /// `delete_device` as an awaitable.
    #[pyo3(signature = (device_id))]
    fn delete_device_async(&self, py: Python<'_>, device_id: &str) -> PyResult<Py<PyAny>> {
        self.delete_device_impl(py, true, device_id)
    }

    /// Enables a device; returns its identity.
    #[pyo3(signature = (device_id))]
    fn enable_device(&self, py: Python<'_>, device_id: &str) -> PyResult<Py<PyAny>> {
        self.enable_device_impl(py, false, device_id)
    }

    /// `enable_device` as an awaitable.
    #[pyo3(signature = (device_id))]
    fn enable_device_async(&self, py: Python<'_>, device_id: &str) -> PyResult<Py<PyAny>> {
        self.enable_device_impl(py, true, device_id)
    }

    /// Disables a device (it is disconnected and refused); returns its identity.
    #[pyo3(signature = (device_id))]
    fn disable_device(&self, py: Python<'_>, device_id: &str) -> PyResult<Py<PyAny>> {
        self.disable_device_impl(py, false, device_id)
    }

    /// `disable_device` as an awaitable.
    #[pyo3(signature = (device_id))]
    fn disable_device_async(&self, py: Python<'_>, device_id: &str) -> PyResult<Py<PyAny>> {
        self.disable_device_impl(py, true, device_id)
    }

    /// Regenerates "primary", "secondary" or "both" keys (the device is disconnected).
    #[pyo3(signature = (device_id, which="both"))]
    fn regenerate_keys(&self, py: Python<'_>, device_id: &str, which: &str) -> PyResult<Py<PyAny>> {
        self.regenerate_keys_impl(py, false, device_id, which)
    }

    /// `regenerate_keys` as an awaitable.
    #[pyo3(signature = (device_id, which="both"))]
    fn regenerate_keys_async(&self, py: Python<'_>, device_id: &str, which: &str) -> PyResult<Py<PyAny>> {
        self.regenerate_keys_impl(py, true, device_id, which)
    }

    /// The connection string of a registered device (primary key) on this client's hub.
    #[pyo3(signature = (device_id))]
    fn device_connection_string(&self, py: Python<'_>, device_id: &str) -> PyResult<Py<PyAny>> {
        self.device_cs_impl(py, false, device_id)
    }

    /// `device_connection_string` as an awaitable.
    #[pyo3(signature = (device_id))]
    fn device_connection_string_async(&self, py: Python<'_>, device_id: &str) -> PyResult<Py<PyAny>> {
        self.device_cs_impl(py, true, device_id)
    }

    /// Sends a C2D message and returns once the hub holds it durably (a `C2dReceipt`).
    /// `ack`: "none", "positive", "negative" or "full" feedback; `ttl`: seconds or a
    /// timedelta (default: the message's expiry, else the hub's 1 h). Raises NotFoundError
    /// (unknown device), QueueFullError (50 pending), MessageTooLargeError (> 64 KB),
    /// InvalidArgumentError (TTL outside 1 s – 48 h).
    #[pyo3(signature = (device_id, body, *, ack="none", ttl=None, properties=None, message_id=None, correlation_id=None, content_type=None, content_encoding=None, expiry=None))]
    #[allow(clippy::too_many_arguments)]
    fn send_c2d(
        &self,
        py: Python<'_>,
        device_id: &str,
        body: &Bound<'_, PyAny>,
        ack: &str,
        ttl: Option<&Bound<'_, PyAny>>,
        properties: Option<&Bound<'_, PyAny>>,
        message_id: Option<String>,
        correlation_id: Option<String>,
        content_type: Option<String>,
        content_encoding: Option<String>,
        expiry: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        self.send_c2d_impl(
            py,
            false,
            device_id,
            body,
            ack,
            ttl,
            properties,
            message_id,
            correlation_id,
            content_type,
            content_encoding,
            expiry,
        )
    }

    /// `send_c2d` as an awaitable.
    #[pyo3(signature = (device_id, body, *, ack="none", ttl=None, properties=None, message_id=None, correlation_id=None, content_type=None, content_encoding=None, expiry=None))]
    #[allow(clippy::too_many_arguments)]
    fn send_c2d_async(
        &self,
        py: Python<'_>,
        device_id: &str,
        body: &Bound<'_, PyAny>,
        ack: &str,
        ttl: Option<&Bound<'_, PyAny>>,
        properties: Option<&Bound<'_, PyAny>>,
        message_id: Option<String>,
        correlation_id: Option<String>,
        content_type: Option<String>,
        content_encoding: Option<String>,
        expiry: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        self.send_c2d_impl(
            py,
            true,
            device_id,
            body,
            ack,
            ttl,
            properties,
            message_id,
            correlation_id,
            content_type,
            content_encoding,
            expiry,
        )
    }

    /// Sends a C2D message asking for feedback (`ack`, "full" by default) and waits up to
    /// `timeout` seconds for its `FeedbackRecord` (`.status` "Success", "Rejected",
    /// "Expired", "DeliveryCountExceeded" or "Purged"). Raises HubmsgTimeoutError. The hub
    /// pushes the record to this client (an outcome notification), whoever else reads feedback.
    #[pyo3(signature = (device_id, body, *, ack="full", timeout=None, ttl=None, properties=None, message_id=None, correlation_id=None))]
    #[allow(clippy::too_many_arguments)]
    fn send_c2d_and_wait(
        &self,
        py: Python<'_>,
        device_id: &str,
        body: &Bound<'_, PyAny>,
        ack: &str,
        timeout: Option<&Bound<'_, PyAny>>,
        ttl: Option<&Bound<'_, PyAny>>,
        properties: Option<&Bound<'_, PyAny>>,
        message_id: Option<String>,
        correlation_id: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        self.send_c2d_and_wait_impl(py, false, device_id, body, ack, timeout, ttl, properties, message_id, correlation_id)
    }

    /// `send_c2d_and_wait` as an awaitable.
    #[pyo3(signature = (device_id, body, *, ack="full", timeout=None, ttl=None, properties=None, message_id=None, correlation_id=None))]
    #[allow(clippy::too_many_arguments)]
    fn send_c2d_and_wait_async(
        &self,
        py: Python<'_>,
        device_id: &str,
        body: &Bound<'_, PyAny>,
        ack: &str,
        timeout: Option<&Bound<'_, PyAny>>,
        ttl: Option<&Bound<'_, PyAny>>,
        properties: Option<&Bound<'_, PyAny>>,
        message_id: Option<String>,
        correlation_id: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        self.send_c2d_and_wait_impl(py, true, device_id, body, ack, timeout, ttl, properties, message_id, correlation_id)
    }

    /// Removes every pending C2D message of a device (feedback "Purged"); returns how many.
    #[pyo3(signature = (device_id))]
    fn purge_c2d(&self, py: Python<'_>, device_id: &str) -> PyResult<Py<PyAny>> {
        self.purge_impl(py, false, device_id)
    }

    /// `purge_c2d` as an awaitable.
    #[pyo3(signature = (device_id))]
    fn purge_c2d_async(&self, py: Python<'_>, device_id: &str) -> PyResult<Py<PyAny>> {
        self.purge_impl(py, true, device_id)
    }

    /// The stream of feedback batches (an iterator and async iterator of `FeedbackBatch`).
    /// Acknowledge each batch with `ack()`.
    fn feedback(&self) -> PyResult<PyFeedbackStream> {
        self.inner.open("ServiceClient.feedback")?;
        self.inner.feedback.start_pull(&self.inner.rt).py()?;
        Ok(PyFeedbackStream { inbox: self.inner.feedback.clone(), rt: self.inner.rt.clone() })
    }

    /// Opens a reader of `consumer_group` (its own connection). `start` applies to the
    /// group's first read: "checkpoint" (default), "earliest", "latest", a sequence number
    /// or a datetime; afterwards reading resumes at the checkpoint. Readers of one group
    /// share its partitions.
    #[pyo3(signature = (consumer_group="$Default", start=None))]
    fn events(&self, py: Python<'_>, consumer_group: &str, start: Option<&Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        self.events_impl(py, false, consumer_group, start)
    }

    /// `events` as an awaitable.
    #[pyo3(signature = (consumer_group="$Default", start=None))]
    fn events_async(&self, py: Python<'_>, consumer_group: &str, start: Option<&Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
        self.events_impl(py, true, consumer_group, start)
    }

    /// Closes the client; pending requests fail with ClosedError. Idempotent.
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
}

impl PyService {
    fn create_device_impl(
        &self,
        py: Python<'_>,
        asynchronous: bool,
        device_id: &str,
        primary_key: Option<String>,
        secondary_key: Option<String>,
        enabled: bool,
    ) -> PyResult<Py<PyAny>> {
        self.inner.open("ServiceClient.create_device")?;
        let req = CreateDevice {
            device_id: device_id.into(),
            primary_key,
            secondary_key,
            status: Some(if enabled { DeviceStatus::Enabled } else { DeviceStatus::Disabled }),
        };
        let c = self.inner.client.clone();
        run(py, &self.inner.rt, "ServiceClient.create_device", asynchronous, async move { c.create_device_with(req).await }, identity)
    }

    fn get_device_impl(&self, py: Python<'_>, asynchronous: bool, device_id: &str) -> PyResult<Py<PyAny>> {
        self.inner.open("ServiceClient.get_device")?;
        let (c, id) = (self.inner.client.clone(), device_id.to_string());
        run(py, &self.inner.rt, "ServiceClient.get_device", asynchronous, async move { c.get_device(&id).await }, identity)
    }

    fn list_devices_impl(&self, py: Python<'_>, asynchronous: bool) -> PyResult<Py<PyAny>> {
        self.inner.open("ServiceClient.list_devices")?;
        let c = self.inner.client.clone();
        run(py, &self.inner.rt, "ServiceClient.list_devices", asynchronous, async move { c.list_devices().await }, |py, list| {
            into_py(py, list.into_iter().map(PyIdentity::from).collect::<Vec<_>>())
        })
    }

    fn delete_device_impl(&self, py: Python<'_>, asynchronous: bool, device_id: &str) -> PyResult<Py<PyAny>> {
        self.inner.open("ServiceClient.delete_device")?;
        let (c, id) = (self.inner.client.clone(), device_id.to_string());
        run(py, &self.inner.rt, "ServiceClient.delete_device", asynchronous, async move { c.delete_device(&id).await }, none)
    }

    fn set_status(&self, py: Python<'_>, asynchronous: bool, device_id: &str, status: DeviceStatus) -> PyResult<Py<PyAny>> {
        self.inner.open("ServiceClient.set_device_status")?;
        let (c, id) = (self.inner.client.clone(), device_id.to_string());
        run(
            py,
            &self.inner.rt,
            "ServiceClient.set_device_status",
            asynchronous,
            async move { c.set_device_status(&id, status).await },
            identity,
        )
    }

    fn enable_device_impl(&self, py: Python<'_>, asynchronous: bool, device_id: &str) -> PyResult<Py<PyAny>> {
        self.set_status(py, asynchronous, device_id, DeviceStatus::Enabled)
    }

    fn disable_device_impl(&self, py: Python<'_>, asynchronous: bool, device_id: &str) -> PyResult<Py<PyAny>> {
        self.set_status(py, asynchronous, device_id, DeviceStatus::Disabled)
    }

    fn regenerate_keys_impl(&self, py: Python<'_>, asynchronous: bool, device_id: &str, which: &str) -> PyResult<Py<PyAny>> {
        if !["primary", "secondary", "both"].contains(&which) {
            return Err(invalid(format!("which '{which}' is not 'primary', 'secondary' or 'both'")));
        }
        self.inner.open("ServiceClient.regenerate_keys")?;
        let (c, id, which) = (self.inner.client.clone(), device_id.to_string(), which.to_string());
        run(
            py,
            &self.inner.rt,
            "ServiceClient.regenerate_keys",
            asynchronous,
            async move { c.regenerate_keys(&id, &which).await },
            identity,
        )
    }

    fn device_cs_impl(&self, py: Python<'_>, asynchronous: bool, device_id: &str) -> PyResult<Py<PyAny>> {
        self.inner.open("ServiceClient.device_connection_string")?;
        let (c, id) = (self.inner.client.clone(), device_id.to_string());
        let fut = async move {
            let d = c.get_device(&id).await?;
            Ok(c.device_connection_string(&d))
        };
        run(py, &self.inner.rt, "ServiceClient.device_connection_string", asynchronous, fut, into_py)
    }

    #[allow(clippy::too_many_arguments)]
    fn send_c2d_impl(
        &self,
        py: Python<'_>,
        asynchronous: bool,
        device_id: &str,
        body: &Bound<'_, PyAny>,
        ack: &str,
        ttl: Option<&Bound<'_, PyAny>>,
        properties: Option<&Bound<'_, PyAny>>,
        message_id: Option<String>,
        correlation_id: Option<String>,
        content_type: Option<String>,
        content_encoding: Option<String>,
        expiry: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let msg = Fields { body, properties, message_id, correlation_id, content_type, content_encoding, expiry }.message()?;
        let opts = C2dOptions { ack: ack_mode(ack)?, ttl: opt_duration(ttl, "ttl")? };
        self.inner.open("ServiceClient.send_c2d")?;
        let (c, id) = (self.inner.client.clone(), device_id.to_string());
        run(py, &self.inner.rt, "ServiceClient.send_c2d", asynchronous, async move { c.send_c2d_with(&id, msg, opts).await }, |py, r| {
            into_py(py, PyReceipt { message_id: r.message_id, sequence_number: r.sequence_number })
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn send_c2d_and_wait_impl(
        &self,
        py: Python<'_>,
        asynchronous: bool,
        device_id: &str,
        body: &Bound<'_, PyAny>,
        ack: &str,
        timeout: Option<&Bound<'_, PyAny>>,
        ttl: Option<&Bound<'_, PyAny>>,
        properties: Option<&Bound<'_, PyAny>>,
        message_id: Option<String>,
        correlation_id: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let mut msg =
            Fields { body, properties, message_id, correlation_id, content_type: None, content_encoding: None, expiry: None }.message()?;
        let mut opts = C2dOptions { ack: ack_mode(ack)?, ttl: opt_duration(ttl, "ttl")? };
        if opts.ack == AckMode::None {
            opts.ack = AckMode::Full;
        }
        let timeout = opt_duration(timeout, "timeout")?.unwrap_or(Duration::from_secs(60));
        self.inner.open("ServiceClient.send_c2d_and_wait")?;
        let (c, device) = (self.inner.client.clone(), device_id.to_string());
        let id = msg.message_id.get_or_insert_with(|| uuid::Uuid::new_v4().to_string()).clone();
        let fut = async move {
            let rx = c.await_outcome(&id)?;
            c.send_c2d_with(&device, msg, opts).await?;
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(_)) => Err(Error::closed("service client")),
                Err(_) => Err(Error::new(ErrorKind::Timeout, format!("no feedback for message '{id}' within {timeout:?}"))),
            }
        };
        run(py, &self.inner.rt, "ServiceClient.send_c2d_and_wait", asynchronous, fut, |py, r| into_py(py, PyFeedback::from(&r)))
    }

    fn purge_impl(&self, py: Python<'_>, asynchronous: bool, device_id: &str) -> PyResult<Py<PyAny>> {
        self.inner.open("ServiceClient.purge_c2d")?;
        let (c, id) = (self.inner.client.clone(), device_id.to_string());
        run(py, &self.inner.rt, "ServiceClient.purge_c2d", asynchronous, async move { c.purge_c2d(&id).await }, into_py)
    }

    fn events_impl(
        &self,
        py: Python<'_>,
        asynchronous: bool,
        consumer_group: &str,
        start: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let from = match start.filter(|s| !s.is_none()) {
            Some(s) => start_position(s)?,
            None => hubmsg_core::proto::StartPosition::Checkpoint,
        };
        if consumer_group.is_empty() {
            return Err(invalid("consumer_group is empty (the default group is '$Default')"));
        }
        self.inner.open("ServiceClient.events")?;
        let (c, group, rt) = (self.inner.client.clone(), consumer_group.to_string(), self.inner.rt.clone());
        let fut = async move {
            let stream = c.events(&group, from).await?;
            let (source, ctl) = EventsSource::new(stream);
            let inbox = Arc::new(Inbox::lazy("events", move || Ok(source)));
            let inner = Arc::new(EventsInner { inbox, ctl, life: Life::new("event stream"), rt });
            inner.inbox.start_pull(&inner.rt)?;
            Ok(PyEventStream { inner })
        };
        run(py, &self.inner.rt, "ServiceClient.events", asynchronous, fut, into_py)
    }

    fn close_impl(&self, py: Python<'_>, asynchronous: bool) -> PyResult<Py<PyAny>> {
        self.inner.rt.check("ServiceClient.close").py()?;
        let first = self.inner.life.close();
        let inner = self.inner.clone();
        run(
            py,
            &self.inner.rt,
            "ServiceClient.close",
            asynchronous,
            async move {
                if first {
                    inner.client.close().await;
                    if let Some(pump) = inner.feedback.stop_task() {
                        let _ = pump.await;
                    }
                }
                Ok(())
            },
            none,
        )
    }
}

/// Feedback batches (see `ServiceClient.feedback`): `for`, `async for`, or `next(timeout)`.
#[pyclass(module = "hubmsg", name = "FeedbackStream", frozen)]
pub(crate) struct PyFeedbackStream {
    inbox: Arc<Inbox<FeedbackSource>>,
    rt: Rt,
}

#[pymethods]
impl PyFeedbackStream {
    /// The next batch within `timeout` seconds (None: until one arrives), or None on timeout.
    /// Raises ClosedError once the client is closed.
    #[pyo3(signature = (timeout=None))]
    fn next(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>) -> PyResult<Option<PyFeedbackBatch>> {
        let timeout = opt_duration(timeout, "timeout")?;
        let next = self.inbox.next(&self.rt, timeout);
        Ok(wait(py, &self.rt, "FeedbackStream.next", next)?.py()?.map(PyFeedbackBatch::new))
    }

    /// `next` as an awaitable (cancel-safe).
    #[pyo3(signature = (timeout=None))]
    fn next_async<'py>(&self, py: Python<'py>, timeout: Option<&Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyAny>> {
        let timeout = opt_duration(timeout, "timeout")?;
        pull_awaitable(py, &self.rt, &self.inbox, timeout, false, |py, batch| into_py(py, PyFeedbackBatch::new(batch)), take_batch)
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<PyFeedbackBatch>> {
        let next = self.inbox.next(&self.rt, None);
        end_is_none(wait(py, &self.rt, "FeedbackStream.__next__", next)?).map(|b| b.map(PyFeedbackBatch::new))
    }

    fn __aiter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        pull_awaitable(py, &self.rt, &self.inbox, None, true, |py, batch| into_py(py, PyFeedbackBatch::new(batch)), take_batch)
    }
}

struct EventsInner {
    inbox: Arc<Inbox<EventsSource>>,
    ctl: EventsControl,
    life: Life,
    rt: Rt,
}

impl Drop for EventsInner {
    fn drop(&mut self) {
        let ctl = self.ctl.clone();
        self.life.close_in_background(&self.rt, async move { ctl.close().await });
    }
}

/// A consumer-group reader of D2C events: `for event in stream`, `async for`, or
/// `next(timeout)`. `ack()` each event once processed (unacknowledged ones are delivered again
/// after a reconnect); `checkpoint()` makes the acknowledged position durable. Close it (or use
/// it as a context manager) to leave the group.
#[pyclass(module = "hubmsg", name = "EventStream", frozen)]
pub(crate) struct PyEventStream {
    inner: Arc<EventsInner>,
}

impl PyEventStream {
    fn close_impl(&self, py: Python<'_>, asynchronous: bool) -> PyResult<Py<PyAny>> {
        self.inner.rt.check("EventStream.close").py()?;
        let first = self.inner.life.close();
        let inner = self.inner.clone();
        run(
            py,
            &self.inner.rt,
            "EventStream.close",
            asynchronous,
            async move {
                if first {
                    let _ = tokio::time::timeout(Duration::from_secs(10), inner.ctl.close()).await;
                    if let Some(pump) = inner.inbox.stop_task() {
                        let _ = pump.await;
                    }
                }
                Ok(())
            },
            none,
        )
    }
}

#[pymethods]
impl PyEventStream {
    /// The next event within `timeout` seconds (None: until one arrives), or None on timeout.
    /// Raises ClosedError once the stream is closed.
    #[pyo3(signature = (timeout=None))]
    fn next(&self, py: Python<'_>, timeout: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Py<PyEvent>>> {
        let timeout = opt_duration(timeout, "timeout")?;
        let next = self.inner.inbox.next(&self.inner.rt, timeout);
        wait(py, &self.inner.rt, "EventStream.next", next)?.py()?.map(|ev| PyEvent::wrap(py, ev)).transpose()
    }

    /// `next` as an awaitable (cancel-safe: a cancelled await loses no event).
    #[pyo3(signature = (timeout=None))]
    fn next_async<'py>(&self, py: Python<'py>, timeout: Option<&Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyAny>> {
        let timeout = opt_duration(timeout, "timeout")?;
        pull_awaitable(py, &self.inner.rt, &self.inner.inbox, timeout, false, |py, ev| Ok(PyEvent::wrap(py, ev)?.into_any()), take_event)
    }

    /// Asks the hub to persist the group's checkpoints (the acknowledged position) and waits
    /// until they are durable.
    fn checkpoint(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let ctl = self.inner.ctl.clone();
        run(py, &self.inner.rt, "EventStream.checkpoint", false, async move { ctl.checkpoint().await }, none)
    }

    /// `checkpoint` as an awaitable.
    fn checkpoint_async(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let ctl = self.inner.ctl.clone();
        run(py, &self.inner.rt, "EventStream.checkpoint", true, async move { ctl.checkpoint().await }, none)
    }

    /// Leaves the group (its partitions move to the other readers) and ends the stream.
    fn close(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.close_impl(py, false)
    }

    /// `close` as an awaitable.
    fn close_async(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.close_impl(py, true)
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyEvent>>> {
        let next = self.inner.inbox.next(&self.inner.rt, None);
        end_is_none(wait(py, &self.inner.rt, "EventStream.__next__", next)?)?.map(|ev| PyEvent::wrap(py, ev)).transpose()
    }

    fn __aiter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        pull_awaitable(py, &self.inner.rt, &self.inner.inbox, None, true, |py, ev| Ok(PyEvent::wrap(py, ev)?.into_any()), take_event)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
        self.close_impl(py, false).map(drop)
    }
}

/// One D2C event: the device's message with the hub's system properties, where it is in the
/// log (`partition`, `sequence_number`), and `ack()`.
#[pyclass(module = "hubmsg", name = "Event", extends = PyMessage, frozen)]
pub(crate) struct PyEvent {
    device_id: String,
    partition: u32,
    sequence_number: u64,
    enqueued_time_ms: u64,
    /// Taken back when the event goes back to its stream (a cancelled await).
    event: Mutex<Option<Event>>,
}

impl PyEvent {
    fn wrap(py: Python<'_>, event: Event) -> PyResult<Py<PyEvent>> {
        let base = PyMessage { msg: Message::clone(event.message()) };
        let ev = PyEvent {
            device_id: event.device_id().to_string(),
            partition: event.partition,
            sequence_number: event.sequence_number,
            enqueued_time_ms: event.enqueued_time_ms(),
            event: Mutex::new(Some(event)),
        };
        Py::new(py, PyClassInitializer::from(base).add_subclass(ev))
    }
}

/// The event inside a Python `Event`, to put back into its stream.
fn take_event(obj: &Bound<'_, PyAny>) -> Option<Event> {
    obj.cast::<PyEvent>().ok().and_then(|e| e.get().event.lock().take())
}

/// The batch inside a Python `FeedbackBatch`, to put back into its stream.
fn take_batch(obj: &Bound<'_, PyAny>) -> Option<FeedbackBatch> {
    obj.cast::<PyFeedbackBatch>().ok().and_then(|b| b.get().batch.lock().take())
}

#[pymethods]
impl PyEvent {
    /// The sending device.
    #[getter]
    fn device_id(&self) -> &str {
        &self.device_id
    }

    /// The partition it came from.
    #[getter]
    fn partition(&self) -> u32 {
        self.partition
    }

    /// Its sequence number within the partition.
    #[getter]
    fn sequence_number(&self) -> u64 {
        self.sequence_number
    }

    /// When the hub stored it, ms since the Unix epoch.
    #[getter]
    fn enqueued_time_ms(&self) -> u64 {
        self.enqueued_time_ms
    }

    /// When the hub stored it (an aware UTC datetime).
    #[getter]
    fn enqueued_time(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        datetime_from_ms(py, self.enqueued_time_ms)
    }

    /// Acknowledges it: the group's checkpoint moves past it once every earlier event of its
    /// partition is acknowledged too.
    fn ack(&self) {
        if let Some(e) = self.event.lock().as_ref() {
            e.ack();
        }
    }

    fn __repr__(&self) -> String {
        format!("<Event {} p{} #{}>", self.device_id, self.partition, self.sequence_number)
    }
}
