//! The hub: an MQTT 3.1.1 server that speaks the IoT Hub device protocol to devices and the
//! hubmsg service contract (`docs/protocol.md`) to services, over TCP and TLS listeners.
//!
//! - identity registry with per-device keys and hub-level policies ([`registry`]);
//! - D2C events appended to a partitioned durable log, PUBACKed only once durable ([`events`]);
//! - consumer groups with durable checkpoints for services.
//!
//! Embeddable with [`Hub::start`]; the `hubmsg hub` command runs it as a process.
//!
//! Invariants: a PUBACK for a D2C message is written only after the message is durable in its
//! partition; a misbehaving connection is closed without affecting any other; one connection per
//! device identity (a new one drops the old).

pub mod c2d;
pub mod events;
pub mod guard;
pub mod registry;
mod session;
pub mod tls;

/// Pure pieces of the hub's packet handling, exposed for the fuzz targets in `fuzz/`.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::session::d2c_message;
}

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::auth::ConnectionString;
use crate::error::{Error, ErrorKind, Result};
use crate::proto::{CreateDevice, DeviceIdentity};
use crate::store::Durability;

pub use registry::{Policy, Registry, Right};
pub use tls::TlsFiles;

/// Hub settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Where the hub keeps everything (registry, event log, checkpoints, generated TLS files).
    pub data_dir: PathBuf,
    /// Host name put in printed connection strings (default `127.0.0.1`).
    pub host_name: String,
    /// More names tokens and user names may carry (`host` or `host:port`), for clients that
    /// reach the hub through a proxy, port forward or load balancer under another name or port.
    /// Default none: only `host_name`, alone or with a listener's port.
    pub host_aliases: Vec<String>,
    /// Plain MQTT listener (local use; Azure has none). Port 0 picks a free port.
    pub mqtt: Option<SocketAddr>,
    /// MQTT over TLS listener.
    pub mqtts: Option<SocketAddr>,
    /// Certificate and key for `mqtts`; `None` generates a self-signed one in `data_dir/tls`.
    pub tls: Option<TlsFiles>,
    /// D2C partitions (fixed when the data directory is created). Default 4.
    pub partitions: u32,
    /// Durability of every store. Default `Always`.
    pub durability: Durability,
    /// Event log segment size. Default 64 MiB.
    pub segment_bytes: u64,
    /// Drop events older than this. Default 1 day.
    pub retention_age: Duration,
    /// Keep at most about this many bytes per partition. Default 10 GiB.
    pub retention_bytes: u64,
    /// How often retention runs. Default 60 s.
    pub retention_interval: Duration,
    /// How often acknowledged consumer positions are persisted. Default 50 ms.
    pub checkpoint_interval: Duration,
    /// Time a new connection has (from the TCP accept, TLS handshake included) to send its
    /// CONNECT; it is read with a buffer of at most 8 KB. Default 5 s.
    pub connect_timeout: Duration,
    /// Most connections open at once (authenticated or not); past it a new connection gets
    /// CONNACK 3 (server unavailable) and is closed. Default 20,000.
    pub max_connections: usize,
    /// Longest time one write to a peer may take; a peer that does not read is closed after it.
    /// Default 10 s.
    pub write_timeout: Duration,
    /// TCP keep-alive and user timeout on every accepted socket.
    pub socket: crate::transport::SocketTuning,
    /// D2C messages (QoS 0 and 1) one device session may have appended but not yet durable;
    /// past it the hub stops reading from that device. Default 1,000.
    pub session_pending_messages: usize,
    /// Bytes of such messages per device session. Default 4 MiB.
    pub session_pending_bytes: usize,
    /// Bytes of such messages across the hub; while used up, no session reads. Default 256 MiB.
    pub hub_pending_bytes: usize,
    /// Payload bytes of unacknowledged events one consumer connection may have in flight (on
    /// top of the per-partition `window` count), so large events cannot make a consumer — or
    /// the hub writing to it — hold gigabytes. Default 8 MiB.
    pub consumer_window_bytes: usize,
    /// A consumer with events outstanding that acknowledges none for this long is closed, so
    /// its partitions move to the other members of its group. Default 60 s.
    pub consumer_stall_timeout: Duration,
    /// C2D queue limits (50 per device, 60 s lock, max delivery 10, TTL 1 h / 48 h, 64 KB).
    pub c2d: c2d::C2dLimits,
    /// Unacknowledged C2D messages in flight to one device connection. Default 10.
    pub c2d_window: usize,
    /// A feedback batch forms once its oldest record waited this long (or 64 accumulated).
    /// Default 15 s (IoT Hub); lower it for fast tests.
    pub feedback_interval: Duration,
    /// Feedback batches not acknowledged within this time are dropped (counted). Default 1 h.
    pub feedback_ttl: Duration,
    /// How often expiries, lock timeouts and feedback batching are checked. Default 100 ms.
    pub sweep_interval: Duration,
}

impl HubConfig {
    /// Defaults with data in `data_dir` and a plain listener on `127.0.0.1:0`.
    pub fn new(data_dir: impl Into<PathBuf>) -> HubConfig {
        HubConfig {
            data_dir: data_dir.into(),
            host_name: "127.0.0.1".into(),
            host_aliases: Vec::new(),
            mqtt: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            mqtts: None,
            tls: None,
            partitions: 4,
            durability: Durability::Always,
            segment_bytes: 64 * 1024 * 1024,
            retention_age: Duration::from_secs(86_400),
            retention_bytes: 10 * 1024 * 1024 * 1024,
            retention_interval: Duration::from_secs(60),
            checkpoint_interval: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(5),
            max_connections: 20_000,
            write_timeout: Duration::from_secs(10),
            socket: crate::transport::SocketTuning::default(),
            session_pending_messages: 1000,
            session_pending_bytes: 4 * 1024 * 1024,
            hub_pending_bytes: 256 * 1024 * 1024,
            consumer_window_bytes: 8 * 1024 * 1024,
            consumer_stall_timeout: Duration::from_secs(60),
            c2d: c2d::C2dLimits::default(),
            c2d_window: 10,
            feedback_interval: Duration::from_secs(15),
            feedback_ttl: Duration::from_secs(3600),
            sweep_interval: Duration::from_millis(100),
        }
    }
}

/// Hub counters.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Connections accepted since start.
    pub connections: AtomicU64,
    /// Connections currently open.
    pub open_connections: AtomicU64,
    /// CONNECTs refused (bad credentials, unsupported protocol version etc.).
    pub refused: AtomicU64,
    /// Connections refused because `max_connections` were open.
    pub refused_capacity: AtomicU64,
    /// Connections closed for a protocol or authorization violation.
    pub violations: AtomicU64,
    /// D2C messages appended.
    pub d2c_messages: AtomicU64,
    /// D2C body bytes appended.
    pub d2c_bytes: AtomicU64,
    /// Events delivered to consumers (including redeliveries).
    pub events_delivered: AtomicU64,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    partitions: u32,
}

pub(crate) struct Shared {
    pub(crate) config: HubConfig,
    pub(crate) registry: Registry,
    pub(crate) events: Arc<events::EventLog>,
    pub(crate) groups: Arc<events::Groups>,
    pub(crate) c2d: Arc<c2d::C2d>,
    /// device id → (connection id, kick signal) of the one live connection.
    pub(crate) devices: Mutex<HashMap<String, (u64, Arc<Notify>)>>,
    pub(crate) next_conn: AtomicU64,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) stats: HubStats,
    /// Host names tokens and user names may carry: `host_name` alone and with each listener
    /// port, then the configured aliases.
    pub(crate) host_names: Vec<String>,
    /// Bytes of D2C messages appended and not yet durable, hub-wide.
    pub(crate) budget: guard::Budget,
    /// Bumped by [`Shared::credentials_changed`]; every session watches it.
    pub(crate) credentials: watch::Sender<u64>,
    logs: guard::LogLimits,
    live: AtomicUsize,
    all_closed: Notify,
}

impl Shared {
    pub(crate) fn owner_file(&self) -> PathBuf {
        self.config.data_dir.join("owner.connection-string")
    }

    /// Writes `cs` to the owner file, 0600, atomically; true if the file did not exist.
    pub(crate) fn write_owner_file(&self, cs: &str) -> Result<bool> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.owner_file();
        let fresh = !path.exists();
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(cs.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| Error::storage(format!("write {}", path.display()), e))?;
        Ok(fresh)
    }

    /// Rewrites the owner file after the `iothubowner` keys changed (if the hub keeps one).
    pub(crate) fn refresh_owner_file(&self) -> Result<()> {
        let (Some(host), Some(p)) = (self.host_names.get(1), self.registry.policy("iothubowner")) else { return Ok(()) };
        if !self.owner_file().exists() {
            return Ok(());
        }
        let cs = ConnectionString {
            host_name: host.clone(),
            shared_access_key_name: Some(p.name),
            shared_access_key: Some(p.primary_key),
            ..Default::default()
        };
        self.write_owner_file(&cs.to_string()).map(|_| ())
    }

    /// Logs a refused CONNECT (rate-limited: a flood of bad peers writes one line per 10 s).
    pub(crate) fn log_refusal(&self, peer: &SocketAddr, why: &str) {
        if let Some(suppressed) = self.logs.refusal.allow() {
            tracing::info!(%peer, reason = %why, suppressed, "CONNECT refused");
        }
    }

    /// Logs a connection closed for a violation (rate-limited).
    pub(crate) fn log_violation(&self, peer: &SocketAddr, e: &Error) {
        if let Some(suppressed) = self.logs.violation.allow() {
            tracing::info!(%peer, error = %e, suppressed, "closing connection");
        }
    }

    /// Logs a store failure of periodic or per-packet work (rate-limited: a full disk logs one
    /// line per 10 s with the count of repeats, not one per attempt).
    pub(crate) fn log_store_error(&self, what: &str, e: &Error) {
        if let Some(suppressed) = self.logs.store.allow() {
            tracing::error!(error = %e, suppressed, "{what}");
        }
    }

    /// Keys were replaced or a device disabled or deleted: every session re-checks the key it
    /// authenticated with and ends if that is no longer in force.
    pub(crate) fn credentials_changed(&self) {
        self.credentials.send_modify(|v| *v = v.wrapping_add(1));
    }
}

/// A running hub. Dropping it does not stop it; call [`Hub::shutdown`].
pub struct Hub {
    shared: Arc<Shared>,
    mqtt_addr: Option<SocketAddr>,
    mqtts_addr: Option<SocketAddr>,
    ca_file: Option<PathBuf>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Hub {
    /// Opens the stores in `config.data_dir`, binds the listeners and starts serving.
    pub async fn start(mut config: HubConfig) -> Result<Hub> {
        if config.mqtt.is_none() && config.mqtts.is_none() {
            return Err(Error::invalid("the hub needs at least one listener (mqtt or mqtts)"));
        }
        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| Error::storage(format!("create {}", dir.display()), e))?;
        // Partition count is fixed at creation.
        let meta_path = dir.join("hub.json");
        match std::fs::read(&meta_path) {
            Ok(b) => {
                let meta: Meta =
                    serde_json::from_slice(&b).map_err(|e| Error::new(ErrorKind::Storage, format!("{}: {e}", meta_path.display())))?;
                if meta.partitions != config.partitions {
                    tracing::warn!(
                        existing = meta.partitions,
                        requested = config.partitions,
                        "partition count is fixed at creation; using the existing one"
                    );
                    config.partitions = meta.partitions;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if config.partitions == 0 || config.partitions > 128 {
                    return Err(Error::invalid("partitions must be between 1 and 128"));
                }
                let b = serde_json::to_vec(&Meta { partitions: config.partitions }).expect("meta serializes");
                std::fs::write(&meta_path, b).map_err(|e| Error::storage(format!("write {}", meta_path.display()), e))?;
            }
            Err(e) => return Err(Error::storage(format!("read {}", meta_path.display()), e)),
        }
        let (registry, events, groups, c2d) = {
            let c = config.clone();
            let registry = tokio::task::spawn_blocking(move || Registry::open(&c.data_dir.join("registry"), c.durability))
                .await
                .map_err(|e| Error::new(ErrorKind::Internal, format!("registry open task: {e}")))??;
            let events = events::EventLog::open(&dir.join("events"), config.partitions, config.durability, config.segment_bytes)?;
            let groups = events::Groups::open(&dir.join("checkpoints"), config.partitions, config.durability)?;
            let c2d = c2d::C2d::open(&dir.join("c2d"), config.durability, config.c2d.clone())?;
            (registry, events, groups, c2d)
        };
        let tls_config = match config.mqtts {
            None => None,
            Some(_) => {
                let files = match &config.tls {
                    Some(f) => f.clone(),
                    None => {
                        tls::ensure_self_signed(&dir, &["localhost".into(), "127.0.0.1".into(), "::1".into(), config.host_name.clone()])?
                    }
                };
                let sc = tls::server_config(&files)?;
                config.tls = Some(files);
                Some(sc)
            }
        };
        let (stop, shutdown) = watch::channel(false);
        let mqtt_listener = match config.mqtt {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let mqtts_listener = match config.mqtts {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let local = |l: &Option<TcpListener>| -> Result<Option<SocketAddr>> {
            l.as_ref().map(|l| l.local_addr().map_err(|e| Error::storage("listener address", e))).transpose()
        };
        let (mqtt_addr, mqtts_addr) = (local(&mqtt_listener)?, local(&mqtts_listener)?);
        let bare = config.host_name.trim_start_matches('[').trim_end_matches(']').to_string();
        let mut host_names = vec![bare.clone()];
        for a in [mqtt_addr, mqtts_addr].into_iter().flatten() {
            host_names.push(if bare.contains(':') { format!("[{bare}]:{}", a.port()) } else { format!("{bare}:{}", a.port()) });
        }
        host_names.extend(config.host_aliases.iter().cloned());
        let shared = Arc::new(Shared {
            config: config.clone(),
            registry,
            events,
            groups,
            c2d,
            devices: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            shutdown,
            stats: HubStats::default(),
            host_names,
            budget: guard::Budget::new(config.hub_pending_bytes),
            credentials: watch::channel(0).0,
            logs: guard::LogLimits::default(),
            live: AtomicUsize::new(0),
            all_closed: Notify::new(),
        });
        let mut tasks = Vec::new();
        if let Some(l) = mqtt_listener {
            tasks.push(tokio::spawn(accept_loop(shared.clone(), l, None)));
        }
        if let Some(l) = mqtts_listener {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls_config.expect("tls config built with mqtts"));
            tasks.push(tokio::spawn(accept_loop(shared.clone(), l, Some(acceptor))));
        }
        tasks.push(tokio::spawn(checkpoint_loop(shared.clone())));
        tasks.push(tokio::spawn(retention_loop(shared.clone())));
        tasks.push(tokio::spawn(sweep_loop(shared.clone())));
        tracing::info!(?mqtt_addr, ?mqtts_addr, partitions = config.partitions, "hub started");
        Ok(Hub { ca_file: config.tls.as_ref().map(|t| t.cert.clone()), shared, mqtt_addr, mqtts_addr, stop, tasks })
    }

    /// The bound plain MQTT address.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.mqtt_addr
    }

    /// The bound TLS address.
    pub fn mqtts_addr(&self) -> Option<SocketAddr> {
        self.mqtts_addr
    }

    /// The certificate file clients must trust for `mqtts` (self-signed or configured).
    pub fn ca_file(&self) -> Option<&std::path::Path> {
        self.ca_file.as_deref()
    }

    /// `HostName` for connection strings: `host:port` of the plain listener if there is one,
    /// otherwise of the TLS listener (clients then need the CA file).
    pub fn host_name(&self) -> String {
        let addr = self.mqtt_addr.or(self.mqtts_addr).expect("at least one listener");
        let host = &self.shared.config.host_name;
        if host.contains(':') {
            format!("[{host}]:{}", addr.port())
        } else {
            format!("{host}:{}", addr.port())
        }
    }

    /// Writes the `iothubowner` connection string to [`Hub::owner_file`] (created with mode
    /// 0600, replaced atomically, so the key never sits in a world-readable file or in the
    /// hub's output); returns whether the file is new (the hub's first start).
    pub fn write_owner_connection_string(&self) -> Result<bool> {
        self.shared.write_owner_file(&self.service_connection_string())
    }

    /// Where the hub keeps its owner connection string: `{data_dir}/owner.connection-string`.
    pub fn owner_file(&self) -> PathBuf {
        self.shared.owner_file()
    }

    /// The connection string of the `iothubowner` policy.
    pub fn service_connection_string(&self) -> String {
        self.policy_connection_string("iothubowner").expect("iothubowner exists")
    }

    /// The connection string of a policy.
    pub fn policy_connection_string(&self, policy: &str) -> Result<String> {
        let p =
            self.shared.registry.policy(policy).ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no policy named '{policy}'")))?;
        Ok(ConnectionString {
            host_name: self.host_name(),
            shared_access_key_name: Some(p.name),
            shared_access_key: Some(p.primary_key),
            ..Default::default()
        }
        .to_string())
    }

    /// The C2D queues and feedback (for inspection and in-process use).
    pub fn c2d(&self) -> &c2d::C2d {
        &self.shared.c2d
    }

    /// Creates a device identity (durable on return).
    pub async fn create_device(&self, device_id: &str) -> Result<DeviceIdentity> {
        self.shared.registry.create(CreateDevice { device_id: device_id.into(), ..Default::default() }).await
    }

    /// The connection string of a registered device (primary key).
    pub fn device_connection_string(&self, device_id: &str) -> Result<String> {
        let d = self
            .shared
            .registry
            .device(device_id)
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("device '{device_id}' is not registered")))?;
        Ok(ConnectionString {
            host_name: self.host_name(),
            device_id: Some(d.device_id),
            shared_access_key: Some(d.primary_key),
            ..Default::default()
        }
        .to_string())
    }

    /// The identity registry.
    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// Counters.
    pub fn stats(&self) -> &HubStats {
        &self.shared.stats
    }

    /// Stops accepting, closes every connection (waiting up to 5 s), persists checkpoints and
    /// closes the stores.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
        let wait = async {
            while self.shared.live.load(Ordering::SeqCst) > 0 {
                let notified = self.shared.all_closed.notified();
                if self.shared.live.load(Ordering::SeqCst) == 0 {
                    break;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
        self.shared.groups.flush().await?;
        let s = self.shared.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            s.events.close()?;
            s.groups.close()?;
            s.c2d.close()?;
            s.registry.close()
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("shutdown task: {e}")))?
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        Error::new(ErrorKind::InvalidArgument, format!("cannot listen on {addr}: {e} (is another process using the port?)")).with_source(e)
    })
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) {
    let accept_errors = guard::LogLimit::default();
    let capacity = guard::LogLimit::default();
    let refusals = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSALS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                if let Some(suppressed) = accept_errors.allow() {
                    tracing::warn!(error = %e, suppressed, "accept failed (raise the open-file limit or lower max_connections)");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        crate::transport::tune_socket(&tcp, &shared.config.socket);
        if shared.live.load(Ordering::SeqCst) >= shared.config.max_connections {
            shared.stats.refused_capacity.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = capacity.allow() {
                tracing::warn!(%peer, max = shared.config.max_connections, suppressed, "connection refused: the hub is at max_connections");
            }
            // A bounded number of refusals at a time: past it a refused peer is just closed.
            if let Ok(slot) = refusals.clone().try_acquire_owned() {
                tokio::spawn(refuse_busy(tcp, tls.clone(), shared.config.connect_timeout, slot));
            }
            continue;
        }
        let shared = shared.clone();
        let tls = tls.clone();
        shared.live.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let stream: Option<crate::transport::BoxStream> = match tls {
                None => Some(Box::new(tcp)),
                Some(acc) => match tokio::time::timeout(shared.config.connect_timeout, acc.accept(tcp)).await {
                    Ok(Ok(s)) => Some(Box::new(s)),
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        None
                    }
                    Err(_) => None,
                },
            };
            if let Some(stream) = stream {
                session::serve(shared.clone(), stream, peer).await;
            }
            if shared.live.fetch_sub(1, Ordering::SeqCst) == 1 {
                shared.all_closed.notify_waiters();
            }
        });
    }
}

/// Refusals of connections past `max_connections` in progress at once (each holds a socket and,
/// on the TLS listener, a handshake for at most `connect_timeout`); past it a refused connection
/// is closed without a CONNACK.
pub const MAX_REFUSALS: usize = 64;

/// The refusal of a connection past `max_connections`, as MQTT 3.1.1 has it: the peer's CONNECT
/// is awaited (after the TLS handshake on the TLS listener), answered with CONNACK 3 (server
/// unavailable, which MQTT clients treat as "retry later") and the connection closed. The
/// CONNECT is read before answering so that closing never finds unread bytes, which would turn
/// the close into a reset that can destroy the CONNACK before the client reads it. All of it
/// within `connect_timeout`; `_slot` counts against [`MAX_REFUSALS`] until it ends.
async fn refuse_busy(
    tcp: tokio::net::TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limit: Duration,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(limit, async {
        let mut stream: crate::transport::BoxStream = match tls {
            None => Box::new(tcp),
            Some(acc) => match acc.accept(tcp).await {
                Ok(s) => Box::new(s),
                Err(_) => return,
            },
        };
        // The CONNECT, or whatever the peer sends first (at most one small read).
        let mut buf = [0u8; 512];
        if !matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {
            return;
        }
        let _ = stream.write_all(&[0x20, 0x02, 0x00, 0x03]).await;
        let _ = stream.flush().await;
        let _ = stream.shutdown().await;
        // Read what is left until the peer closes, so the close is a FIN, not a reset.
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
}

async fn checkpoint_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.checkpoint_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = shared.groups.flush().await {
            shared.log_store_error("persisting consumer checkpoints failed; will retry", &e);
        }
    }
}

async fn sweep_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut oldest_pending = None;
    loop {
        tick.tick().await;
        if let Err(e) = shared.c2d.sweep(shared.config.feedback_interval, shared.config.feedback_ttl, &mut oldest_pending) {
            shared.log_store_error("C2D sweep failed; will retry", &e);
        }
    }
}

async fn retention_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.retention_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = shared.clone();
        let r = tokio::task::spawn_blocking(move || s.events.apply_retention(s.config.retention_age, s.config.retention_bytes)).await;
        match r {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(removed = n, "retention removed old events"),
            Ok(Err(e)) => shared.log_store_error("retention failed", &e),
            Err(e) => tracing::error!(error = %e, "retention task failed"),
        }
    }
}
