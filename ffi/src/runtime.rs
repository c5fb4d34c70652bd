//! The tokio runtime the C clients run on, and the rule for blocking calls.
//!
//! One multi-threaded runtime per process (2 worker threads, or `HUBMSG_WORKER_THREADS`),
//! created when the first client, stream or hub is created and shut down (threads joined) when
//! the last one is freed; every handle holds an [`Rt`]. So a process that freed everything has
//! no hubmsg threads left, and clean valgrind runs need no suppressions for the runtime.
//!
//! Invariants: a blocking export never runs on a runtime thread ([`block_on`] refuses with
//! `HUBMSG_USAGE` instead of deadlocking or panicking); the last [`Rt`] is never dropped on a
//! runtime thread ([`dispose`] moves such a drop to a short-lived thread).

use std::future::Future;
use std::sync::{Arc, Mutex, Weak};

use hubmsg_core::{Error, ErrorKind, Result};
use tokio::runtime::Runtime;

static RUNTIME: Mutex<Weak<Runtime>> = Mutex::new(Weak::new());

/// A share of the process runtime. Keep it as the last field of a handle so it is dropped after
/// the client that runs on it.
pub(crate) type Rt = Arc<Runtime>;

/// The process runtime, started if no handle holds it.
pub(crate) fn runtime() -> Result<Rt> {
    let mut slot = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(rt) = slot.upgrade() {
        return Ok(rt);
    }
    let workers =
        std::env::var("HUBMSG_WORKER_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|n| (1..=64).contains(n)).unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .max_blocking_threads(16)
        .thread_name("hubmsg-rt")
        .enable_all()
        .build()
        .map_err(|e| Error::new(ErrorKind::Internal, format!("cannot start the hubmsg runtime: {e}")))?;
    let rt = Arc::new(rt);
    *slot = Arc::downgrade(&rt);
    Ok(rt)
}

/// Whether the current thread is a tokio runtime thread (ours or the host application's).
pub(crate) fn on_runtime_thread() -> bool {
    tokio::runtime::Handle::try_current().is_ok()
}

/// `Usage` when the current thread must not block (a runtime thread).
pub(crate) fn ensure_may_block(what: &str) -> Result<()> {
    if on_runtime_thread() {
        return Err(Error::new(
            ErrorKind::Usage,
            format!("{what} blocks and was called on a runtime thread (e.g. from a log callback or an async task); call it from an application thread or a hubmsg client callback"),
        ));
    }
    Ok(())
}

/// Runs `f` to completion on `rt` from an application thread.
pub(crate) fn block_on<F: Future>(rt: &Runtime, what: &str, f: F) -> Result<F::Output> {
    ensure_may_block(what)?;
    Ok(rt.block_on(f))
}

/// Runs a teardown that may block or drop the last [`Rt`]: here, or on a new thread when called
/// on a runtime thread (where blocking or dropping a runtime is not allowed).
pub(crate) fn dispose(f: impl FnOnce() + Send + 'static) {
    if on_runtime_thread() {
        let _ = std::thread::Builder::new().name("hubmsg-free".into()).spawn(f);
    } else {
        f();
    }
}
