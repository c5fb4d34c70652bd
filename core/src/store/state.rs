//! Event-sourced state on a [`Log`], compacted by snapshot.
//!
//! Invariants: the in-memory state always equals snapshot + every event after it, applied in log
//! order; a snapshot is written atomically (temp file, fsync, rename, fsync dir) and only after
//! every event it covers is durable, and log segments are deleted (by acking them) only after the
//! snapshot that covers them is on disk.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::log::write_atomic;
use crate::error::{Error, ErrorKind, Result};
use crate::store::{Durability, Log, LogOptions};

const SNAPSHOT: &str = "snapshot";
const MAGIC: &[u8; 8] = b"HMSNAP01";

/// A deterministic state machine whose events are opaque bytes.
pub trait Machine: Send + 'static {
    /// Applies one event. Must be deterministic. An error here at replay is a corrupt store.
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
    opts: StateOptions,
    inner: Mutex<Inner<M>>,
    compacting: AtomicBool,
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

fn read_snapshot(dir: &Path) -> Result<Option<(u64, Vec<u8>)>> {
    let path = dir.join(SNAPSHOT);
    let b = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::storage(format!("read {}", path.display()), e)),
    };
    let corrupt = || Error::new(ErrorKind::Storage, format!("{}: snapshot is corrupt; restore it from a backup", path.display()));
    if b.len() < 28 || &b[0..8] != MAGIC {
        return Err(corrupt());
    }
    let covered = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")) as usize;
    let crc = u32::from_le_bytes(b[24..28].try_into().expect("4 bytes"));
    let body = b.get(28..28 + len).ok_or_else(corrupt)?;
    if b.len() != 28 + len || crc32c::crc32c(body) != crc {
        return Err(corrupt());
    }
    Ok(Some((covered, body.to_vec())))
}

fn write_snapshot(dir: &Path, covered: u64, body: &[u8]) -> Result<()> {
    let mut b = Vec::with_capacity(28 + body.len());
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&covered.to_le_bytes());
    b.extend_from_slice(&(body.len() as u64).to_le_bytes());
    b.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    b.extend_from_slice(body);
    write_atomic(dir, SNAPSHOT, &b)
}

impl<M: Machine> StateLog<M> {
    /// Opens `dir` (snapshot + event log), replaying events after the snapshot.
    pub fn open(dir: &Path, opts: StateOptions) -> Result<StateLog<M>> {
        std::fs::create_dir_all(dir).map_err(|e| Error::storage(format!("create {}", dir.display()), e))?;
        let snap = read_snapshot(dir)?;
        let log = Log::open(
            &dir.join("events"),
            LogOptions { durability: opts.durability, segment_bytes: 1024 * 1024, ..LogOptions::default() },
        )?;
        let covered = snap.as_ref().map_or(0, |s| s.0);
        if log.acked() > covered {
            return Err(Error::new(
                ErrorKind::Storage,
                format!("{}: events up to {} were compacted but the snapshot covers only {covered}", dir.display(), log.acked()),
            ));
        }
        let mut state = M::restore(snap.as_ref().map(|s| s.1.as_slice()))?;
        let mut from = covered + 1;
        let mut bytes = 0u64;
        loop {
            let batch = log.read(from, 4096, 8 * 1024 * 1024)?;
            let Some(last) = batch.last().map(|r| r.seq) else { break };
            for r in &batch {
                state.apply(&r.payload)?;
                bytes += r.payload.len() as u64;
            }
            from = last + 1;
        }
        if from <= log.last_seq() {
            return Err(Error::new(ErrorKind::Storage, format!("{}: event {from} is missing", dir.display())));
        }
        Ok(StateLog {
            sh: Arc::new(Shared {
                dir: dir.to_path_buf(),
                log,
                opts,
                inner: Mutex::new(Inner { state, bytes_since_snapshot: bytes }),
                compacting: AtomicBool::new(false),
            }),
        })
    }

    /// Runs `f` on the current state under the lock.
    pub fn read<R>(&self, f: impl FnOnce(&M) -> R) -> R {
        f(&self.sh.inner.lock().state)
    }

    /// Atomically: lets `decide` inspect the state and produce an event (or an error, in which
    /// case nothing happens), appends the event, applies it. Returns `decide`'s extra output and
    /// the event's sequence number; durability is awaited with [`StateLog::wait_durable`].
    pub fn commit_with<R>(&self, decide: impl FnOnce(&M) -> Result<(Vec<u8>, R)>) -> Result<(R, u64)> {
        let mut inner = self.sh.inner.lock();
        let (event, out) = decide(&inner.state)?;
        let seq = self.sh.log.append(&event)?;
        if let Err(e) = inner.state.apply(&event) {
            // The event is in the log but the machine refused it: a bug in the caller's decide.
            return Err(Error::new(ErrorKind::Internal, format!("state machine refused its own event: {e}")));
        }
        inner.bytes_since_snapshot += event.len() as u64;
        if inner.bytes_since_snapshot >= self.sh.opts.compact_after_bytes && !self.sh.compacting.swap(true, Ordering::SeqCst) {
            inner.bytes_since_snapshot = 0;
            let body = inner.state.snapshot();
            drop(inner);
            let sh = self.sh.clone();
            std::thread::spawn(move || {
                if let Err(e) = finish_compaction(&sh, seq, &body) {
                    tracing::warn!(error = %e, dir = %sh.dir.display(), "snapshot compaction failed; will retry later");
                }
                sh.compacting.store(false, Ordering::SeqCst);
            });
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

    /// Writes a snapshot now and deletes the log segments it covers.
    pub fn compact(&self) -> Result<()> {
        let (seq, body) = {
            let inner = self.sh.inner.lock();
            (self.sh.log.last_seq(), inner.state.snapshot())
        };
        finish_compaction(&self.sh, seq, &body)?;
        self.sh.inner.lock().bytes_since_snapshot = 0;
        Ok(())
    }

    /// Flushes and closes the underlying log.
    pub fn close(&self) -> Result<()> {
        self.sh.log.close()
    }
}

fn finish_compaction<M>(sh: &Shared<M>, covered: u64, body: &[u8]) -> Result<()> {
    if covered > 0 {
        sh.log.wait_durable_blocking(covered)?;
    }
    write_snapshot(&sh.dir, covered, body)?;
    sh.log.ack_through(covered)
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

    #[test]
    fn automatic_compaction_removes_segments_and_keeps_state() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StateOptions { durability: Durability::Never, compact_after_bytes: 64 * 1024 };
        let s = StateLog::<Sum>::open(dir.path(), opts.clone()).unwrap();
        let payload = "1";
        for _ in 0..300_000 {
            s.commit(payload.as_bytes()).unwrap();
        }
        // Let a background compaction finish.
        for _ in 0..200 {
            if !s.sh.compacting.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
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
