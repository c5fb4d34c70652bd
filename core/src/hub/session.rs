//! One connection to the hub: CONNECT and authentication, then either a device session (IoT Hub
//! device protocol) or a service session (hubmsg service contract).
//!
//! Invariants: every violation closes only this connection (after counting it); a device's D2C
//! PUBACKs go out in PUBLISH order and only for messages durable in the partition; a service
//! consumer only has events of partitions its group assigned to it in flight.
//!
//! Bounds (`docs/protocol.md`, limits): before CONNECT a connection reads at most
//! [`MAX_CONNECT_SIZE`] bytes within `connect_timeout`; a session stops reading from its peer
//! (TCP back-pressure) while its appended-but-not-durable D2C messages (QoS 0 and 1 alike) exceed
//! `session_pending_messages` / `session_pending_bytes` or the hub's `hub_pending_bytes` budget
//! is used up; every write must complete within `write_timeout`; a connection ends when its SAS
//! token expires, and when the key it authenticated with is replaced or its device disabled or
//! deleted ([`Credential`]).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck};
use rumqttc::mqttbytes::QoS;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::backend::RegistryChange;
use super::backend::{AppendTicket, C2dEnqueue, DeviceQueue, FeedbackBatch, Membership, PartitionReader, Settled, StoredEvent};
use super::c2d;
use super::registry::Right;
use super::{LiveDevice, LiveService, Shared};
use crate::auth::SasToken;
use crate::error::{Error, ErrorKind, Result};
use crate::message::{now_ms, Message, MAX_D2C_SIZE};
use crate::proto::{self, ConsumeRequest, DeviceStatus, Response};
use crate::transport::{BoxStream, ConnectRead, Drain, PacketReader, PacketWriter, MAX_CONNECT_SIZE, MAX_PACKET_SIZE};
use crate::wire;

type Reader = PacketReader<ReadHalf<BoxStream>>;
type Writer = PacketWriter<WriteHalf<BoxStream>>;

/// Keep-alive ceiling (reference §3.3): 1767 s, also applied when the client asks for 0.
const MAX_IDLE: Duration = Duration::from_secs(1767);

/// Requests one service connection may have running at once; past it the hub stops reading
/// from that connection until answers went out.
pub(crate) const MAX_SERVICE_REQUESTS: usize = 64;

pub(crate) enum Identity {
    Device { id: String, generation_id: String, auth_method: &'static str, expires_s: u64, cred: Credential },
    Service { policy: String, rights: Vec<Right>, expires_s: u64, cred: Credential },
}

/// The key a connection authenticated with. The connection lives only while that key is in
/// force: once it is replaced, or the device it speaks for is disabled or deleted, the hub ends
/// it ([`Shared::on_registry_change`], for changes made on any node). No `Debug`: it holds a key.
#[derive(Clone)]
pub(crate) enum Credential {
    /// A device's own key.
    DeviceKey { device: String, key: String },
    /// A policy key; `device` when the policy's token speaks for one device (token service).
    PolicyKey { policy: String, key: String, device: Option<String> },
}

impl Credential {
    /// Whether a connection with this credential may stay open after `change`: its device (if
    /// any) still exists and is enabled, and the key it used is still one of its identity's two
    /// keys (replacing the other key leaves it alone).
    pub(crate) fn survives(&self, change: &RegistryChange) -> bool {
        let has = |key: &str, primary: &str, secondary: &str| key == primary || key == secondary;
        match change {
            RegistryChange::Deleted(id) => self.device() != Some(id.as_str()),
            RegistryChange::Put(d) if self.device() == Some(d.device_id.as_str()) => {
                d.status == DeviceStatus::Enabled
                    && match self {
                        Credential::DeviceKey { key, .. } => has(key, &d.primary_key, &d.secondary_key),
                        Credential::PolicyKey { .. } => true,
                    }
            }
            RegistryChange::Put(_) => true,
            RegistryChange::Policy(p) => match self {
                Credential::PolicyKey { policy, key, .. } if *policy == p.name => has(key, &p.primary_key, &p.secondary_key),
                _ => true,
            },
        }
    }

    /// The device this credential speaks for, if any.
    pub(crate) fn device(&self) -> Option<&str> {
        match self {
            Credential::DeviceKey { device, .. } => Some(device),
            Credential::PolicyKey { device, .. } => device.as_deref(),
        }
    }

    /// The policy whose key this is, if it is one.
    pub(crate) fn policy(&self) -> Option<&str> {
        match self {
            Credential::DeviceKey { .. } => None,
            Credential::PolicyKey { policy, .. } => Some(policy),
        }
    }
}

/// Which of two keys verifies `token` (primary first), or the verification error.
fn verifying_key(token: &SasToken, primary: &str, secondary: &str, now: u64) -> Result<String> {
    match token.verify(primary, now) {
        Ok(()) => Ok(primary.to_string()),
        Err(_) => token.verify(secondary, now).map(|()| secondary.to_string()),
    }
}

/// Why a session loop ended without an error worth counting.
fn ended(why: &str) -> Result<()> {
    tracing::debug!(why, "session ended");
    Ok(())
}

/// When a token that expires at `expires_s` (Unix seconds) runs out, as a monotonic instant.
fn token_deadline(expires_s: u64) -> Instant {
    let left_ms = expires_s.saturating_mul(1000).saturating_sub(now_ms());
    Instant::now() + Duration::from_millis(left_ms.min(100 * 365 * 86_400_000))
}

/// Flushes within the hub's write deadline, giving up early on a kick or a shutdown (a peer
/// that stopped reading must not pin its session).
async fn flush(writer: &mut Writer, limit: Duration, kick: Option<&Notify>, shutdown: &mut watch::Receiver<bool>) -> Result<bool> {
    if writer.pending() == 0 {
        return Ok(true);
    }
    let kicked = async {
        match kick {
            Some(k) => k.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = writer.flush_within(limit) => r.map(|()| true),
        _ = kicked => Ok(false),
        _ = shutdown.changed() => Ok(false),
    }
}

pub(super) async fn serve(shared: Arc<Shared>, stream: BoxStream, peer: SocketAddr) {
    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
    shared.stats.open_connections.fetch_add(1, Ordering::Relaxed);
    let (rd, wr) = tokio::io::split(stream);
    let mut reader = PacketReader::new(rd, MAX_CONNECT_SIZE);
    reader.set_limits(MAX_CONNECT_SIZE, 512);
    let mut writer = PacketWriter::new(wr);
    // Registry changes seen before authenticating: one that arrives from here until the
    // connection is in the live tables makes it re-check its key.
    let epoch = shared.registry_epoch.load(Ordering::SeqCst);
    let result = async {
        let connect = match tokio::time::timeout(shared.config.connect_timeout, reader.next_connect()).await {
            Err(_) => return Err(Error::new(ErrorKind::Timeout, format!("no CONNECT within {:?}", shared.config.connect_timeout))),
            Ok(Ok(ConnectRead::Connect(c))) => c,
            Ok(Ok(ConnectRead::UnsupportedVersion { name, level })) => {
                // MQTT-3.1.2-2: CONNACK 1 (unacceptable protocol level), then close.
                shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                shared.stats.violations.fetch_add(1, Ordering::Relaxed);
                shared.log_refusal(&peer, &format!("protocol {name:?} level {level} is not MQTT 3.1.1; CONNACK 1"));
                let ack = ConnAck::new(ConnectReturnCode::RefusedProtocolVersion, false);
                let _ = writer.queue(&Packet::ConnAck(ack));
                let _ = writer.flush_within(shared.config.write_timeout).await;
                return Ok(());
            }
            Ok(Ok(ConnectRead::Other(other))) => {
                return Err(Error::protocol(format!("first packet must be CONNECT, got {}", packet_name(&other))))
            }
            Ok(Ok(ConnectRead::Closed)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
        };
        let identity = match authenticate(&shared, &connect).await {
            Ok(id) => id,
            Err((code, why)) => {
                shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                shared.log_refusal(&peer, &format!("client id {:?}: {why}", connect.client_id));
                writer.queue(&Packet::ConnAck(ConnAck::new(code, false)))?;
                writer.flush_within(shared.config.write_timeout).await?;
                return Ok(());
            }
        };
        reader.set_limits(MAX_PACKET_SIZE, crate::transport::MIN_READ_CHUNK);
        let idle = match connect.keep_alive {
            0 => MAX_IDLE,
            k => Duration::from_secs(k as u64).mul_f64(1.5).min(MAX_IDLE),
        };
        match identity {
            Identity::Device { id, generation_id, auth_method, expires_s, cred } => {
                let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                // One live connection per device across every node: the newest claim wins and
                // the older session is told to end (IoT Hub 400027).
                let claim = match shared.backend.sessions().claim(&id, conn_id).await {
                    Ok(c) => c,
                    Err(e) => {
                        shared.stats.backend_errors.fetch_add(1, Ordering::Relaxed);
                        shared.log_store_error("claiming a device session failed; CONNACK 3", &e);
                        writer.queue(&Packet::ConnAck(ConnAck::new(ConnectReturnCode::ServiceUnavailable, false)))?;
                        writer.flush_within(shared.config.write_timeout).await?;
                        return Ok(());
                    }
                };
                let kick = claim.superseded.clone();
                shared.devices.lock().insert(id.clone(), LiveDevice { conn: conn_id, kick: kick.clone(), cred: cred.clone() });
                if shared.registry_epoch.load(Ordering::SeqCst) != epoch {
                    shared.recheck(&cred).await;
                }
                writer.queue(&Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, !connect.clean_session)))?;
                let mut shutdown = shared.shutdown.clone();
                let r = async {
                    if !flush(&mut writer, shared.config.write_timeout, Some(&kick), &mut shutdown).await? {
                        return ended("kicked or shut down before CONNACK went out");
                    }
                    if connect.clean_session {
                        shared.backend.c2d().set_subscription(&id, false).await?;
                    }
                    let mut dev = DeviceSession {
                        shared: &shared,
                        conn_id,
                        persistent: !connect.clean_session,
                        id: id.clone(),
                        partition: super::events::partition_for(&id, shared.partitions),
                        auth_method,
                        generation_id,
                        idle,
                        kick: kick.clone(),
                        token_deadline: token_deadline(expires_s),
                    };
                    dev.run(&mut reader, &mut writer).await
                }
                .await;
                {
                    let mut devices = shared.devices.lock();
                    if devices.get(&id).is_some_and(|d| d.conn == conn_id) {
                        devices.remove(&id);
                    }
                }
                if let Err(e) = shared.backend.sessions().release(claim).await {
                    shared.log_store_error("releasing a device session failed", &e);
                }
                r
            }
            Identity::Service { policy, rights, expires_s, cred } => {
                writer.queue(&Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)))?;
                let member = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                let mut svc = ServiceSession::new(&shared, member, policy, rights, idle, token_deadline(expires_s));
                let revoke = Arc::new(Notify::new());
                shared.services.lock().insert(member, LiveService { cred: cred.clone(), revoke: revoke.clone() });
                if shared.registry_epoch.load(Ordering::SeqCst) != epoch {
                    shared.recheck(&cred).await;
                }
                svc.revoke = Some(revoke);
                let r = svc.run(&mut reader, &mut writer).await;
                shared.services.lock().remove(&member);
                shared.outcomes.close(member);
                if let Some(pump) = svc.feedback.take() {
                    pump.task.abort();
                }
                if let Some(c) = svc.consumer.take() {
                    drop(c.readers);
                    if let Err(e) = c.membership.leave().await {
                        shared.log_store_error("leaving a consumer group failed", &e);
                    }
                }
                if let Err(e) = shared.backend.feedback().release(member).await {
                    shared.log_store_error("releasing feedback batches failed", &e);
                }
                r
            }
        }
    }
    .await;
    if let Err(e) = result {
        if matches!(e.kind(), ErrorKind::Protocol | ErrorKind::Unauthorized | ErrorKind::MessageTooLarge) {
            shared.stats.violations.fetch_add(1, Ordering::Relaxed);
            shared.log_violation(&peer, &e);
        } else if e.kind() == ErrorKind::Storage {
            // E.g. a full disk: the device keeps the message in its outbox and retries.
            shared.log_store_error("refusing the connection's messages: the store cannot take them", &e);
        } else {
            tracing::debug!(%peer, error = %e, "connection ended");
        }
    }
    writer.shutdown().await;
    shared.stats.open_connections.fetch_sub(1, Ordering::Relaxed);
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "CONNECT",
        Packet::ConnAck(_) => "CONNACK",
        Packet::Publish(_) => "PUBLISH",
        Packet::PubAck(_) => "PUBACK",
        Packet::PubRec(_) => "PUBREC",
        Packet::PubRel(_) => "PUBREL",
        Packet::PubComp(_) => "PUBCOMP",
        Packet::Subscribe(_) => "SUBSCRIBE",
        Packet::SubAck(_) => "SUBACK",
        Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        Packet::UnsubAck(_) => "UNSUBACK",
        Packet::PingReq => "PINGREQ",
        Packet::PingResp => "PINGRESP",
        Packet::Disconnect => "DISCONNECT",
    }
}

/// Whether a token's or user name's host names this hub: its configured host name, alone or with
/// the port of one of its listeners (compared case-insensitively).
fn is_hub_host(shared: &Shared, host: &str) -> bool {
    shared.host_names.iter().any(|h| h.eq_ignore_ascii_case(host))
}

/// CONNECT → identity, or the CONNACK code to refuse with and why (reference §3.4). Reasons
/// never contain a key, token or signature.
pub(crate) async fn authenticate(shared: &Shared, c: &Connect) -> std::result::Result<Identity, (ConnectReturnCode, String)> {
    use ConnectReturnCode as C;
    let login = c.login.as_ref().ok_or((C::BadUserNamePassword, "no user name / password".to_string()))?;
    let user = wire::parse_username(&login.username).map_err(|e| (C::BadUserNamePassword, e.to_string()))?;
    let token = SasToken::parse(&login.password).map_err(|e| (C::BadUserNamePassword, e.to_string()))?;
    let sr = token.resource_uri().map_err(|e| (C::BadUserNamePassword, e.to_string()))?;
    let sr_host = sr.split('/').next().unwrap_or("");
    if !sr_host.eq_ignore_ascii_case(&user.host) {
        return Err((C::NotAuthorized, format!("token host '{sr_host}' does not match user name host '{}'", user.host)));
    }
    if !is_hub_host(shared, &user.host) {
        return Err((
            C::NotAuthorized,
            format!("token host '{}' is not this hub (it answers to {})", user.host, shared.host_names.join(", ")),
        ));
    }
    let now = now_ms() / 1000;
    let unauthorized = |e: Error| (C::NotAuthorized, e.to_string());
    let scope_path = sr.split_once('/').map_or("", |(_, p)| p).trim_end_matches('/');
    if let Some(skn) = &token.skn {
        let policy = shared
            .backend
            .registry()
            .policy(skn)
            .await
            .map_err(unavailable)?
            .ok_or((C::NotAuthorized, format!("unknown policy '{skn}'")))?;
        let key = verifying_key(&token, &policy.primary_key, &policy.secondary_key, now).map_err(unauthorized)?;
        if user.device_id == proto::SERVICE_MARKER {
            if !scope_path.is_empty() {
                return Err((C::NotAuthorized, "service tokens must be scoped to the hub (sr={host})".into()));
            }
            if !policy.rights.iter().any(|r| matches!(r, Right::RegistryRead | Right::RegistryReadWrite | Right::ServiceConnect)) {
                return Err((
                    C::NotAuthorized,
                    format!("policy '{skn}' has no service right (RegistryRead, RegistryReadWrite or ServiceConnect)"),
                ));
            }
            let cred = Credential::PolicyKey { policy: policy.name.clone(), key, device: None };
            return Ok(Identity::Service { policy: policy.name, rights: policy.rights, expires_s: token.expiry, cred });
        }
        // A policy with DeviceConnect acting for one device (token service / protocol gateway).
        if !policy.rights.contains(&Right::DeviceConnect) {
            return Err((C::NotAuthorized, format!("policy '{skn}' lacks DeviceConnect")));
        }
        let dev = device_checks(shared, c, &user.device_id).await?;
        if scope_path != "devices" && scope_path != format!("devices/{}", user.device_id) {
            return Err((C::NotAuthorized, "a policy token for a device must be scoped to {host}/devices or {host}/devices/{id}".into()));
        }
        let cred = Credential::PolicyKey { policy: policy.name, key, device: Some(dev.device_id.clone()) };
        return Ok(Identity::Device {
            id: dev.device_id,
            generation_id: dev.generation_id,
            auth_method: "hub",
            expires_s: token.expiry,
            cred,
        });
    }
    let dev = device_checks(shared, c, &user.device_id).await?;
    let key = verifying_key(&token, &dev.primary_key, &dev.secondary_key, now).map_err(unauthorized)?;
    // A device key only speaks for its own device: IoT Hub requires sr={host}/devices/{id}.
    if scope_path != format!("devices/{}", user.device_id) {
        return Err((C::NotAuthorized, "a device-key token must be scoped to {host}/devices/{id}".into()));
    }
    let cred = Credential::DeviceKey { device: dev.device_id.clone(), key };
    Ok(Identity::Device { id: dev.device_id, generation_id: dev.generation_id, auth_method: "device", expires_s: token.expiry, cred })
}

/// A backend that cannot answer while a client connects: CONNACK 3 (server unavailable), which
/// clients retry.
fn unavailable(e: Error) -> (ConnectReturnCode, String) {
    (ConnectReturnCode::ServiceUnavailable, format!("the hub's backend cannot answer: {e}"))
}

async fn device_checks(
    shared: &Shared,
    c: &Connect,
    device_id: &str,
) -> std::result::Result<crate::proto::DeviceIdentity, (ConnectReturnCode, String)> {
    if c.client_id != device_id {
        return Err((ConnectReturnCode::BadClientId, format!("client id '{}' must equal the device id '{device_id}'", c.client_id)));
    }
    let dev = shared
        .backend
        .registry()
        .device(device_id)
        .await
        .map_err(unavailable)?
        .ok_or((ConnectReturnCode::NotAuthorized, format!("device '{device_id}' is not registered")))?;
    if dev.status == DeviceStatus::Disabled {
        return Err((ConnectReturnCode::NotAuthorized, format!("device '{device_id}' is disabled")));
    }
    Ok(dev)
}

struct DeviceSession<'a> {
    shared: &'a Shared,
    conn_id: u64,
    persistent: bool,
    id: String,
    partition: u32,
    auth_method: &'static str,
    generation_id: String,
    idle: Duration,
    kick: Arc<Notify>,
    token_deadline: Instant,
}

/// A D2C message appended and not yet durable.
struct PendingAppend {
    /// Packet id to PUBACK (QoS 1).
    pkid: Option<u16>,
    ticket: AppendTicket,
    /// Bytes held against the session and hub bounds.
    bytes: usize,
    submitted: Instant,
}

/// Polls a future once without waiting: `Some` if it was ready.
async fn poll_once<F: Future + Unpin>(f: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        Poll::Ready(match std::pin::Pin::new(&mut *f).poll(cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        })
    })
    .await
}

/// How often a device session releases C2D locks that expired (a lock lasts `lock`).
fn lock_check_every(lock: Duration) -> Duration {
    (lock / 10).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

impl DeviceSession<'_> {
    async fn run(&mut self, reader: &mut Reader, writer: &mut Writer) -> Result<()> {
        let mut shutdown = self.shared.shutdown.clone();
        let mut drain = self.shared.drain.clone();
        let cfg = &self.shared.config;
        let backend = &self.shared.backend;
        // Appended D2C messages awaiting durability, in arrival order.
        let mut pending: VecDeque<PendingAppend> = VecDeque::new();
        let mut pending_bytes = 0usize;
        // C2D deliveries awaiting the device's PUBACK: packet id → queue seq.
        let mut c2d_in_flight: HashMap<u16, u64> = HashMap::new();
        let mut next_pkid: u16 = 1;
        let mut queue: Option<Box<dyn DeviceQueue>> = None;
        if self.persistent && backend.c2d().subscribed(&self.id).await? {
            queue = Some(backend.c2d().open_device(&self.id, self.conn_id, cfg.c2d_window).await?);
        }
        let mut lock_check = tokio::time::interval(lock_check_every(backend.c2d().limits().lock));
        lock_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut budget_wait = tokio::time::interval(Duration::from_millis(20));
        let mut draining = *drain.borrow();
        let mut deadline = Instant::now() + self.idle;
        let auth_method =
            format!("{{\"scope\":\"{}\",\"type\":\"sas\",\"issuer\":\"iothub\",\"acceptingIpFilterRule\":null}}", self.auth_method);
        let result = async {
            loop {
                // Acknowledge every append that became durable, in order, and give its bytes back.
                while let Some(front) = pending.front_mut() {
                    let Some(r) = poll_once(&mut front.ticket).await else { break };
                    let p = pending.pop_front().expect("front exists");
                    pending_bytes -= p.bytes;
                    self.appended(p, r, writer)?;
                }
                if draining && pending.is_empty() {
                    // Graceful drain: every PUBACK owed went out; the device reconnects elsewhere.
                    flush(writer, cfg.write_timeout, Some(&self.kick), &mut shutdown).await?;
                    return ended("drained");
                }
                if !flush(writer, cfg.write_timeout, Some(&self.kick), &mut shutdown).await? {
                    return ended("kicked or shut down while writing");
                }
                // Back-pressure: past a bound the peer's bytes stay in its socket until appended
                // messages became durable (the kernel then closes the TCP window).
                let own_full = pending.len() >= cfg.session_pending_messages || pending_bytes >= cfg.session_pending_bytes;
                let budget_full = self.shared.budget.exhausted();
                let can_read = !own_full && !budget_full && !draining;
                if !can_read {
                    // The peer cannot be heard while we do not read: its keep-alive starts over.
                    deadline = Instant::now() + self.idle;
                }
                let c2d_room = c2d_in_flight.len() < cfg.c2d_window;
                let nothing_pending = pending.is_empty();
                let front_durable = std::future::poll_fn(|cx| match pending.front_mut() {
                    Some(p) => p.ticket.as_mut().poll(cx),
                    None => Poll::Pending,
                });
                let next_c2d = async {
                    match queue.as_mut() {
                        Some(q) if c2d_room => q.next(Duration::from_secs(3600)).await,
                        _ => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    pkt = reader.next(), if can_read => {
                        deadline = Instant::now() + self.idle;
                        // Handle everything one read brought before writing again (batched PUBACKs).
                        let mut pkt = pkt?;
                        if pkt.is_none() {
                            return ended("peer closed");
                        }
                        let mut drain_packets = Drain::new();
                        // Records of this batch are encoded here; dropped with the batch, so an
                        // idle session holds no scratch memory.
                        let mut scratch = bytes::BytesMut::new();
                        while let Some(packet) = pkt.take() {
                            match packet {
                                Packet::Publish(p) if p.topic.starts_with(proto::C2D_SETTLE_PREFIX) => {
                                    wire::check_topic_name(&p.topic)?;
                                    let (how, seq) = settle_topic(&p.topic)?;
                                    c2d_in_flight.retain(|_, s| *s != seq);
                                    self.settle(queue.as_deref_mut(), seq, how).await?;
                                    if p.qos == QoS::AtLeastOnce {
                                        writer.queue(&Packet::PubAck(PubAck::new(p.pkid)))?;
                                    }
                                }
                                Packet::Publish(p) => {
                                    let (pkid, msg_id, record) = self.d2c(p, &auth_method, &mut scratch)?;
                                    let bytes = record.len();
                                    let submitted = Instant::now();
                                    let ticket = match backend.events().append(self.partition, &self.id, msg_id.as_deref(), record).await {
                                        Ok(t) => t,
                                        Err(e) => {
                                            self.shared.stats.backend_errors.fetch_add(1, Ordering::Relaxed);
                                            self.shared.stats.d2c_refused.fetch_add(1, Ordering::Relaxed);
                                            return Err(e);
                                        }
                                    };
                                    pending.push_back(PendingAppend { pkid, ticket, bytes, submitted });
                                    pending_bytes += bytes;
                                    self.shared.budget.take(bytes);
                                }
                                Packet::PingReq => writer.queue(&Packet::PingResp)?,
                                Packet::Subscribe(s) => {
                                    if s.filters.len() > 5 {
                                        return Err(Error::protocol("more than 5 subscriptions"));
                                    }
                                    let mut codes = Vec::new();
                                    for f in &s.filters {
                                        if !self.allowed_filter(&f.path) {
                                            return Err(Error::new(ErrorKind::Unauthorized, format!("device '{}' may not subscribe to '{}'", self.id, f.path.escape_debug())));
                                        }
                                        codes.push(SubscribeReasonCode::Success(QoS::AtLeastOnce));
                                    }
                                    writer.queue(&Packet::SubAck(SubAck::new(s.pkid, codes)))?;
                                    if queue.is_none() {
                                        queue = Some(backend.c2d().open_device(&self.id, self.conn_id, cfg.c2d_window).await?);
                                        if self.persistent {
                                            backend.c2d().set_subscription(&self.id, true).await?;
                                        }
                                    }
                                }
                                Packet::Unsubscribe(u) => writer.queue(&Packet::UnsubAck(UnsubAck::new(u.pkid)))?,
                                Packet::PubAck(a) => {
                                    // PUBACK of a C2D delivery = complete (IoT Hub MQTT semantics).
                                    if let Some(seq) = c2d_in_flight.remove(&a.pkid) {
                                        self.settle(queue.as_deref_mut(), seq, c2d::Settle::Complete).await?;
                                    }
                                }
                                Packet::Disconnect => return ended("DISCONNECT"),
                                other => return Err(Error::protocol(format!("unexpected {} from a device", packet_name(&other)))),
                            }
                            if pending.len() >= cfg.session_pending_messages || pending_bytes >= cfg.session_pending_bytes {
                                break; // the rest stays buffered until there is room
                            }
                            pkt = drain_packets.next(reader)?;
                        }
                    }
                    r = front_durable => {
                        let p = pending.pop_front().expect("polled the front");
                        pending_bytes -= p.bytes;
                        self.appended(p, r, writer)?;
                    }
                    d = next_c2d => {
                        if let Some(d) = d? {
                            let pkid = loop {
                                let id = next_pkid;
                                next_pkid = if id == u16::MAX { 1 } else { id + 1 };
                                if !c2d_in_flight.contains_key(&id) {
                                    break id;
                                }
                            };
                            let mut p = d.publish;
                            p.pkid = pkid;
                            writer.queue(&Packet::Publish(p))?;
                            c2d_in_flight.insert(pkid, d.seq);
                        }
                    }
                    _ = lock_check.tick(), if !c2d_in_flight.is_empty() => {
                        // Forget deliveries whose lock this connection no longer holds, so they
                        // can be delivered again (and a late PUBACK settles nothing).
                        if let Some(q) = queue.as_mut() {
                            let gone = q.expire_locks().await?;
                            c2d_in_flight.retain(|_, seq| !gone.contains(seq));
                        }
                    }
                    // Blocked by the hub-wide budget with nothing of our own pending: look again
                    // shortly (other sessions give bytes back as their appends become durable).
                    _ = budget_wait.tick(), if nothing_pending && budget_full => {}
                    _ = self.kick.notified() => return ended("kicked"),
                    _ = drain.changed(), if !draining => { draining = true; }
                    _ = tokio::time::sleep_until(self.token_deadline) => {
                        // IoT Hub closes a connection whose token expired (401003).
                        tracing::debug!(device = %self.id, "SAS token expired; closing the connection (401003)");
                        return Ok(());
                    }
                    _ = tokio::time::sleep_until(deadline) => return Err(Error::new(ErrorKind::Timeout, format!("device '{}' silent for {:?} (keep-alive × 1.5)", self.id, self.idle))),
                    _ = shutdown.changed() => return ended("hub shutdown"),
                }
            }
        }
        .await;
        self.shared.budget.release(pending_bytes);
        if let Some(q) = queue {
            if let Err(e) = q.close().await {
                self.shared.log_store_error("releasing C2D locks failed", &e);
            }
        }
        result
    }

    /// An append became durable (or failed): PUBACK it and give its bytes back.
    fn appended(&self, p: PendingAppend, r: Result<super::backend::Appended>, writer: &mut Writer) -> Result<()> {
        self.shared.budget.release(p.bytes);
        let a = r.inspect_err(|_| {
            self.shared.stats.backend_errors.fetch_add(1, Ordering::Relaxed);
            self.shared.stats.d2c_refused.fetch_add(1, Ordering::Relaxed);
        })?;
        self.shared.stats.commit_latency.observe(p.submitted.elapsed());
        if a.duplicate {
            self.shared.stats.d2c_duplicates.fetch_add(1, Ordering::Relaxed);
        } else {
            self.shared.stats.d2c_messages.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(pkid) = p.pkid {
            writer.queue(&Packet::PubAck(PubAck::new(pkid)))?;
        }
        Ok(())
    }

    /// Settles a delivery this connection holds. A settle after the lock was lost (412002) is
    /// ignored: the message was or will be delivered again.
    async fn settle(&self, queue: Option<&mut (dyn DeviceQueue + '_)>, seq: u64, how: c2d::Settle) -> Result<()> {
        let Some(q) = queue else { return Ok(()) };
        let stats = &self.shared.stats;
        match q.settle(seq, how).await {
            Ok(settled) => {
                if how == c2d::Settle::Abandon {
                    stats.c2d_abandoned.fetch_add(1, Ordering::Relaxed);
                }
                if let Settled::Done(status) = settled {
                    stats.count_outcome(status);
                }
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::LockLost => {
                tracing::debug!(device = %self.id, seq, "settle after lock loss ignored");
                Ok(())
            }
            Err(e) => {
                stats.backend_errors.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn allowed_filter(&self, f: &str) -> bool {
        f == "#" || f == "devices/+/messages/devicebound/#" || f == wire::c2d_filter(&self.id)
    }

    /// Validates and stamps one D2C publish; returns what to PUBACK once durable (the packet id
    /// for QoS 1), its message id (for de-dup) and the record to append.
    fn d2c(&self, p: Publish, auth_method: &str, scratch: &mut bytes::BytesMut) -> Result<(Option<u16>, Option<String>, bytes::Bytes)> {
        let qos1 = p.qos == QoS::AtLeastOnce;
        let enqueued = now_ms().to_string();
        let stamps = [
            ("iothub-connection-device-id", self.id.as_str()),
            ("iothub-connection-auth-generation-id", self.generation_id.as_str()),
            ("iothub-connection-auth-method", auth_method),
            ("iothub-enqueuedtime", enqueued.as_str()),
            ("iothub-message-source", "Telemetry"),
        ];
        scratch.clear();
        let message_id = d2c_record(&self.id, &p, &stamps, scratch)?;
        self.shared.stats.d2c_bytes.fetch_add(p.payload.len() as u64, Ordering::Relaxed);
        Ok((qos1.then_some(p.pkid), message_id, scratch.split().freeze()))
    }
}

/// The hubmsg extension: `$hubmsg/c2d/{abandon|reject}/{sequenceNumber}` settles a locked
/// message without PUBACK semantics (`docs/protocol.md`).
fn settle_topic(topic: &str) -> Result<(c2d::Settle, u64)> {
    let rest = &topic[proto::C2D_SETTLE_PREFIX.len()..];
    let bad = || Error::protocol(format!("bad settle topic '{topic}'"));
    let (how, seq) = rest.split_once('/').ok_or_else(bad)?;
    let seq: u64 = seq.parse().map_err(|_| bad())?;
    let how = match how {
        "abandon" => c2d::Settle::Abandon,
        "reject" => c2d::Settle::Reject,
        _ => return Err(bad()),
    };
    Ok((how, seq))
}

/// The device's own D2C topic of `p`, or the violation: QoS 2, wildcards or NUL in the topic, not
/// the device's D2C topic.
fn d2c_topic<'a>(device_id: &str, p: &'a Publish) -> Result<wire::D2cTopic<'a>> {
    if p.qos == QoS::ExactlyOnce {
        return Err(Error::protocol("QoS 2 is not supported (IoT Hub closes the connection)"));
    }
    wire::check_topic_name(&p.topic)?;
    let denied = || Error::new(ErrorKind::Unauthorized, format!("device '{device_id}' may not publish to '{}'", p.topic.escape_debug()));
    let topic = wire::parse_d2c_topic(&p.topic).ok_or_else(denied)?;
    if topic.device_id != device_id || topic.module_id.is_some() {
        return Err(denied());
    }
    Ok(topic)
}

/// The D2C message a device's PUBLISH carries, or the violation that closes the connection:
/// QoS 2, a topic that is not the device's own D2C topic (or has wildcards / NUL), a malformed
/// property bag, a bad message id, more than 256 KB (reference §4.5). Pure: no I/O.
pub fn d2c_message(device_id: &str, p: Publish) -> Result<Message> {
    let bag = wire::decode_bag(d2c_topic(device_id, &p)?.bag).map_err(|e| Error::protocol(format!("malformed property bag: {e}")))?;
    let mut msg = Message::new(p.payload);
    wire::apply_bag(&mut msg, bag).map_err(|e| Error::protocol(format!("malformed property bag: {e}")))?;
    if let Some(id) = &msg.message_id {
        wire::check_message_id(id).map_err(|e| Error::protocol(format!("bad $.mid: {}", e.message())))?;
    }
    // Senders cannot forge hub-stamped properties.
    msg.system.retain(|(k, _)| !k.starts_with("iothub-"));
    let size = msg.iothub_size();
    if size > MAX_D2C_SIZE {
        return Err(Error::new(ErrorKind::MessageTooLarge, format!("D2C message of {size} bytes exceeds {MAX_D2C_SIZE}")));
    }
    Ok(msg)
}

/// The hub's D2C ingest: validates `p` exactly as [`d2c_message`] does (same errors) and writes
/// the record [`d2c_message`] + [`Message::encode_with_system`] would (`stamps` appended to the
/// system properties, `mqtt-retain` for a retained publish) into `out`, reading the property bag
/// in place instead of decoding it into owned strings. Returns the message id (for de-dup).
pub(crate) fn d2c_record(device_id: &str, p: &Publish, stamps: &[(&str, &str)], out: &mut bytes::BytesMut) -> Result<Option<String>> {
    use std::borrow::Cow;
    let topic = d2c_topic(device_id, p)?;
    // The message id, correlation id, user id, content type and content encoding, in that order.
    let mut fixed: [Option<Cow<'_, str>>; 5] = Default::default();
    let mut times: [Option<u64>; 2] = [None, None];
    let mut props: Vec<(Cow<'_, str>, Cow<'_, str>)> = Vec::new();
    let mut system: Vec<(Cow<'_, str>, Cow<'_, str>)> = Vec::new();
    wire::for_each_bag_entry(topic.bag, |name, value| {
        let slot = match &*name {
            "$.mid" => 0,
            "$.cid" => 1,
            "$.uid" => 2,
            "$.ct" => 3,
            "$.ce" => 4,
            "$.ctime" => {
                times[0] = wire::bag_time(&name, value.as_deref())?;
                return Ok(());
            }
            "$.exp" => {
                times[1] = wire::bag_time(&name, value.as_deref())?;
                return Ok(());
            }
            // Senders cannot forge hub-stamped properties.
            n if n.starts_with("iothub-") => return Ok(()),
            n => {
                let system_name = n.starts_with("$.");
                let entry = (name, value.unwrap_or_default());
                if system_name {
                    system.push(entry);
                } else {
                    props.push(entry);
                }
                return Ok(());
            }
        };
        fixed[slot] = value;
        Ok(())
    })
    .map_err(|e| Error::protocol(format!("malformed property bag: {e}")))?;
    if let Some(id) = &fixed[0] {
        wire::check_message_id(id).map_err(|e| Error::protocol(format!("bad $.mid: {}", e.message())))?;
    }
    let sys_len: usize = fixed.iter().flatten().map(|s| s.len()).sum::<usize>() + times.iter().flatten().count() * 24;
    let size = p.payload.len() + sys_len + props.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
    if size > MAX_D2C_SIZE {
        return Err(Error::new(ErrorKind::MessageTooLarge, format!("D2C message of {size} bytes exceeds {MAX_D2C_SIZE}")));
    }
    if p.retain {
        props.push((Cow::Borrowed("mqtt-retain"), Cow::Borrowed("true")));
    }
    let fixed_refs = [0, 1, 2, 3, 4].map(|i| fixed[i].as_deref());
    crate::message::encode_record(
        fixed_refs,
        times,
        props.iter().map(|(k, v)| (&**k, &**v)),
        system.iter().map(|(k, v)| (&**k, &**v)).chain(stamps.iter().copied()),
        &p.payload,
        out,
    );
    Ok(fixed[0].take().map(Cow::into_owned))
}

struct Consumer {
    group: String,
    window: usize,
    from: proto::StartPosition,
    first_assignment: bool,
    membership: Box<dyn Membership>,
    assignment: watch::Receiver<Vec<u32>>,
    readers: HashMap<u32, Box<dyn PartitionReader>>,
    /// Partitions in the order readers are polled (rotated for fairness).
    order: Vec<u32>,
    /// Payload bytes of unacknowledged events on this connection (bounded by
    /// `consumer_window_bytes`, whatever the event sizes).
    bytes_in_flight: usize,
}

impl Consumer {
    /// The next events of any owned partition (cancel-safe: readers keep what they fetched).
    fn poll_events(&mut self, cx: &mut std::task::Context<'_>, byte_window: usize) -> Poll<Result<(u32, Vec<StoredEvent>)>> {
        if self.bytes_in_flight >= byte_window {
            return Poll::Pending; // polled again after acknowledgements
        }
        let room = byte_window - self.bytes_in_flight;
        for i in 0..self.order.len() {
            let p = self.order[i];
            let Some(r) = self.readers.get_mut(&p) else { continue };
            if let Poll::Ready(res) = r.poll_next(cx, 512, room.min(1024 * 1024)) {
                self.order.rotate_left(i + 1);
                return Poll::Ready(res.map(|evs| (p, evs)));
            }
        }
        Poll::Pending
    }
}

/// What a hub → service publish carried, by packet id.
#[derive(Debug)]
enum Outgoing {
    /// A D2C event (partition, seq, payload bytes).
    Event(u32, u64, usize),
    /// A feedback batch (its id, records, and its place in the window).
    Feedback(u64, usize, tokio::sync::OwnedSemaphorePermit),
}

/// Feedback batches in flight to one service connection.
const FEEDBACK_WINDOW: usize = 4;

/// Records in one outcome notification at most.
const NOTIFICATION_RECORDS: usize = 64;

/// Longest message id a watch may name (bytes).
const MAX_WATCH_ID: usize = 1024;

/// The task that fetches feedback batches for one service connection, at most
/// [`FEEDBACK_WINDOW`] unacknowledged.
struct FeedbackPump {
    rx: mpsc::Receiver<(FeedbackBatch, tokio::sync::OwnedSemaphorePermit)>,
    task: tokio::task::JoinHandle<()>,
}

impl FeedbackPump {
    fn start(shared: Arc<Shared>, conn: u64) -> FeedbackPump {
        let (tx, rx) = mpsc::channel(FEEDBACK_WINDOW);
        let window = Arc::new(tokio::sync::Semaphore::new(FEEDBACK_WINDOW));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = window.clone().acquire_owned().await else { return };
                match shared.backend.feedback().next_batch(conn, shared.config.feedback_interval).await {
                    Ok(Some(b)) => {
                        if tx.send((b, permit)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        shared.stats.backend_errors.fetch_add(1, Ordering::Relaxed);
                        shared.log_store_error("fetching feedback failed; will retry", &e);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        FeedbackPump { rx, task }
    }
}

struct ServiceSession<'a> {
    shared: &'a Arc<Shared>,
    member: u64,
    policy: String,
    rights: Vec<Right>,
    idle: Duration,
    consumer: Option<Consumer>,
    /// Feedback batches flow to this connection (after `feedback.subscribe`).
    feedback: Option<FeedbackPump>,
    /// Outcome notifications of the ids this connection watches (after `outcomes.watch`).
    notifications: Option<(super::outcomes::NotificationTx, mpsc::UnboundedReceiver<proto::FeedbackRecord>)>,
    pkids: HashMap<u16, Outgoing>,
    next_pkid: u16,
    responses: (mpsc::UnboundedSender<(u64, Response)>, Responses),
    /// Requests taken and not yet answered (bounded by [`MAX_SERVICE_REQUESTS`]).
    running: usize,
    token_deadline: Instant,
    /// Notified when the key this connection authenticated with is replaced.
    revoke: Option<Arc<Notify>>,
    /// The key was replaced: read nothing more, close once running requests are answered.
    revoked: bool,
}

/// Answers of spawned request handlers: (request id, response).
type Responses = mpsc::UnboundedReceiver<(u64, Response)>;

impl<'a> ServiceSession<'a> {
    fn new(shared: &'a Arc<Shared>, member: u64, policy: String, rights: Vec<Right>, idle: Duration, token_deadline: Instant) -> Self {
        ServiceSession {
            shared,
            member,
            policy,
            rights,
            idle,
            consumer: None,
            feedback: None,
            notifications: None,
            pkids: HashMap::new(),
            next_pkid: 1,
            responses: mpsc::unbounded_channel(),
            running: 0,
            token_deadline,
            revoke: None,
            revoked: false,
        }
    }

    async fn run(&mut self, reader: &mut Reader, writer: &mut Writer) -> Result<()> {
        let mut shutdown = self.shared.shutdown.clone();
        let mut drain = self.shared.drain.clone();
        let mut deadline = Instant::now() + self.idle;
        let stall = self.shared.config.consumer_stall_timeout;
        let byte_window = self.shared.config.consumer_window_bytes;
        // Last time this consumer acknowledged something (or had nothing outstanding).
        let mut progress = Instant::now();
        loop {
            if !flush(writer, self.shared.config.write_timeout, None, &mut shutdown).await? {
                return ended("hub shutdown while writing");
            }
            if self.revoked && self.running == 0 {
                return ended("the key it authenticated with was replaced");
            }
            let outstanding = self.pkids.values().any(|o| matches!(o, Outgoing::Event(..)));
            if !outstanding {
                progress = Instant::now();
            }
            let can_read = self.running < MAX_SERVICE_REQUESTS && !self.revoked;
            if !can_read {
                deadline = Instant::now() + self.idle;
            }
            let mut assignment = self.consumer.as_ref().map(|c| c.assignment.clone());
            let assignment_changed = async {
                match assignment.as_mut() {
                    Some(a) => a.changed().await,
                    None => std::future::pending().await,
                }
            };
            let consumer = &mut self.consumer;
            let events = std::future::poll_fn(|cx| match consumer.as_mut() {
                Some(c) => c.poll_events(cx, byte_window),
                None => Poll::Pending,
            });
            let fb = &mut self.feedback;
            let batch = async {
                match fb.as_mut() {
                    Some(f) => f.rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let notes = &mut self.notifications;
            let note = async {
                match notes.as_mut() {
                    Some((_, rx)) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let revoke = self.revoke.clone();
            let revoked = async {
                match revoke {
                    Some(r) => r.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                pkt = reader.next(), if can_read => {
                    deadline = Instant::now() + self.idle;
                    // Handle every buffered packet (e.g. a burst of consumer PUBACKs) before
                    // refilling and writing, so refills go out in batches.
                    let mut pkt = pkt?;
                    if pkt.is_none() {
                        return ended("peer closed");
                    }
                    let mut drain_packets = Drain::new();
                    while let Some(packet) = pkt.take() {
                        match packet {
                            Packet::Disconnect => return ended("DISCONNECT"),
                            Packet::Publish(p) => {
                                if p.qos == QoS::ExactlyOnce {
                                    return Err(Error::protocol("QoS 2 is not supported"));
                                }
                                wire::check_topic_name(&p.topic)?;
                                if p.qos == QoS::AtLeastOnce {
                                    writer.queue(&Packet::PubAck(PubAck::new(p.pkid)))?;
                                }
                                self.request(p).await?;
                            }
                            Packet::PubAck(a) => {
                                if self.acked(a.pkid).await? {
                                    progress = Instant::now();
                                }
                            }
                            Packet::PingReq => writer.queue(&Packet::PingResp)?,
                            Packet::Subscribe(s) => {
                                let codes = s.filters.iter().map(|_| SubscribeReasonCode::Success(QoS::AtLeastOnce)).collect();
                                writer.queue(&Packet::SubAck(SubAck::new(s.pkid, codes)))?;
                            }
                            Packet::Unsubscribe(u) => writer.queue(&Packet::UnsubAck(UnsubAck::new(u.pkid)))?,
                            other => return Err(Error::protocol(format!("unexpected {} from a service", packet_name(&other)))),
                        }
                        if self.running >= MAX_SERVICE_REQUESTS {
                            break; // the rest waits in the reader until answers went out
                        }
                        pkt = drain_packets.next(reader)?;
                    }
                }
                Some((rid, resp)) = self.responses.1.recv() => {
                    self.running = self.running.saturating_sub(1);
                    let body = serde_json::to_vec(&resp).expect("response serializes");
                    writer.queue(&Packet::Publish(Publish::new(proto::response_topic(rid), QoS::AtMostOnce, body)))?;
                }
                r = assignment_changed => { if r.is_ok() { self.reassign().await?; } }
                _ = revoked, if !self.revoked => { self.revoked = true; }
                r = events => {
                    let (p, evs) = r?;
                    self.send_events(writer, p, evs)?;
                }
                Some((b, permit)) = batch => {
                    let pkid = next_free_pkid(&mut self.next_pkid, &self.pkids);
                    let body = serde_json::to_vec(&b.records).expect("feedback serializes");
                    let mut p = Publish::new(format!("{}{}", proto::FEEDBACK_PREFIX, b.id), QoS::AtLeastOnce, body);
                    p.pkid = pkid;
                    writer.queue(&Packet::Publish(p))?;
                    self.shared.stats.feedback_batches.fetch_add(1, Ordering::Relaxed);
                    self.pkids.insert(pkid, Outgoing::Feedback(b.id, b.records.len(), permit));
                }
                Some(first) = note => {
                    // Everything waiting goes out in one notification (QoS 0: the watch is
                    // connection-scoped; after a reconnect the client watches again and the
                    // cache answers what it missed).
                    let mut records = vec![first];
                    if let Some((_, rx)) = self.notifications.as_mut() {
                        while records.len() < NOTIFICATION_RECORDS {
                            match rx.try_recv() {
                                Ok(r) => records.push(r),
                                Err(_) => break,
                            }
                        }
                    }
                    let body = serde_json::to_vec(&records).expect("records serialize");
                    writer.queue(&Packet::Publish(Publish::new(proto::OUTCOMES_TOPIC, QoS::AtMostOnce, body)))?;
                    self.shared.stats.outcome_notifications.fetch_add(records.len() as u64, Ordering::Relaxed);
                }
                _ = tokio::time::sleep_until(progress + stall), if outstanding => {
                    return Err(Error::new(ErrorKind::Timeout, format!(
                        "consumer acknowledged nothing for {stall:?} with events outstanding; closing it so its partitions move to the other members"
                    )));
                }
                _ = tokio::time::sleep_until(self.token_deadline) => {
                    tracing::debug!(policy = %self.policy, "SAS token expired; closing the service connection (401003)");
                    return Ok(());
                }
                _ = tokio::time::sleep_until(deadline) => return Err(Error::new(ErrorKind::Timeout, "service connection silent past keep-alive")),
                _ = drain.changed() => return ended("hub draining"),
                _ = shutdown.changed() => return ended("hub shutdown"),
            }
        }
    }
}

impl ServiceSession<'_> {
    /// Handles a request publish. `consume`, `checkpoint` and `feedback.subscribe` change or read
    /// this session and run inline; everything else runs on its own task and answers through the
    /// response channel.
    async fn request(&mut self, p: Publish) -> Result<()> {
        let (op, rid) = proto::parse_request_topic(&p.topic)
            .ok_or_else(|| Error::new(ErrorKind::Unauthorized, format!("services may only publish requests, not to '{}'", p.topic)))?;
        let tx = self.responses.0.clone();
        self.running += 1;
        if matches!(op, "consume" | "feedback.subscribe" | "checkpoint" | "outcomes.watch" | "outcomes.unwatch") {
            // Inline, so a watch is in place before a `c2d.send` behind it on the connection runs.
            let r = match op {
                "consume" => self.start_consume(&p.payload).await,
                "checkpoint" => self.checkpoint().await,
                "outcomes.watch" => self.watch(&p.payload),
                "outcomes.unwatch" => self.unwatch(&p.payload),
                _ => need(&self.rights, Right::ServiceConnect, op).map(|()| {
                    if self.feedback.is_none() {
                        self.feedback = Some(FeedbackPump::start(self.shared.clone(), self.member));
                    }
                    serde_json::json!({})
                }),
            };
            let _ = tx.send((rid, r.map_or_else(|e| Response::err(&e), Response::ok)));
            return Ok(());
        }
        let (op, shared, rights, policy) = (op.to_string(), self.shared.clone(), self.rights.clone(), self.policy.clone());
        tokio::spawn(async move {
            let resp = match handle(&shared, &rights, &op, &p.payload).await {
                Ok(v) => Response::ok(v),
                Err(e) => {
                    tracing::debug!(%policy, %op, error = %e, "request failed");
                    Response::err(&e)
                }
            };
            let _ = tx.send((rid, resp));
        });
        Ok(())
    }

    /// `outcomes.watch`: notify this connection of the outcomes of these message ids.
    fn watch(&mut self, body: &[u8]) -> Result<serde_json::Value> {
        need(&self.rights, Right::ServiceConnect, "outcomes.watch")?;
        let req: proto::WatchOutcomes = proto::parse_body("outcomes.watch", body)?;
        if let Some(bad) = req.ids.iter().find(|id| id.is_empty() || id.len() > MAX_WATCH_ID) {
            return Err(Error::invalid(format!("outcomes.watch: message id of {} bytes (ids are 1 to {MAX_WATCH_ID} bytes)", bad.len())));
        }
        // Read before the watch is in place: every record that arrives after it was either
        // notified through this watch or, for a re-sent watch, is found in the cache.
        let at = now_ms();
        let (tx, _) = self.notifications.get_or_insert_with(mpsc::unbounded_channel);
        self.shared.outcomes.watch(self.member, tx, &req.ids, req.since)?;
        Ok(to_json(&proto::Watching { at }))
    }

    /// `outcomes.unwatch`: these waits ended (answered, cancelled or timed out).
    fn unwatch(&mut self, body: &[u8]) -> Result<serde_json::Value> {
        need(&self.rights, Right::ServiceConnect, "outcomes.unwatch")?;
        let req: proto::UnwatchOutcomes = proto::parse_body("outcomes.unwatch", body)?;
        self.shared.outcomes.unwatch(self.member, &req.ids);
        Ok(serde_json::json!({}))
    }

    /// `checkpoint`: every position this connection acknowledged is durable.
    async fn checkpoint(&mut self) -> Result<serde_json::Value> {
        need(&self.rights, Right::ServiceConnect, "checkpoint")?;
        if let Some(c) = &mut self.consumer {
            for r in c.readers.values_mut() {
                r.checkpoint().await?;
            }
        }
        Ok(serde_json::json!({}))
    }

    async fn start_consume(&mut self, body: &[u8]) -> Result<serde_json::Value> {
        need(&self.rights, Right::ServiceConnect, "consume")?;
        if let Some(c) = &self.consumer {
            return Err(Error::invalid(format!(
                "this connection already consumes group '{}'; open another connection for another group",
                c.group
            )));
        }
        let req: ConsumeRequest = proto::parse_body("consume", body)?;
        let partitions = self.shared.partitions;
        // Packet ids are 16-bit: keep the total in flight below 60,000.
        let window = (req.window.max(1) as usize).min(60_000 / partitions as usize);
        let member_id = format!("{}/{}", self.shared.node_id, self.member);
        let membership = self.shared.backend.groups().join(&req.group, &member_id).await?;
        let assignment = membership.assignment();
        self.consumer = Some(Consumer {
            group: req.group.clone(),
            window,
            from: req.from,
            first_assignment: true,
            membership,
            assignment,
            readers: HashMap::new(),
            order: Vec::new(),
            bytes_in_flight: 0,
        });
        self.reassign().await?;
        Ok(serde_json::json!({ "partitions": partitions, "window": window }))
    }

    /// Follows the group's assignment: drops readers of partitions that moved away (their
    /// unacknowledged events are redelivered to the new owner), opens readers for new ones.
    async fn reassign(&mut self) -> Result<()> {
        let Some(c) = &mut self.consumer else { return Ok(()) };
        let assigned: Vec<u32> = c.assignment.borrow_and_update().clone();
        let released: usize = self
            .pkids
            .values()
            .filter_map(|o| match o {
                Outgoing::Event(p, _, n) if !assigned.contains(p) => Some(*n),
                _ => None,
            })
            .sum();
        c.bytes_in_flight = c.bytes_in_flight.saturating_sub(released);
        c.readers.retain(|p, _| assigned.contains(p));
        self.pkids.retain(|_, o| !matches!(o, Outgoing::Event(p, _, _) if !assigned.contains(p)));
        let from = if c.first_assignment { c.from } else { proto::StartPosition::Checkpoint };
        c.first_assignment = false;
        for p in &assigned {
            if c.readers.contains_key(p) {
                continue;
            }
            let r = c.membership.open(*p, from, c.window).await?;
            c.readers.insert(*p, r);
        }
        c.order = assigned;
        Ok(())
    }

    /// Sends the events one reader returned.
    fn send_events(&mut self, writer: &mut Writer, p: u32, evs: Vec<StoredEvent>) -> Result<()> {
        let Some(c) = &mut self.consumer else { return Ok(()) };
        for e in evs {
            let n = e.record.len();
            let pkid = next_free_pkid(&mut self.next_pkid, &self.pkids);
            let mut publish = Publish::from_bytes(proto::event_topic(&c.group, p, e.seq), QoS::AtLeastOnce, e.record);
            publish.pkid = pkid;
            writer.queue(&Packet::Publish(publish))?;
            self.pkids.insert(pkid, Outgoing::Event(p, e.seq, n));
            c.bytes_in_flight += n;
            self.shared.stats.events_delivered.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Handles a PUBACK; true if it acknowledged an event.
    async fn acked(&mut self, pkid: u16) -> Result<bool> {
        match self.pkids.remove(&pkid) {
            None => Ok(false),
            Some(Outgoing::Feedback(id, records, permit)) => {
                drop(permit);
                match self.shared.backend.feedback().ack_batch(id).await {
                    Ok(()) => {
                        self.shared.stats.feedback_records.fetch_add(records as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.shared.stats.backend_errors.fetch_add(1, Ordering::Relaxed);
                        self.shared.log_store_error("recording a feedback acknowledgement failed; it will be delivered again", &e);
                    }
                }
                Ok(false)
            }
            Some(Outgoing::Event(p, seq, n)) => {
                let Some(c) = &mut self.consumer else { return Ok(true) };
                c.bytes_in_flight = c.bytes_in_flight.saturating_sub(n);
                if let Some(r) = c.readers.get_mut(&p) {
                    if let Err(e) = r.ack(seq).await {
                        self.shared.stats.backend_errors.fetch_add(1, Ordering::Relaxed);
                        return Err(e);
                    }
                }
                Ok(true)
            }
        }
    }
}

fn next_free_pkid(next: &mut u16, used: &HashMap<u16, Outgoing>) -> u16 {
    loop {
        let id = *next;
        *next = if id == u16::MAX { 1 } else { id + 1 };
        if !used.contains_key(&id) {
            return id;
        }
    }
}

/// Whether `rights` grant `r` (IoT Hub: RegistryReadWrite includes RegistryRead).
fn need(rights: &[Right], r: Right, op: &str) -> Result<()> {
    if rights.contains(&r) || (r == Right::RegistryRead && rights.contains(&Right::RegistryReadWrite)) {
        Ok(())
    } else {
        Err(Error::new(ErrorKind::Unauthorized, format!("'{op}' needs the {r:?} right, which this policy does not have")))
    }
}

fn not_registered(id: &str) -> Error {
    Error::new(ErrorKind::NotFound, format!("device '{id}' is not registered"))
}

async fn handle(shared: &Arc<Shared>, rights: &[Right], op: &str, body: &[u8]) -> Result<serde_json::Value> {
    let r = handle_op(shared, rights, op, body).await;
    if let Err(e) = &r {
        if matches!(e.kind(), ErrorKind::Storage | ErrorKind::Disconnected | ErrorKind::Timeout) {
            shared.stats.backend_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    r
}

async fn handle_op(shared: &Arc<Shared>, rights: &[Right], op: &str, body: &[u8]) -> Result<serde_json::Value> {
    let registry = shared.backend.registry();
    let queues = shared.backend.c2d();
    match op {
        "devices.create" => {
            need(rights, Right::RegistryReadWrite, op)?;
            let req: proto::CreateDevice = proto::parse_body(op, body)?;
            Ok(to_json(&registry.create(req).await?))
        }
        "devices.get" => {
            need(rights, Right::RegistryRead, op)?;
            let req: proto::DeviceRef = proto::parse_body(op, body)?;
            let d = registry.device(&req.device_id).await?.ok_or_else(|| not_registered(&req.device_id))?;
            Ok(to_json(&d))
        }
        "devices.list" => {
            need(rights, Right::RegistryRead, op)?;
            Ok(to_json(&registry.devices().await?))
        }
        "devices.delete" => {
            need(rights, Right::RegistryReadWrite, op)?;
            let req: proto::DeviceRef = proto::parse_body(op, body)?;
            if registry.device(&req.device_id).await?.is_none() {
                return Err(not_registered(&req.device_id));
            }
            // The queue goes first (with Purged feedback) and with it the persistent
            // subscription, so a device re-created under the same id starts empty; a crash in
            // between leaves the identity, and the client's retry of the delete finishes it.
            queues.delete_device(&req.device_id).await?;
            registry.delete(&req.device_id).await?;
            queues.delete_device(&req.device_id).await?;
            // This node at once; other nodes through the registry watch.
            shared.kick(&req.device_id);
            Ok(serde_json::json!({}))
        }
        "devices.update" => {
            need(rights, Right::RegistryReadWrite, op)?;
            let req: proto::UpdateDevice = proto::parse_body(op, body)?;
            let d = registry.update(&req.device_id, req.status, req.regenerate.as_deref()).await?;
            // A session whose key this took away ends: this node at once, other nodes through
            // the registry watch.
            shared.on_registry_change(&RegistryChange::Put(d.clone()));
            Ok(to_json(&d))
        }
        "c2d.send" => {
            need(rights, Right::ServiceConnect, op)?;
            let req: proto::C2dSend = proto::parse_body(op, body)?;
            let dev = registry.device(&req.device_id).await?.ok_or_else(|| not_registered(&req.device_id))?;
            use base64::Engine;
            let record = base64::engine::general_purpose::STANDARD
                .decode(&req.record)
                .map_err(|e| Error::invalid(format!("c2d.send: record is not base64: {e}")))?;
            let record = bytes::Bytes::from(record);
            let msg = Message::decode(&record).map_err(|e| Error::invalid(format!("c2d.send: {e}")))?;
            let message_id = msg.message_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            wire::check_message_id(&message_id).map_err(|e| Error::invalid(format!("c2d.send: {}", e.message())))?;
            let size = c2d::delivery_size(&dev.device_id, &message_id, req.ack, &record, queues.limits())?;
            let seq = queues
                .send(C2dEnqueue {
                    device_id: dev.device_id,
                    generation_id: dev.generation_id,
                    message_id: message_id.clone(),
                    ack: req.ack,
                    ttl: req.ttl_ms.map(Duration::from_millis),
                    record,
                    size,
                    send_id: req.send_id,
                })
                .await?;
            shared.stats.c2d_sent.fetch_add(1, Ordering::Relaxed);
            Ok(to_json(&proto::C2dReceipt { message_id, sequence_number: seq }))
        }
        "c2d.purge" => {
            need(rights, Right::ServiceConnect, op)?;
            let req: proto::DeviceRef = proto::parse_body(op, body)?;
            if registry.device(&req.device_id).await?.is_none() {
                return Err(not_registered(&req.device_id));
            }
            let n = queues.purge(&req.device_id).await?;
            shared.stats.c2d_purged.fetch_add(n as u64, Ordering::Relaxed);
            Ok(to_json(&proto::PurgeResult { device_id: req.device_id, total_messages_purged: n as u64 }))
        }
        "policies.list" => {
            need_owner(rights, op)?;
            Ok(to_json(&registry.policies().await?))
        }
        "policies.regenerate" => {
            need_owner(rights, op)?;
            let req: proto::RegeneratePolicyKey = proto::parse_body(op, body)?;
            let p = registry.regenerate_policy(&req.name, &req.key).await?;
            shared.refresh_owner_file().await?;
            // Connections authenticated with a replaced key close (this one after its answer):
            // this node at once, other nodes through the registry watch.
            shared.on_registry_change(&RegistryChange::Policy(p.clone()));
            Ok(to_json(&p))
        }
        "hub.info" => Ok(serde_json::json!({
            "partitions": shared.partitions,
            "version": env!("CARGO_PKG_VERSION"),
            "backend": shared.backend.kind(),
        })),
        _ => Err(Error::invalid(format!("unknown operation '{op}'"))),
    }
}

/// Policy management needs a policy holding every right (like `iothubowner`).
fn need_owner(rights: &[Right], op: &str) -> Result<()> {
    for r in [Right::RegistryReadWrite, Right::ServiceConnect, Right::DeviceConnect] {
        if !rights.contains(&r) {
            return Err(Error::new(ErrorKind::Unauthorized, format!("'{op}' needs a policy with every right (like iothubowner)")));
        }
    }
    Ok(())
}

fn to_json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("response serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{DeviceIdentity, Policy};

    fn dev(id: &str, status: DeviceStatus, keys: (&str, &str)) -> RegistryChange {
        RegistryChange::Put(DeviceIdentity {
            device_id: id.into(),
            generation_id: "g".into(),
            status,
            primary_key: keys.0.into(),
            secondary_key: keys.1.into(),
            created_ms: 0,
        })
    }

    fn policy(name: &str, keys: (&str, &str)) -> RegistryChange {
        RegistryChange::Policy(Policy { name: name.into(), primary_key: keys.0.into(), secondary_key: keys.1.into(), rights: vec![] })
    }

    #[test]
    fn a_device_key_connection_ends_only_when_its_own_key_or_device_goes() {
        let c = Credential::DeviceKey { device: "d1".into(), key: "k1".into() };
        assert!(c.survives(&dev("d1", DeviceStatus::Enabled, ("k1", "new"))), "the other key was replaced");
        assert!(c.survives(&dev("d1", DeviceStatus::Enabled, ("new", "k1"))), "the key moved slots but is in force");
        assert!(!c.survives(&dev("d1", DeviceStatus::Enabled, ("new", "other"))));
        assert!(!c.survives(&dev("d1", DeviceStatus::Disabled, ("k1", "k2"))));
        assert!(!c.survives(&RegistryChange::Deleted("d1".into())));
        assert!(c.survives(&dev("d2", DeviceStatus::Disabled, ("x", "y"))), "another device");
        assert!(c.survives(&RegistryChange::Deleted("d2".into())));
        assert!(c.survives(&policy("device", ("x", "y"))), "device keys are not policy keys");
    }

    #[test]
    fn a_policy_key_connection_ends_with_its_key_or_the_device_it_speaks_for() {
        let svc = Credential::PolicyKey { policy: "service".into(), key: "p1".into(), device: None };
        assert!(svc.survives(&policy("service", ("p1", "new"))));
        assert!(!svc.survives(&policy("service", ("new", "p2"))));
        assert!(svc.survives(&policy("registryRead", ("new", "new2"))), "another policy");
        assert!(svc.survives(&dev("d1", DeviceStatus::Disabled, ("p1", "p1"))), "a service speaks for no device");
        assert!(svc.survives(&RegistryChange::Deleted("d1".into())));
        let gw = Credential::PolicyKey { policy: "device".into(), key: "p1".into(), device: Some("d1".into()) };
        assert!(gw.survives(&dev("d1", DeviceStatus::Enabled, ("a", "b"))), "the device's own keys do not matter");
        assert!(!gw.survives(&dev("d1", DeviceStatus::Disabled, ("a", "b"))));
        assert!(!gw.survives(&RegistryChange::Deleted("d1".into())));
        assert!(!gw.survives(&policy("device", ("x", "y"))));
        assert_eq!((gw.device(), gw.policy()), (Some("d1"), Some("device")));
        assert_eq!((svc.device(), svc.policy()), (None, Some("service")));
    }

    /// The in-place ingest writes the record the owned path (decode into a `Message`, stamp,
    /// encode) writes, and refuses what it refuses with the same kind of error.
    #[test]
    fn in_place_ingest_matches_the_owned_decode() {
        let stamps = [("iothub-connection-device-id", "d1"), ("iothub-enqueuedtime", "1700000000000")];
        let ok_bags = [
            "",
            "%24.mid=m-1",
            "%24.mid=m-1&%24.ctime=2026-12-02T02%3A00%3A00.000Z&%24.ct=application%2Fjson&%24.ce=utf-8",
            "%24.cid=c&%24.uid=u&%24.exp=2099-01-01T00%3A00%3A00.000Z&a=1&b%20b=&c",
            "$.mid=raw-dollar&k=v%3Dw&iothub-connection-device-id=forged&%24.to=x&%24.custom=y",
            "%24.mid=first&%24.mid=second&%24.cid",
            "?%24.mid=q/",
        ];
        for bag in ok_bags {
            for retain in [false, true] {
                let mut p = Publish::new(wire::d2c_topic("d1", bag), QoS::AtLeastOnce, vec![7u8; 300]);
                p.retain = retain;
                let mut want = d2c_message("d1", p.clone()).unwrap_or_else(|e| panic!("{bag}: {e}"));
                if retain {
                    want.properties.push(("mqtt-retain".into(), "true".into()));
                }
                let mut expected = bytes::BytesMut::new();
                want.encode_with_system(&stamps, &mut expected);
                let mut got = bytes::BytesMut::new();
                let id = d2c_record("d1", &p, &stamps, &mut got).unwrap();
                assert_eq!(got, expected, "bag {bag:?}");
                assert_eq!(id, want.message_id, "bag {bag:?}");
                assert_eq!(Message::decode(&got.freeze()).unwrap().message_id, want.message_id);
            }
        }
        let bad_topics = [
            "devices/d1/messages/events/%24.mid=a%ZZ",
            "devices/d1/messages/events/a==b",
            "devices/d1/messages/events/&&",
            "devices/d1/messages/events/%24.ctime=yesterday",
            "devices/d1/messages/events/%24.mid=",
            "devices/d2/messages/events/",
            "devices/d1/modules/m/messages/events/",
            "devices/d1/messages/events/+",
            "devices/d1/messages/events/a\0",
            "elsewhere",
        ];
        for topic in bad_topics {
            let p = Publish::new(topic, QoS::AtLeastOnce, vec![1u8; 10]);
            let want = d2c_message("d1", p.clone()).expect_err(topic);
            let got = d2c_record("d1", &p, &stamps, &mut bytes::BytesMut::new()).expect_err(topic);
            assert_eq!(got.kind(), want.kind(), "{topic}: {got} vs {want}");
        }
        let big = Publish::new(wire::d2c_topic("d1", "k=v"), QoS::AtLeastOnce, vec![0u8; MAX_D2C_SIZE]);
        assert_eq!(d2c_record("d1", &big, &stamps, &mut bytes::BytesMut::new()).unwrap_err().kind(), ErrorKind::MessageTooLarge);
        let qos2 = Publish::new(wire::d2c_topic("d1", ""), QoS::ExactlyOnce, vec![0u8; 1]);
        assert_eq!(d2c_record("d1", &qos2, &stamps, &mut bytes::BytesMut::new()).unwrap_err().kind(), ErrorKind::Protocol);
    }
}
