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
//! device identity (a new one drops the old); one hub process per data directory (it is locked,
//! a second hub on it fails to start naming the first one's pid); a full disk refuses new D2C
//! (devices keep them in their outboxes and retry) while reads, C2D settles and checkpoints go
//! on in the space kept free by `disk_reserve_bytes`.

pub mod c2d;
pub mod events;
pub mod registry;
mod session;
pub mod tls;

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
    /// Time a new connection has to send CONNECT. Default 10 s.
    pub connect_timeout: Duration,
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
            connect_timeout: Duration::from_secs(10),
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
    /// CONNECTs refused (bad credentials etc.).
    pub refused: AtomicU64,
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
}

#[derive(Serialize, Deserialize)]
struct Meta {
    partitions: u32,
}

pub(crate) struct Shared {
    /// The data directory's lock, held while the hub runs (released by shutdown).
    dir_lock: Mutex<Option<Box<dyn std::any::Any + Send + Sync>>>,
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
    live: AtomicUsize,
    all_closed: Notify,
}

impl Shared {
    /// Drops the live connection of `device_id`, if any.
    pub(crate) fn kick(&self, device_id: &str) {
        if let Some((_, kick)) = self.devices.lock().remove(device_id) {
            kick.notify_one();
        }
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
        let fs = crate::store::io::real();
        crate::store::io::create_dir_durable(&*fs, &dir)?;
        let lock = crate::store::io::lock_dir(&*fs, &dir, "hub data directory")?;
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
                crate::store::io::write_atomic(&*fs, &meta_path, &b, false)?;
            }
            Err(e) => return Err(Error::storage(format!("read {}", meta_path.display()), e)),
        }
        let (registry, events, groups, c2d) = {
            let c = config.clone();
            let registry = tokio::task::spawn_blocking(move || Registry::open(&c.data_dir.join("registry"), c.durability))
                .await
                .map_err(|e| Error::new(ErrorKind::Internal, format!("registry open task: {e}")))??;
            let groups = events::Groups::open(&dir.join("checkpoints"), config.partitions, config.durability)?;
            // No partition hands out a sequence number a consumer group's checkpoint has seen.
            let floors: Vec<u64> = (0..config.partitions).map(|p| groups.max_checkpoint(p) + 1).collect();
            let events = events::EventLog::open(
                &dir.join("events"),
                config.partitions,
                config.durability,
                config.segment_bytes,
                config.disk_reserve_bytes,
                &floors,
            )?;
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
        let shared = Arc::new(Shared {
            dir_lock: Mutex::new(Some(lock)),
            config: config.clone(),
            registry,
            events,
            groups,
            c2d,
            devices: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            shutdown,
            stats: HubStats::default(),
            live: AtomicUsize::new(0),
            all_closed: Notify::new(),
        });
        let mut tasks = Vec::new();
        let mut mqtt_addr = None;
        let mut mqtts_addr = None;
        if let Some(addr) = config.mqtt {
            let l = bind(addr).await?;
            mqtt_addr = Some(l.local_addr().map_err(|e| Error::storage("listener address", e))?);
            tasks.push(tokio::spawn(accept_loop(shared.clone(), l, None)));
        }
        if let Some(addr) = config.mqtts {
            let l = bind(addr).await?;
            mqtts_addr = Some(l.local_addr().map_err(|e| Error::storage("listener address", e))?);
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
        self.shared.groups.flush(&self.shared.events).await?;
        let s = self.shared.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            let r = s.events.close().and(s.groups.close()).and(s.c2d.close()).and(s.registry.close());
            s.dir_lock.lock().take();
            r
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
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
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

async fn checkpoint_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.checkpoint_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = shared.groups.flush(&shared.events).await {
            tracing::error!(error = %e, "persisting consumer checkpoints failed; will retry");
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
            tracing::error!(error = %e, "C2D sweep failed; will retry");
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
            Ok(Err(e)) => tracing::error!(error = %e, "retention failed"),
            Err(e) => tracing::error!(error = %e, "retention task failed"),
        }
    }
}
