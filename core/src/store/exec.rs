//! Where the store's I/O runs: one bounded pool of writer threads per process, shared by every
//! log (the writes, fdatasyncs, ack files and compactions of 1,000 device outboxes need a dozen
//! threads, not 2,000), with timers for interval syncs and retries. Tests use the inline executor
//! instead, which runs every job on the caller's thread in submission order, so a randomized
//! power-loss run is reproducible from its seed.
//!
//! Invariants: a job runs on one thread at a time per submission (a log that submits itself while
//! queued is queued once, by its own bookkeeping); no lock of this module is held while a job
//! runs; a worker that must wait for store progress helps run queued jobs instead of blocking, so
//! waits inside jobs cannot deadlock the pool; the pool is recreated in a forked child (a log
//! opened before the fork belongs to the parent and must not be used in the child: its
//! directory lock and its jobs stay with the parent's pool).

use std::cell::Cell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Something the executor runs: a log's next I/O step.
pub(crate) trait Job: Send + Sync + 'static {
    /// Does one round of work.
    fn run(self: Arc<Self>);
}

enum Work {
    Job(Arc<dyn Job>),
    Once(Box<dyn FnOnce() + Send>),
}

impl Work {
    fn run(self) {
        match self {
            Work::Job(j) => j.run(),
            Work::Once(f) => f(),
        }
    }
}

struct Timer {
    at: Instant,
    id: u64,
    job: Weak<dyn Job>,
}

impl PartialEq for Timer {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.id) == (o.at, o.id)
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timer {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.id).cmp(&(o.at, o.id))
    }
}

#[derive(Default)]
struct Queue {
    run: VecDeque<Work>,
    timers: BinaryHeap<Reverse<Timer>>,
    next_id: u64,
    /// Set when the pool is dropped (no log uses it): workers finish the queue and exit.
    stop: bool,
}

impl Queue {
    fn due(&mut self, now: Instant) {
        while self.timers.peek().is_some_and(|t| t.0.at <= now) {
            let t = self.timers.pop().expect("peeked").0;
            if let Some(j) = t.job.upgrade() {
                self.run.push_back(Work::Job(j));
            }
        }
    }
}

/// The process-wide pool of store threads. Every log holds it; when the last one is gone it
/// is dropped and its threads exit ([`release_threads`] joins them).
pub(crate) struct Pool {
    core: Arc<Core>,
    #[cfg_attr(not(test), allow(dead_code))]
    threads: usize,
}

/// What the workers share: the queue and its condition variable.
pub(crate) struct Core {
    q: Mutex<Queue>,
    cv: Condvar,
}

impl std::ops::Deref for Pool {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.core.q.lock().stop = true;
        self.core.cv.notify_all();
    }
}

/// The pool of this process, the threads it started, and those of earlier pools not yet joined.
struct Global {
    pid: u32,
    pool: Weak<Pool>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

thread_local! {
    static ON_WORKER: Cell<bool> = const { Cell::new(false) };
}

static GLOBAL: Mutex<Option<Global>> = Mutex::new(None);

/// Default number of store threads: enough for fdatasyncs of many logs to overlap (the disk
/// batches concurrent flushes into one journal commit), bounded however many logs are open.
/// `HUBMSG_STORE_THREADS` overrides it.
pub(crate) const DEFAULT_THREADS: usize = 16;

impl Pool {
    /// The pool of this process (created on first use, and again in a forked child).
    pub(crate) fn global() -> Arc<Pool> {
        let pid = std::process::id();
        let mut g = GLOBAL.lock();
        let mut workers = Vec::new();
        if let Some(old) = g.take() {
            if old.pid == pid {
                if let Some(pool) = old.pool.upgrade() {
                    *g = Some(old);
                    return pool;
                }
                // The previous pool is gone and its threads are exiting: keep their handles
                // for release_threads.
                workers = old.workers;
            } else {
                // Inherited through fork(): those threads do not exist here; never touch them.
                std::mem::forget(old.workers);
            }
        }
        let threads =
            std::env::var("HUBMSG_STORE_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|n| *n > 0).unwrap_or(DEFAULT_THREADS);
        let core = Arc::new(Core { q: Mutex::new(Queue::default()), cv: Condvar::new() });
        for i in 0..threads {
            let c = core.clone();
            match std::thread::Builder::new().name(format!("hubmsg-store-{i}")).stack_size(256 * 1024).spawn(move || c.work()) {
                Ok(h) => workers.push(h),
                Err(e) => tracing::error!(error = %e, "could not start a store thread"),
            }
        }
        let pool = Arc::new(Pool { core, threads });
        *g = Some(Global { pid, pool: Arc::downgrade(&pool), workers });
        pool
    }

    /// Number of threads.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn threads(&self) -> usize {
        self.threads
    }
}

impl Core {
    fn work(&self) {
        ON_WORKER.with(|w| w.set(true));
        let mut q = self.q.lock();
        loop {
            q.due(Instant::now());
            if let Some(w) = q.run.pop_front() {
                drop(q);
                w.run();
                q = self.q.lock();
                continue;
            }
            if q.stop {
                return;
            }
            match q.timers.peek().map(|t| t.0.at) {
                Some(at) => {
                    self.cv.wait_until(&mut q, at);
                }
                None => self.cv.wait(&mut q),
            }
        }
    }

    fn push(&self, w: Work) {
        self.q.lock().run.push_back(w);
        self.cv.notify_one();
    }

    fn at(&self, at: Instant, job: Weak<dyn Job>) {
        let mut q = self.q.lock();
        let id = q.next_id;
        q.next_id += 1;
        let earliest = q.timers.peek().is_none_or(|t| at < t.0.at);
        q.timers.push(Reverse(Timer { at, id, job }));
        drop(q);
        if earliest {
            self.cv.notify_one();
        }
    }

    /// Runs one queued job on the calling thread if there is one.
    fn help(&self) -> bool {
        let w = {
            let mut q = self.q.lock();
            q.due(Instant::now());
            q.run.pop_front()
        };
        match w {
            Some(w) => {
                w.run();
                true
            }
            None => false,
        }
    }
}

/// Joins the store's threads once no log of this process is open, waiting up to `wait` for the
/// last one's jobs to finish; returns whether no store thread is left. The next log opened
/// starts a new pool. For bindings that promise no threads once the last handle is freed (the C
/// library); a no-op returning false while any log is open, or on a store thread.
pub fn release_threads(wait: Duration) -> bool {
    if ON_WORKER.with(|w| w.get()) {
        return false;
    }
    let deadline = Instant::now() + wait;
    loop {
        let workers = {
            let mut g = GLOBAL.lock();
            match &mut *g {
                None => return true,
                Some(gl) if gl.pid != std::process::id() => return true,
                Some(gl) if gl.pool.strong_count() == 0 => std::mem::take(&mut gl.workers),
                Some(_) => Vec::new(),
            }
        };
        if !workers.is_empty() || GLOBAL.lock().as_ref().is_some_and(|g| g.pool.strong_count() == 0) {
            for h in workers {
                let _ = h.join();
            }
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Runs every job on the submitting thread, in order; timers fire only when the test says so,
/// and time (as [`Exec::now`] tells it) moves only then, so runs are reproducible.
pub(crate) struct Inline {
    q: Mutex<InlineQ>,
    start: Instant,
    clock: Mutex<Duration>,
}

impl Default for Inline {
    fn default() -> Inline {
        Inline { q: Mutex::default(), start: Instant::now(), clock: Mutex::new(Duration::ZERO) }
    }
}

#[derive(Default)]
struct InlineQ {
    run: VecDeque<Work>,
    timers: Vec<Weak<dyn Job>>,
    running: bool,
}

impl Inline {
    fn push(&self, w: Work) {
        self.q.lock().run.push_back(w);
        self.drain();
    }

    fn drain(&self) {
        {
            let mut q = self.q.lock();
            if q.running {
                return;
            }
            q.running = true;
        }
        loop {
            let w = self.q.lock().run.pop_front();
            match w {
                Some(w) => w.run(),
                None => break,
            }
        }
        self.q.lock().running = false;
    }

    /// Runs one queued job even while another is running (a wait inside a job).
    fn help(&self) -> bool {
        let w = self.q.lock().run.pop_front();
        match w {
            Some(w) => {
                w.run();
                true
            }
            None => false,
        }
    }

    /// Fires every timer set so far (as if their time had come) and runs what they queue.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn fire_timers(&self) {
        *self.clock.lock() += Duration::from_secs(10);
        let timers = std::mem::take(&mut self.q.lock().timers);
        for t in timers {
            if let Some(j) = t.upgrade() {
                self.q.lock().run.push_back(Work::Job(j));
            }
        }
        self.drain();
    }
}

/// The executor a store uses.
#[derive(Clone)]
pub(crate) enum Exec {
    /// The process-wide thread pool.
    Pool(Arc<Pool>),
    /// Everything on the caller's thread (deterministic tests).
    #[allow(dead_code)]
    Inline(Arc<Inline>),
}

impl Exec {
    /// Queues a job.
    pub(crate) fn submit(&self, job: Arc<dyn Job>) {
        match self {
            Exec::Pool(p) => p.push(Work::Job(job)),
            Exec::Inline(i) => i.push(Work::Job(job)),
        }
    }

    /// Queues a one-off task (compaction).
    pub(crate) fn spawn(&self, f: Box<dyn FnOnce() + Send>) {
        match self {
            Exec::Pool(p) => p.push(Work::Once(f)),
            Exec::Inline(i) => i.push(Work::Once(f)),
        }
    }

    /// Runs `job` again at `at` (unless it was dropped by then).
    pub(crate) fn at(&self, at: Instant, job: Weak<dyn Job>) {
        match self {
            Exec::Pool(p) => p.at(at, job),
            Exec::Inline(i) => i.q.lock().timers.push(job),
        }
    }

    /// Called by a waiting thread: runs a queued job if waiting could otherwise deadlock (on a
    /// pool thread, or with the inline executor). Returns whether it ran one.
    pub(crate) fn help(&self) -> bool {
        match self {
            Exec::Pool(p) => ON_WORKER.with(|w| w.get()) && p.help(),
            Exec::Inline(i) => i.help(),
        }
    }

    /// The time: real for the pool; for the inline executor a clock that advances only when
    /// timers are fired.
    pub(crate) fn now(&self) -> Instant {
        match self {
            Exec::Pool(_) => Instant::now(),
            Exec::Inline(i) => i.start + *i.clock.lock(),
        }
    }

    /// Whether waiting threads may block (the pool runs jobs elsewhere); false for the inline
    /// executor, where a wait that cannot be helped along will never be satisfied.
    pub(crate) fn can_block(&self) -> bool {
        matches!(self, Exec::Pool(_))
    }

    /// How long a waiter sleeps between checks when it cannot be woken directly.
    pub(crate) const POLL: Duration = Duration::from_millis(10);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count(AtomicUsize);
    impl Job for Count {
        fn run(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_pool_runs_jobs_and_timers_on_a_bounded_set_of_threads() {
        let pool = Pool::global();
        assert!(pool.threads() >= 1 && pool.threads() <= 256);
        let exec = Exec::Pool(pool);
        let c = Arc::new(Count(AtomicUsize::new(0)));
        for _ in 0..100 {
            exec.submit(c.clone());
        }
        let weak: Weak<dyn Job> = Arc::downgrade(&(c.clone() as Arc<dyn Job>));
        exec.at(Instant::now() + Duration::from_millis(20), weak);
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.0.load(Ordering::SeqCst) < 101 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(c.0.load(Ordering::SeqCst), 101);
    }

    #[test]
    fn the_inline_executor_runs_in_order_and_fires_timers_on_request() {
        let i = Arc::new(Inline::default());
        let exec = Exec::Inline(i.clone());
        let c = Arc::new(Count(AtomicUsize::new(0)));
        exec.submit(c.clone());
        assert_eq!(c.0.load(Ordering::SeqCst), 1, "ran on submit");
        let weak: Weak<dyn Job> = Arc::downgrade(&(c.clone() as Arc<dyn Job>));
        exec.at(Instant::now() + Duration::from_secs(3600), weak);
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        i.fire_timers();
        assert_eq!(c.0.load(Ordering::SeqCst), 2);
    }
}
