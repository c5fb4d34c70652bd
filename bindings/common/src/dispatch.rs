//! The thread user callbacks run on, and the panic boundary around user code.
//!
//! Every client that has callbacks owns one callback thread (a [`Dispatcher`]): the engine's
//! tasks never call user code, they post jobs to it. So callbacks of one client run one at a
//! time, in order, never on a runtime thread, and may call any hubmsg function — including
//! blocking ones and the client's own close/free.
//!
//! Invariants: after [`Dispatcher::shutdown`] no further job runs; when it is called from another
//! thread it returns only after the callback thread has finished (so every reference a job held
//! is gone once a client's free returns); called from the callback thread itself (a client freed
//! inside its own callback) it returns at once and the thread ends after the current job.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use hubmsg_core::{Error, ErrorKind, Result};
use parking_lot::Mutex;

/// The text of a caught panic payload.
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs user code: a panic that unwinds out of it (a Rust callback, or a foreign exception the
/// platform turns into one) is caught and logged instead of crossing into the engine.
pub fn call_user(what: &str, f: impl FnOnce()) {
    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        tracing::error!(callback = what, panic = %panic_text(&*p), "a user callback panicked; the panic was caught and ignored");
    }
}

type Job = Box<dyn FnOnce() + Send>;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The id of the dispatcher whose callback thread this is (0 on other threads). Compared
    /// instead of `std::thread::current()`, which would allocate a handle for the application's
    /// main thread that is never freed.
    static CURRENT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A client's callback thread, started on demand.
pub struct Dispatcher {
    id: u64,
    name: &'static str,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    closed: Arc<AtomicBool>,
}

impl Dispatcher {
    /// A dispatcher whose thread (started on demand) is called `name`.
    pub fn new(name: &'static str) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name,
            tx: Mutex::new(None),
            thread: Mutex::new(None),
            closed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Starts the thread if needed (so registration errors show up at registration).
    pub fn start(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::closed("client"));
        }
        let mut tx = self.tx.lock();
        if tx.is_some() {
            return Ok(());
        }
        let (sender, rx) = mpsc::channel::<Job>();
        let closed = self.closed.clone();
        let id = self.id;
        let handle = std::thread::Builder::new()
            .name(self.name.into())
            .spawn(move || {
                CURRENT.with(|c| c.set(id));
                while let Ok(job) = rx.recv() {
                    if closed.load(Ordering::SeqCst) {
                        drop(job);
                    } else {
                        call_user("callback job", job);
                    }
                }
            })
            .map_err(|e| Error::new(ErrorKind::Internal, format!("cannot start the callback thread: {e}")))?;
        *self.thread.lock() = Some(handle);
        *tx = Some(sender);
        Ok(())
    }

    /// Queues `job` for the callback thread; it is dropped unrun once the dispatcher is closed
    /// (or when it was never started).
    pub fn post(&self, job: impl FnOnce() + Send + 'static) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        if let Some(tx) = self.tx.lock().as_ref() {
            let _ = tx.send(Box::new(job));
        }
    }

    /// Waits until every job queued before this call has run (or been dropped by a close), at most
    /// `timeout`; `false` when it timed out. Returns at once on the callback thread itself
    /// (which cannot wait for its own queue) and when the dispatcher is closed or not started.
    pub fn barrier(&self, timeout: std::time::Duration) -> bool {
        if self.is_current() {
            return true;
        }
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        self.post(move || {
            let _ = tx.send(());
        });
        // A job dropped unrun drops its sender too: the wait ends with Disconnected.
        !matches!(rx.recv_timeout(timeout), Err(std::sync::mpsc::RecvTimeoutError::Timeout))
    }

    /// Whether the calling thread is this dispatcher's callback thread.
    pub fn is_current(&self) -> bool {
        CURRENT.with(|c| c.get()) == self.id
    }

    /// Stops calling callbacks (jobs already queued are dropped unrun).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Stops calling callbacks; waits for the thread unless called from it (see the module doc).
    pub fn shutdown(&self) {
        self.close();
        drop(self.tx.lock().take());
        let handle = self.thread.lock().take();
        if let Some(h) = handle {
            if !self.is_current() {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_in_order_on_one_thread_and_stop_at_shutdown() {
        let d = Dispatcher::new("test-cb");
        d.start().unwrap();
        let (tx, rx) = mpsc::channel();
        for i in 0..5 {
            let tx = tx.clone();
            d.post(move || tx.send((i, std::thread::current().name().map(String::from))).unwrap());
        }
        let got: Vec<_> = (0..5).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        assert!(got.iter().all(|g| g.1.as_deref() == Some("test-cb")));
        d.post(|| panic!("a panicking job is contained"));
        d.shutdown();
        let tx2 = tx.clone();
        d.post(move || tx2.send((99, None)).unwrap());
        drop(tx);
        assert!(rx.recv().is_err(), "a job ran after shutdown");
        assert_eq!(d.start().unwrap_err().kind(), ErrorKind::Closed);
    }
}
