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
//! Modules: [`result`] (codes, last error, panic boundary), [`runtime`] (the shared runtime),
//! [`callback`] (closures and callback threads), [`message`], [`device`], [`service`], [`hub`],
//! [`log`].

#![allow(clippy::missing_safety_doc)] // every export's safety contract is the C API documentation

mod args;
pub mod callback;
pub mod device;
mod inbox;
pub mod message;
pub mod result;
pub mod runtime;

pub use device::*;
pub use message::*;
pub use result::*;
