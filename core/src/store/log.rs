//! Segmented append-only log with CRC32C-framed records, pipelined group commit and a sparse
//! index.
//!
//! Invariants:
//! - sequence numbers increase by one per append and are never reused: after a crash the log
//!   continues after the highest number any record, cut tail, the ack watermark or the caller's
//!   floor (`LogOptions::min_next_seq`) has seen; a range that went missing is reported as
//!   [`Damage`], never silently renumbered;
//! - readers ([`Log::read`]) and the [`Log::durable`] watch never see a record before it is
//!   durable per the [`Durability`] setting; [`Log::synced`] never runs ahead of what an
//!   fdatasync confirmed, and the ack watermark never passes it;
//! - at most one write and one fdatasync of a log are in flight at a time (a write may run while
//!   the previous fdatasync is in flight: pipelined group commit); rolling to a new segment
//!   first fsyncs the old one in every durability mode, so unsynced data is only ever in the
//!   active segment;
//! - a failed write or fdatasync never leaves the log unusable: the unsynced bytes are re-read,
//!   verified, truncated away and written again until the disk takes them (fsyncgate: a retried
//!   fdatasync alone proves nothing); only if they cannot be re-read intact is the log poisoned;
//! - a segment is deleted only when every record in it is at or below the persisted ack
//!   watermark (or removed by retention), never the active one; opening never modifies a sealed
//!   segment.
//!
//! The I/O runs on the store's shared thread pool (`exec.rs`). `append` copies the frame into a
//! pending buffer under a short lock and never does I/O; a pool thread takes the whole buffer,
//! writes it with one `pwrite`, and for `Always` fdatasyncs once for everything written —
//! everything appended while that fdatasync runs is written meanwhile and shares the next one.
//! The pending buffer is bounded (`max_pending_bytes`): a full buffer refuses appends with
//! `QueueFull`, and [`Log::wait_for_room`] waits until there is room (back-pressure).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, MutexGuard};
use tokio::sync::watch;

use super::exec::{Exec, Job, Pool};
use super::format::{self, IndexEntry, Version, FRAME_HEADER, INDEX_STRIDE, SEG_HEADER};
use super::io::{self, create_dir_durable, io_err, lock_dir, FileIo, Fs};
use super::recover::{self, segment_name, Damage, DamageKind, Found, Mode, ACK_FILE, INDEX_SUFFIX};
use crate::error::{Error, ErrorKind, Result};
use crate::message::now_ms;

/// How long a failed write or fdatasync waits before it is tried again (doubling to 2 s).
const RETRY: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// The ack watermark is written once it moved this many records past the written one, or this
/// long after the last write, whichever comes first (and on close / [`Log::flush_ack`]): a
/// crash re-sends at most about that much, and a busy log adds one fdatasync per 1,024 records.
const ACK_BATCH: u64 = 1024;
const ACK_EVERY: Duration = Duration::from_secs(1);
/// Free space is checked at most this often while writing (with a reserve set).
const SPACE_EVERY: Duration = Duration::from_millis(50);

/// When an appended record counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fdatasync before the record is acknowledged (group commit: concurrent appends share one).
    Always,
    /// Acknowledged once written to the OS; fdatasync in the background every interval, so a
    /// power loss loses at most about that much of the newest appends.
    Interval(Duration),
    /// Acknowledged once written to the OS; fdatasync'd only when a segment fills up and on
    /// close. After a power loss the log still opens with a consistent prefix.
    Never,
}

impl std::str::FromStr for Durability {
    type Err = crate::Error;
    /// `always`, `never`, `interval` (100 ms) or `interval:250ms` / `interval:1s`.
    fn from_str(s: &str) -> Result<Durability> {
        let bad = || Error::invalid(format!("durability '{s}' is not always, never, interval or interval:<N>ms|s"));
        match s {
            "always" => Ok(Durability::Always),
            "never" => Ok(Durability::Never),
            "interval" => Ok(Durability::Interval(Duration::from_millis(100))),
            _ => {
                let spec = s.strip_prefix("interval:").ok_or_else(bad)?;
                let d = if let Some(ms) = spec.strip_suffix("ms") {
                    Duration::from_millis(ms.parse().map_err(|_| bad())?)
                } else if let Some(secs) = spec.strip_suffix('s') {
                    Duration::from_secs(secs.parse().map_err(|_| bad())?)
                } else {
                    return Err(bad());
                };
                if d.is_zero() {
                    return Err(bad());
                }
                Ok(Durability::Interval(d))
            }
        }
    }
}

/// What opening a log does when a record is damaged and valid records follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDamage {
    /// Open read-only up to the damage: reads work, appends fail with an error naming the file
    /// and offset until `hubmsg store repair` quarantines it. Default.
    ReadOnly,
    /// Quarantine the damaged segment (copied aside into `quarantine/`, never deleted), keep
    /// every valid record, and open normally. For stores without an operator (device outboxes).
    Quarantine,
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
    /// Most bytes appended and not yet written; beyond, appends fail with `QueueFull` (wait with
    /// [`Log::wait_for_room`]). Default 64 MiB.
    pub max_pending_bytes: usize,
    /// Appends fail with `Storage` while the file system has less free space than this, so the
    /// space left serves other stores (the hub keeps C2D settles and checkpoints working when
    /// its disk fills with D2C events). Writing resumes by itself when space is freed.
    /// Default 0 (no reserve).
    pub reserve_bytes: u64,
    /// New records get at least this sequence number: what a checkpoint, ack watermark or
    /// snapshot kept outside the log has seen, + 1. Default 0.
    pub min_next_seq: u64,
    /// What to do with damage found when opening. Default [`OnDamage::ReadOnly`].
    pub on_damage: OnDamage,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_bytes: 64 * 1024 * 1024,
            durability: Durability::Always,
            max_record_bytes: 1024 * 1024,
            max_pending_bytes: 64 * 1024 * 1024,
            reserve_bytes: 0,
            min_next_seq: 0,
            on_damage: OnDamage::ReadOnly,
        }
    }
}

/// One stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number.
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
    /// Bytes discarded by recovery at open (a torn tail).
    pub recovered_truncated_bytes: u64,
    /// Writes that failed (e.g. ENOSPC) and were retried.
    pub write_failures: u64,
    /// fdatasyncs that failed (EIO) and whose data was written again.
    pub sync_failures: u64,
    /// Times the ack watermark was written.
    pub ack_writes: u64,
    /// The ack watermark as last written to disk.
    pub ack_persisted: u64,
}

/// Where a log does its I/O: the file system seam and the executor.
#[derive(Clone)]
pub(crate) struct Env {
    pub fs: Arc<dyn Fs>,
    pub exec: Exec,
}

impl Env {
    /// The real file system and the process's store thread pool.
    pub(crate) fn real() -> Env {
        Env { fs: io::real(), exec: Exec::Pool(Pool::global()) }
    }
}

struct Segment {
    first_seq: u64,
    path: PathBuf,
    file: Arc<dyn FileIo>,
    version: Version,
    /// Last record written (first_seq - 1 when empty).
    last_seq: u64,
    /// Bytes written (header and whole frames).
    len: u64,
    first_ts: u64,
    last_ts: u64,
    /// Sparse index: the first record, then one per `INDEX_STRIDE` bytes.
    index: Vec<IndexEntry>,
    /// Records `a..=b` after the readable prefix are damaged.
    damaged: Option<(u64, u64)>,
}

impl Segment {
    fn from_found(f: Found) -> Segment {
        Segment {
            first_seq: f.first_seq,
            path: f.path,
            file: f.file,
            version: f.version,
            last_seq: f.last_seq,
            len: f.len,
            first_ts: f.first_ts,
            last_ts: f.last_ts,
            index: f.index,
            damaged: f.damaged,
        }
    }
    fn is_empty(&self) -> bool {
        self.last_seq < self.first_seq
    }
    fn info(&self) -> SegmentInfo {
        SegmentInfo { first_seq: self.first_seq, last_seq: self.last_seq, bytes: self.len, last_timestamp_ms: self.last_ts }
    }
    fn sidecar(&self) -> format::SegmentIndex {
        format::SegmentIndex::of(self.first_seq, self.last_seq, self.len, (self.first_ts, self.last_ts), &self.index)
    }
}

#[derive(Clone, Copy)]
struct Meta {
    seq: u64,
    ts: u64,
    len: u32,
}

struct Failure {
    why: String,
    /// An fdatasync failed: the unsynced bytes must be verified and written again.
    resync: bool,
    next_try: Instant,
    delay: Duration,
}

struct State {
    next_seq: u64,
    pending: Vec<u8>,
    pending_meta: Vec<Meta>,
    writing: bool,
    syncing: bool,
    /// A write already ran while the current fdatasync is in flight.
    wrote_during_sync: bool,
    /// Last record written to the OS.
    written: u64,
    /// Last record an fdatasync confirmed.
    synced: u64,
    /// Bytes of the active segment an fdatasync confirmed.
    synced_off: u64,
    /// A segment file was created and the directory not fsync'd since.
    dir_dirty: bool,
    /// Last record readers may see.
    durable: u64,
    failing: Option<Failure>,
    poisoned: Option<String>,
    /// Damage found when opening (appends refused until repaired).
    read_only: Option<Damage>,
    low_space: Option<String>,
    space_checked: Option<Instant>,
    closed: bool,
    final_try_done: bool,
    /// `Log::sync` asked for an fdatasync through this sequence number (in any durability mode);
    /// met once `synced` reaches it. A target, not a flag: a sync that finishes while later
    /// records of the request are still being written must not end the request.
    sync_to: u64,
    segments: Vec<Segment>,
    /// Ack watermark requested (<= synced).
    acked: u64,
    ack_busy: bool,
    ack_counter: u64,
    ack_file: Option<Arc<dyn FileIo>>,
    ack_next: Instant,
    ack_flush: bool,
    /// The last ack write failed (retried on its timer, not in a loop).
    ack_error: bool,
    interval_due: Option<Instant>,
    queued: bool,
    timer_at: Option<Instant>,
    damage: Vec<Damage>,
    stats: LogStats,
    /// Recent read positions (segment first seq, next seq, offset) for sequential readers.
    hints: [(u64, u64, u64); 8],
    hint_next: usize,
    lock: Option<Box<dyn std::any::Any + Send + Sync>>,
}

struct Shared {
    dir: PathBuf,
    opts: LogOptions,
    env: Env,
    me: Weak<Shared>,
    state: Mutex<State>,
    /// Notified on every change of state (progress, failure, close).
    cond: Condvar,
    durable_tx: watch::Sender<u64>,
    synced_tx: watch::Sender<u64>,
    /// Bumped on every progress or failure, for async waiters.
    events: watch::Sender<u64>,
}

struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.shared.close();
    }
}

/// A handle to one log. Cheap to clone; all clones share the log.
#[derive(Clone)]
pub struct Log {
    h: Arc<Handle>,
}

/// One round of I/O, chosen under the lock and done outside it.
enum Action {
    Write { file: Arc<dyn FileIo>, off: u64, header: Option<u64>, buf: Vec<u8>, meta: Vec<Meta> },
    Sync { file: Arc<dyn FileIo>, seq: u64, off: u64, dir: bool },
    Roll { old: Arc<dyn FileIo>, sidecar: Option<(PathBuf, format::SegmentIndex)>, next_first: u64, sync_old: bool },
    Resync { file: Arc<dyn FileIo>, path: PathBuf, from: u64, to: u64, first: u64, last: u64, dir: bool },
    Ack { seq: u64, file: Option<Arc<dyn FileIo>>, counter: u64 },
    Space,
}

fn sync_err(path: &Path, e: std::io::Error) -> String {
    format!("fdatasync of {} failed: {e}", path.display())
}

impl Shared {
    /// The time as the executor sees it (virtual for the deterministic inline executor).
    fn now(&self) -> Instant {
        self.env.exec.now()
    }

    fn always(&self) -> bool {
        self.opts.durability == Durability::Always
    }

    fn notify(&self) {
        self.cond.notify_all();
        self.events.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Publishes durability after a write or sync.
    fn publish(&self, st: &mut State) {
        let d = if self.always() { st.synced } else { st.written };
        if d > st.durable {
            st.durable = d;
            self.durable_tx.send_replace(d);
        }
        if *self.synced_tx.borrow() < st.synced {
            self.synced_tx.send_replace(st.synced);
        }
    }

    fn kick(self: &Arc<Self>, st: &mut State) -> bool {
        if st.queued {
            return false;
        }
        st.queued = true;
        true
    }

    fn submit(self: &Arc<Self>) {
        self.env.exec.submit(self.clone());
    }

    fn fail(&self, st: &mut State, why: String, resync: bool) {
        let delay = st.failing.as_ref().map_or(RETRY, |f| (f.delay * 2).min(RETRY_MAX));
        tracing::error!(dir = %self.dir.display(), error = %why, retry_in = ?delay, "log I/O failed; appends are refused until it succeeds again");
        st.failing = Some(Failure { why, resync, next_try: self.now() + delay, delay });
    }

    fn poison(&self, st: &mut State, why: String) {
        tracing::error!(dir = %self.dir.display(), error = %why, "log poisoned: it must be reopened");
        st.poisoned = Some(why);
    }

    /// Chooses the next action (marking what it occupies), or `None`.
    fn pick(&self, st: &mut State) -> Option<Action> {
        if st.poisoned.is_some() || (st.closed && st.lock.is_none()) {
            return None; // a closed log's directory may belong to a new opener already
        }
        let now = self.now();
        if let Some(f) = &st.failing {
            if st.writing || st.syncing {
                return None;
            }
            let due = now >= f.next_try || (st.closed && !st.final_try_done);
            if !due {
                return None;
            }
            if st.closed {
                st.final_try_done = true;
            }
            if f.resync {
                return self.pick_resync(st);
            }
            st.failing = None; // try the write again
        }
        if let Some(a) = self.pick_write(st) {
            return Some(a);
        }
        if !st.syncing && (st.written > st.synced || st.dir_dirty) {
            let due = match self.opts.durability {
                Durability::Always => true,
                Durability::Interval(_) => st.interval_due.is_some_and(|d| now >= d),
                Durability::Never => false,
            };
            if due || st.closed || st.synced < st.sync_to {
                let seg = st.segments.last().expect("an active segment");
                st.syncing = true;
                st.wrote_during_sync = false;
                return Some(Action::Sync { file: seg.file.clone(), seq: st.written, off: seg.len, dir: st.dir_dirty });
            }
        }
        let ack_persisted = st.stats.ack_persisted;
        let urgent = (st.closed || st.ack_flush || st.acked - ack_persisted >= ACK_BATCH) && !st.ack_error;
        if st.acked > ack_persisted && !st.ack_busy && (urgent || now >= st.ack_next) {
            st.ack_busy = true;
            return Some(Action::Ack { seq: st.acked, file: st.ack_file.clone(), counter: st.ack_counter + 1 });
        }
        if st.low_space.is_some() && st.space_checked.is_none_or(|t| now >= t + RETRY) {
            st.space_checked = Some(now);
            return Some(Action::Space);
        }
        None
    }

    fn pick_write(&self, st: &mut State) -> Option<Action> {
        if st.writing || st.pending.is_empty() || st.failing.is_some() {
            return None;
        }
        let seg = st.segments.last().expect("an active segment");
        let first = st.pending_meta[0];
        let frame = first.len as u64;
        let need_roll = !seg.is_empty() && seg.len + frame > self.opts.segment_bytes;
        if need_roll {
            if st.syncing {
                return None; // the syncing thread rolls once its fdatasync is done
            }
            st.writing = true;
            st.syncing = true;
            let sync_old = st.written > st.synced || st.dir_dirty || st.synced_off < seg.len;
            let sidecar = (seg.version == Version::V2).then(|| (index_path(&seg.path), seg.sidecar()));
            return Some(Action::Roll { old: seg.file.clone(), sidecar, next_first: first.seq, sync_old });
        }
        // Take the records that fit in the active segment (at least one).
        let base = seg.len.max(SEG_HEADER as u64);
        let mut n = 0;
        let mut bytes = 0u64;
        for m in &st.pending_meta {
            if n > 0 && base + bytes + m.len as u64 > self.opts.segment_bytes {
                break;
            }
            bytes += m.len as u64;
            n += 1;
        }
        let (buf, meta) = if n == st.pending_meta.len() {
            (std::mem::take(&mut st.pending), std::mem::take(&mut st.pending_meta))
        } else {
            let rest = st.pending.split_off(bytes as usize);
            let rest_meta = st.pending_meta.split_off(n);
            (std::mem::replace(&mut st.pending, rest), std::mem::replace(&mut st.pending_meta, rest_meta))
        };
        let header = (seg.len == 0).then_some(seg.first_seq);
        st.writing = true;
        if st.syncing {
            st.wrote_during_sync = true;
        }
        Some(Action::Write { file: seg.file.clone(), off: base, header, buf, meta })
    }

    fn pick_resync(&self, st: &mut State) -> Option<Action> {
        let seg = st.segments.last().expect("an active segment");
        st.writing = true;
        st.syncing = true;
        Some(Action::Resync {
            file: seg.file.clone(),
            path: seg.path.clone(),
            from: st.synced_off,
            to: seg.len,
            first: st.synced + 1,
            last: st.written,
            dir: st.dir_dirty,
        })
    }

    fn perform(&self, a: Action) {
        match a {
            Action::Write { file, off, header, buf, meta } => self.do_write(file, off, header, buf, meta),
            Action::Sync { file, seq, off, dir } => self.do_sync(file, seq, off, dir),
            Action::Roll { old, sidecar, next_first, sync_old } => self.do_roll(old, sidecar, next_first, sync_old),
            Action::Resync { file, path, from, to, first, last, dir } => self.do_resync(file, path, from, to, first, last, dir),
            Action::Ack { seq, file, counter } => self.do_ack(seq, file, counter),
            Action::Space => {
                let free = self.env.fs.free_bytes(&self.dir);
                let mut st = self.state.lock();
                self.note_space(&mut st, free);
            }
        }
    }

    fn note_space(&self, st: &mut State, free: std::io::Result<u64>) {
        let Ok(free) = free else { return };
        if free < self.opts.reserve_bytes {
            if st.low_space.is_none() {
                tracing::error!(dir = %self.dir.display(), free, reserve = self.opts.reserve_bytes, "disk space below the reserve; refusing appends until space is freed");
            }
            st.low_space = Some(format!(
                "the disk holding {} has {} KiB free, below the reserve of {} KiB kept for other stores; free disk space and appends resume by themselves",
                self.dir.display(),
                free / 1024,
                self.opts.reserve_bytes / 1024
            ));
        } else if st.low_space.take().is_some() {
            tracing::info!(dir = %self.dir.display(), free, "disk space is back above the reserve; appends resume");
            self.notify();
        }
    }

    fn do_write(&self, file: Arc<dyn FileIo>, off: u64, header: Option<u64>, buf: Vec<u8>, meta: Vec<Meta>) {
        let mut r = Ok(());
        if let Some(first) = header {
            r = file.write_at(&format::segment_header(first), 0);
        }
        if r.is_ok() {
            r = file.write_at(&buf, off);
        }
        let free = (self.opts.reserve_bytes > 0).then(|| self.env.fs.free_bytes(&self.dir));
        let mut st = self.state.lock();
        st.writing = false;
        if let Err(e) = r {
            // Nothing of this batch counts as written: put it back in front, in order. The
            // next write goes to the same offset (pwrite), over whatever part of it landed.
            let mut b = buf;
            b.extend_from_slice(&st.pending);
            st.pending = b;
            let mut m = meta;
            m.extend_from_slice(&st.pending_meta);
            st.pending_meta = m;
            st.stats.write_failures += 1;
            let path = st.segments.last().map(|s| s.path.clone()).unwrap_or_default();
            let hint = if e.raw_os_error() == Some(libc::ENOSPC) { " (the disk is full; free space and writing resumes)" } else { "" };
            self.fail(&mut st, format!("writing {} failed: {e}{hint}", path.display()), false);
            drop(st);
            self.notify();
            return;
        }
        let seg = st.segments.last_mut().expect("active segment");
        let mut pos = off;
        let mut last_indexed = seg.index.last().map(|e| e.off);
        for m in &meta {
            if seg.is_empty() {
                seg.first_ts = m.ts;
            }
            if last_indexed.is_none_or(|l| pos >= l + INDEX_STRIDE) {
                seg.index.push(IndexEntry { seq: m.seq, off: pos, ts: m.ts });
                last_indexed = Some(pos);
            }
            seg.last_ts = m.ts;
            seg.last_seq = m.seq;
            pos += m.len as u64;
        }
        seg.len = pos;
        st.written = meta.last().map_or(st.written, |m| m.seq);
        st.stats.bytes_written += buf.len() as u64 + header.map_or(0, |_| SEG_HEADER as u64);
        if let (Durability::Interval(d), None) = (self.opts.durability, st.interval_due) {
            st.interval_due = Some(self.now() + d);
        }
        if let Some(free) = free {
            if st.space_checked.is_none_or(|t| self.now() >= t + SPACE_EVERY) {
                st.space_checked = Some(self.now());
                self.note_space(&mut st, free);
            }
        }
        self.publish(&mut st);
        drop(st);
        self.notify();
    }

    fn do_sync(&self, file: Arc<dyn FileIo>, seq: u64, off: u64, dir: bool) {
        let mut r = Ok(());
        if dir {
            r = self.env.fs.sync_dir(&self.dir).map_err(|e| format!("fsync of directory {} failed: {e}", self.dir.display()));
        }
        if r.is_ok() {
            let path = self.state.lock().segments.last().map(|s| s.path.clone()).unwrap_or_default();
            r = file.sync_data().map_err(|e| sync_err(&path, e));
        }
        let mut st = self.state.lock();
        st.syncing = false;
        match r {
            Ok(()) => {
                st.stats.syncs += 1;
                if dir {
                    st.dir_dirty = false;
                }
                st.synced = st.synced.max(seq);
                st.synced_off = st.synced_off.max(off);
                if st.synced >= st.written {
                    st.interval_due = None;
                } else if let Durability::Interval(d) = self.opts.durability {
                    st.interval_due = Some(self.now() + d);
                }
                self.publish(&mut st);
            }
            Err(why) => {
                st.stats.sync_failures += 1;
                self.fail(&mut st, why, true);
            }
        }
        drop(st);
        self.notify();
    }

    fn do_roll(&self, old: Arc<dyn FileIo>, sidecar: Option<(PathBuf, format::SegmentIndex)>, next_first: u64, sync_old: bool) {
        let path = self.dir.join(segment_name(next_first));
        let r = (|| -> std::result::Result<Arc<dyn FileIo>, (String, bool)> {
            if sync_old {
                let old_path = sidecar.as_ref().map(|s| s.0.clone()).unwrap_or_default();
                old.sync_data().map_err(|e| (sync_err(&old_path, e), true))?;
                self.env.fs.sync_dir(&self.dir).map_err(|e| (format!("fsync of directory {} failed: {e}", self.dir.display()), true))?;
            }
            if let Some((p, idx)) = &sidecar {
                let _ = recover::write_atomic_unsynced(&*self.env.fs, p, &format::encode_index(idx));
            }
            self.env.fs.open(&path, true, 0o644).map_err(|e| (format!("creating {} failed: {e}", path.display()), false))
        })();
        let mut st = self.state.lock();
        st.writing = false;
        st.syncing = false;
        match r {
            Ok(file) => {
                if sync_old {
                    st.stats.syncs += 1;
                    st.synced = st.written;
                }
                st.segments.push(Segment {
                    first_seq: next_first,
                    path,
                    file,
                    version: Version::V2,
                    last_seq: next_first - 1,
                    len: 0,
                    first_ts: 0,
                    last_ts: 0,
                    index: Vec::new(),
                    damaged: None,
                });
                st.synced_off = 0;
                st.dir_dirty = true;
                self.publish(&mut st);
            }
            Err((why, resync)) => {
                if resync {
                    st.stats.sync_failures += 1;
                }
                self.fail(&mut st, why, resync);
            }
        }
        drop(st);
        self.notify();
    }

    #[allow(clippy::too_many_arguments)]
    fn do_resync(&self, file: Arc<dyn FileIo>, path: PathBuf, from: u64, to: u64, first: u64, last: u64, dir: bool) {
        // The bytes an fdatasync failed to confirm may or may not be on disk: read them back
        // (from the page cache), check they are exactly the records we wrote, cut them off and
        // write them again, then fdatasync.
        let max = self.opts.max_record_bytes;
        let r = (|| -> std::result::Result<(), (String, bool)> {
            let mut buf = vec![0u8; (to - from) as usize];
            file.read_at(&mut buf, from).map_err(|e| (format!("re-reading {} after a failed fdatasync: {e}", path.display()), false))?;
            let mut pos = 0usize;
            if from == 0 && !buf.is_empty() && (buf.len() < SEG_HEADER || &buf[..8] != format::SEG_MAGIC) {
                return Err((format!("{}: the segment header did not survive a failed fdatasync", path.display()), false));
            }
            if from == 0 && !buf.is_empty() {
                pos = SEG_HEADER;
            }
            let mut expect = first;
            while pos < buf.len() {
                match format::parse_frame(&buf, pos, Version::V2, max) {
                    Ok(f) if f.seq == expect => {
                        expect += 1;
                        pos = f.end();
                    }
                    _ => return Err((format!("{}: record {expect} did not survive a failed fdatasync intact", path.display()), false)),
                }
            }
            if expect != last + 1 {
                return Err((format!("{}: records {expect}..{last} are missing after a failed fdatasync", path.display()), false));
            }
            let retry = |e: std::io::Error| (sync_err(&path, e), true);
            file.set_len(from).map_err(retry)?;
            file.write_at(&buf, from).map_err(retry)?;
            if dir {
                self.env.fs.sync_dir(&self.dir).map_err(retry)?;
            }
            file.sync_data().map_err(retry)
        })();
        let mut st = self.state.lock();
        st.writing = false;
        st.syncing = false;
        match r {
            Ok(()) => {
                tracing::info!(dir = %self.dir.display(), "unsynced records written again after a failed fdatasync; the log is healthy");
                st.failing = None;
                st.stats.syncs += 1;
                st.synced = last.max(st.synced);
                st.synced_off = to;
                if dir {
                    st.dir_dirty = false;
                }
                self.publish(&mut st);
            }
            Err((why, true)) => {
                st.stats.sync_failures += 1;
                self.fail(&mut st, why, true);
            }
            Err((why, false)) => self.poison(&mut st, why),
        }
        drop(st);
        self.notify();
    }

    fn do_ack(&self, seq: u64, file: Option<Arc<dyn FileIo>>, counter: u64) {
        let fs = &*self.env.fs;
        let path = self.dir.join(ACK_FILE);
        let slot = format::encode_ack_slot(counter, seq);
        let r = (|| -> std::io::Result<Arc<dyn FileIo>> {
            match file {
                Some(f) => {
                    f.write_at(&slot, format::ACK_SLOT_OFFSETS[(counter % 2) as usize])?;
                    f.sync_data()?;
                    Ok(f)
                }
                None => {
                    // First watermark of this directory (or an old 12-byte one): write a whole new
                    // file atomically.
                    let mut b = vec![0u8; 1024];
                    let at = format::ACK_SLOT_OFFSETS[(counter % 2) as usize] as usize;
                    b[at..at + slot.len()].copy_from_slice(&slot);
                    let mut tmp = path.as_os_str().to_os_string();
                    tmp.push(".tmp");
                    let tmp = PathBuf::from(tmp);
                    let f = fs.open(&tmp, true, 0o644)?;
                    f.set_len(0)?;
                    f.write_at(&b, 0)?;
                    f.sync_data()?;
                    fs.rename(&tmp, &path)?;
                    fs.sync_dir(&self.dir)?;
                    fs.open(&path, false, 0o644)
                }
            }
        })();
        let mut st = self.state.lock();
        st.ack_next = self.now() + ACK_EVERY;
        let f = match r {
            Ok(f) => f,
            Err(e) => {
                st.ack_busy = false;
                tracing::warn!(dir = %self.dir.display(), error = %e, "writing the ack watermark failed; retrying (a crash meanwhile re-sends, never loses)");
                st.ack_next = self.now() + Duration::from_secs(1);
                st.ack_error = true;
                drop(st);
                self.notify();
                return;
            }
        };
        st.ack_file = Some(f);
        st.ack_error = false;
        st.ack_counter = counter;
        st.stats.ack_writes += 1;
        st.stats.ack_persisted = st.stats.ack_persisted.max(seq);
        st.ack_flush = st.acked > st.stats.ack_persisted && st.ack_flush;
        let victims = take_segments_below(&mut st, seq + 1);
        drop(st);
        // Still busy until the consumed segments are gone, so close and flush_ack return with
        // the directory in its final state.
        self.remove_segments(victims);
        self.state.lock().ack_busy = false;
        self.notify();
    }

    fn remove_segments(&self, victims: Vec<Segment>) {
        if victims.is_empty() {
            return;
        }
        for s in &victims {
            if let Err(e) = self.env.fs.remove(&s.path) {
                tracing::warn!(file = %s.path.display(), error = %e, "could not delete a consumed segment");
            }
            let _ = self.env.fs.remove(&index_path(&s.path));
        }
        if let Err(e) = self.env.fs.sync_dir(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "fsync after deleting segments failed");
        }
    }

    /// Runs actions until none is left, then sets a timer for the next due one.
    fn step(self: &Arc<Self>) {
        let mut st = self.state.lock();
        st.queued = false;
        while let Some(a) = self.pick(&mut st) {
            drop(st);
            self.perform(a);
            st = self.state.lock();
        }
        self.arm_timer(&mut st);
    }

    fn arm_timer(self: &Arc<Self>, st: &mut MutexGuard<'_, State>) {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if st.poisoned.is_none() {
            if let Some(f) = &st.failing {
                consider(f.next_try);
            }
            if let Some(d) = st.interval_due {
                consider(d);
            }
            if st.acked > st.stats.ack_persisted {
                consider(st.ack_next);
            }
            if st.low_space.is_some() {
                consider(st.space_checked.map_or_else(Instant::now, |t| t + RETRY));
            }
        }
        let Some(at) = next else { return };
        if st.timer_at.is_some_and(|t| t <= at && t > self.now()) {
            return; // an earlier timer is already set
        }
        st.timer_at = Some(at);
        let weak: Weak<dyn Job> = self.me.clone();
        self.env.exec.at(at, weak);
    }

    /// Waits (helping the executor) until `done` holds. Gives up when nothing can progress
    /// (inline executor) and returns false.
    fn wait_until(&self, mut done: impl FnMut(&State) -> bool) -> bool {
        let mut st = self.state.lock();
        loop {
            if done(&st) {
                return true;
            }
            drop(st);
            let helped = self.env.exec.help();
            st = self.state.lock();
            if helped || done(&st) {
                continue;
            }
            if !self.env.exec.can_block() {
                return false;
            }
            self.cond.wait_for(&mut st, Exec::POLL);
        }
    }

    fn close(self: &Arc<Self>) -> Result<()> {
        let kick = {
            let mut st = self.state.lock();
            if st.lock.is_none() && st.closed {
                return Ok(()); // closed before
            }
            st.closed = true;
            st.ack_flush = true;
            self.kick(&mut st)
        };
        if kick {
            self.submit();
        }
        self.wait_until(|st| {
            st.poisoned.is_some()
                || (st.failing.is_some() && st.final_try_done)
                || (st.pending.is_empty()
                    && !st.writing
                    && !st.syncing
                    && !st.ack_busy
                    && st.synced >= st.written
                    && !st.dir_dirty
                    && (st.stats.ack_persisted >= st.acked || st.ack_error))
        });
        let mut st = self.state.lock();
        let result = if let Some(why) = &st.poisoned {
            Err(Error::new(ErrorKind::Storage, format!("{}: log poisoned ({why})", self.dir.display())))
        } else if !st.pending.is_empty() {
            Err(Error::new(
                ErrorKind::Storage,
                format!(
                    "{}: closing the log lost {} records that could not be written: {}",
                    self.dir.display(),
                    st.pending_meta.len(),
                    st.failing.as_ref().map(|f| f.why.clone()).unwrap_or_default()
                ),
            ))
        } else {
            Ok(())
        };
        if result.is_ok() && st.read_only.is_none() {
            // Attest everything written: a later open treats damage inside it as damage, not as
            // a torn write.
            if let Some(seg) = st.segments.last().filter(|s| s.version == Version::V2 && s.len > 0) {
                let _ = recover::write_atomic_unsynced(&*self.env.fs, &index_path(&seg.path), &format::encode_index(&seg.sidecar()));
            }
        }
        st.lock = None;
        drop(st);
        self.notify();
        result
    }
}

impl Job for Shared {
    fn run(self: Arc<Self>) {
        self.step();
    }
}

fn index_path(seg: &Path) -> PathBuf {
    let mut p = seg.as_os_str().to_os_string();
    p.push(INDEX_SUFFIX);
    PathBuf::from(p)
}

/// Removes from the list the non-active segments whose records are all below `limit`.
fn take_segments_below(st: &mut State, limit: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    while st.segments.len() > 1 {
        let s = &st.segments[0];
        if !s.is_empty() && s.last_seq >= limit || s.damaged.is_some_and(|(_, z)| z >= limit) {
            break;
        }
        out.push(st.segments.remove(0));
    }
    out
}

impl Log {
    /// Opens (creating the directory if needed) and recovers the log in `dir`, taking its lock:
    /// a second opener, in this process or another, gets a `Storage` error naming the holder.
    pub fn open(dir: &Path, opts: LogOptions) -> Result<Log> {
        Log::open_with(dir, opts, Env::real())
    }

    pub(crate) fn open_with(dir: &Path, opts: LogOptions, env: Env) -> Result<Log> {
        if opts.segment_bytes < (SEG_HEADER + FRAME_HEADER) as u64 || opts.max_record_bytes == 0 {
            return Err(Error::invalid("log segments must hold at least one frame and records at least one byte"));
        }
        let fs = &*env.fs;
        create_dir_durable(fs, dir)?;
        let lock = lock_dir(fs, dir, "store directory")?;
        let max = opts.max_record_bytes;
        let mut rec = recover::recover_dir(fs, dir, max, opts.min_next_seq, Mode::Open)?;
        if rec.corrupt().is_some() && opts.on_damage == OnDamage::Quarantine {
            for d in &rec.damage {
                tracing::error!(damage = %d, "quarantining damaged log data");
            }
            for a in recover::quarantine(fs, dir, &rec, max)? {
                tracing::warn!(dir = %dir.display(), "{a}");
            }
            rec = recover::recover_dir(fs, dir, max, opts.min_next_seq, Mode::Open)?;
        }
        for d in &rec.damage {
            tracing::error!(damage = %d, "log damage found on open");
        }
        let read_only = rec.corrupt().cloned();
        let next_seq = (rec.max_seen() + 1).max(opts.min_next_seq).max(1);
        let acked = rec.acked;
        let cut = rec.cut_bytes;
        let damage = std::mem::take(&mut rec.damage);
        let mut segments: Vec<Segment> = rec.segments.into_iter().map(Segment::from_found).collect();
        let mut dir_dirty = false;
        if read_only.is_none() {
            // The active segment: the last one if it is current, else a new one at next_seq.
            let reuse = segments.last().is_some_and(|s| s.version == Version::V2 && s.damaged.is_none() && s.last_seq + 1 == next_seq);
            if reuse {
                let s = segments.last().expect("checked");
                if s.len > 0 {
                    // What a killed process left in the page cache is on disk from here on.
                    s.file.sync_data().map_err(io_err("fsync", &s.path))?;
                }
            } else {
                if let Some(s) = segments.last().filter(|s| s.first_seq == next_seq && s.len == 0) {
                    // An empty segment at the right place (a V1 or header-less leftover).
                    let path = s.path.clone();
                    segments.pop();
                    fs.remove(&path).map_err(io_err("remove", &path))?;
                }
                let path = dir.join(segment_name(next_seq));
                let file = fs.open(&path, true, 0o644).map_err(io_err("create", &path))?;
                segments.push(Segment {
                    first_seq: next_seq,
                    path,
                    file,
                    version: Version::V2,
                    last_seq: next_seq - 1,
                    len: 0,
                    first_ts: 0,
                    last_ts: 0,
                    index: Vec::new(),
                    damaged: None,
                });
                dir_dirty = true;
            }
        }
        if dir_dirty {
            fs.sync_dir(dir).map_err(io_err("fsync directory", dir))?;
        }
        let last = next_seq - 1;
        let synced_off = segments.last().map_or(0, |s| s.len);
        let ack_file = fs.open(&dir.join(ACK_FILE), false, 0o644).ok().filter(|f| f.len().is_ok_and(|n| n >= 1024));
        let opened_at = env.exec.now();
        let (durable_tx, _) = watch::channel(last);
        let (synced_tx, _) = watch::channel(last);
        let (events, _) = watch::channel(0);
        let shared = Arc::new_cyclic(|me| Shared {
            dir: dir.to_path_buf(),
            opts,
            env,
            me: me.clone(),
            state: Mutex::new(State {
                next_seq,
                pending: Vec::new(),
                pending_meta: Vec::new(),
                writing: false,
                syncing: false,
                wrote_during_sync: false,
                written: last,
                synced: last,
                synced_off,
                dir_dirty: false,
                durable: last,
                failing: None,
                poisoned: None,
                read_only,
                low_space: None,
                space_checked: None,
                closed: false,
                final_try_done: false,
                sync_to: 0,
                segments,
                acked: acked.min(last),
                ack_busy: false,
                ack_counter: rec.ack_counter,
                ack_file,
                ack_next: opened_at,
                ack_flush: false,
                ack_error: false,
                interval_due: None,
                queued: false,
                timer_at: None,
                damage,
                stats: LogStats { recovered_truncated_bytes: cut, ack_persisted: acked.min(last), ..LogStats::default() },
                hints: [(0, 0, 0); 8],
                hint_next: 0,
                lock: Some(lock),
            }),
            cond: Condvar::new(),
            durable_tx,
            synced_tx,
            events,
        });
        if shared.opts.reserve_bytes > 0 {
            let free = shared.env.fs.free_bytes(dir);
            let mut st = shared.state.lock();
            shared.note_space(&mut st, free);
            st.space_checked = Some(shared.now());
            shared.arm_timer(&mut st);
        }
        Ok(Log { h: Arc::new(Handle { shared }) })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.h.shared
    }

    /// Appends one record and returns its sequence number without waiting for durability.
    /// Errors: `MessageTooLarge`, `QueueFull` (the pending bound; see [`Log::wait_for_room`]),
    /// `Storage` (damaged, failing, below the disk reserve, poisoned), `Closed`.
    pub fn append(&self, payload: &[u8]) -> Result<u64> {
        self.append_with(payload, || Ok(())).map(|(s, ())| s)
    }

    /// Appends one record after `before` succeeded, atomically: `before` runs under the log's
    /// lock once every precondition of the append holds, so when it returns `Ok` the append
    /// cannot fail, and when it returns `Err` nothing is appended. (The state log applies an
    /// event to its machine here, so an event the machine refuses never reaches the log.)
    pub(crate) fn append_with<R>(&self, payload: &[u8], before: impl FnOnce() -> Result<R>) -> Result<(u64, R)> {
        let sh = self.shared();
        if payload.len() > sh.opts.max_record_bytes {
            return Err(Error::new(
                ErrorKind::MessageTooLarge,
                format!("record of {} bytes exceeds the log's limit of {} bytes", payload.len(), sh.opts.max_record_bytes),
            ));
        }
        let frame = format::frame_len(payload.len());
        let mut st = sh.state.lock();
        check_writable(sh, &st)?;
        if !st.pending.is_empty() && st.pending.len() + frame > sh.opts.max_pending_bytes {
            return Err(Error::new(
                ErrorKind::QueueFull,
                format!(
                    "{}: {} bytes are waiting for the disk (limit {}); wait for room (Log::wait_for_room) and try again",
                    sh.dir.display(),
                    st.pending.len(),
                    sh.opts.max_pending_bytes
                ),
            ));
        }
        let r = before()?;
        let seq = st.next_seq;
        st.next_seq += 1;
        let ts = now_ms();
        if st.pending.capacity() == 0 {
            // The writer took the previous buffer: start the next batch with room for many
            // records instead of regrowing from nothing.
            st.pending.reserve(64 * 1024);
        }
        let synced = st.synced;
        format::encode_frame(&mut st.pending, seq, ts, synced, payload);
        st.pending_meta.push(Meta { seq, ts, len: frame as u32 });
        st.stats.appended += 1;
        // A running write, or a sync that already had its concurrent write, picks this up when
        // it finishes; otherwise a pool thread starts on it.
        let busy = st.writing || (st.syncing && st.wrote_during_sync);
        let kick = !busy && st.failing.is_none() && sh.kick(&mut st);
        drop(st);
        if kick {
            sh.submit();
        }
        Ok((seq, r))
    }

    fn check_durable(sh: &Shared, st: &State, seq: u64) -> Option<Result<()>> {
        if st.durable >= seq {
            return Some(Ok(()));
        }
        if let Some(why) = &st.poisoned {
            return Some(Err(Error::new(ErrorKind::Storage, format!("{}: log poisoned ({why}); reopen it", sh.dir.display()))));
        }
        if let Some(f) = &st.failing {
            return Some(Err(Error::new(ErrorKind::Storage, format!("{}; the record may still be stored once the disk takes it", f.why))));
        }
        if seq >= st.next_seq {
            return Some(Err(Error::invalid(format!("record {seq} was never appended"))));
        }
        if st.closed && st.lock.is_none() {
            return Some(Err(Error::closed("log")));
        }
        None
    }

    /// Waits until record `seq` is durable. Errors with `Storage` if writing it failed (it may
    /// still be stored later: at-least-once, never loss of an acknowledged record).
    pub async fn wait_durable(&self, seq: u64) -> Result<()> {
        let sh = self.shared();
        let mut events = sh.events.subscribe();
        loop {
            if let Some(r) = Log::check_durable(sh, &sh.state.lock(), seq) {
                return r;
            }
            if !sh.env.exec.can_block() {
                if sh.env.exec.help() {
                    continue;
                }
                return Err(Error::new(ErrorKind::Storage, "no progress possible (inline executor)"));
            }
            if events.changed().await.is_err() {
                return Err(Error::closed("log"));
            }
        }
    }

    /// Blocking form of [`Log::wait_durable`] (must not be called on a tokio runtime thread).
    pub fn wait_durable_blocking(&self, seq: u64) -> Result<()> {
        let sh = self.shared();
        let mut out = None;
        let progressed = sh.wait_until(|st| {
            out = Log::check_durable(sh, st, seq);
            out.is_some()
        });
        match out {
            Some(r) if progressed => r,
            _ => Err(Error::new(ErrorKind::Storage, "no progress possible (inline executor)")),
        }
    }

    /// Whether an append of `bytes` would fit under `max_pending_bytes` now.
    pub fn has_room(&self, bytes: usize) -> bool {
        let st = self.shared().state.lock();
        st.pending.is_empty() || st.pending.len() + format::frame_len(bytes) <= self.shared().opts.max_pending_bytes
    }

    /// Waits until an append of `bytes` fits under `max_pending_bytes` (back-pressure for
    /// producers that must not fail). Returns an error instead of waiting when the log cannot
    /// take appends (damaged, failing, below the disk reserve, poisoned, closed).
    pub async fn wait_for_room(&self, bytes: usize) -> Result<()> {
        let sh = self.shared();
        let mut events = sh.events.subscribe();
        loop {
            {
                let st = sh.state.lock();
                check_writable(sh, &st)?;
                if st.pending.is_empty() || st.pending.len() + format::frame_len(bytes) <= sh.opts.max_pending_bytes {
                    return Ok(());
                }
            }
            if events.changed().await.is_err() {
                return Err(Error::closed("log"));
            }
        }
    }

    /// Bytes appended and not yet written.
    pub fn pending_bytes(&self) -> usize {
        self.shared().state.lock().pending.len()
    }

    /// A watch of the highest durable sequence number (what readers may see).
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.shared().durable_tx.subscribe()
    }

    /// The highest sequence number an fdatasync confirmed: what survives a power loss in every
    /// durability mode. Watermarks that point into the log (acks, checkpoints, snapshots) must
    /// stay at or below it.
    pub fn synced(&self) -> u64 {
        self.shared().state.lock().synced
    }

    /// fdatasyncs everything written so far, in any durability mode, and waits for it.
    pub fn sync(&self) -> Result<()> {
        let sh = self.shared();
        let (target, kick) = {
            let mut st = sh.state.lock();
            check_usable(sh, &st)?;
            let t = st.next_seq - 1;
            st.sync_to = st.sync_to.max(t);
            (t, sh.kick(&mut st))
        };
        if kick {
            sh.submit();
        }
        let mut err = None;
        let done = sh.wait_until(|st| {
            if let Some(f) = &st.failing {
                err = Some(Error::new(ErrorKind::Storage, f.why.clone()));
                return true;
            }
            if let Some(p) = &st.poisoned {
                err = Some(Error::new(ErrorKind::Storage, p.clone()));
                return true;
            }
            st.synced >= target
        });
        match err {
            Some(e) => Err(e),
            None if done => Ok(()),
            None => Err(Error::new(ErrorKind::Storage, "no progress possible (inline executor)")),
        }
    }

    /// Damage found when the log was opened (corrupt records, missing ranges).
    pub fn damage(&self) -> Vec<Damage> {
        self.shared().state.lock().damage.clone()
    }

    /// Records with `seq >= from`, up to the durable head, at most `max_records` and about
    /// `max_bytes` (always at least one record if any is available). A range lost to damage
    /// that was repaired (or a missing segment) is skipped; reading into damage that was not
    /// repaired is a `Storage` error naming the file and offset.
    pub fn read(&self, from: u64, max_records: usize, max_bytes: usize) -> Result<Vec<Record>> {
        let sh = self.shared();
        if max_records == 0 {
            return Ok(Vec::new());
        }
        let plan = {
            let st = sh.state.lock();
            match plan_read(sh, &st, from)? {
                Some(p) => p,
                None => return Ok(Vec::new()),
            }
        };
        let ReadPlan { file, version, path, seg_first, from, last, mut off, mut at, end } = plan;
        let header = version.frame_header();
        let max = sh.opts.max_record_bytes;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let budget = (max_bytes as u64).saturating_add(INDEX_STRIDE + 4096);
        while off < end && out.len() < max_records && at <= last && (out.is_empty() || bytes < max_bytes) {
            let want = (end - off).min(budget.max(header as u64));
            let mut buf = vec![0u8; want as usize];
            file.read_at(&mut buf, off).map_err(io_err("read", &path))?;
            let mut buf = Bytes::from(buf);
            let mut pos = 0usize;
            loop {
                if out.len() >= max_records || at > last || (!out.is_empty() && bytes >= max_bytes) {
                    break;
                }
                match format::parse_frame(&buf, pos, version, max) {
                    Ok(f) if f.seq == at => {
                        if at >= from {
                            bytes += f.body.len();
                            out.push(Record { seq: f.seq, timestamp_ms: f.ts, payload: buf.slice(f.body.clone()) });
                        }
                        at += 1;
                        pos = f.end();
                    }
                    Err(format::BadFrame::Truncated) if (off + pos as u64) < end => {
                        if pos > 0 {
                            break; // read the rest from here
                        }
                        // One frame larger than the read budget: read exactly it.
                        let need = u32::from_le_bytes(buf[0..4].try_into().expect("header")) as u64 + header as u64;
                        let mut b = vec![0u8; need.min(end - off) as usize];
                        file.read_at(&mut b, off).map_err(io_err("read", &path))?;
                        buf = Bytes::from(b);
                        if buf.len() < need as usize {
                            return Err(read_damage(sh, &path, off, at, "the file ends inside the record"));
                        }
                    }
                    Err(format::BadFrame::Truncated) => break,
                    Ok(f) => return Err(read_damage(sh, &path, off + pos as u64, at, &format!("found record {} instead", f.seq))),
                    Err(e) => return Err(read_damage(sh, &path, off + pos as u64, at, &e.to_string())),
                }
            }
            off += pos as u64;
            if pos == 0 {
                break;
            }
        }
        let mut st = sh.state.lock();
        let k = st.hint_next;
        st.hints[k] = (seg_first, at, off);
        st.hint_next = (k + 1) % st.hints.len();
        Ok(out)
    }

    /// The first sequence number still stored (after deletions); `durable + 1` when empty.
    pub fn first_seq(&self) -> u64 {
        let st = self.shared().state.lock();
        // With nothing written yet, records appended but still pending come next: the answer is
        // the first of them (durable + 1), not `next_seq`, or a reader positioned here would
        // skip every record that was in flight to the writer.
        st.segments.iter().find(|s| !s.is_empty()).map_or(st.durable + 1, |s| s.first_seq)
    }

    /// The last sequence number appended (0 when nothing was ever appended).
    pub fn last_seq(&self) -> u64 {
        self.shared().state.lock().next_seq - 1
    }

    /// The first sequence number whose timestamp is `>= ms`; if no stored record is that
    /// recent, the first one not yet readable (`durable + 1`), so records still on their way
    /// to disk are not skipped.
    pub fn seek_time(&self, ms: u64) -> Result<u64> {
        let (candidate, next) = {
            let st = self.shared().state.lock();
            let seg = st.segments.iter().find(|s| !s.is_empty() && s.last_ts >= ms);
            let start = seg.map(|s| {
                // The last index entry before `ms` (timestamps may step back with the clock).
                let i = s.index.partition_point(|e| e.ts < ms);
                (s.index.get(i.saturating_sub(1)).map_or(s.first_seq, |e| e.seq), s.last_seq)
            });
            (start, st.durable + 1)
        };
        let Some((mut from, last)) = candidate else { return Ok(next) };
        while from <= last {
            let batch = self.read(from, 4096, 4 * 1024 * 1024)?;
            let Some(end) = batch.last().map(|r| r.seq) else { break };
            if let Some(r) = batch.iter().find(|r| r.timestamp_ms >= ms) {
                return Ok(r.seq);
            }
            from = end + 1;
        }
        Ok(from)
    }

    /// Marks every record `<= seq` consumed. The watermark is clamped to [`Log::synced`], never
    /// moves backwards, and is written to disk in the background — once it moved 1,024 records
    /// or a second after the previous write, and on [`Log::flush_ack`] and close; fully consumed
    /// segments are deleted once it is. No I/O happens in the caller.
    pub fn ack_through(&self, seq: u64) -> Result<()> {
        let sh = self.shared();
        let kick = {
            let mut st = sh.state.lock();
            check_usable(sh, &st)?;
            let seq = seq.min(st.synced);
            if seq <= st.acked {
                return Ok(());
            }
            st.acked = seq;
            // Wake a store thread only when the watermark is due now or no timer will look at
            // it later (one call per outcome must not cost a thread wake-up each).
            let due = st.acked - st.stats.ack_persisted >= ACK_BATCH;
            let timer_set = st.timer_at.is_some_and(|t| t > sh.now());
            (due || !timer_set) && !st.ack_busy && sh.kick(&mut st)
        };
        if kick {
            sh.submit();
        }
        Ok(())
    }

    /// Writes the ack watermark now and waits for it.
    pub fn flush_ack(&self) -> Result<()> {
        let sh = self.shared();
        let kick = {
            let mut st = sh.state.lock();
            check_usable(sh, &st)?;
            st.ack_flush = true;
            st.ack_error = false; // try now, once
            sh.kick(&mut st)
        };
        if kick {
            sh.submit();
        }
        sh.wait_until(|st| st.poisoned.is_some() || st.ack_error || (st.stats.ack_persisted >= st.acked && !st.ack_busy));
        let st = sh.state.lock();
        if st.ack_error && st.stats.ack_persisted < st.acked {
            return Err(Error::new(
                ErrorKind::Storage,
                format!("{}: writing the ack watermark failed; it is retried in the background", sh.dir.display()),
            ));
        }
        Ok(())
    }

    /// The ack watermark (0 when nothing was acked).
    pub fn acked(&self) -> u64 {
        self.shared().state.lock().acked
    }

    /// Retention: deletes whole segments whose last record is `< seq` (never the active one).
    /// Returns how many records were removed.
    pub fn truncate_before(&self, seq: u64) -> Result<u64> {
        let sh = self.shared();
        let victims = {
            let mut st = sh.state.lock();
            check_usable(sh, &st)?;
            let limit = seq.min(st.durable + 1);
            take_segments_below(&mut st, limit)
        };
        let removed = victims.iter().map(|s| if s.is_empty() { 0 } else { s.last_seq - s.first_seq + 1 }).sum();
        sh.remove_segments(victims);
        Ok(removed)
    }

    /// The segments, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.shared().state.lock().segments.iter().map(Segment::info).collect()
    }

    /// Counters.
    pub fn stats(&self) -> LogStats {
        self.shared().state.lock().stats.clone()
    }

    /// Whether the log was poisoned (it must be reopened).
    pub fn is_poisoned(&self) -> bool {
        self.shared().state.lock().poisoned.is_some()
    }

    /// Writes and syncs everything appended so far (in every durability mode), writes the ack
    /// watermark, and releases the directory lock. Further appends fail with `Closed`.
    /// Idempotent.
    pub fn close(&self) -> Result<()> {
        self.shared().close()
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.shared().dir
    }
}

fn check_usable(sh: &Shared, st: &State) -> Result<()> {
    if let Some(why) = &st.poisoned {
        return Err(Error::new(ErrorKind::Storage, format!("{}: log poisoned ({why}); reopen it", sh.dir.display())));
    }
    if st.closed {
        return Err(Error::closed("log"));
    }
    Ok(())
}

fn check_writable(sh: &Shared, st: &State) -> Result<()> {
    check_usable(sh, st)?;
    if let Some(d) = &st.read_only {
        return Err(recover::damaged_error(&sh.dir, d));
    }
    if let Some(f) = &st.failing {
        return Err(Error::new(ErrorKind::Storage, format!("the log cannot write right now ({}); try again later", f.why)));
    }
    if let Some(why) = &st.low_space {
        return Err(Error::new(ErrorKind::Storage, why.clone()));
    }
    Ok(())
}

struct ReadPlan {
    file: Arc<dyn FileIo>,
    /// The segment's format (an old-format segment kept because it is damaged is read as is).
    version: Version,
    path: PathBuf,
    seg_first: u64,
    from: u64,
    last: u64,
    off: u64,
    at: u64,
    end: u64,
}

fn read_damage(sh: &Shared, path: &Path, off: u64, seq: u64, why: &str) -> Error {
    Error::new(
        ErrorKind::Storage,
        format!(
            "{} offset {off}: record {seq} fails verification on read ({why}); run `hubmsg store check {}` and `hubmsg store repair {}`",
            path.display(),
            sh.dir.display(),
            sh.dir.display()
        ),
    )
}

/// Where a read of `from` starts: the segment, a start offset at or before it, and the durable
/// end. `None` when nothing at or after `from` is readable.
fn plan_read(sh: &Shared, st: &State, from: u64) -> Result<Option<ReadPlan>> {
    let head = st.durable;
    let mut from = from.max(1);
    let segs = &st.segments;
    let mut i = segs.partition_point(|s| s.first_seq <= from);
    if i == 0 {
        match segs.first() {
            Some(s) => from = s.first_seq,
            None => return Ok(None),
        }
        i = 1;
    }
    let mut i = i - 1;
    loop {
        let s = &segs[i];
        if from <= s.last_seq {
            break;
        }
        if let Some((a, z)) = s.damaged {
            if from <= z {
                let d = st.damage.iter().find(|d| d.file == s.path).cloned().unwrap_or(Damage {
                    kind: DamageKind::Corrupt,
                    file: s.path.clone(),
                    offset: s.len,
                    first_seq: a,
                    last_seq: z,
                    valid_after: 0,
                    reason: "damaged".into(),
                });
                return Err(recover::damaged_error(&sh.dir, &d));
            }
        }
        if i + 1 >= segs.len() {
            return Ok(None);
        }
        i += 1;
        from = from.max(segs[i].first_seq);
    }
    if from > head {
        return Ok(None);
    }
    let s = &segs[i];
    let active = i + 1 == segs.len();
    let end = if active && sh.always() { st.synced_off.min(s.len) } else { s.len };
    let last = s.last_seq.min(head);
    let (mut at, mut off) = match s.index.partition_point(|e| e.seq <= from) {
        0 => (s.first_seq, s.version.data_start()),
        k => (s.index[k - 1].seq, s.index[k - 1].off),
    };
    for &(hf, hs, ho) in &st.hints {
        if hf == s.first_seq && hs <= from && hs > at && ho <= end {
            (at, off) = (hs, ho);
        }
    }
    Ok(Some(ReadPlan { file: s.file.clone(), version: s.version, path: s.path.clone(), seg_first: s.first_seq, from, last, off, at, end }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(segment_bytes: u64, durability: Durability) -> LogOptions {
        LogOptions { segment_bytes, durability, ..LogOptions::default() }
    }

    fn append_all(log: &Log, n: u64) -> u64 {
        let mut last = 0;
        for i in 0..n {
            last = log.append(format!("record {i}").as_bytes()).unwrap();
        }
        log.wait_durable_blocking(last).unwrap();
        last
    }

    fn read_all(log: &Log) -> Vec<Record> {
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            let b = log.read(from, 1000, 1 << 20).unwrap();
            let Some(l) = b.last() else { break };
            from = l.seq + 1;
            out.extend(b);
        }
        out
    }

    #[test]
    fn round_trip_across_segment_rolls_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), opts(1000, Durability::Always)).unwrap();
        assert_eq!(append_all(&log, 500), 500);
        assert!(log.segments().len() > 10);
        let all = read_all(&log);
        assert_eq!(all.len(), 500);
        for (i, r) in all.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1);
            assert_eq!(r.payload, format!("record {i}"));
        }
        log.close().unwrap();
        assert_eq!(log.append(b"x").unwrap_err().kind(), ErrorKind::Closed);
        drop(log);
        let log = Log::open(dir.path(), opts(1000, Durability::Always)).unwrap();
        assert_eq!(read_all(&log).len(), 500);
        assert_eq!(log.append(b"next").unwrap(), 501);
    }

    #[test]
    fn concurrent_appends_share_fsyncs_and_stay_dense() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), opts(1 << 20, Durability::Always)).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let s = log.append(format!("{t}-{i}").as_bytes()).unwrap();
                        log.wait_durable_blocking(s).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let all = read_all(&log);
        assert_eq!(all.len(), 1600);
        assert!(all.iter().enumerate().all(|(i, r)| r.seq == i as u64 + 1));
        let st = log.stats();
        assert!(st.syncs < st.appended, "group commit batched: {st:?}");
    }

    #[test]
    fn torn_tails_are_cut_and_appends_continue_after_the_highest_seen() {
        for damage in ["truncate", "flip"] {
            let dir = tempfile::tempdir().unwrap();
            {
                let log = Log::open(dir.path(), opts(1 << 20, Durability::Always)).unwrap();
                append_all(&log, 100);
                // A crash, not a close: no sidecar index attests the tail.
                std::mem::forget(log);
            }
            let seg = dir.path().join(segment_name(1));
            let mut b = std::fs::read(&seg).unwrap();
            let n = b.len();
            match damage {
                "truncate" => b.truncate(n - 3),
                _ => b[n - 2] ^= 0x55,
            }
            std::fs::write(&seg, &b).unwrap();
            let _ = std::fs::remove_file(dir.path().join(io::LOCK_FILE));
            let log = Log::open(dir.path(), opts(1 << 20, Durability::Always)).unwrap();
            assert_eq!(read_all(&log).len(), 99, "{damage}");
            assert!(log.stats().recovered_truncated_bytes > 0);
            assert_eq!(log.append(b"again").unwrap(), 100);
            log.wait_durable_blocking(100).unwrap();
            assert_eq!(read_all(&log).last().unwrap().payload, "again");
        }
    }

    #[test]
    fn ack_watermark_persists_and_deletes_segments() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), opts(500, Durability::Always)).unwrap();
        append_all(&log, 200);
        let before = log.segments().len();
        log.ack_through(150).unwrap();
        log.flush_ack().unwrap();
        assert!(log.segments().len() < before);
        assert!(log.first_seq() <= 151);
        log.close().unwrap();
        drop(log);
        let log = Log::open(dir.path(), opts(500, Durability::Always)).unwrap();
        assert_eq!(log.acked(), 150);
        assert_eq!(log.read(151, 1, 1 << 20).unwrap()[0].payload, "record 150");
        // Everything acked: appends continue after the watermark.
        log.ack_through(200).unwrap();
        log.close().unwrap();
        drop(log);
        let log = Log::open(dir.path(), opts(500, Durability::Always)).unwrap();
        assert_eq!(log.append(b"x").unwrap(), 201);
    }

    #[test]
    fn retention_and_seek_time() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), opts(300, Durability::Never)).unwrap();
        append_all(&log, 50);
        std::thread::sleep(Duration::from_millis(20));
        let t = now_ms();
        append_all(&log, 10);
        let s = log.seek_time(t).unwrap();
        assert!((50..=51).contains(&s), "seek {s}");
        assert_eq!(log.seek_time(u64::MAX).unwrap(), 61);
        let removed = log.truncate_before(40).unwrap();
        assert!(removed > 0 && removed < 40);
        assert_eq!(log.first_seq(), removed + 1);
        assert_eq!(log.read(1, 1, 1 << 20).unwrap()[0].seq, removed + 1);
    }

    #[tokio::test]
    async fn async_waiters_and_the_durable_watch() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), opts(1 << 20, Durability::Interval(Duration::from_millis(20)))).unwrap();
        let mut w = log.durable();
        let s = log.append(b"a").unwrap();
        log.wait_durable(s).await.unwrap();
        w.wait_for(|d| *d >= s).await.unwrap();
        assert_eq!(log.wait_durable(99).await.unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!("interval:250ms".parse::<Durability>().unwrap(), Durability::Interval(Duration::from_millis(250)));
        assert!("sometimes".parse::<Durability>().is_err());
        // The interval sync catches up by itself.
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.synced() < s && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(log.synced() >= s);
    }

    #[test]
    fn positions_never_skip_records_still_pending() {
        // A reader positioned at "earliest" or "from now" while appends are still on their way
        // to disk must start at the first of them, not after them.
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), opts(1 << 20, Durability::Always)).unwrap();
        let t0 = now_ms();
        let mut last = 0;
        for i in 0..2000 {
            last = log.append(format!("record {i}").as_bytes()).unwrap();
        }
        let first = log.first_seq();
        let from_time = log.seek_time(t0).unwrap();
        assert_eq!(first, 1, "first_seq while records are pending");
        assert_eq!(from_time, 1, "seek_time while records are pending");
        log.wait_durable_blocking(last).unwrap();
        assert_eq!((log.first_seq(), log.seek_time(t0).unwrap()), (1, 1));
        assert_eq!(log.seek_time(now_ms() + 60_000).unwrap(), last + 1);
    }

    #[test]
    fn oversize_records_are_refused_and_the_pending_bound_pushes_back() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogOptions { max_record_bytes: 10, ..LogOptions::default() }).unwrap();
        assert_eq!(log.append(&[0u8; 11]).unwrap_err().kind(), ErrorKind::MessageTooLarge);
        drop(log);
        let dir = tempfile::tempdir().unwrap();
        let log =
            Log::open(dir.path(), LogOptions { max_pending_bytes: 1000, durability: Durability::Always, ..LogOptions::default() }).unwrap();
        let mut refused = 0;
        let mut last = 0;
        for _ in 0..2000 {
            match log.append(&[7u8; 200]) {
                Ok(s) => last = s,
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::QueueFull, "{e}");
                    refused += 1;
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    rt.block_on(log.wait_for_room(200)).unwrap();
                }
            }
        }
        log.wait_durable_blocking(last).unwrap();
        assert!(log.pending_bytes() == 0 && log.has_room(200));
        assert_eq!(read_all(&log).len() as u64 + refused, 2000);
    }

    #[test]
    fn a_sealed_segment_is_opened_from_its_index_without_reading_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = Log::open(dir.path(), opts(4096, Durability::Never)).unwrap();
            append_all(&log, 1000);
            log.close().unwrap();
        }
        let idx =
            std::fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".idx")).count();
        assert!(idx > 5, "{idx} sidecar indexes");
        let log = Log::open(dir.path(), opts(4096, Durability::Never)).unwrap();
        let all = read_all(&log);
        assert_eq!(all.len(), 1000);
        assert_eq!(all[777].payload, "record 777");
        assert_eq!(log.read(500, 1, 1 << 20).unwrap()[0].seq, 500);
    }

    /// A version-1 frame (24-byte header, the CRC over seq, timestamp and payload).
    fn v1_frame(out: &mut Vec<u8>, seq: u64, payload: &[u8]) {
        let mut tail = seq.to_le_bytes().to_vec();
        tail.extend_from_slice(&seq.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&tail), payload);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&tail);
        out.extend_from_slice(payload);
    }

    #[test]
    fn a_damaged_old_format_segment_serves_its_records_up_to_the_damage() {
        // Found by fuzz/store_frames: a version-1 segment with damage followed by valid records
        // is kept as it is (read-only up to the damage), and reads must parse its frames in its
        // own format.
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Vec::new();
        for s in 1..=4u64 {
            v1_frame(&mut seg, s, format!("old {s}").as_bytes());
        }
        let second = 24 + 5;
        seg[second + 8] ^= 0x40; // record 2's sequence number
        std::fs::write(dir.path().join(recover::segment_name(1)), &seg).unwrap();
        let log = Log::open(dir.path(), opts(1 << 20, Durability::Never)).unwrap();
        let first = log.read(1, 10, 1 << 20).unwrap();
        assert_eq!(first.iter().map(|r| (r.seq, r.payload.clone())).collect::<Vec<_>>(), vec![(1, Bytes::from_static(b"old 1"))]);
        assert_eq!(log.read(2, 10, 1 << 20).unwrap_err().kind(), ErrorKind::Storage, "a read into the damage is an error");
        assert_eq!(log.append(b"new").unwrap_err().kind(), ErrorKind::Storage, "read-only up to the damage");
        assert_eq!(std::fs::read(dir.path().join(recover::segment_name(1))).unwrap(), seg, "the damaged segment is left as it was");
    }

    #[test]
    fn sync_waits_for_records_still_being_written_when_an_earlier_sync_finishes() {
        // The hang once seen in the compaction test, ordered by hand: record 1 is written, record
        // 2's write is held, `sync` asks for both; a pool thread syncs record 1 and finishes
        // while record 2 is still being written. That sync must not end the request: once
        // record 2 is written, it is synced too and `sync` returns (durability `never`, so
        // nothing else would sync it).
        let dir = tempfile::tempdir().unwrap();
        // The slow-disk wrapper with no delay, as a gate on segment writes.
        let gate = Arc::new(io::Throttle::parse("only=seg").unwrap());
        let env = Env { fs: Arc::new(io::Throttled::new(io::real(), gate.clone())), exec: Exec::Pool(Pool::global()) };
        let log = Arc::new(Log::open_with(dir.path(), opts(1 << 20, Durability::Never), env).unwrap());
        log.append(b"one").unwrap();
        // Written means counted by the log (the segment header is a write of its own, so the
        // gate's count of writes is not enough).
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.stats().bytes_written == 0 {
            assert!(Instant::now() < deadline, "record 1 was never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        gate.set_hold(true);
        log.append(b"two").unwrap();
        gate.wait("record 2's write to reach the gate", |g| g.held == 1);
        let (tx, rx) = std::sync::mpsc::channel();
        let syncer = {
            let log = log.clone();
            std::thread::spawn(move || tx.send(log.sync()).unwrap())
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.stats().syncs < 1 {
            assert!(Instant::now() < deadline, "the sync of record 1 never ran");
            std::thread::sleep(Duration::from_millis(1));
        }
        gate.set_hold(false);
        let r = rx.recv_timeout(Duration::from_secs(10)).expect("sync did not return after record 2 was written");
        r.unwrap();
        assert!(log.synced() >= 2, "sync returned before record 2 was synced");
        syncer.join().unwrap();
        log.close().unwrap();
    }
}
