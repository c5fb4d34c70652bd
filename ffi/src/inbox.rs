//! One incoming stream (C2D messages, feedback batches, D2C events) consumed either by pull
//! (`recv(timeout)` from an application thread) or by a callback on the client's callback
//! thread — one or the other, fixed by the first use.
//!
//! Shape: a pump task on the runtime owns the core stream and forwards every item to the chosen
//! sink (a channel that `recv` reads, or jobs for the [`Dispatcher`]). The pump is the only
//! code that polls the stream, so control requests a source needs (an event stream's
//! checkpoint) are served from inside [`Source::next`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hubmsg_core::{Error, ErrorKind, Result};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::args::Out;
use crate::callback::Dispatcher;
use crate::result::{hubmsg_result, HUBMSG_EMPTY, HUBMSG_OK};
use crate::runtime::{block_on, Rt};

/// A core stream as the pump sees it.
pub(crate) trait Source: Send + 'static {
    /// What it yields.
    type Item: Send + 'static;
    /// The next item; `None` when the stream ended; an `Err` is passed on to the consumer.
    fn next(&mut self) -> impl Future<Output = Option<Result<Self::Item>>> + Send;
}

type Opener<S> = Box<dyn FnOnce() -> Result<S> + Send>;

enum State<S: Source> {
    /// Not consumed yet; opening the source (e.g. subscribing) waits for the first use.
    Lazy(Opener<S>),
    Pull(mpsc::UnboundedReceiver<Result<S::Item>>),
    Callback,
    Broken,
}

/// A stream consumed by pull or by callback.
pub(crate) struct Inbox<S: Source> {
    what: &'static str,
    state: Mutex<State<S>>,
    pump: Mutex<Option<JoinHandle<()>>>,
}

impl<S: Source> Inbox<S> {
    /// An inbox that opens its source with `open` on first use.
    pub(crate) fn lazy(what: &'static str, open: impl FnOnce() -> Result<S> + Send + 'static) -> Inbox<S> {
        Inbox { what, state: Mutex::new(State::Lazy(Box::new(open))), pump: Mutex::new(None) }
    }

    fn open(&self, state: &mut State<S>) -> Result<S> {
        match std::mem::replace(state, State::Broken) {
            State::Lazy(open) => open(),
            other => {
                *state = other;
                Err(Error::new(
                    ErrorKind::Usage,
                    format!(
                        "{} are already consumed by {}; use either recv or a callback, once",
                        self.what,
                        if matches!(state, State::Pull(_)) { "recv" } else { "a callback" }
                    ),
                ))
            }
        }
    }

    fn spawn_pump(&self, rt: &Rt, mut source: S, mut deliver: impl FnMut(Result<S::Item>) -> bool + Send + 'static) {
        let task = rt.spawn(async move {
            while let Some(item) = source.next().await {
                if !deliver(item) {
                    break;
                }
            }
        });
        *self.pump.lock() = Some(task);
    }

    /// Switches to pull mode if not consumed yet (no-op when already in pull mode).
    pub(crate) fn start_pull(&self, rt: &Rt) -> Result<()> {
        let mut state = self.state.lock();
        if matches!(*state, State::Pull(_)) {
            return Ok(());
        }
        let source = self.open(&mut state)?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.spawn_pump(rt, source, move |item| tx.send(item).is_ok());
        *state = State::Pull(rx);
        Ok(())
    }

    /// The next item within `timeout`: `Ok(None)` on timeout, `Closed` when the stream ended.
    pub(crate) fn recv(&self, rt: &Rt, timeout: Duration) -> Result<Option<S::Item>> {
        crate::runtime::ensure_may_block(self.what)?;
        self.start_pull(rt)?;
        let mut state = self.state.lock();
        let State::Pull(rx) = &mut *state else { unreachable!("start_pull set pull mode") };
        match block_on(rt, self.what, async { tokio::time::timeout(timeout, rx.recv()).await })? {
            Err(_) => Ok(None),
            Ok(None) => Err(Error::closed(self.what)),
            Ok(Some(item)) => item.map(Some),
        }
    }

    /// [`Inbox::recv`] for an export: the item, converted, goes to `out` (`HUBMSG_OK`), or
    /// `HUBMSG_EMPTY` on timeout.
    pub(crate) fn recv_into<U>(&self, rt: &Rt, timeout_ms: u32, out: Out<U>, convert: impl FnOnce(S::Item) -> U) -> Result<hubmsg_result> {
        Ok(match self.recv(rt, crate::args::ms(timeout_ms))? {
            Some(item) => {
                out.put(convert(item));
                HUBMSG_OK
            }
            None => HUBMSG_EMPTY,
        })
    }

    /// Switches to callback mode: every item becomes a job on `dispatcher` that runs `deliver`.
    pub(crate) fn set_callback(
        &self,
        rt: &Rt,
        dispatcher: &Arc<Dispatcher>,
        deliver: impl Fn(S::Item) + Send + Sync + 'static,
    ) -> Result<()> {
        dispatcher.start()?;
        let mut state = self.state.lock();
        let source = self.open(&mut state)?;
        let deliver = Arc::new(deliver);
        let dispatcher = dispatcher.clone();
        let what = self.what;
        self.spawn_pump(rt, source, move |item| match item {
            Ok(item) => {
                let deliver = deliver.clone();
                dispatcher.post(move || deliver(item));
                true
            }
            Err(e) => {
                tracing::error!(stream = what, error = %e, "stream failed; no more callbacks");
                false
            }
        });
        *state = State::Callback;
        Ok(())
    }

    /// Stops the pump and waits until it is gone (items not yet delivered are dropped, and with
    /// them the callback's references). Not on a runtime thread.
    pub(crate) fn stop(&self, rt: &Rt) {
        let pump = self.pump.lock().take();
        if let Some(t) = pump {
            t.abort();
            let _ = rt.block_on(t);
        }
    }
}
