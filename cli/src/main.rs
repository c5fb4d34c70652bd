//! `hubmsg`: run a hub, manage device identities, send and monitor messages.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

mod bench;
mod demo;
mod hubproc;
use hubmsg_core::hub::{Hub, HubConfig, TlsFiles};
use hubmsg_core::outbox::OutboxOptions;
use hubmsg_core::proto::AckMode;
use hubmsg_core::proto::StartPosition;
use hubmsg_core::service::{C2dOptions, ServiceClient, ServiceOptions};
use hubmsg_core::store::Durability;
use hubmsg_core::transport::TlsOptions;
use hubmsg_core::{DeviceClient, DeviceOptions, Error, Message, Overflow};

/// mimalloc instead of the system allocator: the message path allocates many small, short-lived
/// strings and buffers, and glibc's malloc cost about a quarter more CPU per message in the
/// D2C loop profile (`core/examples/d2c_loop.rs`, see docs/benchmarks/README.md). Built with
/// mimalloc's `no_thp` (workspace `Cargo.toml`): no transparent huge pages for its arenas.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "hubmsg", version, about = "Reliable device <-> cloud messaging in the style of Azure IoT Hub")]
struct Cli {
    /// Longest wait between reconnect attempts of the clients this command runs (devices and
    /// services): backoff starts at a tenth of it (at most 1 s) and doubles up to it. Default 60 s.
    #[arg(long, global = true, value_parser = parse_duration)]
    retry_max_delay: Option<Duration>,
    #[command(subcommand)]
    command: Command,
}

/// The reconnect policy of the clients this process runs (`--retry-max-delay`).
static RETRY: std::sync::OnceLock<hubmsg_core::retry::RetryPolicy> = std::sync::OnceLock::new();

fn retry_policy() -> hubmsg_core::retry::RetryPolicy {
    RETRY.get().cloned().unwrap_or_default()
}

fn set_retry_max_delay(max: Option<Duration>) {
    let policy = match max {
        None => hubmsg_core::retry::RetryPolicy::default(),
        Some(max) => {
            let step = (max / 10).clamp(Duration::from_millis(1), Duration::from_secs(1));
            hubmsg_core::retry::RetryPolicy {
                initial_delay: step,
                max_delay: max,
                jitter: step,
                healthy_after: (max * 2).min(Duration::from_secs(10)),
                ..Default::default()
            }
        }
    };
    let _ = RETRY.set(policy);
}

#[derive(Subcommand)]
enum Command {
    /// Run a hub (writes the iothubowner connection string to a 0600 file in its data
    /// directory; prints it only on the first start).
    Hub(HubArgs),
    /// List or regenerate the hub's shared access policy keys (needs an owner policy).
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Manage device identities.
    DeviceIdentity {
        #[command(subcommand)]
        action: IdentityAction,
    },
    /// Act as a device.
    Device {
        #[command(subcommand)]
        action: DeviceAction,
    },
    /// Print D2C events as they arrive, one line each.
    MonitorEvents(MonitorArgs),
    /// Cloud-to-device messages.
    C2d {
        #[command(subcommand)]
        action: C2dAction,
    },
    /// Print feedback records (C2D outcomes) as JSON lines.
    MonitorFeedback(MonitorFeedbackArgs),
    /// Show D2C end to end: a hub, simulated devices and a consumer, with an accounting table.
    Demo(demo::DemoArgs),
    /// Measure throughput, latency, connections and recovery, with Mosquitto, RabbitMQ and NATS as baselines in the same run.
    Bench(bench::BenchArgs),
    /// Inspect or repair a data directory (a hub's, a device outbox, or one store).
    Store {
        #[command(subcommand)]
        action: StoreAction,
    },
}

#[derive(Subcommand)]
enum StoreAction {
    /// Report what every store under DIR holds and what is damaged (reads everything, changes
    /// nothing; exit status 1 if anything is damaged).
    Check {
        /// The data directory.
        dir: PathBuf,
    },
    /// Move damaged segments aside into `quarantine/` (never deleted), keep every valid record,
    /// and accept the lost ranges so the stores open again. Refuses stores in use.
    Repair {
        /// The data directory.
        dir: PathBuf,
    },
}

#[derive(Args)]
struct HubArgs {
    /// Data directory (registry, event log, checkpoints, generated TLS files).
    #[arg(long)]
    data: PathBuf,
    /// Plain MQTT listener address.
    #[arg(long, default_value = "127.0.0.1:1883", conflicts_with = "no_mqtt")]
    mqtt: SocketAddr,
    /// No plain MQTT listener: TLS only (needs --mqtts).
    #[arg(long, requires = "mqtts")]
    no_mqtt: bool,
    /// Most connections open at once; past it new ones get CONNACK 3 and are closed.
    #[arg(long, default_value_t = 20_000)]
    max_connections: usize,
    /// MQTT over TLS listener address (a self-signed certificate is generated without --cert/--key).
    #[arg(long)]
    mqtts: Option<SocketAddr>,
    /// Certificate chain PEM for --mqtts.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Private key PEM for --mqtts.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// D2C partitions (fixed when the data directory is created).
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Store durability: always, interval[:250ms], never.
    #[arg(long, default_value = "always")]
    durability: String,
    /// Host name to print in connection strings.
    #[arg(long, default_value = "127.0.0.1")]
    host_name: String,
    /// C2D feedback batching (IoT Hub's rule): a batch goes out when 64 records accumulated or
    /// this long after the previous batch, whichever first.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    feedback_interval: Duration,
    /// How often expiries, lock timeouts and feedback batches held back by the interval are
    /// checked (outcomes form batches as they are recorded; this is the fallback).
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    sweep_interval: Duration,
    /// Where durable state lives: `embedded` (the data directory, the default) or a NATS
    /// JetStream cluster `nats://HOST:PORT[,nats://HOST:PORT…]` (server 2.11+ with JetStream;
    /// any number of hub nodes may share it).
    #[arg(long, default_value = "embedded")]
    backend: String,
    /// D2C retention by size per partition in bytes (a JetStream cluster reserves it per
    /// partition stream).
    #[arg(long, default_value_t = 10 * 1024 * 1024 * 1024)]
    retention_bytes: u64,
    /// Replicas of JetStream streams, buckets and consumers (3 for a 3-node cluster, 1 for a
    /// single server).
    #[arg(long, default_value_t = 3)]
    replicas: usize,
    /// `host:port` devices and services reach the hub by when that is not one of its own
    /// listeners: a TCP load balancer in front of the hub nodes, a proxy or a port forward
    /// (repeatable; tokens may name any; printed connection strings use the first).
    #[arg(long = "public-address")]
    public_addresses: Vec<String>,
    /// With a NATS backend: lease of consumer-group members, partition owners and the expiry
    /// sweeper (a dead node's partitions move after about this long).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    lease_ttl: Duration,
    /// Operations endpoint (`/healthz`, `/readyz`, Prometheus `/metrics`), e.g. 127.0.0.1:9090;
    /// off by default.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// On SIGTERM, how long sessions get to send the PUBACKs they owe before they are closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    drain_timeout: Duration,
}

#[derive(Args, Clone)]
struct HubConn {
    /// Service (policy) connection string.
    #[arg(long, env = "HUBMSG_HUB_CONNECTION_STRING", hide_env_values = true)]
    hub_connection_string: String,
    /// CA certificate to trust (turns TLS on).
    #[arg(long)]
    ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum PolicyAction {
    /// Print every policy (name, rights, keys) as JSON lines.
    List(HubConn),
    /// Regenerate a policy's keys and print the policy.
    Regenerate {
        /// Policy name (iothubowner, service, device, registryRead, registryReadWrite).
        #[arg(long)]
        name: String,
        /// Which key: primary, secondary or both.
        #[arg(long, default_value = "primary")]
        key: String,
        #[command(flatten)]
        hub: HubConn,
    },
}

#[derive(Subcommand)]
enum IdentityAction {
    /// Register a device.
    Create(IdArgs),
    /// Show a device identity as JSON.
    Show(IdArgs),
    /// List device identities as JSON lines.
    List(HubConn),
    /// Delete a device.
    Delete(IdArgs),
    /// Print a device's connection string.
    ConnectionString(IdArgs),
}

#[derive(Args)]
struct IdArgs {
    /// Device id.
    #[arg(long)]
    device_id: String,
    #[command(flatten)]
    hub: HubConn,
}

#[derive(Subcommand)]
enum DeviceAction {
    /// Send D2C messages and wait for delivery.
    Send(SendArgs),
    /// Receive C2D messages and complete (or reject / abandon) them.
    Receive(ReceiveArgs),
}

#[derive(Subcommand)]
enum C2dAction {
    /// Send a C2D message to a device.
    Send(C2dSendArgs),
    /// Remove every pending C2D message of a device.
    Purge(IdArgs),
}

#[derive(Args)]
struct C2dSendArgs {
    /// Target device.
    #[arg(long)]
    device_id: String,
    /// Message body.
    #[arg(long)]
    data: String,
    /// Feedback: none, positive, negative, full.
    #[arg(long, default_value = "none")]
    ack: String,
    /// Time to live, e.g. 60s, 5m, 1h (default 1 h, at most 48 h).
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// Application property `name=value` (repeatable).
    #[arg(long = "prop", value_parser = parse_prop)]
    props: Vec<(String, String)>,
    /// Message id (default: a UUID; `{i}` is replaced by the message number).
    #[arg(long)]
    message_id: Option<String>,
    /// How many messages (`{i}` in --data and --message-id is replaced by the number); more
    /// than one waits and retries while the device's queue is full. Prints one receipt each.
    #[arg(long, default_value_t = 1, conflicts_with = "wait")]
    count: u64,
    /// Number of the first message.
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Messages per second at most (0: as fast as the hub answers).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Wait for the feedback outcome and print it (implies --ack full unless given).
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    wait_timeout: Duration,
    #[command(flatten)]
    hub: HubConn,
}

#[derive(Args)]
struct ReceiveArgs {
    /// Device connection string.
    #[arg(long, env = "HUBMSG_DEVICE_CONNECTION_STRING", hide_env_values = true)]
    connection_string: String,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Exit after this long without a message.
    #[arg(long, value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// Reject every message instead of completing it.
    #[arg(long, conflicts_with = "abandon")]
    reject: bool,
    /// Abandon every message instead of completing it.
    #[arg(long)]
    abandon: bool,
    /// Reject this percentage of the messages, picked at random (the rest are completed,
    /// or abandoned per --abandon-percent).
    #[arg(long, default_value_t = 0, conflicts_with_all = ["reject", "abandon"], value_parser = clap::value_parser!(u64).range(0..=100))]
    reject_percent: u64,
    /// Abandon this percentage of the messages, picked at random.
    #[arg(long, default_value_t = 0, conflicts_with_all = ["reject", "abandon"], value_parser = clap::value_parser!(u64).range(0..=100))]
    abandon_percent: u64,
    /// Durable state directory (outbox and completed-id window; default: the device's default
    /// outbox directory, `$HUBMSG_OUTBOX_DIR/<host name>/<device id>` or `~/.local/state/hubmsg/outbox/<host name>/<device id>`).
    #[arg(long, conflicts_with = "in_memory")]
    outbox: Option<PathBuf>,
    /// Keep the outbox and completed ids in memory only (lost when the process ends).
    #[arg(long)]
    in_memory: bool,
    /// CA certificate to trust (turns TLS on).
    #[arg(long)]
    ca: Option<PathBuf>,
}

#[derive(Args)]
struct MonitorFeedbackArgs {
    /// Exit after this many records.
    #[arg(long)]
    count: Option<u64>,
    /// Exit after this long without a batch.
    #[arg(long, value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    #[command(flatten)]
    hub: HubConn,
}

#[derive(Args)]
struct SendArgs {
    /// Device connection string.
    #[arg(long, env = "HUBMSG_DEVICE_CONNECTION_STRING", hide_env_values = true)]
    connection_string: String,
    /// Message body (`{i}` is replaced by the message number).
    #[arg(long)]
    data: String,
    /// How many messages.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Number of the first message (for `{i}` and message ids).
    #[arg(long, default_value_t = 0)]
    start: u64,
    /// Application property `name=value` (repeatable).
    #[arg(long = "prop", value_parser = parse_prop)]
    props: Vec<(String, String)>,
    /// Durable outbox directory (default: the device's default outbox directory,
    /// `$HUBMSG_OUTBOX_DIR/<host name>/<device id>` or `~/.local/state/hubmsg/outbox/<host name>/<device id>`).
    #[arg(long, conflicts_with = "in_memory")]
    outbox: Option<PathBuf>,
    /// Keep the outbox in memory only: messages not yet delivered are lost when the process ends.
    #[arg(long)]
    in_memory: bool,
    /// Outbox durability: always, interval[:250ms], never.
    #[arg(long, default_value = "always")]
    durability: String,
    /// Overflow policy: reject or drop_oldest.
    #[arg(long, default_value = "reject")]
    overflow: String,
    /// Message id prefix (message i gets `{prefix}{i}`; default: random UUIDs).
    #[arg(long)]
    message_id_prefix: Option<String>,
    /// Print `accepted <message-id>` once each message is durable in the outbox.
    #[arg(long)]
    print_accepted: bool,
    /// Messages queued per durability wait.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Messages per second at most (0: as fast as the outbox takes them).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// How long to wait for delivery before exiting (messages stay in a durable outbox).
    #[arg(long, default_value = "60")]
    flush_timeout_secs: u64,
    /// CA certificate to trust (turns TLS on).
    #[arg(long)]
    ca: Option<PathBuf>,
}

#[derive(Args)]
struct MonitorArgs {
    /// Consumer group.
    #[arg(long, default_value = "$Default")]
    consumer_group: String,
    /// Where to start: checkpoint, earliest, latest, seq:N, time:MS.
    #[arg(long, default_value = "checkpoint")]
    from: String,
    /// Exit after this many events.
    #[arg(long)]
    count: Option<u64>,
    /// Exit after this many seconds without an event.
    #[arg(long)]
    idle_timeout_secs: Option<u64>,
    /// Print full JSON lines (default: compact text).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    hub: HubConn,
}

/// Parses `500ms`, `60s`, `5m`, `1h` (a bare number means seconds).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a duration like 500ms, 60s, 5m, 1h"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("'{s}': unit must be ms, s, m or h")),
    })
}

/// Keeps a loop at `rate` items per second (0: no limit): waits until `done` items are due.
struct Pace {
    started: tokio::time::Instant,
    rate: u64,
}

impl Pace {
    fn new(rate: u64) -> Pace {
        Pace { started: tokio::time::Instant::now(), rate }
    }

    async fn wait(&self, done: u64) {
        if self.rate > 0 {
            tokio::time::sleep_until(self.started + Duration::from_secs_f64(done as f64 / self.rate as f64)).await;
        }
    }
}

fn parse_prop(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("'{s}' is not name=value"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("HUBMSG_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    set_retry_max_delay(cli.retry_max_delay);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hubmsg: error [{}]: {e}", e.kind());
            ExitCode::from(match e.kind() {
                hubmsg_core::ErrorKind::InvalidArgument | hubmsg_core::ErrorKind::Usage => 2,
                _ => 1,
            })
        }
    }
}

async fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Hub(a) => run_hub(a).await,
        Command::DeviceIdentity { action } => identity(action).await,
        Command::Policy { action: PolicyAction::List(hub) } => {
            for p in service(&hub).await?.list_policies().await? {
                print(&p);
            }
            Ok(())
        }
        Command::Policy { action: PolicyAction::Regenerate { name, key, hub } } => {
            print(&service(&hub).await?.regenerate_policy_key(&name, &key).await?);
            Ok(())
        }
        Command::Device { action: DeviceAction::Send(a) } => send(a).await,
        Command::Device { action: DeviceAction::Receive(a) } => receive(a).await,
        Command::C2d { action: C2dAction::Send(a) } => c2d_send(a).await,
        Command::C2d { action: C2dAction::Purge(a) } => {
            let n = service(&a.hub).await?.purge_c2d(&a.device_id).await?;
            print(&serde_json::json!({ "deviceId": a.device_id, "totalMessagesPurged": n }));
            Ok(())
        }
        Command::MonitorFeedback(a) => monitor_feedback(a).await,
        Command::MonitorEvents(a) => monitor(a).await,
        Command::Demo(a) => demo::run(a).await,
        Command::Bench(a) => bench::run(a).await,
        Command::Store { action } => store(action),
    }
}

fn store(action: StoreAction) -> Result<(), Error> {
    let (report, repairing) = match action {
        StoreAction::Check { dir } => (hubmsg_core::store::check::check(&dir)?, false),
        StoreAction::Repair { dir } => (hubmsg_core::store::check::repair(&dir)?, true),
    };
    println!("{report}");
    if report.is_clean() {
        return Ok(());
    }
    let what =
        if repairing { "damage remains after the repair (see above)" } else { "damage found; `hubmsg store repair DIR` moves it aside" };
    Err(Error::new(hubmsg_core::ErrorKind::Storage, what))
}

async fn run_hub(a: HubArgs) -> Result<(), Error> {
    let mut config = HubConfig::new(&a.data);
    config.mqtt = if a.no_mqtt { None } else { Some(a.mqtt) };
    config.max_connections = a.max_connections;
    config.mqtts = a.mqtts;
    config.tls = a.cert.zip(a.key).map(|(cert, key)| TlsFiles { cert, key });
    config.partitions = a.partitions;
    config.durability = a.durability.parse()?;
    config.host_name = a.host_name;
    config.feedback_interval = a.feedback_interval;
    if a.sweep_interval.is_zero() {
        return Err(Error::invalid("--sweep-interval must be at least 1ms"));
    }
    config.sweep_interval = a.sweep_interval;
    config.http = a.http;
    config.retention_bytes = a.retention_bytes;
    config.public_addresses = a.public_addresses;
    config.backend = backend(&a.backend, a.replicas, a.lease_ttl)?;
    let hub = Hub::start(config).await?;
    if let Some(addr) = hub.mqtt_addr() {
        println!("mqtt listening on {addr}");
    }
    if let Some(addr) = hub.mqtts_addr() {
        println!("mqtts listening on {addr} (CA file: {})", hub.ca_file().map(|p| p.display().to_string()).unwrap_or_default());
    }
    if let Some(addr) = hub.http_addr() {
        println!("http listening on {addr} (/healthz, /readyz, /metrics)");
    }
    println!("backend {}", hub.backend().kind());
    // The owner key goes to a 0600 file, not to the output (logs, terminals, CI transcripts);
    // only the very first start shows it once.
    if hub.write_owner_connection_string()? {
        println!("HUBMSG_HUB_CONNECTION_STRING={}", hub.service_connection_string());
        println!("(shown once; kept in {})", hub.owner_file().display());
    }
    println!("HUBMSG_HUB_CONNECTION_STRING_FILE={}", hub.owner_file().display());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::new(hubmsg_core::ErrorKind::Internal, format!("signal handler: {e}")))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            eprintln!("hubmsg: shutting down");
            hub.shutdown().await
        }
        _ = term.recv() => {
            // Graceful drain: not ready, no new connections, PUBACKs owed go out, sessions close
            // so devices reconnect to another node.
            eprintln!("hubmsg: SIGTERM: draining (up to {:?})", a.drain_timeout);
            hub.drain(a.drain_timeout).await
        }
    }
}

/// The backend `--backend` names.
fn backend(
    spec: &str,
    replicas: usize,
    lease_ttl: Duration,
) -> Result<Option<std::sync::Arc<dyn hubmsg_core::hub::backend::BackendConnector>>, Error> {
    if spec == "embedded" {
        return Ok(None);
    }
    if spec.starts_with("nats://") || spec.starts_with("tls://") {
        #[cfg(feature = "nats")]
        {
            let mut c = hubmsg_nats::NatsConnector::new(spec);
            c.config.replicas = replicas;
            c.config.lease_ttl = lease_ttl;
            return Ok(Some(std::sync::Arc::new(c)));
        }
        #[cfg(not(feature = "nats"))]
        {
            let _ = (replicas, lease_ttl);
            return Err(Error::invalid("this hubmsg was built without the NATS backend (cargo feature `nats` of hubmsg-cli)"));
        }
    }
    Err(Error::invalid(format!("--backend '{spec}' is neither 'embedded' nor nats://HOST:PORT[,…]")))
}

async fn service(hub: &HubConn) -> Result<ServiceClient, Error> {
    let mut opts = ServiceOptions::from_connection_string(&hub.hub_connection_string)?;
    opts.tls = hub.ca.clone().map(|ca| TlsOptions { ca_file: Some(ca) });
    opts.retry = hubmsg_core::retry::RetryPolicy { max_elapsed: Some(Duration::from_secs(30)), ..retry_policy() };
    ServiceClient::connect(opts).await
}

async fn identity(action: IdentityAction) -> Result<(), Error> {
    match action {
        IdentityAction::Create(a) => print(&service(&a.hub).await?.create_device(&a.device_id).await?),
        IdentityAction::Show(a) => print(&service(&a.hub).await?.get_device(&a.device_id).await?),
        IdentityAction::List(hub) => {
            for d in service(&hub).await?.list_devices().await? {
                print(&d);
            }
        }
        IdentityAction::Delete(a) => {
            service(&a.hub).await?.delete_device(&a.device_id).await?;
            println!("deleted {}", a.device_id);
        }
        IdentityAction::ConnectionString(a) => {
            let svc = service(&a.hub).await?;
            let d = svc.get_device(&a.device_id).await?;
            println!("{}", svc.device_connection_string(&d));
        }
    }
    Ok(())
}

fn print<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string(v).expect("serializes"));
}

async fn send(a: SendArgs) -> Result<(), Error> {
    let mut opts = DeviceOptions::from_connection_string(&a.connection_string)?;
    opts.retry = retry_policy();
    opts.tls = a.ca.clone().map(|ca| TlsOptions { ca_file: Some(ca) });
    opts.outbox = OutboxOptions {
        dir: a.outbox.clone(),
        in_memory: a.in_memory,
        durability: a.durability.parse::<Durability>()?,
        overflow: a.overflow.parse::<Overflow>()?,
        ..OutboxOptions::default()
    };
    let client = DeviceClient::connect(opts).await?;
    let mut i = a.start;
    let end = a.start + a.count;
    let pace = Pace::new(a.rate);
    while i < end {
        pace.wait(i - a.start).await;
        let n = (a.batch.max(1) as u64).min(end - i);
        let msgs: Vec<Message> = (i..i + n)
            .map(|k| {
                let mut m = Message::new(a.data.replace("{i}", &k.to_string()));
                if let Some(p) = &a.message_id_prefix {
                    m.message_id = Some(format!("{p}{k}"));
                }
                m.properties.extend(a.props.iter().cloned());
                m
            })
            .collect();
        let deliveries = client.send_batch(msgs).await?;
        if a.print_accepted {
            let mut out = String::new();
            for d in &deliveries {
                out.push_str("accepted ");
                out.push_str(&d.message_id);
                out.push('\n');
            }
            use std::io::Write;
            let mut so = std::io::stdout().lock();
            let _ = so.write_all(out.as_bytes());
            let _ = so.flush();
        }
        i += n;
    }
    let flushed = client.flush(Duration::from_secs(a.flush_timeout_secs)).await;
    let stats = client.stats();
    client.close().await?;
    flushed?;
    eprintln!(
        "sent {} messages: delivered {}, expired {}, dropped {}, pending {}",
        a.count, stats.outbox.delivered, stats.outbox.expired, stats.outbox.dropped, stats.outbox.depth
    );
    Ok(())
}

async fn c2d_send(a: C2dSendArgs) -> Result<(), Error> {
    let svc = service(&a.hub).await?;
    let mut ack: AckMode = a.ack.parse()?;
    if a.count != 1 {
        let pace = Pace::new(a.rate);
        for i in a.start..a.start + a.count {
            pace.wait(i - a.start).await;
            let n = i.to_string();
            let mut m = Message::new(a.data.replace("{i}", &n));
            m.message_id = a.message_id.as_ref().map(|id| id.replace("{i}", &n));
            m.properties.extend(a.props.iter().cloned());
            let receipt = loop {
                match svc.send_c2d_with(&a.device_id, m.clone(), C2dOptions { ack, ttl: a.ttl }).await {
                    Ok(r) => break r,
                    // The device has 50 pending: wait for it to work some off.
                    Err(e) if e.kind() == hubmsg_core::ErrorKind::QueueFull => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(e) => return Err(e),
                }
            };
            print(&receipt);
        }
        svc.close().await;
        return Ok(());
    }
    let mut m = Message::new(a.data.replace("{i}", &a.start.to_string()));
    m.message_id = a.message_id.as_ref().map(|id| id.replace("{i}", &a.start.to_string()));
    m.properties.extend(a.props.iter().cloned());
    if a.wait {
        if ack == AckMode::None {
            ack = AckMode::Full;
        }
        let id = m.message_id.get_or_insert_with(|| uuid::Uuid::new_v4().to_string()).clone();
        let outcome = svc.await_outcome(&id)?;
        let receipt = svc.send_c2d_with(&a.device_id, m, C2dOptions { ack, ttl: a.ttl }).await?;
        eprintln!("queued {} as #{}; waiting for feedback", receipt.message_id, receipt.sequence_number);
        let record = tokio::time::timeout(a.wait_timeout, outcome)
            .await
            .map_err(|_| Error::new(hubmsg_core::ErrorKind::Timeout, format!("no feedback within {:?}", a.wait_timeout)))?
            .map_err(|_| Error::closed("service client"))?;
        print(&record);
    } else {
        let receipt = svc.send_c2d_with(&a.device_id, m, C2dOptions { ack, ttl: a.ttl }).await?;
        print(&receipt);
    }
    svc.close().await;
    Ok(())
}

async fn receive(a: ReceiveArgs) -> Result<(), Error> {
    let mut opts = DeviceOptions::from_connection_string(&a.connection_string)?;
    opts.retry = retry_policy();
    opts.tls = a.ca.clone().map(|ca| TlsOptions { ca_file: Some(ca) });
    opts.outbox.dir = a.outbox.clone();
    opts.outbox.in_memory = a.in_memory;
    let client = DeviceClient::connect(opts).await?;
    let mut rx = client.c2d()?;
    let idle = a.idle_timeout.unwrap_or(Duration::from_secs(u64::MAX / 4));
    let mut rng = hubmsg_cli::chaos::Rng(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()),
    );
    let mut n = 0u64;
    while a.count.is_none_or(|c| n < c) {
        let Some(m) = rx.recv_timeout(idle).await? else { break };
        let draw = rng.below(100);
        let action = if a.reject || draw < a.reject_percent {
            "reject"
        } else if a.abandon || draw < a.reject_percent + a.abandon_percent {
            "abandon"
        } else {
            "complete"
        };
        let line = serde_json::json!({
            "messageId": m.message.message_id,
            "sequenceNumber": m.sequence_number,
            "action": action,
            "body": String::from_utf8_lossy(&m.message.body),
            "properties": m.message.properties.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "systemProperties": m.message.system.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        });
        {
            // Printed (and flushed) before the settle, so whoever reads it knows the app saw it.
            use std::io::Write;
            let mut so = std::io::stdout().lock();
            let _ = writeln!(so, "{line}");
            let _ = so.flush();
        }
        match action {
            "reject" => m.reject()?,
            "abandon" => m.abandon()?,
            _ => m.complete()?,
        }
        n += 1;
    }
    // Give settles a moment to reach the hub before closing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    client.close().await
}

async fn monitor_feedback(a: MonitorFeedbackArgs) -> Result<(), Error> {
    let svc = service(&a.hub).await?;
    let mut fb = svc.feedback()?;
    let idle = a.idle_timeout.unwrap_or(Duration::from_secs(u64::MAX / 4));
    let mut n = 0u64;
    while a.count.is_none_or(|c| n < c) {
        let Some(batch) = fb.next_timeout(idle).await? else { break };
        for r in &batch.records {
            print(r);
            n += 1;
        }
        batch.ack();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    svc.close().await;
    Ok(())
}

async fn monitor(a: MonitorArgs) -> Result<(), Error> {
    let from: StartPosition = a.from.parse()?;
    let svc = service(&a.hub).await?;
    let mut events = svc.events(&a.consumer_group, from).await?;
    let mut seen = 0u64;
    let idle = a.idle_timeout_secs.map(Duration::from_secs).unwrap_or(Duration::from_secs(u64::MAX / 4));
    use std::io::Write;
    let stdout = std::io::stdout();
    while a.count.is_none_or(|c| seen < c) {
        let Some(ev) = events.next_timeout(idle).await? else { break };
        let line = if a.json {
            event_json(&ev).to_string()
        } else {
            format!("{} [p{} #{}] {}", ev.device_id(), ev.partition, ev.sequence_number, String::from_utf8_lossy(&ev.body()))
        };
        {
            let mut so = stdout.lock();
            let _ = writeln!(so, "{line}");
            let _ = so.flush();
        }
        ev.ack();
        seen += 1;
    }
    events.checkpoint().await?;
    events.close().await;
    Ok(())
}

fn event_json(ev: &hubmsg_core::service::Event) -> serde_json::Value {
    let m = ev.message();
    let body = match std::str::from_utf8(&m.body) {
        Ok(s) => serde_json::Value::String(s.to_string()),
        Err(_) => serde_json::json!({ "base64": base64_encode(&m.body) }),
    };
    let mut sys = serde_json::Map::new();
    for (k, v) in [
        ("messageId", &m.message_id),
        ("correlationId", &m.correlation_id),
        ("userId", &m.user_id),
        ("contentType", &m.content_type),
        ("contentEncoding", &m.content_encoding),
    ] {
        if let Some(v) = v {
            sys.insert(k.into(), v.clone().into());
        }
    }
    if let Some(t) = m.creation_time_ms {
        sys.insert("creationTimeUtc".into(), hubmsg_core::wire::format_time_ms(t).into());
    }
    for (k, v) in &m.system {
        sys.insert(k.clone(), v.clone().into());
    }
    let props: serde_json::Map<String, serde_json::Value> = m.properties.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
    serde_json::json!({
        "deviceId": ev.device_id(),
        "partition": ev.partition,
        "sequenceNumber": ev.sequence_number,
        "enqueuedTimeMs": ev.enqueued_time_ms(),
        "body": body,
        "properties": props,
        "systemProperties": sys,
    })
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}
