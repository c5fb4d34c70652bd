//! User callbacks (`{context, call, drop}`) and the thread they run on.
//!
//! Every client that has callbacks owns one callback thread (a [`Dispatcher`]): the engine's
//! tasks never call user code, they post jobs to it. So callbacks of one client run one at a
//! time, in order, never on a runtime thread, and may call any hubmsg function — including
//! blocking ones and the client's own `_free`.
//!
//! Invariants: after [`Dispatcher::shutdown`] no further callback is called; when it is called
//! from another thread it returns only after the callback thread has finished (so every `drop`
//! of that client has run once the client's `_free` returns); called from the callback thread
//! itself (a client freed inside its own callback) it returns at once and the thread ends after
//! the current callback.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use hubmsg_core::{Error, ErrorKind, Result};
use parking_lot::Mutex;

use crate::result::call_user;

/// The `drop` member of every callback struct.
pub(crate) type DropFn = unsafe extern "C-unwind" fn(context: *mut c_void);

/// A callback taken over from C: its `context` is now owned by hubmsg, and `drop` runs exactly
/// once, when the last reference goes away.
pub(crate) struct Closure<F: Copy> {
    context: *mut c_void,
    call: F,
    drop: Option<DropFn>,
    what: &'static str,
}

// SAFETY: the C API documents that a callback's context is used from the client's callback
// thread (or, for the log callback, from any thread); C promises it may be.
unsafe impl<F: Copy> Send for Closure<F> {}
// SAFETY: as above; hubmsg never calls one closure from two threads at once except the log
// callback, whose contract says so.
unsafe impl<F: Copy> Sync for Closure<F> {}

impl<F: Copy> Closure<F> {
    /// Takes over a callback struct's members; `call` must not be NULL.
    pub(crate) fn new(what: &'static str, context: *mut c_void, call: Option<F>, drop: Option<DropFn>) -> Result<Arc<Closure<F>>> {
        let call = call.ok_or_else(|| Error::invalid(format!("{what}.call is NULL")))?;
        Ok(Arc::new(Closure { context, call, drop, what }))
    }

    /// Calls the user function (`f` gets the function and the context); a panic is caught.
    pub(crate) fn invoke(&self, f: impl FnOnce(F, *mut c_void)) {
        call_user(self.what, || f(self.call, self.context));
    }

    /// Lends `value` to the user function for the duration of the call (`f` gets the function,
    /// the context and a pointer to it) and returns it afterwards.
    pub(crate) fn lend<U>(&self, mut value: U, f: impl FnOnce(F, *mut c_void, *mut U)) -> U {
        let p: *mut U = &mut value;
        self.invoke(|call, ctx| f(call, ctx, p));
        value
    }
}

impl<F: Copy> Drop for Closure<F> {
    fn drop(&mut self) {
        if let Some(d) = self.drop {
            let ctx = self.context;
            // SAFETY: the user's own drop function with the user's own context, called once.
            call_user(self.what, || unsafe { d(ctx) });
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

thread_local! {
    /// The id of the dispatcher whose callback thread this is (0 on other threads). Compared
    /// instead of `std::thread::current()`, which would allocate a handle for the application's
    /// main thread that is never freed.
    static CURRENT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A client's callback thread, started by the first job.
pub(crate) struct Dispatcher {
    id: u64,
    name: &'static str,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    closed: Arc<AtomicBool>,
}

impl Dispatcher {
    /// A dispatcher whose thread (started on demand) is called `name`.
    pub(crate) fn new(name: &'static str) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name,
            tx: Mutex::new(None),
            thread: Mutex::new(None),
            closed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Starts the thread if needed (so registration errors show up at registration).
    pub(crate) fn start(&self) -> Result<()> {
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

    /// Queues `job` for the callback thread; it is dropped unrun once the dispatcher is shut down.
    pub(crate) fn post(&self, job: impl FnOnce() + Send + 'static) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        if let Some(tx) = self.tx.lock().as_ref() {
            let _ = tx.send(Box::new(job));
        }
    }

    /// Stops calling callbacks (jobs already queued are dropped unrun).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Stops calling callbacks; waits for the thread unless called from it (see the module doc).
    pub(crate) fn shutdown(&self) {
        self.close();
        drop(self.tx.lock().take());
        let handle = self.thread.lock().take();
        if let Some(h) = handle {
            if CURRENT.with(|c| c.get()) != self.id {
                let _ = h.join();
            }
        }
    }
}
