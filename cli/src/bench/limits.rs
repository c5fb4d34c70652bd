//! What the connection scenario needs from the kernel for `n` concurrent loopback connections,
//! checked before it connects — and raised, as root, where it is too low. Each check says what
//! it found, what is needed and what was done, so a run on a machine that cannot be changed
//! (a container with a read-only `/proc/sys`) says why it failed.
//!
//! - Open files per process (`RLIMIT_NOFILE`, inherited by the hub, the broker and the workers)
//!   and its ceiling `fs.nr_open`: the hub (or broker) holds one socket per connection.
//! - Open files system-wide (`fs.file-max`): both ends of every loopback connection.
//! - Ephemeral ports (`net.ipv4.ip_local_port_range`): each client socket is bound to a source
//!   address of its own in 127.0.0.0/8, at most [`PER_SOURCE`] per address, so the range only
//!   needs that many ports.
//! - Listen backlog (`net.core.somaxconn`): the clients connect a bounded number at a time, far
//!   below it.
//! - Connection tracking (`nf_conntrack_max`, when the module is loaded): one entry per
//!   connection, plus the previous phase's connections in TIME_WAIT.

use std::path::Path;

use serde::Serialize;

use super::install::is_root;

/// Most client connections bound to one source address.
pub const PER_SOURCE: usize = 1000;

/// One kernel limit: what it is, what the scenario needs and what happened.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Name (`fs.file-max`).
    pub name: &'static str,
    /// Value found.
    pub found: String,
    /// What is needed.
    pub need: String,
    /// `ok`, `raised to …`, or `too low: …` with the reason it could not be raised.
    pub result: String,
}

impl Check {
    /// Whether the limit is (now) enough — or lowers the connection count rather than stops
    /// the run (the open-file limit).
    pub fn ok(&self) -> bool {
        !self.result.starts_with("too low")
    }
}

fn read_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Raises the number in `path` to `want` when it is below `need` (as root).
fn sysctl_at_least(name: &'static str, path: &str, need: u64, want: u64) -> Option<Check> {
    let found = read_sysctl(path)?;
    let value: u64 = found.split_whitespace().next()?.parse().ok()?;
    let result = if value >= need {
        "ok".to_string()
    } else if !is_root() {
        "too low: not root, cannot raise it".to_string()
    } else {
        match std::fs::write(path, want.to_string()) {
            Ok(()) => format!("raised to {want}"),
            Err(e) => format!("too low: cannot write {path}: {e}"),
        }
    };
    Some(Check { name, found, need: format!(">= {need}"), result })
}

/// Whether this process has CAP_SYS_RESOURCE (needed to raise a hard limit), from `CapEff`.
fn has_cap_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    eff.is_some_and(|caps| caps & (1 << 24) != 0)
}

/// Open files for this process and its children: the soft limit raised to at least `need` (the
/// hard limit and `fs.nr_open` first, as root with CAP_SYS_RESOURCE, when they are lower).
/// Returns the check and the soft limit in force afterwards.
fn nofile(need: u64) -> (Vec<Check>, u64) {
    let mut out = Vec::new();
    // The ceiling of any process's open-file limit; below `need` it caps the run rather than
    // stopping it.
    if let Some(mut c) = sysctl_at_least("fs.nr_open", "/proc/sys/fs/nr_open", need, need.next_power_of_two()) {
        if let Some(why) = c.result.strip_prefix("too low: ") {
            c.result = format!("caps the open-file limit: {why}");
        }
        out.push(c);
    }
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        out.push(Check {
            name: "RLIMIT_NOFILE",
            found: "?".into(),
            need: format!(">= {need}"),
            result: "too low: getrlimit failed".into(),
        });
        return (out, 0);
    }
    let found = format!("soft {}, hard {}", lim.rlim_cur, lim.rlim_max);
    let raise = |to: u64| {
        let want = libc::rlimit { rlim_cur: to, rlim_max: to.max(lim.rlim_max) };
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 }
    };
    let (result, soft) = if lim.rlim_cur >= need {
        ("ok".to_string(), lim.rlim_cur)
    } else if need <= lim.rlim_max && raise(need) {
        (format!("raised the soft limit to {need}"), need)
    } else if is_root() && raise(need) {
        (format!("raised to {need}"), need)
    } else {
        // Use what the hard limit allows.
        let soft = if raise(lim.rlim_max) { lim.rlim_max } else { lim.rlim_cur };
        let why = if !is_root() {
            "the bench is not root".to_string()
        } else if !has_cap_sys_resource() {
            "root without CAP_SYS_RESOURCE cannot raise the hard limit (this machine's sandbox drops it); start the bench from a shell with `ulimit -n` high enough".to_string()
        } else {
            format!("setrlimit failed: {}", std::io::Error::last_os_error())
        };
        (format!("{CAPPED} {soft}: {why}"), soft)
    };
    out.push(Check { name: "RLIMIT_NOFILE", found, need: format!(">= {need}"), result });
    (out, soft)
}

/// How a check that lowers the connection count (rather than stopping the run) starts.
const CAPPED: &str = "cannot be raised; soft limit now";

/// File descriptors a server process needs beside its connections (listener, logs, stores).
const PROCESS_MARGIN: u64 = 1000;

/// How many of `requested` connections a server process whose open-file limit is `soft` can
/// hold: all of them, or the largest multiple of 1,000 that leaves [`PROCESS_MARGIN`] free.
fn allowed_connections(requested: u64, soft: u64) -> u64 {
    if soft >= requested + PROCESS_MARGIN {
        requested
    } else {
        soft.saturating_sub(PROCESS_MARGIN) / 1000 * 1000
    }
}

/// What [`prepare`] found.
#[derive(Debug, Clone, Serialize)]
pub struct Prepared {
    /// Every check.
    pub checks: Vec<Check>,
    /// The connections the limits allow: the requested number, or fewer when the open-file
    /// limit cannot be raised that far.
    pub connections: usize,
}

/// Checks (and where needed raises) every limit for `requested` connections; when the
/// open-file limit cannot be raised far enough, the connections it allows.
pub fn prepare(requested: usize) -> Prepared {
    let (mut out, soft) = nofile(requested as u64 + PROCESS_MARGIN);
    let n = allowed_connections(requested as u64, soft);
    let margin = 10_000;
    let in_use = read_sysctl("/proc/sys/fs/file-nr").and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok()).unwrap_or(0);
    let need = in_use + 2 * n + margin;
    out.extend(sysctl_at_least("fs.file-max", "/proc/sys/fs/file-max", need, need * 2));
    if let Some(found) = read_sysctl("/proc/sys/net/ipv4/ip_local_port_range") {
        let v: Vec<u64> = found.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        let ports = match v.as_slice() {
            [lo, hi] if hi >= lo => hi - lo + 1,
            _ => 0,
        };
        let need = PER_SOURCE as u64;
        let result = if ports >= need { "ok".to_string() } else { format!("too low: {ports} ports per source address") };
        out.push(Check {
            name: "net.ipv4.ip_local_port_range",
            found,
            need: format!("{need} ports (each source address in 127.0.0.0/8 carries at most {PER_SOURCE} connections)"),
            result,
        });
    }
    if let Some(found) = read_sysctl("/proc/sys/net/core/somaxconn") {
        out.push(Check {
            name: "net.core.somaxconn",
            found,
            need: "not limiting: clients connect a bounded number at a time (the hub's listen backlog is 1,024)".into(),
            result: "ok".into(),
        });
    }
    let conntrack = "/proc/sys/net/netfilter/nf_conntrack_max";
    if Path::new(conntrack).exists() {
        let count = read_sysctl("/proc/sys/net/netfilter/nf_conntrack_count").unwrap_or_default();
        if let Some(mut c) = sysctl_at_least("nf_conntrack_max", conntrack, 2 * n + margin, 4 * n) {
            c.found = format!("{} (entries in use now: {count})", c.found);
            out.push(c);
        }
    } else {
        out.push(Check { name: "nf_conntrack_max", found: "nf_conntrack not loaded".into(), need: "-".into(), result: "ok".into() });
    }
    Prepared { checks: out, connections: n as usize }
}

/// The source address for client connection `i`: 127.a.b.c with [`PER_SOURCE`] connections
/// per address, never a .0 or .255 octet.
pub fn source_addr(i: usize) -> std::net::Ipv4Addr {
    let k = i / PER_SOURCE;
    let c = (k % 250) as u8 + 1;
    let b = ((k / 250) % 250) as u8 + 1;
    let a = ((k / 62_500) % 250) as u8 + 1;
    std::net::Ipv4Addr::new(127, a, b, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_spread_and_stay_in_loopback() {
        assert_eq!(source_addr(0), std::net::Ipv4Addr::new(127, 1, 1, 1));
        assert_eq!(source_addr(PER_SOURCE - 1), source_addr(0));
        assert_eq!(source_addr(PER_SOURCE), std::net::Ipv4Addr::new(127, 1, 1, 2));
        let distinct: std::collections::HashSet<_> = (0..1_000_000).step_by(PER_SOURCE).map(source_addr).collect();
        assert_eq!(distinct.len(), 1000, "a million connections use a thousand addresses");
        for i in (0..10_000_000).step_by(7919) {
            let o = source_addr(i).octets();
            assert_eq!(o[0], 127);
            assert!(o[1..].iter().all(|&x| x != 0 && x != 255), "{:?}", source_addr(i));
        }
    }

    #[test]
    fn checks_report_every_limit() {
        let p = prepare(10);
        assert_eq!(p.connections, 10);
        let checks = p.checks;
        let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
        assert!(names.contains(&"RLIMIT_NOFILE"), "{names:?}");
        assert!(names.contains(&"net.ipv4.ip_local_port_range"), "{names:?}");
        assert!(checks.iter().all(|c| c.ok()), "10 connections fit any machine: {checks:?}");
    }

    #[test]
    fn a_low_open_file_limit_lowers_the_run_instead_of_stopping_it() {
        assert_eq!(allowed_connections(100_000, 1_048_576), 100_000);
        assert_eq!(allowed_connections(100_000, 101_000), 100_000);
        assert_eq!(allowed_connections(100_000, 20_000), 19_000);
        assert_eq!(allowed_connections(100_000, 20_999), 19_000);
        assert_eq!(allowed_connections(100_000, 500), 0);
        let capped = Check {
            name: "RLIMIT_NOFILE",
            found: "soft 20000, hard 20000".into(),
            need: ">= 101000".into(),
            result: format!("{CAPPED} 20000: why"),
        };
        assert!(capped.ok(), "a capped open-file limit lowers the run, it does not stop it");
    }
}
