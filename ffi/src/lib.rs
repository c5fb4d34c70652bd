//! # hubmsg — the C ABI
//!
//! `libhubmsg.so` / `libhubmsg.a` and `include/hubmsg.h` (generated from this crate by
//! cbindgen). Conventions, for every function:
//!
//! - Objects are opaque heap handles: `hubmsg_<object>_new` / `_free`; `_free(NULL)` is a no-op.
//! - Fallible functions return `hubmsg_result`: 0 ok, negative errors, positive statuses
//!   (`HUBMSG_EMPTY`, `HUBMSG_PENDING`); `hubmsg_last_error_message()` says what went wrong on
//!   this thread. Out-pointers are NULL after a failure.
//! - Integers (not enums) for values C passes in; out-of-range values are
//!   `HUBMSG_INVALID_ARGUMENT`.
//! - No panic crosses the ABI, and none from a user callback enters the engine.
//! - Callbacks are `{context, call, drop}` structs; each client runs its callbacks on its own
//!   callback thread. Blocking functions refuse to run on a runtime thread (`HUBMSG_USAGE`).
//!
//! Modules: [`result`] (codes, last error, panic boundary), [`callback`] (C closures),
//! [`message`], [`device`], [`service`], [`hub`], [`log`]. The language-neutral parts — the
//! shared runtime, stream pumps, callback threads, the tracing bridge — are `hubmsg-bind`
//! (`bindings/common`), which the Python and Node packages use too.

#![allow(clippy::missing_safety_doc)] // every export's safety contract is the C API documentation

mod args;
pub mod callback;
pub mod device;
pub mod hub;
pub mod log;
pub mod message;
pub mod result;
pub mod service;

pub use device::*;
pub use hub::*;
pub use log::*;
pub use message::*;
pub use result::*;
pub use service::*;

/// The library version, e.g. `"0.1.0"`.
///
/// @return A static NUL-terminated string (never NULL; do not free).
#[no_mangle]
pub extern "C" fn hubmsg_version() -> *const std::ffi::c_char {
    const V: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    V.as_ptr().cast()
}
