//! `hubmsg bench`: figures for the whole system with a baseline in the same run.
//!
//! The hub runs as a child process (`hubmsg hub …` from this executable, a fresh data directory
//! per run) so its memory and CPU can be read from `/proc` and it can be killed and restarted;
//! devices, consumers and services run in this process (or, for the connection scenario, in
//! helper child processes). Every scenario counts every message id end to end and fails when one
//! is missing; timings are reported next to their targets but never fail the run.
//!
//! Scenarios: `d2c-throughput`, the same workload against the baseline brokers
//! (`baseline-mosquitto`, `baseline-rabbitmq`, `baseline-nats`), `d2c-latency`, `c2d-roundtrip`,
//! `connections` (hubmsg and Mosquitto holding the same connections), `recovery`, `scale-out` (2 hub
//! nodes on a 3-node JetStream cluster beside the embedded hub). Results: a table on stdout,
//! `results.json`, `results.md` and PNG plots in `--out`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use hubmsg_core::{Error, ErrorKind};
use serde::Serialize;

mod baselines;
mod broker;
mod c2d;
mod common;
mod conns;
mod d2c;
mod install;
mod limits;
mod mosquitto;
mod mqtt;
mod nats;
mod plot;
pub mod procstat;
mod rabbitmq;
mod recovery;
mod scaleout;
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
    /// Installs the baseline brokers (Mosquitto, RabbitMQ, NATS) when missing, then exits; a
    /// bench run does the same before each baseline, this does it ahead of time.
    Install,
}

/// The scenarios, in the order a full run executes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// D2C messages/s to an acknowledging consumer: 1 and 100 devices, fsync'd and `never`.
    D2cThroughput,
    /// The same D2C workload against Mosquitto 2.0 (`persistence true`).
    BaselineMosquitto,
    /// The same D2C workload against RabbitMQ's MQTT plugin (durable session queues).
    BaselineRabbitmq,
    /// The same D2C workload against NATS JetStream-backed MQTT (sync always / default).
    BaselineNats,
    /// D2C latency percentiles at a fixed offered load (paced open-loop sender).
    D2cLatency,
    /// C2D send with ack=full → device complete → feedback at the service.
    C2dRoundtrip,
    /// Many device connections sending telemetry: hub RSS per connection and hub CPU, and
    /// Mosquitto holding the same connections.
    Connections,
    /// Hub restart with many stored D2C messages: time to CONNACK and to the first event.
    Recovery,
    /// D2C throughput and p99 through 2 hub nodes on a local 3-node JetStream cluster, beside
    /// the embedded hub, with the commit latency and CPU of each side.
    ScaleOut,
}

impl Scenario {
    fn all() -> Vec<Scenario> {
        vec![
            Scenario::D2cThroughput,
            Scenario::BaselineMosquitto,
            Scenario::BaselineRabbitmq,
            Scenario::BaselineNats,
            Scenario::D2cLatency,
            Scenario::C2dRoundtrip,
            Scenario::Connections,
            Scenario::Recovery,
            Scenario::ScaleOut,
        ]
    }

    /// The name used on the command line and in the results.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::D2cThroughput => "d2c-throughput",
            Scenario::BaselineMosquitto => "baseline-mosquitto",
            Scenario::BaselineRabbitmq => "baseline-rabbitmq",
            Scenario::BaselineNats => "baseline-nats",
            Scenario::D2cLatency => "d2c-latency",
            Scenario::C2dRoundtrip => "c2d-roundtrip",
            Scenario::Connections => "connections",
            Scenario::Recovery => "recovery",
            Scenario::ScaleOut => "scale-out",
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

/// Which baselines a throughput row is compared with.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Compare {
    /// Baselines with this many publishers.
    pub publishers: usize,
    /// Only baselines whose PUBACK waits for their disk.
    pub durable_only: bool,
}

/// What a baseline row is, for comparisons.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineOf {
    /// Publishers in the run.
    pub publishers: usize,
    /// Whether the broker's PUBACK waits for its disk.
    pub acks_after_disk: bool,
    /// Short name for the ratio column (`NATS sync always (transport)`).
    pub short: String,
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
    /// For hubmsg throughput rows: the baselines to compare with.
    pub compare: Option<Compare>,
    /// For baseline rows: what they measured.
    pub baseline: Option<BaselineOf>,
    /// hubmsg / the best baseline of [`Row::compare`] (filled in once every scenario ran).
    pub vs_baseline: Option<f64>,
    /// Which baseline that was.
    pub vs_which: Option<String>,
    /// The ratio target (hubmsg / best baseline at least this).
    pub ratio_target: Option<f64>,
    /// `met`, `missed`, or `-` without a target.
    pub status: String,
    /// Cores busy outside the server and bench processes during the measurement (kernel work
    /// they cause, and anything else running on the machine).
    pub other_cpu: Option<f64>,
    /// For throughput rows: CPU time per message.
    pub cpu_per_msg: Option<CpuPerMsg>,
}

/// CPU time per message of a throughput run, in µs, split by process and by user / system.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuPerMsg {
    /// The hub or broker, in user space.
    pub server_user: f64,
    /// The hub or broker, in the kernel.
    pub server_system: f64,
    /// The bench process (senders and receiver), in user space.
    pub client_user: f64,
    /// The bench process, in the kernel.
    pub client_system: f64,
}

impl CpuPerMsg {
    /// From a run's CPU split.
    pub fn of(run: &d2c::ThroughputRun) -> CpuPerMsg {
        let per = |cores: f64| stats::round(cores * run.seconds * 1e6 / run.messages.max(1) as f64);
        CpuPerMsg {
            server_user: per(run.cpu.server.user_cores),
            server_system: per(run.cpu.server.system_cores),
            client_user: per(run.cpu.client.user_cores),
            client_system: per(run.cpu.client.system_cores),
        }
    }
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
            baseline: None,
            vs_baseline: None,
            vs_which: None,
            ratio_target: None,
            status: "-".into(),
            other_cpu: None,
            cpu_per_msg: None,
        }
    }

    /// Notes the CPU time per message of the throughput run behind this row.
    pub fn cpu_per_msg(mut self, run: &d2c::ThroughputRun) -> Row {
        self.cpu_per_msg = Some(CpuPerMsg::of(run));
        self
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

    /// Compares with the best baseline run with `publishers` publishers (only those that ack
    /// after their disk when `durable_only`), optionally asking for `ratio`x its value.
    pub fn compare(mut self, publishers: usize, durable_only: bool, ratio: Option<f64>) -> Row {
        self.compare = Some(Compare { publishers, durable_only });
        self.ratio_target = ratio;
        self
    }

    /// Marks this row as a baseline figure.
    pub fn baseline(mut self, publishers: usize, acks_after_disk: bool, short: String) -> Row {
        self.baseline = Some(BaselineOf { publishers, acks_after_disk, short });
        self
    }

    /// Fills in [`Row::vs_baseline`] from the best of `rows` that [`Row::compare`] names.
    fn compare_with(&mut self, rows: &[Row]) {
        let Some(c) = self.compare else { return };
        let best = rows
            .iter()
            .filter_map(|r| r.baseline.as_ref().map(|b| (b, r.value)))
            .filter(|(b, v)| b.publishers == c.publishers && (b.acks_after_disk || !c.durable_only) && *v > 0.0)
            .max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((b, v)) = best {
            self.vs_baseline = Some(stats::round(self.value / v));
            self.vs_which = Some(b.short.clone());
        }
    }

    fn evaluate(&mut self) {
        let mut verdicts = Vec::new();
        if let Some(t) = self.target {
            verdicts.push(Some(t.met(self.value)));
        }
        if let Some(r) = self.ratio_target {
            verdicts.push(self.vs_baseline.map(|v| v >= r));
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
    match a.worker {
        Some(Worker::ConnWorker(w)) => return conns::worker(w).await,
        Some(Worker::Install) => return baselines::install_all().await,
        None => {}
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
    let probe = |when: &str| match procstat::fsync_probe(ctx.tmp.path(), 200) {
        Ok(p) => {
            println!("disk {when}: fdatasync of a 4 KiB append {p} (other work on the disk raises every durable figure)");
            Some(p)
        }
        Err(e) => {
            println!("disk {when}: cannot probe fdatasync: {e}");
            None
        }
    };
    let disk_before = probe("before the run");
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
            Scenario::BaselineMosquitto => baselines::mosquitto(&ctx, &mut plots).await,
            Scenario::BaselineRabbitmq => baselines::rabbitmq(&ctx, &mut plots).await,
            Scenario::BaselineNats => baselines::nats(&ctx, &mut plots).await,
            Scenario::D2cLatency => d2c::latency(&ctx, &mut plots).await,
            Scenario::C2dRoundtrip => c2d::roundtrip(&ctx, &mut plots).await,
            Scenario::Connections => conns::connections(&ctx, &mut plots).await,
            Scenario::Recovery => recovery::recovery(&ctx).await,
            Scenario::ScaleOut => scaleout::scale_out(&ctx).await,
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

    // Ratios against the baselines, then verdicts.
    let snapshot = rows.clone();
    for r in rows.iter_mut() {
        r.compare_with(&snapshot);
        r.evaluate();
    }
    let table = table_text(&rows);
    println!("{table}");
    let cpu = cpu_cells(&rows);
    if !cpu.is_empty() {
        println!();
        println!("CPU time per message (server = hub or broker; clients = this process):");
        println!("{}", grid(&CPU_HEADERS, cpu, &[2, 3, 4, 5, 6]));
    }
    println!(
        "other CPU: cores busy outside the server and bench processes during that measurement (kernel work they cause, and any other load)"
    );

    let disk_after = probe("after the run");
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
        "disk_fdatasync_4k": {"before": disk_before, "after": disk_after},
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
    let show = |p: Option<procstat::FsyncProbe>| p.map_or_else(|| "not measured".to_string(), |p| p.to_string());
    let conditions = format!(
        "Load average before / after: {load} / {}. `fdatasync` of a 4 KiB append before / after: {} / {}.",
        load_average(),
        show(disk_before),
        show(disk_after)
    );
    let md = markdown(&rows, &machine, a.quick, &conditions);
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
        parts.push(format!(">= {x}x best {}baseline", if r.compare.is_some_and(|c| c.durable_only) { "durable " } else { "" }));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" and ")
    }
}

const HEADERS: [&str; 9] =
    ["scenario", "figure", "value", "unit", "target", "status", "acks after disk", "hubmsg / best baseline", "other CPU"];

fn cells(r: &Row) -> [String; 9] {
    let vs = match (r.vs_baseline, &r.vs_which) {
        (Some(v), Some(which)) => format!("{v:.2}x {which}"),
        _ if r.compare.is_some() => "n/a (no baseline ran)".into(),
        _ => "-".into(),
    };
    [
        r.scenario.to_string(),
        r.figure.clone(),
        fmt_value(r.value),
        r.unit.to_string(),
        target_text(r),
        r.status.clone(),
        r.baseline.as_ref().map_or_else(|| "-".into(), |b| if b.acks_after_disk { "yes".into() } else { "no".into() }),
        vs,
        r.other_cpu.map_or_else(|| "-".into(), |c| format!("{c:.2}")),
    ]
}

fn table_text(rows: &[Row]) -> String {
    grid(&HEADERS, rows.iter().map(|r| cells(r).to_vec()).collect(), &[2])
}

/// A plain-text table: columns padded to their widest cell, the columns in `right` right-aligned.
fn grid(headers: &[&str], rows: Vec<Vec<String>>, right: &[usize]) -> String {
    let mut w: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for c in &rows {
        for (i, s) in c.iter().enumerate() {
            w[i] = w[i].max(s.chars().count());
        }
    }
    let line = |c: &[String]| {
        c.iter()
            .enumerate()
            .map(|(i, s)| if right.contains(&i) { format!("{s:>width$}", width = w[i]) } else { format!("{s:<width$}", width = w[i]) })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(&headers.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    out.push('\n');
    out.push_str(&w.iter().map(|n| "-".repeat(*n)).collect::<Vec<_>>().join("  "));
    for c in &rows {
        out.push('\n');
        out.push_str(&line(c));
    }
    out
}

/// A Markdown table.
fn md_table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut s = format!("| {} |\n|{}\n", headers.join(" | "), "---|".repeat(headers.len()));
    for c in rows {
        s.push_str(&format!("| {} |\n", c.join(" | ")));
    }
    s
}

const CPU_HEADERS: [&str; 7] =
    ["scenario", "run", "server user µs", "server system µs", "clients user µs", "clients system µs", "server + clients µs"];

/// The CPU-per-message table: one line per throughput run (hubmsg and baselines).
fn cpu_cells(rows: &[Row]) -> Vec<Vec<String>> {
    rows.iter()
        .filter_map(|r| {
            let c = r.cpu_per_msg?;
            let f = |v: f64| format!("{v:.1}");
            Some(vec![
                r.scenario.to_string(),
                r.figure.clone(),
                f(c.server_user),
                f(c.server_system),
                f(c.client_user),
                f(c.client_system),
                f(c.server_user + c.server_system + c.client_user + c.client_system),
            ])
        })
        .collect()
}

fn markdown(rows: &[Row], m: &procstat::Machine, quick: bool, conditions: &str) -> String {
    let mut s = format!(
        "Results of `hubmsg bench{}` on {} CPUs ({}), Linux {}, {} MiB. {conditions}\n\n",
        if quick { " --quick" } else { "" },
        m.nproc,
        m.cpu_model,
        m.kernel,
        m.memory_mib
    );
    s.push_str(&md_table(&HEADERS, rows.iter().map(|r| cells(r).to_vec()).collect()));
    let cpu = cpu_cells(rows);
    if !cpu.is_empty() {
        s.push_str("\nCPU time per message of every throughput run (server = hub or broker process; clients = the bench process: devices or publishers, and the consumer or subscriber):\n\n");
        s.push_str(&md_table(&CPU_HEADERS, cpu));
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
            Row::new(Scenario::D2cThroughput, "x", 200_000.0, "msg/s").target(Target::AtLeast(150_000.0)).compare(1, true, Some(2.0));
        r.evaluate();
        assert_eq!(r.status, "n/a", "a ratio target without a baseline is not met or missed");
        r.vs_baseline = Some(1.5);
        r.evaluate();
        assert_eq!(r.status, "missed");
        r.vs_baseline = Some(2.5);
        r.evaluate();
        assert_eq!(r.status, "met");
    }

    #[test]
    fn ratio_uses_the_best_matching_baseline() {
        let b = |name: &str, publishers, durable, v| {
            Row::new(Scenario::BaselineNats, name, v, "msg/s").baseline(publishers, durable, name.to_string())
        };
        let rows = vec![
            b("fast but not durable", 1, false, 30_000.0),
            b("durable slow", 1, true, 1_000.0),
            b("durable faster", 1, true, 3_000.0),
            b("durable, other publisher count", 100, true, 50_000.0),
        ];
        let mut r = Row::new(Scenario::D2cThroughput, "hubmsg", 90_000.0, "msg/s").compare(1, true, Some(2.0));
        r.compare_with(&rows);
        assert_eq!((r.vs_baseline, r.vs_which.as_deref()), (Some(30.0), Some("durable faster")));
        let mut r = Row::new(Scenario::D2cThroughput, "hubmsg never", 90_000.0, "msg/s").compare(1, false, None);
        r.compare_with(&rows);
        assert_eq!((r.vs_baseline, r.vs_which.as_deref()), (Some(3.0), Some("fast but not durable")));
        let mut r = Row::new(Scenario::D2cThroughput, "no match", 1.0, "msg/s").compare(10, true, Some(2.0));
        r.compare_with(&rows);
        r.evaluate();
        assert_eq!((r.vs_baseline, r.status.as_str()), (None, "n/a"));
        assert!(table_text(&[r]).contains("n/a (no baseline ran)"));
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
