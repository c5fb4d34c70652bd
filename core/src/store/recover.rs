//! Recovery of a log directory: what its segments hold, what a crash tore, what is damaged, and
//! the quarantine that `hubmsg store repair` (or an outbox opening damaged data) applies.
//!
//! The rules (docs/storage.md, "Recovery"):
//! - a torn tail — bad bytes at the end of the last segment after which nothing valid follows,
//!   or only records no later record attests as fsync'd — is cut;
//! - a bad record followed by valid records is damage: never cut; the log is read-only up to it
//!   until the damaged segment is quarantined (moved aside, never deleted) and every valid record
//!   after the damage is kept;
//! - a sealed segment is never modified by opening;
//! - sequence numbers are never reused: the log continues after the highest number any record,
//!   the ack watermark or the caller's floor (a checkpoint, a snapshot) has seen; a missing
//!   range is reported as damage.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::format::{self, IndexEntry, Scan, SegmentIndex, Version};
use super::io::{create_dir_durable, io_err, read_file, write_atomic, FileIo, Fs};
use crate::error::{Error, ErrorKind, Result};

pub(crate) const SEGMENT_SUFFIX: &str = ".seg";
pub(crate) const INDEX_SUFFIX: &str = ".idx";
pub(crate) const ACK_FILE: &str = "ack";
pub(crate) const HOLES_FILE: &str = "holes";
pub(crate) const QUARANTINE_DIR: &str = "quarantine";

/// The file name of the segment whose first record is `first_seq`.
pub(crate) fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SEGMENT_SUFFIX}")
}

/// What is wrong with part of a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DamageKind {
    /// A record fails its checksum (or its framing) and valid records follow it.
    Corrupt,
    /// Records that were stored are gone: a missing or shortened segment, or a range a
    /// checkpoint, ack watermark or snapshot has seen.
    Missing,
}

/// One damaged place in a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// What kind of damage.
    pub kind: DamageKind,
    /// The file (for `Missing`, the segment where the records should be, or the directory).
    pub file: PathBuf,
    /// Byte offset of the bad bytes in `file` (0 for `Missing`).
    pub offset: u64,
    /// First sequence number affected.
    pub first_seq: u64,
    /// Last sequence number affected (for `Corrupt`: up to the last valid record after the
    /// damage in the same segment, which cannot be read until the segment is repaired).
    pub last_seq: u64,
    /// Valid records after the bad bytes in the same segment (kept by a repair).
    pub valid_after: u64,
    /// What was found.
    pub reason: String,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            DamageKind::Corrupt => write!(
                f,
                "{} offset {}: record {} is damaged ({}) and {} valid record{} follow{} it",
                self.file.display(),
                self.offset,
                self.first_seq,
                self.reason,
                self.valid_after,
                if self.valid_after == 1 { "" } else { "s" },
                if self.valid_after == 1 { "s" } else { "" },
            ),
            DamageKind::Missing => {
                write!(f, "{}: records {}..{} are missing ({})", self.file.display(), self.first_seq, self.last_seq, self.reason)
            }
        }
    }
}

/// One segment as recovery found it.
pub(crate) struct Found {
    pub first_seq: u64,
    pub path: PathBuf,
    pub file: Arc<dyn FileIo>,
    pub version: Version,
    /// Last record of the readable prefix (`first_seq - 1` when empty).
    pub last_seq: u64,
    /// Bytes of the readable prefix.
    pub len: u64,
    pub first_ts: u64,
    pub last_ts: u64,
    pub index: Vec<IndexEntry>,
    /// Damage inside: records `first..=last` beyond the prefix cannot be read.
    pub damaged: Option<(u64, u64)>,
    /// Whether its sidecar index is current (so a later open need not read it).
    pub indexed: bool,
}

impl Found {
    /// The highest sequence number the segment holds or held.
    pub(crate) fn end_seq(&self) -> u64 {
        self.damaged.map_or(self.last_seq, |(_, z)| z.max(self.last_seq))
    }
    fn from_index(first_seq: u64, path: PathBuf, file: Arc<dyn FileIo>, i: SegmentIndex) -> Found {
        Found {
            first_seq,
            path,
            file,
            version: Version::V2,
            last_seq: i.last_seq,
            len: i.len,
            first_ts: i.first_ts,
            last_ts: i.last_ts,
            index: i.entries,
            damaged: None,
            indexed: true,
        }
    }
    fn from_scan(first_seq: u64, path: PathBuf, file: Arc<dyn FileIo>, s: &Scan) -> Found {
        Found {
            first_seq,
            path,
            file,
            version: s.version,
            last_seq: s.last_seq,
            len: s.good_len,
            first_ts: s.first_ts,
            last_ts: s.last_ts,
            index: s.index.clone(),
            damaged: None,
            indexed: false,
        }
    }
    /// Its sidecar index.
    pub(crate) fn sidecar(&self) -> SegmentIndex {
        SegmentIndex::of(self.first_seq, self.last_seq, self.len, (self.first_ts, self.last_ts), &self.index)
    }
}

/// What recovery of a directory found.
pub(crate) struct Recovered {
    pub segments: Vec<Found>,
    pub acked: u64,
    pub ack_counter: u64,
    pub damage: Vec<Damage>,
    /// Bytes cut from a torn tail (or that would be cut, when only checking).
    pub cut_bytes: u64,
    /// Highest sequence number seen in a cut tail (those numbers are not reused).
    pub max_cut_seq: u64,
    /// Ranges an operator accepted as lost.
    pub holes: Vec<(u64, u64)>,
    /// Files left by an interrupted atomic write or repair (removed when opening).
    pub leftovers: Vec<PathBuf>,
}

impl Recovered {
    /// The highest sequence number the directory has seen (records, cut tail, ack watermark).
    pub(crate) fn max_seen(&self) -> u64 {
        let seg = self.segments.iter().map(Found::end_seq).max().unwrap_or(0);
        seg.max(self.max_cut_seq).max(self.acked)
    }
    /// Whether damage blocks appends.
    pub(crate) fn corrupt(&self) -> Option<&Damage> {
        self.damage.iter().find(|d| d.kind == DamageKind::Corrupt)
    }
}

/// How [`recover_dir`] may touch the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Opening: cut a torn tail, remove leftovers, write missing sidecar indexes, trust them.
    Open,
    /// `store check`: read every byte, change nothing.
    Check,
}

fn accepted(holes: &[(u64, u64)], a: u64, z: u64) -> bool {
    holes.iter().any(|&(x, y)| x <= a && z <= y)
}

/// Reads the ack watermark: `(counter, watermark)`, `(0, 0)` when there is none.
pub(crate) fn read_ack(fs: &dyn Fs, dir: &Path) -> Result<(u64, u64)> {
    let path = dir.join(ACK_FILE);
    match read_file(fs, &path).map_err(io_err("read", &path))? {
        None => Ok((0, 0)),
        Some(b) => format::decode_ack(&b).map_err(|why| {
            Error::new(
                ErrorKind::Storage,
                format!("{}: {why}; the log cannot tell which records were consumed. Move the file aside to start from the oldest stored record (duplicates, no loss)", path.display()),
            )
        }),
    }
}

fn read_holes(fs: &dyn Fs, dir: &Path) -> Result<Vec<(u64, u64)>> {
    let path = dir.join(HOLES_FILE);
    match read_file(fs, &path).map_err(io_err("read", &path))? {
        None => Ok(Vec::new()),
        Some(b) => format::decode_holes(&b).map_err(|why| Error::new(ErrorKind::Storage, format!("{}: {why}", path.display()))),
    }
}

/// Recovers the log in `dir`. `floor`: new records must get at least this sequence number
/// (what a checkpoint or snapshot outside the log has seen, + 1).
pub(crate) fn recover_dir(fs: &dyn Fs, dir: &Path, max_record: usize, floor: u64, mode: Mode) -> Result<Recovered> {
    let names = fs.list(dir).map_err(io_err("list", dir))?;
    let (counter, acked) = read_ack(fs, dir)?;
    let holes = read_holes(fs, dir)?;
    let mut leftovers = Vec::new();
    let mut segs: Vec<(u64, String)> = Vec::new();
    let mut indexes = std::collections::HashSet::new();
    for n in &names {
        if n.ends_with(".tmp") || n.ends_with(".repair") {
            leftovers.push(dir.join(n));
        } else if let Some(first) = n.strip_suffix(SEGMENT_SUFFIX).and_then(|s| s.parse::<u64>().ok()) {
            segs.push((first, n.clone()));
        } else if n.ends_with(INDEX_SUFFIX) {
            indexes.insert(n.clone());
        }
    }
    if mode == Mode::Open {
        for p in &leftovers {
            let _ = fs.remove(p);
        }
    }
    segs.sort();
    let mut out =
        Recovered { segments: Vec::new(), acked, ack_counter: counter, damage: Vec::new(), cut_bytes: 0, max_cut_seq: 0, holes, leftovers };
    let count = segs.len();
    let mut reported: Vec<(u64, u64)> = Vec::new();
    for (i, (first, name)) in segs.into_iter().enumerate() {
        let path = dir.join(&name);
        let last = i + 1 == count;
        let file = fs.open(&path, false, 0o644).map_err(io_err("open", &path))?;
        let flen = file.len().map_err(io_err("stat", &path))?;
        let idx_name = format!("{name}{INDEX_SUFFIX}");
        let idx = if indexes.contains(&idx_name) {
            read_file(fs, &dir.join(&idx_name)).ok().flatten().and_then(|b| format::decode_index(&b)).filter(|x| x.first_seq == first)
        } else {
            None
        };
        let shortened = idx.as_ref().filter(|x| x.len > flen).map(|x| (x.len, x.last_seq));
        let found = match idx {
            Some(x) if mode == Mode::Open && !last && x.len == flen => Found::from_index(first, path.clone(), file, x),
            idx => {
                let mut buf = vec![0u8; flen as usize];
                file.read_at(&mut buf, 0).map_err(io_err("read", &path))?;
                let mut s = format::scan(&buf, first, max_record);
                let mut file = file;
                if mode == Mode::Open && s.version == Version::V1 && s.bad.as_ref().is_none_or(|b| b.valid_after() == 0) {
                    // Migration: a version-1 segment is rewritten once in the current format
                    // (its torn tail, if any, is left behind with it).
                    let data = rewrite(&buf, Version::V1, 0, s.good_len, first, max_record)?;
                    write_repair(fs, &path, &data)?;
                    fs.sync_dir(dir).map_err(io_err("fsync directory", dir))?;
                    tracing::info!(file = %path.display(), records = s.count, "rewrote a version-1 segment in the current format");
                    file = fs.open(&path, false, 0o644).map_err(io_err("open", &path))?;
                    buf = data;
                    s = format::scan(&buf, first, max_record);
                }
                let mut f = Found::from_scan(first, path.clone(), file.clone(), &s);
                if let Some(bad) = &s.bad {
                    let attested_by_index = idx.as_ref().is_some_and(|x| x.len > bad.offset);
                    let v1_ambiguous = s.version == Version::V1 && bad.valid_after() > 0;
                    if last && !bad.attested() && !attested_by_index && !v1_ambiguous {
                        let cut = flen - bad.offset;
                        out.cut_bytes += cut;
                        out.max_cut_seq = out.max_cut_seq.max(bad.max_seq_after());
                        let skipped = (s.last_seq + 1, bad.max_seq_after());
                        if skipped.1 >= skipped.0 {
                            // Numbers of records cut here are never handed out again: record
                            // them as a known gap before the records themselves are gone.
                            out.holes.push(skipped);
                            if mode == Mode::Open {
                                write_atomic(fs, &dir.join(HOLES_FILE), &format::encode_holes(&out.holes), false)?;
                            }
                        }
                        if mode == Mode::Open {
                            tracing::warn!(file = %path.display(), offset = bad.offset, bytes = cut, reason = %bad.reason, "cutting a torn tail (a write the crash interrupted)");
                            file.set_len(bad.offset).map_err(io_err("truncate", &path))?;
                            file.sync_data().map_err(io_err("fsync", &path))?;
                        }
                    } else {
                        let last_seq = bad.max_seq_after().max(bad.seq);
                        f.damaged = Some((bad.seq, last_seq));
                        out.damage.push(Damage {
                            kind: DamageKind::Corrupt,
                            file: path.clone(),
                            offset: bad.offset,
                            first_seq: bad.seq,
                            last_seq,
                            valid_after: bad.valid_after(),
                            reason: bad.reason.clone(),
                        });
                    }
                }
                if mode == Mode::Open && !last && f.damaged.is_none() && f.version == Version::V2 {
                    // Later opens need not read this sealed segment (no fsync needed: a torn
                    // index fails its checksum and the segment is simply read again).
                    let _ = write_atomic_unsynced(fs, &dir.join(&idx_name), &format::encode_index(&f.sidecar()));
                    f.indexed = true;
                }
                f
            }
        };
        if let Some((had, last_seq)) = shortened.filter(|&(_, l)| l > found.end_seq() && !accepted(&out.holes, found.end_seq() + 1, l)) {
            out.max_cut_seq = out.max_cut_seq.max(last_seq);
            reported.push((found.end_seq() + 1, last_seq));
            out.damage.push(Damage {
                kind: DamageKind::Missing,
                file: path.clone(),
                offset: flen,
                first_seq: found.end_seq() + 1,
                last_seq,
                valid_after: 0,
                reason: format!("the segment has {flen} bytes but held {had} when it was last fsync'd and indexed"),
            });
        }
        if let Some(prev) = out.segments.last() {
            let prev_end = prev.end_seq();
            if found.first_seq <= prev_end && prev.damaged.is_none() {
                out.damage.push(Damage {
                    kind: DamageKind::Corrupt,
                    file: path.clone(),
                    offset: 0,
                    first_seq: found.first_seq,
                    last_seq: prev_end,
                    valid_after: 0,
                    reason: format!("it starts at record {} but the previous segment ends at {prev_end}", found.first_seq),
                });
            } else if found.first_seq > prev_end + 1
                && !accepted(&out.holes, prev_end + 1, found.first_seq - 1)
                && !accepted(&reported, prev_end + 1, found.first_seq - 1)
            {
                out.damage.push(Damage {
                    kind: DamageKind::Missing,
                    file: dir.join(segment_name(prev_end + 1)),
                    offset: 0,
                    first_seq: prev_end + 1,
                    last_seq: found.first_seq - 1,
                    valid_after: 0,
                    reason: "no segment holds them (a segment file was removed?)".into(),
                });
            }
        }
        out.segments.push(found);
    }
    // Records an outside watermark has seen but the log no longer holds.
    let have = out.max_seen();
    if floor > have + 1 && !accepted(&out.holes, have + 1, floor - 1) {
        out.damage.push(Damage {
            kind: DamageKind::Missing,
            file: dir.to_path_buf(),
            offset: 0,
            first_seq: have + 1,
            last_seq: floor - 1,
            valid_after: 0,
            reason: "a checkpoint or snapshot has seen them but no segment holds them (the newest segment was removed or shortened?); new records continue after them".into(),
        });
    }
    Ok(out)
}

/// Like [`write_atomic`] without any fsync: for files whose loss or tearing is harmless
/// (sidecar indexes carry a checksum and are rebuilt from the segment).
pub(crate) fn write_atomic_unsynced(fs: &dyn Fs, path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let f = fs.open(&tmp, true, 0o644)?;
    f.set_len(0)?;
    f.write_at(data, 0)?;
    drop(f);
    fs.rename(&tmp, path)
}

/// Re-encodes the frames `first..=last` found in `buf` (between byte offsets `start..end`) as a
/// version-2 segment.
fn rewrite(buf: &[u8], version: Version, start: u64, end: u64, first: u64, max: usize) -> Result<Vec<u8>> {
    let mut out = format::segment_header(first).to_vec();
    let mut pos = start as usize;
    let mut expect = first;
    while pos < end as usize {
        let f = format::parse_frame(buf, pos, version, max)
            .map_err(|e| Error::new(ErrorKind::Internal, format!("repair: frame at {pos} no longer parses ({e})")))?;
        if f.seq != expect {
            return Err(Error::new(ErrorKind::Internal, format!("repair: expected record {expect} at {pos}, found {}", f.seq)));
        }
        format::encode_frame(&mut out, f.seq, f.ts, f.synced, &buf[f.body.clone()]);
        expect += 1;
        pos = f.end();
    }
    Ok(out)
}

/// What a quarantine did, one line per action.
pub(crate) type Actions = Vec<String>;

/// Moves every corrupt segment of `dir` aside into `dir/quarantine/` and rewrites its valid
/// records (before and after the damage) into clean segments; records the lost ranges in the
/// holes file so later opens accept them. The caller holds the directory lock.
pub(crate) fn quarantine(fs: &dyn Fs, dir: &Path, rec: &Recovered, max: usize) -> Result<Actions> {
    let mut actions = Vec::new();
    let mut holes = rec.holes.clone();
    for (k, seg) in rec.segments.iter().enumerate() {
        if seg.damaged.is_none() {
            continue;
        }
        let next_first = rec.segments[k + 1..].iter().map(|s| s.first_seq).find(|&f| f > seg.end_seq());
        let path = &seg.path;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let flen = seg.file.len().map_err(io_err("stat", path))?;
        let mut buf = vec![0u8; flen as usize];
        seg.file.read_at(&mut buf, 0).map_err(io_err("read", path))?;
        let s = format::scan(&buf, seg.first_seq, max);
        let Some(bad) = &s.bad else { continue };
        // 1. The damaged file is copied aside, never deleted.
        let qdir = dir.join(QUARANTINE_DIR);
        create_dir_durable(fs, &qdir)?;
        let mut qpath = qdir.join(&name);
        if fs.open(&qpath, false, 0o644).is_ok() {
            qpath = qdir.join(format!("{name}.{}", crate::message::now_ms()));
        }
        write_atomic(fs, &qpath, &buf, false)?;
        actions.push(format!("copied {} to {}", path.display(), qpath.display()));
        // 2. Every run of valid records after the damage gets a segment of its own.
        let mut lost_from = bad.seq;
        for run in &bad.after {
            let data = rewrite(&buf, s.version, run.start, run.end, run.first_seq, max)?;
            let target = dir.join(segment_name(run.first_seq));
            write_repair(fs, &target, &data)?;
            if run.first_seq > lost_from {
                holes.push((lost_from, run.first_seq - 1));
                actions.push(format!("records {}..{} are lost", lost_from, run.first_seq - 1));
            }
            actions.push(format!("kept records {}..{} in {}", run.first_seq, run.last_seq, target.display()));
            lost_from = run.last_seq + 1;
        }
        let upto = next_first.map_or(seg.end_seq(), |n| n - 1).max(seg.end_seq());
        if lost_from <= upto {
            holes.push((lost_from, upto));
            actions.push(format!("records {lost_from}..{upto} are lost"));
        }
        fs.sync_dir(dir).map_err(io_err("fsync directory", dir))?;
        // 3. The damaged file is replaced by its valid prefix (or removed if it has none).
        let _ = fs.remove(&dir.join(format!("{name}{INDEX_SUFFIX}")));
        if s.count > 0 {
            let data = rewrite(&buf, s.version, s.version.data_start(), s.good_len, seg.first_seq, max)?;
            write_repair(fs, path, &data)?;
            actions.push(format!("kept records {}..{} in {}", seg.first_seq, s.last_seq, path.display()));
        } else {
            fs.remove(path).map_err(io_err("remove", path))?;
        }
        fs.sync_dir(dir).map_err(io_err("fsync directory", dir))?;
    }
    // Ranges no segment holds (a removed file): accepted as lost, so state logs can open.
    for d in rec.damage.iter().filter(|d| d.kind == DamageKind::Missing && d.file.parent() == Some(dir)) {
        if !accepted(&holes, d.first_seq, d.last_seq) {
            holes.push((d.first_seq, d.last_seq));
            actions.push(format!("records {}..{} are missing and accepted as lost ({})", d.first_seq, d.last_seq, d.reason));
        }
    }
    if holes != rec.holes {
        holes.sort();
        write_atomic(fs, &dir.join(HOLES_FILE), &format::encode_holes(&holes), false)?;
    }
    Ok(actions)
}

/// Writes `data` to `path` through `path.repair` (fsync'd, renamed), replacing any old file.
fn write_repair(fs: &dyn Fs, path: &Path, data: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".repair");
    let tmp = PathBuf::from(tmp);
    let f = fs.open(&tmp, true, 0o644).map_err(io_err("create", &tmp))?;
    f.set_len(0).map_err(io_err("truncate", &tmp))?;
    f.write_at(data, 0).map_err(io_err("write", &tmp))?;
    f.sync_data().map_err(io_err("fsync", &tmp))?;
    drop(f);
    fs.rename(&tmp, path).map_err(io_err("rename", &tmp))
}

/// A `Storage` error for appends to a damaged log, saying what to do.
pub(crate) fn damaged_error(dir: &Path, d: &Damage) -> Error {
    Error::new(
        ErrorKind::Storage,
        format!(
            "{d}; the log is read-only up to the damage. Run `hubmsg store check {dir}` to see it and `hubmsg store repair {dir}` to move the damaged segment aside (the damaged records are lost, every valid record is kept)",
            dir = dir.display()
        ),
    )
}
