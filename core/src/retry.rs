//! Retry policies shared by every client in every language: exponential backoff with jitter,
//! caps, max elapsed time; error classification (transient vs permanent); and the "reset only
//! after a healthy connection" rule that prevents reconnect storms. Pure: time is passed in.

use std::time::Duration;

use crate::error::{Error, ErrorKind};

/// How to space out retries.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delay before the first retry (before jitter).
    pub initial_delay: Duration,
    /// Upper bound on any single delay (before jitter).
    pub max_delay: Duration,
    /// Growth factor per attempt (2.0 = doubling); 1.0 gives a fixed delay.
    pub multiplier: f64,
    /// Random extra delay, uniformly in `[0, jitter]`, added to each delay.
    pub jitter: Duration,
    /// Stop retrying once this much time has passed since the first failure (`None` = forever).
    pub max_elapsed: Option<Duration>,
    /// Stop after this many attempts (`None` = unlimited).
    pub max_attempts: Option<u32>,
    /// A connection must stay up this long before the attempt counter resets; a hub that accepts
    /// then kicks the client keeps the backoff growing.
    pub healthy_after: Duration,
}

impl Default for RetryPolicy {
    /// min 1 s, max 60 s, ×2, jitter 1 s, forever, healthy after 10 s.
    fn default() -> Self {
        RetryPolicy {
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: Duration::from_secs(1),
            max_elapsed: None,
            max_attempts: None,
            healthy_after: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Exponential backoff (×2) from `initial` up to `max`, with jitter `initial / 2`; the other
    /// fields as in [`RetryPolicy::default`].
    pub fn exponential(initial: Duration, max: Duration) -> RetryPolicy {
        RetryPolicy { initial_delay: initial, max_delay: max, jitter: initial / 2, ..RetryPolicy::default() }
    }

    /// The same delay every time, no jitter; the other fields as in [`RetryPolicy::default`].
    pub fn fixed(delay: Duration) -> RetryPolicy {
        RetryPolicy { initial_delay: delay, max_delay: delay, multiplier: 1.0, jitter: Duration::ZERO, ..RetryPolicy::default() }
    }

    /// Never retry (`max_attempts` is 0).
    pub fn none() -> RetryPolicy {
        RetryPolicy { max_attempts: Some(0), ..RetryPolicy::default() }
    }

    /// The delay before retry number `attempt` (0-based), given `elapsed` since the first failure
    /// and a random `unit` in `[0,1)` for the jitter; `None` when the policy gives up. Overflow-safe
    /// for any attempt (saturates at `max_delay`). Gives up when `attempt >= max_attempts` or
    /// `elapsed >= max_elapsed`. A `unit` outside `[0,1]` (or NaN) is clamped into it.
    pub fn delay(&self, attempt: u32, elapsed: Duration, unit: f64) -> Option<Duration> {
        if self.max_attempts.is_some_and(|max| attempt >= max) || self.max_elapsed.is_some_and(|max| elapsed >= max) {
            return None;
        }
        let unit = if unit.is_nan() { 0.0 } else { unit.clamp(0.0, 1.0) };
        let jitter = Duration::try_from_secs_f64(self.jitter.as_secs_f64() * unit).unwrap_or(self.jitter);
        Some(self.base_delay(attempt).saturating_add(jitter))
    }

    /// `initial_delay * multiplier^attempt`, capped at `max_delay`; any overflow (or a result
    /// that is not a finite, non-negative duration) saturates at `max_delay`.
    fn base_delay(&self, attempt: u32) -> Duration {
        if self.initial_delay.is_zero() {
            return Duration::ZERO;
        }
        let secs = self.initial_delay.as_secs_f64() * self.multiplier.powf(f64::from(attempt));
        Duration::try_from_secs_f64(secs).map_or(self.max_delay, |delay| delay.min(self.max_delay))
    }
}

/// Whether an error should be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Try again after a delay (network down, timeout, hub busy).
    Transient,
    /// Do not retry in a loop (bad credentials, disabled device, invalid argument).
    Permanent,
}

/// Classifies an error: `Unauthorized`, `InvalidArgument`, `NotFound`, `Usage`, `Closed`,
/// `MessageTooLarge` are permanent; everything else transient.
pub fn classify(err: &Error) -> Retry {
    match err.kind() {
        ErrorKind::Unauthorized
        | ErrorKind::InvalidArgument
        | ErrorKind::NotFound
        | ErrorKind::Usage
        | ErrorKind::Closed
        | ErrorKind::MessageTooLarge => Retry::Permanent,
        _ => Retry::Transient,
    }
}

/// Tracks attempts of one retry loop (e.g. reconnecting). Pure state machine.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: RetryPolicy,
    attempt: u32,
    first_failure: Option<Duration>,
    connected_at: Option<Duration>,
}

impl Backoff {
    /// A fresh tracker for `policy`.
    pub fn new(policy: RetryPolicy) -> Backoff {
        Backoff { policy, attempt: 0, first_failure: None, connected_at: None }
    }

    /// Records a failure at monotonic time `now`; returns the delay before the next attempt, or
    /// `None` when the policy gives up. If the last connection (see [`Backoff::connected`]) lasted
    /// at least `healthy_after`, the attempt counter (and the elapsed-time clock) restarts from 0
    /// first. `unit` is the jitter draw, as in [`RetryPolicy::delay`].
    pub fn failed(&mut self, now: Duration, unit: f64) -> Option<Duration> {
        if let Some(connected_at) = self.connected_at.take() {
            if now.saturating_sub(connected_at) >= self.policy.healthy_after {
                self.attempt = 0;
                self.first_failure = None;
            }
        }
        let first_failure = *self.first_failure.get_or_insert(now);
        let delay = self.policy.delay(self.attempt, now.saturating_sub(first_failure), unit);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Records a successful connect at monotonic time `now`. Does not reset the counter by itself.
    pub fn connected(&mut self, now: Duration) {
        self.connected_at = Some(now);
    }

    /// The number of consecutive failed attempts so far.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    const fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn constructors() {
        let default = RetryPolicy::default();
        assert_eq!(
            default,
            RetryPolicy {
                initial_delay: secs(1),
                max_delay: secs(60),
                multiplier: 2.0,
                jitter: secs(1),
                max_elapsed: None,
                max_attempts: None,
                healthy_after: secs(10),
            }
        );
        assert_eq!(
            RetryPolicy::exponential(ms(100), secs(5)),
            RetryPolicy { initial_delay: ms(100), max_delay: secs(5), jitter: ms(50), ..default.clone() }
        );
        assert_eq!(
            RetryPolicy::fixed(secs(3)),
            RetryPolicy { initial_delay: secs(3), max_delay: secs(3), multiplier: 1.0, jitter: Duration::ZERO, ..default }
        );
    }

    #[test]
    fn delay_grows_exponentially_up_to_the_cap() {
        let policy = RetryPolicy::default();
        let delays: Vec<_> = (0..9).map(|attempt| policy.delay(attempt, Duration::ZERO, 0.0).unwrap()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60].map(secs));
        let policy = RetryPolicy::exponential(ms(100), secs(5));
        let delays: Vec<_> = (0..8).map(|attempt| policy.delay(attempt, Duration::ZERO, 0.0).unwrap()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000].map(ms));
    }

    #[test]
    fn delay_saturates_without_overflow() {
        let policy = RetryPolicy::default();
        for attempt in [31, 63, 64, 1023, 1024, 1_000_000, u32::MAX - 1, u32::MAX] {
            assert_eq!(policy.delay(attempt, Duration::ZERO, 0.0), Some(secs(60)), "{attempt}");
            assert_eq!(policy.delay(attempt, Duration::ZERO, 0.999_999), Some(secs(60) + Duration::from_micros(999_999)));
        }
        let huge = RetryPolicy { max_delay: Duration::MAX, jitter: Duration::MAX, ..RetryPolicy::default() };
        assert_eq!(huge.delay(u32::MAX, Duration::ZERO, 1.0), Some(Duration::MAX));
        for multiplier in [f64::NAN, f64::INFINITY, -2.0] {
            let odd = RetryPolicy { multiplier, ..RetryPolicy::default() };
            assert_eq!(odd.delay(u32::MAX, Duration::ZERO, 0.0), Some(secs(60)), "{multiplier}");
        }
        let zero = RetryPolicy { initial_delay: Duration::ZERO, jitter: Duration::ZERO, ..RetryPolicy::default() };
        assert_eq!(zero.delay(u32::MAX, Duration::ZERO, 0.5), Some(Duration::ZERO));
        let decaying = RetryPolicy { multiplier: 0.5, ..RetryPolicy::default() };
        assert_eq!(decaying.delay(1, Duration::ZERO, 0.0), Some(ms(500)));
    }

    #[test]
    fn jitter_is_bounded_and_proportional_to_unit() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.delay(2, Duration::ZERO, 0.0), Some(secs(4)));
        assert_eq!(policy.delay(2, Duration::ZERO, 0.5), Some(ms(4500)));
        assert_eq!(policy.delay(2, Duration::ZERO, 1.0), Some(secs(5)));
        for _ in 0..1000 {
            let delay = policy.delay(2, Duration::ZERO, fastrand::f64()).unwrap();
            assert!((secs(4)..secs(5)).contains(&delay), "{delay:?}");
        }
        // Out-of-range draws are clamped instead of panicking.
        assert_eq!(policy.delay(2, Duration::ZERO, -1.0), Some(secs(4)));
        assert_eq!(policy.delay(2, Duration::ZERO, f64::NAN), Some(secs(4)));
        assert_eq!(policy.delay(2, Duration::ZERO, 7.0), Some(secs(5)));
        assert_eq!(policy.delay(2, Duration::ZERO, f64::INFINITY), Some(secs(5)));
        // Fixed policies have no jitter.
        assert_eq!(RetryPolicy::fixed(secs(3)).delay(7, Duration::ZERO, 0.9), Some(secs(3)));
    }

    #[test]
    fn max_elapsed_gives_up() {
        let policy = RetryPolicy { max_elapsed: Some(secs(30)), ..RetryPolicy::default() };
        assert_eq!(policy.delay(0, ms(29_999), 0.0), Some(secs(1)));
        assert_eq!(policy.delay(0, secs(30), 0.0), None);
        assert_eq!(policy.delay(0, Duration::MAX, 0.0), None);
        assert!(RetryPolicy::default().delay(0, Duration::MAX, 0.0).is_some());
    }

    #[test]
    fn max_attempts_gives_up() {
        let policy = RetryPolicy { max_attempts: Some(3), ..RetryPolicy::default() };
        assert_eq!(policy.delay(2, Duration::ZERO, 0.0), Some(secs(4)));
        assert_eq!(policy.delay(3, Duration::ZERO, 0.0), None);
        assert_eq!(policy.delay(u32::MAX, Duration::ZERO, 0.0), None);
        for attempt in [0, 1, u32::MAX] {
            assert_eq!(RetryPolicy::none().delay(attempt, Duration::ZERO, 0.0), None);
        }
    }

    #[test]
    fn classify_kinds() {
        use ErrorKind::*;
        for kind in [Unauthorized, InvalidArgument, NotFound, Usage, Closed, MessageTooLarge] {
            assert_eq!(classify(&Error::new(kind, "x")), Retry::Permanent, "{kind}");
        }
        for kind in [AlreadyExists, QueueFull, Timeout, Disconnected, Storage, Protocol, Expired, LockLost, Internal] {
            assert_eq!(classify(&Error::new(kind, "x")), Retry::Transient, "{kind}");
        }
    }

    #[test]
    fn backoff_grows_and_counts_attempts() {
        let mut backoff = Backoff::new(RetryPolicy::default());
        assert_eq!(backoff.attempt(), 0);
        let delays: Vec<_> = (0..8).map(|i| backoff.failed(secs(i), 0.0).unwrap()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60].map(secs));
        assert_eq!(backoff.attempt(), 8);
    }

    #[test]
    fn backoff_gives_up_by_attempts_and_elapsed_time() {
        let mut backoff = Backoff::new(RetryPolicy { max_attempts: Some(2), ..RetryPolicy::default() });
        assert_eq!(backoff.failed(secs(0), 0.0), Some(secs(1)));
        assert_eq!(backoff.failed(secs(1), 0.0), Some(secs(2)));
        assert_eq!(backoff.failed(secs(3), 0.0), None);

        // Elapsed time counts from the first failure, not from time zero.
        let mut backoff = Backoff::new(RetryPolicy { max_elapsed: Some(secs(10)), ..RetryPolicy::default() });
        assert_eq!(backoff.failed(secs(100), 0.0), Some(secs(1)));
        assert_eq!(backoff.failed(secs(109), 0.0), Some(secs(2)));
        assert_eq!(backoff.failed(secs(110), 0.0), None);

        assert_eq!(Backoff::new(RetryPolicy::none()).failed(secs(0), 0.0), None);
    }

    #[test]
    fn short_connections_keep_the_backoff_growing() {
        // A hub that accepts and then kicks the client must not cause a reconnect storm.
        let mut backoff = Backoff::new(RetryPolicy::default());
        let mut now = secs(0);
        let mut delays = Vec::new();
        for _ in 0..4 {
            delays.push(backoff.failed(now, 0.0).unwrap());
            now += delays[delays.len() - 1];
            backoff.connected(now);
            now += secs(1);
        }
        assert_eq!(delays, [1, 2, 4, 8].map(secs));
        assert_eq!(backoff.failed(now, 0.0), Some(secs(16)));
        assert_eq!(backoff.attempt(), 5);
    }

    #[test]
    fn a_healthy_connection_resets_the_backoff() {
        let policy = RetryPolicy { max_elapsed: Some(secs(60)), ..RetryPolicy::default() };
        let mut backoff = Backoff::new(policy);
        assert_eq!(backoff.failed(secs(0), 0.0), Some(secs(1)));
        assert_eq!(backoff.failed(secs(1), 0.0), Some(secs(2)));
        assert_eq!(backoff.failed(secs(3), 0.0), Some(secs(4)));
        backoff.connected(secs(7));
        // Up 15 s ≥ healthy_after (10 s): start over, including the max-elapsed clock.
        assert_eq!(backoff.failed(secs(22), 0.0), Some(secs(1)));
        assert_eq!(backoff.attempt(), 1);
        assert_eq!(backoff.failed(secs(81), 0.0), Some(secs(2)), "59 s after the failure at 22 s");
        assert_eq!(backoff.failed(secs(82), 0.0), None, "60 s after the failure at 22 s");

        // Exactly healthy_after counts as healthy; the connection is used up by one failure.
        let mut backoff = Backoff::new(RetryPolicy::default());
        backoff.failed(secs(0), 0.0);
        backoff.failed(secs(1), 0.0);
        backoff.connected(secs(10));
        assert_eq!(backoff.failed(secs(20), 0.0), Some(secs(1)));
        assert_eq!(backoff.failed(secs(40), 0.0), Some(secs(2)), "no reconnect in between: keeps growing");
    }
}
