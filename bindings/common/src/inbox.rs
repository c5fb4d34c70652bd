//! One incoming stream (C2D messages, feedback batches, D2C events) consumed either by pull
//! (blocking `recv(timeout)` from an application thread, or an async [`Inbox::next`]) or by a
//! callback — on the client's callback thread ([`Inbox::set_callback`]), or a non-blocking sink
//! called on the pump task itself ([`Inbox::forward`], e.g. a Node threadsafe function) — one
//! or the other, fixed by the first use.
//!
//! Shape: a pump task on the runtime (any [`Spawner`]) owns the core stream and forwards every
//! item to the chosen sink (a channel that pulls read, jobs for the [`Dispatcher`], or the
//! forward sink). The pump is the only code that polls the stream, so control requests a source
//! needs (an event stream's checkpoint) are served from inside [`Source::next`].
//!
//! Bounds: the pump reads as fast as the sink takes, and the channel to pulls is unbounded, but
//! every core stream is bounded upstream by the hub's delivery window — unsettled C2D messages
//! (`c2d_window`), unacknowledged events (1,000 per partition and 8 MiB per consumer), unacknowledged
//! feedback batches — so a slow consumer holds back delivery instead of growing a buffer.
//! [`Inbox::buffered`] says how many items wait for a pull.
//!
//! Batches: [`Inbox::next_batch`] waits for one item like [`Inbox::next`], then takes whatever
//! else is already waiting, up to a count and a byte bound, without waiting again — one wake-up
//! (one Promise, one call across a language boundary) for many items when they arrive fast, and
//! the same single item as `next` when they trickle. It reads ahead nothing: a batch holds only
//! items the pump had already received, so the hub's window still bounds what a slow consumer
//! holds.
//!
//! Invariants: a pull is cancel-safe — dropping a pending [`Inbox::next`] or
//! [`Inbox::next_batch`] (a timeout, a cancelled `await`) loses no item; an item a binding could
//! not hand over after all (its awaiting future was cancelled at the last moment) goes back with
//! [`Inbox::give_back`] and is the next one pulled. A stream error met inside a batch ends the
//! batch and is the next thing pulled.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hubmsg_core::{Error, ErrorKind, Result};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::dispatch::Dispatcher;
use crate::runtime::{block_on, Runtime, Spawner};

/// A core stream as the pump sees it.
pub trait Source: Send + 'static {
    /// What it yields.
    type Item: Send + 'static;
    /// The next item; `None` when the stream ended; an `Err` is passed on to the consumer.
    fn next(&mut self) -> impl Future<Output = Option<Result<Self::Item>>> + Send;
}

type Opener<S> = Box<dyn FnOnce() -> Result<S> + Send>;
type PullRx<T> = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Result<T>>>>;
type Returned<T> = Arc<Mutex<VecDeque<Result<T>>>>;

/// The bounds of one [`Inbox::next_batch`]: at most `max_items` items, and no more than
/// `max_bytes` by `size` — except that a batch always holds at least one item, however large.
#[derive(Clone, Copy)]
pub struct BatchLimits<T> {
    /// Most items in a batch (0 is taken as 1).
    pub max_items: usize,
    /// Most bytes (as `size` counts them) in a batch of more than one item.
    pub max_bytes: usize,
    /// The size of an item (e.g. its body length).
    pub size: fn(&T) -> usize,
}

/// The parts of an inbox a pull future holds.
struct Pull<T> {
    rx: Result<PullRx<T>>,
    returned: Returned<T>,
    queued: Arc<AtomicUsize>,
    what: &'static str,
}

/// `f`'s output, or `None` once `timeout` passed first (`None` timeout: no limit).
async fn within<F: Future>(timeout: Option<Duration>, f: F) -> Option<F::Output> {
    match timeout {
        Some(t) => tokio::time::timeout(t, f).await.ok(),
        None => Some(f.await),
    }
}

/// A batch being filled within its limits.
struct Filling<T> {
    items: Vec<T>,
    bytes: usize,
    limits: BatchLimits<T>,
}

impl<T> Filling<T> {
    fn new(limits: BatchLimits<T>) -> Filling<T> {
        Filling { items: Vec::new(), bytes: 0, limits }
    }

    fn full(&self) -> bool {
        self.items.len() >= self.limits.max_items.max(1)
    }

    /// Adds `item` if it fits; hands it back if it does not (the batch is then complete).
    fn offer(&mut self, item: T) -> Option<T> {
        let size = (self.limits.size)(&item);
        if self.full() || (!self.items.is_empty() && self.bytes.saturating_add(size) > self.limits.max_bytes) {
            return Some(item);
        }
        self.bytes = self.bytes.saturating_add(size);
        self.items.push(item);
        None
    }
}

enum State<S: Source> {
    /// Not consumed yet; opening the source (e.g. subscribing) waits for the first use.
    Lazy(Opener<S>),
    Pull(PullRx<S::Item>),
    Callback,
    Broken,
}

/// A stream consumed by pull or by callback.
pub struct Inbox<S: Source> {
    what: &'static str,
    state: Mutex<State<S>>,
    /// Items handed back by [`Inbox::give_back`] (and the rest of a batch: an item beyond its
    /// bounds, a stream error), pulled before the channel.
    returned: Returned<S::Item>,
    /// Items the pump put in the pull channel that no pull took yet.
    queued: Arc<AtomicUsize>,
    pump: Mutex<Option<JoinHandle<()>>>,
}

impl<S: Source> Inbox<S> {
    /// An inbox that opens its source with `open` on first use; `what` names the items in
    /// messages (`"C2D messages"`).
    pub fn lazy(what: &'static str, open: impl FnOnce() -> Result<S> + Send + 'static) -> Inbox<S> {
        Inbox {
            what,
            state: Mutex::new(State::Lazy(Box::new(open))),
            returned: Arc::default(),
            queued: Arc::default(),
            pump: Mutex::new(None),
        }
    }

    /// What the items are called.
    pub fn what(&self) -> &'static str {
        self.what
    }

    fn open(&self, state: &mut State<S>) -> Result<S> {
        match std::mem::replace(state, State::Broken) {
            State::Lazy(open) => open(),
            other => {
                *state = other;
                Err(Error::new(
                    ErrorKind::Usage,
                    format!(
                        "{} are already consumed by {}; use either pull (recv / iteration) or a callback, once",
                        self.what,
                        if matches!(state, State::Pull(_)) { "pull" } else { "a callback" }
                    ),
                ))
            }
        }
    }

    /// How many items wait for a pull: received from the stream (or given back) and not taken.
    pub fn buffered(&self) -> usize {
        self.queued.load(Ordering::SeqCst) + self.returned.lock().len()
    }

    fn spawn_pump(&self, rt: &impl Spawner, mut source: S, mut deliver: impl FnMut(Result<S::Item>) -> bool + Send + 'static) {
        let task = rt.handle().spawn(async move {
            while let Some(item) = source.next().await {
                if !deliver(item) {
                    break;
                }
            }
        });
        *self.pump.lock() = Some(task);
    }

    /// Switches to pull mode if not consumed yet (no-op when already in pull mode) and returns
    /// the receiver pulls read.
    fn pull_rx(&self, rt: &impl Spawner) -> Result<PullRx<S::Item>> {
        let mut state = self.state.lock();
        if let State::Pull(rx) = &*state {
            return Ok(rx.clone());
        }
        let source = self.open(&mut state)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = self.queued.clone();
        self.spawn_pump(rt, source, move |item| {
            queued.fetch_add(1, Ordering::SeqCst);
            let sent = tx.send(item).is_ok();
            if !sent {
                queued.fetch_sub(1, Ordering::SeqCst);
            }
            sent
        });
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        *state = State::Pull(rx.clone());
        Ok(rx)
    }

    /// What a pull future needs (it outlives the borrow of the inbox).
    fn pull(&self, rt: &impl Spawner) -> Pull<S::Item> {
        Pull { rx: self.pull_rx(rt), returned: self.returned.clone(), queued: self.queued.clone(), what: self.what }
    }

    /// Switches to pull mode if not consumed yet (no-op when already in pull mode).
    pub fn start_pull(&self, rt: &impl Spawner) -> Result<()> {
        self.pull_rx(rt).map(drop)
    }

    /// The next item within `timeout` (`None`: wait as long as it takes): `Ok(None)` on
    /// timeout, `Closed` when the stream ended. Cancel-safe. Switches to pull mode on first use
    /// (`Usage` if a callback consumes the stream).
    pub fn next(&self, rt: &impl Spawner, timeout: Option<Duration>) -> impl Future<Output = Result<Option<S::Item>>> + Send + 'static
    where
        S::Item: Send,
    {
        let Pull { rx, returned, queued, what } = self.pull(rt);
        async move {
            let rx = rx?;
            let early = returned.lock().pop_front();
            if let Some(item) = early {
                return item.map(Some);
            }
            let recv = async {
                let mut rx = rx.lock().await;
                let got = rx.recv().await;
                if got.is_some() {
                    queued.fetch_sub(1, Ordering::SeqCst);
                }
                got
            };
            let Some(got) = within(timeout, recv).await else { return Ok(None) };
            match got {
                None => Err(Error::closed(what)),
                Some(item) => item.map(Some),
            }
        }
    }

    /// Up to `limits` of items: waits within `timeout` (`None`: as long as it takes) for the
    /// first, then takes the items already waiting without waiting again. `Ok` of an empty
    /// batch on timeout, `Closed` when the stream ended before any item (a batch that meets the
    /// end or an error returns what it holds; the next pull gets the end or the error).
    /// Cancel-safe, like [`Inbox::next`]; switches to pull mode on first use.
    pub fn next_batch(
        &self,
        rt: &impl Spawner,
        limits: BatchLimits<S::Item>,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Vec<S::Item>>> + Send + 'static
    where
        S::Item: Send,
    {
        let Pull { rx, returned, queued, what } = self.pull(rt);
        async move {
            let rx = rx?;
            let mut batch = Filling::new(limits);
            // Items given back come first, in order.
            loop {
                let early = returned.lock().pop_front();
                match early {
                    None => break,
                    Some(Err(e)) if batch.items.is_empty() => return Err(e),
                    Some(Ok(item)) => match batch.offer(item) {
                        None => continue,
                        Some(item) => {
                            returned.lock().push_front(Ok(item));
                            return Ok(batch.items);
                        }
                    },
                    Some(err) => {
                        returned.lock().push_front(err);
                        return Ok(batch.items);
                    }
                }
            }
            let mut rx = if batch.items.is_empty() {
                let first = async {
                    let mut rx = rx.lock_owned().await;
                    let got = rx.recv().await;
                    (rx, got)
                };
                let Some((rx, got)) = within(timeout, first).await else { return Ok(Vec::new()) };
                match got {
                    None => return Err(Error::closed(what)),
                    Some(item) => {
                        queued.fetch_sub(1, Ordering::SeqCst);
                        batch.offer(item?);
                    }
                }
                rx
            } else {
                // Another pull is waiting on the channel: what was given back is the batch.
                match rx.try_lock_owned() {
                    Ok(rx) => rx,
                    Err(_) => return Ok(batch.items),
                }
            };
            // Then what is already waiting, without waiting again. An empty or ended channel
            // ends the batch; the next pull meets the end.
            while !batch.full() {
                let Ok(item) = rx.try_recv() else { break };
                queued.fetch_sub(1, Ordering::SeqCst);
                let rest = match item {
                    Ok(item) => batch.offer(item).map(Ok),
                    Err(e) => Some(Err(e)),
                };
                if let Some(rest) = rest {
                    returned.lock().push_back(rest);
                    break;
                }
            }
            Ok(batch.items)
        }
    }

    /// Puts an item taken by [`Inbox::next`] or [`Inbox::next_batch`] back in front (its
    /// consumer went away before it could take it).
    pub fn give_back(&self, item: S::Item) {
        self.returned.lock().push_front(Ok(item));
    }

    /// Blocking [`Inbox::next`] from an application thread (`Usage` on a runtime thread).
    pub fn recv(&self, rt: &Runtime, timeout: Duration) -> Result<Option<S::Item>> {
        crate::runtime::ensure_may_block(self.what)?;
        let next = self.next(rt, Some(timeout));
        block_on(rt, self.what, next)?
    }

    /// Switches to callback mode: every item becomes a job on `dispatcher` that runs `deliver`.
    pub fn set_callback(
        &self,
        rt: &impl Spawner,
        dispatcher: &Arc<Dispatcher>,
        deliver: impl Fn(S::Item) + Send + Sync + 'static,
    ) -> Result<()> {
        dispatcher.start()?;
        let deliver = Arc::new(deliver);
        let dispatcher = dispatcher.clone();
        let what = self.what;
        self.forward(rt, move |item| match item {
            Ok(item) => {
                let deliver = deliver.clone();
                dispatcher.post(move || deliver(item));
                true
            }
            Err(e) => {
                tracing::error!(stream = what, error = %e, "stream failed; no more callbacks");
                false
            }
        })
    }

    /// Switches to callback mode with a sink the pump task calls itself, for each item and for a
    /// stream error, until it returns false. The sink must not block (it runs on a runtime
    /// thread): it hands the item on, e.g. to a Node threadsafe function.
    pub fn forward(&self, rt: &impl Spawner, deliver: impl FnMut(Result<S::Item>) -> bool + Send + 'static) -> Result<()> {
        let mut state = self.state.lock();
        let source = self.open(&mut state)?;
        self.spawn_pump(rt, source, deliver);
        *state = State::Callback;
        Ok(())
    }

    /// Stops the pump: aborts it and returns its task, to await until it is gone (items not yet
    /// delivered are dropped, and with them the callback's references).
    pub fn stop_task(&self) -> Option<JoinHandle<()>> {
        self.returned.lock().clear();
        let pump = self.pump.lock().take();
        if let Some(t) = &pump {
            t.abort();
        }
        pump
    }

    /// [`Inbox::stop_task`] and a blocking wait for the pump to be gone. Not on a runtime
    /// thread; does nothing more (the pump is leaked with its runtime) in a process the runtime
    /// does not belong to.
    pub fn stop(&self, rt: &Runtime) {
        if let Some(t) = self.stop_task() {
            if rt.is_current_process() {
                let _ = rt.block_on(t);
            } else {
                std::mem::forget(t);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::runtime;

    /// A source fed by a channel.
    struct Chan(mpsc::UnboundedReceiver<u32>);

    impl Source for Chan {
        type Item = u32;
        async fn next(&mut self) -> Option<Result<u32>> {
            self.0.recv().await.map(Ok)
        }
    }

    fn inbox() -> (Inbox<Chan>, mpsc::UnboundedSender<u32>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Inbox::lazy("numbers", move || Ok(Chan(rx))), tx)
    }

    #[test]
    fn pull_times_out_then_gets_items_in_order_then_closed() {
        let rt = runtime().unwrap();
        let (inbox, tx) = inbox();
        assert_eq!(inbox.recv(&rt, Duration::from_millis(10)).unwrap(), None);
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        assert_eq!(inbox.recv(&rt, Duration::from_secs(5)).unwrap(), Some(1));
        assert_eq!(inbox.recv(&rt, Duration::from_secs(5)).unwrap(), Some(2));
        drop(tx);
        assert_eq!(inbox.recv(&rt, Duration::from_secs(5)).unwrap_err().kind(), ErrorKind::Closed);
    }

    #[test]
    fn a_cancelled_pull_loses_nothing_and_given_back_items_come_first() {
        let rt = runtime().unwrap();
        let (inbox, tx) = inbox();
        // A pull that is dropped while waiting (as a cancelled await is).
        let pending = inbox.next(&rt, None);
        rt.block_on(async { tokio::time::timeout(Duration::from_millis(20), pending).await }).unwrap_err();
        tx.send(7).unwrap();
        tx.send(8).unwrap();
        let got = rt.block_on(inbox.next(&rt, None)).unwrap().unwrap();
        assert_eq!(got, 7);
        inbox.give_back(got);
        assert_eq!(inbox.recv(&rt, Duration::from_secs(5)).unwrap(), Some(7));
        assert_eq!(inbox.recv(&rt, Duration::from_secs(5)).unwrap(), Some(8));
    }

    fn limits(max_items: usize, max_bytes: usize) -> BatchLimits<u32> {
        // An item's size is its value: easy byte bounds to reason about.
        BatchLimits { max_items, max_bytes, size: |n| *n as usize }
    }

    fn wait_buffered(inbox: &Inbox<Chan>, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while inbox.buffered() < n && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(inbox.buffered(), n);
    }

    #[test]
    fn a_batch_takes_what_waits_within_its_count_and_byte_bounds_in_order() {
        let rt = runtime().unwrap();
        let (inbox, tx) = inbox();
        inbox.start_pull(&rt).unwrap();
        for n in 1..=10 {
            tx.send(n).unwrap();
        }
        wait_buffered(&inbox, 10);
        let batch = |max, bytes| rt.block_on(inbox.next_batch(&rt, limits(max, bytes), Some(Duration::from_secs(5)))).unwrap();
        assert_eq!(batch(3, 1000), vec![1, 2, 3], "count bound");
        assert_eq!(batch(100, 8), vec![4], "4 + 5 > 8 bytes: the batch ends before 5");
        assert_eq!(inbox.buffered(), 6, "the item beyond the bound waits, nothing is lost");
        assert_eq!(batch(100, 1), vec![5], "an item larger than the byte bound still comes alone");
        assert_eq!(batch(0, 1000), vec![6], "a count of 0 is taken as 1");
        assert_eq!(inbox.recv(&rt, Duration::from_secs(5)).unwrap(), Some(7), "next and next_batch share the order");
        assert_eq!(batch(100, 1000), vec![8, 9, 10]);
        assert_eq!(inbox.buffered(), 0);
    }

    #[test]
    fn a_batch_times_out_empty_waits_for_a_first_item_and_ends_with_closed() {
        let rt = runtime().unwrap();
        let (inbox, tx) = inbox();
        let started = std::time::Instant::now();
        let empty = rt.block_on(inbox.next_batch(&rt, limits(10, 1000), Some(Duration::from_millis(20)))).unwrap();
        assert!(empty.is_empty());
        assert!(started.elapsed() >= Duration::from_millis(20));
        // A pending batch gets an item sent while it waits (no busy loop, one wake-up).
        let pending = inbox.next_batch(&rt, limits(10, 1000), None);
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tx.send(4).unwrap();
            tx
        });
        assert_eq!(rt.block_on(pending).unwrap(), vec![4]);
        let tx = sender.join().unwrap();
        tx.send(5).unwrap();
        drop(tx);
        // The items before the end come first; then the end.
        assert_eq!(rt.block_on(inbox.next_batch(&rt, limits(10, 1000), None)).unwrap(), vec![5]);
        let err = rt.block_on(inbox.next_batch(&rt, limits(10, 1000), None)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Closed);
    }

    #[test]
    fn a_cancelled_batch_loses_nothing_and_given_back_items_come_first() {
        let rt = runtime().unwrap();
        let (inbox, tx) = inbox();
        let pending = inbox.next_batch(&rt, limits(10, 1000), None);
        rt.block_on(async { tokio::time::timeout(Duration::from_millis(20), pending).await }).unwrap_err();
        for n in [1, 2, 3] {
            tx.send(n).unwrap();
        }
        wait_buffered(&inbox, 3);
        let got = rt.block_on(inbox.next_batch(&rt, limits(2, 1000), None)).unwrap();
        assert_eq!(got, vec![1, 2]);
        for n in got.into_iter().rev() {
            inbox.give_back(n);
        }
        assert_eq!(rt.block_on(inbox.next_batch(&rt, limits(10, 1000), None)).unwrap(), vec![1, 2, 3]);
    }

    /// A source that yields an error after two items.
    struct Failing(u32);

    impl Source for Failing {
        type Item = u32;
        async fn next(&mut self) -> Option<Result<u32>> {
            self.0 += 1;
            match self.0 {
                1 | 2 => Some(Ok(self.0)),
                3 => Some(Err(Error::new(ErrorKind::Protocol, "broken stream"))),
                _ => std::future::pending().await,
            }
        }
    }

    #[test]
    fn an_error_inside_a_batch_ends_it_and_is_the_next_thing_pulled() {
        let rt = runtime().unwrap();
        let inbox = Inbox::lazy("numbers", || Ok(Failing(0)));
        inbox.start_pull(&rt).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while inbox.buffered() < 3 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        let l = BatchLimits { max_items: 10, max_bytes: 1000, size: |_: &u32| 1 };
        assert_eq!(rt.block_on(inbox.next_batch(&rt, l, None)).unwrap(), vec![1, 2]);
        let err = rt.block_on(inbox.next_batch(&rt, l, None)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Protocol);
        assert_eq!(rt.block_on(inbox.next_batch(&rt, l, Some(Duration::from_millis(10)))).unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn buffered_counts_items_waiting_for_a_pull() {
        let rt = runtime().unwrap();
        let (inbox, tx) = inbox();
        inbox.start_pull(&rt).unwrap();
        for n in 0..3 {
            tx.send(n).unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while inbox.buffered() < 3 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(inbox.buffered(), 3);
        let first = inbox.recv(&rt, Duration::from_secs(5)).unwrap().unwrap();
        assert_eq!(inbox.buffered(), 2);
        inbox.give_back(first);
        assert_eq!(inbox.buffered(), 3);
    }

    #[test]
    fn forward_runs_the_sink_on_the_pump_of_a_borrowed_runtime_until_it_says_stop() {
        // A runtime the host owns (as napi-rs's is for Node), borrowed by its handle.
        let host = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let handle = host.handle().clone();
        let (inbox, tx) = inbox();
        let (seen_tx, seen) = std::sync::mpsc::channel();
        inbox
            .forward(&handle, move |n| {
                let n = n.unwrap();
                seen_tx.send((n, tokio::runtime::Handle::try_current().is_ok())).unwrap();
                n < 2
            })
            .unwrap();
        for n in 0..5 {
            tx.send(n).unwrap();
        }
        let got: Vec<_> = (0..3).map(|_| seen.recv_timeout(Duration::from_secs(5)).unwrap()).collect();
        assert_eq!(got, vec![(0, true), (1, true), (2, true)]);
        assert!(seen.recv_timeout(Duration::from_millis(50)).is_err(), "the sink ran after it said stop");
        let err = rt_free_next(&inbox, &handle);
        assert_eq!(err.kind(), ErrorKind::Usage);
        if let Some(t) = inbox.stop_task() {
            let _ = host.block_on(t);
        }
    }

    fn rt_free_next(inbox: &Inbox<Chan>, handle: &tokio::runtime::Handle) -> Error {
        handle.block_on(inbox.next(handle, Some(Duration::from_millis(1)))).unwrap_err()
    }

    #[test]
    fn pull_and_callback_exclude_each_other() {
        let rt = runtime().unwrap();
        let (inbox, tx) = inbox();
        let d = Dispatcher::new("inbox-test-cb");
        let (seen_tx, seen) = std::sync::mpsc::channel();
        let seen_tx = Mutex::new(seen_tx);
        inbox.set_callback(&rt, &d, move |n| seen_tx.lock().send(n).unwrap()).unwrap();
        tx.send(3).unwrap();
        assert_eq!(seen.recv_timeout(Duration::from_secs(5)).unwrap(), 3);
        let err = inbox.recv(&rt, Duration::from_millis(1)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Usage);
        assert!(err.message().contains("callback"), "{err}");
        inbox.stop(&rt);
        d.shutdown();
    }
}
