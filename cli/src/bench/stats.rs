//! Accounting for the bench: which message ids arrived (none missing, duplicates counted),
//! latency samples and their percentiles, and arrivals over time.

use std::time::{Duration, Instant};

/// Tracks message ids `(device, seq)` with known counts per device.
pub struct IdTracker {
    seen: Vec<Vec<u8>>,
    unique: u64,
    duplicates: u64,
    unknown: u64,
    expected: u64,
}

impl IdTracker {
    /// `per_device[d]` messages numbered `0..per_device[d]` are expected from device `d`.
    pub fn new(per_device: &[u64]) -> IdTracker {
        IdTracker {
            seen: per_device.iter().map(|&n| vec![0u8; n as usize]).collect(),
            unique: 0,
            duplicates: 0,
            unknown: 0,
            expected: per_device.iter().sum(),
        }
    }

    /// Records one arrival; returns true the first time this id arrives.
    pub fn record(&mut self, device: usize, seq: u64) -> bool {
        let Some(slot) = self.seen.get_mut(device).and_then(|v| v.get_mut(seq as usize)) else {
            self.unknown += 1;
            return false;
        };
        *slot = slot.saturating_add(1);
        if *slot == 1 {
            self.unique += 1;
            true
        } else {
            self.duplicates += 1;
            false
        }
    }

    /// Records an id of the form `{device}-{seq}`.
    pub fn record_id(&mut self, id: Option<&str>) -> bool {
        match id.and_then(parse_id) {
            Some((d, s)) => self.record(d, s),
            None => {
                self.unknown += 1;
                false
            }
        }
    }

    /// Number of devices.
    pub fn devices(&self) -> usize {
        self.seen.len()
    }

    /// Whether every expected id arrived.
    pub fn complete(&self) -> bool {
        self.unique == self.expected
    }

    /// `(device, ids missing, first missing seq)` for every device with something missing.
    pub fn missing_by_device(&self) -> Vec<(usize, u64, u64)> {
        self.seen
            .iter()
            .enumerate()
            .filter_map(|(d, v)| {
                let first = v.iter().position(|&c| c == 0)? as u64;
                Some((d, v.iter().filter(|&&c| c == 0).count() as u64, first))
            })
            .collect()
    }

    /// The accounting so far.
    pub fn counts(&self) -> Counts {
        Counts {
            expected: self.expected,
            received: self.unique,
            missing: self.expected - self.unique,
            duplicates: self.duplicates,
            unknown: self.unknown,
        }
    }
}

/// What an [`IdTracker`] saw.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Counts {
    /// Ids sent.
    pub expected: u64,
    /// Distinct expected ids received.
    pub received: u64,
    /// Expected ids never received.
    pub missing: u64,
    /// Arrivals of an id already received.
    pub duplicates: u64,
    /// Arrivals with an id that was never sent.
    pub unknown: u64,
}

/// The message id the bench gives message `seq` of device `device`.
pub fn message_id(device: usize, seq: u64) -> String {
    format!("{device}-{seq}")
}

/// Parses [`message_id`].
pub fn parse_id(id: &str) -> Option<(usize, u64)> {
    let (d, s) = id.split_once('-')?;
    Some((d.parse().ok()?, s.parse().ok()?))
}

/// Latency samples in nanoseconds.
#[derive(Default, Clone)]
pub struct Samples(pub Vec<u64>);

/// Percentiles of a [`Samples`] set, in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    /// Samples.
    pub count: usize,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Samples {
    /// Adds a sample.
    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_nanos() as u64);
    }

    /// Sorts the samples (needed before [`Samples::quantile`]).
    pub fn sort(&mut self) {
        self.0.sort_unstable();
    }

    /// The `q` quantile (0..=1) of sorted samples, nearest rank, in ms.
    pub fn quantile(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let rank = ((q * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        ms(self.0[rank - 1])
    }

    /// Sorts and summarizes.
    pub fn summary(&mut self) -> Summary {
        self.sort();
        let n = self.0.len();
        let mean = if n == 0 { 0.0 } else { self.0.iter().map(|&x| x as f64).sum::<f64>() / n as f64 / 1e6 };
        Summary {
            count: n,
            mean_ms: round(mean),
            p50_ms: round(self.quantile(0.50)),
            p90_ms: round(self.quantile(0.90)),
            p99_ms: round(self.quantile(0.99)),
            p999_ms: round(self.quantile(0.999)),
            max_ms: round(self.0.last().map_or(0.0, |&x| ms(x))),
        }
    }

    /// Points `(percentile, ms)` for a latency-distribution plot, dense towards the tail.
    pub fn percentile_curve(&self) -> Vec<(f64, f64)> {
        let mut out = Vec::new();
        if self.0.is_empty() {
            return out;
        }
        // x = 1 - 10^-k for k in 0.3 .. 5 in small steps (50 % … 99.999 %).
        let mut k = 0.0f64;
        while k <= 5.0 {
            let q = 1.0 - 10f64.powf(-k);
            if q >= 0.0 && (q * self.0.len() as f64) >= 1.0 {
                out.push((q * 100.0, self.quantile(q)));
            }
            k += 0.05;
        }
        out.push((100.0, ms(*self.0.last().expect("not empty"))));
        out
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// Rounds to 3 decimals (µs resolution for ms values).
pub fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Arrivals per time bucket since a start instant (for throughput-over-time plots).
pub struct Timeline {
    start: Instant,
    bucket: Duration,
    counts: Vec<u32>,
}

impl Timeline {
    /// Buckets of `bucket` from `start`.
    pub fn new(start: Instant, bucket: Duration) -> Timeline {
        Timeline { start, bucket, counts: Vec::new() }
    }

    /// Counts one arrival now.
    pub fn tick(&mut self, now: Instant) {
        let i = (now.saturating_duration_since(self.start).as_nanos() / self.bucket.as_nanos()) as usize;
        if i >= self.counts.len() {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] += 1;
    }

    /// `(seconds since start, messages per second)` per bucket.
    pub fn rates(&self) -> Vec<(f64, f64)> {
        let b = self.bucket.as_secs_f64();
        self.counts.iter().enumerate().map(|(i, &c)| (round((i as f64 + 1.0) * b), c as f64 / b)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_missing_and_duplicates() {
        let mut t = IdTracker::new(&[2, 3]);
        assert!(t.record_id(Some("0-0")));
        assert!(!t.record_id(Some("0-0")));
        assert!(t.record_id(Some("1-2")));
        assert!(!t.record_id(Some("1-3")));
        assert!(!t.record_id(Some("junk")));
        let c = t.counts();
        assert_eq!((c.expected, c.received, c.missing, c.duplicates, c.unknown), (5, 2, 3, 1, 2));
        assert!(!t.complete());
        for id in ["0-1", "1-0", "1-1"] {
            t.record_id(Some(id));
        }
        assert!(t.complete());
    }

    #[test]
    fn percentiles_nearest_rank() {
        let mut s = Samples((1..=1000u64).map(|i| i * 1_000_000).collect());
        let sum = s.summary();
        assert_eq!(sum.p50_ms, 500.0);
        assert_eq!(sum.p99_ms, 990.0);
        assert_eq!(sum.p999_ms, 999.0);
        assert_eq!(sum.max_ms, 1000.0);
        assert_eq!(sum.count, 1000);
        assert!(s.percentile_curve().last().unwrap().1 == 1000.0);
    }

    #[test]
    fn timeline_rates() {
        let t0 = Instant::now();
        let mut t = Timeline::new(t0, Duration::from_millis(100));
        t.tick(t0 + Duration::from_millis(10));
        t.tick(t0 + Duration::from_millis(150));
        t.tick(t0 + Duration::from_millis(160));
        assert_eq!(t.rates(), vec![(0.1, 10.0), (0.2, 20.0)]);
    }
}
