//! `ServiceClient`: the back end's side — read D2C events by consumer group with checkpoints,
//! and manage device identities — over the hubmsg service contract (`docs/protocol.md`).
//!
//! Shape: like the device client, cheap `Clone` handles talk to one driver task per connection.
//! Requests are re-sent after a reconnect until answered (at-least-once) or until their timeout.
//! Each [`EventStream`] has its own connection (one consumer group per connection); acking an
//! event sends its PUBACK, which advances the group's checkpoint at the hub; events not acked
//! when a connection drops are redelivered.
//!
//! Bounds: an [`EventStream`] holds at most `event_buffer` events / `event_buffer_bytes` that
//! the application has not taken; past that its driver stops reading from the hub (the hub's
//! window and TCP push back) and holds the one event that did not fit — nothing is dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::auth::{self, ConnectionString};
use crate::device::{split_host_port, ConnectionStatus};
use crate::error::{Error, ErrorKind, Result};
use crate::message::{now_ms, Message};
use crate::outbox::{Outbox, OutboxOptions, OutboxStats};
use crate::proto::{
    self, AckMode, C2dReceipt, ConsumeRequest, CreateDevice, DeviceIdentity, DeviceRef, DeviceStatus, FeedbackRecord, StartPosition,
    UpdateDevice,
};
use crate::retry::RetryPolicy;
use crate::transport::{self, ConnectParams, End, Endpoint, Idle, TlsOptions};

/// Everything a [`ServiceClient`] needs. `Debug` never prints the key.
#[derive(Clone)]
pub struct ServiceOptions {
    /// `HostName` as in the connection string (`:port` selects plain TCP to a local hub).
    pub host_name: String,
    /// Policy name (`SharedAccessKeyName`).
    pub policy: String,
    /// Policy key (base64).
    pub key: String,
    /// TLS settings (e.g. a CA file); forces TLS even with an explicit port.
    pub tls: Option<TlsOptions>,
    /// Reconnect pacing.
    pub retry: RetryPolicy,
    /// MQTT keep-alive. Default 30 s.
    pub keep_alive: Duration,
    /// Lifetime of generated tokens. Default 1 h.
    pub token_ttl: Duration,
    /// Limit for TCP + TLS + CONNACK. Default 30 s.
    pub connect_timeout: Duration,
    /// Limit for one request, across reconnects. Default 30 s.
    pub request_timeout: Duration,
    /// The outbox C2D sends go through: in memory by default (`send_c2d` resolves only once
    /// the hub holds the message durably; the outbox only re-sends across reconnects); give a
    /// directory to survive restarts of the service process.
    pub outbox: OutboxOptions,
    /// Most C2D sends in flight. Default 100.
    pub max_in_flight: usize,
    /// Events an [`EventStream`] holds that the application has not taken yet; past it (or
    /// past `event_buffer_bytes`) the stream stops reading from the hub until the application
    /// takes some — TCP back-pressure, never a dropped event. Default 10,000 (more than the
    /// hub's window of 1000 per partition for 4 partitions, so a steady reader never pauses).
    pub event_buffer: usize,
    /// Payload bytes of those events. Default 16 MiB (twice the hub's 8 MiB per consumer).
    pub event_buffer_bytes: usize,
}

impl std::fmt::Debug for ServiceOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceOptions")
            .field("host_name", &self.host_name)
            .field("policy", &self.policy)
            .field("key", &auth::Redacted)
            .field("tls", &self.tls)
            .field("retry", &self.retry)
            .field("keep_alive", &self.keep_alive)
            .field("token_ttl", &self.token_ttl)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("outbox", &self.outbox)
            .field("max_in_flight", &self.max_in_flight)
            .field("event_buffer", &self.event_buffer)
            .field("event_buffer_bytes", &self.event_buffer_bytes)
            .finish()
    }
}

impl ServiceOptions {
    /// Options from a policy connection string
    /// (`HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`).
    pub fn from_connection_string(cs: &str) -> Result<ServiceOptions> {
        let cs = ConnectionString::parse(cs)?;
        let (Some(policy), Some(key)) = (cs.shared_access_key_name.clone(), cs.shared_access_key.clone()) else {
            return Err(Error::invalid(
                "a service connection string needs SharedAccessKeyName and SharedAccessKey (this looks like a device string)",
            ));
        };
        Ok(ServiceOptions {
            host_name: cs.host_name,
            policy,
            key,
            tls: None,
            retry: RetryPolicy::default(),
            keep_alive: Duration::from_secs(30),
            token_ttl: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            outbox: OutboxOptions::in_memory(),
            max_in_flight: 100,
            event_buffer: 10_000,
            event_buffer_bytes: 16 * 1024 * 1024,
        })
    }

    fn endpoint(&self) -> Result<Endpoint> {
        let (host, port) = split_host_port(&self.host_name)?;
        Ok(Endpoint::from_host_name(&host, port, self.tls.clone()))
    }
}

enum Cmd {
    Request {
        op: String,
        body: Vec<u8>,
        deadline: Instant,
        tx: oneshot::Sender<Result<serde_json::Value>>,
    },
    Ack {
        generation: u64,
        pkid: u16,
    },
    /// Start receiving feedback; batches go to `tx`.
    Feedback {
        tx: mpsc::UnboundedSender<FeedbackBatch>,
    },
    /// Outcome waits were added to [`C2dShared`] (the driver sends their watches).
    Watch,
    Close(oneshot::Sender<()>),
}

/// Options of one C2D send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct C2dOptions {
    /// Requested feedback (`iothub-ack`).
    pub ack: AckMode,
    /// Time to live (default: the message's expiry time if set, else the hub's 1 h).
    pub ttl: Option<Duration>,
}

/// State shared by a [`ServiceClient`]'s handles and its driver.
#[derive(Default)]
struct C2dShared {
    /// Outbox seq → the sender waiting for the hub's answer.
    waiting: HashMap<u64, oneshot::Sender<Result<C2dReceipt>>>,
    /// Answers that arrived before their sender registered (with when; dropped after the
    /// request timeout if the sender never comes, e.g. it was cancelled).
    early: HashMap<u64, (std::time::Instant, Result<C2dReceipt>)>,
    /// Message id → senders waiting for its feedback record.
    outcomes: HashMap<String, Vec<oneshot::Sender<FeedbackRecord>>>,
    /// Ids of `outcomes` whose first watch the driver has not sent yet (it sends them before
    /// any C2D send queued after them, so the hub watches before the message exists).
    watch_new: Vec<String>,
    /// Ids of `outcomes` → the hub time their first watch was answered with (the `since` of
    /// the watch re-sent after a reconnect).
    watch_since: HashMap<String, u64>,
    /// Ids whose waits were abandoned (timed out, cancelled): the driver unwatches them.
    unwatch: Vec<String>,
}

impl C2dShared {
    /// Hands `r` to every call waiting for its message id (once: the id is no longer waited
    /// for), whether it came as a notification or in a feedback batch.
    fn resolve(&mut self, r: &FeedbackRecord) {
        if let Some(ws) = self.outcomes.remove(&r.original_message_id) {
            self.watch_since.remove(&r.original_message_id);
            for w in ws {
                let _ = w.send(r.clone());
            }
        }
    }
}

/// One batch of feedback records; acknowledge it once processed, or it is delivered again.
#[derive(Debug)]
pub struct FeedbackBatch {
    /// Batch id.
    pub id: u64,
    /// The records (IoT Hub's JSON shape).
    pub records: Vec<FeedbackRecord>,
    generation: u64,
    pkid: u16,
    cmd: mpsc::UnboundedSender<Cmd>,
}

impl FeedbackBatch {
    /// Acknowledges the batch (the hub deletes it).
    pub fn ack(&self) {
        let _ = self.cmd.send(Cmd::Ack { generation: self.generation, pkid: self.pkid });
    }
}

/// The feedback batches of a [`ServiceClient`] (see [`ServiceClient::feedback`]).
pub struct FeedbackStream {
    rx: mpsc::UnboundedReceiver<FeedbackBatch>,
}

impl FeedbackStream {
    /// The next batch; `None` once the client is closed.
    pub async fn next(&mut self) -> Option<FeedbackBatch> {
        self.rx.recv().await
    }

    /// The next batch within `timeout` (`Ok(None)` on timeout).
    pub async fn next_timeout(&mut self, timeout: Duration) -> Result<Option<FeedbackBatch>> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Err(_) => Ok(None),
            Ok(None) => Err(Error::closed("feedback stream")),
            Ok(Some(b)) => Ok(Some(b)),
        }
    }
}

/// A back-end connection to a hub. Cheap to clone.
#[derive(Clone)]
pub struct ServiceClient {
    opts: Arc<ServiceOptions>,
    cmd: mpsc::UnboundedSender<Cmd>,
    status: watch::Receiver<ConnectionStatus>,
    outbox: Outbox,
    c2d: Arc<Mutex<C2dShared>>,
}

impl ServiceClient {
    /// Starts the driver (connecting in the background). Must run within a tokio runtime.
    pub async fn connect(opts: ServiceOptions) -> Result<ServiceClient> {
        auth::sign(&opts.key, b"probe")?;
        let ob = opts.outbox.clone();
        let outbox = tokio::task::spawn_blocking(move || Outbox::open(ob))
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("outbox open task failed: {e}")))??;
        let c2d = Arc::new(Mutex::new(C2dShared::default()));
        let (cmd, status) = Driver::spawn(opts.clone(), None, Some((outbox.clone(), c2d.clone())))?;
        Ok(ServiceClient { opts: Arc::new(opts), cmd, status, outbox, c2d })
    }

    /// Connects with a policy connection string and default options.
    pub async fn from_connection_string(cs: &str) -> Result<ServiceClient> {
        ServiceClient::connect(ServiceOptions::from_connection_string(cs)?).await
    }

    /// The current connection status.
    pub fn status(&self) -> ConnectionStatus {
        self.status.borrow().clone()
    }

    /// A watch to await status changes on.
    pub fn status_watch(&self) -> watch::Receiver<ConnectionStatus> {
        self.status.clone()
    }

    async fn call<T: DeserializeOwned>(&self, op: &str, body: &impl serde::Serialize) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let body = serde_json::to_vec(body).expect("request serializes");
        let deadline = Instant::now() + self.opts.request_timeout;
        self.cmd.send(Cmd::Request { op: op.into(), body, deadline, tx }).map_err(|_| Error::closed("service client"))?;
        let v = rx.await.map_err(|_| Error::closed("service client"))??;
        serde_json::from_value(v).map_err(|e| Error::protocol(format!("unexpected '{op}' response: {e}")))
    }

    /// Registers a device with generated keys. `AlreadyExists` if the id is taken.
    pub async fn create_device(&self, device_id: &str) -> Result<DeviceIdentity> {
        self.call("devices.create", &CreateDevice { device_id: device_id.into(), ..Default::default() }).await
    }

    /// Registers a device with explicit settings.
    pub async fn create_device_with(&self, req: CreateDevice) -> Result<DeviceIdentity> {
        self.call("devices.create", &req).await
    }

    /// A device's identity. `NotFound` if absent.
    pub async fn get_device(&self, device_id: &str) -> Result<DeviceIdentity> {
        self.call("devices.get", &DeviceRef { device_id: device_id.into() }).await
    }

    /// Every device, ordered by id.
    pub async fn list_devices(&self) -> Result<Vec<DeviceIdentity>> {
        self.call("devices.list", &serde_json::json!({})).await
    }

    /// Deletes a device (its connection is dropped). `NotFound` if absent.
    pub async fn delete_device(&self, device_id: &str) -> Result<()> {
        let _: serde_json::Value = self.call("devices.delete", &DeviceRef { device_id: device_id.into() }).await?;
        Ok(())
    }

    /// Enables or disables a device (a disabled device is disconnected and refused).
    pub async fn set_device_status(&self, device_id: &str, status: DeviceStatus) -> Result<DeviceIdentity> {
        self.call("devices.update", &UpdateDevice { device_id: device_id.into(), status: Some(status), regenerate: None }).await
    }

    /// Regenerates `primary`, `secondary` or `both` keys (a connection of the device that
    /// authenticated with a replaced key is closed).
    pub async fn regenerate_keys(&self, device_id: &str, which: &str) -> Result<DeviceIdentity> {
        self.call("devices.update", &UpdateDevice { device_id: device_id.into(), status: None, regenerate: Some(which.into()) }).await
    }

    /// Every shared access policy of the hub with its keys and rights. Needs a policy holding
    /// every right (like `iothubowner`).
    pub async fn list_policies(&self) -> Result<Vec<proto::Policy>> {
        self.call("policies.list", &serde_json::json!({})).await
    }

    /// Regenerates a policy's `primary`, `secondary` or `both` keys and returns the policy.
    /// Tokens signed with a replaced key are refused from their next CONNECT on, and the hub
    /// closes the connections that authenticated with it (this one, if it did, right after the
    /// answer). Needs a policy holding every right.
    pub async fn regenerate_policy_key(&self, name: &str, which: &str) -> Result<proto::Policy> {
        self.call("policies.regenerate", &proto::RegeneratePolicyKey { name: name.into(), key: which.into() }).await
    }

    /// A device connection string for `identity` on this client's hub (primary key).
    pub fn device_connection_string(&self, identity: &DeviceIdentity) -> String {
        ConnectionString {
            host_name: self.opts.host_name.clone(),
            device_id: Some(identity.device_id.clone()),
            shared_access_key: Some(identity.primary_key.clone()),
            ..Default::default()
        }
        .to_string()
    }

    /// Sends a C2D message to `device_id` with the given feedback request; resolves once the hub
    /// holds it durably. The send goes through the client's outbox and is re-sent after
    /// reconnects until the hub answers (at-least-once; a duplicate carries the same message
    /// id, which hubmsg devices de-duplicate). Errors: `NotFound` (unknown device), `QueueFull`
    /// (the device has 50 pending), `MessageTooLarge` (> 64 KB), `InvalidArgument` (TTL outside
    /// 1 s – 48 h), `Unauthorized`.
    pub async fn send_c2d(&self, device_id: &str, message: Message, ack: AckMode) -> Result<C2dReceipt> {
        self.send_c2d_with(device_id, message, C2dOptions { ack, ttl: None }).await
    }

    /// [`ServiceClient::send_c2d`] with a TTL.
    pub async fn send_c2d_with(&self, device_id: &str, mut message: Message, opts: C2dOptions) -> Result<C2dReceipt> {
        let now = now_ms();
        let ttl = opts.ttl.or_else(|| message.expiry_time_ms.map(|e| Duration::from_millis(e.saturating_sub(now))));
        let message_id = message.message_id.get_or_insert_with(|| uuid::Uuid::new_v4().to_string()).clone();
        use base64::Engine;
        let req = proto::C2dSend {
            device_id: device_id.to_string(),
            ack: opts.ack,
            ttl_ms: ttl.map(|t| t.as_millis() as u64),
            record: base64::engine::general_purpose::STANDARD.encode(message.to_bytes()),
            send_id: Some(uuid::Uuid::new_v4().to_string()),
        };
        let envelope = Message::new(serde_json::to_vec(&req).expect("c2d.send serializes")).with_message_id(message_id);
        // The request must fit one MQTT packet, or it could never leave the outbox.
        if envelope.body.len() + 256 > transport::MAX_PACKET_SIZE {
            return Err(Error::new(
                ErrorKind::MessageTooLarge,
                format!(
                    "C2D message of {} bytes does not fit a request ({} bytes at most after base64); IoT Hub allows 64 KB",
                    message.body.len(),
                    transport::MAX_PACKET_SIZE
                ),
            ));
        }
        let (seq, _) = self.outbox.push(&envelope).await?;
        let rx = {
            let mut g = self.c2d.lock();
            if let Some((_, r)) = g.early.remove(&seq) {
                return r;
            }
            let (tx, rx) = oneshot::channel();
            g.waiting.insert(seq, tx);
            rx
        };
        rx.await.map_err(|_| Error::closed("service client"))?
    }

    /// Sends a C2D message asking for feedback (`ack`, `Full` if `None`) and waits up to
    /// `timeout` for its outcome: the feedback record (`Success`, `Rejected`, `Expired`,
    /// `DeliveryCountExceeded`, `Purged`). The record comes to this client as a notification
    /// ([`ServiceClient::await_outcome`]), whatever other clients read feedback, and also stays
    /// in the hub-wide feedback queue. `Timeout` when it did not come in time — also when the
    /// outcome happened while this client was disconnected *and* the hub restarted before the
    /// client reconnected (the hub's cache of recent outcomes is in memory); `QueueFull` when
    /// this client already waits for [`proto::MAX_WATCHES`] outcomes.
    pub async fn send_c2d_and_wait(&self, device_id: &str, message: Message, ack: AckMode, timeout: Duration) -> Result<FeedbackRecord> {
        let ack = if ack == AckMode::None { AckMode::Full } else { ack };
        let mut message = message;
        let id = message.message_id.get_or_insert_with(|| uuid::Uuid::new_v4().to_string()).clone();
        let rx = self.await_outcome(&id)?;
        self.send_c2d(device_id, message, ack).await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(Error::closed("service client")),
            Err(_) => Err(Error::new(ErrorKind::Timeout, format!("no feedback for message '{id}' within {timeout:?}"))),
        }
    }

    /// Registers interest in the feedback record of `message_id`; send the message after this
    /// (through this client), so the hub watches the id before the message exists. The client
    /// asks the hub to notify this connection of the id's outcome (`outcomes.watch`,
    /// `docs/protocol.md`) — it does not read the hub-wide feedback queue, so it takes nothing
    /// from other clients' [`ServiceClient::feedback`] streams — and re-sends the watch after
    /// each reconnect, when the hub answers at once from its cache of recent outcomes if the
    /// outcome happened in between. A record of the id that reaches this client's own feedback
    /// stream first resolves the wait too (once). Dropping the receiver abandons the wait (the
    /// hub stops watching the id). `QueueFull` when [`proto::MAX_WATCHES`] ids are already
    /// awaited.
    pub fn await_outcome(&self, message_id: &str) -> Result<oneshot::Receiver<FeedbackRecord>> {
        let (tx, rx) = oneshot::channel();
        {
            let mut g = self.c2d.lock();
            match g.outcomes.get_mut(message_id) {
                Some(ws) => ws.push(tx),
                None => {
                    if g.outcomes.len() >= proto::MAX_WATCHES {
                        return Err(Error::new(
                            ErrorKind::QueueFull,
                            format!(
                                "this client already waits for {} outcomes (limit {}); wait for some to finish or drop them \
                                 before waiting for '{message_id}'",
                                g.outcomes.len(),
                                proto::MAX_WATCHES
                            ),
                        ));
                    }
                    g.outcomes.insert(message_id.to_string(), vec![tx]);
                    g.watch_new.push(message_id.to_string());
                }
            }
        }
        self.cmd.send(Cmd::Watch).map_err(|_| Error::closed("service client"))?;
        Ok(rx)
    }

    /// Sizes of the client's bookkeeping maps: (C2D sends awaiting an answer, answers not yet
    /// collected, message ids awaiting feedback). For leak checks in tests.
    #[doc(hidden)]
    pub fn pending_counts(&self) -> (usize, usize, usize) {
        let g = self.c2d.lock();
        (g.waiting.len(), g.early.len(), g.outcomes.len())
    }

    /// Removes every pending C2D message of `device_id`; returns how many.
    pub async fn purge_c2d(&self, device_id: &str) -> Result<u64> {
        let r: proto::PurgeResult = self.call("c2d.purge", &DeviceRef { device_id: device_id.into() }).await?;
        Ok(r.total_messages_purged)
    }

    /// The stream of feedback batches of the hub-wide feedback queue (one stream per client; a
    /// second call replaces it). Acknowledge each batch with [`FeedbackBatch::ack`]; a batch
    /// that arrives after the stream was dropped is not acknowledged, so the hub delivers it
    /// again (to another reader once its 60 s lock ends).
    pub fn feedback(&self) -> Result<FeedbackStream> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.cmd.send(Cmd::Feedback { tx }).map_err(|_| Error::closed("service client"))?;
        Ok(FeedbackStream { rx })
    }

    /// Outbox counters of C2D sends.
    pub fn c2d_stats(&self) -> OutboxStats {
        self.outbox.stats()
    }

    /// Opens a consumer of `group` starting at `from` (which only applies to the first
    /// assignment; after a reconnect or a takeover reading resumes at the checkpoint).
    pub async fn events(&self, group: &str, from: StartPosition) -> Result<EventStream> {
        EventStream::open((*self.opts).clone(), ConsumeRequest { group: group.into(), from, window: 1000 }).await
    }

    /// Stops the driver. Pending requests fail with `Closed`.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// One D2C event delivered to a consumer. The record is checked when it arrives but decoded
/// only when asked: [`Event::message_id`], [`Event::body`], [`Event::device_id`] and
/// [`Event::system_property`] read it in place; [`Event::message`] decodes every field once.
#[derive(Debug)]
pub struct Event {
    /// Partition it came from.
    pub partition: u32,
    /// Sequence number within the partition.
    pub sequence_number: u64,
    view: crate::message::RecordView,
    message: std::sync::OnceLock<Message>,
    generation: u64,
    pkid: u16,
    cmd: mpsc::UnboundedSender<Cmd>,
    /// What it counts against [`ServiceOptions::event_buffer_bytes`] while buffered.
    cost: u32,
}

impl Event {
    /// The message with the hub-stamped system properties (decoded on first use, then kept).
    pub fn message(&self) -> &Message {
        self.message.get_or_init(|| self.view.to_message())
    }

    /// The message id (`$.mid`), without decoding the rest.
    pub fn message_id(&self) -> Option<&str> {
        self.view.message_id()
    }

    /// The body (shares the received record's memory), without decoding the rest.
    pub fn body(&self) -> Bytes {
        self.view.body()
    }

    /// The first system property with this name (`iothub-enqueuedtime`, …), read in place.
    pub fn system_property(&self, name: &str) -> Option<&str> {
        self.view.system_property(name)
    }

    /// The sending device (`iothub-connection-device-id`).
    pub fn device_id(&self) -> &str {
        self.view.system_property("iothub-connection-device-id").unwrap_or("")
    }

    /// When the hub stored it (ms since the Unix epoch).
    pub fn enqueued_time_ms(&self) -> u64 {
        self.view.system_property("iothub-enqueuedtime").and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    /// Acknowledges the event: the group's checkpoint moves past it once every earlier event of
    /// the partition is acknowledged too. Acking after the connection dropped does nothing (the
    /// event is redelivered).
    pub fn ack(&self) {
        let _ = self.cmd.send(Cmd::Ack { generation: self.generation, pkid: self.pkid });
    }
}

/// A consumer group reader. Events arrive in partition order.
pub struct EventStream {
    rx: mpsc::Receiver<Result<Event>>,
    /// Free payload bytes of the buffer (given back as events are taken).
    bytes: Arc<tokio::sync::Semaphore>,
    cmd: mpsc::UnboundedSender<Cmd>,
    status: watch::Receiver<ConnectionStatus>,
}

impl EventStream {
    async fn open(opts: ServiceOptions, req: ConsumeRequest) -> Result<EventStream> {
        auth::sign(&opts.key, b"probe")?;
        let (sink, rx) = EventSink::new(opts.event_buffer, opts.event_buffer_bytes);
        let bytes = sink.bytes.clone();
        let (cmd, status) = Driver::spawn(opts, Some((req, sink)), None)?;
        Ok(EventStream { rx, bytes, cmd, status })
    }

    /// Gives an event's bytes back to the buffer as the application takes it.
    fn taken(&self, r: Option<Result<Event>>) -> Option<Result<Event>> {
        if let Some(Ok(e)) = &r {
            self.bytes.add_permits(e.cost as usize);
        }
        r
    }

    /// Events received and not yet taken by [`EventStream::next`] (bounded by
    /// [`ServiceOptions::event_buffer`]). For tests.
    #[doc(hidden)]
    pub fn buffered(&self) -> usize {
        self.rx.len()
    }

    /// The next event; `None` once closed. An `Err` is permanent (e.g. unauthorized).
    pub async fn next(&mut self) -> Option<Result<Event>> {
        let r = self.rx.recv().await;
        self.taken(r)
    }

    /// The next event within `timeout` (`Ok(None)` on timeout).
    pub async fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Event>> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Err(_) => Ok(None),
            Ok(r) => match self.taken(r) {
                None => Err(Error::closed("event stream")),
                Some(r) => r.map(Some),
            },
        }
    }

    /// Asks the hub to persist the group's checkpoints now and waits until they are durable.
    pub async fn checkpoint(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let body = b"{}".to_vec();
        let deadline = Instant::now() + Duration::from_secs(30);
        self.cmd.send(Cmd::Request { op: "checkpoint".into(), body, deadline, tx }).map_err(|_| Error::closed("event stream"))?;
        rx.await.map_err(|_| Error::closed("event stream"))?.map(|_| ())
    }

    /// The connection status.
    pub fn status(&self) -> ConnectionStatus {
        self.status.borrow().clone()
    }

    /// A watch to await status changes on.
    pub fn status_watch(&self) -> watch::Receiver<ConnectionStatus> {
        self.status.clone()
    }

    /// Leaves the group (its partitions move to the other members) and stops.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Close(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

struct Pending {
    op: String,
    body: Vec<u8>,
    deadline: Instant,
    tx: oneshot::Sender<Result<serde_json::Value>>,
}

type Consume = (ConsumeRequest, EventSink);

/// The driver's end of an [`EventStream`]'s bounded buffer.
struct EventSink {
    tx: mpsc::Sender<Result<Event>>,
    /// Free payload bytes (an event takes its size, at most the whole bound, so any event fits
    /// an empty buffer).
    bytes: Arc<tokio::sync::Semaphore>,
    max_cost: u32,
    /// The event that found the buffer full: nothing more is read from the hub until it is in.
    held: Option<Event>,
}

impl EventSink {
    /// A buffer of `events` events and `bytes` payload bytes, and its receiving end.
    fn new(events: usize, bytes: usize) -> (EventSink, mpsc::Receiver<Result<Event>>) {
        let (tx, rx) = mpsc::channel(events.max(1));
        let max_cost = bytes.clamp(1, u32::MAX as usize) as u32;
        (EventSink { tx, bytes: Arc::new(tokio::sync::Semaphore::new(max_cost as usize)), max_cost, held: None }, rx)
    }

    /// Buffers the held event if there is room now; true when nothing is held any more.
    fn try_flush(&mut self) -> bool {
        let Some(ev) = self.held.take() else { return true };
        let Ok(slot) = self.tx.try_reserve() else {
            if self.tx.is_closed() {
                return true; // the stream is gone: nobody will take events any more
            }
            self.held = Some(ev);
            return false;
        };
        match self.bytes.try_acquire_many(ev.cost) {
            Ok(b) => {
                b.forget();
                slot.send(Ok(ev));
                true
            }
            Err(_) => {
                self.held = Some(ev);
                false
            }
        }
    }

    /// Buffers `ev`, or holds it when the buffer is full.
    fn push(&mut self, mut ev: Event, size: usize) {
        ev.cost = size.clamp(1, self.max_cost as usize) as u32;
        debug_assert!(self.held.is_none(), "nothing is read while an event is held");
        self.held = Some(ev);
        self.try_flush();
    }

    /// Waits until the held event could be buffered (then buffers it).
    async fn room(&mut self) {
        let Some(cost) = self.held.as_ref().map(|e| e.cost) else { return };
        let (Ok(slot), Ok(bytes)) = (self.tx.clone().reserve_owned().await, self.bytes.clone().acquire_many_owned(cost).await) else {
            // The stream is gone: nobody will take events any more.
            self.held = None;
            return;
        };
        bytes.forget();
        if let Some(ev) = self.held.take() {
            slot.send(Ok(ev));
        }
    }

    /// Ends the stream with a permanent error, after every event it holds (waiting for room in
    /// the background rather than dropping any).
    fn fail(mut self, err: Error) {
        let held = self.held.take();
        tokio::spawn(async move {
            if let Some(ev) = held {
                if self.tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            let _ = self.tx.send(Err(err)).await;
        });
    }
}

struct Driver {
    opts: ServiceOptions,
    endpoint: Endpoint,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
    cmd: mpsc::UnboundedReceiver<Cmd>,
    status: watch::Sender<ConnectionStatus>,
    pending: HashMap<u64, Pending>,
    next_rid: u64,
    consume: Option<Consume>,
    generation: u64,
    /// C2D sends (outbox + answer routing), on a client's main connection.
    c2d: Option<(Outbox, Arc<Mutex<C2dShared>>)>,
    /// In-flight C2D sends: request id → outbox seq.
    c2d_in_flight: HashMap<u64, u64>,
    /// Feedback wanted, and where batches go.
    feedback: Option<mpsc::UnboundedSender<FeedbackBatch>>,
    /// Watch requests in flight on this connection: request id → (ids, first watch).
    watches: HashMap<u64, (Vec<String>, bool)>,
    next_watch_rid: u64,
    /// Where to report the end of a `close()`.
    closer: Option<oneshot::Sender<()>>,
}

/// Request id the driver uses for its own `consume` request.
const CONSUME_RID: u64 = 0;
/// Request id of the driver's own `feedback.subscribe`.
const FEEDBACK_RID: u64 = 1 << 62;
/// C2D sends use request ids from here on (base + outbox seq).
const C2D_RID_BASE: u64 = 1 << 63;
/// `outcomes.watch` / `outcomes.unwatch` requests use ids from here up to [`FEEDBACK_RID`].
const WATCH_RID_BASE: u64 = 1 << 61;
/// Ids per `outcomes.watch` request (keeps each request far below the packet limit).
const WATCH_CHUNK: usize = 1000;

impl transport::Link for Driver {
    type Conn = transport::ClientHalves;

    async fn connect(&mut self) -> Result<Self::Conn> {
        self.connect_once().await
    }

    async fn serve(&mut self, conn: Self::Conn) -> End {
        self.serve_conn(conn).await
    }

    async fn idle(&mut self, failed: Option<&Error>) -> Idle {
        self.flush_held();
        // Wake up now and then to time out requests and prune abandoned waiters.
        match tokio::time::timeout(Duration::from_millis(500), self.cmd.recv()).await {
            Ok(cmd) => self.idle_command(cmd, failed),
            Err(_) => {
                self.expire_requests();
                Idle::Continue
            }
        }
    }

    fn connected(&mut self) {
        self.generation += 1;
    }

    fn failed(&mut self, err: &Error, retrying: bool) {
        self.expire_requests();
        if !retrying {
            self.fail_all(err);
        }
    }
}

impl Driver {
    fn spawn(
        opts: ServiceOptions,
        consume: Option<Consume>,
        c2d: Option<(Outbox, Arc<Mutex<C2dShared>>)>,
    ) -> Result<(mpsc::UnboundedSender<Cmd>, watch::Receiver<ConnectionStatus>)> {
        let endpoint = opts.endpoint()?;
        let (cmd_tx, cmd) = mpsc::unbounded_channel();
        let (status, status_rx) = watch::channel(ConnectionStatus::Connecting);
        let d = Driver {
            opts,
            endpoint,
            cmd_tx: cmd_tx.clone(),
            cmd,
            status,
            pending: HashMap::new(),
            next_rid: 1,
            consume,
            generation: 0,
            c2d,
            c2d_in_flight: HashMap::new(),
            feedback: None,
            watches: HashMap::new(),
            next_watch_rid: WATCH_RID_BASE,
            closer: None,
        };
        tokio::spawn(d.run());
        Ok((cmd_tx, status_rx))
    }

    async fn run(mut self) {
        let policy = self.opts.retry.clone();
        let status = self.status.clone();
        transport::run_link(&mut self, &policy, &status).await;
        self.fail_all(&Error::closed("service client"));
        self.status.send_replace(ConnectionStatus::Closed);
        if let Some(tx) = self.closer.take() {
            let _ = tx.send(());
        }
    }

    /// A command while not connected: requests wait for the next connection (or fail with the
    /// permanent error once the driver gave up).
    fn idle_command(&mut self, cmd: Option<Cmd>, failed: Option<&Error>) -> Idle {
        match cmd {
            Some(Cmd::Request { op, body, deadline, tx }) => match failed {
                Some(e) => {
                    let _ = tx.send(Err(e.clone()));
                }
                None => {
                    self.queue_request(op, body, deadline, tx);
                }
            },
            Some(Cmd::Ack { .. } | Cmd::Watch) => {}
            Some(Cmd::Feedback { tx }) => self.feedback = Some(tx),
            Some(Cmd::Close(tx)) => {
                self.closer = Some(tx);
                return Idle::Close;
            }
            None => return Idle::Close,
        }
        Idle::Continue
    }

    /// Queues the watches this connection owes the hub: on a new connection (`all`) every id
    /// still awaited — re-sent ones with the `since` of their first answer — and otherwise the
    /// ids added since, plus the unwatches of abandoned waits.
    fn queue_watches(&mut self, all: bool, publish: &mut impl FnMut(String, Vec<u8>) -> Result<()>) -> Result<()> {
        let Some((_, shared)) = &self.c2d else { return Ok(()) };
        let mut requests: Vec<(proto::WatchOutcomes, bool)> = Vec::new();
        let unwatch = {
            let mut g = shared.lock();
            let new = std::mem::take(&mut g.watch_new);
            let fresh: std::collections::HashSet<&String> = new.iter().collect();
            if all {
                let mut by_since: std::collections::BTreeMap<u64, Vec<String>> = std::collections::BTreeMap::new();
                for id in g.outcomes.keys().filter(|id| !fresh.contains(id)) {
                    by_since.entry(g.watch_since.get(id).copied().unwrap_or(0)).or_default().push(id.clone());
                }
                requests.extend(by_since.into_iter().map(|(since, ids)| (proto::WatchOutcomes { ids, since: Some(since) }, false)));
            }
            let new: Vec<String> = new.into_iter().filter(|id| g.outcomes.contains_key(id)).collect();
            if !new.is_empty() {
                requests.push((proto::WatchOutcomes { ids: new, since: None }, true));
            }
            std::mem::take(&mut g.unwatch)
        };
        for (req, first) in requests {
            for chunk in req.ids.chunks(WATCH_CHUNK) {
                let body = proto::WatchOutcomes { ids: chunk.to_vec(), since: req.since };
                let rid = self.next_watch_rid();
                self.watches.insert(rid, (body.ids.clone(), first));
                publish(proto::request_topic("outcomes.watch", rid), serde_json::to_vec(&body).expect("watch serializes"))?;
            }
        }
        // After a reconnect the hub holds none of this connection's watches: nothing to undo.
        if !all {
            for chunk in unwatch.chunks(WATCH_CHUNK) {
                let rid = self.next_watch_rid();
                let body = proto::UnwatchOutcomes { ids: chunk.to_vec() };
                publish(proto::request_topic("outcomes.unwatch", rid), serde_json::to_vec(&body).expect("unwatch serializes"))?;
            }
        }
        Ok(())
    }

    fn next_watch_rid(&mut self) -> u64 {
        let rid = self.next_watch_rid;
        self.next_watch_rid = if rid + 1 >= FEEDBACK_RID { WATCH_RID_BASE } else { rid + 1 };
        rid
    }

    /// The hub answered a watch request.
    fn watch_answered(&mut self, rid: u64, resp: proto::Response) {
        let Some((ids, first)) = self.watches.remove(&rid) else { return }; // an unwatch
        let Some((_, shared)) = &self.c2d else { return };
        let mut g = shared.lock();
        match resp.into_result().and_then(|v| {
            serde_json::from_value::<proto::Watching>(v).map_err(|e| Error::protocol(format!("bad outcomes.watch answer: {e}")))
        }) {
            Ok(w) => {
                if first {
                    let g = &mut *g;
                    for id in ids {
                        if g.outcomes.contains_key(&id) {
                            g.watch_since.insert(id, w.at);
                        }
                    }
                }
            }
            Err(e) => {
                // Only a hub with other limits or rights than this client's refuses: the waits
                // cannot be served, so they end (their receivers see the client as closed).
                tracing::error!(error = %e, ids = ids.len(), "the hub refused to watch outcomes; those waits end");
                for id in &ids {
                    g.outcomes.remove(id);
                    g.watch_since.remove(id);
                }
            }
        }
    }

    fn fail_all(&mut self, err: &Error) {
        for (_, p) in self.pending.drain() {
            let _ = p.tx.send(Err(err.clone()));
        }
        if let Some((_, shared)) = &self.c2d {
            for (_, w) in shared.lock().waiting.drain() {
                let _ = w.send(Err(err.clone()));
            }
        }
        if let Some((_, sink)) = self.consume.take() {
            if err.kind() != ErrorKind::Closed {
                sink.fail(err.clone());
            }
        }
    }

    /// Fails requests past their deadline, forgets requests and waiters whose caller went away
    /// (a timed-out or cancelled future), and answers that nobody will collect, so none of the
    /// maps grows with abandoned entries.
    fn expire_requests(&mut self) {
        let now = Instant::now();
        let expired: Vec<u64> = self.pending.iter().filter(|(_, p)| p.deadline <= now || p.tx.is_closed()).map(|(k, _)| *k).collect();
        for rid in expired {
            if let Some(p) = self.pending.remove(&rid) {
                let _ = p.tx.send(Err(Error::new(ErrorKind::Timeout, format!("request '{}' got no answer in time", p.op))));
            }
        }
        if let Some((_, shared)) = &self.c2d {
            let mut g = shared.lock();
            g.waiting.retain(|_, w| !w.is_closed());
            let mut gone = Vec::new();
            g.outcomes.retain(|id, ws| {
                ws.retain(|w| !w.is_closed());
                if ws.is_empty() {
                    gone.push(id.clone());
                }
                !ws.is_empty()
            });
            for id in &gone {
                g.watch_since.remove(id);
            }
            g.unwatch.extend(gone);
            let keep_early = self.opts.request_timeout;
            g.early.retain(|_, (at, _)| at.elapsed() < keep_early);
        }
    }

    /// Whether an event waits for room in the [`EventStream`]'s buffer (nothing is read from
    /// the hub meanwhile).
    fn holding(&self) -> bool {
        self.consume.as_ref().is_some_and(|(_, sink)| sink.held.is_some())
    }

    /// Buffers the held event if the application made room.
    fn flush_held(&mut self) {
        if let Some((_, sink)) = &mut self.consume {
            sink.try_flush();
        }
    }

    /// Whether anything waits that [`Driver::expire_requests`] may have to clean up.
    fn has_waiters(&self) -> bool {
        !self.pending.is_empty()
            || self.c2d.as_ref().is_some_and(|(_, s)| {
                let g = s.lock();
                !g.waiting.is_empty() || !g.outcomes.is_empty() || !g.early.is_empty()
            })
    }

    fn queue_request(&mut self, op: String, body: Vec<u8>, deadline: Instant, tx: oneshot::Sender<Result<serde_json::Value>>) -> u64 {
        let rid = self.next_rid;
        self.next_rid += 1;
        self.pending.insert(rid, Pending { op, body, deadline, tx });
        rid
    }

    async fn connect_once(&self) -> Result<transport::ClientHalves> {
        let expiry = now_ms() / 1000 + self.opts.token_ttl.as_secs().max(60);
        let token = auth::generate_sas_token(&self.opts.host_name, &self.opts.key, expiry, Some(&self.opts.policy))?;
        let params = ConnectParams {
            client_id: format!("{}/{}", proto::SERVICE_MARKER, uuid::Uuid::new_v4()),
            username: format!("{}/{}/?api-version={}", self.opts.host_name, proto::SERVICE_MARKER, crate::wire::API_VERSION),
            password: token,
            keep_alive_secs: self.opts.keep_alive.as_secs().clamp(1, 1177) as u16,
            clean_session: true,
        };
        let (halves, _) = transport::client_connect(&self.endpoint, &params, self.opts.connect_timeout).await?;
        Ok(halves)
    }

    async fn serve_conn(&mut self, (mut reader, mut writer): transport::ClientHalves) -> End {
        let keep_alive = self.opts.keep_alive.max(Duration::from_secs(1));
        let renew_at = Instant::now() + self.opts.token_ttl.mul_f64(0.8);
        let mut next_pkid: u16 = 1;
        let mut publish = |topic: String, body: Vec<u8>, writer: &mut transport::PacketWriter<_>| -> Result<()> {
            let mut p = Publish::new(topic, QoS::AtLeastOnce, body);
            p.pkid = next_pkid;
            next_pkid = if next_pkid == u16::MAX { 1 } else { next_pkid + 1 };
            writer.queue(&Packet::Publish(p))
        };
        let mut sub = Subscribe::new(format!("{}#", proto::RES_PREFIX), QoS::AtMostOnce);
        sub.pkid = u16::MAX;
        if let Err(e) = writer.queue(&Packet::Subscribe(sub)) {
            return End::Failed(e);
        }
        if let Some((req, _)) = &self.consume {
            let body = serde_json::to_vec(req).expect("consume serializes");
            if let Err(e) = publish(proto::request_topic("consume", CONSUME_RID), body, &mut writer) {
                return End::Failed(e);
            }
        }
        for (rid, p) in &self.pending {
            if let Err(e) = publish(proto::request_topic(&p.op, *rid), p.body.clone(), &mut writer) {
                return End::Failed(e);
            }
        }
        let mut feedback_subscribed = false;
        self.watches.clear();
        let mut publish_watch = |topic: String, body: Vec<u8>| publish(topic, body, &mut writer);
        if let Err(e) = self.queue_watches(true, &mut publish_watch) {
            return End::Failed(e);
        }
        self.flush_held();
        self.c2d_in_flight.clear();
        if let Some((outbox, _)) = &self.c2d {
            outbox.rewind();
        }
        let mut last_tx = Instant::now();
        let mut last_rx = Instant::now();
        loop {
            if self.feedback.is_some() && !feedback_subscribed {
                feedback_subscribed = true;
                if let Err(e) = publish(proto::request_topic("feedback.subscribe", FEEDBACK_RID), b"{}".to_vec(), &mut writer) {
                    return End::Failed(e);
                }
            }
            let room = self.opts.max_in_flight.saturating_sub(self.c2d_in_flight.len());
            let sendable = match &self.c2d {
                Some((outbox, _)) if room > 0 => outbox.take_sendable(room),
                _ => Vec::new(),
            };
            // Watches before the sends just taken: a wait is registered before its message is
            // pushed to the outbox, so every send in `sendable` goes out after its id's watch.
            if self.c2d.as_ref().is_some_and(|(_, s)| {
                let g = s.lock();
                !g.watch_new.is_empty() || !g.unwatch.is_empty()
            }) {
                let mut publish_watch = |topic: String, body: Vec<u8>| publish(topic, body, &mut writer);
                if let Err(e) = self.queue_watches(false, &mut publish_watch) {
                    return End::Failed(e);
                }
            }
            if let Some((outbox, _)) = &self.c2d {
                for crate::outbox::Sendable { seq, record, .. } in sendable {
                    let body = match Message::decode(&record) {
                        Ok(m) => m.body.to_vec(),
                        Err(e) => {
                            tracing::error!(seq, error = %e, "dropping an unreadable C2D outbox record");
                            outbox.rejected(seq);
                            continue;
                        }
                    };
                    let rid = C2D_RID_BASE + seq;
                    self.c2d_in_flight.insert(rid, seq);
                    if let Err(e) = publish(proto::request_topic("c2d.send", rid), body, &mut writer) {
                        return End::Failed(e);
                    }
                }
            }
            if writer.pending() > 0 {
                if let Err(e) = writer.flush_within(self.opts.connect_timeout).await {
                    return End::Failed(e);
                }
                last_tx = Instant::now();
            }
            let holding = self.holding();
            if holding {
                // Not reading (the event buffer is full), so the hub cannot be heard: its
                // keep-alive clock starts over.
                last_rx = Instant::now();
            }
            tokio::select! {
                biased;
                pkt = reader.next(), if !holding => {
                    last_rx = Instant::now();
                    // Handle everything one read brought before writing again.
                    let mut pkt = pkt;
                    let mut drain = transport::Drain::new();
                    loop {
                        match pkt {
                            Ok(Some(Packet::Publish(p))) => {
                                if let Err(e) = self.incoming(p) {
                                    return End::Failed(e);
                                }
                            }
                            Ok(Some(Packet::PubAck(_) | Packet::SubAck(_) | Packet::PingResp)) => {}
                            Ok(Some(other)) => return End::Failed(Error::protocol(format!("unexpected packet from hub: {other:?}"))),
                            Ok(None) => return End::Failed(Error::new(ErrorKind::Disconnected, "the hub closed the connection")),
                            Err(e) => return End::Failed(e),
                        }
                        if self.holding() {
                            break; // the rest stays in the reader until the buffer has room
                        }
                        pkt = match drain.next(&mut reader) {
                            Ok(None) => break,
                            next => next,
                        };
                    }
                }
                cmd = self.cmd.recv() => {
                    // Take every queued command (e.g. a burst of event acks) before flushing.
                    let mut cmd = cmd;
                    let mut budget = transport::DRAIN_BATCH;
                    loop {
                        match cmd {
                            Some(Cmd::Request { op, body, deadline, tx }) => {
                                let topic_op = op.clone();
                                let b = body.clone();
                                let rid = self.queue_request(op, body, deadline, tx);
                                if let Err(e) = publish(proto::request_topic(&topic_op, rid), b, &mut writer) {
                                    return End::Failed(e);
                                }
                            }
                            Some(Cmd::Ack { generation, pkid }) => {
                                if generation == self.generation {
                                    if let Err(e) = writer.queue(&Packet::PubAck(PubAck::new(pkid))) {
                                        return End::Failed(e);
                                    }
                                }
                            }
                            Some(Cmd::Feedback { tx }) => self.feedback = Some(tx),
                            Some(Cmd::Watch) => {} // sent at the top of the loop
                            Some(Cmd::Close(tx)) => {
                                writer.queue(&Packet::Disconnect).ok();
                                writer.shutdown().await;
                                self.closer = Some(tx);
                                return End::Closed;
                            }
                            None => {
                                writer.queue(&Packet::Disconnect).ok();
                                writer.shutdown().await;
                                return End::Closed;
                            }
                        }
                        budget -= 1;
                        if budget == 0 {
                            break;
                        }
                        cmd = match self.cmd.try_recv() {
                            Ok(c) => Some(c),
                            Err(_) => break,
                        };
                    }
                },
                _ = tokio::time::sleep_until(last_tx + keep_alive) => {
                    if let Err(e) = writer.queue(&Packet::PingReq) {
                        return End::Failed(e);
                    }
                }
                _ = tokio::time::sleep_until(last_rx + keep_alive.mul_f64(1.5)) => {
                    return End::Failed(Error::new(ErrorKind::Timeout, "no traffic from the hub within keep-alive"));
                }
                _ = tokio::time::sleep(Duration::from_millis(500)), if self.has_waiters() => self.expire_requests(),
                _ = outbox_changed(&self.c2d), if self.c2d_in_flight.len() < self.opts.max_in_flight => {}
                _ = sink_room(&mut self.consume), if holding => {}
                _ = tokio::time::sleep_until(renew_at) => {
                    // Token renewal over MQTT 3.1.1 = reconnect (not a failure: no backoff);
                    // unacked events are redelivered.
                    writer.queue(&Packet::Disconnect).ok();
                    writer.shutdown().await;
                    return End::Renew;
                }
            }
        }
    }

    fn incoming(&mut self, p: Publish) -> Result<()> {
        if let Some(rid) = p.topic.strip_prefix(proto::RES_PREFIX) {
            let rid: u64 = rid.parse().map_err(|_| Error::protocol(format!("bad response topic '{}'", p.topic)))?;
            let resp: proto::Response =
                serde_json::from_slice(&p.payload).map_err(|e| Error::protocol(format!("bad response body: {e}")))?;
            if rid >= C2D_RID_BASE {
                let Some(seq) = self.c2d_in_flight.remove(&rid) else { return Ok(()) };
                let Some((outbox, shared)) = &self.c2d else { return Ok(()) };
                let result = resp.into_result().and_then(|v| {
                    serde_json::from_value::<C2dReceipt>(v).map_err(|e| Error::protocol(format!("bad c2d.send answer: {e}")))
                });
                match &result {
                    Ok(_) => outbox.acked(seq),
                    Err(_) => outbox.rejected(seq),
                }
                let mut g = shared.lock();
                match g.waiting.remove(&seq) {
                    Some(w) => {
                        let _ = w.send(result);
                    }
                    None => {
                        g.early.insert(seq, (std::time::Instant::now(), result));
                    }
                }
                return Ok(());
            }
            if (WATCH_RID_BASE..FEEDBACK_RID).contains(&rid) {
                self.watch_answered(rid, resp);
                return Ok(());
            }
            if rid == FEEDBACK_RID {
                if let Err(e) = resp.into_result() {
                    return Err(Error::new(e.kind(), format!("feedback subscription refused: {}", e.message())));
                }
                return Ok(());
            }
            if rid == CONSUME_RID {
                if let Err(e) = resp.into_result() {
                    // The consumer cannot start: report it and stop retrying.
                    return Err(Error::new(e.kind(), format!("consume refused: {}", e.message())));
                }
                // Later reconnects and takeovers resume at the checkpoint.
                if let Some((req, _)) = &mut self.consume {
                    req.from = StartPosition::Checkpoint;
                }
            } else if let Some(pending) = self.pending.remove(&rid) {
                let _ = pending.tx.send(resp.into_result());
            }
            return Ok(());
        }
        if let Some((_, partition, seq)) = proto::parse_event_topic(&p.topic) {
            let Some((_, sink)) = &mut self.consume else { return Ok(()) };
            let view = crate::message::RecordView::parse(Bytes::clone(&p.payload))?;
            let ev = Event {
                partition,
                sequence_number: seq,
                view,
                message: std::sync::OnceLock::new(),
                generation: self.generation,
                pkid: p.pkid,
                cmd: self.cmd_tx.clone(),
                cost: 0,
            };
            sink.push(ev, p.payload.len());
            return Ok(());
        }
        if let Some(id) = p.topic.strip_prefix(proto::FEEDBACK_PREFIX) {
            let id: u64 = id.parse().map_err(|_| Error::protocol(format!("bad feedback topic '{}'", p.topic)))?;
            let records = self.resolve_records(&p.payload, "feedback batch")?;
            let batch = FeedbackBatch { id, records, generation: self.generation, pkid: p.pkid, cmd: self.cmd_tx.clone() };
            if let Some(tx) = &self.feedback {
                // A stream dropped meanwhile: unacknowledged, so the hub delivers it again.
                let _ = tx.send(batch);
            }
            return Ok(());
        }
        if p.topic == proto::OUTCOMES_TOPIC {
            self.resolve_records(&p.payload, "outcome notification")?;
            return Ok(());
        }
        Err(Error::protocol(format!("unexpected publish on '{}'", p.topic)))
    }

    /// Parses a JSON array of feedback records (a batch or a notification) and resolves the
    /// waits for their message ids: whichever of the two copies of a record comes first.
    fn resolve_records(&self, payload: &[u8], what: &str) -> Result<Vec<FeedbackRecord>> {
        let records: Vec<FeedbackRecord> = serde_json::from_slice(payload).map_err(|e| Error::protocol(format!("bad {what}: {e}")))?;
        if let Some((_, shared)) = &self.c2d {
            let mut g = shared.lock();
            for r in &records {
                g.resolve(r);
            }
        }
        Ok(records)
    }
}

async fn sink_room(consume: &mut Option<Consume>) {
    match consume {
        Some((_, sink)) => sink.room().await,
        None => std::future::pending().await,
    }
}

async fn outbox_changed(c2d: &Option<(Outbox, Arc<Mutex<C2dShared>>)>) {
    match c2d {
        Some((outbox, _)) => outbox.changed().await,
        None => std::future::pending().await,
    }
}
