//! What `/proc` says about a process (resident memory, CPU time, per-thread CPU) and the machine
//! (CPU model, cores, kernel), plus raising the open-file limit for many connections.

use std::collections::BTreeMap;
use std::time::Instant;

/// Resident set size of `pid` in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|n| n.parse().ok())
}

/// The fields of a `stat` file after the command name: `rest[0]` is field 3 (state).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    Some(stat.get(stat.rfind(')')? + 2..)?.split_whitespace().collect())
}

/// `(utime, stime)` in clock ticks from a `stat` file's contents (fields 14 and 15).
fn stat_user_sys(stat: &str) -> Option<(u64, u64)> {
    let f = stat_fields(stat)?;
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// `utime + stime` in clock ticks from a `stat` file's contents.
fn stat_ticks(stat: &str) -> Option<u64> {
    stat_user_sys(stat).map(|(u, s)| u + s)
}

/// CPU time of `pid` (all threads) in clock ticks: `(user, system)`.
pub fn cpu_user_sys(pid: u32) -> Option<(u64, u64)> {
    stat_user_sys(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The first process below `pid` (children, their children …) whose command name is `name`.
pub fn descendant_named(pid: u32, name: &str) -> Option<u32> {
    // (pid, parent, command name) of every process.
    let mut procs = Vec::new();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let comm = stat.find('(').zip(stat.rfind(')')).map(|(a, b)| stat[a + 1..b].to_string()).unwrap_or_default();
        let Some(ppid) = stat_fields(&stat).and_then(|f| f.get(1).and_then(|v| v.parse::<u32>().ok())) else { continue };
        procs.push((p, ppid, comm));
    }
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for (p, pp, comm) in &procs {
            if *pp == parent {
                if comm == name {
                    return Some(*p);
                }
                frontier.push(*p);
            }
        }
    }
    None
}

/// Clock ticks per second (`_SC_CLK_TCK`).
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU ticks of `pid` per thread-name group: `hubmsg-log` (store writer threads, where fdatasync
/// happens), `tokio-*` and the main thread (async runtime), everything else as `other`.
pub fn thread_ticks(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for t in dir.flatten() {
        let path = t.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default().trim().to_string();
        let Some(ticks) = std::fs::read_to_string(path.join("stat")).ok().and_then(|s| stat_ticks(&s)) else { continue };
        let group = if name.starts_with("hubmsg-log") {
            "store writer threads"
        } else if name.starts_with("tokio-") || name == "hubmsg" {
            "async runtime threads"
        } else {
            "other threads"
        };
        *out.entry(group.to_string()).or_insert(0) += ticks;
    }
    out
}

/// Measures the CPU a process uses between `start` and `finish`, as cores (1.0 = one core busy).
pub struct CpuMeter {
    pid: u32,
    at: Instant,
    ticks: (u64, u64),
    threads: BTreeMap<String, u64>,
}

/// CPU use over a window.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CpuUse {
    /// Cores busy on average (user + system).
    pub cores: f64,
    /// Of that, in user space.
    pub user_cores: f64,
    /// Of that, in the kernel on the process's behalf (system calls, page faults).
    pub system_cores: f64,
    /// The same split by thread group.
    pub by_threads: BTreeMap<String, f64>,
}

impl CpuMeter {
    /// Starts measuring `pid`.
    pub fn start(pid: u32) -> CpuMeter {
        CpuMeter { pid, at: Instant::now(), ticks: cpu_user_sys(pid).unwrap_or((0, 0)), threads: thread_ticks(pid) }
    }

    /// CPU used since `start`. Threads that ended meanwhile are missing from the split only.
    pub fn finish(&self) -> CpuUse {
        let secs = self.at.elapsed().as_secs_f64().max(1e-6);
        let tps = ticks_per_sec();
        let now = cpu_user_sys(self.pid).unwrap_or(self.ticks);
        let by_threads = thread_ticks(self.pid)
            .into_iter()
            .map(|(k, v)| {
                let before = self.threads.get(&k).copied().unwrap_or(0);
                (k, round3(v.saturating_sub(before) as f64 / tps / secs))
            })
            .collect();
        let cores = |ticks: u64| round3(ticks as f64 / tps / secs);
        let (user, system) = (now.0.saturating_sub(self.ticks.0), now.1.saturating_sub(self.ticks.1));
        CpuUse { cores: cores(user + system), user_cores: cores(user), system_cores: cores(system), by_threads }
    }
}

/// Busy clock ticks of the whole machine (all CPUs, `/proc/stat`: everything but idle and
/// iowait).
fn machine_busy_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else { return 0 };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|n| n.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user).
    v.iter().take(8).sum::<u64>() - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0)
}

/// Measures, over one window, the CPU of the server process (hub or broker), of this (client)
/// process, and of the whole machine — the rest being other processes and kernel threads (such
/// as the file system's journal commits that fsyncs cause).
pub struct Meters {
    server: CpuMeter,
    client: CpuMeter,
    machine: u64,
}

/// What [`Meters`] measured, in cores (1.0 = one core busy on average).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CpuSplit {
    /// The hub or broker process.
    pub server: CpuUse,
    /// The bench process (devices, consumers, services).
    pub client: CpuUse,
    /// Everything else on the machine: other processes and kernel threads.
    pub rest_cores: f64,
    /// The whole machine.
    pub machine_cores: f64,
}

impl Meters {
    /// Starts measuring with `server` as the server process.
    pub fn start(server: u32) -> Meters {
        Meters { server: CpuMeter::start(server), client: CpuMeter::start(std::process::id()), machine: machine_busy_ticks() }
    }

    /// The split since `start`.
    pub fn finish(&self) -> CpuSplit {
        let secs = self.client.at.elapsed().as_secs_f64().max(1e-6);
        let machine_cores = round3(machine_busy_ticks().saturating_sub(self.machine) as f64 / ticks_per_sec() / secs);
        let (server, client) = (self.server.finish(), self.client.finish());
        let rest_cores = round3((machine_cores - server.cores - client.cores).max(0.0));
        CpuSplit { server, client, rest_cores, machine_cores }
    }
}

impl std::fmt::Display for CpuSplit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CPU: server {:.2}, clients {:.2}, rest of machine {:.2} cores", self.server.cores, self.client.cores, self.rest_cores)
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Raises the soft open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write/read the struct we pass and nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
    }
    lim.rlim_cur
}

/// Latency of `fdatasync` after a 4 KiB append, the disk's cost of one durable write.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct FsyncProbe {
    /// Samples taken.
    pub samples: usize,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
}

impl std::fmt::Display for FsyncProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p50 {:.2} ms, p99 {:.2} ms ({} samples)", self.p50_ms, self.p99_ms, self.samples)
    }
}

/// Appends 4 KiB and `fdatasync`s it `samples` times in a file under `dir` (removed after).
pub fn fsync_probe(dir: &std::path::Path, samples: usize) -> std::io::Result<FsyncProbe> {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
    let block = [b'.'; 4096];
    let mut lat = Vec::with_capacity(samples);
    for _ in 0..samples {
        f.write_all(&block)?;
        let t = Instant::now();
        f.sync_data()?;
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    lat.sort_by(f64::total_cmp);
    let q = |p: f64| lat.get(((p * lat.len() as f64).ceil() as usize).clamp(1, lat.len().max(1)) - 1).copied().unwrap_or(0.0);
    Ok(FsyncProbe { samples, p50_ms: round3(q(0.5)), p99_ms: round3(q(0.99)) })
}

/// The machine the figures come from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    /// Online CPUs (`nproc`).
    pub nproc: usize,
    /// `model name` from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// `MemTotal` in MiB.
    pub memory_mib: u64,
}

/// Reads nproc, the CPU model, the kernel release and the memory size.
pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into());
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024);
    Machine { nproc: std::thread::available_parallelism().map_or(1, |n| n.get()), cpu_model, kernel, memory_mib }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_found_after_the_command_name() {
        let stat = "123 (tokio runtime) S 1 123 123 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1 2 3";
        assert_eq!(stat_ticks(stat), Some(325));
        assert_eq!(stat_user_sys(stat), Some((250, 75)));
        assert_eq!(stat_fields(stat).unwrap()[1], "1", "the parent pid follows the state");
    }

    #[test]
    fn fsync_probe_measures_something() {
        let dir = tempfile::tempdir().unwrap();
        let p = fsync_probe(dir.path(), 5).unwrap();
        assert_eq!(p.samples, 5);
        assert!(p.p50_ms > 0.0 && p.p99_ms >= p.p50_ms, "{p:?}");
        assert!(!dir.path().join("fsync-probe").exists());
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        assert!(rss_kb(pid).unwrap() > 0);
        assert!(cpu_user_sys(pid).is_some());
    }

    #[test]
    fn finds_a_child_by_name() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let found = descendant_named(std::process::id(), "sleep");
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(found, Some(child.id()));
        assert_eq!(descendant_named(std::process::id(), "no-such-command-name"), None);
    }
}
