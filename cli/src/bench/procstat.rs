//! What `/proc` says about a process (resident memory, CPU time, per-thread CPU) and the machine
//! (CPU model, cores, kernel), plus raising the open-file limit for many connections.

use std::collections::BTreeMap;
use std::time::Instant;

/// Resident set size of `pid` in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|n| n.parse().ok())
}

/// `utime + stime` in clock ticks from a `stat` file's contents.
fn stat_ticks(stat: &str) -> Option<u64> {
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU time of `pid` (all threads, user + system) in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
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
    ticks: u64,
    threads: BTreeMap<String, u64>,
}

/// CPU use over a window.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CpuUse {
    /// Cores busy on average (user + system).
    pub cores: f64,
    /// The same split by thread group.
    pub by_threads: BTreeMap<String, f64>,
}

impl CpuMeter {
    /// Starts measuring `pid`.
    pub fn start(pid: u32) -> CpuMeter {
        CpuMeter { pid, at: Instant::now(), ticks: cpu_ticks(pid).unwrap_or(0), threads: thread_ticks(pid) }
    }

    /// CPU used since `start`. Threads that ended meanwhile are missing from the split only.
    pub fn finish(&self) -> CpuUse {
        let secs = self.at.elapsed().as_secs_f64().max(1e-6);
        let tps = ticks_per_sec();
        let now = cpu_ticks(self.pid).unwrap_or(self.ticks);
        let by_threads = thread_ticks(self.pid)
            .into_iter()
            .map(|(k, v)| {
                let before = self.threads.get(&k).copied().unwrap_or(0);
                (k, round3(v.saturating_sub(before) as f64 / tps / secs))
            })
            .collect();
        CpuUse { cores: round3(now.saturating_sub(self.ticks) as f64 / tps / secs), by_threads }
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
    fn stat_fields() {
        let stat = "123 (tokio runtime) S 1 123 123 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1 2 3";
        assert_eq!(stat_ticks(stat), Some(325));
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        assert!(rss_kb(pid).unwrap() > 0);
        assert!(cpu_ticks(pid).is_some());
    }
}
