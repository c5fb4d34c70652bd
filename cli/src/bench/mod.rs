//! `hubmsg bench`: figures for the whole system with a baseline in the same run.
//!
//! The hub runs as a child process (`hubmsg hub …` from this executable, a fresh data directory
//! per run) so its memory and CPU can be read from `/proc` and it can be killed and restarted;
//! devices, consumers and services run in this process (or, for the connection scenario, in
//! helper child processes). Every scenario counts every message id end to end and fails when one
//! is missing; timings are reported next to their targets but never fail the run.
//!
//! Scenarios: `d2c-throughput`, `baseline` (Mosquitto), `d2c-latency`, `c2d-roundtrip`,
//! `connections`, `recovery`. Results: a table on stdout, `results.json`, `results.md` and PNG
//! plots in `--out`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use hubmsg_core::{Error, ErrorKind};
use serde::Serialize;

mod c2d;
mod common;
mod conns;
mod d2c;
mod mosquitto;
mod plot;
pub mod procstat;
mod recovery;
mod stats;

/// Options of `hubmsg bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// Reduced counts so the whole run takes under a minute (for CI); figures are rougher.
    #[arg(long)]
    quick: bool,
    /// Run only this scenario (repeatable). Default: all.
    #[arg(long = "scenario", value_enum)]
    scenarios: Vec<Scenario>,
    /// Directory for results.json, results.md and the PNG plots.
    #[arg(long, default_value = "docs/benchmarks")]
    out: PathBuf,
    /// Where to write the JSON results (default: OUT/results.json).
    #[arg(long)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    worker: Option<Worker>,
}

/// Helper processes the bench starts itself.
#[derive(Subcommand)]
enum Worker {
    /// Holds many device connections for the `connections` scenario (driven over stdin/stdout).
    #[command(hide = true)]
    ConnWorker(conns::WorkerArgs),
}

/// The scenarios, in the order a full run executes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// D2C messages/s to an acknowledging consumer: 1 and 100 devices, fsync'd and `never`.
    D2cThroughput,
    /// The same D2C workload against Mosquitto (rumqttc publisher and subscriber).
    Baseline,
    /// D2C latency percentiles at a fixed offered load (paced open-loop sender).
    D2cLatency,
    /// C2D send with ack=full → device complete → feedback at the service.
    C2dRoundtrip,
    /// Many idle-ish device connections: hub RSS per connection and hub CPU.
    Connections,
    /// Hub restart with many stored D2C messages: time to CONNACK and to the first event.
    Recovery,
}

impl Scenario {
    fn all() -> Vec<Scenario> {
        vec![
            Scenario::D2cThroughput,
            Scenario::Baseline,
            Scenario::D2cLatency,
            Scenario::C2dRoundtrip,
            Scenario::Connections,
            Scenario::Recovery,
        ]
    }

    /// The name used on the command line and in the results.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::D2cThroughput => "d2c-throughput",
            Scenario::Baseline => "baseline",
            Scenario::D2cLatency => "d2c-latency",
            Scenario::C2dRoundtrip => "c2d-roundtrip",
            Scenario::Connections => "connections",
            Scenario::Recovery => "recovery",
        }
    }
}

/// Shared settings and state of one bench run.
pub struct Ctx {
    /// `--quick`.
    pub quick: bool,
    /// Scratch space for hub data and device outboxes (removed at the end).
    pub tmp: tempfile::TempDir,
    /// Time origin for timestamps carried in message bodies.
    pub epoch: Instant,
    /// The hub processes' stderr goes here.
    pub hub_log: PathBuf,
    /// Key every bench device is registered with.
    pub device_key: String,
}

impl Ctx {
    /// A fresh directory under the scratch space for the run `name`, with the disk quiet: what
    /// earlier runs left unwritten in the page cache is flushed first (`sync`), so background
    /// writeback does not compete with this run's fsyncs. Earlier runs' files stay until the
    /// bench ends, because deleting them makes the file system discard their blocks while the
    /// next run measures.
    pub fn dir(&self, name: &str) -> Result<PathBuf, Error> {
        // SAFETY: sync(2) takes no arguments and has no memory effects.
        unsafe { libc::sync() };
        let d = self.tmp.path().join(name);
        if d.exists() {
            std::fs::remove_dir_all(&d).map_err(|e| Error::storage(format!("clear {}", d.display()), e))?;
        }
        std::fs::create_dir_all(&d).map_err(|e| Error::storage(format!("create {}", d.display()), e))?;
        Ok(d)
    }
}

impl Ctx {
    /// Deletes the directories of the runs before (for a scenario that needs the disk space:
    /// recovery stores 10,000,000 events, about 6 GiB). Their blocks are discarded while this
    /// scenario fills, not while a later one measures.
    pub fn free_earlier_runs(&self) {
        if let Ok(rd) = std::fs::read_dir(self.tmp.path()) {
            for e in rd.flatten() {
                if e.path().is_dir() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }
}

/// A bound on a figure.
#[derive(Debug, Clone, Copy, Serialize)]
pub enum Target {
    /// The figure must be at least this.
    AtLeast(f64),
    /// The figure must be at most this.
    AtMost(f64),
}

impl Target {
    fn met(self, v: f64) -> bool {
        match self {
            Target::AtLeast(t) => v >= t,
            Target::AtMost(t) => v <= t,
        }
    }
}

/// One line of the results table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Scenario name.
    pub scenario: &'static str,
    /// What the figure is.
    pub figure: String,
    /// The figure.
    pub value: f64,
    /// Its unit.
    pub unit: &'static str,
    /// The target, if the issue sets one.
    pub target: Option<Target>,
    /// For throughput rows: the baseline row to compare with (`baseline/<key>`) and the ratio
    /// the target asks for (e.g. 2.0), if any.
    #[serde(skip)]
    pub compare: Option<(String, Option<f64>)>,
    /// hubmsg / Mosquitto for throughput rows (filled in once the baseline ran).
    pub vs_mosquitto: Option<f64>,
    /// The ratio target (hubmsg / Mosquitto at least this).
    pub ratio_target: Option<f64>,
    /// `met`, `missed`, or `-` without a target.
    pub status: String,
    /// Cores busy outside the server and bench processes during the measurement (kernel work
    /// they cause, and anything else running on the machine).
    pub other_cpu: Option<f64>,
    /// Key other rows compare against (baseline rows).
    #[serde(skip)]
    pub key: Option<String>,
}

impl Row {
    /// A row without a target.
    pub fn new(scenario: Scenario, figure: impl Into<String>, value: f64, unit: &'static str) -> Row {
        Row {
            scenario: scenario.name(),
            figure: figure.into(),
            value,
            unit,
            target: None,
            compare: None,
            vs_mosquitto: None,
            ratio_target: None,
            status: "-".into(),
            other_cpu: None,
            key: None,
        }
    }

    /// Notes how busy the rest of the machine was while this figure was measured.
    pub fn other_cpu(mut self, cores: f64) -> Row {
        self.other_cpu = Some(cores);
        self
    }

    /// Sets the target.
    pub fn target(mut self, t: Target) -> Row {
        self.target = Some(t);
        self
    }

    /// Compares with baseline row `key`, optionally asking for `ratio`× its value.
    pub fn compare(mut self, key: &str, ratio: Option<f64>) -> Row {
        self.compare = Some((key.to_string(), ratio));
        self.ratio_target = ratio;
        self
    }

    /// Marks this row as the baseline figure `key`.
    pub fn key(mut self, key: &str) -> Row {
        self.key = Some(key.to_string());
        self
    }

    fn evaluate(&mut self) {
        let mut verdicts = Vec::new();
        if let Some(t) = self.target {
            verdicts.push(Some(t.met(self.value)));
        }
        if let Some(r) = self.ratio_target {
            verdicts.push(self.vs_mosquitto.map(|v| v >= r));
        }
        self.status = if verdicts.is_empty() {
            "-".into()
        } else if verdicts.contains(&Some(false)) {
            "missed".into()
        } else if verdicts.contains(&None) {
            "n/a".into()
        } else {
            "met".into()
        };
    }
}

/// What a scenario hands back: its rows, details for the JSON, data for the plots.
#[derive(Default)]
pub struct Outcome {
    /// Table rows.
    pub rows: Vec<Row>,
    /// Everything else worth keeping (settings, counts, CPU split …).
    pub detail: serde_json::Value,
    /// Set when the scenario cannot run on this machine (e.g. Mosquitto not installable): why.
    /// That is reported, not counted as a failure.
    pub unavailable: Option<String>,
}

/// How a scenario ended.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase", tag = "status", content = "reason")]
pub enum Status {
    /// Ran and produced its figures.
    Ok,
    /// Could not produce its figures (an error, or messages missing).
    Failed(String),
    /// Could not run here (e.g. Mosquitto not installable); not a failure.
    Unavailable(String),
}

#[derive(Serialize)]
struct ScenarioReport {
    name: &'static str,
    #[serde(flatten)]
    status: Status,
    seconds: f64,
    detail: serde_json::Value,
}

/// Runs `hubmsg bench` (or one of its helper processes).
pub async fn run(a: BenchArgs) -> Result<(), Error> {
    if let Some(Worker::ConnWorker(w)) = a.worker {
        return conns::worker(w).await;
    }
    let started = Instant::now();
    let nofile = procstat::raise_nofile();
    let tmp = tempfile::Builder::new().prefix("hubmsg-bench-").tempdir().map_err(|e| Error::storage("create a temporary directory", e))?;
    let hub_log = tmp.path().join("hub-stderr.log");
    let ctx = Ctx { quick: a.quick, epoch: Instant::now(), hub_log, device_key: hubmsg_core::auth::generate_key(), tmp };
    let mut chosen = if a.scenarios.is_empty() { Scenario::all() } else { a.scenarios.clone() };
    chosen.sort();
    chosen.dedup();
    let machine = procstat::machine();
    println!(
        "hubmsg bench{}: {} CPUs ({}), kernel {}, {} MiB; open-file limit {nofile}",
        if a.quick { " --quick" } else { "" },
        machine.nproc,
        machine.cpu_model,
        machine.kernel,
        machine.memory_mib
    );
    let load = load_average();
    println!("all runs: 256-byte bodies, QoS 1, 127.0.0.1, every message id counted at the receiver");
    println!("load average before the run: {load} (other work on this machine lowers every figure; each run reports the CPU of the rest of the machine)");
    println!();

    let mut reports = Vec::new();
    let mut rows: Vec<Row> = Vec::new();
    let mut plots = plot::PlotData::default();
    for s in chosen {
        println!("== {} ==", s.name());
        let t = Instant::now();
        let result = match s {
            Scenario::D2cThroughput => d2c::throughput(&ctx, &mut plots).await,
            Scenario::Baseline => mosquitto::baseline(&ctx, &mut plots).await,
            Scenario::D2cLatency => d2c::latency(&ctx, &mut plots).await,
            Scenario::C2dRoundtrip => c2d::roundtrip(&ctx, &mut plots).await,
            Scenario::Connections => conns::connections(&ctx).await,
            Scenario::Recovery => recovery::recovery(&ctx).await,
        };
        let (status, detail) = match result {
            Ok(Outcome { unavailable: Some(why), detail, .. }) => {
                println!("  unavailable: {why}");
                (Status::Unavailable(why), detail)
            }
            Ok(o) => {
                rows.extend(o.rows);
                (Status::Ok, o.detail)
            }
            Err(e) => {
                println!("  FAILED: {e}");
                (Status::Failed(e.to_string()), serde_json::Value::Null)
            }
        };
        reports.push(ScenarioReport { name: s.name(), status, seconds: stats::round(t.elapsed().as_secs_f64()), detail });
        println!();
    }

    // Ratios against the baseline, then verdicts.
    let baseline: Vec<(String, f64)> = rows.iter().filter_map(|r| r.key.clone().map(|k| (k, r.value))).collect();
    for r in rows.iter_mut() {
        if let Some((key, _)) = &r.compare {
            r.vs_mosquitto = baseline.iter().find(|(k, _)| k == key).filter(|(_, v)| *v > 0.0).map(|(_, v)| stats::round(r.value / v));
        }
        r.evaluate();
    }
    let table = table_text(&rows);
    println!("{table}");
    println!(
        "other CPU: cores busy outside the server and bench processes during that measurement (kernel work they cause, and any other load)"
    );

    let passed = reports.iter().filter(|r| matches!(r.status, Status::Ok)).count();
    let failed = reports.iter().filter(|r| matches!(r.status, Status::Failed(_))).count();
    let skipped = reports.iter().filter(|r| matches!(r.status, Status::Unavailable(_))).count();

    std::fs::create_dir_all(&a.out).map_err(|e| Error::storage(format!("create {}", a.out.display()), e))?;
    let json_path = a.json.clone().unwrap_or_else(|| a.out.join("results.json"));
    let json = serde_json::json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "quick": a.quick,
        "generated_unix_ms": hubmsg_core::message::now_ms(),
        "duration_s": stats::round(started.elapsed().as_secs_f64()),
        "machine": machine,
        "load_average": {"before": load, "after": load_average()},
        "workload": {"body_bytes": common::BODY_BYTES, "qos": 1, "network": "127.0.0.1"},
        "rows": rows,
        "scenarios": reports,
        "summary": {"passed": passed, "failed": failed, "unavailable": skipped},
    });
    let text = serde_json::to_string_pretty(&json).expect("results serialize") + "\n";
    if let Some(parent) = json_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::storage(format!("create {}", parent.display()), e))?;
    }
    std::fs::write(&json_path, text).map_err(|e| Error::storage(format!("write {}", json_path.display()), e))?;
    let md = markdown(&rows, &machine, a.quick);
    let md_path = a.out.join("results.md");
    std::fs::write(&md_path, md).map_err(|e| Error::storage(format!("write {}", md_path.display()), e))?;
    let pngs = plots.render(&a.out)?;
    println!("wrote {}, {} and {} plot(s) in {}", json_path.display(), md_path.display(), pngs.len(), a.out.display());
    println!("total time {:.1} s", started.elapsed().as_secs_f64());
    if failed > 0 {
        if let Ok(log) = std::fs::read_to_string(&ctx.hub_log) {
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            if !tail.is_empty() {
                eprintln!("last lines of the hub processes' stderr:");
                for l in tail.iter().rev() {
                    eprintln!("  {l}");
                }
            }
        }
    }
    if skipped > 0 {
        println!("bench: {passed} passed, {failed} failed, {skipped} skipped");
    } else {
        println!("bench: {passed} passed, {failed} failed");
    }
    if failed > 0 {
        return Err(Error::new(ErrorKind::Internal, format!("{failed} bench scenario(s) failed")));
    }
    Ok(())
}

/// `12,345` style thousands separators for whole numbers, 3 significant decimals otherwise.
pub fn fmt_value(v: f64) -> String {
    if v >= 1000.0 {
        let s = format!("{:.0}", v);
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn target_text(r: &Row) -> String {
    let mut parts = Vec::new();
    match r.target {
        Some(Target::AtLeast(t)) => parts.push(format!(">= {}", fmt_value(t))),
        Some(Target::AtMost(t)) => parts.push(format!("<= {}", fmt_value(t))),
        None => {}
    }
    if let Some(x) = r.ratio_target {
        parts.push(format!(">= {x}x Mosquitto"));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" and ")
    }
}

const HEADERS: [&str; 8] = ["scenario", "figure", "value", "unit", "target", "status", "hubmsg / Mosquitto", "other CPU"];

fn cells(r: &Row) -> [String; 8] {
    [
        r.scenario.to_string(),
        r.figure.clone(),
        fmt_value(r.value),
        r.unit.to_string(),
        target_text(r),
        r.status.clone(),
        r.vs_mosquitto.map_or_else(|| if r.compare.is_some() { "n/a".into() } else { "-".into() }, |v| format!("{v:.2}x")),
        r.other_cpu.map_or_else(|| "-".into(), |c| format!("{c:.2}")),
    ]
}

fn table_text(rows: &[Row]) -> String {
    let all: Vec<[String; 8]> = rows.iter().map(cells).collect();
    let mut w = HEADERS.map(|h| h.chars().count());
    for c in &all {
        for (i, s) in c.iter().enumerate() {
            w[i] = w[i].max(s.chars().count());
        }
    }
    let line = |c: &[String]| {
        c.iter()
            .enumerate()
            .map(|(i, s)| if i == 2 { format!("{s:>width$}", width = w[i]) } else { format!("{s:<width$}", width = w[i]) })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(&HEADERS.map(String::from));
    out.push('\n');
    out.push_str(&w.iter().map(|n| "-".repeat(*n)).collect::<Vec<_>>().join("  "));
    for c in &all {
        out.push('\n');
        out.push_str(&line(c));
    }
    out
}

fn markdown(rows: &[Row], m: &procstat::Machine, quick: bool) -> String {
    let mut s = format!(
        "Results of `hubmsg bench{}` on {} CPUs ({}), Linux {}, {} MiB.\n\n",
        if quick { " --quick" } else { "" },
        m.nproc,
        m.cpu_model,
        m.kernel,
        m.memory_mib
    );
    s.push_str(&format!("| {} |\n|{}\n", HEADERS.join(" | "), "---|".repeat(HEADERS.len())));
    for r in rows {
        let c = cells(r);
        s.push_str(&format!("| {} |\n", c.join(" | ")));
    }
    s.push_str("\n*other CPU*: cores busy outside the server (hub or broker) and bench processes during that measurement, from `/proc/stat`: kernel work they cause (loopback TCP, journal commits) and any other load on the machine.\n");
    s
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

/// Waits up to `timeout` for `cond`, checking every `every`.
pub async fn wait_until(timeout: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_well() {
        assert_eq!(fmt_value(1_234_567.4), "1,234,567");
        assert_eq!(fmt_value(150_000.0), "150,000");
        assert_eq!(fmt_value(418.9), "419");
        assert_eq!(fmt_value(12.34), "12.3");
        assert_eq!(fmt_value(0.5), "0.50");
    }

    #[test]
    fn verdicts() {
        let mut r = Row::new(Scenario::D2cLatency, "p99", 4.0, "ms").target(Target::AtMost(5.0));
        r.evaluate();
        assert_eq!(r.status, "met");
        let mut r =
            Row::new(Scenario::D2cThroughput, "x", 200_000.0, "msg/s").target(Target::AtLeast(150_000.0)).compare("d2c-1", Some(2.0));
        r.evaluate();
        assert_eq!(r.status, "n/a", "a ratio target without a baseline is not met or missed");
        r.vs_mosquitto = Some(1.5);
        r.evaluate();
        assert_eq!(r.status, "missed");
        r.vs_mosquitto = Some(2.5);
        r.evaluate();
        assert_eq!(r.status, "met");
    }

    #[test]
    fn table_lines_up() {
        let rows = vec![Row::new(Scenario::Recovery, "first event", 0.25, "s").target(Target::AtMost(1.0))];
        let t = table_text(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[2].starts_with("recovery"));
        assert!(lines[2].contains("<= 1.00"));
    }
}
