//! Event-sourced state on a [`Log`], compacted by snapshot off the commit path.
//!
//! Invariants:
//! - the in-memory state always equals snapshot + every event after it, applied in log order:
//!   an event is applied before it is appended, under the log's lock, so an event the machine
//!   refuses is never appended and an append that cannot happen leaves the state untouched;
//! - a snapshot covers only events an fdatasync confirmed, is written atomically (temp file,
//!   fsync, rename, fsync dir) with a checksum over `covered_seq` and the body, and log segments
//!   are acked (and so deleted) only after the snapshot that covers them is on disk;
//! - one compaction runs at a time, and a snapshot never replaces a newer one;
//! - compaction never touches the live state or its lock: it rebuilds the state up to the
//!   covered event from the previous snapshot and the log, so commits run at full speed while a
//!   snapshot is being written;
//! - a damaged event log, or one missing events after the snapshot, fails the open with an error
//!   that says what to do; the state is never rebuilt from less than what was committed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::format;
use super::io::{create_dir_durable, io_err, read_file, write_atomic};
use super::log::Env;
use super::recover::DamageKind;
use crate::error::{Error, ErrorKind, Result};
use crate::store::{Durability, Log, LogOptions};

const SNAPSHOT: &str = "snapshot";

/// A deterministic state machine whose events are opaque bytes.
pub trait Machine: Send + 'static {
    /// Applies one event. Must be deterministic, and must leave the state unchanged when it
    /// returns an error (the event is then not committed).
    fn apply(&mut self, event: &[u8]) -> Result<()>;
    /// Serializes the whole state.
    fn snapshot(&self) -> Vec<u8>;
    /// Rebuilds the state from a snapshot (`None` = empty state).
    fn restore(snapshot: Option<&[u8]>) -> Result<Self>
    where
        Self: Sized;
}

/// Options for [`StateLog::open`].
#[derive(Debug, Clone)]
pub struct StateOptions {
    /// Durability of event appends. Default [`Durability::Always`].
    pub durability: Durability,
    /// Take a snapshot once this many event bytes accumulated since the last one. Default 4 MiB.
    pub compact_after_bytes: u64,
}

impl Default for StateOptions {
    fn default() -> Self {
        StateOptions { durability: Durability::Always, compact_after_bytes: 4 * 1024 * 1024 }
    }
}

struct Inner<M> {
    state: M,
    bytes_since_snapshot: u64,
}

struct Shared<M> {
    dir: PathBuf,
    log: Log,
    env: Env,
    opts: StateOptions,
    inner: Mutex<Inner<M>>,
    /// One compaction at a time (background or [`StateLog::compact`]).
    compaction: Mutex<()>,
    compaction_queued: AtomicBool,
    /// Events covered by the snapshot on disk.
    covered: AtomicU64,
}

/// Event-sourced state. Cheap to clone (shared).
pub struct StateLog<M: Machine> {
    sh: Arc<Shared<M>>,
}

impl<M: Machine> Clone for StateLog<M> {
    fn clone(&self) -> Self {
        StateLog { sh: self.sh.clone() }
    }
}

fn corrupt(dir: &Path, what: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Storage,
        format!(
            "{}: {what}; the state cannot be rebuilt from what is stored. Run `hubmsg store check {}` to see the damage; `hubmsg store repair {}` moves damaged data aside (what it held is then lost)",
            dir.display(),
            dir.display(),
            dir.display()
        ),
    )
}

fn read_snapshot(env: &Env, dir: &Path) -> Result<Option<(u64, Vec<u8>)>> {
    let path = dir.join(SNAPSHOT);
    let Some(b) = read_file(&*env.fs, &path).map_err(io_err("read", &path))? else { return Ok(None) };
    let (covered, body) = format::decode_snapshot(&b).map_err(|why| corrupt(dir, format!("the snapshot is unreadable: {why}")))?;
    Ok(Some((covered, body.to_vec())))
}

/// Replays the events after `from - 1` through `to` onto `m`; returns their bytes.
fn replay<M: Machine>(dir: &Path, log: &Log, m: &mut M, from: u64, to: u64) -> Result<u64> {
    let mut next = from;
    let mut bytes = 0;
    while next <= to {
        let batch = log.read(next, 4096, 8 * 1024 * 1024)?;
        let Some(last) = batch.last().map(|r| r.seq) else { break };
        for r in batch.iter().take_while(|r| r.seq <= to) {
            m.apply(&r.payload).map_err(|e| corrupt(dir, format!("event {} does not apply ({e})", r.seq)))?;
            bytes += r.payload.len() as u64;
        }
        next = last + 1;
    }
    Ok(bytes)
}

impl<M: Machine> StateLog<M> {
    /// Opens `dir` (snapshot + event log), replaying events after the snapshot.
    pub fn open(dir: &Path, opts: StateOptions) -> Result<StateLog<M>> {
        StateLog::open_with(dir, opts, Env::real())
    }

    pub(crate) fn open_with(dir: &Path, opts: StateOptions, env: Env) -> Result<StateLog<M>> {
        create_dir_durable(&*env.fs, dir)?;
        let snap = read_snapshot(&env, dir)?;
        let covered = snap.as_ref().map_or(0, |s| s.0);
        let log = Log::open_with(
            &dir.join("events"),
            LogOptions { durability: opts.durability, segment_bytes: 1024 * 1024, min_next_seq: covered + 1, ..LogOptions::default() },
            env.clone(),
        )?;
        if let Some(d) = log.damage().into_iter().find(|d| d.kind == DamageKind::Corrupt || d.last_seq > covered) {
            return Err(corrupt(dir, d));
        }
        if log.acked() > covered {
            return Err(corrupt(dir, format!("events up to {} were compacted but the snapshot covers only {covered}", log.acked())));
        }
        let mut state =
            M::restore(snap.as_ref().map(|s| s.1.as_slice())).map_err(|e| corrupt(dir, format!("the snapshot does not restore ({e})")))?;
        let bytes = replay(dir, &log, &mut state, covered + 1, log.last_seq())?;
        Ok(StateLog {
            sh: Arc::new(Shared {
                dir: dir.to_path_buf(),
                log,
                env,
                opts,
                inner: Mutex::new(Inner { state, bytes_since_snapshot: bytes }),
                compaction: Mutex::new(()),
                compaction_queued: AtomicBool::new(false),
                covered: AtomicU64::new(covered),
            }),
        })
    }

    /// Runs `f` on the current state under the lock.
    pub fn read<R>(&self, f: impl FnOnce(&M) -> R) -> R {
        f(&self.sh.inner.lock().state)
    }

    /// Atomically: lets `decide` inspect the state and produce an event (or an error, in which
    /// case nothing happens), applies it, appends it. Returns `decide`'s extra output and the
    /// event's sequence number; durability is awaited with [`StateLog::wait_durable`]. If the
    /// machine refuses the event or the log cannot take it, nothing changes.
    pub fn commit_with<R>(&self, decide: impl FnOnce(&M) -> Result<(Vec<u8>, R)>) -> Result<(R, u64)> {
        let mut inner = self.sh.inner.lock();
        let (event, out) = decide(&inner.state)?;
        let state = &mut inner.state;
        let (seq, ()) = self.sh.log.append_with(&event, || state.apply(&event))?;
        inner.bytes_since_snapshot += event.len() as u64;
        let compact =
            inner.bytes_since_snapshot >= self.sh.opts.compact_after_bytes && !self.sh.compaction_queued.swap(true, Ordering::SeqCst);
        if compact {
            inner.bytes_since_snapshot = 0;
        }
        drop(inner);
        if compact {
            let sh = self.sh.clone();
            self.sh.env.exec.spawn(Box::new(move || {
                if let Err(e) = compact_through(&sh, None) {
                    tracing::warn!(error = %e, dir = %sh.dir.display(), "snapshot compaction failed; will retry later");
                    sh.inner.lock().bytes_since_snapshot = sh.opts.compact_after_bytes / 2;
                }
                sh.compaction_queued.store(false, Ordering::SeqCst);
            }));
        }
        Ok((out, seq))
    }

    /// Appends and applies one event (no inspection).
    pub fn commit(&self, event: &[u8]) -> Result<u64> {
        self.commit_with(|_| Ok((event.to_vec(), ()))).map(|((), s)| s)
    }

    /// Waits until the event with this sequence number is durable.
    pub async fn wait_durable(&self, seq: u64) -> Result<()> {
        self.sh.log.wait_durable(seq).await
    }

    /// Blocking form of [`StateLog::wait_durable`].
    pub fn wait_durable_blocking(&self, seq: u64) -> Result<()> {
        self.sh.log.wait_durable_blocking(seq)
    }

    /// Writes a snapshot of everything committed so far and deletes the log segments it covers
    /// (blocking: fsyncs the log first, in any durability mode).
    pub fn compact(&self) -> Result<()> {
        self.sh.log.sync()?;
        let through = self.sh.log.synced();
        compact_through(&self.sh, Some(through))
    }

    /// Flushes and closes the underlying log (after a compaction in progress finishes).
    pub fn close(&self) -> Result<()> {
        let _g = self.sh.compaction.lock();
        self.sh.log.close()
    }

    /// The underlying event log (for its counters and watches).
    pub fn log(&self) -> &Log {
        &self.sh.log
    }
}

/// Snapshots the state as of event `through` (default: what the log has fsync'd) without
/// touching the live state: previous snapshot + events up to `through`, replayed into a fresh
/// machine. Then acks the log through it.
fn compact_through<M: Machine>(sh: &Shared<M>, through: Option<u64>) -> Result<()> {
    let _g = sh.compaction.lock();
    let target = through.unwrap_or_else(|| sh.log.synced()).min(sh.log.synced());
    let covered = sh.covered.load(Ordering::SeqCst);
    if target <= covered {
        return Ok(());
    }
    let prev = read_snapshot(&sh.env, &sh.dir)?;
    let from = prev.as_ref().map_or(0, |p| p.0);
    if from != covered {
        return Err(corrupt(&sh.dir, format!("the snapshot on disk covers {from}, expected {covered}")));
    }
    let mut m = M::restore(prev.as_ref().map(|p| p.1.as_slice()))?;
    drop(prev);
    replay(&sh.dir, &sh.log, &mut m, covered + 1, target)?;
    let body = m.snapshot();
    drop(m);
    let path = sh.dir.join(SNAPSHOT);
    write_atomic(&*sh.env.fs, &path, &format::encode_snapshot(target, &body), false)?;
    sh.covered.store(target, Ordering::SeqCst);
    sh.log.ack_through(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, PartialEq, Debug)]
    struct Sum(u64, u64);

    impl Machine for Sum {
        fn apply(&mut self, event: &[u8]) -> Result<()> {
            let v: u64 = std::str::from_utf8(event).unwrap().parse().map_err(|_| Error::new(ErrorKind::Storage, "bad"))?;
            self.0 += v;
            self.1 += 1;
            Ok(())
        }
        fn snapshot(&self) -> Vec<u8> {
            format!("{} {}", self.0, self.1).into_bytes()
        }
        fn restore(s: Option<&[u8]>) -> Result<Self> {
            Ok(match s {
                None => Sum::default(),
                Some(b) => {
                    let t = std::str::from_utf8(b).unwrap();
                    let (a, b) = t.split_once(' ').unwrap();
                    Sum(a.parse().unwrap(), b.parse().unwrap())
                }
            })
        }
    }

    #[test]
    fn replays_compacts_and_detects_a_corrupt_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StateOptions { durability: Durability::Always, compact_after_bytes: u64::MAX };
        {
            let s = StateLog::<Sum>::open(dir.path(), opts.clone()).unwrap();
            for i in 1..=100u64 {
                let seq = s.commit(i.to_string().as_bytes()).unwrap();
                s.wait_durable_blocking(seq).unwrap();
            }
            assert!(s.commit_with(|_| Err::<(Vec<u8>, ()), _>(Error::invalid("no"))).is_err());
            s.close().unwrap();
        }
        let s = StateLog::<Sum>::open(dir.path(), opts.clone()).unwrap();
        assert_eq!(s.read(|m| (m.0, m.1)), (5050, 100));
        s.compact().unwrap();
        let seq = s.commit(b"7").unwrap();
        s.wait_durable_blocking(seq).unwrap();
        s.close().unwrap();
        drop(s);
        let s = StateLog::<Sum>::open(dir.path(), opts.clone()).unwrap();
        assert_eq!(s.read(|m| (m.0, m.1)), (5057, 101));
        s.close().unwrap();
        drop(s);
        let p = dir.path().join(SNAPSHOT);
        let mut b = std::fs::read(&p).unwrap();
        let n = b.len();
        b[n - 1] ^= 0xff;
        std::fs::write(&p, b).unwrap();
        let e = StateLog::<Sum>::open(dir.path(), opts).err().expect("corrupt snapshot is an error");
        assert_eq!(e.kind(), ErrorKind::Storage);
    }

    /// A machine whose snapshot blocks while `GATE` is closed, to hold a compaction in the middle.
    #[derive(Default)]
    struct Slow(u64);
    static GATE: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    static GATE_CV: std::sync::Condvar = std::sync::Condvar::new();
    static IN_SNAPSHOT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    impl Machine for Slow {
        fn apply(&mut self, _event: &[u8]) -> Result<()> {
            self.0 += 1;
            Ok(())
        }
        fn snapshot(&self) -> Vec<u8> {
            IN_SNAPSHOT.store(true, Ordering::SeqCst);
            let mut open = GATE.lock().unwrap();
            while !*open {
                open = GATE_CV.wait(open).unwrap();
            }
            self.0.to_string().into_bytes()
        }
        fn restore(s: Option<&[u8]>) -> Result<Self> {
            Ok(Slow(s.map_or(0, |b| std::str::from_utf8(b).unwrap().parse().unwrap())))
        }
    }

    #[test]
    fn commits_go_on_while_a_snapshot_is_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateLog::<Slow>::open(dir.path(), StateOptions { durability: Durability::Always, compact_after_bytes: 1000 }).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = s.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !IN_SNAPSHOT.load(Ordering::SeqCst) && n < 100_000 {
                let seq = s2.commit(&[b'e'; 100]).unwrap();
                s2.wait_durable_blocking(seq).unwrap();
                n += 1;
            }
            // A compaction is now stuck inside snapshot(): commits must not wait for it.
            for _ in 0..200 {
                let seq = s2.commit(&[b'f'; 100]).unwrap();
                s2.wait_durable_blocking(seq).unwrap();
            }
            let _ = tx.send((n, s2.read(|m| m.0)));
        });
        // Not a speed limit: only a commit blocked behind the snapshot never gets here.
        let got = rx.recv_timeout(std::time::Duration::from_secs(60));
        *GATE.lock().unwrap() = true;
        GATE_CV.notify_all();
        let (n, state) = got.expect("commits blocked behind a snapshot being written");
        assert!(IN_SNAPSHOT.load(Ordering::SeqCst) && n < 100_000, "a compaction started");
        assert_eq!(state, n + 200);
        s.compact().unwrap();
        s.close().unwrap();
    }

    #[test]
    fn automatic_compaction_removes_segments_and_keeps_state() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StateOptions { durability: Durability::Never, compact_after_bytes: 64 * 1024 };
        let s = StateLog::<Sum>::open(dir.path(), opts.clone()).unwrap();
        let payload = "1";
        for _ in 0..300_000 {
            s.commit(payload.as_bytes()).unwrap();
        }
        s.compact().unwrap();
        s.close().unwrap();
        let segs = std::fs::read_dir(dir.path().join("events"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".seg"))
            .count();
        assert!(segs <= 2, "compaction removed old segments ({segs} left)");
        drop(s);
        let s = StateLog::<Sum>::open(dir.path(), opts).unwrap();
        assert_eq!(s.read(|m| (m.0, m.1)), (300_000, 300_000));
    }
}
