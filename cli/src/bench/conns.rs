//! Many concurrent device connections sending telemetry — 100,000 in a full run, each sending
//! one QoS 1 message every 10 s (10,000 msg/s together) — held by one hub, then by Mosquitto in
//! the same run as the baseline. Figures: server resident memory per connection and server CPU
//! over the sending window; every message id is counted at a consumer (a `$Default` reader for
//! the hub, a persistent-session subscriber for Mosquitto) and one missing fails the scenario.
//!
//! The connecting clients are cheap so that the machine's two cores go to the server: helper
//! processes (`hubmsg bench conn-worker`, at most [`PER_WORKER`] connections each, on the CLI's
//! runtime with one worker thread per core) hold one small task per connection that speaks raw
//! MQTT through hubmsg's codec (`transport::encode`, `mqttbytes::v4::read`) with a read buffer of
//! a few bytes: CONNECT (for the hub: the IoT Hub device user name and a SAS token), PINGREQ
//! keep-alives while idle, then its messages one [`Plan::every`] apart, each PUBACK awaited.
//! Each socket is bound to a source address of its own in 127.0.0.0/8 before it connects
//! ([`limits::source_addr`], `IP_BIND_ADDRESS_NO_PORT`), so ephemeral ports never run out.
//!
//! Worker protocol (stdin/stdout lines): the worker connects its devices, a bounded number at a
//! time, and prints `ready <connected> <failed> <ms> | <first error>`; on `go` every device sends
//! its messages (phases spread evenly over the interval across all workers) and the worker
//! prints `done <sent> <acked> <errors> <ms> | <first error>` when all have; on `exit` (or end
//! of input) it exits, which closes every connection at once.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use clap::{Args, ValueEnum};
use hubmsg_core::proto::StartPosition;
use hubmsg_core::transport;
use hubmsg_core::{auth, wire, Error, ErrorKind};
use parking_lot::Mutex;
use rumqttc::mqttbytes::v4::{self, Connect, ConnectReturnCode, Packet, Publish};
use rumqttc::mqttbytes::QoS;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{watch, Semaphore};

use super::broker::Broker;
use super::common::{self, body, parse_body, Hub, Stamp};
use super::limits;
use super::mqtt::{ClientKind, Subscriber};
use super::plot::{ConnBar, PlotData};
use super::procstat::{self, CpuMeter, Meters};
use super::stats::{self, Counts, IdTracker};
use super::{mosquitto, Ctx, Outcome, Row, Scenario, Target as Goal};

/// Most connections one worker process holds.
const PER_WORKER: usize = 50_000;
/// Connections being set up at once, per worker.
const CONCURRENCY: usize = 200;
/// CONNECT keep-alive; idle clients ping at half of it.
const KEEP_ALIVE: Duration = Duration::from_secs(60);
/// How long a client waits for CONNACK, PUBACK or PINGRESP.
const ANSWER_WITHIN: Duration = Duration::from_secs(60);
/// The goal for hub memory per connection (KiB).
pub const RSS_TARGET_KIB: f64 = 10.0;
/// The goal for hub CPU at 10,000 msg/s of aggregate telemetry (% of one core).
pub const CPU_TARGET_PCT: f64 = 100.0;

/// What the connections send.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Plan {
    /// Concurrent connections.
    pub connections: usize,
    /// Each sends one message this often.
    #[serde(serialize_with = "ser_secs")]
    pub every: Duration,
    /// Messages per connection.
    pub messages: u64,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// The aggregate telemetry rate of a full run (100,000 connections x 1 message / 10 s).
const FULL_RATE: f64 = 10_000.0;

impl Plan {
    /// The plan for `connections` (what the machine's limits allow of the run's request): each
    /// connection sends often enough that all together send [`FULL_RATE`] (or, in a quick run,
    /// one message a second each), for about 30 s (3 s quick).
    fn new(ctx: &Ctx, connections: usize) -> Plan {
        if ctx.quick {
            return Plan { connections, every: Duration::from_secs(1), messages: 3 };
        }
        let every = Duration::from_secs_f64(connections as f64 / FULL_RATE);
        let messages = (30.0 / every.as_secs_f64()).ceil().max(3.0) as u64;
        Plan { connections, every, messages }
    }

    /// Connections a run asks for.
    fn requested(ctx: &Ctx) -> usize {
        if ctx.quick {
            2_000
        } else {
            100_000
        }
    }

    /// Aggregate telemetry rate while every connection sends.
    fn rate(&self) -> f64 {
        self.connections as f64 / self.every.as_secs_f64()
    }
}

/// Which server the worker's devices talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// A hubmsg hub: IoT Hub device user names, SAS tokens, D2C topics.
    Hub,
    /// A plain MQTT broker: anonymous, topic `bench/conn/{n}`.
    Mqtt,
}

/// Options of the hidden `hubmsg bench conn-worker`.
#[derive(Args)]
pub struct WorkerArgs {
    /// Server address (`127.0.0.1:port`).
    #[arg(long)]
    server: SocketAddr,
    /// What the server is.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Device key (every bench device has the same one; hub mode).
    #[arg(long, env = "HUBMSG_BENCH_DEVICE_KEY", hide_env_values = true, default_value = "")]
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
    /// Devices across all workers (to spread send phases).
    #[arg(long)]
    total: usize,
    /// Milliseconds between a device's messages.
    #[arg(long)]
    every_ms: u64,
    /// Messages per device.
    #[arg(long)]
    messages: u64,
    /// Connections set up at once.
    #[arg(long, default_value_t = CONCURRENCY)]
    concurrency: usize,
}

/// What every device task of a worker shares.
struct Shared {
    args: WorkerArgs,
    sent: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, e: &Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first_error.lock();
        if f.is_none() {
            *f = Some(e.to_string());
        }
    }
}

/// One raw MQTT connection with a read buffer of a few bytes.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    async fn write(&mut self, p: &Packet) -> Result<(), Error> {
        let mut out = BytesMut::new();
        transport::encode(p, &mut out)?;
        self.stream.write_all(&out).await.map_err(|e| Error::new(ErrorKind::Disconnected, format!("write: {e}")))
    }

    /// The next packet from the server (small packets only: CONNACK, PUBACK, PINGRESP).
    async fn read(&mut self) -> Result<Packet, Error> {
        let fut = async {
            loop {
                match v4::read(&mut self.buf, 64) {
                    Ok(p) => return Ok(p),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => return Err(Error::protocol(format!("from the server: {e}"))),
                }
                self.buf.reserve(16);
                let n = self.stream.read_buf(&mut self.buf).await.map_err(|e| Error::new(ErrorKind::Disconnected, format!("read: {e}")))?;
                if n == 0 {
                    return Err(Error::new(ErrorKind::Disconnected, "the server closed the connection"));
                }
            }
        };
        tokio::time::timeout(ANSWER_WITHIN, fut)
            .await
            .map_err(|_| Error::new(ErrorKind::Timeout, format!("no answer within {ANSWER_WITHIN:?}")))?
    }

    /// Waits for `until`, sending PINGREQ (and reading PINGRESP) every half keep-alive meanwhile.
    async fn idle<T>(&mut self, until: impl std::future::Future<Output = T>) -> Result<T, Error> {
        tokio::pin!(until);
        loop {
            tokio::select! {
                v = &mut until => return Ok(v),
                _ = tokio::time::sleep(KEEP_ALIVE / 2) => {
                    self.write(&Packet::PingReq).await?;
                    match self.read().await? {
                        Packet::PingResp => {}
                        other => return Err(Error::protocol(format!("expected PINGRESP, got {other:?}"))),
                    }
                }
            }
        }
    }
}

async fn connect(shared: &Shared, n: usize) -> Result<Conn, Error> {
    let a = &shared.args;
    let sock = TcpSocket::new_v4().map_err(|e| Error::storage("socket", e))?;
    // The port is chosen at connect time, per 4-tuple, instead of at bind time per address.
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `one` (an int, its size passed) on a socket we own.
    unsafe {
        use std::os::fd::AsRawFd;
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let src = limits::source_addr(n);
    sock.bind(SocketAddr::from((src, 0))).map_err(|e| Error::new(ErrorKind::Disconnected, format!("bind {src}: {e}")))?;
    let stream = tokio::time::timeout(ANSWER_WITHIN, sock.connect(a.server))
        .await
        .map_err(|_| Error::new(ErrorKind::Timeout, format!("connect from {src} took over {ANSWER_WITHIN:?}")))?
        .map_err(|e| Error::new(ErrorKind::Disconnected, format!("connect from {src} to {}: {e}", a.server)))?;
    let _ = stream.set_nodelay(true);
    let mut conn = Conn { stream, buf: BytesMut::with_capacity(16) };
    let id = format!("{}-{n}", a.prefix);
    let mut c = Connect::new(id.clone());
    c.keep_alive = KEEP_ALIVE.as_secs() as u16;
    c.clean_session = false;
    if a.mode == Mode::Hub {
        let host = a.server.to_string();
        let expiry = hubmsg_core::message::now_ms() / 1000 + 3600;
        let token = auth::generate_sas_token(&auth::device_resource_uri(&host, &id), &a.key, expiry, None)?;
        c.set_login(wire::device_username(&host, &id, None), token);
    }
    conn.write(&Packet::Connect(c)).await?;
    match conn.read().await? {
        Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => Ok(conn),
        Packet::ConnAck(ack) => Err(Error::new(ErrorKind::Unauthorized, format!("device {id}: CONNACK {:?}", ack.code))),
        other => Err(Error::protocol(format!("device {id}: expected CONNACK, got {other:?}"))),
    }
}

/// One device after it connected: waits for `go`, sends its messages one `every` apart from its
/// phase, each PUBACK awaited, says so on `done`, then keeps the connection (alive) until the
/// process exits.
async fn device(
    shared: Arc<Shared>,
    n: usize,
    mut conn: Conn,
    mut go: watch::Receiver<Option<tokio::time::Instant>>,
    done: tokio::sync::mpsc::UnboundedSender<()>,
) {
    let a = &shared.args;
    let r = async {
        let t0 = conn.idle(async { go.wait_for(|g| g.is_some()).await.ok().and_then(|g| *g) }).await?;
        let t0 = t0.ok_or_else(|| Error::closed("go signal"))?;
        let every = Duration::from_millis(a.every_ms);
        let phase = every.mul_f64(n as f64 / a.total.max(1) as f64);
        let topic = match a.mode {
            Mode::Hub => wire::d2c_topic(&format!("{}-{n}", a.prefix), ""),
            Mode::Mqtt => format!("bench/conn/{n}"),
        };
        for seq in 0..a.messages {
            tokio::time::sleep_until(t0 + phase + every * seq as u32).await;
            let b = body(Stamp { sent_ns: 0, device: n as u32, seq, scheduled_ns: 0 });
            let mut p = Publish::from_bytes(topic.as_str(), QoS::AtLeastOnce, b);
            p.pkid = p_id(seq);
            conn.write(&Packet::Publish(p)).await?;
            shared.sent.fetch_add(1, Ordering::Relaxed);
            match conn.read().await? {
                Packet::PubAck(ack) if ack.pkid == p_id(seq) => {
                    shared.acked.fetch_add(1, Ordering::Relaxed);
                }
                other => return Err(Error::protocol(format!("expected PUBACK {}, got {other:?}", p_id(seq)))),
            }
        }
        Ok::<(), Error>(())
    }
    .await;
    drop(go);
    if let Err(e) = &r {
        shared.fail(e);
    }
    let _ = done.send(());
    drop(done);
    if r.is_ok() {
        let _ = conn.idle(std::future::pending::<()>()).await;
    }
}

/// The packet id of message `seq` (one in flight at a time, so any non-zero id would do).
fn p_id(seq: u64) -> u16 {
    (seq % u16::MAX as u64) as u16 + 1
}

/// The worker process.
pub async fn worker(a: WorkerArgs) -> Result<(), Error> {
    procstat::raise_nofile();
    let started = Instant::now();
    let count = a.count;
    let shared = Arc::new(Shared {
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        args: a,
    });
    let sem = Arc::new(Semaphore::new(shared.args.concurrency.max(1)));
    let (go_tx, go_rx) = watch::channel(None);
    let (up_tx, mut up_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    for n in shared.args.first..shared.args.first + count {
        let (shared, sem, go, up, done) = (shared.clone(), sem.clone(), go_rx.clone(), up_tx.clone(), done_tx.clone());
        tokio::spawn(async move {
            let conn = {
                let Ok(_permit) = sem.acquire().await else { return };
                connect(&shared, n).await
            };
            match conn {
                Ok(conn) => {
                    let _ = up.send(true);
                    drop(up);
                    device(shared, n, conn, go, done).await;
                }
                Err(e) => {
                    shared.fail(&e);
                    let _ = up.send(false);
                }
            }
        });
    }
    drop((up_tx, done_tx, go_rx));
    let (mut connected, mut failed) = (0u64, 0u64);
    while connected + failed < count as u64 {
        match up_rx.recv().await {
            Some(true) => connected += 1,
            Some(false) => failed += 1,
            None => break,
        }
    }
    let first_error = || shared.first_error.lock().clone().unwrap_or_default();
    say(format!("ready {connected} {failed} {} | {}", started.elapsed().as_millis(), first_error())).await;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(l)) = lines.next_line().await {
        if l.trim() == "go" {
            break;
        }
    }
    let t = Instant::now();
    let _ = go_tx.send(Some(tokio::time::Instant::now()));
    let mut finished = 0;
    while finished < connected {
        if done_rx.recv().await.is_none() {
            break;
        }
        finished += 1;
    }
    let (sent, acked, errors) =
        (shared.sent.load(Ordering::Relaxed), shared.acked.load(Ordering::Relaxed), shared.errors.load(Ordering::Relaxed));
    say(format!("done {sent} {acked} {errors} {} | {}", t.elapsed().as_millis(), first_error())).await;
    while let Ok(Some(l)) = lines.next_line().await {
        if l.trim() == "exit" {
            break;
        }
    }
    // Exit without closing the connections one by one; the server sees them drop.
    std::process::exit(0);
}

async fn say(line: String) {
    let mut stdout = tokio::io::stdout();
    stdout.write_all((line + "\n").as_bytes()).await.ok();
    stdout.flush().await.ok();
}

struct WorkerProc {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl WorkerProc {
    fn spawn(server: SocketAddr, mode: Mode, key: &str, first: usize, count: usize, plan: &Plan) -> Result<WorkerProc, Error> {
        let exe = std::env::current_exe().map_err(|e| Error::new(ErrorKind::Internal, format!("own executable: {e}")))?;
        let mode = match mode {
            Mode::Hub => "hub",
            Mode::Mqtt => "mqtt",
        };
        let mut child = Command::new(exe)
            .args(["bench", "conn-worker", "--server", &server.to_string(), "--mode", mode, "--prefix", "conn"])
            .args(["--first", &first.to_string(), "--count", &count.to_string(), "--total", &plan.connections.to_string()])
            .args(["--every-ms", &plan.every.as_millis().to_string(), "--messages", &plan.messages.to_string()])
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

    /// The next line starting with `word`: its numbers, and the text after ` | `.
    async fn expect(&mut self, word: &str, timeout: Duration) -> Result<(Vec<u64>, String), Error> {
        let fut = async {
            while let Ok(Some(l)) = self.lines.next_line().await {
                if let Some(rest) = l.strip_prefix(word) {
                    let (nums, text) = rest.split_once(" | ").unwrap_or((rest, ""));
                    return Ok((nums.split_whitespace().filter_map(|n| n.parse().ok()).collect(), text.trim().to_string()));
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

/// What one server (hub or broker) did with the plan's connections.
#[derive(Debug, serde::Serialize)]
struct Held {
    server: String,
    connect_s: f64,
    rss_kb: RssReadings,
    rss_per_connection_kib: f64,
    rss_per_connection_before_sending_kib: f64,
    open_fds: (usize, usize),
    cpu: procstat::CpuSplit,
    worker_processes: usize,
    workers_cores: f64,
    workers_rss_kb: u64,
    window_s: f64,
    sent: u64,
    acked: u64,
    counts: Counts,
}

#[derive(Debug, serde::Serialize)]
struct RssReadings {
    idle: u64,
    connected_before_sending: u64,
    end_of_window: u64,
    max_in_window: u64,
}

/// Counts what a consumer received, until it is told to stop.
struct Consumer {
    tracker: Arc<Mutex<IdTracker>>,
    task: tokio::task::JoinHandle<()>,
}

impl Consumer {
    /// A tracker expecting every message of `plan`.
    fn tracker(plan: &Plan) -> Arc<Mutex<IdTracker>> {
        Arc::new(Mutex::new(IdTracker::new(&vec![plan.messages; plan.connections])))
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects the plan's devices to `server` (process `pid`), lets them send, and measures.
async fn hold(name: &str, pid: u32, server: SocketAddr, mode: Mode, key: &str, plan: &Plan, consumer: &Consumer) -> Result<Held, Error> {
    let rss_idle = procstat::rss_kb(pid).unwrap_or(0);
    let fds_idle = open_fds(pid);
    let t = Instant::now();
    let mut workers = Vec::new();
    let mut first = 0;
    while first < plan.connections {
        let count = PER_WORKER.min(plan.connections - first);
        workers.push(WorkerProc::spawn(server, mode, key, first, count, plan)?);
        first += count;
    }
    let (mut connected, mut failed, mut why) = (0u64, 0u64, String::new());
    for w in &mut workers {
        let (v, e) = w.expect("ready", Duration::from_secs(900)).await?;
        connected += v.first().copied().unwrap_or(0);
        failed += v.get(1).copied().unwrap_or(0);
        if why.is_empty() {
            why = e;
        }
    }
    let connect_s = t.elapsed().as_secs_f64();
    let n = plan.connections;
    println!("  {name}: {connected} connections up in {connect_s:.1} s ({failed} failed; {} worker processes)", workers.len());
    if connected < n as u64 {
        return Err(Error::new(ErrorKind::Disconnected, format!("{name}: only {connected} of {n} devices connected; first error: {why}")));
    }
    let fds_connected = open_fds(pid);
    if fds_connected < fds_idle + n {
        return Err(Error::new(
            ErrorKind::Internal,
            format!("{name} holds {fds_connected} file descriptors ({fds_idle} idle); {n} connections should add {n}"),
        ));
    }
    let rss_connected = procstat::rss_kb(pid).unwrap_or(0);
    for w in &mut workers {
        w.tell("go").await?;
    }
    let meters = Meters::start(pid);
    let worker_meters: Vec<CpuMeter> = workers.iter().filter_map(|w| w.child.id()).map(CpuMeter::start).collect();
    let started = Instant::now();
    let mut rss_max = rss_connected;
    let (mut sent, mut acked, mut errors, mut why) = (0, 0, 0, String::new());
    let limit = plan.every * plan.messages as u32 + Duration::from_secs(120);
    for w in &mut workers {
        let fut = w.expect("done", limit);
        tokio::pin!(fut);
        let (v, e) = loop {
            tokio::select! {
                r = &mut fut => break r?,
                _ = tokio::time::sleep(Duration::from_millis(500)) => rss_max = rss_max.max(procstat::rss_kb(pid).unwrap_or(0)),
            }
        };
        sent += v.first().copied().unwrap_or(0);
        acked += v.get(1).copied().unwrap_or(0);
        errors += v.get(2).copied().unwrap_or(0);
        if why.is_empty() {
            why = e;
        }
    }
    let window_s = started.elapsed().as_secs_f64();
    let cpu = meters.finish();
    let workers_cores = stats::round(worker_meters.iter().map(|m| m.finish().cores).sum::<f64>());
    let workers_rss_kb = workers.iter().filter_map(|w| w.child.id()).filter_map(procstat::rss_kb).sum();
    let rss_end = procstat::rss_kb(pid).unwrap_or(0);
    // Everything acknowledged must reach the consumer.
    let complete = super::wait_until(Duration::from_secs(30), Duration::from_millis(20), || consumer.tracker.lock().complete()).await;
    let counts = consumer.tracker.lock().counts();
    for w in &mut workers {
        let _ = w.tell("exit").await;
    }
    for w in &mut workers {
        let _ = w.child.wait().await;
    }
    let per_conn = |rss: u64| stats::round(rss.saturating_sub(rss_idle) as f64 / n as f64);
    let held = Held {
        server: name.to_string(),
        connect_s: stats::round(connect_s),
        rss_kb: RssReadings { idle: rss_idle, connected_before_sending: rss_connected, end_of_window: rss_end, max_in_window: rss_max },
        rss_per_connection_kib: per_conn(rss_end),
        rss_per_connection_before_sending_kib: per_conn(rss_connected),
        open_fds: (fds_idle, fds_connected),
        cpu,
        worker_processes: workers.len(),
        workers_cores,
        workers_rss_kb,
        window_s: stats::round(window_s),
        sent,
        acked,
        counts,
    };
    println!(
        "  {name}: RSS {:.1} MiB idle -> {:.1} MiB with {n} connections ({:.1} KiB each; {:.1} before sending); CPU {:.1} % of a core ({:.1} user, {:.1} system) for {:.0} msg/s; {sent} sent, {acked} acknowledged, {} at the consumer; workers {:.2} cores, {:.0} MiB",
        rss_idle as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        held.rss_per_connection_kib,
        held.rss_per_connection_before_sending_kib,
        held.cpu.server.cores * 100.0,
        held.cpu.server.user_cores * 100.0,
        held.cpu.server.system_cores * 100.0,
        plan.rate(),
        counts.received,
        workers_cores,
        workers_rss_kb as f64 / 1024.0,
    );
    if errors > 0 || acked < n as u64 * plan.messages {
        return Err(Error::new(
            ErrorKind::Internal,
            format!("{name}: {errors} device errors, {acked} of {} messages acknowledged; first error: {why}", n as u64 * plan.messages),
        ));
    }
    if !complete {
        return Err(Error::new(
            ErrorKind::Internal,
            format!("{name}: {} of {} acknowledged messages never reached the consumer", counts.missing, counts.expected),
        ));
    }
    Ok(held)
}

fn rows(name: &str, plan: &Plan, requested: usize, h: &Held, goals: bool) -> Vec<Row> {
    let n = fmt_int(plan.connections);
    let capped = if plan.connections < requested {
        format!(" ({} asked for; the open-file limit allows {n})", fmt_int(requested))
    } else {
        String::new()
    };
    let what = format!("{n} devices x 1 msg / {:.1} s ({} msg/s)", plan.every.as_secs_f64(), fmt_int(plan.rate().round() as usize));
    let mut rss =
        Row::new(Scenario::Connections, format!("{name} RSS per connection, {n} connections{capped}"), h.rss_per_connection_kib, "KiB");
    let mut cpu = Row::new(Scenario::Connections, format!("{name} CPU, {what}"), stats::round(h.cpu.server.cores * 100.0), "% of a core")
        .other_cpu(h.cpu.rest_cores);
    if goals {
        rss = rss.target(Goal::AtMost(RSS_TARGET_KIB));
        cpu = cpu.target(Goal::AtMost(CPU_TARGET_PCT));
    }
    vec![
        rss,
        cpu,
        Row::new(
            Scenario::Connections,
            format!("{name} RSS with {n} connections"),
            stats::round(h.rss_kb.end_of_window as f64 / 1024.0),
            "MiB",
        ),
        Row::new(Scenario::Connections, format!("{name}: {n} connections up"), h.connect_s, "s"),
    ]
}

/// `100,000`.
fn fmt_int(n: usize) -> String {
    super::fmt_value(n as f64)
}

/// Scenario: the plan's connections on a hub, then on Mosquitto.
pub async fn connections(ctx: &Ctx, plots: &mut PlotData) -> Result<Outcome, Error> {
    let requested = Plan::requested(ctx);
    let limits = limits::prepare(requested);
    for c in &limits.checks {
        println!("  kernel: {} = {} (need {}): {}", c.name, c.found, c.need, c.result);
    }
    if let Some(c) = limits.checks.iter().find(|c| !c.ok()) {
        return Err(Error::new(
            ErrorKind::Internal,
            format!("{} is too low for {requested} connections: {}; raise it (as root) and run again", c.name, c.result),
        ));
    }
    if limits.connections == 0 {
        return Err(Error::new(
            ErrorKind::Internal,
            "the open-file limit leaves no room for connections; raise `ulimit -n` (at least 2,000 for a quick run) and run again",
        ));
    }
    let plan = Plan::new(ctx, limits.connections);
    let n = plan.connections;
    if n < requested {
        println!(
            "  the open-file limit allows {} of the {} connections asked for: running {}, each sending every {:.2} s ({} msg/s together)",
            fmt_int(n),
            fmt_int(requested),
            fmt_int(n),
            plan.every.as_secs_f64(),
            fmt_int(plan.rate() as usize)
        );
    }

    // hubmsg
    let hub = Hub::start(ctx, "connections", &[]).await?;
    let svc = common::service(&hub.proc.cs).await?;
    let t = Instant::now();
    let ids = common::device_ids("conn", n);
    common::register(&svc, &ids, &ctx.device_key, 256).await?;
    drop(ids);
    let register_s = t.elapsed().as_secs_f64();
    let tracker = Consumer::tracker(&plan);
    let mut events = common::consumer(&svc, "$Default", StartPosition::Earliest).await?;
    let task = {
        let tracker = tracker.clone();
        tokio::spawn(async move {
            while let Some(Ok(ev)) = events.next().await {
                if let Some(s) = parse_body(&ev.body()) {
                    tracker.lock().record(s.device as usize, s.seq);
                }
                ev.ack();
            }
        })
    };
    let consumer = Consumer { tracker, task };
    let server: SocketAddr = (Ipv4Addr::LOCALHOST, hub.port).into();
    let hub_held = hold("hub", hub.pid(), server, Mode::Hub, &ctx.device_key, &plan, &consumer).await?;
    drop(consumer);
    svc.close().await;
    drop(hub);
    let mut out_rows = rows("hub", &plan, requested, &hub_held, true);
    plots.connections.push(ConnBar {
        label: format!("hubmsg hub, {} connections", fmt_int(n)),
        rss_kib: hub_held.rss_per_connection_kib,
        cpu_pct: hub_held.cpu.server.cores * 100.0,
    });

    // Mosquitto, the same connections in the same run.
    let mosquitto = match tokio::task::spawn_blocking(mosquitto::ensure_installed).await {
        Ok(Ok(bin)) => {
            let dir = ctx.dir("connections-mosquitto")?;
            let broker = mosquitto::start(&bin, &dir).await?;
            let held = mosquitto_hold(&broker, &plan).await?;
            out_rows.extend(rows(&format!("Mosquitto {}", broker.version), &plan, requested, &held, false));
            plots.connections.push(ConnBar {
                label: format!("Mosquitto {} ({}), {} connections", broker.version, broker.setting, fmt_int(n)),
                rss_kib: held.rss_per_connection_kib,
                cpu_pct: held.cpu.server.cores * 100.0,
            });
            json!(held)
        }
        Ok(Err(why)) => {
            println!("  Mosquitto: unavailable: {why}");
            json!({"unavailable": why})
        }
        Err(e) => return Err(Error::new(ErrorKind::Internal, format!("install task: {e}"))),
    };
    Ok(Outcome {
        rows: out_rows,
        detail: json!({
            "requested_connections": requested,
            "plan": plan,
            "kernel_limits": limits.checks,
            "register_s": stats::round(register_s),
            "clients": format!("raw MQTT on hubmsg's codec in worker processes of at most {PER_WORKER} connections ({CONCURRENCY} connecting at a time each), one small task per connection, keep-alive {} s with PINGREQ while idle, each socket bound to its own source address in 127.0.0.0/8 ({} connections per address, IP_BIND_ADDRESS_NO_PORT)", KEEP_ALIVE.as_secs(), limits::PER_SOURCE),
            "consumers": "hub: one $Default consumer-group reader from earliest that acks every event; Mosquitto: one persistent-session subscriber on bench/conn/# (hubmsg transport client) that acks every message",
            "rss_per_connection": "(server VmRSS at the end of the sending window, every connection still open - VmRSS before the first device connected) / connections",
            "hub": hub_held,
            "mosquitto": mosquitto,
        }),
        unavailable: None,
    })
}

async fn mosquitto_hold(broker: &Broker, plan: &Plan) -> Result<Held, Error> {
    let tracker = Consumer::tracker(plan);
    let mut sub = Subscriber::start(ClientKind::Transport, &broker.target, "bench-conn-sub", "bench/conn/#", 1000).await?;
    let task = {
        let tracker = tracker.clone();
        tokio::spawn(async move {
            while let Ok(batch) = sub.next().await {
                let mut t = tracker.lock();
                for s in batch.into_iter().flatten() {
                    t.record(s.device as usize, s.seq);
                }
            }
        })
    };
    let consumer = Consumer { tracker, task };
    let server: SocketAddr = (Ipv4Addr::LOCALHOST, broker.target.port).into();
    hold(&format!("Mosquitto {}", broker.version), broker.pid, server, Mode::Mqtt, "", plan, &consumer).await
}
