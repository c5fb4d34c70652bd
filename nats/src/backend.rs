//! The storage backend interface of the hub: every operation the hub needs from durable state,
//! with the semantics each must keep (derived from the embedded stores in `core/src/hub`;
//! written out in `docs/scale-out.md`).
//!
//! The traits are object safe (`Arc<dyn Backend>`): async operations return a boxed future
//! ([`BoxFut`]) so a hub can hold either backend without becoming generic. Every operation that
//! answers a client (PUBACK, CONNACK, a service response) resolves only once its effect is durable
//! in the backend (fsync'd for the embedded store, R3 quorum for JetStream).
//!
//! Invariants every implementation keeps:
//! - D2C: appends issued one after another by one caller land in the partition in that order and
//!   their tickets resolve in that order; an append with a de-dup id already seen within the
//!   backend's window resolves to the first copy's sequence number with `duplicate = true`;
//! - consumer groups: a partition is read by at most one member of a group at a time; a group's
//!   checkpoint is the contiguous acknowledged prefix and only moves forward, so a crash or a
//!   takeover redelivers and never skips;
//! - C2D: a queue never holds more than `max_queue` messages; every message reaches exactly one
//!   terminal outcome (Success, Rejected, Expired, DeliveryCountExceeded, Purged), which yields
//!   exactly one feedback record when its `ack` mode asks for it; only an explicit abandon raises
//!   the delivery count; locks are volatile (a closed device session or a lock expiry makes the
//!   message deliverable again without a count bump);
//! - sessions: the newest claim of a device wins, on any node; older claims are told to end.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, watch, Notify};

use hubmsg_core::hub::c2d::{AckMode, C2dLimits, FeedbackRecord, Settle};
use hubmsg_core::hub::Policy;
use hubmsg_core::proto::{CreateDevice, DeviceIdentity, DeviceStatus, StartPosition};
use hubmsg_core::{Message, Result};

/// A boxed, sendable future yielding a hubmsg [`Result`].
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// The whole backend: one accessor per concern. A hub node holds one `Arc<dyn Backend>`.
pub trait Backend: Send + Sync + 'static {
    /// The D2C event log.
    fn events(&self) -> &dyn EventLog;
    /// Consumer groups (membership, partition assignment, checkpoints).
    fn groups(&self) -> &dyn ConsumerGroups;
    /// C2D queues.
    fn c2d(&self) -> &dyn C2dQueues;
    /// Feedback batches and per-message outcomes.
    fn feedback(&self) -> &dyn Feedback;
    /// The identity registry and policies.
    fn registry(&self) -> &dyn RegistryStore;
    /// Device sessions (one live connection per device across all hub nodes).
    fn sessions(&self) -> &dyn Sessions;
    /// Named counters (observability; never decide anything).
    fn counters(&self) -> &dyn Counters;
    /// Stops background work and releases what this node holds (leases, session claims).
    fn close(&self) -> BoxFut<'_, ()>;
}

// ---------------------------------------------------------------------------------------------
// D2C

/// What a durable append resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The event's sequence number in its partition (the first copy's for a duplicate).
    pub seq: u64,
    /// Whether the de-dup id had been seen within the window (nothing new was stored).
    pub duplicate: bool,
}

/// A submitted append: resolves once the event is durable (the hub PUBACKs then).
pub type AppendTicket = BoxFut<'static, Appended>;

/// One stored D2C event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Sequence number in the partition (increasing, never reused).
    pub seq: u64,
    /// When the backend stored it (ms since the Unix epoch).
    pub stored_ms: u64,
    /// The message record ([`Message::encode`]) with the hub's stamps.
    pub record: Bytes,
}

/// First and last retained sequence numbers of a partition (`first > last` when empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Oldest retained sequence number.
    pub first: u64,
    /// Newest sequence number (0 when nothing was ever appended).
    pub last: u64,
}

/// The partitioned D2C event log.
pub trait EventLog: Send + Sync {
    /// Number of partitions (fixed when the backend's state was created).
    fn partitions(&self) -> u32;
    /// Submits `record` of `device_id` to `partition`. The outer future resolves once the append
    /// is submitted (so the caller can submit the next one: order is submission order); the
    /// ticket resolves once durable. With a `message_id`, a copy of the same device's message
    /// already stored within the backend's de-dup window is dropped (`duplicate`).
    fn append<'a>(&'a self, partition: u32, device_id: &'a str, message_id: Option<&'a str>, record: Bytes) -> BoxFut<'a, AppendTicket>;
    /// Up to `max` events of `partition` with sequence numbers `>= from`, in order.
    fn read(&self, partition: u32, from: u64, max: usize) -> BoxFut<'_, Vec<StoredEvent>>;
    /// The retained range of `partition`.
    fn bounds(&self, partition: u32) -> BoxFut<'_, Bounds>;
}

// ---------------------------------------------------------------------------------------------
// Consumer groups

/// The consumer-group side of D2C.
pub trait ConsumerGroups: Send + Sync {
    /// Makes `member` (unique across hub nodes, e.g. `{node}/{connection}`) a member of `group`.
    /// Partitions are spread over the live members in join order (partition p → member p mod n);
    /// a member that leaves or dies (stops renewing) loses its partitions to the others.
    fn join<'a>(&'a self, group: &'a str, member: &'a str) -> BoxFut<'a, Box<dyn Membership>>;
}

/// One member's place in a group.
pub trait Membership: Send + Sync {
    /// The partitions this member owns now (changes on rebalance). A partition appears only once
    /// its previous owner released it or its lease expired.
    fn assignment(&self) -> watch::Receiver<Vec<u32>>;
    /// Opens a reader of an owned partition. `from` other than `Checkpoint` moves the group's
    /// checkpoint to that position (as the embedded hub does); `Checkpoint` resumes after the
    /// contiguous acknowledged prefix (the partition's beginning for a new group) and redelivers
    /// whatever was delivered but not acknowledged.
    fn open(&self, partition: u32, from: StartPosition, window: usize) -> BoxFut<'_, Box<dyn PartitionReader>>;
    /// Leaves the group: its partitions move to the other members at once.
    fn leave(&self) -> BoxFut<'_, ()>;
}

/// Reads one partition for one member.
pub trait PartitionReader: Send {
    /// The next events (at most `max`, at most `window` unacknowledged in total), waiting up to
    /// `wait` for the first; empty when none arrived.
    fn next(&mut self, max: usize, wait: Duration) -> BoxFut<'_, Vec<StoredEvent>>;
    /// Acknowledges a delivered event; the checkpoint advances over the contiguous prefix.
    fn ack(&mut self, seq: u64) -> BoxFut<'_, ()>;
    /// The group's checkpoint for this partition: the last sequence number of the contiguous
    /// acknowledged prefix (0 = nothing acknowledged), once everything acknowledged so far is
    /// durable (the `checkpoint` service request).
    fn checkpoint(&mut self) -> BoxFut<'_, u64>;
}

// ---------------------------------------------------------------------------------------------
// C2D

/// A C2D message to enqueue (validated by the backend with core's rules: size, TTL range).
#[derive(Debug, Clone)]
pub struct C2dEnqueue {
    /// Target device (registered).
    pub device_id: String,
    /// The device's generation id (feedback carries it).
    pub generation_id: String,
    /// Message id (feedback and outcomes correlate on it).
    pub message_id: String,
    /// Requested feedback.
    pub ack: AckMode,
    /// TTL (default and range from [`C2dLimits`]).
    pub ttl: Option<Duration>,
    /// The message record ([`Message::encode`]).
    pub record: Bytes,
    /// IoT Hub size of the message (checked against `max_size`).
    pub size: usize,
}

/// A message handed to a device session, locked for it.
#[derive(Debug, Clone)]
pub struct C2dDelivery {
    /// Sequence number (the device settles by it).
    pub seq: u64,
    /// The message with `$.to`, `iothub-ack`, sequence number, enqueued time and delivery count.
    pub message: Message,
}

/// The result of a settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The message reached this terminal outcome (feedback written if asked for).
    Done(hubmsg_core::hub::c2d::FeedbackStatus),
    /// Abandoned: back in the queue with this delivery count.
    Requeued(u32),
}

/// C2D queues: depth-limited per-device FIFOs with TTL, locks, and outcomes.
pub trait C2dQueues: Send + Sync {
    /// The limits in force.
    fn limits(&self) -> &C2dLimits;
    /// Accepts a message; returns its sequence number once durable. `QueueFull` (IoT Hub
    /// 403004) when the device already has `max_queue` messages, locked ones included;
    /// `MessageTooLarge` / `InvalidArgument` for size and TTL.
    fn send(&self, msg: C2dEnqueue) -> BoxFut<'_, u64>;
    /// Opens the delivery side for the device's one live session. Opening releases every lock
    /// an earlier session (on any node) held; closing releases this one's.
    fn open_device<'a>(&'a self, device_id: &'a str, window: usize) -> BoxFut<'a, Box<dyn DeviceQueue>>;
    /// Removes every message of the device, `Purged` feedback for each that asks; returns how
    /// many. Messages enqueued while the purge runs are kept.
    fn purge<'a>(&'a self, device_id: &'a str) -> BoxFut<'a, usize>;
    /// Messages queued for the device (locked ones included).
    fn depth<'a>(&'a self, device_id: &'a str) -> BoxFut<'a, usize>;
    /// Periodic work: messages whose TTL passed get `Expired` (one node does it at a time).
    /// Returns how many expired.
    fn sweep(&self) -> BoxFut<'_, usize>;
    /// Records whether the device keeps its C2D subscription across connections (clean
    /// session 0). Durable on return.
    fn set_subscription<'a>(&'a self, device_id: &'a str, on: bool) -> BoxFut<'a, ()>;
    /// Whether the device has a persistent C2D subscription.
    fn subscribed<'a>(&'a self, device_id: &'a str) -> BoxFut<'a, bool>;
}

/// The delivery side of one device's queue for its live session.
pub trait DeviceQueue: Send {
    /// Locks and returns the next deliverable message (FIFO, not locked, TTL not passed),
    /// waiting up to `wait`. Expired heads reach `Expired` instead of being delivered.
    fn next(&mut self, wait: Duration) -> BoxFut<'_, Option<C2dDelivery>>;
    /// Settles a message this session holds locked. `LockLost` if the lock expired or the
    /// message is gone; a reject or abandon after the TTL passed is recorded as `Expired`;
    /// the `max_delivery_count`-th abandon dead-letters it (`DeliveryCountExceeded`).
    fn settle(&mut self, seq: u64, how: Settle) -> BoxFut<'_, Settled>;
    /// Releases locks that expired (the messages become deliverable again, count unchanged);
    /// returns their sequence numbers so the session forgets them.
    fn expire_locks(&mut self) -> BoxFut<'_, Vec<u64>>;
    /// Releases every lock of this session.
    fn close(self: Box<Self>) -> BoxFut<'static, ()>;
}

// ---------------------------------------------------------------------------------------------
// Feedback and outcomes

/// A feedback batch delivered to one service connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackBatch {
    /// Batch id (unique on this hub node; the connection acknowledges by it).
    pub id: u64,
    /// The records (at most `feedback_batch`).
    pub records: Vec<FeedbackRecord>,
}

/// Feedback records, batched to services, and per-message outcomes.
pub trait Feedback: Send + Sync {
    /// The next batch for service connection `conn`: up to `feedback_batch` records, formed once
    /// that many wait or `interval` passed; `None` if none arrived. The batch stays locked for the
    /// C2D lock time, then (or on [`Feedback::release`]) its records are delivered again.
    fn next_batch(&self, conn: u64, interval: Duration) -> BoxFut<'_, Option<FeedbackBatch>>;
    /// Acknowledges a batch: its records are deleted.
    fn ack_batch(&self, id: u64) -> BoxFut<'_, ()>;
    /// Releases the unacknowledged batches of a closed connection.
    fn release(&self, conn: u64) -> BoxFut<'_, ()>;
    /// Waits up to `timeout` for the outcome of message `message_id` (`send_c2d_and_wait`);
    /// `None` on timeout. Outcomes are kept at least an hour.
    fn wait_outcome<'a>(&'a self, message_id: &'a str, timeout: Duration) -> BoxFut<'a, Option<FeedbackRecord>>;
}

// ---------------------------------------------------------------------------------------------
// Registry

/// A registry change seen by this node (cache invalidation; kicking disabled or re-keyed devices).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryChange {
    /// A device was created or updated.
    Put(DeviceIdentity),
    /// A device was deleted.
    Deleted(String),
}

/// Device identities and policies.
pub trait RegistryStore: Send + Sync {
    /// A device by id (authoritative read).
    fn device<'a>(&'a self, id: &'a str) -> BoxFut<'a, Option<DeviceIdentity>>;
    /// All devices, ordered by id.
    fn devices(&self) -> BoxFut<'_, Vec<DeviceIdentity>>;
    /// Creates a device (`AlreadyExists` if the id is taken); durable on return.
    fn create(&self, req: CreateDevice) -> BoxFut<'_, DeviceIdentity>;
    /// Changes status and/or regenerates keys (`primary`, `secondary`, `both`), atomically with
    /// respect to concurrent updates on any node (`NotFound` if absent).
    fn update<'a>(&'a self, id: &'a str, status: Option<DeviceStatus>, regenerate: Option<&'a str>) -> BoxFut<'a, DeviceIdentity>;
    /// Deletes a device (`NotFound` if absent).
    fn delete<'a>(&'a self, id: &'a str) -> BoxFut<'a, ()>;
    /// A policy by name (the five defaults exist from the first start on).
    fn policy<'a>(&'a self, name: &'a str) -> BoxFut<'a, Option<Policy>>;
    /// Changes made on any node, from now on.
    fn watch(&self) -> broadcast::Receiver<RegistryChange>;
}

// ---------------------------------------------------------------------------------------------
// Sessions and counters

/// A device session claim; `superseded` is notified when a newer claim (any node) replaces it.
#[derive(Debug, Clone)]
pub struct SessionClaim {
    /// The device.
    pub device_id: String,
    /// The claim's version (increasing across all claims of all devices).
    pub revision: u64,
    /// Notified once when a newer connection of the device took over (IoT Hub 400027).
    pub superseded: std::sync::Arc<Notify>,
}

/// One live connection per device across every hub node.
pub trait Sessions: Send + Sync {
    /// Claims the device for connection `conn` of this node; every older claim is told to end.
    fn claim<'a>(&'a self, device_id: &'a str, conn: u64) -> BoxFut<'a, SessionClaim>;
    /// Ends a claim (no effect on a newer one).
    fn release(&self, claim: SessionClaim) -> BoxFut<'_, ()>;
}

/// Named monotonic counters shared by every node.
pub trait Counters: Send + Sync {
    /// Adds `n` to counter `name`.
    fn add<'a>(&'a self, name: &'a str, n: u64) -> BoxFut<'a, ()>;
    /// Every counter and its value, ordered by name.
    fn all(&self) -> BoxFut<'_, Vec<(String, u64)>>;
}
