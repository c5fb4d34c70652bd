//! The one seam every store file operation goes through ([`Fs`], [`FileIo`]), its real backend
//! ([`RealFs`]), and the helpers built only on the seam: durable directory creation, atomic file
//! replacement, the directory lock. Tests put a simulated machine behind the same traits that can
//! lose power at any point (`store/sim.rs`).
//!
//! Invariants: nothing in `store/` touches `std::fs` except [`RealFs`]; a directory created by
//! [`create_dir_durable`] survives power loss once it returns; [`write_atomic`] leaves either the
//! old or the new content, never a mix, even across power loss.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};

/// An open file of the store. All I/O is positioned (no shared cursor), so concurrent readers
/// and one writer need no coordination beyond the log's own bookkeeping.
pub(crate) trait FileIo: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `off`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Writes all of `buf` at `off` (on an error, a prefix may have been written).
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// The file's size.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// fdatasync: makes the data (and the size) durable.
    fn sync_data(&self) -> io::Result<()>;
}

/// The file system operations of the store.
pub(crate) trait Fs: Send + Sync + 'static {
    /// Creates one directory (its parent exists). `AlreadyExists` if it does.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Whether `path` is an existing directory.
    fn is_dir(&self, path: &Path) -> bool;
    /// Names of the entries of a directory.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens a file for reading and writing, creating it (empty, with `mode`) if `create`.
    fn open(&self, path: &Path, create: bool, mode: u32) -> io::Result<Arc<dyn FileIo>>;
    /// Renames within one directory, replacing the target.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// fsyncs a directory, making its entries durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Bytes available to unprivileged writers on the file system holding `path`.
    fn free_bytes(&self, path: &Path) -> io::Result<u64>;
    /// Takes the exclusive lock of `dir` (the file `dir/lock`), recording this process's id in
    /// it. `Err(Some(pid))` names the holder when another opener has it.
    fn lock(&self, dir: &Path) -> std::result::Result<Box<dyn std::any::Any + Send + Sync>, LockError>;
    /// The process id recorded in a lock file, if readable.
    fn lock_holder(&self, dir: &Path) -> Option<u32> {
        let f = self.open(&dir.join(LOCK_FILE), false, 0o644).ok()?;
        let n = f.len().ok()? as usize;
        let mut b = vec![0; n.min(32)];
        f.read_at(&mut b, 0).ok()?;
        String::from_utf8_lossy(&b).trim().parse().ok()
    }
}

/// Why a directory lock was not taken.
#[derive(Debug)]
pub(crate) enum LockError {
    /// Another opener holds it (its pid, if recorded).
    Held(Option<u32>),
    /// The lock file could not be opened or locked.
    Io(io::Error),
}

/// The lock file every store directory and the hub's data directory carry.
pub(crate) const LOCK_FILE: &str = "lock";

/// Reads a whole file; `Ok(None)` if it does not exist.
pub(crate) fn read_file(fs: &dyn Fs, path: &Path) -> io::Result<Option<Vec<u8>>> {
    let f = match fs.open(path, false, 0o644) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut b = vec![0; f.len()? as usize];
    f.read_at(&mut b, 0)?;
    Ok(Some(b))
}

/// A `Storage` error for a failed operation on `path`.
pub(crate) fn io_err<'a>(what: &'a str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |e| {
        let hint = if e.raw_os_error() == Some(libc::ENOSPC) { " (the disk is full; free space and it continues)" } else { "" };
        Error::storage(format!("{what} {}{hint}", path.display()), e)
    }
}

/// Creates `dir` and any missing parents so that they survive power loss: each new directory's
/// parent is fsync'd after it is created.
pub(crate) fn create_dir_durable(fs: &dyn Fs, dir: &Path) -> Result<()> {
    if fs.is_dir(dir) {
        return Ok(());
    }
    let mut missing = Vec::new();
    let mut p = Some(dir);
    while let Some(d) = p {
        if d.as_os_str().is_empty() || fs.is_dir(d) {
            break;
        }
        missing.push(d.to_path_buf());
        p = d.parent();
    }
    for d in missing.iter().rev() {
        match fs.create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("create directory", d)(e)),
        }
        if let Some(parent) = d.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs.sync_dir(parent).map_err(io_err("fsync directory", parent))?;
        }
    }
    Ok(())
}

/// Replaces `path` with `data` atomically and durably: a temp file beside it, fsync, rename,
/// fsync the directory. `private` creates it readable by the owner only (keys).
pub(crate) fn write_atomic(fs: &dyn Fs, path: &Path, data: &[u8], private: bool) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs.remove(&tmp); // a leftover would keep its old permissions
    let f = fs.open(&tmp, true, if private { 0o600 } else { 0o644 }).map_err(io_err("create", &tmp))?;
    f.set_len(0).map_err(io_err("truncate", &tmp))?;
    f.write_at(data, 0).map_err(io_err("write", &tmp))?;
    f.sync_data().map_err(io_err("fsync", &tmp))?;
    drop(f);
    fs.rename(&tmp, path).map_err(io_err("rename", &tmp))?;
    fs.sync_dir(dir).map_err(io_err("fsync directory", dir))
}

/// Takes the lock of a store directory, with an error that names the holder.
pub(crate) fn lock_dir(fs: &dyn Fs, dir: &Path, what: &str) -> Result<Box<dyn std::any::Any + Send + Sync>> {
    fs.lock(dir).map_err(|e| match e {
        LockError::Held(pid) => {
            let who = match pid {
                Some(p) if p == std::process::id() => format!("this process (pid {p}) has it open already"),
                Some(p) => format!("process {p} has it open"),
                None => "another process has it open".to_string(),
            };
            Error::new(
                ErrorKind::Storage,
                format!(
                    "{what} {} is in use: {who}; stop that process or use another directory (two writers would lose data)",
                    dir.display()
                ),
            )
        }
        LockError::Io(e) => io_err("lock", dir)(e),
    })
}

/// The real file system.
pub(crate) struct RealFs;

struct RealFile(std::fs::File);

impl FileIo for RealFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, buf, off)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}

struct RealLock(#[allow(dead_code)] std::fs::File);

impl Fs for RealFs {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir(path)
    }
    fn is_dir(&self, path: &Path) -> bool {
        path.is_dir()
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        std::fs::read_dir(dir)?.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned())).collect()
    }
    fn open(&self, path: &Path, create: bool, mode: u32) -> io::Result<Arc<dyn FileIo>> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).create(create).mode(mode).open(path)?;
        Ok(Arc::new(RealFile(f)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }
    fn free_bytes(&self, path: &Path) -> io::Result<u64> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid NUL-terminated path and `s` a writable statvfs.
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(s.f_bavail as u64 * s.f_frsize as u64)
    }
    fn lock(&self, dir: &Path) -> std::result::Result<Box<dyn std::any::Any + Send + Sync>, LockError> {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let path = dir.join(LOCK_FILE);
        let mut f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(LockError::Io)?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                LockError::Held(self.lock_holder(dir))
            } else {
                LockError::Io(e)
            });
        }
        f.set_len(0).map_err(LockError::Io)?;
        write!(f, "{}", std::process::id()).map_err(LockError::Io)?;
        Ok(Box::new(RealLock(f)))
    }
}

/// The real file system as a shared handle — behind a [`Throttled`] disk when the developer
/// variable [`SLOW_DISK_VAR`] is set (read once per process; docs/storage.md, "A slow disk").
pub(crate) fn real() -> Arc<dyn Fs> {
    static SLOW: std::sync::OnceLock<Option<Arc<Throttle>>> = std::sync::OnceLock::new();
    let slow = SLOW.get_or_init(|| {
        let v = std::env::var(SLOW_DISK_VAR).ok().filter(|v| !v.trim().is_empty())?;
        match Throttle::parse(&v) {
            Ok(t) => {
                tracing::warn!("the store's disk is slowed down on purpose ({SLOW_DISK_VAR}={v}); unset it outside load tests");
                Some(Arc::new(t))
            }
            Err(e) => {
                // A developer's typo must not take a hub or a device down: the disk stays fast,
                // and the log says why (a load test that needs the slow disk checks it is slow).
                tracing::error!("{SLOW_DISK_VAR}={v:?} is ignored: {e}");
                None
            }
        }
    });
    match slow {
        Some(t) => Arc::new(Throttled::new(Arc::new(RealFs), t.clone())),
        None => Arc::new(RealFs),
    }
}

/// The environment variable that slows the real disk down for load tests and developers
/// (not a user setting): `write_ms=N,sync_ms=N,mib_per_s=N,only=EXT`, every part optional.
pub(crate) const SLOW_DISK_VAR: &str = "HUBMSG_DEV_SLOW_DISK";

/// A slow disk: the delays a [`Throttled`] file system adds, and a gate that can hold writes.
///
/// The disk is one queue, as a real device is: each `write_at` costs `write_delay` plus its
/// length at `bytes_per_sec`, each `sync_data` costs `sync_delay`, and an operation waits for
/// the ones before it to finish (whatever thread issues it), so more threads do not make the
/// disk faster. Reads and directory operations are not slowed.
#[derive(Default)]
pub(crate) struct Throttle {
    /// Added to every write.
    pub write_delay: std::time::Duration,
    /// Write bandwidth (0: unlimited).
    pub bytes_per_sec: u64,
    /// Added to every fdatasync.
    pub sync_delay: std::time::Duration,
    /// Only files with this extension are slowed and gated (`None`: every file).
    pub only_ext: Option<String>,
    /// When the disk's queue is next free.
    busy_until: parking_lot::Mutex<Option<std::time::Instant>>,
    gate: parking_lot::Mutex<GateState>,
    cv: parking_lot::Condvar,
    stats: ThrottleStats,
}

/// What the gate of a [`Throttle`] has seen.
#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct GateState {
    /// Writes are held at the gate.
    pub hold: bool,
    /// Writes waiting at the gate now.
    pub held: usize,
    /// Writes completed.
    pub writes: usize,
}

/// Time a [`Throttle`] made operations wait, for load tests to show the disk was the bottleneck.
#[derive(Default)]
struct ThrottleStats {
    waited_us: std::sync::atomic::AtomicU64,
    syncs: std::sync::atomic::AtomicU64,
}

impl Throttle {
    /// Parses the value of [`SLOW_DISK_VAR`].
    pub(crate) fn parse(v: &str) -> std::result::Result<Throttle, String> {
        let mut t = Throttle::default();
        for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, val) =
                part.split_once('=').ok_or_else(|| format!("`{part}` is not key=value (keys: write_ms, sync_ms, mib_per_s, only)"))?;
            let num = || val.trim().parse::<u64>().map_err(|_| format!("`{part}`: {val:?} is not a whole number"));
            match k.trim() {
                "write_ms" => t.write_delay = std::time::Duration::from_millis(num()?),
                "sync_ms" => t.sync_delay = std::time::Duration::from_millis(num()?),
                "mib_per_s" => t.bytes_per_sec = num()? << 20,
                "only" => t.only_ext = Some(val.trim().trim_start_matches('.').to_string()),
                other => return Err(format!("unknown key `{other}` (keys: write_ms, sync_ms, mib_per_s, only)")),
            }
        }
        Ok(t)
    }

    fn applies_to(&self, path: &Path) -> bool {
        self.only_ext.as_deref().is_none_or(|want| path.extension().is_some_and(|e| e == want))
    }

    /// Waits for the disk's queue to serve an operation that costs `cost`.
    fn occupy(&self, cost: std::time::Duration) {
        if cost.is_zero() {
            return;
        }
        let now = std::time::Instant::now();
        let done = {
            let mut b = self.busy_until.lock();
            let done = b.filter(|&t| t > now).unwrap_or(now) + cost;
            *b = Some(done);
            done
        };
        std::thread::sleep(done.saturating_duration_since(now));
        self.stats.waited_us.fetch_add(done.saturating_duration_since(now).as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    fn write_cost(&self, len: usize) -> std::time::Duration {
        let bw = if self.bytes_per_sec == 0 { 0.0 } else { len as f64 / self.bytes_per_sec as f64 };
        self.write_delay + std::time::Duration::from_secs_f64(bw)
    }

    /// Holds (or releases) every write at the gate before it reaches the disk.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn set_hold(&self, hold: bool) {
        self.gate.lock().hold = hold;
        self.cv.notify_all();
    }

    /// Waits (10 s at most, then panics naming `what`) until the gate's state satisfies `until`.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn wait(&self, what: &str, mut until: impl FnMut(&GateState) -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut st = self.gate.lock();
        while !until(&st) {
            assert!(!self.cv.wait_until(&mut st, deadline).timed_out(), "timed out waiting for {what}");
        }
    }

    /// Total time operations waited for the slow disk, and fdatasyncs slowed.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn waited(&self) -> (std::time::Duration, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (std::time::Duration::from_micros(self.stats.waited_us.load(Relaxed)), self.stats.syncs.load(Relaxed))
    }

    fn pass_gate(&self) {
        let mut st = self.gate.lock();
        if st.hold {
            st.held += 1;
            self.cv.notify_all();
            while st.hold {
                self.cv.wait(&mut st);
            }
            st.held -= 1;
        }
    }

    fn wrote(&self) {
        self.gate.lock().writes += 1;
        self.cv.notify_all();
    }
}

/// A file system whose matching files sit on a slow disk ([`Throttle`]).
pub(crate) struct Throttled {
    inner: Arc<dyn Fs>,
    t: Arc<Throttle>,
}

impl Throttled {
    /// `inner` slowed down as `t` says.
    pub(crate) fn new(inner: Arc<dyn Fs>, t: Arc<Throttle>) -> Throttled {
        Throttled { inner, t }
    }
}

struct ThrottledFile(Arc<dyn FileIo>, Arc<Throttle>);

impl FileIo for ThrottledFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.0.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.1.pass_gate();
        self.1.occupy(self.1.write_cost(buf.len()));
        let r = self.0.write_at(buf, off);
        self.1.wrote();
        r
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.1.occupy(self.1.sync_delay);
        self.1.stats.syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.sync_data()
    }
}

impl Fs for Throttled {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.inner.create_dir(path)
    }
    fn is_dir(&self, path: &Path) -> bool {
        self.inner.is_dir(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn open(&self, path: &Path, create: bool, mode: u32) -> io::Result<Arc<dyn FileIo>> {
        let f = self.inner.open(path, create, mode)?;
        Ok(if self.t.applies_to(path) { Arc::new(ThrottledFile(f, self.t.clone())) } else { f })
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.inner.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.inner.sync_dir(dir)
    }
    fn free_bytes(&self, path: &Path) -> io::Result<u64> {
        self.inner.free_bytes(path)
    }
    fn lock(&self, dir: &Path) -> std::result::Result<Box<dyn std::any::Any + Send + Sync>, LockError> {
        self.inner.lock(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_durable_dirs_and_locks_on_the_real_file_system() {
        let t = tempfile::tempdir().unwrap();
        let fs = RealFs;
        let d = t.path().join("a/b/c");
        create_dir_durable(&fs, &d).unwrap();
        assert!(d.is_dir());
        write_atomic(&fs, &d.join("f"), b"one", false).unwrap();
        write_atomic(&fs, &d.join("f"), b"two", true).unwrap();
        assert_eq!(std::fs::read(d.join("f")).unwrap(), b"two");
        assert!(!d.join("f.tmp").exists());
        let held = lock_dir(&fs, &d, "store").unwrap();
        let e = lock_dir(&fs, &d, "store").err().unwrap();
        assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
        drop(held);
        lock_dir(&fs, &d, "store").unwrap();
        assert!(fs.free_bytes(&d).unwrap() > 0);
    }

    #[test]
    fn a_slow_disk_parses_from_its_variable_and_makes_writes_and_syncs_queue() {
        let t = Throttle::parse("write_ms=1, sync_ms=20,mib_per_s=1,only=.seg").unwrap();
        assert_eq!((t.write_delay.as_millis(), t.sync_delay.as_millis(), t.bytes_per_sec), (1, 20, 1 << 20));
        assert_eq!(t.only_ext.as_deref(), Some("seg"));
        for bad in ["write_ms", "write_ms=fast", "speed=1"] {
            let e = Throttle::parse(bad).err().unwrap();
            assert!(e.contains("write_ms"), "{bad}: {e}");
        }
        assert!(Throttle::parse("").unwrap().write_delay.is_zero());

        let dir = tempfile::tempdir().unwrap();
        let t = Arc::new(t);
        let fs = Throttled::new(real(), t.clone());
        let other = fs.open(&dir.path().join("x.idx"), true, 0o644).unwrap();
        let seg = fs.open(&dir.path().join("x.seg"), true, 0o644).unwrap();
        let started = std::time::Instant::now();
        other.write_at(&[1; 4096], 0).unwrap();
        other.sync_data().unwrap();
        assert_eq!(t.waited(), (std::time::Duration::ZERO, 0), "files of other kinds are not slowed");
        // Two writers of 128 KiB at 1 MiB/s and a sync share one queue: at least 1 ms + 125 ms
        // each, then 20 ms.
        std::thread::scope(|s| {
            for i in 0..2u64 {
                let seg = seg.clone();
                s.spawn(move || seg.write_at(&[7; 128 << 10], i * (128 << 10)).unwrap());
            }
        });
        seg.sync_data().unwrap();
        assert!(started.elapsed() >= std::time::Duration::from_millis(270), "{:?}", started.elapsed());
        let (waited, syncs) = t.waited();
        assert!(waited >= std::time::Duration::from_millis(270) && syncs == 1, "{waited:?} {syncs}");
        let mut back = vec![0; 256 << 10];
        seg.read_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 7), "a slow write still writes");

        // The gate holds writes until released.
        t.set_hold(true);
        let held = std::thread::spawn({
            let seg = seg.clone();
            move || seg.write_at(b"late", 0).unwrap()
        });
        t.wait("the write to reach the gate", |g| g.held == 1);
        assert_eq!(t.waited().1, 1);
        t.set_hold(false);
        held.join().unwrap();
        t.wait("the held write", |g| g.writes == 3 && g.held == 0);
    }
}
