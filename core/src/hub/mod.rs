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
//! device identity (a new one drops the old); one hub process per data directory (the embedded
//! backend locks it: a second hub on it fails to start naming the first one's pid); a full disk
//! refuses new D2C
//! (devices keep them in their outboxes and retry) while reads, C2D settles and checkpoints go
//! on in the space kept free by `disk_reserve_bytes`.

pub mod backend;
pub mod c2d;
pub mod embedded;
pub mod events;
pub mod guard;
pub mod metrics;
pub mod outcomes;
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
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::auth::ConnectionString;
use crate::error::{Error, ErrorKind, Result};
use crate::proto::{CreateDevice, DeviceIdentity};
use crate::store::Durability;
use backend::{Backend, BackendConnector, RegistryChange};
use session::Credential;

pub use registry::{Policy, Registry, Right};
pub use tls::TlsFiles;

/// Hub settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Where the hub keeps everything (registry, event log, checkpoints, generated TLS files);
    /// with another backend only the owner connection string and TLS files.
    pub data_dir: PathBuf,
    /// Where durable state lives: `None` = the embedded stores in `data_dir` (the default);
    /// otherwise the connector of another backend (NATS JetStream: crate `hubmsg-nats`).
    pub backend: Option<Arc<dyn BackendConnector>>,
    /// Host name put in printed connection strings (default `127.0.0.1`).
    pub host_name: String,
    /// `host:port`s devices and services reach this hub by when that is not one of its own
    /// listeners — TCP load balancers in front of several hub nodes, a proxy or a port forward.
    /// Tokens and user names may name any of them (and no other name than these, `host_name`
    /// and `host_name` with a listener's port); printed connection strings use the first.
    pub public_addresses: Vec<String>,
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
    /// D2C messages are refused while the data directory's disk has less free space than this,
    /// which keeps room for C2D, checkpoints and the registry. Default 64 MiB.
    pub disk_reserve_bytes: u64,
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
    /// Feedback batching (IoT Hub's rule, [`c2d::batch_due`]): a batch forms when 64 records
    /// accumulated or this long after the previous batch, whichever first — so an outcome
    /// after a quiet period goes out as it is recorded. Default 15 s (IoT Hub); lower it for
    /// fast tests.
    pub feedback_interval: Duration,
    /// Feedback batches not acknowledged within this time are dropped (counted). Default 1 h.
    pub feedback_ttl: Duration,
    /// How often expiries, lock timeouts and feedback batches held back by the interval are
    /// checked. Default 100 ms.
    pub sweep_interval: Duration,
    /// The operations endpoint (`/healthz`, `/readyz`, `/metrics`); off by default.
    pub http: Option<SocketAddr>,
}

impl HubConfig {
    /// Defaults with data in `data_dir` and a plain listener on `127.0.0.1:0`.
    pub fn new(data_dir: impl Into<PathBuf>) -> HubConfig {
        HubConfig {
            data_dir: data_dir.into(),
            backend: None,
            host_name: "127.0.0.1".into(),
            public_addresses: Vec::new(),
            mqtt: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            mqtts: None,
            tls: None,
            partitions: 4,
            durability: Durability::Always,
            segment_bytes: 64 * 1024 * 1024,
            disk_reserve_bytes: 64 * 1024 * 1024,
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
            http: None,
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
    /// D2C messages refused because the store could not take them (a full disk, a damaged
    /// partition); the connection is closed and the device retries from its outbox.
    pub d2c_refused: AtomicU64,
    /// Events delivered to consumers (including redeliveries).
    pub events_delivered: AtomicU64,
    /// D2C messages the backend recognised as re-sends (de-duplicated by message id).
    pub d2c_duplicates: AtomicU64,
    /// C2D messages accepted into a queue by this node.
    pub c2d_sent: AtomicU64,
    /// C2D deliveries completed by devices on this node.
    pub c2d_completed: AtomicU64,
    /// C2D deliveries abandoned by devices on this node (each a redelivery).
    pub c2d_abandoned: AtomicU64,
    /// C2D deliveries rejected by devices on this node (and undeliverable ones dead-lettered).
    pub c2d_rejected: AtomicU64,
    /// C2D messages whose TTL passed (expiry sweep and late settles on this node).
    pub c2d_expired: AtomicU64,
    /// C2D messages dead-lettered at the maximum delivery count on this node.
    pub c2d_dead_lettered: AtomicU64,
    /// C2D messages purged through this node.
    pub c2d_purged: AtomicU64,
    /// Feedback batches delivered to services (including redeliveries).
    pub feedback_batches: AtomicU64,
    /// Feedback records in acknowledged batches.
    pub feedback_records: AtomicU64,
    /// Feedback records sent to waiting service connections as outcome notifications.
    pub outcome_notifications: AtomicU64,
    /// Backend operations that failed (storage errors, an unreachable cluster).
    pub backend_errors: AtomicU64,
    /// Time from a D2C append to its durability (the store's commit latency as the hub sees it).
    pub commit_latency: metrics::Histogram,
}

impl HubStats {
    /// Counts one settle outcome of a C2D message.
    pub(crate) fn count_outcome(&self, status: c2d::FeedbackStatus) {
        use c2d::FeedbackStatus as S;
        let c = match status {
            S::Success => &self.c2d_completed,
            S::Rejected => &self.c2d_rejected,
            S::Expired => &self.c2d_expired,
            S::DeliveryCountExceeded => &self.c2d_dead_lettered,
            S::Purged => &self.c2d_purged,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// A device session of this hub node, for kicking it when its identity changes.
pub(crate) struct LiveDevice {
    pub(crate) conn: u64,
    pub(crate) kick: Arc<Notify>,
    /// The key it authenticated with (replacing that key, or disabling or deleting the device,
    /// ends the session).
    pub(crate) cred: Credential,
}

/// A service connection on this node, as the registry watch sees it.
pub(crate) struct LiveService {
    /// The policy key it authenticated with.
    pub(crate) cred: Credential,
    /// Notified once that key is replaced: the session answers what it runs and closes.
    pub(crate) revoke: Arc<Notify>,
}

pub(crate) struct Shared {
    pub(crate) config: HubConfig,
    pub(crate) backend: Arc<dyn Backend>,
    /// D2C partitions (fixed when the backend's state was created).
    pub(crate) partitions: u32,
    /// Policies as last read (connection strings this hub prints; authentication reads the
    /// backend).
    pub(crate) policies: Mutex<Vec<Policy>>,
    /// device id → its live session on this node.
    pub(crate) devices: Mutex<HashMap<String, LiveDevice>>,
    /// service connection id → its credential on this node.
    pub(crate) services: Mutex<HashMap<u64, LiveService>>,
    /// Registry changes seen by this node so far: a connection that authenticated while one
    /// arrived re-checks its key against the backend ([`Shared::recheck`]).
    pub(crate) registry_epoch: AtomicU64,
    pub(crate) next_conn: AtomicU64,
    /// This hub process's id (members of consumer groups are `{node_id}/{connection}`).
    pub(crate) node_id: String,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Set when the hub drains: sessions finish what they owe and close.
    pub(crate) drain: watch::Receiver<bool>,
    pub(crate) draining: std::sync::atomic::AtomicBool,
    pub(crate) stats: HubStats,
    /// Host names tokens and user names may carry: `host_name` alone and with each listener
    /// port, and the public addresses.
    pub(crate) host_names: Vec<String>,
    /// Bytes of D2C messages appended and not yet durable, hub-wide.
    pub(crate) budget: guard::Budget,
    logs: guard::LogLimits,
    live: AtomicUsize,
    all_closed: Notify,
    /// Outcome notifications of this node's service connections (fed by the backend).
    pub(crate) outcomes: Arc<outcomes::OutcomeRouter>,
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

    /// A policy as last read by this hub.
    pub(crate) fn cached_policy(&self, name: &str) -> Option<Policy> {
        self.policies.lock().iter().find(|p| p.name == name).cloned()
    }

    /// Rewrites the owner file after the `iothubowner` keys changed (if the hub keeps one).
    pub(crate) async fn refresh_owner_file(&self) -> Result<()> {
        *self.policies.lock() = self.backend.registry().policies().await?;
        let (Some(host), Some(p)) = (self.host_names.last(), self.cached_policy("iothubowner")) else { return Ok(()) };
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

    /// Drops the live connection of `device_id` on this node, if any.
    pub(crate) fn kick(&self, device_id: &str) {
        if let Some(d) = self.devices.lock().remove(device_id) {
            d.kick.notify_one();
        }
    }

    /// Ends this node's connections whose credential a registry change (made on any node)
    /// took away: the device's session when it is deleted or disabled or the device key it used
    /// replaced; every connection that used a replaced policy key (service sessions answer what
    /// they run first).
    pub(crate) fn on_registry_change(&self, change: &RegistryChange) {
        self.registry_epoch.fetch_add(1, Ordering::SeqCst);
        let stale: Vec<String> = {
            let devices = self.devices.lock();
            match change {
                RegistryChange::Put(d) => {
                    devices.get(&d.device_id).filter(|l| !l.cred.survives(change)).map(|_| d.device_id.clone()).into_iter().collect()
                }
                RegistryChange::Deleted(id) => devices.contains_key(id).then(|| id.clone()).into_iter().collect(),
                RegistryChange::Policy(_) => devices.iter().filter(|(_, l)| !l.cred.survives(change)).map(|(id, _)| id.clone()).collect(),
            }
        };
        for id in stale {
            tracing::debug!(device = %id, "the key its connection authenticated with is no longer in force; closing it");
            self.kick(&id);
        }
        if let RegistryChange::Policy(p) = change {
            for s in self.services.lock().values().filter(|s| !s.cred.survives(change)) {
                tracing::debug!(policy = %p.name, "a service connection's policy key was replaced; closing it");
                s.revoke.notify_one();
            }
        }
    }

    /// Reads what `cred` depends on from the backend and applies it as a registry change: for a
    /// connection that authenticated while a change arrived, or after the watch lagged.
    pub(crate) async fn recheck(&self, cred: &Credential) {
        let r = async {
            if let Some(id) = cred.device() {
                let change = match self.backend.registry().device(id).await? {
                    Some(d) => RegistryChange::Put(d),
                    None => RegistryChange::Deleted(id.to_string()),
                };
                self.on_registry_change(&change);
            }
            if let Some(name) = cred.policy() {
                if let Some(p) = self.backend.registry().policy(name).await? {
                    self.on_registry_change(&RegistryChange::Policy(p));
                }
            }
            Ok::<_, Error>(())
        };
        if let Err(e) = r.await {
            self.log_store_error("re-checking a connection's key failed", &e);
        }
    }
}

/// A running hub. Dropping it does not stop it; call [`Hub::shutdown`].
pub struct Hub {
    shared: Arc<Shared>,
    mqtt_addr: Option<SocketAddr>,
    mqtts_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    ca_file: Option<PathBuf>,
    stop: watch::Sender<bool>,
    drain: watch::Sender<bool>,
    accept: Vec<tokio::task::JoinHandle<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Hub {
    /// Opens the backend (the embedded stores in `config.data_dir` unless `config.backend`
    /// names another), binds the listeners and starts serving.
    pub async fn start(mut config: HubConfig) -> Result<Hub> {
        if config.mqtt.is_none() && config.mqtts.is_none() {
            return Err(Error::invalid("the hub needs at least one listener (mqtt or mqtts)"));
        }
        let dir = config.data_dir.clone();
        crate::store::io::create_dir_durable(&*crate::store::io::real(), &dir)?;
        let backend: Arc<dyn Backend> = match config.backend.clone() {
            None => embedded::Embedded::open(&config).await?,
            Some(c) => c.connect(&config).await?,
        };
        let partitions = backend.events().partitions();
        config.partitions = partitions;
        let policies = backend.registry().policies().await?;
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
        let (drain_tx, drain) = watch::channel(false);
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
        // The name connection strings carry goes last (the owner file uses it).
        host_names.extend(config.public_addresses.iter().rev().cloned());
        if config.public_addresses.is_empty() {
            let first = host_names.get(1).cloned().unwrap_or_else(|| bare.clone());
            host_names.push(first);
        }
        let router = outcomes::OutcomeRouter::new();
        let sink = router.clone();
        backend.feedback().on_outcome(Arc::new(move |r| sink.record(r)));
        let shared = Arc::new(Shared {
            config: config.clone(),
            backend,
            partitions,
            policies: Mutex::new(policies),
            devices: Mutex::new(HashMap::new()),
            services: Mutex::new(HashMap::new()),
            registry_epoch: AtomicU64::new(0),
            next_conn: AtomicU64::new(1),
            node_id: uuid::Uuid::new_v4().to_string(),
            shutdown,
            drain,
            draining: std::sync::atomic::AtomicBool::new(false),
            stats: HubStats::default(),
            host_names,
            budget: guard::Budget::new(config.hub_pending_bytes),
            logs: guard::LogLimits::default(),
            live: AtomicUsize::new(0),
            all_closed: Notify::new(),
            outcomes: router,
        });
        let mut accept = Vec::new();
        if let Some(l) = mqtt_listener {
            accept.push(tokio::spawn(accept_loop(shared.clone(), l, None)));
        }
        if let Some(l) = mqtts_listener {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls_config.expect("tls config built with mqtts"));
            accept.push(tokio::spawn(accept_loop(shared.clone(), l, Some(acceptor))));
        }
        let mut tasks = Vec::new();
        let http_addr = match config.http {
            Some(addr) => {
                let l = metrics::bind(addr).await?;
                let a = l.local_addr().map_err(|e| Error::storage("HTTP listener address", e))?;
                tasks.push(tokio::spawn(metrics::serve(shared.clone(), l)));
                Some(a)
            }
            None => None,
        };
        tasks.push(tokio::spawn(sweep_loop(shared.clone())));
        tasks.push(tokio::spawn(registry_watch(shared.clone())));
        tracing::info!(?mqtt_addr, ?mqtts_addr, partitions, backend = shared.backend.kind(), "hub started");
        Ok(Hub {
            ca_file: config.tls.as_ref().map(|t| t.cert.clone()),
            shared,
            mqtt_addr,
            mqtts_addr,
            http_addr,
            stop,
            drain: drain_tx,
            accept,
            tasks,
        })
    }

    /// The bound plain MQTT address.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.mqtt_addr
    }

    /// The bound TLS address.
    pub fn mqtts_addr(&self) -> Option<SocketAddr> {
        self.mqtts_addr
    }

    /// The bound address of the operations endpoint (`HubConfig::http`).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Graceful drain (what `hubmsg hub` does on SIGTERM): stop accepting connections and
    /// report not ready, let every device session send the PUBACKs it owes for messages
    /// already received (nothing more is read), close every session so devices reconnect to
    /// another node, then shut down. Sessions still open after `timeout` are closed anyway.
    pub async fn drain(self, timeout: Duration) -> Result<()> {
        self.shared.draining.store(true, Ordering::SeqCst);
        for t in &self.accept {
            t.abort();
        }
        let _ = self.drain.send(true);
        let _ = tokio::time::timeout(timeout, self.all_closed()).await;
        self.shutdown().await
    }

    async fn all_closed(&self) {
        while self.shared.live.load(Ordering::SeqCst) > 0 {
            let notified = self.shared.all_closed.notified();
            if self.shared.live.load(Ordering::SeqCst) == 0 {
                break;
            }
            notified.await;
        }
    }

    /// The certificate file clients must trust for `mqtts` (self-signed or configured).
    pub fn ca_file(&self) -> Option<&std::path::Path> {
        self.ca_file.as_deref()
    }

    /// `HostName` for connection strings: `host:port` of the plain listener if there is one,
    /// otherwise of the TLS listener (clients then need the CA file).
    /// With `public_addresses` set, the first of them.
    pub fn host_name(&self) -> String {
        if let Some(p) = self.shared.config.public_addresses.first() {
            return p.clone();
        }
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

    /// The connection string of a policy (keys as this hub last read them).
    pub fn policy_connection_string(&self, policy: &str) -> Result<String> {
        let p = self.shared.cached_policy(policy).ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no policy named '{policy}'")))?;
        Ok(ConnectionString {
            host_name: self.host_name(),
            shared_access_key_name: Some(p.name),
            shared_access_key: Some(p.primary_key),
            ..Default::default()
        }
        .to_string())
    }

    /// The storage backend (embedded or JetStream).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.shared.backend
    }

    /// The C2D queues (for inspection and in-process use).
    pub fn c2d(&self) -> &dyn backend::C2dQueues {
        self.shared.backend.c2d()
    }

    /// Creates a device identity (durable on return).
    pub async fn create_device(&self, device_id: &str) -> Result<DeviceIdentity> {
        self.shared.backend.registry().create(CreateDevice { device_id: device_id.into(), ..Default::default() }).await
    }

    /// The connection string of a registered device (primary key).
    pub async fn device_connection_string(&self, device_id: &str) -> Result<String> {
        let d = self
            .shared
            .backend
            .registry()
            .device(device_id)
            .await?
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
    pub fn registry(&self) -> &dyn backend::RegistryStore {
        self.shared.backend.registry()
    }

    /// Counters.
    pub fn stats(&self) -> &HubStats {
        &self.shared.stats
    }

    /// Stops accepting, closes every connection (waiting up to 5 s), persists checkpoints and
    /// closes the stores.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(true);
        for t in self.accept.iter().chain(&self.tasks) {
            t.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.all_closed()).await;
        self.shared.backend.close().await
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

async fn sweep_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match shared.backend.c2d().sweep().await {
            Ok(n) => {
                shared.stats.c2d_expired.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => shared.log_store_error("C2D sweep failed; will retry", &e),
        }
    }
}

/// Ends this node's connections whose key a change on any node took away (devices deleted,
/// disabled or re-keyed; policy keys regenerated).
async fn registry_watch(shared: Arc<Shared>) {
    let mut rx = shared.backend.registry().watch();
    loop {
        match rx.recv().await {
            Ok(change) => shared.on_registry_change(&change),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                // Changes were missed: re-check every live session against the registry.
                tracing::warn!(missed = n, "registry watch lagged; re-checking live sessions");
                let ids: Vec<String> = shared.devices.lock().keys().cloned().collect();
                for id in ids {
                    match shared.backend.registry().device(&id).await {
                        Ok(Some(d)) => shared.on_registry_change(&RegistryChange::Put(d)),
                        Ok(None) => shared.on_registry_change(&RegistryChange::Deleted(id)),
                        Err(e) => shared.log_store_error("re-checking a session's identity failed", &e),
                    }
                }
                match shared.backend.registry().policies().await {
                    Ok(policies) => policies.into_iter().for_each(|p| shared.on_registry_change(&RegistryChange::Policy(p))),
                    Err(e) => shared.log_store_error("re-checking the policies failed", &e),
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}
