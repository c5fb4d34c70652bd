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
        todo!()
    }
}

impl RetryPolicy {
    /// Exponential backoff with the given bounds (jitter = initial / 2 … the default rule).
    pub fn exponential(initial: Duration, max: Duration) -> RetryPolicy {
        todo!()
    }

    /// The same delay every time, no jitter.
    pub fn fixed(delay: Duration) -> RetryPolicy {
        todo!()
    }

    /// Never retry.
    pub fn none() -> RetryPolicy {
        todo!()
    }

    /// The delay before retry number `attempt` (0-based), given `elapsed` since the first failure
    /// and a random `unit` in `[0,1)` for the jitter; `None` when the policy gives up. Overflow-safe
    /// for any attempt (saturates at `max_delay`).
    pub fn delay(&self, attempt: u32, elapsed: Duration, unit: f64) -> Option<Duration> {
        todo!()
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
    todo!()
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
        todo!()
    }

    /// Records a failure at monotonic time `now`; returns the delay before the next attempt, or
    /// `None` when the policy gives up. If the last connection (see [`Backoff::connected`]) lasted
    /// at least `healthy_after`, the attempt counter restarts from 0 first.
    pub fn failed(&mut self, now: Duration, unit: f64) -> Option<Duration> {
        todo!()
    }

    /// Records a successful connect at monotonic time `now`. Does not reset the counter by itself.
    pub fn connected(&mut self, now: Duration) {
        todo!()
    }

    /// The number of consecutive failed attempts so far.
    pub fn attempt(&self) -> u32 {
        todo!()
    }
}
