//! One connection to the hub: CONNECT and authentication, then either a device session (IoT Hub
//! device protocol) or a service session (hubmsg service contract).
//!
//! Invariants: every violation closes only this connection (after counting it); a device's D2C
//! PUBACKs go out in PUBLISH order and only for messages durable in the partition; a service
//! consumer only has events of partitions its group assigned to it in flight.

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
use crate::auth::{self, SasToken};
use crate::error::{Error, ErrorKind, Result};
use crate::message::{now_ms, Message, MAX_D2C_SIZE};
use crate::proto::{self, ConsumeRequest, DeviceStatus, Response};
use crate::transport::{BoxStream, Drain, PacketReader, PacketWriter, MAX_PACKET_SIZE};
use crate::wire;

type Reader = PacketReader<ReadHalf<BoxStream>>;
type Writer = PacketWriter<WriteHalf<BoxStream>>;

/// Keep-alive ceiling (reference §3.3): 1767 s, also applied when the client asks for 0.
const MAX_IDLE: Duration = Duration::from_secs(1767);

enum Identity {
    Device { id: String, generation_id: String, auth_method: &'static str },
    Service { policy: String, rights: Vec<Right> },
}

pub(super) async fn serve(shared: Arc<Shared>, stream: BoxStream, peer: SocketAddr) {
    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
    shared.stats.open_connections.fetch_add(1, Ordering::Relaxed);
    let (rd, wr) = tokio::io::split(stream);
    let mut reader = PacketReader::new(rd, MAX_PACKET_SIZE);
    let mut writer = PacketWriter::new(wr);
    let result = async {
        let connect = match tokio::time::timeout(shared.config.connect_timeout, reader.next()).await {
            Err(_) => return Err(Error::new(ErrorKind::Timeout, "no CONNECT in time")),
            Ok(Ok(Some(Packet::Connect(c)))) => c,
            Ok(Ok(Some(other))) => return Err(Error::protocol(format!("first packet must be CONNECT, got {}", packet_name(&other)))),
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
        };
        let identity = match authenticate(&shared, &connect) {
            Ok(id) => id,
            Err((code, why)) => {
                shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, client_id = %connect.client_id, reason = %why, "CONNECT refused");
                writer.send(&Packet::ConnAck(ConnAck::new(code, false))).await?;
                writer.shutdown().await;
                return Ok(());
            }
        };
        let idle = match connect.keep_alive {
            0 => MAX_IDLE,
            k => Duration::from_secs(k as u64).mul_f64(1.5).min(MAX_IDLE),
        };
        match identity {
            Identity::Device { id, generation_id, auth_method } => {
                let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                let kick = Arc::new(Notify::new());
                if let Some((_, old)) = shared.devices.lock().insert(id.clone(), (conn_id, kick.clone())) {
                    tracing::info!(device = %id, "new connection replaces the existing one (400027)");
                    old.notify_one();
                }
                writer.send(&Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, !connect.clean_session))).await?;
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
                    kick,
                };
                let r = dev.run(&mut reader, &mut writer).await;
                shared.c2d.release_conn(&id, conn_id);
                let mut devices = shared.devices.lock();
                if devices.get(&id).is_some_and(|(c, _)| *c == conn_id) {
                    devices.remove(&id);
                }
                r
            }
            Identity::Service { policy, rights } => {
                writer.send(&Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))).await?;
                let member = shared.next_conn.fetch_add(1, Ordering::Relaxed);
                let mut svc = ServiceSession::new(&shared, member, policy, rights, idle);
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
            tracing::info!(%peer, error = %e, "closing connection");
        } else if e.kind() == ErrorKind::Storage {
            // E.g. a full disk: the device keeps the message in its outbox and retries.
            tracing::warn!(%peer, error = %e, "refusing the connection's messages: the store cannot take them");
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

/// CONNECT → identity, or the CONNACK code to refuse with and why (reference §3.4).
fn authenticate(shared: &Shared, c: &Connect) -> std::result::Result<Identity, (ConnectReturnCode, String)> {
    use ConnectReturnCode as C;
    let login = c.login.as_ref().ok_or((C::BadUserNamePassword, "no user name / password".to_string()))?;
    let user = wire::parse_username(&login.username).map_err(|e| (C::BadUserNamePassword, e.to_string()))?;
    let token = SasToken::parse(&login.password).map_err(|e| (C::BadUserNamePassword, e.to_string()))?;
    let sr = token.resource_uri().map_err(|e| (C::BadUserNamePassword, e.to_string()))?;
    let sr_host = sr.split('/').next().unwrap_or("");
    if !sr_host.eq_ignore_ascii_case(&user.host) {
        return Err((C::NotAuthorized, format!("token host '{sr_host}' does not match user name host '{}'", user.host)));
    }
    let now = now_ms() / 1000;
    let unauthorized = |e: Error| (C::NotAuthorized, e.to_string());
    if let Some(skn) = &token.skn {
        let policy = shared.registry.policy(skn).ok_or((C::NotAuthorized, format!("unknown policy '{skn}'")))?;
        token.verify(&policy.primary_key, now).or_else(|_| token.verify(&policy.secondary_key, now)).map_err(unauthorized)?;
        if user.device_id == proto::SERVICE_MARKER {
            if !auth::scope_covers(&sr, &user.host) || sr.trim_end_matches('/').contains('/') {
                return Err((C::NotAuthorized, "service tokens must be scoped to the hub".into()));
            }
            return Ok(Identity::Service { policy: policy.name, rights: policy.rights });
        }
        // A policy with DeviceConnect acting for one device (token service / protocol gateway).
        if !policy.rights.contains(&Right::DeviceConnect) {
            return Err((C::NotAuthorized, format!("policy '{skn}' lacks DeviceConnect")));
        }
        let dev = device_checks(shared, c, &user.device_id)?;
        if !auth::scope_covers(&sr, &auth::device_resource_uri(&user.host, &user.device_id)) {
            return Err((C::NotAuthorized, "token scope does not cover this device".into()));
        }
        return Ok(Identity::Device { id: dev.device_id, generation_id: dev.generation_id, auth_method: "hub" });
    }
    let dev = device_checks(shared, c, &user.device_id)?;
    token.verify(&dev.primary_key, now).or_else(|_| token.verify(&dev.secondary_key, now)).map_err(unauthorized)?;
    if !auth::scope_covers(&sr, &auth::device_resource_uri(&user.host, &user.device_id)) {
        return Err((C::NotAuthorized, "token scope does not cover this device".into()));
    }
    Ok(Identity::Device { id: dev.device_id, generation_id: dev.generation_id, auth_method: "device" })
}

fn device_checks(
    shared: &Shared,
    c: &Connect,
    device_id: &str,
) -> std::result::Result<crate::proto::DeviceIdentity, (ConnectReturnCode, String)> {
    if user_module_or_mismatch(c, device_id) {
        return Err((ConnectReturnCode::BadClientId, format!("client id '{}' must equal the device id '{device_id}'", c.client_id)));
    }
    let dev =
        shared.registry.device(device_id).ok_or((ConnectReturnCode::NotAuthorized, format!("device '{device_id}' is not registered")))?;
    if dev.status == DeviceStatus::Disabled {
        return Err((ConnectReturnCode::NotAuthorized, format!("device '{device_id}' is disabled")));
    }
    Ok(dev)
}

fn user_module_or_mismatch(c: &Connect, device_id: &str) -> bool {
    c.client_id != device_id
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
}

impl DeviceSession<'_> {
    async fn run(&mut self, reader: &mut Reader, writer: &mut Writer) -> Result<()> {
        let log = self.shared.events.partition(self.partition).clone();
        let mut durable = log.durable();
        let mut shutdown = self.shared.shutdown.clone();
        let c2d_wake = self.shared.c2d.device_notify(&self.id);
        // (packet id, partition seq) of QoS 1 publishes awaiting durability, in arrival order.
        let mut pending: VecDeque<(u16, u64)> = VecDeque::new();
        // C2D deliveries awaiting the device's PUBACK: packet id → queue seq.
        let mut c2d_in_flight: HashMap<u16, u64> = HashMap::new();
        let mut next_pkid: u16 = 1;
        let mut scratch = bytes::BytesMut::with_capacity(4096);
        let mut subscribed = self.persistent && self.shared.c2d.read(|s| s.subscribed(&self.id));
        let mut deadline = Instant::now() + self.idle;
        let auth_method =
            format!("{{\"scope\":\"{}\",\"type\":\"sas\",\"issuer\":\"iothub\",\"acceptingIpFilterRule\":null}}", self.auth_method);
        loop {
            // Acknowledge everything that became durable, in order.
            let head = *durable.borrow_and_update();
            while pending.front().is_some_and(|(_, seq)| *seq <= head) {
                let (pkid, _) = pending.pop_front().expect("front exists");
                writer.queue(&Packet::PubAck(PubAck::new(pkid)))?;
            }
            // Deliver C2D messages while the window has room.
            while subscribed && c2d_in_flight.len() < self.shared.config.c2d_window {
                let Some(d) = self.shared.c2d.take_deliverable(&self.id, self.conn_id) else { break };
                let pkid = loop {
                    let id = next_pkid;
                    next_pkid = if id == u16::MAX { 1 } else { id + 1 };
                    if !c2d_in_flight.contains_key(&id) {
                        break id;
                    }
                };
                let topic = wire::c2d_topic(&self.id, &wire::c2d_bag(&d.message));
                let mut p = Publish::from_bytes(topic, QoS::AtLeastOnce, d.message.body.clone());
                p.pkid = pkid;
                writer.queue(&Packet::Publish(p))?;
                c2d_in_flight.insert(pkid, d.seq);
            }
            writer.flush().await?;
            tokio::select! {
                biased;
                pkt = reader.next() => {
                    deadline = Instant::now() + self.idle;
                    // Handle everything one read brought before writing again (batched PUBACKs).
                    let mut pkt = pkt?;
                    if pkt.is_none() {
                        return Ok(());
                    }
                    let mut drain = Drain::new();
                    while let Some(packet) = pkt.take() {
                        match packet {
                            Packet::Publish(p) if p.topic.starts_with(proto::C2D_SETTLE_PREFIX) => {
                                self.settle_extension(&p, &mut c2d_in_flight)?;
                                if p.qos == QoS::AtLeastOnce {
                                    writer.queue(&Packet::PubAck(PubAck::new(p.pkid)))?;
                                }
                            }
                            Packet::Publish(p) => {
                                if let Some((pkid, seq)) = self.d2c(&log, p, &auth_method, &mut scratch)? {
                                    pending.push_back((pkid, seq));
                                }
                            }
                            Packet::PingReq => writer.queue(&Packet::PingResp)?,
                            Packet::Subscribe(s) => {
                                if s.filters.len() > 5 {
                                    return Err(Error::protocol("more than 5 subscriptions"));
                                }
                                let mut codes = Vec::new();
                                for f in &s.filters {
                                    if !self.allowed_filter(&f.path) {
                                        return Err(Error::new(ErrorKind::Unauthorized, format!("device '{}' may not subscribe to '{}'", self.id, f.path)));
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
                            Packet::Disconnect => return Ok(()),
                            other => return Err(Error::protocol(format!("unexpected {} from a device", packet_name(&other)))),
                        }
                        pkt = drain.next(reader)?;
                    }
                }
                // Only a session waiting to PUBACK cares: with thousands of idle devices per
                // partition, waking every session on every group commit would cost a core.
                r = durable.changed(), if !pending.is_empty() => { if r.is_err() { return Err(Error::closed("event log")); } }
                _ = c2d_wake.notified(), if subscribed => {
                    // A lock expired or new messages arrived: forget deliveries whose lock this
                    // connection no longer holds, so they can be delivered again.
                    c2d_in_flight.retain(|_, seq| self.shared.c2d.holds_lock(&self.id, *seq, self.conn_id));
                }
                _ = self.kick.notified() => return Ok(()),
                _ = tokio::time::sleep_until(deadline) => return Err(Error::new(ErrorKind::Timeout, format!("device '{}' silent for {:?} (keep-alive × 1.5)", self.id, self.idle))),
                _ = shutdown.changed() => return Ok(()),
            }
        }
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

    /// Validates, stamps and appends one D2C publish; returns what to PUBACK once durable.
    fn d2c(&self, log: &crate::store::Log, p: Publish, auth_method: &str, scratch: &mut bytes::BytesMut) -> Result<Option<(u16, u64)>> {
        if p.qos == QoS::ExactlyOnce {
            return Err(Error::protocol("QoS 2 is not supported (IoT Hub closes the connection)"));
        }
        let topic = wire::parse_d2c_topic(&p.topic)
            .ok_or_else(|| Error::new(ErrorKind::Unauthorized, format!("device '{}' may not publish to '{}'", self.id, p.topic)))?;
        if topic.device_id != self.id || topic.module_id.is_some() {
            return Err(Error::new(ErrorKind::Unauthorized, format!("device '{}' may not publish to '{}'", self.id, p.topic)));
        }
        let bag = wire::decode_bag(topic.bag).map_err(|e| Error::protocol(format!("malformed property bag: {e}")))?;
        let mut msg = Message::new(p.payload);
        wire::apply_bag(&mut msg, bag).map_err(|e| Error::protocol(format!("malformed property bag: {e}")))?;
        // Senders cannot forge hub-stamped properties.
        msg.system.retain(|(k, _)| !k.starts_with("iothub-"));
        let size = msg.iothub_size();
        if size > MAX_D2C_SIZE {
            return Err(Error::new(ErrorKind::MessageTooLarge, format!("D2C message of {size} bytes exceeds {MAX_D2C_SIZE}")));
        }
        let enqueued = now_ms().to_string();
        let stamps = [
            ("iothub-connection-device-id", self.id.as_str()),
            ("iothub-connection-auth-generation-id", self.generation_id.as_str()),
            ("iothub-connection-auth-method", auth_method),
            ("iothub-enqueuedtime", enqueued.as_str()),
            ("iothub-message-source", "Telemetry"),
        ];
        if p.retain {
            msg.properties.push(("mqtt-retain".into(), "true".into()));
        }
        let bytes = msg.body.len() as u64;
        scratch.clear();
        msg.encode_with_system(&stamps, scratch);
        let seq = log.append(scratch).inspect_err(|_| {
            self.shared.stats.d2c_refused.fetch_add(1, Ordering::Relaxed);
        })?;
        self.shared.stats.d2c_messages.fetch_add(1, Ordering::Relaxed);
        self.shared.stats.d2c_bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok((p.qos == QoS::AtLeastOnce).then_some((p.pkid, seq)))
    }
}

struct PartState {
    next: u64,
    /// (seq, acknowledged) in delivery order.
    in_flight: VecDeque<(u64, bool)>,
}

struct Consumer {
    group: String,
    window: usize,
    from: proto::StartPosition,
    first_assignment: bool,
    assignment: watch::Receiver<Vec<u32>>,
    parts: HashMap<u32, PartState>,
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
}

/// Answers of spawned request handlers: (request id, response).
type Responses = mpsc::UnboundedReceiver<(u64, Response)>;

impl<'a> ServiceSession<'a> {
    fn new(shared: &'a Arc<Shared>, member: u64, policy: String, rights: Vec<Right>, idle: Duration) -> Self {
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
        }
    }

    async fn run(&mut self, reader: &mut Reader, writer: &mut Writer) -> Result<()> {
        let mut version = self.shared.events.subscribe();
        let mut feedback = self.shared.c2d.feedback_watch();
        let mut shutdown = self.shared.shutdown.clone();
        let mut deadline = Instant::now() + self.idle;
        loop {
            let more = self.fill(writer)?;
            self.fill_feedback(writer)?;
            writer.flush().await?;
            let consuming = self.consumer.is_some();
            let assignment_changed = async {
                match &mut self.consumer {
                    Some(c) => c.assignment.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                pkt = reader.next() => {
                    deadline = Instant::now() + self.idle;
                    // Handle every buffered packet (e.g. a burst of consumer PUBACKs) before
                    // refilling and writing, so refills go out in batches.
                    let mut pkt = pkt?;
                    if pkt.is_none() {
                        return Ok(());
                    }
                    let mut drain = Drain::new();
                    while let Some(packet) = pkt.take() {
                        match packet {
                            Packet::Disconnect => return Ok(()),
                            Packet::Publish(p) => {
                                if p.qos == QoS::ExactlyOnce {
                                    return Err(Error::protocol("QoS 2 is not supported"));
                                }
                                if p.qos == QoS::AtLeastOnce {
                                    writer.queue(&Packet::PubAck(PubAck::new(p.pkid)))?;
                                }
                                self.request(p)?;
                            }
                            Packet::PubAck(a) => self.acked(a.pkid),
                            Packet::PingReq => writer.queue(&Packet::PingResp)?,
                            Packet::Subscribe(s) => {
                                let codes = s.filters.iter().map(|_| SubscribeReasonCode::Success(QoS::AtLeastOnce)).collect();
                                writer.queue(&Packet::SubAck(SubAck::new(s.pkid, codes)))?;
                            }
                            Packet::Unsubscribe(u) => writer.queue(&Packet::UnsubAck(UnsubAck::new(u.pkid)))?,
                            other => return Err(Error::protocol(format!("unexpected {} from a service", packet_name(&other)))),
                        }
                        pkt = drain.next(reader)?;
                    }
                }
                Some((rid, resp)) = self.responses.1.recv() => {
                    let body = serde_json::to_vec(&resp).expect("response serializes");
                    writer.queue(&Packet::Publish(Publish::new(proto::response_topic(rid), QoS::AtMostOnce, body)))?;
                }
                r = assignment_changed => { if r.is_ok() { self.reassign(); } }
                _ = version.changed(), if consuming && !more => {}
                _ = feedback.changed(), if self.feedback => {}
                _ = tokio::task::yield_now(), if more => {}
                _ = tokio::time::sleep_until(deadline) => return Err(Error::new(ErrorKind::Timeout, "service connection silent past keep-alive")),
                _ = shutdown.changed() => return Ok(()),
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
        self.consumer =
            Some(Consumer { group: req.group.clone(), window, from: req.from, first_assignment: true, assignment, parts: HashMap::new() });
        self.reassign();
        Ok(serde_json::json!({ "partitions": partitions, "window": window }))
    }

    fn reassign(&mut self) {
        let Some(c) = &mut self.consumer else { return };
        let assigned: Vec<u32> = c.assignment.borrow_and_update().clone();
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
        for (&p, st) in c.parts.iter_mut() {
            let room = c.window - st.in_flight.len();
            if room == 0 {
                continue;
            }
            let log = self.shared.events.partition(p);
            let head = *log.durable().borrow();
            st.next = st.next.max(log.first_seq());
            if st.next > head {
                continue;
            }
            let records = log.read(st.next, room.min(512), 1024 * 1024)?;
            for r in records {
                let pkid = next_free_pkid(&mut self.next_pkid, &self.pkids);
                let mut publish = Publish::from_bytes(proto::event_topic(&c.group, p, r.seq), QoS::AtLeastOnce, r.payload);
                publish.pkid = pkid;
                writer.queue(&Packet::Publish(publish))?;
                self.pkids.insert(pkid, Outgoing::Event(p, r.seq));
                st.in_flight.push_back((r.seq, false));
                st.next = r.seq + 1;
                self.shared.stats.events_delivered.fetch_add(1, Ordering::Relaxed);
            }
            more |= st.in_flight.len() < c.window && st.next <= head;
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

    fn acked(&mut self, pkid: u16) {
        let (p, seq) = match self.pkids.remove(&pkid) {
            None => return,
            Some(Outgoing::Feedback(id)) => {
                if let Err(e) = self.shared.c2d.ack_feedback(id) {
                    tracing::error!(batch = id, error = %e, "recording a feedback acknowledgement failed; it will be delivered again");
                }
                return;
            }
            Some(Outgoing::Event(p, seq)) => (p, seq),
        };
        let Some(c) = &mut self.consumer else { return };
        let Some(st) = c.parts.get_mut(&p) else { return };
        if let Some(e) = st.in_flight.iter_mut().find(|e| e.0 == seq) {
            e.1 = true;
        }
        let mut last = None;
        while st.in_flight.front().is_some_and(|e| e.1) {
            last = st.in_flight.pop_front().map(|e| e.0);
        }
        if let Some(s) = last {
            self.shared.groups.advance(&c.group, p, self.member, s);
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

fn need(rights: &[Right], r: Right, op: &str) -> Result<()> {
    if rights.contains(&r) {
        Ok(())
    } else {
        Err(Error::new(ErrorKind::Unauthorized, format!("'{op}' needs the {r:?} right, which this policy does not have")))
    }
}

async fn handle(shared: &Arc<Shared>, rights: &[Right], op: &str, body: &[u8]) -> Result<serde_json::Value> {
    match op {
        "devices.create" => {
            need(rights, Right::RegistryWrite, op)?;
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
            need(rights, Right::RegistryWrite, op)?;
            let req: proto::DeviceRef = proto::parse_body(op, body)?;
            shared.registry.delete(&req.device_id).await?;
            shared.kick(&req.device_id);
            Ok(serde_json::json!({}))
        }
        "devices.update" => {
            need(rights, Right::RegistryWrite, op)?;
            let req: proto::UpdateDevice = proto::parse_body(op, body)?;
            let d = shared.registry.update(&req.device_id, req.status, req.regenerate.as_deref()).await?;
            if d.status == DeviceStatus::Disabled || req.regenerate.is_some() {
                shared.kick(&req.device_id);
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
            let ttl = req.ttl_ms.map(Duration::from_millis);
            let size = msg.iothub_size();
            let seq = shared.c2d.send(&dev.device_id, &dev.generation_id, message_id.clone(), req.ack, ttl, record, size).await?;
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
            shared.groups.flush(&shared.events).await?;
            Ok(serde_json::json!({}))
        }
        "hub.info" => Ok(serde_json::json!({
            "partitions": shared.events.count(),
            "version": env!("CARGO_PKG_VERSION"),
        })),
        _ => Err(Error::invalid(format!("unknown operation '{op}'"))),
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).expect("response serializes")
}
