//! Guards the hub puts around every peer: the hub-wide budget of bytes awaiting durability and
//! rate limits for log lines a misbehaving peer (or a full disk) could otherwise repeat without
//! end. Pure apart from reading the clock in [`LogLimit::allow`].
//!
//! Invariants: [`Budget::take`] and [`Budget::release`] are balanced by their callers (each
//! session gives back what it still holds when it ends); a [`LogLimit`] lets at most one line
//! through per interval and reports how many it held back.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// A hub-wide byte budget: sessions take bytes when they append a D2C message and release them
/// once it is durable; while the budget is used up, sessions stop reading from their peers.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    used: AtomicUsize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Budget {
        Budget { limit, used: AtomicUsize::new(0) }
    }

    /// Counts `n` bytes as held (a session may overshoot by one message: it only checks
    /// [`Budget::exhausted`] before reading).
    pub fn take(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    /// Gives `n` held bytes back.
    pub fn release(&self, n: usize) {
        let _ = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| Some(u.saturating_sub(n)));
    }

    /// Whether the held bytes reached the limit.
    pub fn exhausted(&self) -> bool {
        self.used.load(Ordering::Relaxed) >= self.limit
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// At most one log line per interval (10 s by default) for one kind of event.
#[derive(Debug)]
pub struct LogLimit {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Default for LogLimit {
    fn default() -> Self {
        LogLimit::new(Duration::from_secs(10))
    }
}

impl LogLimit {
    /// A limit of one line per `interval`.
    pub fn new(interval: Duration) -> LogLimit {
        LogLimit { interval, last: Mutex::new(None), suppressed: AtomicU64::new(0) }
    }

    /// Whether a line may be written now; `Some(n)` with the number of lines held back since the
    /// last one written, `None` to stay quiet.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// [`LogLimit::allow`] at time `now`.
    pub fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut last = self.last.lock();
        match *last {
            Some(t) if now.saturating_duration_since(t) < self.interval => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }
}

/// The hub's rate-limited log lines, one limit per kind.
#[derive(Debug, Default)]
pub struct LogLimits {
    /// Refused CONNECTs.
    pub refusal: LogLimit,
    /// Connections closed for a violation.
    pub violation: LogLimit,
    /// Store failures of periodic work (full disk, I/O errors).
    pub store: LogLimit,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limit_lets_one_line_per_interval_and_counts_the_rest() {
        let l = LogLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.allow_at(t0), Some(0));
        for i in 1..100 {
            assert_eq!(l.allow_at(t0 + Duration::from_millis(i * 100 - 1)), None, "line {i}");
        }
        assert_eq!(l.allow_at(t0 + Duration::from_secs(10)), Some(99));
        assert_eq!(l.allow_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(l.allow_at(t0 + Duration::from_secs(21)), Some(1));
    }

    #[test]
    fn budget_counts_and_saturates() {
        let b = Budget::new(100);
        b.take(60);
        assert!(!b.exhausted());
        b.take(60);
        assert!(b.exhausted());
        b.release(60);
        assert_eq!(b.used(), 60);
        b.release(1000);
        assert_eq!(b.used(), 0);
    }
}
