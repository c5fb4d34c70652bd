//! Segmented append-only log with CRC32C-framed records and group commit.
//!
//! Invariants:
//! - sequence numbers are dense: the first record ever is 1, each append is previous + 1, and a
//!   number is never reused;
//! - readers ([`Log::read`]) and the [`Log::durable`] watch never see a record before it is
//!   durable per the [`Durability`] setting;
//! - the ack watermark never passes the last durable record; a segment is deleted only when every
//!   record in it is at or below the watermark (or removed by retention), never the active one;
//! - recovery truncates a torn or corrupt tail of the last segment instead of failing.
//!
//! One writer thread per log owns the files. `append` copies the frame into a pending buffer
//! under a short lock; the writer takes the whole buffer, writes it, and (for `Always`) calls
//! fdatasync once for everything in it — group commit. A failed write leaves the records pending
//! (retried every 100 ms, appends refused meanwhile) and fails current waiters; a failed
//! fdatasync poisons the log, because the page cache state is then unknown.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::error::{Error, ErrorKind, Result};
use crate::message::now_ms;

/// Frame header: u32 payload length, u32 CRC32C (over seq, timestamp, payload), u64 seq,
/// u64 timestamp ms.
const HEADER: usize = 24;
const SEGMENT_SUFFIX: &str = ".seg";
const ACK_FILE: &str = "ack";
const RETRY_WRITE: Duration = Duration::from_millis(100);

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
        LogOptions { segment_bytes: 64 * 1024 * 1024, durability: Durability::Always, max_record_bytes: 1024 * 1024 }
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

struct Segment {
    first_seq: u64,
    path: PathBuf,
    file: Arc<File>,
    /// File offset of each record, in order.
    offsets: Vec<u64>,
    /// Bytes written (the end of the last record).
    len: u64,
    first_ts: u64,
    last_ts: u64,
}

impl Segment {
    fn last_seq(&self) -> u64 {
        self.first_seq + self.offsets.len() as u64 - 1
    }
    fn info(&self) -> SegmentInfo {
        SegmentInfo { first_seq: self.first_seq, last_seq: self.last_seq(), bytes: self.len, last_timestamp_ms: self.last_ts }
    }
}

struct State {
    /// Next sequence number to assign.
    next_seq: u64,
    /// Frames appended and not yet taken by the writer.
    pending: Vec<u8>,
    /// (seq, timestamp, frame length) of each pending frame.
    pending_meta: Vec<(u64, u64, usize)>,
    /// The writer is writing frames up to this seq (taken from pending).
    writing_to: u64,
    /// Last seq written to the OS.
    written: u64,
    /// Last seq durable per the durability setting (what readers may see).
    durable: u64,
    /// A write is failing: (error text); appends are refused until it succeeds again.
    failing: Option<String>,
    /// An fdatasync failed: the log must be reopened.
    poisoned: Option<String>,
    closed: bool,
    segments: Vec<Segment>,
    acked: u64,
    stats: LogStats,
    /// Something was written since the last fdatasync (Interval mode).
    dirty: bool,
}

struct Shared {
    dir: PathBuf,
    opts: LogOptions,
    state: Mutex<State>,
    /// Wakes the writer (new data, close) and blocking waiters (progress, failure).
    cond: Condvar,
    durable_tx: watch::Sender<u64>,
    /// Bumped on every progress or failure, for async waiters.
    events: watch::Sender<u64>,
}

struct Handle {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = shutdown(&self.shared, &self.thread);
    }
}

/// A handle to one log. Cheap to clone; all clones share one writer thread.
#[derive(Clone)]
pub struct Log {
    h: Arc<Handle>,
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |e| Error::storage(context, e)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(format!("fsync directory {}", dir.display())))
}

fn crc(seq: u64, ts: u64, payload: &[u8]) -> u32 {
    let mut h = crc32c::crc32c(&seq.to_le_bytes());
    h = crc32c::crc32c_append(h, &ts.to_le_bytes());
    crc32c::crc32c_append(h, payload)
}

fn encode_frame(out: &mut Vec<u8>, seq: u64, ts: u64, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc(seq, ts, payload).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&ts.to_le_bytes());
    out.extend_from_slice(payload);
}

/// Parses the frame at `buf[pos..]`; `None` if torn or corrupt.
fn parse_frame(buf: &[u8], pos: usize, max: usize) -> Option<(u64, u64, std::ops::Range<usize>)> {
    let h = buf.get(pos..pos + HEADER)?;
    let len = u32::from_le_bytes(h[0..4].try_into().ok()?) as usize;
    if len > max {
        return None;
    }
    let want = u32::from_le_bytes(h[4..8].try_into().ok()?);
    let seq = u64::from_le_bytes(h[8..16].try_into().ok()?);
    let ts = u64::from_le_bytes(h[16..24].try_into().ok()?);
    let body = pos + HEADER..pos + HEADER + len;
    let payload = buf.get(body.clone())?;
    (crc(seq, ts, payload) == want).then_some((seq, ts, body))
}

fn read_ack(dir: &Path) -> Result<u64> {
    match fs::read(dir.join(ACK_FILE)) {
        Ok(b) if b.len() == 12 => {
            let v = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
            let c = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
            if crc32c::crc32c(&b[0..8]) != c {
                return Err(Error::new(ErrorKind::Storage, format!("{}: ack watermark file is corrupt", dir.join(ACK_FILE).display())));
            }
            Ok(v)
        }
        Ok(_) => Err(Error::new(ErrorKind::Storage, format!("{}: ack watermark file has the wrong size", dir.join(ACK_FILE).display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(Error::storage(format!("read {}", dir.join(ACK_FILE).display()), e)),
    }
}

/// Writes `data` to `dir/name` atomically: temp file, fsync, rename, fsync the directory.
pub(crate) fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let mut f = File::create(&tmp).map_err(io(format!("create {}", tmp.display())))?;
    f.write_all(data).map_err(io(format!("write {}", tmp.display())))?;
    f.sync_all().map_err(io(format!("fsync {}", tmp.display())))?;
    fs::rename(&tmp, &path).map_err(io(format!("rename {}", tmp.display())))?;
    sync_dir(dir)
}

/// Scans one segment file; returns the segment and bytes truncated from a bad tail.
fn recover_segment(path: &Path, first_seq: u64, max: usize, is_last: bool) -> Result<(Segment, u64)> {
    let buf = fs::read(path).map_err(io(format!("read {}", path.display())))?;
    let mut offsets = Vec::new();
    let (mut first_ts, mut last_ts) = (0, 0);
    let mut pos = 0usize;
    while pos < buf.len() {
        match parse_frame(&buf, pos, max) {
            Some((seq, ts, body)) if seq == first_seq + offsets.len() as u64 => {
                if offsets.is_empty() {
                    first_ts = ts;
                }
                last_ts = ts;
                offsets.push(pos as u64);
                pos = body.end;
            }
            _ => break,
        }
    }
    let cut = (buf.len() - pos) as u64;
    if cut > 0 {
        if is_last {
            tracing::warn!(file = %path.display(), bytes = cut, "truncating a torn or corrupt tail");
        } else {
            tracing::error!(file = %path.display(), bytes = cut, "corrupt record inside a sealed segment; truncating it there");
        }
        let f = OpenOptions::new().write(true).open(path).map_err(io(format!("open {}", path.display())))?;
        f.set_len(pos as u64).map_err(io(format!("truncate {}", path.display())))?;
        f.sync_all().map_err(io(format!("fsync {}", path.display())))?;
    }
    let file = OpenOptions::new().read(true).append(true).open(path).map_err(io(format!("open {}", path.display())))?;
    Ok((Segment { first_seq, path: path.to_path_buf(), file: Arc::new(file), offsets, len: pos as u64, first_ts, last_ts }, cut))
}

fn new_segment(dir: &Path, first_seq: u64) -> Result<Segment> {
    let path = dir.join(segment_name(first_seq));
    let file = OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(io(format!("create {}", path.display())))?;
    Ok(Segment { first_seq, path, file: Arc::new(file), offsets: Vec::new(), len: 0, first_ts: 0, last_ts: 0 })
}

impl Log {
    /// Opens (creating the directory if needed) and recovers the log in `dir`.
    pub fn open(dir: &Path, opts: LogOptions) -> Result<Log> {
        fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let acked = read_ack(dir)?;
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(dir).map_err(io(format!("list {}", dir.display())))? {
            let entry = entry.map_err(io(format!("list {}", dir.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            } else if let Some(n) = name.strip_suffix(SEGMENT_SUFFIX).and_then(|n| n.parse::<u64>().ok()) {
                names.push((n, entry.path()));
            }
        }
        names.sort();
        let max = opts.max_record_bytes;
        let mut segments: Vec<Segment> = Vec::new();
        let mut truncated = 0;
        let count = names.len();
        for (i, (first, path)) in names.into_iter().enumerate() {
            if let Some(prev) = segments.last() {
                let expected = prev.last_seq() + 1;
                if first != expected {
                    return Err(Error::new(
                        ErrorKind::Storage,
                        format!(
                            "{}: segment starts at {first} but the previous one ends at {}; the log is damaged",
                            path.display(),
                            expected - 1
                        ),
                    ));
                }
            }
            let (seg, cut) = recover_segment(&path, first, max, i + 1 == count)?;
            truncated += cut;
            segments.push(seg);
        }
        let next_seq = segments.last().map_or(acked + 1, |s| s.last_seq() + 1).max(acked + 1);
        if segments.last().is_none_or(|s| s.last_seq() + 1 != next_seq) {
            segments.push(new_segment(dir, next_seq)?);
            sync_dir(dir)?;
        }
        let last = next_seq - 1;
        let (durable_tx, _) = watch::channel(last);
        let (events, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            opts,
            state: Mutex::new(State {
                next_seq,
                pending: Vec::new(),
                pending_meta: Vec::new(),
                writing_to: last,
                written: last,
                durable: last,
                failing: None,
                poisoned: None,
                closed: false,
                segments,
                acked: acked.min(last),
                stats: LogStats { recovered_truncated_bytes: truncated, ..LogStats::default() },
                dirty: false,
            }),
            cond: Condvar::new(),
            durable_tx,
            events,
        });
        let s = shared.clone();
        let thread =
            std::thread::Builder::new().name("hubmsg-log".into()).spawn(move || writer(s)).map_err(io("spawn the log writer thread"))?;
        Ok(Log { h: Arc::new(Handle { shared, thread: Mutex::new(Some(thread)) }) })
    }

    fn shared(&self) -> &Shared {
        &self.h.shared
    }

    /// Appends one record and returns its sequence number without waiting for durability.
    pub fn append(&self, payload: &[u8]) -> Result<u64> {
        let sh = self.shared();
        if payload.len() > sh.opts.max_record_bytes {
            return Err(Error::new(
                ErrorKind::MessageTooLarge,
                format!("record of {} bytes exceeds the log's limit of {} bytes", payload.len(), sh.opts.max_record_bytes),
            ));
        }
        let mut st = sh.state.lock();
        check_usable(&st)?;
        if let Some(why) = &st.failing {
            return Err(Error::new(ErrorKind::Storage, format!("the log cannot write right now ({why}); try again later")));
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let ts = now_ms();
        let before = st.pending.len();
        if st.pending.capacity() == 0 {
            // The writer took the previous buffer: start the next batch with room for many
            // records instead of regrowing from nothing.
            st.pending.reserve(64 * 1024);
        }
        encode_frame(&mut st.pending, seq, ts, payload);
        let flen = st.pending.len() - before;
        st.pending_meta.push((seq, ts, flen));
        st.stats.appended += 1;
        drop(st);
        sh.cond.notify_all();
        Ok(seq)
    }

    fn check_durable(st: &State, seq: u64) -> Option<Result<()>> {
        if st.durable >= seq {
            return Some(Ok(()));
        }
        if let Some(why) = &st.poisoned {
            return Some(Err(Error::new(ErrorKind::Storage, format!("log poisoned after fsync failure ({why}); reopen it"))));
        }
        if let Some(why) = &st.failing {
            return Some(Err(Error::new(ErrorKind::Storage, format!("writing to the log failed: {why}"))));
        }
        if seq >= st.next_seq {
            return Some(Err(Error::invalid(format!("record {seq} was never appended"))));
        }
        if st.closed && st.pending.is_empty() && st.writing_to < seq {
            return Some(Err(Error::closed("log")));
        }
        None
    }

    /// Waits until record `seq` is durable. Errors with `Storage` if its write failed.
    pub async fn wait_durable(&self, seq: u64) -> Result<()> {
        let mut events = self.shared().events.subscribe();
        loop {
            if let Some(r) = Log::check_durable(&self.shared().state.lock(), seq) {
                return r;
            }
            if events.changed().await.is_err() {
                return Err(Error::closed("log"));
            }
        }
    }

    /// Blocking form of [`Log::wait_durable`] (must not be called on a tokio runtime thread).
    pub fn wait_durable_blocking(&self, seq: u64) -> Result<()> {
        let sh = self.shared();
        let mut st = sh.state.lock();
        loop {
            if let Some(r) = Log::check_durable(&st, seq) {
                return r;
            }
            sh.cond.wait(&mut st);
        }
    }

    /// A watch of the highest durable sequence number (0 when none).
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.shared().durable_tx.subscribe()
    }

    /// Records with `seq >= from`, up to the durable head, at most `max_records` and about
    /// `max_bytes` (always at least one record if any is available).
    pub fn read(&self, from: u64, max_records: usize, max_bytes: usize) -> Result<Vec<Record>> {
        let sh = self.shared();
        // Find the span under the lock, read outside it.
        let (file, start, end, first_seq, count, path) = {
            let st = sh.state.lock();
            let head = st.durable;
            let from = from.max(st.segments.first().map_or(1, |s| s.first_seq)).max(1);
            if from > head || max_records == 0 {
                return Ok(Vec::new());
            }
            let Some(seg) = st.segments.iter().rev().find(|s| s.first_seq <= from && !s.offsets.is_empty() && s.last_seq() >= from) else {
                return Ok(Vec::new());
            };
            let i = (from - seg.first_seq) as usize;
            let last_in_seg = seg.last_seq().min(head);
            let mut n = ((last_in_seg - from + 1) as usize).min(max_records);
            let start = seg.offsets[i];
            let end_of = |j: usize| if j + 1 < seg.offsets.len() { seg.offsets[j + 1] } else { seg.len };
            // Limit by bytes (at least one record).
            while n > 1 && end_of(i + n - 1) - start > max_bytes as u64 {
                n = (n / 2).max(1);
            }
            (seg.file.clone(), start, end_of(i + n - 1), from, n, seg.path.clone())
        };
        let mut buf = vec![0u8; (end - start) as usize];
        file.read_exact_at(&mut buf, start).map_err(io(format!("read {}", path.display())))?;
        let buf = Bytes::from(buf);
        let mut out = Vec::with_capacity(count);
        let mut pos = 0;
        for k in 0..count as u64 {
            let (seq, ts, body) = parse_frame(&buf, pos, sh.opts.max_record_bytes).ok_or_else(|| {
                Error::new(ErrorKind::Storage, format!("{}: record {} failed its checksum on read", path.display(), first_seq + k))
            })?;
            if seq != first_seq + k {
                return Err(Error::new(
                    ErrorKind::Storage,
                    format!("{}: expected record {} at its offset, found {seq}", path.display(), first_seq + k),
                ));
            }
            out.push(Record { seq, timestamp_ms: ts, payload: buf.slice(body.clone()) });
            pos = body.end;
        }
        Ok(out)
    }

    /// The first sequence number still stored (after deletions); `last_seq() + 1` when empty.
    pub fn first_seq(&self) -> u64 {
        let st = self.shared().state.lock();
        // With nothing written yet, records appended but still pending come next: the answer is
        // the first of them (durable + 1), not `next_seq`, or a reader positioned here would
        // skip every record that was in flight to the writer.
        st.segments.iter().find(|s| !s.offsets.is_empty()).map_or(st.durable + 1, |s| s.first_seq)
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
            let seg = st.segments.iter().find(|s| !s.offsets.is_empty() && s.last_ts >= ms);
            (seg.map(|s| (s.first_seq, s.last_seq())), st.durable + 1)
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

    /// Marks every record `<= seq` consumed; persists the watermark and deletes fully consumed
    /// segments. Never moves backwards; clamps to the durable head.
    pub fn ack_through(&self, seq: u64) -> Result<()> {
        let sh = self.shared();
        let mut st = sh.state.lock();
        check_usable(&st)?;
        let seq = seq.min(st.durable);
        if seq <= st.acked {
            return Ok(());
        }
        write_atomic(&sh.dir, ACK_FILE, &{
            let mut b = seq.to_le_bytes().to_vec();
            b.extend_from_slice(&crc32c::crc32c(&seq.to_le_bytes()).to_le_bytes());
            b
        })?;
        st.acked = seq;
        delete_segments_below(&sh.dir, &mut st, seq + 1)?;
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
        let mut st = sh.state.lock();
        check_usable(&st)?;
        let limit = seq.min(st.durable + 1);
        delete_segments_below(&sh.dir, &mut st, limit)
    }

    /// The segments, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.shared().state.lock().segments.iter().map(Segment::info).collect()
    }

    /// Counters.
    pub fn stats(&self) -> LogStats {
        self.shared().state.lock().stats.clone()
    }

    /// Writes and syncs everything appended so far, then stops the writer thread. Further
    /// appends fail with `Closed`. Idempotent.
    pub fn close(&self) -> Result<()> {
        shutdown(&self.h.shared, &self.h.thread)
    }
}

fn check_usable(st: &State) -> Result<()> {
    if let Some(why) = &st.poisoned {
        return Err(Error::new(ErrorKind::Storage, format!("log poisoned after fsync failure ({why}); reopen it")));
    }
    if st.closed {
        return Err(Error::closed("log"));
    }
    Ok(())
}

/// Deletes non-active segments whose last record is below `limit`; returns records removed.
fn delete_segments_below(dir: &Path, st: &mut State, limit: u64) -> Result<u64> {
    let mut removed = 0;
    while st.segments.len() > 1 {
        let s = &st.segments[0];
        if !s.offsets.is_empty() && s.last_seq() >= limit {
            break;
        }
        removed += s.offsets.len() as u64;
        fs::remove_file(&s.path).map_err(io(format!("delete {}", s.path.display())))?;
        st.segments.remove(0);
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

fn shutdown(sh: &Arc<Shared>, thread: &Mutex<Option<JoinHandle<()>>>) -> Result<()> {
    {
        let mut st = sh.state.lock();
        st.closed = true;
    }
    sh.cond.notify_all();
    if let Some(t) = thread.lock().take() {
        let _ = t.join();
    }
    let st = sh.state.lock();
    if let Some(why) = &st.poisoned {
        return Err(Error::new(ErrorKind::Storage, format!("log poisoned after fsync failure ({why})")));
    }
    if !st.pending.is_empty() {
        return Err(Error::new(
            ErrorKind::Storage,
            format!("closing the log lost {} unwritten records: {}", st.pending_meta.len(), st.failing.clone().unwrap_or_default()),
        ));
    }
    Ok(())
}

/// The writer thread: takes pending frames in batches, writes, syncs, publishes durability.
fn writer(sh: Arc<Shared>) {
    let interval = match sh.opts.durability {
        Durability::Interval(d) => Some(d),
        _ => None,
    };
    let mut last_sync = Instant::now();
    let mut final_try_done = false;
    loop {
        let (buf, meta) = {
            let mut st = sh.state.lock();
            loop {
                if st.poisoned.is_some() {
                    return;
                }
                if !st.pending.is_empty() && st.failing.is_none() {
                    break;
                }
                if st.closed {
                    if !st.pending.is_empty() && !final_try_done {
                        final_try_done = true;
                        st.failing = None;
                        break;
                    }
                    drop(st);
                    if interval.is_some() {
                        final_sync(&sh);
                    }
                    return;
                }
                let timeout = match (st.failing.is_some(), interval) {
                    (true, _) => Some(RETRY_WRITE),
                    (false, Some(d)) if st.dirty => Some(d.saturating_sub(last_sync.elapsed())),
                    _ => None,
                };
                let timed_out = match timeout {
                    Some(d) => sh.cond.wait_for(&mut st, d).timed_out(),
                    None => {
                        sh.cond.wait(&mut st);
                        false
                    }
                };
                if timed_out {
                    if st.failing.is_some() {
                        st.failing = None; // try the write again
                    } else if interval.is_some() && st.dirty {
                        drop(st);
                        interval_sync(&sh);
                        last_sync = Instant::now();
                        st = sh.state.lock();
                    }
                }
            }
            let buf = std::mem::take(&mut st.pending);
            let meta = std::mem::take(&mut st.pending_meta);
            st.writing_to = meta.last().map_or(st.writing_to, |m| m.0);
            (buf, meta)
        };
        if let Err(e) = write_batch(&sh, &buf, &meta) {
            let mut st = sh.state.lock();
            // Put the unwritten part of the batch back in front of whatever was appended meanwhile.
            let done = meta.iter().take_while(|m| m.0 <= st.written).count();
            let done_bytes: usize = meta[..done].iter().map(|m| m.2).sum();
            let mut b = buf[done_bytes..].to_vec();
            b.extend_from_slice(&st.pending);
            st.pending = b;
            let mut m = meta[done..].to_vec();
            m.extend_from_slice(&st.pending_meta);
            st.pending_meta = m;
            st.writing_to = st.written;
            if e.kind() == ErrorKind::Internal {
                tracing::error!(error = %e, "log fsync failed; the log is poisoned");
                st.poisoned = Some(e.message().to_string());
            } else {
                tracing::error!(error = %e, "log write failed; retrying");
                st.failing = Some(e.message().to_string());
            }
            drop(st);
            sh.cond.notify_all();
            sh.events.send_modify(|v| *v += 1);
            continue;
        }
        if let Some(d) = interval {
            if last_sync.elapsed() >= d {
                interval_sync(&sh);
                last_sync = Instant::now();
            }
        }
    }
}

fn final_sync(sh: &Shared) {
    let file = sh.state.lock().segments.last().map(|s| s.file.clone());
    if let Some(f) = file {
        let _ = f.sync_data();
    }
}

fn interval_sync(sh: &Shared) {
    let file = {
        let mut st = sh.state.lock();
        st.dirty = false;
        st.segments.last().map(|s| s.file.clone())
    };
    if let Some(f) = file {
        if let Err(e) = f.sync_data() {
            let mut st = sh.state.lock();
            st.poisoned = Some(format!("fdatasync: {e}"));
            drop(st);
            sh.cond.notify_all();
            sh.events.send_modify(|v| *v += 1);
        } else {
            sh.state.lock().stats.syncs += 1;
        }
    }
}

/// Writes one batch (rolling segments as needed) and, for `Always`, syncs it. An `Internal`
/// error means an fdatasync failed (the log is poisoned); other errors leave nothing half-done
/// (the active file is truncated back).
fn write_batch(sh: &Shared, buf: &[u8], meta: &[(u64, u64, usize)]) -> Result<()> {
    let always = sh.opts.durability == Durability::Always;
    let mut pos = 0usize;
    let mut i = 0usize;
    while i < meta.len() {
        let (file, seg_len, seg_nonempty) = {
            let st = sh.state.lock();
            let s = st.segments.last().expect("an active segment exists");
            (s.file.clone(), s.len, !s.offsets.is_empty())
        };
        // Take records until the segment would overflow (never an empty chunk).
        let mut j = i;
        let mut chunk = 0usize;
        while j < meta.len() {
            let f = meta[j].2;
            if (seg_nonempty || j > i) && seg_len + (chunk + f) as u64 > sh.opts.segment_bytes {
                break;
            }
            chunk += f;
            j += 1;
        }
        if j == i {
            // The active segment is full: roll to a new one named by the next record.
            if always {
                file.sync_data().map_err(|e| Error::new(ErrorKind::Internal, format!("fdatasync: {e}")))?;
            }
            let seg = new_segment(&sh.dir, meta[i].0)?;
            if always {
                sync_dir(&sh.dir).map_err(|e| Error::new(ErrorKind::Internal, e.message().to_string()))?;
            }
            sh.state.lock().segments.push(seg);
            continue;
        }
        if let Err(e) = (&*file).write_all(&buf[pos..pos + chunk]) {
            let _ = file.set_len(seg_len);
            return Err(Error::storage("append to log segment", e));
        }
        if always {
            file.sync_data().map_err(|e| Error::new(ErrorKind::Internal, format!("fdatasync: {e}")))?;
        }
        // Publish the records of this chunk.
        let last = meta[j - 1].0;
        {
            let mut st = sh.state.lock();
            let s = st.segments.last_mut().expect("active segment");
            let mut off = s.len;
            for m in &meta[i..j] {
                if s.offsets.is_empty() {
                    s.first_ts = m.1;
                }
                s.offsets.push(off);
                s.last_ts = m.1;
                off += m.2 as u64;
            }
            s.len = off;
            st.written = last;
            st.stats.bytes_written += chunk as u64;
            if always {
                st.stats.syncs += 1;
                st.durable = last;
            } else {
                st.durable = last;
                st.dirty = true;
            }
        }
        sh.durable_tx.send_replace(last);
        sh.cond.notify_all();
        sh.events.send_modify(|v| *v += 1);
        pos += chunk;
        i = j;
    }
    Ok(())
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
    fn torn_and_corrupt_tails_are_truncated_and_appends_continue() {
        for damage in ["truncate", "flip"] {
            let dir = tempfile::tempdir().unwrap();
            {
                let log = Log::open(dir.path(), opts(1 << 20, Durability::Always)).unwrap();
                append_all(&log, 100);
                log.close().unwrap();
            }
            let seg = dir.path().join(segment_name(1));
            let mut b = fs::read(&seg).unwrap();
            let n = b.len();
            match damage {
                "truncate" => b.truncate(n - 3),
                _ => b[n - 2] ^= 0x55,
            }
            fs::write(&seg, &b).unwrap();
            let log = Log::open(dir.path(), opts(1 << 20, Durability::Always)).unwrap();
            assert_eq!(log.last_seq(), 99, "{damage}");
            assert!(log.stats().recovered_truncated_bytes > 0);
            assert_eq!(read_all(&log).len(), 99);
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
    fn oversize_records_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogOptions { max_record_bytes: 10, ..LogOptions::default() }).unwrap();
        assert_eq!(log.append(&[0u8; 11]).unwrap_err().kind(), ErrorKind::MessageTooLarge);
    }
}
