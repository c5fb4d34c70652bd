//! Many device connections, each sending one message every 10 s: the hub's resident memory per
//! connection and its CPU. The connections live in helper processes (`hubmsg bench conn-worker`,
//! at most [`PER_WORKER`] each) so neither side runs out of file descriptors and the bench
//! process's own memory stays out of the picture.
//!
//! Worker protocol (stdin/stdout lines): the worker connects its devices with bounded
//! concurrency and prints `ready <connected> <failed> <ms>`; on `go` every device starts sending
//! (phases spread evenly over the interval); on `stop` it prints `done <sent> <delivered>
//! <errors>` and exits.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hubmsg_core::outbox::OutboxOptions;
use hubmsg_core::store::Durability;
use hubmsg_core::{DeviceClient, Error, ErrorKind, Message, Overflow};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::common::{self, body, Hub, Stamp};
use super::procstat::{self, Meters};
use super::stats::{self, message_id};
use super::{Ctx, Outcome, Row, Scenario, Target};

/// Most connections one worker process holds.
const PER_WORKER: usize = 5000;
/// Each device sends one message this often.
const SEND_EVERY: Duration = Duration::from_secs(10);
/// Connections being set up at once (per worker).
const CONCURRENCY: usize = 100;

/// Options of the hidden `hubmsg bench conn-worker`.
#[derive(Args)]
pub struct WorkerArgs {
    /// Hub `HostName` (`127.0.0.1:port`).
    #[arg(long)]
    host: String,
    /// Device key (every bench device has the same one).
    #[arg(long, env = "HUBMSG_BENCH_DEVICE_KEY", hide_env_values = true)]
    key: String,
    /// Device id prefix.
    #[arg(long)]
    prefix: String,
    /// First device number.
    #[arg(long)]
    first: usize,
    /// How many devices.
    #[arg(long)]
    count: usize,
    /// Connections set up at once.
    #[arg(long, default_value_t = CONCURRENCY)]
    concurrency: usize,
}

/// The worker process.
pub async fn worker(a: WorkerArgs) -> Result<(), Error> {
    procstat::raise_nofile();
    let started = Instant::now();
    let sem = Arc::new(Semaphore::new(a.concurrency.max(1)));
    let mut set = JoinSet::new();
    for n in a.first..a.first + a.count {
        let permit = sem.clone().acquire_owned().await.map_err(|_| Error::closed("semaphore"))?;
        let (host, key, id) = (a.host.clone(), a.key.clone(), format!("{}-{n}", a.prefix));
        set.spawn(async move {
            let _permit = permit;
            // A cheap client: in-memory outbox, no fsync.
            let outbox = OutboxOptions {
                dir: None,
                in_memory: true,
                durability: Durability::Never,
                max_messages: 64,
                max_bytes: 64 * 1024,
                overflow: Overflow::DropOldest,
            };
            let dev = DeviceClient::connect(common::device_options(&host, &id, &key, outbox)).await?;
            common::connected(&dev, Duration::from_secs(120)).await?;
            Ok::<_, Error>((n, dev))
        });
    }
    let mut devices = Vec::with_capacity(a.count);
    let mut failed = 0;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(d)) => devices.push(d),
            _ => failed += 1,
        }
    }
    let mut stdout = tokio::io::stdout();
    let say = |s: String| s + "\n";
    stdout.write_all(say(format!("ready {} {failed} {}", devices.len(), started.elapsed().as_millis())).as_bytes()).await.ok();
    stdout.flush().await.ok();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(l)) = lines.next_line().await {
        if l.trim() == "go" {
            break;
        }
    }
    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let count = devices.len().max(1) as u32;
    let t0 = tokio::time::Instant::now();
    let mut senders = JoinSet::new();
    for (k, (n, dev)) in devices.iter().cloned().enumerate() {
        let (sent, errors) = (sent.clone(), errors.clone());
        let phase = SEND_EVERY * k as u32 / count;
        senders.spawn(async move {
            let mut tick = tokio::time::interval_at(t0 + phase, SEND_EVERY);
            let mut seq = 0;
            loop {
                tick.tick().await;
                let b = body(Stamp { sent_ns: 0, device: n as u32, seq, scheduled_ns: 0 });
                match dev.send(Message::new(b).with_message_id(message_id(n, seq))).await {
                    Ok(_) => sent.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
                seq += 1;
            }
        });
    }
    while let Ok(Some(l)) = lines.next_line().await {
        if l.trim() == "stop" {
            break;
        }
    }
    senders.abort_all();
    let delivered: u64 = devices.iter().map(|(_, d)| d.stats().outbox.delivered).sum();
    let line = format!("done {} {delivered} {}\n", sent.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    stdout.write_all(line.as_bytes()).await.ok();
    stdout.flush().await.ok();
    // Exit without closing thousands of connections one by one; the hub sees them drop.
    std::process::exit(0);
}

struct WorkerProc {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl WorkerProc {
    fn spawn(hub: &Hub, key: &str, prefix: &str, first: usize, count: usize) -> Result<WorkerProc, Error> {
        let exe = std::env::current_exe().map_err(|e| Error::new(ErrorKind::Internal, format!("own executable: {e}")))?;
        let mut child = Command::new(exe)
            .args(["bench", "conn-worker", "--host", &hub.host(), "--prefix", prefix])
            .args(["--first", &first.to_string(), "--count", &count.to_string()])
            .env("HUBMSG_BENCH_DEVICE_KEY", key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::new(ErrorKind::Internal, format!("cannot start a connection worker: {e}")))?;
        let stdin = child.stdin.take().expect("piped stdin");
        let lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        Ok(WorkerProc { child, stdin, lines })
    }

    /// The next line starting with `word`, split into numbers.
    async fn expect(&mut self, word: &str, timeout: Duration) -> Result<Vec<u64>, Error> {
        let fut = async {
            while let Ok(Some(l)) = self.lines.next_line().await {
                if let Some(rest) = l.strip_prefix(word) {
                    return Ok(rest.split_whitespace().filter_map(|n| n.parse().ok()).collect());
                }
            }
            Err(Error::new(ErrorKind::Internal, format!("a connection worker exited before saying '{word}'")))
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| Error::new(ErrorKind::Timeout, format!("a connection worker did not say '{word}' within {timeout:?}")))?
    }

    async fn tell(&mut self, what: &str) -> Result<(), Error> {
        self.stdin.write_all(format!("{what}\n").as_bytes()).await.map_err(|e| Error::storage("write to a connection worker", e))?;
        self.stdin.flush().await.map_err(|e| Error::storage("write to a connection worker", e))
    }
}

/// Open file descriptors of `pid` (sockets included).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Scenario 4.
pub async fn connections(ctx: &Ctx) -> Result<Outcome, Error> {
    let (n, window) = if ctx.quick { (1000, Duration::from_secs(5)) } else { (10_000, Duration::from_secs(20)) };
    let hub = Hub::start(ctx, "connections", &[]).await?;
    let svc = common::service(&hub.proc.cs).await?;
    let t = Instant::now();
    let ids = common::device_ids("conn", n);
    common::register(&svc, &ids, &ctx.device_key, 256).await?;
    let register_s = t.elapsed().as_secs_f64();
    svc.close().await;
    drop(ids);
    // Idle: every identity registered, no device connected.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = procstat::rss_kb(hub.pid()).unwrap_or(0);
    let fds_idle = open_fds(hub.pid());

    let t = Instant::now();
    let mut workers = Vec::new();
    let mut first = 0;
    while first < n {
        let count = PER_WORKER.min(n - first);
        workers.push(WorkerProc::spawn(&hub, &ctx.device_key, "conn", first, count)?);
        first += count;
    }
    let (mut connected, mut failed) = (0u64, 0u64);
    for w in &mut workers {
        let v = w.expect("ready", Duration::from_secs(300)).await?;
        connected += v.first().copied().unwrap_or(0);
        failed += v.get(1).copied().unwrap_or(0);
    }
    let connect_s = t.elapsed().as_secs_f64();
    println!(
        "  {connected} connections up in {connect_s:.1} s ({failed} failed; {} worker processes, {CONCURRENCY} at a time each)",
        workers.len()
    );
    if connected < n as u64 {
        return Err(Error::new(ErrorKind::Disconnected, format!("only {connected} of {n} devices connected ({failed} failed)")));
    }
    let fds_connected = open_fds(hub.pid());
    if fds_connected < fds_idle + n {
        return Err(Error::new(
            ErrorKind::Internal,
            format!("the hub holds {fds_connected} file descriptors ({fds_idle} idle); {n} connections should add {n}"),
        ));
    }
    let rss_connected_idle = procstat::rss_kb(hub.pid()).unwrap_or(0);

    for w in &mut workers {
        w.tell("go").await?;
    }
    let meters = Meters::start(hub.pid());
    let worker_meters: Vec<procstat::CpuMeter> = workers.iter().filter_map(|w| w.child.id()).map(procstat::CpuMeter::start).collect();
    let mut rss_max = 0;
    let end = Instant::now() + window;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(500).min(end.saturating_duration_since(Instant::now()))).await;
        rss_max = rss_max.max(procstat::rss_kb(hub.pid()).unwrap_or(0));
    }
    let cpu = meters.finish();
    let workers_cores = stats::round(worker_meters.iter().map(|m| m.finish().cores).sum::<f64>());
    let hub_cpu = cpu.server.clone();
    let rss_end = procstat::rss_kb(hub.pid()).unwrap_or(0);
    let (mut sent, mut delivered, mut errors) = (0, 0, 0);
    for w in &mut workers {
        w.tell("stop").await?;
        let v = w.expect("done", Duration::from_secs(30)).await?;
        sent += v.first().copied().unwrap_or(0);
        delivered += v.get(1).copied().unwrap_or(0);
        errors += v.get(2).copied().unwrap_or(0);
    }
    for w in &mut workers {
        let _ = w.child.wait().await;
    }
    drop(hub);

    let per_conn_kb = rss_end.saturating_sub(rss_idle) as f64 / n as f64;
    let cpu_pct = hub_cpu.cores * 100.0;
    println!(
        "  hub RSS idle {:.1} MiB -> {:.1} MiB with {n} connections ({per_conn_kb:.1} KiB each); hub CPU {cpu_pct:.1} % of a core; {sent} sent, {delivered} acknowledged in {:.0} s",
        rss_idle as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        window.as_secs_f64()
    );
    if errors > 0 {
        return Err(Error::new(ErrorKind::Internal, format!("{errors} sends failed during the connection window")));
    }
    let rows = vec![
        Row::new(Scenario::Connections, format!("hub RSS per connection ({n} connections)"), stats::round(per_conn_kb), "KiB")
            .target(Target::AtMost(100.0)),
        Row::new(Scenario::Connections, format!("hub CPU, {n} devices x 1 msg / 10 s"), stats::round(cpu_pct), "% of a core"),
        Row::new(Scenario::Connections, format!("hub RSS with {n} connections"), stats::round(rss_end as f64 / 1024.0), "MiB"),
    ];
    Ok(Outcome {
        rows,
        detail: json!({
            "connections": n,
            "send_every_s": SEND_EVERY.as_secs(),
            "window_s": window.as_secs_f64(),
            "worker_processes": workers.len(),
            "connect_concurrency_per_worker": CONCURRENCY,
            "register_s": stats::round(register_s),
            "connect_s": stats::round(connect_s),
            "hub_rss_kb": {"idle_registered": rss_idle, "connected_before_sending": rss_connected_idle, "end_of_window": rss_end, "max_in_window": rss_max},
            "hub_open_fds": {"idle": fds_idle, "connected": fds_connected},
            "rss_per_connection_kib": stats::round(per_conn_kb),
            "cpu": cpu,
            "worker_processes_cores": workers_cores,
            "messages": {"sent": sent, "acknowledged": delivered},
            "device_clients": "DeviceClient with an in-memory outbox (durability never), 5,000 per worker process",
        }),
        unavailable: None,
    })
}
