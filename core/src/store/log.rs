//! Segmented append-only log with CRC32C-framed records and group commit.
//!
//! Invariants:
//! - sequence numbers are dense: the first record ever is 1, each append is previous + 1;
//! - readers ([`Log::read`]) and the [`Log::durable`] watch never see a record before it is
//!   durable per the [`Durability`] setting;
//! - the ack watermark never passes the last durable record; a segment is deleted only when every
//!   record in it is at or below the watermark (or removed by retention);
//! - recovery truncates a torn or corrupt tail of the last segment instead of failing.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use crate::error::Result;

/// When an appended record counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fdatasync before the record is acknowledged (group commit: concurrent appends share one).
    Always,
    /// Acknowledged once written to the OS; fdatasync in the background every interval.
    Interval(Duration),
    /// Acknowledged once written to the OS; never fdatasync'd explicitly.
    Never,
}

impl std::str::FromStr for Durability {
    type Err = crate::Error;
    /// `always`, `never`, `interval` (100 ms) or `interval:250ms`.
    fn from_str(s: &str) -> Result<Durability> {
        todo!()
    }
}

/// Options for [`Log::open`].
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Roll to a new segment file once the current one reaches this size. Default 64 MiB.
    pub segment_bytes: u64,
    /// Durability setting. Default [`Durability::Always`].
    pub durability: Durability,
    /// Largest payload accepted by [`Log::append`] (`MessageTooLarge` above). Default 1 MiB.
    pub max_record_bytes: usize,
}

impl Default for LogOptions {
    fn default() -> Self {
        todo!()
    }
}

/// One stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number (dense, from 1).
    pub seq: u64,
    /// Append time, ms since the Unix epoch.
    pub timestamp_ms: u64,
    /// The bytes given to [`Log::append`].
    pub payload: Bytes,
}

/// What a segment file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// First sequence number in the segment.
    pub first_seq: u64,
    /// Last sequence number in the segment (first_seq - 1 when empty).
    pub last_seq: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// Timestamp of the last record (ms since the Unix epoch), 0 when empty.
    pub last_timestamp_ms: u64,
}

/// Counters for observability.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Records appended since open.
    pub appended: u64,
    /// fdatasync calls since open (appended / syncs = group-commit batching factor).
    pub syncs: u64,
    /// Bytes written since open.
    pub bytes_written: u64,
    /// Bytes discarded by recovery at open (torn / corrupt tail).
    pub recovered_truncated_bytes: u64,
}

/// A handle to one log. Cheap to clone; all clones share one writer thread.
#[derive(Clone)]
pub struct Log {
    _private: (),
}

impl Log {
    /// Opens (creating the directory if needed) and recovers the log in `dir`.
    pub fn open(dir: &Path, opts: LogOptions) -> Result<Log> {
        todo!()
    }

    /// Appends one record and returns its sequence number without waiting for durability.
    pub fn append(&self, payload: &[u8]) -> Result<u64> {
        todo!()
    }

    /// Waits until record `seq` is durable. Errors with `Storage` if its write failed.
    pub async fn wait_durable(&self, seq: u64) -> Result<()> {
        todo!()
    }

    /// Blocking form of [`Log::wait_durable`] (must not be called on a tokio runtime thread).
    pub fn wait_durable_blocking(&self, seq: u64) -> Result<()> {
        todo!()
    }

    /// A watch of the highest durable sequence number (0 when none).
    pub fn durable(&self) -> tokio::sync::watch::Receiver<u64> {
        todo!()
    }

    /// Records with `seq >= from`, up to the durable head, at most `max_records` and about
    /// `max_bytes` (always at least one record if any is available).
    pub fn read(&self, from: u64, max_records: usize, max_bytes: usize) -> Result<Vec<Record>> {
        todo!()
    }

    /// The first sequence number still stored (after deletions); `last_seq() + 1` when empty.
    pub fn first_seq(&self) -> u64 {
        todo!()
    }

    /// The last sequence number appended (0 when nothing was ever appended).
    pub fn last_seq(&self) -> u64 {
        todo!()
    }

    /// The first sequence number whose timestamp is `>= ms` (`last_seq() + 1` if none).
    pub fn seek_time(&self, ms: u64) -> Result<u64> {
        todo!()
    }

    /// Marks every record `<= seq` consumed; persists the watermark and deletes fully consumed
    /// segments. Never moves backwards; clamps to the durable head.
    pub fn ack_through(&self, seq: u64) -> Result<()> {
        todo!()
    }

    /// The ack watermark (0 when nothing was acked).
    pub fn acked(&self) -> u64 {
        todo!()
    }

    /// Retention: deletes whole segments whose last record is `< seq` (never the active one).
    /// Returns how many records were removed.
    pub fn truncate_before(&self, seq: u64) -> Result<u64> {
        todo!()
    }

    /// The segments, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        todo!()
    }

    /// Counters.
    pub fn stats(&self) -> LogStats {
        todo!()
    }

    /// Writes and syncs everything appended so far, then stops the writer thread. Further
    /// appends fail with `Closed`. Idempotent.
    pub fn close(&self) -> Result<()> {
        todo!()
    }
}
