//! # hubmsg-node — the native addon of the `hubmsg` npm package
//!
//! Thin skins over `hubmsg-core` (no messaging logic here), on the shared binding layer
//! `hubmsg-bind` (stream pumps, log bridge, error-kind table, outcomes):
//!
//! - [`device`]: `DeviceClient`, `Delivery`, `C2dMessage`, `C2dStream`;
//! - [`service`]: `ServiceClient`, `EventStream`, `Event`, feedback, identities;
//! - [`hub`]: the embedded `Hub`;
//! - [`log`]: engine logs to a JS function;
//! - [`convert`]: JS values ↔ engine values; [`errors`]: engine errors as JS errors.
//!
//! Runtime: every engine task runs on napi-rs's tokio runtime (the Node package borrows it, as
//! STYLE says); async methods return Promises through `Env::spawn_future`, whose pending
//! Promises keep Node alive until they settle. Callbacks (`onMessage`, `onStatus`, the log
//! handler) are threadsafe functions called without blocking from the engine's tasks; closing
//! a client stops the tasks that hold them, which releases them, so a script that closes its
//! clients exits by itself. The JS layer (`index.js`) adds `err.code`, async iterators and the
//! `HUBMSG_LOG` switch; docs/node.md explains the design.

#![allow(clippy::new_without_default)]
// napi-derive registers exports only outside `cfg(test)`, so under `cargo clippy --all-targets`
// (the lib compiled as a test) code reached only from exports looks unused.
#![cfg_attr(test, allow(dead_code))]

use napi_derive::napi;

mod convert;
mod device;
mod errors;
mod hub;
mod log;
mod service;

/// The tokio runtime napi-rs runs async work on (the engine's tasks run there too). Its handle
/// is taken on the first call (always from a JS call, while the runtime runs) and kept: a
/// finalizer that runs while Node exits, after napi-rs shut the runtime down, can still call
/// this (a task spawned then is dropped at once, where asking napi-rs would panic).
pub(crate) fn runtime() -> tokio::runtime::Handle {
    static HANDLE: std::sync::OnceLock<tokio::runtime::Handle> = std::sync::OnceLock::new();
    HANDLE.get_or_init(|| napi::bindgen_prelude::within_runtime_if_available(tokio::runtime::Handle::current)).clone()
}

pub(crate) use hubmsg_bind::Life;

/// The package version (the crate's).
#[napi]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// Every error code a hubmsg error can carry in `err.code` (`HUBMSG_QUEUE_FULL`, …), from the
/// engine's kind table, in its order; the same names as the C result codes.
#[napi]
pub fn error_codes() -> Vec<String> {
    hubmsg_bind::errors::table().into_iter().map(|k| k.c_name).collect()
}

/// Default count of a `nextBatch`.
const BATCH_DEFAULT: usize = 100;
/// Largest count of a `nextBatch`.
const BATCH_MAX: usize = 10_000;
/// Byte bound of a `nextBatch` (bodies; one larger item still comes alone).
const BATCH_MAX_BYTES: usize = 4 << 20;

/// The bounds of a `nextBatch(max)`: `max` items (default 100, 1 – 10,000) and 4 MiB of bodies.
pub(crate) fn batch_limits<T>(max: Option<f64>, size: fn(&T) -> usize) -> napi::Result<hubmsg_bind::inbox::BatchLimits<T>> {
    let max_items = match max {
        None => BATCH_DEFAULT,
        Some(m) if m.fract() == 0.0 && (1.0..=BATCH_MAX as f64).contains(&m) => m as usize,
        Some(m) => return Err(errors::invalid(format!("max {m} is not a whole number from 1 to {BATCH_MAX}"))),
    };
    Ok(hubmsg_bind::inbox::BatchLimits { max_items, max_bytes: BATCH_MAX_BYTES, size })
}

/// The end of a stream (`Closed`) as `null`, the end of an iteration.
pub(crate) fn end_is_none<T>(r: hubmsg_core::Result<Option<T>>) -> napi::Result<Option<T>> {
    match r {
        Err(e) if e.kind() == hubmsg_core::ErrorKind::Closed => Ok(None),
        r => errors::IntoJs::js(r),
    }
}
