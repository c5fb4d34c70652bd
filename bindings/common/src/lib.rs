//! # hubmsg-bind — what every hubmsg binding shares
//!
//! The C library (`ffi/`), the Python package (`bindings/python`) and the Node package
//! (`bindings/node`) are thin
//! skins over `hubmsg-core`. The problems they share are solved once, here, without any
//! language's types:
//!
//! - [`runtime`]: the one tokio runtime per process, its lifetime, the rule that blocking calls
//!   never run on a runtime thread, and what happens after `fork()`; [`Spawner`] lets a binding
//!   whose host owns a runtime (Node: napi-rs's) run the same pumps there;
//! - [`inbox`]: one incoming core stream (C2D messages, feedback batches, D2C events) consumed by
//!   pull (blocking or async) or by a callback, pumped by one task;
//! - [`dispatch`]: the per-client callback thread user code runs on, and the panic boundary
//!   around user code;
//! - [`log`]: the `tracing` subscriber that forwards engine logs to a binding's sink (C callback,
//!   Python `logging`, a JS function);
//! - [`errors`]: the error-kind table as each language names it, generated from
//!   [`hubmsg_core::ErrorKind::ALL`];
//! - [`outcome`]: one sent message's outcome, to poll or wait for with a timeout;
//! - [`life`]: a handle's open/closed state, and the background close of a dropped one;
//! - [`sources`]: the core streams (C2D, feedback, events with checkpoint/close) as pump sources.

pub mod dispatch;
pub mod errors;
pub mod inbox;
pub mod life;
pub mod log;
pub mod outcome;
pub mod runtime;
pub mod sources;

pub use dispatch::{call_user, panic_text, Dispatcher};
pub use inbox::{Inbox, Source};
pub use life::Life;
pub use outcome::{outcome_name, OutcomeBatch, SharedOutcome};
pub use runtime::{block_on, dispose, ensure_may_block, on_runtime_thread, runtime, Rt, Runtime, Spawner};
