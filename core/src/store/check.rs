//! `hubmsg store check DIR` and `hubmsg store repair DIR`: what a data directory (a hub's, a
//! device outbox, or any single store) holds and what is damaged, and the explicit quarantine.
//!
//! `check` reads every byte of every segment and changes nothing (it does not need the
//! directory lock; a store in use is reported as such, its newest records may be in flux).
//! `repair` takes each store's lock (refusing a store in use), cuts torn tails as opening would,
//! copies every damaged segment into `quarantine/` beside it, keeps every valid record in clean
//! segments, and records the lost ranges as accepted so the store opens again.

use std::path::{Path, PathBuf};

use super::format;
use super::io::{self, read_file, Fs, LockError};
use super::recover::{self, Damage, DamageKind, Mode, QUARANTINE_DIR};
use crate::error::{Error, ErrorKind, Result};

/// What one store holds.
#[derive(Debug, Clone)]
pub struct StoreReport {
    /// The store's directory.
    pub dir: PathBuf,
    /// `log` (segments) or `state` (a snapshot and an event log in `events/`).
    pub kind: &'static str,
    /// Segment files.
    pub segments: usize,
    /// Records readable.
    pub records: u64,
    /// First and last sequence number stored (0, 0 when empty).
    pub range: (u64, u64),
    /// Bytes of segment files.
    pub bytes: u64,
    /// Ack watermark.
    pub acked: u64,
    /// For a state store: the events its snapshot covers, or why it is unreadable.
    pub snapshot: Option<std::result::Result<u64, String>>,
    /// Bytes of a torn tail that opening will cut (a write a crash interrupted).
    pub torn_bytes: u64,
    /// Damage.
    pub damage: Vec<Damage>,
    /// The pid of the process that has the store open, if any.
    pub in_use_by: Option<u32>,
    /// Files left by an interrupted atomic write or repair (removed when the store opens).
    pub leftovers: Vec<PathBuf>,
    /// What `repair` did.
    pub actions: Vec<String>,
}

impl StoreReport {
    /// Whether nothing is damaged.
    pub fn is_clean(&self) -> bool {
        self.damage.is_empty() && !matches!(self.snapshot, Some(Err(_)))
    }
}

/// The report of a whole directory tree.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every store found, in path order.
    pub stores: Vec<StoreReport>,
    /// Other findings (unreadable hub metadata, a directory with no store).
    pub notes: Vec<String>,
}

impl Report {
    /// Whether no store is damaged.
    pub fn is_clean(&self) -> bool {
        self.stores.iter().all(StoreReport::is_clean) && self.notes.iter().all(|n| !n.starts_with("damaged"))
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for s in &self.stores {
            let status = if s.is_clean() { "ok" } else { "DAMAGED" };
            write!(f, "{status:<8} {} ({}): ", s.dir.display(), s.kind)?;
            if s.records == 0 {
                write!(f, "empty")?;
            } else {
                write!(f, "{} records {}..{}", s.records, s.range.0, s.range.1)?;
            }
            write!(f, " in {} segment{}, {} KiB", s.segments, if s.segments == 1 { "" } else { "s" }, s.bytes / 1024)?;
            if s.acked > 0 {
                write!(f, ", acked through {}", s.acked)?;
            }
            match &s.snapshot {
                Some(Ok(c)) => write!(f, ", snapshot covers {c}")?,
                Some(Err(why)) => write!(f, ", snapshot UNREADABLE: {why}")?,
                None => {}
            }
            if let Some(pid) = s.in_use_by {
                write!(f, " (in use by pid {pid}: the newest records may be in flux)")?;
            }
            writeln!(f)?;
            if s.torn_bytes > 0 {
                writeln!(f, "         torn tail of {} bytes (a write interrupted by a crash) is cut when the store opens", s.torn_bytes)?;
            }
            for p in &s.leftovers {
                writeln!(f, "         leftover of an interrupted write: {} (removed when the store opens)", p.display())?;
            }
            for d in &s.damage {
                writeln!(f, "         {d}")?;
            }
            for a in &s.actions {
                writeln!(f, "         repair: {a}")?;
            }
        }
        for n in &self.notes {
            writeln!(f, "{n}")?;
        }
        let bad = self.stores.iter().filter(|s| !s.is_clean()).count();
        write!(f, "{} store{} checked, {} damaged", self.stores.len(), if self.stores.len() == 1 { "" } else { "s" }, bad)
    }
}

/// Checks every store under `dir` without changing anything.
pub fn check(dir: &Path) -> Result<Report> {
    walk(&*io::real(), dir, false)
}

/// Repairs every store under `dir` (see the module documentation); refuses stores in use.
pub fn repair(dir: &Path) -> Result<Report> {
    walk(&*io::real(), dir, true)
}

fn is_log_dir(fs: &dyn Fs, dir: &Path) -> bool {
    fs.list(dir).is_ok_and(|names| names.iter().any(|n| n.ends_with(recover::SEGMENT_SUFFIX) || n == recover::ACK_FILE))
}

fn walk(fs: &dyn Fs, root: &Path, fix: bool) -> Result<Report> {
    if !fs.is_dir(root) {
        return Err(Error::new(ErrorKind::NotFound, format!("{} is not a directory", root.display())));
    }
    let mut report = Report::default();
    if let Ok(Some(b)) = read_file(fs, &root.join("hub.json")) {
        if serde_json::from_slice::<serde_json::Value>(&b).is_err() {
            report.notes.push(format!("damaged: {} is not valid JSON", root.join("hub.json").display()));
        }
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut names = fs.list(&d).map_err(io::io_err("list", &d))?;
        names.sort();
        let is_state = names.iter().any(|n| n == "snapshot") || (names.iter().any(|n| n == "events") && is_log_dir(fs, &d.join("events")));
        if is_state {
            report.stores.push(store(fs, &d, true, fix)?);
            continue;
        }
        if is_log_dir(fs, &d) {
            report.stores.push(store(fs, &d, false, fix)?);
            continue;
        }
        for n in names.iter().rev() {
            let p = d.join(n);
            if n != QUARANTINE_DIR && fs.is_dir(&p) {
                stack.push(p);
            }
        }
    }
    report.stores.sort_by(|a, b| a.dir.cmp(&b.dir));
    if report.stores.is_empty() {
        report.notes.push(format!("no store found under {}", root.display()));
    }
    Ok(report)
}

fn store(fs: &dyn Fs, dir: &Path, state: bool, fix: bool) -> Result<StoreReport> {
    let log_dir = if state { dir.join("events") } else { dir.to_path_buf() };
    let snapshot = state.then(|| match read_file(fs, &dir.join("snapshot")) {
        Ok(None) => Ok(0),
        Ok(Some(b)) => format::decode_snapshot(&b).map(|(c, _)| c),
        Err(e) => Err(e.to_string()),
    });
    let floor = match &snapshot {
        Some(Ok(c)) => c + 1,
        _ => 0,
    };
    let max = crate::store::LogOptions::default().max_record_bytes;
    let mut in_use_by = None;
    let lock = match fs.lock(&log_dir) {
        Ok(g) => Some(g),
        Err(LockError::Held(pid)) => {
            in_use_by = pid.or(Some(0));
            None
        }
        Err(LockError::Io(e)) => return Err(io::io_err("lock", &log_dir)(e)),
    };
    if fix && lock.is_none() {
        return Err(Error::new(
            ErrorKind::Storage,
            format!("{} is in use by process {}; stop it before repairing", log_dir.display(), in_use_by.unwrap_or(0)),
        ));
    }
    let mut actions = Vec::new();
    let mut rec = recover::recover_dir(fs, &log_dir, max, floor, Mode::Check)?;
    if fix {
        if rec.damage.iter().any(|d| d.kind == DamageKind::Corrupt || d.file.parent() == Some(&log_dir)) {
            actions = recover::quarantine(fs, &log_dir, &rec, max)?;
        }
        // Cut torn tails, migrate old segments, write indexes: what opening does.
        let opened = recover::recover_dir(fs, &log_dir, max, floor, Mode::Open)?;
        if opened.cut_bytes > 0 {
            actions.push(format!("cut a torn tail of {} bytes", opened.cut_bytes));
        }
        drop(opened);
        rec = recover::recover_dir(fs, &log_dir, max, floor, Mode::Check)?;
    }
    drop(lock);
    let records = rec.segments.iter().map(|s| s.last_seq + 1 - s.first_seq).sum();
    let first = rec.segments.iter().find(|s| s.last_seq >= s.first_seq).map_or(0, |s| s.first_seq);
    let last = rec.segments.iter().rev().find(|s| s.last_seq >= s.first_seq).map_or(0, |s| s.last_seq);
    let bytes = rec.segments.iter().map(|s| s.file.len().unwrap_or(0)).sum();
    Ok(StoreReport {
        dir: dir.to_path_buf(),
        kind: if state { "state" } else { "log" },
        segments: rec.segments.len(),
        records,
        range: (first, last),
        bytes,
        acked: rec.acked,
        snapshot,
        torn_bytes: rec.cut_bytes,
        damage: rec.damage,
        leftovers: rec.leftovers,
        in_use_by,
        actions,
    })
}
