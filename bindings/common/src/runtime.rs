//! The tokio runtime the binding clients run on, the rule for blocking calls, and `fork()`.
//!
//! One multi-threaded runtime per process (2 worker threads, or `HUBMSG_WORKER_THREADS`),
//! shared by every client of every binding in the process (a C device and a Python service in
//! one process share it). It is created when the first handle asks for it; every handle holds an
//! [`Rt`] and the runtime shuts down (threads joined, the store's writer threads too) when the
//! last one is dropped, so a C program that freed everything has no hubmsg threads left. A binding that wants the runtime to
//! live as long as the process (Python) keeps one [`Rt`] of its own.
//!
//! **fork()**: a child process inherits the runtime's memory but none of its threads, so using
//! it would hang. A runtime remembers the pid that created it: in a child, [`runtime`] starts a
//! fresh runtime for new clients, and a handle inherited from the parent fails every call with a
//! `Usage` error ([`Runtime::check`]) instead of hanging. The parent's runtime is never dropped
//! in the child (that would wait for threads that do not exist): it is leaked.
//!
//! Invariants: a blocking call never runs on a runtime thread ([`block_on`] refuses with `Usage`
//! instead of deadlocking or panicking); the last [`Rt`] is never dropped on a runtime thread
//! ([`dispose`] moves such a drop to a short-lived thread); a runtime is only ever driven or
//! dropped by the process that created it.

use std::future::Future;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, Weak};

use hubmsg_core::{Error, ErrorKind, Result};

/// The process runtime plus the pid of the process that created it.
pub struct Runtime {
    rt: ManuallyDrop<tokio::runtime::Runtime>,
    pid: u32,
}

/// A share of the process runtime. Keep it as the last field of a handle so it is dropped after
/// the client that runs on it.
pub type Rt = Arc<Runtime>;

static RUNTIME: Mutex<Weak<Runtime>> = Mutex::new(Weak::new());

impl Runtime {
    /// `Usage` when this runtime belongs to another process (the handle that holds it was
    /// inherited through `fork()`); `what` names the call for the message.
    pub fn check(&self, what: &str) -> Result<()> {
        if self.pid != std::process::id() {
            return Err(Error::new(
                ErrorKind::Usage,
                format!(
                    "{what}: this client was created in process {} and inherited through fork(); it cannot be used in process {}. \
                     Create clients after forking (in the child), or use the 'spawn' start method of multiprocessing",
                    self.pid,
                    std::process::id()
                ),
            ));
        }
        Ok(())
    }

    /// Whether this runtime belongs to the calling process.
    pub fn is_current_process(&self) -> bool {
        self.pid == std::process::id()
    }

    /// The pid of the process that created the runtime.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl std::ops::Deref for Runtime {
    type Target = tokio::runtime::Runtime;
    fn deref(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if self.is_current_process() {
            // SAFETY: dropped once, here, and never used again.
            unsafe { ManuallyDrop::drop(&mut self.rt) };
            // The clients that ran on it are gone, and with them their stores' logs: join the
            // store's threads too (a log opened later starts them again).
            let _ = hubmsg_core::store::release_threads(std::time::Duration::from_secs(2));
        }
        // In a forked child the runtime's threads do not exist: dropping it would wait for them
        // forever, so its memory is leaked instead.
    }
}

/// The process runtime, started if no handle of this process holds it.
pub fn runtime() -> Result<Rt> {
    let mut slot = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(rt) = slot.upgrade() {
        if rt.is_current_process() {
            return Ok(rt);
        }
        // Inherited through fork(): handles of the parent keep (and leak) it; new ones get a
        // runtime of this process.
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
    let rt = Arc::new(Runtime { rt: ManuallyDrop::new(rt), pid: std::process::id() });
    *slot = Arc::downgrade(&rt);
    Ok(rt)
}

/// Where a binding's tasks (stream pumps) run: this crate's process [`Runtime`] (C, Python), or
/// a runtime the host owns, by its [`tokio::runtime::Handle`] (Node borrows napi-rs's).
pub trait Spawner {
    /// The runtime's handle.
    fn handle(&self) -> &tokio::runtime::Handle;

    /// Whether the calling process may drive this runtime (false for a [`Runtime`] inherited
    /// through `fork()`; a host's runtime is always the host process's).
    fn owned_here(&self) -> bool {
        true
    }
}

impl Spawner for Runtime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.rt.handle()
    }
    fn owned_here(&self) -> bool {
        self.is_current_process()
    }
}

impl Spawner for tokio::runtime::Handle {
    fn handle(&self) -> &tokio::runtime::Handle {
        self
    }
}

impl<T: Spawner + ?Sized> Spawner for Arc<T> {
    fn handle(&self) -> &tokio::runtime::Handle {
        (**self).handle()
    }
    fn owned_here(&self) -> bool {
        (**self).owned_here()
    }
}

/// Whether the current thread is a tokio runtime thread (ours or the host application's).
pub fn on_runtime_thread() -> bool {
    tokio::runtime::Handle::try_current().is_ok()
}

/// `Usage` when the current thread must not block (a runtime thread).
pub fn ensure_may_block(what: &str) -> Result<()> {
    if on_runtime_thread() {
        return Err(Error::new(
            ErrorKind::Usage,
            format!("{what} blocks and was called on a runtime thread (e.g. from a log callback or an async task); call it from an application thread or a hubmsg client callback"),
        ));
    }
    Ok(())
}

/// Runs `f` to completion on `rt` from an application thread: `Usage` on a runtime thread or
/// with a runtime inherited through `fork()`.
pub fn block_on<F: Future>(rt: &Runtime, what: &str, f: F) -> Result<F::Output> {
    rt.check(what)?;
    ensure_may_block(what)?;
    Ok(rt.block_on(f))
}

/// Runs a teardown that may block or drop the last [`Rt`]: here, or on a new thread when called
/// on a runtime thread (where blocking or dropping a runtime is not allowed).
pub fn dispose(f: impl FnOnce() + Send + 'static) {
    if on_runtime_thread() {
        let _ = std::thread::Builder::new().name("hubmsg-free".into()).spawn(f);
    } else {
        f();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_share_one_runtime() {
        let a = runtime().unwrap();
        let b = runtime().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.pid(), std::process::id());
        assert_eq!(block_on(&a, "test", async { 7 }).unwrap(), 7);
    }

    #[test]
    fn blocking_on_a_runtime_thread_is_refused() {
        let rt = runtime().unwrap();
        let inner = rt.clone();
        let err = rt.block_on(async move { rt_task(inner).await }).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage);
        assert!(err.message().contains("runtime thread"), "{err}");
    }

    async fn rt_task(rt: Rt) -> Result<()> {
        let r = block_on(&rt, "nested", async {});
        dispose(move || drop(rt));
        r
    }

    #[test]
    fn a_runtime_of_another_process_is_refused_and_never_dropped() {
        // What a child sees after fork(): a runtime whose pid is not its own.
        let tokio_rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let foreign = Runtime { rt: ManuallyDrop::new(tokio_rt), pid: std::process::id().wrapping_add(1) };
        let err = block_on(&foreign, "hubmsg_device_send", async {}).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage);
        assert!(err.message().contains("fork()"), "{err}");
        drop(foreign); // leaked, not shut down
    }
}
