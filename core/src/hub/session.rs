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
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck};
use rumqttc::mqttbytes::QoS;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::c2d;
use super::registry::Right;
use super::Shared;
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
/// force: once it is replaced, or the device it speaks for is disabled or deleted, the session
/// ends (woken by [`Shared::credentials_changed`]). No `Debug`: it holds a key.
pub(crate) enum Credential {
    /// A device's own key.
    DeviceKey { device: String, key: String },
    /// A policy key; `device` when the policy's token speaks for one device (token service).
    PolicyKey { policy: String, key: String, device: Option<String> },
}

impl Credential {
    /// Whether the key is still one of its identity's two keys (and the device, if any, still
    /// exists and is enabled).
    fn in_force(&self, shared: &Shared) -> bool {
        let device_ok = |id: &str, key: Option<&str>| {
            shared
                .registry
                .device(id)
                .is_some_and(|d| d.status == DeviceStatus::Enabled && key.is_none_or(|k| d.primary_key == k || d.secondary_key == k))
        };
        match self {
            Credential::DeviceKey { device, key } => device_ok(device, Some(key)),
            Credential::PolicyKey { policy, key, device } => {
                shared.registry.policy(policy).is_some_and(|p| p.primary_key == *key || p.secondary_key == *key)
                    && device.as_deref().is_none_or(|d| device_ok(d, None))
            }
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
    // Subscribed before authenticating, so a key replaced from here on is noticed.
    let creds = shared.credentials.subscribe();
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
        let identity = match authenticate(&shared, &connect) {
            Ok(id) => id,
            Err((code, why)) => {
                shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                shared.log_refusal(&peer, &format!("client id {:?}: {why}", connect.client_id));
                writer.queue(&Packet::ConnAck(ConnAck::new(code, false)))?;
                writer.flush_within(shared.config.write_timeout).await?;
                return Ok(());
            }
        };
        reader.set_limits(MAX_PACKET_SIZE, 16 * 1024);
        let idle = match connect.keep_alive {
            0 => MAX_IDLE,
            k => Duration::from_secs(k as u64).mul_f64(1.5).min(MAX_IDLE),
        };
        match identity {
            Identity::Device { id, generation_id, auth_method, expires_s, cred } => {
                let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                let kick = Arc::new(Notify::new());
                if let Some((_, old)) = shared.devices.lock().insert(id.clone(), (conn_id, kick.clone())) {
                    tracing::debug!(device = %id, "new connection replaces the existing one (400027)");
                    old.notify_one();
                }
                writer.queue(&Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, !connect.clean_session)))?;
                let mut shutdown = shared.shutdown.clone();
                let r = async {
                    if !flush(&mut writer, shared.config.write_timeout, Some(&kick), &mut shutdown).await? {
                        return ended("kicked or shut down before CONNACK went out");
                    }
                    if connect.clean_session {
                        shared.c2d.set_subscription(&id, false).await?;
                    }
                    let mut dev = DeviceSession {
                        shared: &shared,
                        conn_id,
                        persistent: !connect.clean_session,
                        id: id.clone(),
                        partition: super::events::partition_for(&id, shared.events.count()),
                        auth_method,
                        generation_id,
                        idle,
                        kick: kick.clone(),
                        token_deadline: token_deadline(expires_s),
                        creds,
                        cred,
                    };
                    dev.run(&mut reader, &mut writer).await
                }
                .await;
                shared.c2d.release_conn(&id, conn_id);
                let mut devices = shared.devices.lock();
                if devices.get(&id).is_some_and(|(c, _)| *c == conn_id) {
                    devices.remove(&id);
                }
                r
            }
            Identity::Service { policy, rights, expires_s, cred } => {
                writer.queue(&Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)))?;
                let member = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                let mut svc = ServiceSession::new(&shared, member, policy, rights, idle, token_deadline(expires_s));
                svc.creds = Some((creds, cred));
                let r = svc.run(&mut reader, &mut writer).await;
                if let Some(c) = &svc.consumer {
                    shared.groups.leave(&c.group, member);
                }
                shared.c2d.release_feedback(member);
                r
            }
        }
    }
    .await;
    if let Err(e) = result {
        if matches!(e.kind(), ErrorKind::Protocol | ErrorKind::Unauthorized | ErrorKind::MessageTooLarge) {
            shared.stats.violations.fetch_add(1, Ordering::Relaxed);
            shared.log_violation(&peer, &e);
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
pub(crate) fn authenticate(shared: &Shared, c: &Connect) -> std::result::Result<Identity, (ConnectReturnCode, String)> {
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
        let policy = shared.registry.policy(skn).ok_or((C::NotAuthorized, format!("unknown policy '{skn}'")))?;
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
        let dev = device_checks(shared, c, &user.device_id)?;
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
    let dev = device_checks(shared, c, &user.device_id)?;
    let key = verifying_key(&token, &dev.primary_key, &dev.secondary_key, now).map_err(unauthorized)?;
    // A device key only speaks for its own device: IoT Hub requires sr={host}/devices/{id}.
    if scope_path != format!("devices/{}", user.device_id) {
        return Err((C::NotAuthorized, "a device-key token must be scoped to {host}/devices/{id}".into()));
    }
    let cred = Credential::DeviceKey { device: dev.device_id.clone(), key };
    Ok(Identity::Device { id: dev.device_id, generation_id: dev.generation_id, auth_method: "device", expires_s: token.expiry, cred })
}

fn device_checks(
    shared: &Shared,
    c: &Connect,
    device_id: &str,
) -> std::result::Result<crate::proto::DeviceIdentity, (ConnectReturnCode, String)> {
    if c.client_id != device_id {
        return Err((ConnectReturnCode::BadClientId, format!("client id '{}' must equal the device id '{device_id}'", c.client_id)));
    }
    let dev =
        shared.registry.device(device_id).ok_or((ConnectReturnCode::NotAuthorized, format!("device '{device_id}' is not registered")))?;
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
    /// Wakes when keys or device states change; `cred` is re-checked then.
    creds: watch::Receiver<u64>,
    cred: Credential,
}

impl DeviceSession<'_> {
    async fn run(&mut self, reader: &mut Reader, writer: &mut Writer) -> Result<()> {
        let log = self.shared.events.partition(self.partition).clone();
        let mut durable = log.durable();
        let mut any_durable = self.shared.events.subscribe();
        let mut shutdown = self.shared.shutdown.clone();
        let c2d_wake = self.shared.c2d.device_notify(&self.id);
        let cfg = &self.shared.config;
        // Appended D2C messages awaiting durability, in arrival order: (packet id for QoS 1,
        // partition seq, bytes counted against the session and hub bounds).
        let mut pending: VecDeque<(Option<u16>, u64, usize)> = VecDeque::new();
        let mut pending_bytes = 0usize;
        // C2D deliveries awaiting the device's PUBACK: packet id → queue seq.
        let mut c2d_in_flight: HashMap<u16, u64> = HashMap::new();
        let mut next_pkid: u16 = 1;
        let mut scratch = bytes::BytesMut::new();
        let mut subscribed = self.persistent && self.shared.c2d.read(|s| s.subscribed(&self.id));
        let mut deadline = Instant::now() + self.idle;
        let auth_method =
            format!("{{\"scope\":\"{}\",\"type\":\"sas\",\"issuer\":\"iothub\",\"acceptingIpFilterRule\":null}}", self.auth_method);
        let result = async {
            loop {
                // Acknowledge everything that became durable, in order, and give its bytes back.
                let head = *durable.borrow_and_update();
                while pending.front().is_some_and(|(_, seq, _)| *seq <= head) {
                    let (pkid, _, n) = pending.pop_front().expect("front exists");
                    pending_bytes -= n;
                    self.shared.budget.release(n);
                    if let Some(pkid) = pkid {
                        writer.queue(&Packet::PubAck(PubAck::new(pkid)))?;
                    }
                }
                // Deliver C2D messages while the window has room.
                while subscribed && c2d_in_flight.len() < cfg.c2d_window {
                    let Some(d) = self.shared.c2d.take_deliverable(&self.id, self.conn_id) else { break };
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
                if !flush(writer, cfg.write_timeout, Some(&self.kick), &mut shutdown).await? {
                    return ended("kicked or shut down while writing");
                }
                // Back-pressure: past a bound the peer's bytes stay in its socket until appended
                // messages became durable (the kernel then closes the TCP window).
                let own_full = pending.len() >= cfg.session_pending_messages || pending_bytes >= cfg.session_pending_bytes;
                let can_read = !own_full && !self.shared.budget.exhausted();
                if !can_read {
                    // The peer cannot be heard while we do not read: its keep-alive starts over.
                    deadline = Instant::now() + self.idle;
                }
                tokio::select! {
                    biased;
                    pkt = reader.next(), if can_read => {
                        deadline = Instant::now() + self.idle;
                        // Handle everything one read brought before writing again (batched PUBACKs).
                        let mut pkt = pkt?;
                        if pkt.is_none() {
                            return ended("peer closed");
                        }
                        let mut drain = Drain::new();
                        while let Some(packet) = pkt.take() {
                            match packet {
                                Packet::Publish(p) if p.topic.starts_with(proto::C2D_SETTLE_PREFIX) => {
                                    wire::check_topic_name(&p.topic)?;
                                    self.settle_extension(&p, &mut c2d_in_flight)?;
                                    if p.qos == QoS::AtLeastOnce {
                                        writer.queue(&Packet::PubAck(PubAck::new(p.pkid)))?;
                                    }
                                }
                                Packet::Publish(p) => {
                                    let (pkid, seq, n) = self.d2c(&log, p, &auth_method, &mut scratch)?;
                                    pending.push_back((pkid, seq, n));
                                    pending_bytes += n;
                                    self.shared.budget.take(n);
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
                                    if !subscribed {
                                        subscribed = true;
                                        if self.persistent {
                                            self.shared.c2d.set_subscription(&self.id, true).await?;
                                        }
                                    }
                                }
                                Packet::Unsubscribe(u) => writer.queue(&Packet::UnsubAck(UnsubAck::new(u.pkid)))?,
                                Packet::PubAck(a) => {
                                    // PUBACK of a C2D delivery = complete (IoT Hub MQTT semantics).
                                    if let Some(seq) = c2d_in_flight.remove(&a.pkid) {
                                        self.shared.c2d.settle(&self.id, seq, c2d::Settle::Complete)?;
                                    }
                                }
                                Packet::Disconnect => return ended("DISCONNECT"),
                                other => return Err(Error::protocol(format!("unexpected {} from a device", packet_name(&other)))),
                            }
                            if pending.len() >= cfg.session_pending_messages || pending_bytes >= cfg.session_pending_bytes {
                                break; // the rest stays buffered until there is room
                            }
                            pkt = drain.next(reader)?;
                        }
                    }
                    // Only a session waiting to PUBACK cares: with thousands of idle devices per
                    // partition, waking every session on every group commit would cost a core.
                    r = durable.changed(), if !pending.is_empty() => { if r.is_err() { return Err(Error::closed("event log")); } }
                    // Blocked by the hub-wide budget with nothing of our own pending: wait for
                    // any partition to make progress.
                    _ = any_durable.changed(), if pending.is_empty() && !can_read => {}
                    _ = c2d_wake.notified(), if subscribed => {
                        // A lock expired or new messages arrived: forget deliveries whose lock this
                        // connection no longer holds, so they can be delivered again.
                        c2d_in_flight.retain(|_, seq| self.shared.c2d.holds_lock(&self.id, *seq, self.conn_id));
                    }
                    _ = self.kick.notified() => return ended("kicked"),
                    r = self.creds.changed() => {
                        if r.is_err() || !self.cred.in_force(self.shared) {
                            return ended("the key it authenticated with was replaced, or the device disabled or deleted");
                        }
                    }
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
        result
    }

    /// The hubmsg extension: `$hubmsg/c2d/{abandon|reject}/{sequenceNumber}` settles a locked
    /// message without PUBACK semantics (`docs/protocol.md`).
    fn settle_extension(&self, p: &Publish, in_flight: &mut HashMap<u16, u64>) -> Result<()> {
        let rest = &p.topic[proto::C2D_SETTLE_PREFIX.len()..];
        let (how, seq) = rest.split_once('/').ok_or_else(|| Error::protocol(format!("bad settle topic '{}'", p.topic)))?;
        let seq: u64 = seq.parse().map_err(|_| Error::protocol(format!("bad settle topic '{}'", p.topic)))?;
        let how = match how {
            "abandon" => c2d::Settle::Abandon,
            "reject" => c2d::Settle::Reject,
            _ => return Err(Error::protocol(format!("bad settle topic '{}'", p.topic))),
        };
        if !self.shared.c2d.holds_lock(&self.id, seq, self.conn_id) {
            // Lock lost (412002): the message was or will be delivered again; nothing to do.
            tracing::debug!(device = %self.id, seq, "settle after lock loss ignored");
            return Ok(());
        }
        in_flight.retain(|_, s| *s != seq);
        self.shared.c2d.settle(&self.id, seq, how)?;
        Ok(())
    }

    fn allowed_filter(&self, f: &str) -> bool {
        f == "#" || f == "devices/+/messages/devicebound/#" || f == wire::c2d_filter(&self.id)
    }

    /// Validates, stamps and appends one D2C publish; returns what to PUBACK once durable (the
    /// packet id for QoS 1), its partition seq and the bytes it holds until then.
    fn d2c(
        &self,
        log: &crate::store::Log,
        p: Publish,
        auth_method: &str,
        scratch: &mut bytes::BytesMut,
    ) -> Result<(Option<u16>, u64, usize)> {
        let qos1 = p.qos == QoS::AtLeastOnce;
        let pkid = p.pkid;
        let retain = p.retain;
        let mut msg = d2c_message(&self.id, p)?;
        let enqueued = now_ms().to_string();
        let stamps = [
            ("iothub-connection-device-id", self.id.as_str()),
            ("iothub-connection-auth-generation-id", self.generation_id.as_str()),
            ("iothub-connection-auth-method", auth_method),
            ("iothub-enqueuedtime", enqueued.as_str()),
            ("iothub-message-source", "Telemetry"),
        ];
        if retain {
            msg.properties.push(("mqtt-retain".into(), "true".into()));
        }
        let bytes = msg.body.len() as u64;
        scratch.clear();
        msg.encode_with_system(&stamps, scratch);
        let seq = log.append(scratch)?;
        self.shared.stats.d2c_messages.fetch_add(1, Ordering::Relaxed);
        self.shared.stats.d2c_bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok((qos1.then_some(pkid), seq, scratch.len()))
    }
}

/// The D2C message a device's PUBLISH carries, or the violation that closes the connection:
/// QoS 2, a topic that is not the device's own D2C topic (or has wildcards / NUL), a malformed
/// property bag, a bad message id, more than 256 KB (reference §4.5). Pure: no I/O.
pub fn d2c_message(device_id: &str, p: Publish) -> Result<Message> {
    if p.qos == QoS::ExactlyOnce {
        return Err(Error::protocol("QoS 2 is not supported (IoT Hub closes the connection)"));
    }
    wire::check_topic_name(&p.topic)?;
    let denied = || Error::new(ErrorKind::Unauthorized, format!("device '{device_id}' may not publish to '{}'", p.topic.escape_debug()));
    let topic = wire::parse_d2c_topic(&p.topic).ok_or_else(denied)?;
    if topic.device_id != device_id || topic.module_id.is_some() {
        return Err(denied());
    }
    let bag = wire::decode_bag(topic.bag).map_err(|e| Error::protocol(format!("malformed property bag: {e}")))?;
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

struct PartState {
    next: u64,
    /// (seq, acknowledged, payload bytes) in delivery order.
    in_flight: VecDeque<(u64, bool, usize)>,
}

struct Consumer {
    group: String,
    window: usize,
    from: proto::StartPosition,
    first_assignment: bool,
    assignment: watch::Receiver<Vec<u32>>,
    parts: HashMap<u32, PartState>,
    /// Payload bytes of unacknowledged events on this connection (bounded by
    /// `consumer_window_bytes`, whatever the event sizes).
    bytes_in_flight: usize,
}

/// What a hub → service publish carried, by packet id.
#[derive(Debug, Clone, Copy)]
enum Outgoing {
    /// A D2C event (partition, seq).
    Event(u32, u64),
    /// A feedback batch.
    Feedback(u64),
}

/// Feedback batches in flight to one service connection.
const FEEDBACK_WINDOW: usize = 4;

struct ServiceSession<'a> {
    shared: &'a Arc<Shared>,
    member: u64,
    policy: String,
    rights: Vec<Right>,
    idle: Duration,
    consumer: Option<Consumer>,
    /// Whether this connection receives feedback batches.
    feedback: bool,
    pkids: HashMap<u16, Outgoing>,
    next_pkid: u16,
    responses: (mpsc::UnboundedSender<(u64, Response)>, Responses),
    /// Requests taken and not yet answered (bounded by [`MAX_SERVICE_REQUESTS`]).
    running: usize,
    token_deadline: Instant,
    /// Wakes when keys change, and the key this connection authenticated with.
    creds: Option<(watch::Receiver<u64>, Credential)>,
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
            feedback: false,
            pkids: HashMap::new(),
            next_pkid: 1,
            responses: mpsc::unbounded_channel(),
            running: 0,
            token_deadline,
            creds: None,
            revoked: false,
        }
    }

    async fn run(&mut self, reader: &mut Reader, writer: &mut Writer) -> Result<()> {
        let mut version = self.shared.events.subscribe();
        let mut feedback = self.shared.c2d.feedback_watch();
        let mut shutdown = self.shared.shutdown.clone();
        let mut deadline = Instant::now() + self.idle;
        let stall = self.shared.config.consumer_stall_timeout;
        // Last time this consumer acknowledged something (or had nothing outstanding).
        let mut progress = Instant::now();
        loop {
            let more = self.fill(writer)?;
            self.fill_feedback(writer)?;
            if !flush(writer, self.shared.config.write_timeout, None, &mut shutdown).await? {
                return ended("hub shutdown while writing");
            }
            if self.revoked && self.running == 0 {
                return ended("the key it authenticated with was replaced");
            }
            let consuming = self.consumer.is_some();
            let outstanding = self.pkids.values().any(|o| matches!(o, Outgoing::Event(..)));
            if !outstanding {
                progress = Instant::now();
            }
            let can_read = self.running < MAX_SERVICE_REQUESTS && !self.revoked;
            if !can_read {
                deadline = Instant::now() + self.idle;
            }
            let assignment_changed = async {
                match &mut self.consumer {
                    Some(c) => c.assignment.changed().await,
                    None => std::future::pending().await,
                }
            };
            let (creds_changed, shared) = (&mut self.creds, self.shared);
            let creds_changed = async {
                match creds_changed {
                    Some((rx, cred)) => rx.changed().await.is_ok() && cred.in_force(shared),
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
                    let mut drain = Drain::new();
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
                                self.request(p)?;
                            }
                            Packet::PubAck(a) => {
                                if self.acked(a.pkid) {
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
                        pkt = drain.next(reader)?;
                    }
                }
                Some((rid, resp)) = self.responses.1.recv() => {
                    self.running = self.running.saturating_sub(1);
                    let body = serde_json::to_vec(&resp).expect("response serializes");
                    writer.queue(&Packet::Publish(Publish::new(proto::response_topic(rid), QoS::AtMostOnce, body)))?;
                }
                r = assignment_changed => { if r.is_ok() { self.reassign(); } }
                in_force = creds_changed, if !self.revoked => { self.revoked = !in_force; }
                _ = version.changed(), if consuming && !more => {}
                _ = feedback.changed(), if self.feedback => {}
                _ = tokio::task::yield_now(), if more => {}
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
                _ = shutdown.changed() => return ended("hub shutdown"),
            }
        }
    }
}

impl ServiceSession<'_> {
    /// Handles a request publish. `consume` changes this session and runs inline; everything
    /// else runs on its own task and answers through the response channel.
    fn request(&mut self, p: Publish) -> Result<()> {
        let (op, rid) = proto::parse_request_topic(&p.topic)
            .ok_or_else(|| Error::new(ErrorKind::Unauthorized, format!("services may only publish requests, not to '{}'", p.topic)))?;
        let tx = self.responses.0.clone();
        self.running += 1;
        if op == "consume" || op == "feedback.subscribe" {
            let r = if op == "consume" {
                self.start_consume(&p.payload)
            } else {
                need(&self.rights, Right::ServiceConnect, op).map(|()| {
                    self.feedback = true;
                    serde_json::json!({})
                })
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

    fn start_consume(&mut self, body: &[u8]) -> Result<serde_json::Value> {
        need(&self.rights, Right::ServiceConnect, "consume")?;
        if let Some(c) = &self.consumer {
            return Err(Error::invalid(format!(
                "this connection already consumes group '{}'; open another connection for another group",
                c.group
            )));
        }
        let req: ConsumeRequest = proto::parse_body("consume", body)?;
        let partitions = self.shared.events.count();
        // Packet ids are 16-bit: keep the total in flight below 60,000.
        let window = (req.window.max(1) as usize).min(60_000 / partitions as usize);
        let assignment = self.shared.groups.join(&req.group, self.member)?;
        self.consumer = Some(Consumer {
            group: req.group.clone(),
            window,
            from: req.from,
            first_assignment: true,
            assignment,
            parts: HashMap::new(),
            bytes_in_flight: 0,
        });
        self.reassign();
        Ok(serde_json::json!({ "partitions": partitions, "window": window }))
    }

    fn reassign(&mut self) {
        let Some(c) = &mut self.consumer else { return };
        let assigned: Vec<u32> = c.assignment.borrow_and_update().clone();
        let released: usize = c
            .parts
            .iter()
            .filter(|(p, _)| !assigned.contains(p))
            .flat_map(|(_, st)| st.in_flight.iter())
            .filter(|e| !e.1)
            .map(|e| e.2)
            .sum();
        c.bytes_in_flight = c.bytes_in_flight.saturating_sub(released);
        c.parts.retain(|p, _| assigned.contains(p));
        self.pkids.retain(|_, o| !matches!(o, Outgoing::Event(p, _) if !assigned.contains(p)));
        let from = if c.first_assignment { c.from } else { proto::StartPosition::Checkpoint };
        c.first_assignment = false;
        for p in assigned {
            if c.parts.contains_key(&p) {
                continue;
            }
            let checkpoint = self.shared.groups.checkpoint(&c.group, p);
            let next = match self.shared.events.start_seq(p, from, checkpoint) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(partition = p, error = %e, "cannot position consumer; starting at the checkpoint");
                    checkpoint.map_or(1, |s| s + 1)
                }
            };
            if from != proto::StartPosition::Checkpoint && next > 1 {
                // An explicit start position moves the group's checkpoint, so a reconnect or a
                // takeover resumes from there rather than from an older checkpoint.
                self.shared.groups.advance(&c.group, p, self.member, next - 1);
            }
            c.parts.insert(p, PartState { next, in_flight: VecDeque::new() });
        }
    }

    /// Sends events while windows have room; returns whether more could be sent right away.
    fn fill(&mut self, writer: &mut Writer) -> Result<bool> {
        let Some(c) = &mut self.consumer else { return Ok(false) };
        let mut more = false;
        let byte_window = self.shared.config.consumer_window_bytes;
        for (&p, st) in c.parts.iter_mut() {
            let room = c.window - st.in_flight.len();
            if room == 0 || c.bytes_in_flight >= byte_window {
                continue;
            }
            let log = self.shared.events.partition(p);
            let head = *log.durable().borrow();
            st.next = st.next.max(log.first_seq());
            if st.next > head {
                continue;
            }
            let records = log.read(st.next, room.min(512), (byte_window - c.bytes_in_flight).min(1024 * 1024))?;
            for r in records {
                let n = r.payload.len();
                let pkid = next_free_pkid(&mut self.next_pkid, &self.pkids);
                let mut publish = Publish::from_bytes(proto::event_topic(&c.group, p, r.seq), QoS::AtLeastOnce, r.payload);
                publish.pkid = pkid;
                writer.queue(&Packet::Publish(publish))?;
                self.pkids.insert(pkid, Outgoing::Event(p, r.seq));
                st.in_flight.push_back((r.seq, false, n));
                c.bytes_in_flight += n;
                st.next = r.seq + 1;
                self.shared.stats.events_delivered.fetch_add(1, Ordering::Relaxed);
            }
            more |= st.in_flight.len() < c.window && c.bytes_in_flight < byte_window && st.next <= head;
        }
        Ok(more)
    }

    /// Sends feedback batches while this connection wants them and has fewer than
    /// [`FEEDBACK_WINDOW`] unacknowledged.
    fn fill_feedback(&mut self, writer: &mut Writer) -> Result<()> {
        if !self.feedback {
            return Ok(());
        }
        let mut in_flight = self.pkids.values().filter(|o| matches!(o, Outgoing::Feedback(_))).count();
        while in_flight < FEEDBACK_WINDOW {
            let Some(batch) = self.shared.c2d.take_feedback(self.member) else { break };
            let pkid = next_free_pkid(&mut self.next_pkid, &self.pkids);
            let body = serde_json::to_vec(&batch.records).expect("feedback serializes");
            let mut p = Publish::new(format!("{}{}", proto::FEEDBACK_PREFIX, batch.id), QoS::AtLeastOnce, body);
            p.pkid = pkid;
            writer.queue(&Packet::Publish(p))?;
            self.pkids.insert(pkid, Outgoing::Feedback(batch.id));
            in_flight += 1;
        }
        Ok(())
    }

    /// Handles a PUBACK; true if it acknowledged an event.
    fn acked(&mut self, pkid: u16) -> bool {
        let (p, seq) = match self.pkids.remove(&pkid) {
            None => return false,
            Some(Outgoing::Feedback(id)) => {
                if let Err(e) = self.shared.c2d.ack_feedback(id) {
                    self.shared.log_store_error("recording a feedback acknowledgement failed; it will be delivered again", &e);
                }
                return false;
            }
            Some(Outgoing::Event(p, seq)) => (p, seq),
        };
        let Some(c) = &mut self.consumer else { return true };
        let Some(st) = c.parts.get_mut(&p) else { return true };
        if let Some(e) = st.in_flight.iter_mut().find(|e| e.0 == seq && !e.1) {
            e.1 = true;
            c.bytes_in_flight = c.bytes_in_flight.saturating_sub(e.2);
        }
        let mut last = None;
        while st.in_flight.front().is_some_and(|e| e.1) {
            last = st.in_flight.pop_front().map(|e| e.0);
        }
        if let Some(s) = last {
            self.shared.groups.advance(&c.group, p, self.member, s);
        }
        true
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

async fn handle(shared: &Arc<Shared>, rights: &[Right], op: &str, body: &[u8]) -> Result<serde_json::Value> {
    match op {
        "devices.create" => {
            need(rights, Right::RegistryReadWrite, op)?;
            let req: proto::CreateDevice = proto::parse_body(op, body)?;
            Ok(to_json(&shared.registry.create(req).await?))
        }
        "devices.get" => {
            need(rights, Right::RegistryRead, op)?;
            let req: proto::DeviceRef = proto::parse_body(op, body)?;
            let d = shared
                .registry
                .device(&req.device_id)
                .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("device '{}' is not registered", req.device_id)))?;
            Ok(to_json(&d))
        }
        "devices.list" => {
            need(rights, Right::RegistryRead, op)?;
            Ok(to_json(&shared.registry.devices()))
        }
        "devices.delete" => {
            need(rights, Right::RegistryReadWrite, op)?;
            let req: proto::DeviceRef = proto::parse_body(op, body)?;
            if shared.registry.device(&req.device_id).is_none() {
                return Err(Error::new(ErrorKind::NotFound, format!("device '{}' is not registered", req.device_id)));
            }
            // The queue goes first (with Purged feedback) and with it the persistent
            // subscription, so a device re-created under the same id starts empty; a crash in
            // between leaves the identity, and the client's retry of the delete finishes it.
            shared.c2d.delete_device(&req.device_id).await?;
            shared.registry.delete(&req.device_id).await?;
            shared.c2d.delete_device(&req.device_id).await?;
            shared.credentials_changed();
            Ok(serde_json::json!({}))
        }
        "devices.update" => {
            need(rights, Right::RegistryReadWrite, op)?;
            let req: proto::UpdateDevice = proto::parse_body(op, body)?;
            let d = shared.registry.update(&req.device_id, req.status, req.regenerate.as_deref()).await?;
            if d.status == DeviceStatus::Disabled || req.regenerate.is_some() {
                shared.credentials_changed();
            }
            Ok(to_json(&d))
        }
        "c2d.send" => {
            need(rights, Right::ServiceConnect, op)?;
            let req: proto::C2dSend = proto::parse_body(op, body)?;
            let dev = shared
                .registry
                .device(&req.device_id)
                .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("device '{}' is not registered", req.device_id)))?;
            use base64::Engine;
            let record = base64::engine::general_purpose::STANDARD
                .decode(&req.record)
                .map_err(|e| Error::invalid(format!("c2d.send: record is not base64: {e}")))?;
            let msg = Message::decode(&bytes::Bytes::from(record.clone())).map_err(|e| Error::invalid(format!("c2d.send: {e}")))?;
            let message_id = msg.message_id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            wire::check_message_id(&message_id).map_err(|e| Error::invalid(format!("c2d.send: {}", e.message())))?;
            let ttl = req.ttl_ms.map(Duration::from_millis);
            let seq = shared.c2d.send(&dev.device_id, &dev.generation_id, message_id.clone(), req.ack, ttl, record, req.send_id).await?;
            Ok(to_json(&proto::C2dReceipt { message_id, sequence_number: seq }))
        }
        "c2d.purge" => {
            need(rights, Right::ServiceConnect, op)?;
            let req: proto::DeviceRef = proto::parse_body(op, body)?;
            if shared.registry.device(&req.device_id).is_none() {
                return Err(Error::new(ErrorKind::NotFound, format!("device '{}' is not registered", req.device_id)));
            }
            let n = shared.c2d.purge(&req.device_id).await?;
            Ok(to_json(&proto::PurgeResult { device_id: req.device_id, total_messages_purged: n as u64 }))
        }
        "checkpoint" => {
            need(rights, Right::ServiceConnect, op)?;
            shared.groups.flush().await?;
            Ok(serde_json::json!({}))
        }
        "policies.list" => {
            need_owner(rights, op)?;
            Ok(to_json(&shared.registry.policies()))
        }
        "policies.regenerate" => {
            need_owner(rights, op)?;
            let req: proto::RegeneratePolicyKey = proto::parse_body(op, body)?;
            let p = shared.registry.regenerate_policy(&req.name, &req.key).await?;
            if p.name == "iothubowner" {
                shared.refresh_owner_file()?;
            }
            // Connections authenticated with a replaced key close (this one after its answer).
            shared.credentials_changed();
            Ok(to_json(&p))
        }
        "hub.info" => Ok(serde_json::json!({
            "partitions": shared.events.count(),
            "version": env!("CARGO_PKG_VERSION"),
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
