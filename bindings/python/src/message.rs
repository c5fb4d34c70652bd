//! `hubmsg.Message`: a message to send (in `send_many`) and the base class of received ones
//! (`C2dMessage`, `Event`), with read-only views of every field.

use hubmsg_core::Message;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::convert::{datetime_from_ms, pairs_dict, Fields};

/// A message: body, system properties and application properties. Build one to send with
/// `DeviceClient.send_many`; received messages (`C2dMessage`, `Event`) are Messages too.
#[pyclass(subclass, module = "hubmsg", name = "Message", frozen)]
pub(crate) struct PyMessage {
    pub(crate) msg: Message,
}

#[pymethods]
impl PyMessage {
    /// A message with `body` (bytes, bytearray, memoryview or str) and optional properties
    /// (a mapping of str to str), ids, content type and encoding, and expiry (a datetime, or a
    /// time to live in seconds or as a timedelta).
    #[new]
    #[pyo3(signature = (body, *, properties=None, message_id=None, correlation_id=None, content_type=None, content_encoding=None, expiry=None))]
    fn new(
        body: &Bound<'_, PyAny>,
        properties: Option<&Bound<'_, PyAny>>,
        message_id: Option<String>,
        correlation_id: Option<String>,
        content_type: Option<String>,
        content_encoding: Option<String>,
        expiry: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<PyMessage> {
        let msg = Fields { body, properties, message_id, correlation_id, content_type, content_encoding, expiry }.message()?;
        Ok(PyMessage { msg })
    }

    /// The payload.
    #[getter]
    fn body<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.msg.body)
    }

    /// `message-id` (`None` when unset; the device client generates one when sending).
    #[getter]
    fn message_id(&self) -> Option<&str> {
        self.msg.message_id.as_deref()
    }

    /// `correlation-id`.
    #[getter]
    fn correlation_id(&self) -> Option<&str> {
        self.msg.correlation_id.as_deref()
    }

    /// `content-type`, e.g. `application/json`.
    #[getter]
    fn content_type(&self) -> Option<&str> {
        self.msg.content_type.as_deref()
    }

    /// `content-encoding`, e.g. `utf-8`.
    #[getter]
    fn content_encoding(&self) -> Option<&str> {
        self.msg.content_encoding.as_deref()
    }

    /// `user-id`.
    #[getter]
    fn user_id(&self) -> Option<&str> {
        self.msg.user_id.as_deref()
    }

    /// The application properties (a new dict on each access).
    #[getter]
    fn properties<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        pairs_dict(py, &self.msg.properties)
    }

    /// The properties the hub stamped (`iothub-connection-device-id`, `iothub-enqueuedtime`,
    /// `iothub-ack`, `$.to`, …), a new dict on each access.
    #[getter]
    fn system_properties<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        pairs_dict(py, &self.msg.system)
    }

    /// When the sender created it (an aware UTC datetime), if known.
    #[getter]
    fn creation_time(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.msg.creation_time_ms.map(|ms| datetime_from_ms(py, ms)).transpose()
    }

    /// When it expires (an aware UTC datetime), if it does.
    #[getter]
    fn expiry_time(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.msg.expiry_time_ms.map(|ms| datetime_from_ms(py, ms)).transpose()
    }

    fn __repr__(&self) -> String {
        format!(
            "<{} id={:?} {} bytes, {} properties>",
            "Message",
            self.msg.message_id.as_deref().unwrap_or(""),
            self.msg.body.len(),
            self.msg.properties.len()
        )
    }
}
