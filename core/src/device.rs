//! `DeviceClient`: send D2C telemetry reliably over the IoT Hub MQTT device protocol.
//!
//! Shape: a cheap `Clone` handle talks to one driver task. `send()` appends to the durable
//! [`Outbox`] directly (no round trip through the driver) and returns once the message is
//! durable; the driver owns the connection, publishes QoS 1 in order from the outbox with a
//! bounded in-flight window, maps PUBACKs back to outbox entries, re-sends after reconnects,
//! paces reconnects with the [`RetryPolicy`], and renews SAS tokens by draining and reconnecting.
//!
//! Invariants: the driver is the only code that touches the socket; user code never runs on it
//! (status changes are published through a `watch`, outcomes through oneshots), so calling
//! `send()` from any callback cannot deadlock the I/O.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::auth::{self, ConnectionString};
use crate::dedupe::Completed;
use crate::error::{Error, ErrorKind, Result};
use crate::message::{now_ms, Message, MAX_D2C_SIZE};
use crate::outbox::{Outbox, OutboxOptions, OutboxStats, Outcome, Prepared, Sendable};
use crate::retry::RetryPolicy;
use crate::transport::{self, ConnectParams, End, Endpoint, Idle, TlsOptions};
use crate::wire;

/// How a device proves its identity.
#[derive(Clone)]
pub enum Credential {
    /// The device's symmetric key (base64); tokens are generated and renewed automatically.
    SymmetricKey(String),
    /// A ready-made SAS token; it cannot be renewed, so the client stops when it expires.
    SasToken(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::SymmetricKey(_) => f.write_str("SymmetricKey(<redacted>)"),
            Credential::SasToken(_) => f.write_str("SasToken(<redacted>)"),
        }
    }
}

/// Everything a [`DeviceClient`] needs. Build with [`DeviceOptions::from_connection_string`] or
/// [`DeviceOptions::new`], then adjust fields.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// `HostName` as in the connection string; a `:port` suffix selects a local hub over plain
    /// TCP (see [`Endpoint::from_host_name`]).
    pub host_name: String,
    /// Device id (also the MQTT client id).
    pub device_id: String,
    /// Key or token.
    pub credential: Credential,
    /// TLS settings (e.g. a CA file); forces TLS even with an explicit port.
    pub tls: Option<TlsOptions>,
    /// Outbox directory, bounds, overflow policy and durability. Without a directory (and
    /// without `in_memory`) the outbox lives in [`OutboxOptions::default_dir`] of the hub and device id.
    pub outbox: OutboxOptions,
    /// Reconnect pacing.
    pub retry: RetryPolicy,
    /// MQTT keep-alive. Default 60 s.
    pub keep_alive: Duration,
    /// Lifetime of generated SAS tokens; renewal starts at 80 %. Default 1 h.
    pub token_ttl: Duration,
    /// Most unacknowledged publishes on the wire. Default 1,000.
    pub max_in_flight: usize,
    /// Limit for TCP + TLS + CONNACK. Default 30 s.
    pub connect_timeout: Duration,
    /// How long to wait for outstanding PUBACKs before a renewal or a close. Default 10 s.
    pub drain_timeout: Duration,
    /// `DeviceClientType` put in the user name.
    pub client_type: String,
}

impl DeviceOptions {
    /// Options for `device_id` at `host_name` with defaults for everything else.
    pub fn new(host_name: impl Into<String>, device_id: impl Into<String>, credential: Credential) -> DeviceOptions {
        DeviceOptions {
            host_name: host_name.into(),
            device_id: device_id.into(),
            credential,
            tls: None,
            outbox: OutboxOptions::default(),
            retry: RetryPolicy::default(),
            keep_alive: Duration::from_secs(60),
            token_ttl: Duration::from_secs(3600),
            max_in_flight: 1000,
            connect_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            client_type: format!("hubmsg/{}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// Options from a device connection string (`HostName=…;DeviceId=…;SharedAccessKey=…` or
    /// `…;SharedAccessSignature=…`).
    pub fn from_connection_string(cs: &str) -> Result<DeviceOptions> {
        let cs = ConnectionString::parse(cs)?;
        let device_id =
            cs.device_id.clone().ok_or_else(|| Error::invalid("this is a service connection string; a device needs one with DeviceId"))?;
        let credential = match (&cs.shared_access_key, &cs.shared_access_signature) {
            (Some(k), _) => Credential::SymmetricKey(k.clone()),
            (None, Some(t)) => Credential::SasToken(t.clone()),
            (None, None) => return Err(Error::invalid("device connection string has neither SharedAccessKey nor SharedAccessSignature")),
        };
        Ok(DeviceOptions::new(cs.host_name.clone(), device_id, credential))
    }

    /// The outbox options with the directory filled in: the one given, or the default directory
    /// of the hub and device id (none for an in-memory outbox).
    fn resolved_outbox(&self) -> Result<OutboxOptions> {
        let mut o = self.outbox.clone();
        if o.dir.is_none() && !o.in_memory {
            o.dir = Some(OutboxOptions::default_dir(&self.host_name, &self.device_id)?);
        }
        Ok(o)
    }

    fn endpoint(&self) -> Result<Endpoint> {
        let (host, port) = split_host_port(&self.host_name)?;
        Ok(Endpoint::from_host_name(&host, port, self.tls.clone()))
    }
}

/// Splits `host[:port]` / `[v6]:port`.
pub(crate) fn split_host_port(host_name: &str) -> Result<(String, Option<u16>)> {
    let bad = || Error::invalid(format!("HostName '{host_name}' is not host or host:port"));
    if let Some(rest) = host_name.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((h.to_string(), Some(p.parse().map_err(|_| bad())?))),
            None if after.is_empty() => Ok((h.to_string(), None)),
            None => Err(bad()),
        };
    }
    match host_name.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Ok((h.to_string(), Some(p.parse().map_err(|_| bad())?))),
        _ if host_name.is_empty() => Err(bad()),
        _ => Ok((host_name.to_string(), None)),
    }
}

/// The connection state, as observed through [`DeviceClient::status_watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionStatus {
    /// Dialing / waiting for CONNACK.
    Connecting,
    /// Connected and publishing.
    Connected,
    /// The connection dropped.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// Waiting before reconnect attempt number `attempt`.
    Retrying {
        /// 1-based attempt number.
        attempt: u32,
        /// Delay before it.
        delay: Duration,
    },
    /// Gave up: a permanent error (bad credentials, disabled device) or the retry policy ran out.
    /// Messages stay in the outbox; call [`DeviceClient::reconnect`] to try again.
    Failed {
        /// The error kind.
        kind: ErrorKind,
        /// The error message.
        reason: String,
    },
    /// Closed by the application.
    Closed,
}

/// Client counters (outbox + connection).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Outbox depth, bytes, in flight, delivered, dropped, expired.
    pub outbox: OutboxStats,
    /// Successful connects since start.
    pub connects: u64,
    /// Failed connection attempts / drops that led to a retry.
    pub retries: u64,
    /// C2D messages handed to the application.
    pub c2d_received: u64,
    /// C2D redeliveries kept from the application: of messages it already completed (completed
    /// again without it) or of messages it still holds (its settle applies to the redelivery).
    pub c2d_duplicates: u64,
    /// Kept for the C ABI; always 0 since expiry is judged by the hub's clock (it never delivers
    /// an expired message and records a late settle of one as `Expired`), not the device's.
    pub c2d_expired: u64,
    /// Token renewals performed.
    pub renewals: u64,
    /// The last error, if any.
    pub last_error: Option<String>,
}

/// The handle to one accepted message; await its [`Outcome`].
#[derive(Debug)]
pub struct Delivery {
    /// Outbox sequence number.
    pub seq: u64,
    /// The message id sent as `$.mid`.
    pub message_id: String,
    rx: oneshot::Receiver<Outcome>,
}

impl Delivery {
    /// Waits for the outcome (delivered, expired or dropped). `Closed` if the client stopped
    /// before an outcome was reached (the message stays in the durable outbox).
    pub async fn outcome(self) -> Result<Outcome> {
        self.rx
            .await
            .map_err(|_| Error::new(ErrorKind::Closed, "client closed before the message reached an outcome; it stays in the outbox"))
    }
}

enum Command {
    Close(oneshot::Sender<()>),
    Reconnect,
    Subscribe,
    Settle {
        generation: u64,
        pkid: u16,
        seq: u64,
        /// The delivery identity ([`delivery_key`]).
        message_id: Option<String>,
        how: SettleHow,
    },
    PubAckNow {
        generation: u64,
        pkid: u16,
    },
    /// The application dropped a C2D message without settling it.
    Release {
        key: String,
    },
}

/// The identity of a C2D delivery the device de-duplicates on: the hub's queue sequence number
/// with the message id (`{seq}:{id}`), so a service that reuses an id (say `reboot`) gets a new
/// command each time; the message id alone where the hub sends no sequence number (Azure IoT
/// Hub). `None` without either.
pub fn delivery_key(message_id: Option<&str>, seq: u64) -> Option<String> {
    match (message_id, seq) {
        (None, 0) => None,
        (Some(id), 0) => Some(id.to_string()),
        (id, seq) => Some(format!("{seq}:{}", id.unwrap_or(""))),
    }
}

/// What goes out for a settled C2D delivery once its turn comes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AckAction {
    /// PUBACK this packet id (complete).
    PubAck(u16),
    /// Publish this hubmsg settle topic (abandon / reject).
    Settle(String),
    /// Nothing: the application released the message (the hub redelivers it after its lock).
    Skip,
}

/// The C2D deliveries of one connection in receive order. Acknowledgements leave strictly in
/// that order whatever order the application settles in (MQTT-4.6.0-2; IoT Hub clients check
/// it): a settle waits until every earlier delivery was settled or released.
#[derive(Debug, Default)]
struct AckOrder {
    queue: VecDeque<(u16, Option<AckAction>)>,
}

impl AckOrder {
    /// A QoS 1 delivery arrived with `pkid`.
    fn received(&mut self, pkid: u16) {
        self.queue.push_back((pkid, None));
    }

    /// The delivery `pkid` (the oldest unsettled one with that id) is settled with `action`.
    fn ready(&mut self, pkid: u16, action: AckAction) {
        if let Some(slot) = self.queue.iter_mut().find(|(p, a)| *p == pkid && a.is_none()) {
            slot.1 = Some(action);
        }
    }

    /// The actions whose turn came, in receive order.
    fn take_ready(&mut self) -> Vec<AckAction> {
        let mut out = Vec::new();
        while self.queue.front().is_some_and(|(_, a)| a.is_some()) {
            match self.queue.pop_front().and_then(|(_, a)| a) {
                Some(AckAction::Skip) | None => {}
                Some(a) => out.push(a),
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SettleHow {
    Complete,
    Abandon,
    Reject,
}

/// A cloud-to-device message handed to the application. Settle it with exactly one of
/// [`C2dMessage::complete`], [`C2dMessage::abandon`], [`C2dMessage::reject`]; dropping it
/// unsettled leaves it locked at the hub until the lock times out, then it is delivered again.
#[derive(Debug)]
pub struct C2dMessage {
    /// The message (`$.to`, `iothub-ack`, sequence number … in `system`).
    pub message: Message,
    /// Sequence number in the device queue (0 when the hub does not send it, e.g. Azure IoT Hub).
    pub sequence_number: u64,
    generation: u64,
    pkid: u16,
    cmd: mpsc::UnboundedSender<Command>,
    settled: bool,
}

impl Drop for C2dMessage {
    fn drop(&mut self) {
        if !self.settled {
            if let Some(key) = delivery_key(self.message.message_id.as_deref(), self.sequence_number) {
                let _ = self.cmd.send(Command::Release { key });
            }
        }
    }
}

impl C2dMessage {
    fn settle(mut self, how: SettleHow) -> Result<()> {
        if how != SettleHow::Complete && self.sequence_number == 0 {
            return Err(Error::new(
                ErrorKind::Usage,
                "abandon and reject over MQTT need a hubmsg hub (IoT Hub's MQTT only completes); complete the message or let its lock expire",
            ));
        }
        let cmd = Command::Settle {
            generation: self.generation,
            pkid: self.pkid,
            seq: self.sequence_number,
            message_id: delivery_key(self.message.message_id.as_deref(), self.sequence_number),
            how,
        };
        self.settled = true;
        self.cmd.send(cmd).map_err(|_| Error::closed("device client"))
    }

    /// Completes the message (the hub removes it; feedback `Success` if requested). The id is
    /// recorded durably first, so a redelivery of it never reaches the application again.
    pub fn complete(self) -> Result<()> {
        self.settle(SettleHow::Complete)
    }

    /// Returns the message to the queue (delivery count + 1; dead-lettered at the maximum).
    pub fn abandon(self) -> Result<()> {
        self.settle(SettleHow::Abandon)
    }

    /// Dead-letters the message (feedback `Rejected` if requested).
    pub fn reject(self) -> Result<()> {
        self.settle(SettleHow::Reject)
    }
}

/// The stream of C2D messages of one [`DeviceClient`] (see [`DeviceClient::c2d`]).
#[derive(Debug)]
pub struct C2dReceiver {
    rx: mpsc::UnboundedReceiver<C2dMessage>,
}

impl C2dReceiver {
    /// The next message; `None` once the client is closed.
    pub async fn recv(&mut self) -> Option<C2dMessage> {
        self.rx.recv().await
    }

    /// The next message within `timeout` (`Ok(None)` on timeout, `Closed` once closed).
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<C2dMessage>> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Err(_) => Ok(None),
            Ok(None) => Err(Error::closed("device client")),
            Ok(Some(m)) => Ok(Some(m)),
        }
    }

    /// Blocking form of [`C2dReceiver::recv_timeout`] (not on a runtime thread).
    pub fn recv_blocking(&mut self, timeout: Duration) -> Result<Option<C2dMessage>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.rx.try_recv() {
                Ok(m) => return Ok(Some(m)),
                Err(mpsc::error::TryRecvError::Disconnected) => return Err(Error::closed("device client")),
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

struct Shared {
    device_id: String,
    outbox: Outbox,
    completed: Completed,
    c2d_rx: Mutex<Option<mpsc::UnboundedReceiver<C2dMessage>>>,
    cmd: mpsc::UnboundedSender<Command>,
    status: watch::Receiver<ConnectionStatus>,
    stats: Arc<Mutex<DeviceStats>>,
}

/// A device's connection to a hub. Cheap to clone; all clones share one driver task.
#[derive(Clone)]
pub struct DeviceClient {
    shared: Arc<Shared>,
}

impl DeviceClient {
    /// Opens the outbox, starts the driver (which connects in the background) and returns.
    /// Must be called within a tokio runtime.
    pub async fn connect(opts: DeviceOptions) -> Result<DeviceClient> {
        if opts.device_id.is_empty() || opts.device_id.contains(['/', '+', '#']) {
            return Err(Error::invalid(format!("device id '{}' is empty or contains '/', '+' or '#'", opts.device_id)));
        }
        let endpoint = opts.endpoint()?;
        if let Credential::SymmetricKey(k) = &opts.credential {
            auth::sign(k, b"probe")?; // reject a malformed key now, not in the retry loop
        }
        let outbox_opts = opts.resolved_outbox()?;
        // Completed C2D ids are remembered beside the outbox (`{outbox}.c2d-completed`), or in
        // memory with an in-memory outbox.
        let completed_dir = outbox_opts.dir.as_ref().map(|d| {
            let mut name = d.file_name().map(|n| n.to_os_string()).unwrap_or_default();
            name.push(".c2d-completed");
            d.with_file_name(name)
        });
        let durability = opts.outbox.durability;
        let (outbox, completed) = tokio::task::spawn_blocking(move || -> Result<_> {
            Ok((Outbox::open(outbox_opts)?, Completed::open(completed_dir.as_deref(), durability)?))
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("outbox open task failed: {e}")))??;
        let (c2d_tx, c2d_rx) = mpsc::unbounded_channel();
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = watch::channel(ConnectionStatus::Connecting);
        let stats = Arc::new(Mutex::new(DeviceStats::default()));
        let device_id = opts.device_id.clone();
        let driver = Driver {
            opts,
            endpoint,
            outbox: outbox.clone(),
            completed: completed.clone(),
            c2d_tx,
            held: HashMap::new(),
            acks: AckOrder::default(),
            closer: None,
            subscribed: false,
            generation: 0,
            cmd_tx: cmd_tx.clone(),
            cmd: cmd_rx,
            status: status_tx,
            stats: stats.clone(),
        };
        tokio::spawn(driver.run());
        Ok(DeviceClient {
            shared: Arc::new(Shared {
                device_id,
                outbox,
                completed,
                c2d_rx: Mutex::new(Some(c2d_rx)),
                cmd: cmd_tx,
                status: status_rx,
                stats,
            }),
        })
    }

    /// Connects with a device connection string and default options.
    pub async fn from_connection_string(cs: &str) -> Result<DeviceClient> {
        DeviceClient::connect(DeviceOptions::from_connection_string(cs)?).await
    }

    /// Queues a message for delivery and returns once it is durable in the outbox. Sets `$.mid`
    /// (a UUID) and the creation time when absent. Errors: `MessageTooLarge` (> 256 KB),
    /// `InvalidArgument` (duplicate or empty property name), `QueueFull`, `Storage`, `Closed`.
    pub async fn send(&self, mut msg: Message) -> Result<Delivery> {
        let (message_id, wire) = prepare(&self.shared.device_id, &mut msg)?;
        let (seq, rx) = self.shared.outbox.push_batch_prepared(std::slice::from_ref(&msg), vec![wire]).await?.pop().expect("one accepted");
        Ok(Delivery { seq, message_id, rx })
    }

    /// Queues several messages in order and returns once all are durable (they share one
    /// fsync). Validation errors, and `QueueFull` for a batch the outbox has no room for (overflow
    /// reject), reject the whole batch before anything is queued.
    pub async fn send_batch(&self, mut msgs: Vec<Message>) -> Result<Vec<Delivery>> {
        let (ids, wires): (Vec<_>, Vec<_>) =
            msgs.iter_mut().map(|m| prepare(&self.shared.device_id, m)).collect::<Result<Vec<_>>>()?.into_iter().unzip();
        let accepted = self.shared.outbox.push_batch_prepared(&msgs, wires).await?;
        Ok(accepted.into_iter().zip(ids).map(|((seq, rx), message_id)| Delivery { seq, message_id, rx }).collect())
    }

    /// Blocking form of [`DeviceClient::send`] for threads outside the runtime.
    pub fn send_blocking(&self, mut msg: Message) -> Result<Delivery> {
        let (message_id, wire) = prepare(&self.shared.device_id, &mut msg)?;
        let (seq, rx) = self.shared.outbox.push_blocking_prepared(&msg, Some(wire))?;
        Ok(Delivery { seq, message_id, rx })
    }

    /// Waits until every message in the outbox reached an outcome, or `timeout` passes
    /// (`Timeout` error; nothing is lost, delivery continues).
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.shared.outbox.is_empty() {
                self.shared.outbox.persist_ack();
                return Ok(());
            }
            if Instant::now() >= deadline {
                let st = self.shared.outbox.stats();
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("flush: {} messages still pending after {timeout:?} ({} in flight); they stay queued", st.depth, st.in_flight),
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The current connection status.
    pub fn status(&self) -> ConnectionStatus {
        self.shared.status.borrow().clone()
    }

    /// A watch to await status changes on.
    pub fn status_watch(&self) -> watch::Receiver<ConnectionStatus> {
        self.shared.status.clone()
    }

    /// Counters.
    pub fn stats(&self) -> DeviceStats {
        let mut s = self.shared.stats.lock().clone();
        s.outbox = self.shared.outbox.stats();
        s
    }

    /// Starts receiving C2D messages (subscribes now and after every reconnect) and returns
    /// their stream. The hub limits how many are in flight, so a slow application holds back
    /// delivery instead of growing a buffer. Only one receiver exists: a second call is a
    /// `Usage` error.
    pub fn c2d(&self) -> Result<C2dReceiver> {
        let rx = self.shared.c2d_rx.lock().take().ok_or_else(|| Error::new(ErrorKind::Usage, "c2d() was already called on this client"))?;
        self.shared.cmd.send(Command::Subscribe).map_err(|_| Error::closed("device client"))?;
        Ok(C2dReceiver { rx })
    }

    /// Asks a client in `Failed` state to try connecting again (e.g. after the device was
    /// re-enabled).
    pub fn reconnect(&self) {
        let _ = self.shared.cmd.send(Command::Reconnect);
    }

    /// Stops the driver after waiting up to `drain_timeout` for in-flight PUBACKs, persists the
    /// outbox watermark and closes the store. Undelivered messages stay in the outbox for the next
    /// start. Idempotent.
    pub async fn close(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        if self.shared.cmd.send(Command::Close(tx)).is_ok() {
            let _ = rx.await;
        }
        let ob = self.shared.outbox.clone();
        let completed = self.shared.completed.clone();
        tokio::task::spawn_blocking(move || ob.close().and(completed.close()))
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("close task failed: {e}")))?
    }

    /// The device id.
    pub fn device_id(&self) -> &str {
        &self.shared.device_id
    }
}

/// Validates a message for sending, sets its id and creation time when absent, and encodes
/// its D2C topic (property bag) once, here, so the driver publishes it without re-encoding.
fn prepare(device_id: &str, msg: &mut Message) -> Result<(String, Prepared)> {
    let size = msg.iothub_size();
    if size > MAX_D2C_SIZE {
        return Err(Error::new(
            ErrorKind::MessageTooLarge,
            format!("message is {size} bytes (body + properties); IoT Hub allows at most {MAX_D2C_SIZE}"),
        ));
    }
    let id = msg.message_id.get_or_insert_with(|| uuid::Uuid::new_v4().to_string()).clone();
    if msg.creation_time_ms.is_none() {
        msg.creation_time_ms = Some(now_ms());
    }
    // Validates property names now rather than at publish time.
    let topic = wire::d2c_topic(device_id, &wire::d2c_bag(msg)?);
    Ok((id, Prepared { topic, payload: msg.body.clone() }))
}

struct Driver {
    opts: DeviceOptions,
    endpoint: Endpoint,
    outbox: Outbox,
    completed: Completed,
    c2d_tx: mpsc::UnboundedSender<C2dMessage>,
    /// C2D messages the application holds and has not settled: delivery identity (see
    /// [`delivery_key`]) → the latest delivery of it (generation, packet id, queue seq). A
    /// redelivery of a held message (after a reconnect) only updates this, so the application
    /// never gets the same delivery twice, and its eventual settle applies to the delivery the
    /// hub is waiting on.
    held: HashMap<String, (u64, u16, u64)>,
    /// This connection's C2D deliveries in receive order, with what to send for each once the
    /// application settled it: acknowledgements leave strictly in this order (MQTT-4.6.0-2).
    acks: AckOrder,
    /// Where to report the end of a `close()`.
    closer: Option<oneshot::Sender<()>>,
    subscribed: bool,
    /// Connection counter: settles and acks from an earlier connection are ignored.
    generation: u64,
    cmd_tx: mpsc::UnboundedSender<Command>,
    cmd: mpsc::UnboundedReceiver<Command>,
    status: watch::Sender<ConnectionStatus>,
    stats: Arc<Mutex<DeviceStats>>,
}

impl Driver {
    async fn run(mut self) {
        let policy = self.opts.retry.clone();
        let status = self.status.clone();
        transport::run_link(&mut self, &policy, &status).await;
        self.outbox.persist_ack();
        self.status.send_replace(ConnectionStatus::Closed);
        if let Some(tx) = self.closer.take() {
            let _ = tx.send(());
        }
    }

    /// A command while not connected.
    fn idle_command(&mut self, cmd: Option<Command>, failed: bool) -> Idle {
        match cmd {
            Some(Command::Close(tx)) => {
                self.closer = Some(tx);
                Idle::Close
            }
            None => Idle::Close,
            Some(Command::Reconnect) => {
                if failed {
                    Idle::Reconnect
                } else {
                    Idle::Continue
                }
            }
            Some(Command::Subscribe) => {
                self.subscribed = true;
                Idle::Continue
            }
            Some(Command::Settle { message_id, how, .. }) => {
                self.settle_offline(message_id, how);
                Idle::Continue
            }
            Some(Command::Release { key }) => {
                self.held.remove(&key);
                Idle::Continue
            }
            Some(Command::PubAckNow { .. }) => Idle::Continue,
        }
    }
}

impl transport::Link for Driver {
    type Conn = (transport::ClientHalves, Option<Instant>);

    async fn connect(&mut self) -> Result<Self::Conn> {
        self.connect_once().await
    }

    async fn serve(&mut self, (halves, renew_at): Self::Conn) -> End {
        self.serve_conn(halves, renew_at).await
    }

    async fn idle(&mut self, failed: Option<&Error>) -> Idle {
        let cmd = self.cmd.recv().await;
        self.idle_command(cmd, failed.is_some())
    }

    fn connected(&mut self) {
        self.generation += 1;
        self.acks = AckOrder::default();
        self.stats.lock().connects += 1;
    }

    fn ended(&mut self, end: &End) {
        self.outbox.rewind();
        if matches!(end, End::Renew) {
            self.stats.lock().renewals += 1;
        }
    }

    fn failed(&mut self, err: &Error, retrying: bool) {
        tracing::debug!(device = %self.opts.device_id, error = %err, "connection failed");
        let mut st = self.stats.lock();
        st.last_error = Some(err.to_string());
        if retrying {
            st.retries += 1;
        }
    }
}

impl Driver {
    /// One connection attempt: returns the halves and when the token expires (if renewable).
    async fn connect_once(&self) -> Result<(transport::ClientHalves, Option<Instant>)> {
        let now_secs = now_ms() / 1000;
        let (password, renew_at) = match &self.opts.credential {
            Credential::SymmetricKey(key) => {
                let ttl = self.opts.token_ttl.as_secs().max(60);
                let uri = auth::device_resource_uri(&self.opts.host_name, &self.opts.device_id);
                let token = auth::generate_sas_token(&uri, key, now_secs + ttl, None)?;
                (token, Some(Instant::now() + self.opts.token_ttl.mul_f64(0.8)))
            }
            Credential::SasToken(t) => {
                let tok = auth::SasToken::parse(t)?;
                if tok.expiry <= now_secs {
                    return Err(Error::new(
                        ErrorKind::Unauthorized,
                        "the SAS token in the connection string has expired; supply a new one or use a SharedAccessKey",
                    ));
                }
                (t.clone(), None)
            }
        };
        let params = ConnectParams {
            client_id: self.opts.device_id.clone(),
            username: wire::device_username(&self.opts.host_name, &self.opts.device_id, Some(&self.opts.client_type)),
            password,
            keep_alive_secs: self.opts.keep_alive.as_secs().clamp(1, 1177) as u16,
            clean_session: false,
        };
        let (halves, _session_present) = transport::client_connect(&self.endpoint, &params, self.opts.connect_timeout).await?;
        Ok((halves, renew_at))
    }

    async fn serve_conn(&mut self, (mut reader, mut writer): transport::ClientHalves, renew_at: Option<Instant>) -> End {
        let keep_alive = self.opts.keep_alive.max(Duration::from_secs(1));
        let mut in_flight: VecDeque<(u16, u64)> = VecDeque::new();
        let mut next_pkid: u16 = 1;
        let mut last_tx = Instant::now();
        let mut last_rx = Instant::now();
        let mut draining: Option<(Instant, bool)> = None; // (deadline, is_close)
        let renew_at = renew_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 86400));
        if self.subscribed {
            if let Err(e) = self.queue_subscribe(&mut writer, &mut next_pkid) {
                return End::Failed(e);
            }
        }
        loop {
            // Fill the window from the outbox.
            if draining.is_none() && in_flight.len() < self.opts.max_in_flight {
                let room = self.opts.max_in_flight - in_flight.len();
                for Sendable { seq, record, prepared } in self.outbox.take_sendable(room) {
                    let publish = match prepared {
                        Some(p) => Ok(Publish::from_bytes(p.topic, QoS::AtLeastOnce, p.payload)),
                        None => d2c_publish(&self.opts.device_id, &record),
                    };
                    let publish = match publish {
                        Ok(p) => p,
                        Err(e) => {
                            // A record we cannot encode can never be sent; report it and move on.
                            tracing::error!(seq, error = %e, "dropping an unencodable outbox record");
                            self.outbox.acked(seq);
                            continue;
                        }
                    };
                    let mut publish = publish;
                    publish.pkid = take_pkid(&mut next_pkid);
                    in_flight.push_back((publish.pkid, seq));
                    if let Err(e) = writer.queue(&Packet::Publish(publish)) {
                        return End::Failed(e);
                    }
                }
            }
            // Settles whose turn came, in receive order.
            for action in self.acks.take_ready() {
                let r = match action {
                    AckAction::PubAck(pkid) => writer.queue(&Packet::PubAck(PubAck::new(pkid))),
                    AckAction::Settle(topic) => {
                        let mut p = Publish::new(topic, QoS::AtLeastOnce, Vec::new());
                        p.pkid = take_pkid(&mut next_pkid);
                        writer.queue(&Packet::Publish(p))
                    }
                    AckAction::Skip => Ok(()),
                };
                if let Err(e) = r {
                    return End::Failed(e);
                }
            }
            if writer.pending() > 0 {
                if let Err(e) = writer.flush_within(self.opts.connect_timeout).await {
                    return End::Failed(e);
                }
                last_tx = Instant::now();
            }
            if let Some((deadline, is_close)) = draining {
                if in_flight.is_empty() || Instant::now() >= deadline {
                    let _ = writer.send(&Packet::Disconnect).await;
                    writer.shutdown().await;
                    return if is_close { End::Closed } else { End::Renew };
                }
            }
            let ping_at = last_tx + keep_alive;
            let dead_at = last_rx + keep_alive.mul_f64(1.5);
            let drain_at = draining.map(|d| d.0).unwrap_or(renew_at);
            let can_send = draining.is_none() && in_flight.len() < self.opts.max_in_flight;
            tokio::select! {
                biased;
                pkt = reader.next() => {
                    last_rx = Instant::now();
                    // Handle everything one read brought (e.g. a batch of PUBACKs) before
                    // refilling the window, so publishes go out in batches.
                    let mut pkt = pkt;
                    let mut drain = transport::Drain::new();
                    loop {
                        match pkt {
                            Ok(Some(Packet::PubAck(ack))) => {
                                let pos = if in_flight.front().is_some_and(|f| f.0 == ack.pkid) { Some(0) } else { in_flight.iter().position(|f| f.0 == ack.pkid) };
                                if let Some(pos) = pos {
                                    let (_, seq) = in_flight.remove(pos).expect("position exists");
                                    self.outbox.acked(seq);
                                }
                            }
                            Ok(Some(Packet::PingResp)) => {}
                            Ok(Some(Packet::Publish(p))) => {
                                if let Err(e) = self.on_c2d(p) {
                                    return End::Failed(e);
                                }
                            }
                            Ok(Some(Packet::SubAck(_))) => {}
                            Ok(Some(other)) => return End::Failed(Error::protocol(format!("unexpected packet from hub: {other:?}"))),
                            Ok(None) => return End::Failed(Error::new(ErrorKind::Disconnected, "the hub closed the connection")),
                            // An oversize packet from the hub ends this connection, not the
                            // client: it is not the application's message, so it must not stop
                            // D2C as a permanent error would.
                            Err(e) if e.kind() == ErrorKind::MessageTooLarge => {
                                return End::Failed(Error::protocol(format!("the hub sent a packet this client cannot take: {}", e.message())))
                            }
                            Err(e) => return End::Failed(e),
                        }
                        pkt = match drain.next(&mut reader) {
                            Ok(None) => break,
                            next => next,
                        };
                    }
                }
                _ = self.outbox.changed(), if can_send => {}
                _ = tokio::time::sleep_until(ping_at) => {
                    if let Err(e) = writer.send(&Packet::PingReq).await { return End::Failed(e) }
                    last_tx = Instant::now();
                }
                _ = tokio::time::sleep_until(dead_at) => {
                    return End::Failed(Error::new(ErrorKind::Timeout, format!("no traffic from the hub for {:?} (keep-alive)", keep_alive.mul_f64(1.5))));
                }
                _ = tokio::time::sleep_until(drain_at), if draining.is_none() => {
                    draining = Some((Instant::now() + self.opts.drain_timeout, false));
                }
                cmd = self.cmd.recv() => match cmd {
                    Some(Command::Close(tx)) => {
                        self.closer = Some(tx);
                        draining = Some((Instant::now() + self.opts.drain_timeout, true));
                    }
                    Some(Command::Reconnect) => {}
                    Some(Command::Subscribe) => {
                        self.subscribed = true;
                        if let Err(e) = self.queue_subscribe(&mut writer, &mut next_pkid) {
                            return End::Failed(e);
                        }
                    }
                    Some(Command::Release { key }) => {
                        if let Some((generation, pkid, _)) = self.held.remove(&key) {
                            if generation == self.generation {
                                self.acks.ready(pkid, AckAction::Skip);
                            }
                        }
                    }
                    Some(Command::Settle { generation, pkid, seq, message_id, how }) => {
                        // Settle the latest delivery of the message (a reconnect may have
                        // redelivered it while the application held the first copy).
                        let (generation, pkid, seq) =
                            message_id.as_ref().and_then(|id| self.held.remove(id)).unwrap_or((generation, pkid, seq));
                        if generation == self.generation {
                            self.settle(pkid, seq, message_id, how);
                        } else {
                            // Settled after the connection it came on ended.
                            self.settle_offline(message_id, how);
                        }
                    }
                    Some(Command::PubAckNow { generation, pkid }) => {
                        if generation == self.generation {
                            self.acks.ready(pkid, AckAction::PubAck(pkid));
                        }
                    }
                    None => draining = Some((Instant::now() + self.opts.drain_timeout, true)),
                },
            }
        }
    }
}

impl Driver {
    fn queue_subscribe(
        &self,
        writer: &mut transport::PacketWriter<tokio::io::WriteHalf<transport::BoxStream>>,
        next_pkid: &mut u16,
    ) -> Result<()> {
        let mut sub = Subscribe::new(wire::c2d_filter(&self.opts.device_id), QoS::AtLeastOnce);
        sub.pkid = take_pkid(next_pkid);
        writer.queue(&Packet::Subscribe(sub))
    }

    /// A settle that arrives while its connection is gone. The hub will deliver the message
    /// again (its lock died with the connection); a completion is still recorded durably, so
    /// that redelivery is acknowledged as a duplicate and never reaches the application twice.
    /// Abandon needs nothing (the redelivery is the abandon); a reject cannot be sent, so the
    /// message comes back and the application sees it again (documented in docs/protocol.md).
    fn settle_offline(&mut self, key: Option<String>, how: SettleHow) {
        if let Some(k) = &key {
            self.held.remove(k);
        }
        let (SettleHow::Complete, Some(key)) = (how, key) else { return };
        let completed = self.completed.clone();
        tokio::spawn(async move {
            if let Err(e) = completed.record(&key).await {
                tracing::error!(error = %e, "recording a completed C2D delivery failed; the message will reach the app again");
            }
        });
    }

    /// An incoming PUBLISH: a C2D message to hand over, or one to acknowledge without the
    /// application (a redelivery of a completed delivery, or not C2D at all). Every QoS 1
    /// delivery takes its place in [`AckOrder`]. Expiry is the hub's judgement (it never delivers
    /// an expired message and records a late settle as `Expired`), not this device's clock.
    fn on_c2d(&mut self, p: Publish) -> Result<()> {
        let qos1 = p.qos == QoS::AtLeastOnce;
        if qos1 {
            self.acks.received(p.pkid);
        }
        let ack_now = |acks: &mut AckOrder| {
            if qos1 {
                acks.ready(p.pkid, AckAction::PubAck(p.pkid));
            }
        };
        let Some(bag) = wire::parse_c2d_topic(&p.topic) else {
            tracing::warn!(topic = %p.topic.escape_debug(), "ignoring a publish that is not C2D");
            ack_now(&mut self.acks);
            return Ok(());
        };
        let mut msg = Message::new(p.payload.clone());
        if let Err(e) = wire::decode_bag(bag).and_then(|b| wire::apply_bag(&mut msg, b)) {
            tracing::warn!(error = %e, "C2D message with a malformed property bag; completing it so it does not block the queue");
            ack_now(&mut self.acks);
            return Ok(());
        }
        let seq = msg.system_property("iothub-sequencenumber").and_then(|s| s.parse().ok()).unwrap_or(0);
        let key = delivery_key(msg.message_id.as_deref(), seq);
        if key.as_deref().is_some_and(|k| self.completed.contains(k)) {
            self.stats.lock().c2d_duplicates += 1;
            ack_now(&mut self.acks);
            return Ok(());
        }
        if let Some(k) = &key {
            if let Some(held) = self.held.get_mut(k) {
                // The application still holds this delivery from an earlier transmission: its
                // settle will apply to this one. An older transmission on this connection will
                // never be acknowledged, so it no longer holds up the ones behind it.
                let (old_generation, old_pkid, _) = *held;
                *held = (self.generation, p.pkid, seq);
                if old_generation == self.generation && qos1 {
                    self.acks.ready(old_pkid, AckAction::Skip);
                }
                self.stats.lock().c2d_duplicates += 1;
                return Ok(());
            }
            if qos1 {
                self.held.insert(k.clone(), (self.generation, p.pkid, seq));
            }
        }
        self.stats.lock().c2d_received += 1;
        let m = C2dMessage {
            message: msg,
            sequence_number: seq,
            generation: self.generation,
            pkid: p.pkid,
            cmd: self.cmd_tx.clone(),
            settled: false,
        };
        // At QoS 0 the pkid is 0 and settling is a no-op.
        let _ = self.c2d_tx.send(m);
        Ok(())
    }

    /// Records how delivery `pkid` of this connection was settled; what it sends goes out when
    /// its turn in [`AckOrder`] comes. A completion is made durable (the delivery identity
    /// recorded) before its PUBACK may go.
    fn settle(&mut self, pkid: u16, seq: u64, key: Option<String>, how: SettleHow) {
        if pkid == 0 {
            return; // QoS 0: nothing to acknowledge
        }
        match how {
            SettleHow::Complete => match key {
                Some(key) => {
                    let completed = self.completed.clone();
                    let cmd = self.cmd_tx.clone();
                    let generation = self.generation;
                    tokio::spawn(async move {
                        match completed.record(&key).await {
                            Ok(()) => {
                                let _ = cmd.send(Command::PubAckNow { generation, pkid });
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "recording a completed C2D delivery failed; the message will be redelivered")
                            }
                        }
                    });
                }
                None => self.acks.ready(pkid, AckAction::PubAck(pkid)),
            },
            SettleHow::Abandon | SettleHow::Reject => {
                let verb = if how == SettleHow::Abandon { "abandon" } else { "reject" };
                self.acks.ready(pkid, AckAction::Settle(format!("{}{verb}/{seq}", crate::proto::C2D_SETTLE_PREFIX)));
            }
        }
    }
}

fn take_pkid(next: &mut u16) -> u16 {
    let id = *next;
    *next = if id == u16::MAX { 1 } else { id + 1 };
    id
}

fn d2c_publish(device_id: &str, record: &bytes::Bytes) -> Result<Publish> {
    let msg = Message::decode(record)?;
    let topic = wire::d2c_topic(device_id, &wire::d2c_bag(&msg)?);
    Ok(Publish::from_bytes(topic, QoS::AtLeastOnce, msg.body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_identity_is_seq_and_id() {
        assert_eq!(delivery_key(Some("reboot"), 7).as_deref(), Some("7:reboot"));
        assert_ne!(delivery_key(Some("reboot"), 7), delivery_key(Some("reboot"), 8));
        assert_eq!(delivery_key(Some("reboot"), 0).as_deref(), Some("reboot"));
        assert_eq!(delivery_key(None, 3).as_deref(), Some("3:"));
        assert_eq!(delivery_key(None, 0), None);
    }

    #[test]
    fn acks_leave_in_receive_order_whatever_the_settle_order() {
        let mut o = AckOrder::default();
        for p in [1, 2, 3, 4] {
            o.received(p);
        }
        o.ready(3, AckAction::PubAck(3));
        o.ready(2, AckAction::Settle("reject/2".into()));
        assert!(o.take_ready().is_empty(), "1 is not settled yet");
        o.ready(1, AckAction::PubAck(1));
        assert_eq!(o.take_ready(), vec![AckAction::PubAck(1), AckAction::Settle("reject/2".into()), AckAction::PubAck(3)]);
        // A released delivery no longer holds up the ones behind it.
        o.received(5);
        o.ready(5, AckAction::PubAck(5));
        o.ready(4, AckAction::Skip);
        assert_eq!(o.take_ready(), vec![AckAction::PubAck(5)]);
        // A reused packet id settles the oldest unsettled delivery with it.
        o.received(9);
        o.received(9);
        o.ready(9, AckAction::PubAck(9));
        assert_eq!(o.take_ready(), vec![AckAction::PubAck(9)]);
        assert_eq!(o.queue.len(), 1);
    }

    #[test]
    fn host_port_split() {
        assert_eq!(split_host_port("h.azure-devices.net").unwrap(), ("h.azure-devices.net".into(), None));
        assert_eq!(split_host_port("127.0.0.1:18830").unwrap(), ("127.0.0.1".into(), Some(18830)));
        assert_eq!(split_host_port("[::1]:1883").unwrap(), ("::1".into(), Some(1883)));
        assert!(split_host_port("h:notaport").is_err());
        assert!(split_host_port("").is_err());
    }
}
