//! Python exceptions: `HubmsgError` and one subclass per core `ErrorKind`, generated at import
//! from `ErrorKind::ALL` through `hubmsg_bind::errors` (so a kind added to core gets its class
//! without touching this file), and the one conversion from `hubmsg_core::Error`.
//!
//! Each class has a class attribute `kind` (the stable code, `"QUEUE_FULL"`). The timeout class
//! also derives from the built-in `TimeoutError`, the invalid-argument class from `ValueError`.

use hubmsg_core::{Error, ErrorKind};
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

pyo3::create_exception!(
    hubmsg,
    HubmsgError,
    PyException,
    "Base class of every hubmsg error. `kind` is the stable error code (e.g. \"QUEUE_FULL\"); str(e) says what happened and what to do."
);

/// The generated classes, in `ErrorKind::ALL` order.
static CLASSES: PyOnceLock<Vec<(ErrorKind, Py<PyType>)>> = PyOnceLock::new();

fn classes(py: Python<'_>) -> PyResult<&Vec<(ErrorKind, Py<PyType>)>> {
    CLASSES.get_or_try_init(py, || {
        let builtins = py.import("builtins")?;
        let type_ = builtins.getattr("type")?;
        let base = py.get_type::<HubmsgError>();
        base.setattr("kind", "INTERNAL")?;
        let mut out = Vec::new();
        for names in hubmsg_bind::errors::table() {
            let mut bases = vec![base.clone().into_any()];
            if let Some(b) = names.python_builtin_base {
                bases.push(builtins.getattr(b)?);
            }
            let dict = PyDict::new(py);
            dict.set_item("kind", names.code)?;
            dict.set_item("__module__", "hubmsg")?;
            dict.set_item("__doc__", doc(names.kind))?;
            let cls = type_.call1((names.python_class.as_str(), PyTuple::new(py, bases)?, dict))?;
            out.push((names.kind, cls.cast_into::<PyType>()?.unbind()));
        }
        Ok(out)
    })
}

/// The docstring of a kind's class.
fn doc(kind: ErrorKind) -> String {
    let what = match kind {
        ErrorKind::InvalidArgument => "A value passed in is malformed or out of range (connection string, property, TTL, option).",
        ErrorKind::Unauthorized => "Credentials were refused: wrong key, expired or mis-scoped token, disabled device.",
        ErrorKind::NotFound => "The named device, policy or message does not exist.",
        ErrorKind::AlreadyExists => "The thing to create already exists.",
        ErrorKind::QueueFull => "A bounded queue is full (the device outbox with overflow='reject', a device's C2D queue of 50).",
        ErrorKind::MessageTooLarge => "A message is larger than allowed (256 KB D2C, 64 KB C2D, or the outbox byte bound).",
        ErrorKind::Timeout => "An operation did not finish within its time limit; nothing is lost and it may still complete.",
        ErrorKind::Disconnected => "The connection is down (transient: the engine retries).",
        ErrorKind::Storage => "The durable store failed: I/O error, full disk, corrupt file, or a directory locked by another process.",
        ErrorKind::Protocol => "The peer broke the protocol or sent something that cannot be parsed.",
        ErrorKind::Closed => "The client, stream or hub was closed.",
        ErrorKind::Expired => "The message expired before it could be delivered.",
        ErrorKind::LockLost => "The message lock was lost before the message was settled.",
        ErrorKind::Usage => "The API was used in a way it does not support (a message settled twice, a client inherited through fork()).",
        ErrorKind::Internal => "A bug in hubmsg; please report it with the message.",
        _ => "An error of a kind this hubmsg version does not describe.",
    };
    format!("{what} kind = \"{}\".", kind.code())
}

/// Adds `HubmsgError`, every kind's class and `ERROR_CLASSES` (code → class) to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("HubmsgError", py.get_type::<HubmsgError>())?;
    let by_code = PyDict::new(py);
    for (kind, cls) in classes(py)? {
        let cls = cls.bind(py);
        m.add(cls.name()?.to_string(), cls)?;
        by_code.set_item(kind.code(), cls)?;
    }
    m.add("ERROR_CLASSES", by_code)?;
    Ok(())
}

/// The Python exception for a core error: an instance of its kind's class with the message.
pub(crate) fn to_py(e: Error) -> PyErr {
    Python::attach(|py| match classes(py) {
        Ok(list) => {
            let kind = e.kind();
            match list.iter().find(|(k, _)| *k == kind) {
                Some((_, cls)) => PyErr::from_type(cls.bind(py).clone(), e.message().to_string()),
                None => HubmsgError::new_err(format!("{}: {}", kind.code(), e.message())),
            }
        }
        Err(err) => err,
    })
}

/// A `Usage` error as a Python exception.
pub(crate) fn usage(message: impl Into<String>) -> PyErr {
    to_py(Error::new(ErrorKind::Usage, message))
}

/// An `InvalidArgument` error as a Python exception (a `ValueError` too).
pub(crate) fn invalid(message: impl Into<String>) -> PyErr {
    to_py(Error::invalid(message))
}

/// `?` on core results inside `PyResult` functions.
pub(crate) trait IntoPyResult<T> {
    /// The value, or the error as its Python exception.
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for Result<T, Error> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}
