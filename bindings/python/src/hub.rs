//! `hubmsg.Hub`: a full hubmsg hub inside the Python process (for tests, demos and gateways),
//! on 127.0.0.1 port 0 by default, so a test suite needs no external process.

use std::net::SocketAddr;
use std::path::PathBuf;

use hubmsg_bind::Rt;
use hubmsg_core::hub::{Hub, HubConfig};
use hubmsg_core::store::Durability;
use parking_lot::Mutex;
use pyo3::prelude::*;

use crate::aio::{runtime, wait};
use crate::convert::opt_duration;
use crate::errors::{invalid, IntoPyResult};

/// An embedded hub. Starts serving when created; `shutdown()` (or leaving a `with` block)
/// stops it. Thread-safe.
#[pyclass(module = "hubmsg", name = "Hub", frozen)]
pub(crate) struct PyHub {
    hub: Mutex<Option<Hub>>,
    address: String,
    host_name: String,
    service_cs: String,
    data_dir: PathBuf,
    rt: Rt,
}

impl PyHub {
    fn with_hub<T>(&self, f: impl FnOnce(&Hub) -> PyResult<T>) -> PyResult<T> {
        self.rt.check("Hub").py()?;
        match self.hub.lock().as_ref() {
            Some(h) => f(h),
            None => Err(hubmsg_core::Error::closed("hub")).py(),
        }
    }
}

#[pymethods]
impl PyHub {
    /// Starts a hub keeping its data in `data_dir` (created if missing, reopened if it exists),
    /// listening for plain MQTT on `listen` (`ip:port`, port 0 picks a free one).
    /// `feedback_interval`: seconds a C2D feedback record may wait before its batch is sent
    /// (IoT Hub: 15); `lock_timeout`: seconds a delivered C2D message stays locked (60);
    /// `durability`: "always", "interval", "interval:250ms" or "never"; `partitions`: D2C
    /// partitions of a new data directory.
    #[new]
    #[pyo3(signature = (data_dir, *, listen="127.0.0.1:0", feedback_interval=None, lock_timeout=None, durability=None, partitions=4))]
    fn new(
        py: Python<'_>,
        data_dir: PathBuf,
        listen: &str,
        feedback_interval: Option<&Bound<'_, PyAny>>,
        lock_timeout: Option<&Bound<'_, PyAny>>,
        durability: Option<&str>,
        partitions: u32,
    ) -> PyResult<PyHub> {
        let addr: SocketAddr = listen.parse().map_err(|_| invalid(format!("listen '{listen}' is not ip:port (e.g. 127.0.0.1:0)")))?;
        let mut cfg = HubConfig::new(&data_dir);
        cfg.mqtt = Some(addr);
        cfg.host_name = addr.ip().to_string();
        cfg.partitions = partitions;
        if let Some(f) = opt_duration(feedback_interval, "feedback_interval")? {
            cfg.feedback_interval = f.max(std::time::Duration::from_millis(1));
        }
        if let Some(l) = opt_duration(lock_timeout, "lock_timeout")? {
            cfg.c2d.lock = l.max(std::time::Duration::from_millis(100));
        }
        if let Some(d) = durability {
            cfg.durability = d.parse::<Durability>().py()?;
        }
        let rt = runtime()?;
        let hub = wait(py, &rt, "Hub()", Hub::start(cfg))?.py()?;
        let address = hub.mqtt_addr().map(|a| a.to_string()).unwrap_or_default();
        Ok(PyHub {
            address,
            host_name: hub.host_name(),
            service_cs: hub.service_connection_string(),
            hub: Mutex::new(Some(hub)),
            data_dir,
            rt,
        })
    }

    /// The bound listen address, `ip:port`.
    #[getter]
    fn address(&self) -> &str {
        &self.address
    }

    /// The bound port.
    #[getter]
    fn port(&self) -> u16 {
        self.address.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0)
    }

    /// `HostName` of connection strings for this hub (`127.0.0.1:PORT`).
    #[getter]
    fn host_name(&self) -> &str {
        &self.host_name
    }

    /// The data directory.
    #[getter]
    fn data_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }

    /// The connection string of the hub's `iothubowner` policy (for `ServiceClient`).
    #[getter]
    fn service_connection_string(&self) -> &str {
        &self.service_cs
    }

    /// Registers a device with generated keys (durable on return) and returns its connection
    /// string. Raises AlreadyExistsError.
    fn create_device(&self, py: Python<'_>, device_id: &str) -> PyResult<String> {
        let created = self.with_hub(|h| {
            let fut = h.create_device(device_id);
            // The hub's registry write is short; the GIL is released while it runs.
            wait(py, &self.rt, "Hub.create_device", fut)?.py()
        })?;
        self.device_connection_string(py, &created.device_id)
    }

    /// The connection string of a registered device (primary key). Raises NotFoundError.
    fn device_connection_string(&self, py: Python<'_>, device_id: &str) -> PyResult<String> {
        self.with_hub(|h| wait(py, &self.rt, "Hub.device_connection_string", h.device_connection_string(device_id))?.py())
    }

    /// Whether the hub is running.
    #[getter]
    fn running(&self) -> bool {
        self.hub.lock().is_some()
    }

    /// Stops the hub: closes every connection, persists checkpoints and closes the stores.
    /// Idempotent.
    fn shutdown(&self, py: Python<'_>) -> PyResult<()> {
        self.rt.check("Hub.shutdown").py()?;
        let hub = self.hub.lock().take();
        if let Some(h) = hub {
            wait(py, &self.rt, "Hub.shutdown", h.shutdown())?.py()?;
        }
        Ok(())
    }

    /// `shutdown()`.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.shutdown(py)
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
        self.shutdown(py)
    }

    fn __repr__(&self) -> String {
        format!("<Hub {} {}>", self.address, if self.running() { "running" } else { "stopped" })
    }
}

impl Drop for PyHub {
    fn drop(&mut self) {
        if let Some(h) = self.hub.get_mut().take() {
            if self.rt.is_current_process() {
                self.rt.spawn(async move {
                    let _ = h.shutdown().await;
                });
            } else {
                std::mem::forget(h);
            }
        }
    }
}
