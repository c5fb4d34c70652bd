//! How Python waits for the engine: blocking calls that release the GIL and stay Ctrl-C-able,
//! and asyncio awaitables driven by the shared runtime.
//!
//! - [`runtime`]: the process runtime of `hubmsg-bind`. The module keeps one share of it for as
//!   long as the process lives (so asyncio futures always have a runtime to run on); after
//!   `os.fork()` the child gets a runtime of its own and clients inherited from the parent raise
//!   `UsageError`.
//! - [`wait`]: runs a future on the runtime from a Python thread with the GIL released, in slices
//!   of 100 ms with `check_signals()` between them, so Ctrl-C raises `KeyboardInterrupt` (on the
//!   main thread) within ~100 ms; the future is dropped then, and every engine future waited on
//!   this way is cancel-safe.
//! - [`awaitable`]: an `asyncio.Future` of the running loop, completed by a task on the runtime.
//!   The task hands its value to one completer thread, which takes the GIL once per batch and
//!   schedules one callback per loop (engine threads never wait for the GIL). Cancelling the
//!   Python future aborts the task (dropping the engine future: cancel-safe); a value the task
//!   produced after all, when the future was cancelled at the last moment, goes to `give_back`
//!   (e.g. back into its inbox), so cancelling an `await` loses nothing.
//!
//! pyo3-async-runtimes is not used: its tokio integration wants one `'static` runtime set once
//! per process, which a forked child cannot replace, and it drops a value whose future was
//! cancelled (see docs/python.md).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hubmsg_bind::{Inbox, Life};
use hubmsg_bind::{Rt, Runtime};
use hubmsg_core::ErrorKind;
use parking_lot::Mutex;
use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::prelude::*;
use pyo3::types::{PyCFunction, PyDict, PyTuple};

use crate::errors::IntoPyResult;

/// How long a blocking wait runs before it checks for signals.
const SLICE: Duration = Duration::from_millis(100);

static KEEP: Mutex<Option<Rt>> = Mutex::new(None);

/// The process runtime (a fresh one in a forked child).
pub(crate) fn runtime() -> PyResult<Rt> {
    let mut keep = KEEP.lock();
    if let Some(rt) = keep.as_ref().filter(|rt| rt.is_current_process()) {
        return Ok(rt.clone());
    }
    let rt = hubmsg_bind::runtime().py()?;
    // The parent's share (after fork) is leaked, never dropped: see hubmsg_bind::runtime.
    if let Some(old) = keep.replace(rt.clone()) {
        std::mem::forget(old);
    }
    Ok(rt)
}

/// Runs `fut` to completion with the GIL released, checking for signals every 100 ms. `what`
/// names the call in errors (`UsageError` in a forked child or on a runtime thread).
pub(crate) fn wait<F>(py: Python<'_>, rt: &Runtime, what: &str, fut: F) -> PyResult<F::Output>
where
    F: Future + Send,
    F::Output: Send,
{
    rt.check(what).py()?;
    hubmsg_bind::ensure_may_block(what).py()?;
    let mut fut = std::pin::pin!(fut);
    loop {
        let step = py.detach(|| rt.block_on(async { tokio::time::timeout(SLICE, fut.as_mut()).await }));
        match step {
            Ok(v) => return Ok(v),
            Err(_) => py.check_signals()?,
        }
    }
}

type Convert<T> = Box<dyn FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send>;
type GiveBack<T> = Box<dyn FnOnce(T) + Send>;

/// An awaitable of the running asyncio loop that resolves to `convert(fut's value)`; see the
/// module doc for cancellation. `give_back` receives a value whose future was cancelled.
pub(crate) fn awaitable<'py, T, F>(
    py: Python<'py>,
    rt: &Runtime,
    what: &str,
    fut: F,
    convert: impl FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
    give_back: impl FnOnce(T) + Send + 'static,
) -> PyResult<Bound<'py, PyAny>>
where
    T: Send + 'static,
    F: Future<Output = hubmsg_core::Result<T>> + Send + 'static,
{
    rt.check(what).py()?;
    let event_loop = py.import("asyncio")?.call_method0("get_running_loop")?;
    let py_fut = event_loop.call_method0("create_future")?;
    let loop_ref = event_loop.unbind();
    let fut_ref = py_fut.clone().unbind();
    let convert: Convert<T> = Box::new(convert);
    let give_back: GiveBack<T> = Box::new(give_back);
    let task = rt.spawn(async move {
        let result = fut.await;
        hand_over(Done { event_loop: loop_ref, py_fut: fut_ref, item: Box::new(Item { result, convert, give_back }) });
    });
    let abort = task.abort_handle();
    let on_done =
        PyCFunction::new_closure(py, None, None, move |args: &Bound<'_, PyTuple>, _: Option<&Bound<'_, PyDict>>| -> PyResult<()> {
            let f = args.get_item(0)?;
            if f.call_method0("cancelled")?.is_truthy()? {
                abort.abort();
            }
            Ok(())
        })?;
    py_fut.call_method1("add_done_callback", (on_done,))?;
    Ok(py_fut)
}

/// A finished engine future whose value is to be handed to its Python future.
trait Handover: Send {
    /// On the loop's thread: sets the future's result (or exception), or gives the value back
    /// when the future is done already (cancelled).
    fn deliver(self: Box<Self>, py: Python<'_>, fut: &Bound<'_, PyAny>);
    /// The loop is gone: gives the value back.
    fn abandon(self: Box<Self>);
}

struct Item<T> {
    result: hubmsg_core::Result<T>,
    convert: Convert<T>,
    give_back: GiveBack<T>,
}

impl<T: Send + 'static> Handover for Item<T> {
    fn deliver(self: Box<Self>, py: Python<'_>, fut: &Bound<'_, PyAny>) {
        let Item { result, convert, give_back } = *self;
        let done = fut.call_method0("done").and_then(|d| d.is_truthy()).unwrap_or(true);
        if done {
            if let Ok(v) = result {
                give_back(v);
            }
            return;
        }
        let r = match result.map_err(crate::errors::to_py).and_then(|v| convert(py, v)) {
            Ok(v) => fut.call_method1("set_result", (v,)),
            Err(e) => fut.call_method1("set_exception", (e.into_value(py),)),
        };
        if let Err(e) = r {
            e.print(py);
        }
    }

    fn abandon(self: Box<Self>) {
        if let Ok(v) = self.result {
            (self.give_back)(v);
        }
    }
}

/// One finished awaitable on its way to its loop.
struct Done {
    event_loop: Py<PyAny>,
    py_fut: Py<PyAny>,
    item: Box<dyn Handover>,
}

static COMPLETER: Mutex<Option<(u32, std::sync::mpsc::Sender<Done>)>> = Mutex::new(None);

/// Queues a finished awaitable for the completer thread, which takes the GIL for a whole batch
/// and schedules one callback per loop: engine threads never wait for the GIL.
fn hand_over(done: Done) {
    let tx = {
        let mut g = COMPLETER.lock();
        let pid = std::process::id();
        match g.as_ref().filter(|(p, _)| *p == pid) {
            Some((_, tx)) => Some(tx.clone()),
            None => {
                let (tx, rx) = std::sync::mpsc::channel();
                match std::thread::Builder::new().name("hubmsg-asyncio".into()).spawn(move || completer(rx)) {
                    Ok(_) => {
                        *g = Some((pid, tx.clone()));
                        Some(tx)
                    }
                    Err(_) => None,
                }
            }
        }
    };
    if let Some(tx) = tx {
        if let Err(std::sync::mpsc::SendError(d)) = tx.send(done) {
            d.item.abandon();
        }
    } else {
        done.item.abandon();
    }
}

type Batch = Vec<(Py<PyAny>, Box<dyn Handover>)>;

/// The completer thread: batches of finished awaitables to their loops.
fn completer(rx: std::sync::mpsc::Receiver<Done>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        let mut batch = Some(batch);
        let ran = with_python(|py| {
            let batch = batch.take().unwrap_or_default();
            let mut groups: Vec<(Py<PyAny>, Batch)> = Vec::new();
            for d in batch {
                match groups.iter_mut().find(|(l, _)| l.is(&d.event_loop)) {
                    Some((_, items)) => items.push((d.py_fut, d.item)),
                    None => groups.push((d.event_loop, vec![(d.py_fut, d.item)])),
                }
            }
            for (event_loop, items) in groups {
                let slot: Arc<Mutex<Option<Batch>>> = Arc::new(Mutex::new(Some(items)));
                let in_loop = slot.clone();
                let setter = PyCFunction::new_closure(
                    py,
                    None,
                    None,
                    move |args: &Bound<'_, PyTuple>, _: Option<&Bound<'_, PyDict>>| -> PyResult<()> {
                        let py = args.py();
                        for (fut, item) in in_loop.lock().take().unwrap_or_default() {
                            item.deliver(py, fut.bind(py));
                        }
                        Ok(())
                    },
                );
                let scheduled = setter.and_then(|s| event_loop.bind(py).call_method1("call_soon_threadsafe", (s,)));
                if scheduled.is_err() {
                    // The loop is closed: nobody will take the values.
                    for (_, item) in slot.lock().take().unwrap_or_default() {
                        item.abandon();
                    }
                }
            }
        });
        if ran.is_none() {
            // The interpreter is exiting: nobody will take the values.
            batch.unwrap_or_default().into_iter().for_each(|d| d.item.abandon());
            return;
        }
    }
}

/// Whether hubmsg's own threads may still call into Python, and how many are doing so now.
struct Gate {
    open: bool,
    inside: usize,
}

static GATE: parking_lot::Mutex<Gate> = parking_lot::Mutex::new(Gate { open: true, inside: 0 });
static GATE_IDLE: parking_lot::Condvar = parking_lot::Condvar::new();

/// Runs `f` with the GIL on one of hubmsg's own threads (the asyncio completer, the log
/// thread), unless the interpreter is exiting (`None` then). A thread that takes the GIL while
/// the interpreter finalizes is ended by CPython with `pthread_exit`, which aborts a Rust thread;
/// [`close_gate`], run by `atexit`, closes the gate first and waits for threads inside.
pub(crate) fn with_python<R>(f: impl FnOnce(Python<'_>) -> R) -> Option<R> {
    {
        let mut g = GATE.lock();
        if !g.open {
            return None;
        }
        g.inside += 1;
    }
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            let mut g = GATE.lock();
            g.inside -= 1;
            if g.inside == 0 {
                GATE_IDLE.notify_all();
            }
        }
    }
    let _leave = Leave;
    Some(Python::attach(f))
}

/// Called at interpreter exit (`atexit`, registered by `hubmsg/__init__.py`): no hubmsg thread
/// calls into Python from now on; waits (GIL released, at most 2 s) for those inside to leave.
#[pyfunction]
pub(crate) fn _close_gate(py: Python<'_>) {
    py.detach(|| {
        let mut g = GATE.lock();
        g.open = false;
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while g.inside > 0 && !GATE_IDLE.wait_until(&mut g, deadline).timed_out() {}
    });
}

/// The body of a method offered both ways: blocking (`asynchronous == false`: waits with the
/// GIL released, then converts) or as an awaitable (converted on the loop's thread). A value
/// whose awaitable was cancelled is dropped (use [`awaitable`] to give it back instead).
pub(crate) fn run<T, F>(
    py: Python<'_>,
    rt: &Runtime,
    what: &str,
    asynchronous: bool,
    fut: F,
    convert: impl FnOnce(Python<'_>, T) -> PyResult<Py<PyAny>> + Send + 'static,
) -> PyResult<Py<PyAny>>
where
    T: Send + 'static,
    F: Future<Output = hubmsg_core::Result<T>> + Send + 'static,
{
    if asynchronous {
        Ok(awaitable(py, rt, what, fut, convert, drop)?.unbind())
    } else {
        let v = wait(py, rt, what, fut)?.py()?;
        convert(py, v)
    }
}

/// `convert` for a unit result.
pub(crate) fn none(py: Python<'_>, _: ()) -> PyResult<Py<PyAny>> {
    Ok(py.None())
}

/// `convert` for any value with a Python form.
pub(crate) fn into_py<T: for<'py> IntoPyObject<'py>>(py: Python<'_>, v: T) -> PyResult<Py<PyAny>> {
    use pyo3::IntoPyObjectExt;
    v.into_py_any(py)
}

/// The end of a stream (`Closed`) as `None` (the end of a `for` loop).
pub(crate) fn end_is_none<T>(r: hubmsg_core::Result<Option<T>>) -> PyResult<Option<T>> {
    match r {
        Err(e) if e.kind() == ErrorKind::Closed => Ok(None),
        r => r.py(),
    }
}

/// An awaitable pull from `inbox`; an item whose awaitable was cancelled goes back. With
/// `end_is_stop` the end of the stream raises `StopAsyncIteration` (else ClosedError) and there
/// is no timeout.
///
/// The awaitable is a coroutine of `hubmsg._cancel.guard` around the future: a task cancelled
/// after the future resolved but before the task resumed (asyncio then throws `CancelledError`
/// into it and the value is discarded) hands the value to `take_back`, whose item goes back to
/// the inbox. With the give-back of a value produced after the cancellation, no item is lost to
/// a cancelled await either way.
pub(crate) fn pull_awaitable<'py, S: hubmsg_bind::Source>(
    py: Python<'py>,
    rt: &Rt,
    inbox: &Arc<Inbox<S>>,
    timeout: Option<Duration>,
    end_is_stop: bool,
    convert: impl FnOnce(Python<'_>, S::Item) -> PyResult<Py<PyAny>> + Send + 'static,
    take_back: impl Fn(&Bound<'_, PyAny>) -> Option<S::Item> + Send + Sync + 'static,
) -> PyResult<Bound<'py, PyAny>> {
    let next = inbox.next(rt, timeout);
    let back = inbox.clone();
    let late = inbox.clone();
    let fut = async move {
        match next.await {
            Err(e) if end_is_stop && e.kind() == ErrorKind::Closed => Ok(None),
            r => r,
        }
    };
    let fut = awaitable(
        py,
        rt,
        inbox.what(),
        fut,
        move |py, item| match item {
            Some(item) => convert(py, item),
            None if end_is_stop => Err(PyStopAsyncIteration::new_err(())),
            None => Ok(py.None()),
        },
        move |item| {
            if let Some(item) = item {
                back.give_back(item);
            }
        },
    )?;
    let give_back =
        PyCFunction::new_closure(py, None, None, move |args: &Bound<'_, PyTuple>, _: Option<&Bound<'_, PyDict>>| -> PyResult<()> {
            if let Some(item) = take_back(&args.get_item(0)?) {
                late.give_back(item);
            }
            Ok(())
        })?;
    static GUARD: pyo3::sync::PyOnceLock<Py<PyAny>> = pyo3::sync::PyOnceLock::new();
    let guard = GUARD.get_or_try_init(py, || py.import("hubmsg._cancel")?.getattr("guard").map(Bound::unbind))?;
    guard.bind(py).call1((fut, give_back))
}

/// `UsageError` in a forked child, `ClosedError` once `life` is closed; `call` names the method.
pub(crate) fn check_open(life: &Life, rt: &Runtime, call: &str) -> PyResult<()> {
    rt.check(call).py()?;
    life.check().py()
}
