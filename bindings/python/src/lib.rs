//! # hubmsg._hubmsg — the native module of the `hubmsg` Python package
//!
//! Thin skins over `hubmsg-core` (no messaging logic here) using the shared binding layer
//! `hubmsg-bind` (runtime, stream pumps, log bridge, error-kind table):
//!
//! - [`device`]: `DeviceClient`, `Delivery`, `C2dMessage`, `Status`, `DeviceStats`;
//! - [`service`]: `ServiceClient`, `EventStream`, `Event`, feedback, identities;
//! - [`hub`]: the embedded `Hub`;
//! - [`message`]: `Message`, the base of received messages;
//! - [`errors`]: `HubmsgError` and a class per core error kind;
//! - [`aio`]: blocking waits (GIL released, Ctrl-C) and asyncio awaitables;
//! - [`convert`]: Python values ↔ engine values; [`log`]: engine logs → `logging`.
//!
//! The pure-Python parts (`hubmsg/__init__.py`, `hubmsg/aio.py`, the stubs) are in
//! `bindings/python/python/hubmsg`; docs/python.md explains the design.

use pyo3::prelude::*;

mod aio;
mod convert;
mod device;
mod errors;
mod hub;
mod log;
mod message;
mod service;

#[pymodule]
fn _hubmsg(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    m.add_class::<message::PyMessage>()?;
    m.add_class::<device::PyRetryPolicy>()?;
    m.add_class::<device::PyDevice>()?;
    m.add_class::<device::PyDelivery>()?;
    m.add_class::<device::PyC2d>()?;
    m.add_class::<device::PyC2dStream>()?;
    m.add_class::<device::PyStatus>()?;
    m.add_class::<device::PyStatusStream>()?;
    m.add_class::<device::PyDeviceStats>()?;
    m.add_class::<service::PyService>()?;
    m.add_class::<service::PyIdentity>()?;
    m.add_class::<service::PyReceipt>()?;
    m.add_class::<service::PyFeedback>()?;
    m.add_class::<service::PyFeedbackBatch>()?;
    m.add_class::<service::PyFeedbackStream>()?;
    m.add_class::<service::PyEventStream>()?;
    m.add_class::<service::PyEvent>()?;
    m.add_class::<hub::PyHub>()?;
    m.add_function(wrap_pyfunction!(aio::_close_gate, m)?)?;
    log::install()?;
    Ok(())
}
