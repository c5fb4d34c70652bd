//! The storage backend interface of the hub: every operation the hub's sessions need from
//! durable state, with the semantics each must keep (`docs/scale-out.md` §1). Two
//! implementations: the embedded stores of this crate ([`super::embedded`], the default) and
//! NATS JetStream (crate `hubmsg-nats`, which the firmware build never compiles).
//!
//! The traits are object safe (`Arc<dyn Backend>`): async operations return a boxed future
//! ([`BoxFut`]) so a hub holds either backend without becoming generic. Every operation that
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
//!
//! Futures the hub polls inside its session loops ([`PartitionReader::poll_next`],
//! [`DeviceQueue::next`]) are cancel-safe: dropping one before it resolves loses nothing.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::v4::Publish;
use tokio::sync::{broadcast, watch, Notify};

use super::c2d::{AckMode, C2dLimits, FeedbackRecord, FeedbackStatus, Settle};
use super::HubConfig;
use crate::proto::{CreateDevice, DeviceIdentity, DeviceStatus, Policy, StartPosition};
use crate::{Message, Result};

/// A boxed, sendable future yielding a hubmsg [`Result`].
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Makes the backend a hub starts with (`HubConfig::backend`; `None` there means the embedded
/// stores in `data_dir`). The NATS JetStream connector lives in crate `hubmsg-nats`.
pub trait BackendConnector: Send + Sync + Debug + 'static {
    /// Opens (connects, creates what is missing, checks the server) the backend for a hub with
    /// `config`. Errors say what is wrong and what to do (e.g. a server that is too old).
    fn connect<'a>(&'a self, config: &'a HubConfig) -> BoxFut<'a, Arc<dyn Backend>>;
}

/// The whole backend: one accessor per concern. A hub node holds one `Arc<dyn Backend>`.
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs and `/metrics` (`embedded`, `nats`).
    fn kind(&self) -> &'static str;
    /// The D2C event log.
    fn events(&self) -> &dyn EventLog;
    /// Consumer groups (membership, partition assignment, checkpoints).
    fn groups(&self) -> &dyn ConsumerGroups;
    /// C2D queues.
    fn c2d(&self) -> &dyn C2dQueues;
    /// Feedback batches.
    fn feedback(&self) -> &dyn Feedback;
    /// The identity registry and policies.
    fn registry(&self) -> &dyn RegistryStore;
    /// Device sessions (one live connection per device across all hub nodes).
    fn sessions(&self) -> &dyn Sessions;
    /// Named counters (observability; never decide anything).
    fn counters(&self) -> &dyn Counters;
    /// Whether the backend can serve now (`/readyz`): `Err` says why not.
    fn ready(&self) -> BoxFut<'_, ()>;
    /// Stops background work, makes everything durable and releases what this node holds
    /// (leases, session claims, open stores).
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
    /// Polls for the next events: at most `max` and about `max_bytes` of records (at least one
    /// when any is ready), at most `window` unacknowledged in total. Cancel-safe.
    fn poll_next(&mut self, cx: &mut Context<'_>, max: usize, max_bytes: usize) -> Poll<Result<Vec<StoredEvent>>>;
    /// Acknowledges a delivered event; the checkpoint advances over the contiguous prefix.
    fn ack(&mut self, seq: u64) -> BoxFut<'_, ()>;
    /// The group's checkpoint for this partition: the last sequence number of the contiguous
    /// acknowledged prefix (0 = nothing acknowledged), once everything acknowledged so far is
    /// durable (the `checkpoint` service request).
    fn checkpoint(&mut self) -> BoxFut<'_, u64>;
    /// Up to `max` events, waiting up to `wait` for the first; empty when none arrived.
    fn next(&mut self, max: usize, wait: Duration) -> BoxFut<'_, Vec<StoredEvent>> {
        Box::pin(async move {
            match tokio::time::timeout(wait, std::future::poll_fn(|cx| self.poll_next(cx, max, usize::MAX))).await {
                Err(_) => Ok(Vec::new()),
                Ok(r) => r,
            }
        })
    }
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
    /// Message id (feedback correlates on it).
    pub message_id: String,
    /// Requested feedback.
    pub ack: AckMode,
    /// TTL (default and range from [`C2dLimits`]).
    pub ttl: Option<Duration>,
    /// The message record ([`Message::encode`]).
    pub record: Bytes,
    /// Size of the delivery packet ([`super::c2d::delivery_size`]), checked against `max_size`.
    pub size: usize,
    /// The service's identity of this send: a repeat answers with the first copy's sequence
    /// number and queues nothing.
    pub send_id: Option<String>,
}

/// A message handed to a device session, locked for it.
#[derive(Debug, Clone)]
pub struct C2dDelivery {
    /// Sequence number (the device settles by it).
    pub seq: u64,
    /// The message with `$.to`, `iothub-ack`, sequence number, enqueued time and delivery count.
    pub message: Message,
    /// The QoS 1 PUBLISH carrying it (packet id still 0).
    pub publish: Publish,
}

/// The result of a settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The message reached this terminal outcome (feedback written if asked for).
    Done(FeedbackStatus),
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
    /// Opens the delivery side for the device's one live session (connection `conn` of this
    /// node). Opening releases every lock an earlier session (on any node) held; closing
    /// releases this one's.
    fn open_device<'a>(&'a self, device_id: &'a str, conn: u64, window: usize) -> BoxFut<'a, Box<dyn DeviceQueue>>;
    /// Removes every message of the device, `Purged` feedback for each that asks; returns how
    /// many. Messages enqueued while the purge runs are kept.
    fn purge<'a>(&'a self, device_id: &'a str) -> BoxFut<'a, usize>;
    /// The device was deleted: its messages are purged (`Purged` feedback) and its persistent
    /// subscription dropped. Idempotent.
    fn delete_device<'a>(&'a self, device_id: &'a str) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.purge(device_id).await?;
            self.set_subscription(device_id, false).await
        })
    }
    /// Messages queued for the device (locked ones included).
    fn depth<'a>(&'a self, device_id: &'a str) -> BoxFut<'a, usize>;
    /// Messages queued for all devices (the `/metrics` gauge).
    fn total_depth(&self) -> BoxFut<'_, u64>;
    /// Periodic work (the hub calls it every `sweep_interval`; a backend may do it less often):
    /// messages whose TTL passed get `Expired` (one node does it at a time in a cluster).
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
    /// waiting up to `wait`. Expired heads reach `Expired` and undeliverable ones (a packet
    /// devices cannot take) `Rejected` instead of being delivered. Cancel-safe.
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
// Feedback

/// A feedback batch delivered to one service connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackBatch {
    /// Batch id (unique on this hub node; the connection acknowledges by it).
    pub id: u64,
    /// The records (at most `feedback_batch`).
    pub records: Vec<FeedbackRecord>,
}

/// Feedback records, batched to services.
pub trait Feedback: Send + Sync {
    /// The next batch for service connection `conn`: up to `feedback_batch` records, formed once
    /// that many wait or `interval` passed; `None` if none arrived within `interval`. The batch
    /// stays locked for the C2D lock time, then (or on [`Feedback::release`]) its records are
    /// delivered again.
    fn next_batch(&self, conn: u64, interval: Duration) -> BoxFut<'_, Option<FeedbackBatch>>;
    /// Acknowledges a batch: its records are deleted.
    fn ack_batch(&self, id: u64) -> BoxFut<'_, ()>;
    /// Releases the unacknowledged batches of a closed connection.
    fn release(&self, conn: u64) -> BoxFut<'_, ()>;
    /// Records waiting to be delivered or acknowledged (the `/metrics` gauge).
    fn pending(&self) -> BoxFut<'_, u64>;
    /// Sets where this node reports every feedback record as its outcome is recorded — recorded
    /// by this node or, for a cluster backend, by any node — besides queueing it for
    /// [`Feedback::next_batch`]. The hub sets it once at start (to its outcome notifications,
    /// [`super::outcomes`]); records before that, and records replayed from storage, are not
    /// reported. The sink is called without any backend lock held and must not block.
    fn on_outcome(&self, sink: OutcomeSink);
}

/// Where a backend reports feedback records as outcomes are recorded ([`Feedback::on_outcome`]).
pub type OutcomeSink = Arc<dyn Fn(FeedbackRecord) + Send + Sync>;

// ---------------------------------------------------------------------------------------------
// Registry

/// A registry change seen by this node: the hub ends the sessions of disabled, re-keyed or
/// deleted devices and of connections whose policy key was replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryChange {
    /// A device was created or updated.
    Put(DeviceIdentity),
    /// A device was deleted.
    Deleted(String),
    /// A policy's keys were regenerated (the policy as it is now).
    Policy(Policy),
}

/// Device identities and policies.
pub trait RegistryStore: Send + Sync {
    /// A device by id (authoritative read).
    fn device<'a>(&'a self, id: &'a str) -> BoxFut<'a, Option<DeviceIdentity>>;
    /// All devices, ordered by id (including this node's own writes).
    fn devices(&self) -> BoxFut<'_, Vec<DeviceIdentity>>;
    /// Creates a device (`AlreadyExists` if the id is taken; ids and 16–64 byte keys checked
    /// with core's rules); durable on return.
    fn create(&self, req: CreateDevice) -> BoxFut<'_, DeviceIdentity>;
    /// Changes status and/or regenerates keys (`primary`, `secondary`, `both`), atomically with
    /// respect to concurrent updates on any node (`NotFound` if absent).
    fn update<'a>(&'a self, id: &'a str, status: Option<DeviceStatus>, regenerate: Option<&'a str>) -> BoxFut<'a, DeviceIdentity>;
    /// Deletes a device (`NotFound` if absent).
    fn delete<'a>(&'a self, id: &'a str) -> BoxFut<'a, ()>;
    /// A policy by name (the five default policies exist from the first start on; authoritative).
    fn policy<'a>(&'a self, name: &'a str) -> BoxFut<'a, Option<Policy>>;
    /// Every policy, ordered by name.
    fn policies(&self) -> BoxFut<'_, Vec<Policy>>;
    /// Regenerates a policy's `primary`, `secondary` or `both` keys; durable on return, and
    /// seen by every node's [`watch`](RegistryStore::watch) as [`RegistryChange::Policy`].
    fn regenerate_policy<'a>(&'a self, name: &'a str, which: &'a str) -> BoxFut<'a, Policy>;
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
    /// The claim's version (increasing across all claims of a device).
    pub revision: u64,
    /// Notified once when a newer connection of the device took over (IoT Hub 400027).
    pub superseded: Arc<Notify>,
}

/// One live connection per device across every hub node.
pub trait Sessions: Send + Sync {
    /// Claims the device for connection `conn` of this node; every older claim is told to end.
    fn claim<'a>(&'a self, device_id: &'a str, conn: u64) -> BoxFut<'a, SessionClaim>;
    /// Ends a claim (no effect on a newer one).
    fn release(&self, claim: SessionClaim) -> BoxFut<'_, ()>;
}

/// Named monotonic counters shared by every node (`c2d.Success`, `c2d.Purged`, …).
pub trait Counters: Send + Sync {
    /// Adds `n` to counter `name`.
    fn add<'a>(&'a self, name: &'a str, n: u64) -> BoxFut<'a, ()>;
    /// Every counter and its value, ordered by name.
    fn all(&self) -> BoxFut<'_, Vec<(String, u64)>>;
}

/// In-process session claims: the newest claim of a device wins and the one it replaced is
/// notified. The embedded backend uses it alone; a cluster backend uses it for the claims of its
/// own node and adds the cross-node part.
#[derive(Debug, Default)]
pub struct LocalClaims {
    claims: parking_lot::Mutex<std::collections::HashMap<String, (u64, Arc<Notify>)>>,
}

impl LocalClaims {
    /// Records claim `revision` of `device_id`; notifies whichever of the old and the new claim
    /// is older. Returns the new claim.
    pub fn insert(&self, device_id: &str, revision: u64) -> SessionClaim {
        let superseded = Arc::new(Notify::new());
        let mut claims = self.claims.lock();
        match claims.get(device_id) {
            Some((old, _)) if *old > revision => superseded.notify_one(),
            _ => {
                if let Some((_, n)) = claims.insert(device_id.to_string(), (revision, superseded.clone())) {
                    n.notify_one();
                }
            }
        }
        SessionClaim { device_id: device_id.to_string(), revision, superseded }
    }

    /// Ends the claim if it is still the live one; returns whether it was.
    pub fn remove(&self, claim: &SessionClaim) -> bool {
        let mut claims = self.claims.lock();
        let mine = claims.get(&claim.device_id).is_some_and(|(r, _)| *r == claim.revision);
        if mine {
            claims.remove(&claim.device_id);
        }
        mine
    }

    /// A claim newer than this node's live one was seen (another node): ends the local one.
    pub fn supersede_below(&self, device_id: &str, revision: u64) -> bool {
        let mut claims = self.claims.lock();
        if claims.get(device_id).is_some_and(|(r, _)| *r < revision) {
            let (_, n) = claims.remove(device_id).expect("present");
            n.notify_one();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_local_claim_wins() {
        let c = LocalClaims::default();
        let a = c.insert("d", 1);
        let b = c.insert("d", 2);
        // a was told to end (a stored permit makes notified() resolve at once).
        assert!(futures_ready(a.superseded.notified()));
        assert!(!futures_ready(b.superseded.notified()));
        // A late, older claim is superseded at once and does not displace b.
        let late = c.insert("d", 1);
        assert!(futures_ready(late.superseded.notified()));
        assert!(!c.remove(&a));
        assert!(c.supersede_below("d", 3));
        assert!(futures_ready(b.superseded.notified()));
        assert!(!c.remove(&b));
    }

    fn futures_ready<F: Future>(f: F) -> bool {
        let mut f = std::pin::pin!(f);
        let waker = std::task::Waker::noop();
        f.as_mut().poll(&mut Context::from_waker(waker)).is_ready()
    }
}
