//! Cloud-to-device queues and delivery feedback: the pure state machine (no I/O, no clock — time
//! is passed in), event-sourced on a [`StateLog`] by [`C2d`].
//!
//! Lifecycle per message (reference §6): Enqueued → Invisible (delivered, locked) → Completed |
//! Enqueued again (abandon, lock expiry) | Dead-lettered (reject, expiry, max delivery count).
//! Delivery count (2026 semantics, `docs/protocol.md`): only an explicit abandon increments it;
//! a lock expiry or a disconnect re-enqueues without incrementing.
//!
//! Invariants:
//! - every state change that must survive a crash is an event appended before it is
//!   acknowledged; locks are volatile (a restart or disconnect makes locked messages Enqueued);
//! - a queue never holds more than `max_queue` messages; order is FIFO by sequence number;
//! - each terminal outcome produces exactly one feedback record when the message's `iothub-ack`
//!   asks for it, and each record ends up in exactly one batch, which stays until acknowledged.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{watch, Notify};

use base64::Engine;
use serde::{Deserialize, Serialize};

use rumqttc::mqttbytes::v4::Publish;
use rumqttc::mqttbytes::QoS;

use crate::error::{Error, ErrorKind, Result};
use crate::message::{now_ms, MAX_C2D_SIZE};
pub use crate::proto::{AckMode, FeedbackRecord, FeedbackStatus};
use crate::store::{Durability, Machine, StateLog, StateOptions};
use crate::wire;

/// Limits of the C2D queues (reference §6.2, §9.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct C2dLimits {
    /// Messages per device queue (50).
    pub max_queue: usize,
    /// Abandons before dead-lettering (10; 1–100).
    pub max_delivery_count: u32,
    /// Lock (visibility) timeout (60 s).
    pub lock: Duration,
    /// TTL when the sender sets none (1 h).
    pub default_ttl: Duration,
    /// Longest TTL accepted (48 h).
    pub max_ttl: Duration,
    /// Largest delivery (64 KB), counted as the whole PUBLISH a device receives: body, topic
    /// with every property the hub adds, and framing.
    pub max_size: usize,
    /// Feedback records per batch (64).
    pub feedback_batch: usize,
}

impl Default for C2dLimits {
    fn default() -> Self {
        C2dLimits {
            max_queue: 50,
            max_delivery_count: 10,
            lock: Duration::from_secs(60),
            default_ttl: Duration::from_secs(3600),
            max_ttl: Duration::from_secs(48 * 3600),
            max_size: MAX_C2D_SIZE,
            feedback_batch: 64,
        }
    }
}

/// One queued C2D message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Sequence number, unique per device queue.
    pub seq: u64,
    /// Message id (feedback correlates on it).
    pub message_id: String,
    /// Requested feedback.
    pub ack: AckMode,
    /// Enqueue time (ms since the Unix epoch).
    pub enqueued_ms: u64,
    /// Absolute expiry (ms since the Unix epoch).
    pub expiry_ms: u64,
    /// Explicit abandons so far.
    pub delivery_count: u32,
    /// The service's identity of this send (repeated sends of it are answered, not queued).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_id: Option<String>,
    /// The message record ([`crate::Message::encode`]), base64 in the event log.
    #[serde(with = "b64")]
    pub record: Vec<u8>,
}

mod b64 {
    use base64::Engine;
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Queue {
    next_seq: u64,
    generation_id: String,
    entries: VecDeque<Entry>,
    /// The newest [`RECENT_SENDS`] send ids accepted for this device: (send id, seq).
    #[serde(default)]
    recent_sends: VecDeque<(String, u64)>,
}

/// Send ids remembered per device, so a service's re-send after a lost answer is recognised
/// even when the first copy was already delivered and completed.
pub const RECENT_SENDS: usize = 16;

/// A batch of feedback records awaiting a service's acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// Batch id (increasing).
    pub id: u64,
    /// When it was formed (ms since the Unix epoch).
    pub created_ms: u64,
    /// The records.
    pub records: Vec<FeedbackRecord>,
}

/// How a delivered message was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Settle {
    /// Completed (MQTT PUBACK).
    Complete,
    /// Abandoned: back to the queue, delivery count + 1.
    Abandon,
    /// Rejected: dead-lettered.
    Reject,
    /// The TTL passed: dead-lettered.
    Expire,
    /// The delivery would exceed the MQTT packet limit devices accept: dead-lettered
    /// (`Rejected` feedback), so it can never block the device's connection.
    TooLarge,
}

/// Events of the C2D state machine (JSON in the event log). Each variant's doc describes its
/// fields.
#[allow(missing_docs)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Event {
    /// A message was accepted into `device`'s queue.
    Enqueue { device: String, generation_id: String, entry: Entry },
    /// A message was settled; an abandon dead-letters it once its delivery count reaches
    /// `max_delivery` (carried in the event so replay does not depend on configuration).
    Settle {
        device: String,
        seq: u64,
        how: Settle,
        at_ms: u64,
        #[serde(default = "default_max_delivery")]
        max_delivery: u32,
    },
    /// Every message of `device` was removed.
    Purge { device: String, at_ms: u64 },
    /// `device` was deleted from the registry: its messages are purged (`Purged` feedback) and
    /// its persistent subscription dropped; sequence numbers keep counting up.
    DeleteDevice { device: String, at_ms: u64 },
    /// Pending feedback (up to the batch size) became batch `id`.
    Batch { id: u64, at_ms: u64, max: usize },
    /// A service acknowledged batch `id`.
    BatchAck { id: u64 },
    /// Feedback batch `id` expired unconsumed (counted, then dropped).
    BatchExpire { id: u64 },
    /// `device` has (or no longer has) a persistent C2D subscription (clean session 0).
    Subscription { device: String, on: bool },
}

/// A reject or abandon of a message whose TTL passed counts as its expiry; a complete wins.
pub fn effective(how: Settle, expired: bool) -> Settle {
    if how != Settle::Complete && expired {
        Settle::Expire
    } else {
        how
    }
}

/// The terminal outcome a settle reaches, if any: an abandon raises `delivery_count` and
/// dead-letters at `max_delivery` (the only thing that counts: IoT Hub's rule), every other
/// settle is terminal. The one decision both backends apply.
pub fn outcome(how: Settle, delivery_count: &mut u32, max_delivery: u32) -> Option<FeedbackStatus> {
    match how {
        Settle::Complete => Some(FeedbackStatus::Success),
        Settle::Reject | Settle::TooLarge => Some(FeedbackStatus::Rejected),
        Settle::Expire => Some(FeedbackStatus::Expired),
        Settle::Abandon => {
            *delivery_count += 1;
            (*delivery_count >= max_delivery).then_some(FeedbackStatus::DeliveryCountExceeded)
        }
    }
}

/// When waiting feedback records become a batch (see [`batch_due`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchDue {
    /// No record waits.
    Idle,
    /// Form a batch now.
    Now,
    /// Form one at this time (ms since the Unix epoch), unless a full batch accumulates first.
    At(u64),
}

/// IoT Hub's feedback batching rule (reference §7.2): a feedback message is sent "when 64
/// records accumulate or 15 s after the previous send, whichever first". With `pending` records
/// waiting, `full` records to a batch, the previous batch formed at `last_ms` (`None`: none
/// yet) and `interval_ms` the 15 s: a full batch forms at once; a partial one at once when the
/// previous left at least `interval_ms` ago (so a lone outcome after a quiet period reaches a
/// waiting service on settle, not a timer tick later), otherwise at `last_ms + interval_ms`.
/// Both backends apply it: the embedded one when an outcome is recorded and when a reader waits,
/// JetStream's feedback reader when its first record arrives.
pub fn batch_due(pending: usize, full: usize, last_ms: Option<u64>, interval_ms: u64, now_ms: u64) -> BatchDue {
    if pending == 0 {
        return BatchDue::Idle;
    }
    if pending >= full.max(1) {
        return BatchDue::Now;
    }
    match last_ms {
        Some(last) if now_ms < last.saturating_add(interval_ms) => BatchDue::At(last.saturating_add(interval_ms)),
        _ => BatchDue::Now,
    }
}

/// The feedback record of a terminal outcome (IoT Hub's JSON shape), stamped `at_ms`.
pub fn feedback_record(message_id: &str, device: &str, generation_id: &str, status: FeedbackStatus, at_ms: u64) -> FeedbackRecord {
    FeedbackRecord {
        original_message_id: message_id.to_string(),
        device_id: device.to_string(),
        device_generation_id: generation_id.to_string(),
        enqueued_time_utc: wire::format_time_ms(at_ms),
        status_code: status,
        description: status.as_str().to_string(),
    }
}

fn default_max_delivery() -> u32 {
    C2dLimits::default().max_delivery_count
}

/// The durable C2D state: queues, pending feedback, feedback batches.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    queues: BTreeMap<String, Queue>,
    pending_feedback: Vec<FeedbackRecord>,
    batches: BTreeMap<u64, Batch>,
    next_batch: u64,
    /// Outcome counters since creation (observability): status name → count.
    outcomes: BTreeMap<String, u64>,
    expired_feedback_batches: u64,
    #[serde(default)]
    subscriptions: std::collections::BTreeSet<String>,
    /// Feedback records produced by events applied since [`State::take_fresh`] last ran
    /// (volatile: [`C2d`] reports them to the hub's outcome notifications after each commit).
    #[serde(skip)]
    fresh: Mutex<Vec<FeedbackRecord>>,
}

impl Machine for State {
    fn apply(&mut self, event: &[u8]) -> Result<()> {
        let ev: Event = serde_json::from_slice(event).map_err(|e| Error::new(ErrorKind::Storage, format!("corrupt C2D event: {e}")))?;
        self.apply_event(ev);
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("C2D state serializes")
    }

    fn restore(snapshot: Option<&[u8]>) -> Result<Self> {
        match snapshot {
            None => Ok(State::default()),
            Some(b) => serde_json::from_slice(b).map_err(|e| Error::new(ErrorKind::Storage, format!("corrupt C2D snapshot: {e}"))),
        }
    }
}

/// Encodes an event for the log.
pub fn encode(ev: &Event) -> Vec<u8> {
    serde_json::to_vec(ev).expect("C2D event serializes")
}

impl State {
    /// Applies one event (deterministic: all times come from the event).
    pub fn apply_event(&mut self, ev: Event) {
        match ev {
            Event::Enqueue { device, generation_id, entry } => {
                let q = self.queues.entry(device).or_default();
                q.generation_id = generation_id;
                q.next_seq = q.next_seq.max(entry.seq + 1);
                if let Some(id) = &entry.send_id {
                    q.recent_sends.push_back((id.clone(), entry.seq));
                    while q.recent_sends.len() > RECENT_SENDS {
                        q.recent_sends.pop_front();
                    }
                }
                q.entries.push_back(entry);
            }
            Event::Settle { device, seq, how, at_ms, max_delivery } => {
                let Some(q) = self.queues.get_mut(&device) else { return };
                let Some(i) = q.entries.iter().position(|e| e.seq == seq) else { return };
                if let Some(status) = outcome(how, &mut q.entries[i].delivery_count, max_delivery) {
                    let e = q.entries.remove(i).expect("index exists");
                    let gen = q.generation_id.clone();
                    self.finish(&device, &gen, &e, status, at_ms);
                }
            }
            Event::DeleteDevice { device, at_ms } => {
                self.subscriptions.remove(&device);
                if let Some(q) = self.queues.get_mut(&device) {
                    q.recent_sends.clear();
                }
                self.apply_event(Event::Purge { device, at_ms });
            }
            Event::Purge { device, at_ms } => {
                if let Some(q) = self.queues.get_mut(&device) {
                    let gen = q.generation_id.clone();
                    let drained: Vec<Entry> = q.entries.drain(..).collect();
                    for e in drained {
                        self.finish(&device, &gen, &e, FeedbackStatus::Purged, at_ms);
                    }
                }
            }
            Event::Batch { id, at_ms, max } => {
                let n = self.pending_feedback.len().min(max.max(1));
                let records: Vec<FeedbackRecord> = self.pending_feedback.drain(..n).collect();
                if !records.is_empty() {
                    self.batches.insert(id, Batch { id, created_ms: at_ms, records });
                }
                self.next_batch = self.next_batch.max(id + 1);
            }
            Event::BatchAck { id } => {
                self.batches.remove(&id);
            }
            Event::BatchExpire { id } => {
                if self.batches.remove(&id).is_some() {
                    self.expired_feedback_batches += 1;
                }
            }
            Event::Subscription { device, on } => {
                if on {
                    self.subscriptions.insert(device);
                } else {
                    self.subscriptions.remove(&device);
                }
            }
        }
    }

    fn finish(&mut self, device: &str, generation_id: &str, e: &Entry, status: FeedbackStatus, at_ms: u64) {
        *self.outcomes.entry(status.as_str().to_string()).or_default() += 1;
        if e.ack.wants(status) {
            let rec = feedback_record(&e.message_id, device, generation_id, status, at_ms);
            self.fresh.get_mut().push(rec.clone());
            self.pending_feedback.push(rec);
        }
    }

    /// The feedback records produced since the last call (each is returned once).
    pub fn take_fresh(&self) -> Vec<FeedbackRecord> {
        std::mem::take(&mut *self.fresh.lock())
    }

    /// Validates a send and builds its `Enqueue` event.
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue(
        &self,
        limits: &C2dLimits,
        device: &str,
        generation_id: &str,
        message_id: String,
        ack: AckMode,
        ttl: Option<Duration>,
        record: Vec<u8>,
        size: usize,
        now_ms: u64,
    ) -> Result<Event> {
        if size > limits.max_size {
            return Err(Error::new(ErrorKind::MessageTooLarge, format!("C2D message of {size} bytes exceeds {} bytes", limits.max_size)));
        }
        let ttl = ttl.unwrap_or(limits.default_ttl);
        if ttl < Duration::from_secs(1) || ttl > limits.max_ttl {
            return Err(Error::invalid(format!("TTL {ttl:?} is outside 1 s … {:?}", limits.max_ttl)));
        }
        let q = self.queues.get(device);
        let depth = q.map_or(0, |q| q.entries.len());
        if depth >= limits.max_queue {
            return Err(Error::new(
                ErrorKind::QueueFull,
                format!(
                    "device '{device}' has {depth} pending messages (limit {}); wait for it to complete some or purge its queue (403004)",
                    limits.max_queue
                ),
            ));
        }
        let seq = q.map_or(1, |q| q.next_seq.max(1));
        Ok(Event::Enqueue {
            device: device.to_string(),
            generation_id: generation_id.to_string(),
            entry: Entry {
                seq,
                message_id,
                ack,
                enqueued_ms: now_ms,
                expiry_ms: now_ms + ttl.as_millis() as u64,
                delivery_count: 0,
                send_id: None,
                record,
            },
        })
    }

    /// The seq a send id was accepted as, if `device` still remembers it.
    pub fn find_send(&self, device: &str, send_id: &str) -> Option<u64> {
        self.queues.get(device)?.recent_sends.iter().find(|(id, _)| id == send_id).map(|(_, seq)| *seq)
    }

    /// The messages of `device`, in order.
    pub fn queue(&self, device: &str) -> impl Iterator<Item = &Entry> {
        self.queues.get(device).into_iter().flat_map(|q| q.entries.iter())
    }

    /// Number of messages queued for `device` (including locked ones).
    pub fn depth(&self, device: &str) -> usize {
        self.queues.get(device).map_or(0, |q| q.entries.len())
    }

    /// Messages queued for all devices.
    pub fn total_depth(&self) -> usize {
        self.queues.values().map(|q| q.entries.len()).sum()
    }

    /// Feedback records not yet acknowledged (waiting for a batch or in one).
    pub fn feedback_records(&self) -> usize {
        self.pending_feedback.len() + self.batches.values().map(|b| b.records.len()).sum::<usize>()
    }

    /// Whether message `seq` is still in `device`'s queue.
    pub fn contains(&self, device: &str, seq: u64) -> bool {
        self.queue(device).any(|e| e.seq == seq)
    }

    /// Every (device, seq) whose TTL passed at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> Vec<(String, u64)> {
        self.queues
            .iter()
            .flat_map(|(d, q)| q.entries.iter().filter(move |e| e.expiry_ms <= now_ms).map(move |e| (d.clone(), e.seq)))
            .collect()
    }

    /// Feedback records not yet in a batch.
    pub fn pending_feedback(&self) -> &[FeedbackRecord] {
        &self.pending_feedback
    }

    /// Batches awaiting acknowledgement, oldest first.
    pub fn batches(&self) -> impl Iterator<Item = &Batch> {
        self.batches.values()
    }

    /// The id the next batch gets.
    pub fn next_batch_id(&self) -> u64 {
        self.next_batch.max(1)
    }

    /// Whether `device` has a persistent C2D subscription.
    pub fn subscribed(&self, device: &str) -> bool {
        self.subscriptions.contains(device)
    }

    /// Terminal outcome counts since the store was created.
    pub fn outcomes(&self) -> &BTreeMap<String, u64> {
        &self.outcomes
    }
}

/// Volatile delivery locks (not persisted: a restart or disconnect unlocks everything).
#[derive(Debug, Default)]
pub struct Locks {
    /// (device, seq) → (lock expiry ms, connection id).
    held: HashMap<(String, u64), (u64, u64)>,
}

impl Locks {
    /// Locks (device, seq) for connection `conn` until `until_ms`.
    pub fn lock(&mut self, device: &str, seq: u64, conn: u64, until_ms: u64) {
        self.held.insert((device.to_string(), seq), (until_ms, conn));
    }

    /// Whether (device, seq) is locked at `now_ms`.
    pub fn is_locked(&self, device: &str, seq: u64, now_ms: u64) -> bool {
        self.held.get(&(device.to_string(), seq)).is_some_and(|(until, _)| *until > now_ms)
    }

    /// The holder of a live lock.
    pub fn holder(&self, device: &str, seq: u64, now_ms: u64) -> Option<u64> {
        self.held.get(&(device.to_string(), seq)).filter(|(until, _)| *until > now_ms).map(|(_, c)| *c)
    }

    /// Releases one lock.
    pub fn unlock(&mut self, device: &str, seq: u64) {
        self.held.remove(&(device.to_string(), seq));
    }

    /// Releases every lock held by connection `conn` (on disconnect).
    pub fn release_conn(&mut self, conn: u64) {
        self.held.retain(|_, (_, c)| *c != conn);
    }

    /// Drops expired locks; returns the devices that have messages visible again.
    pub fn expire(&mut self, now_ms: u64) -> Vec<String> {
        let mut devices = Vec::new();
        self.held.retain(|(d, _), (until, _)| {
            let keep = *until > now_ms;
            if !keep {
                devices.push(d.clone());
            }
            keep
        });
        devices
    }
}

/// The first message of `device` that can be delivered now (Enqueued: not locked, not expired),
/// (messages in flight on a connection are locked, so they are skipped).
pub fn next_deliverable<'a>(state: &'a State, locks: &Locks, device: &str, now_ms: u64) -> Option<&'a Entry> {
    state.queue(device).find(|e| e.expiry_ms > now_ms && !locks.is_locked(device, e.seq, now_ms))
}

/// Base64 of a record (for tests and diagnostics).
pub fn record_b64(record: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st() -> State {
        State::default()
    }

    fn enq(s: &mut State, device: &str, id: &str, ack: AckMode, now: u64) -> u64 {
        let ev = s.enqueue(&C2dLimits::default(), device, "g1", id.into(), ack, None, vec![1, 2, 3], 3, now).unwrap();
        let seq = match &ev {
            Event::Enqueue { entry, .. } => entry.seq,
            _ => unreachable!(),
        };
        // Round-trip through JSON as the log does.
        s.apply(&encode(&ev)).unwrap();
        seq
    }

    fn settle(s: &mut State, device: &str, seq: u64, how: Settle) {
        s.apply(&encode(&Event::Settle { device: device.into(), seq, how, at_ms: 1_000, max_delivery: 10 })).unwrap();
    }

    #[test]
    fn complete_gives_success_feedback_when_asked() {
        let mut s = st();
        let a = enq(&mut s, "d", "m1", AckMode::Full, 0);
        let b = enq(&mut s, "d", "m2", AckMode::None, 0);
        let c = enq(&mut s, "d", "m3", AckMode::Negative, 0);
        assert_eq!((a, b, c), (1, 2, 3));
        for seq in [a, b, c] {
            settle(&mut s, "d", seq, Settle::Complete);
        }
        assert_eq!(s.depth("d"), 0);
        let fb = s.pending_feedback();
        assert_eq!(fb.len(), 1);
        assert_eq!((fb[0].original_message_id.as_str(), fb[0].status_code), ("m1", FeedbackStatus::Success));
        assert_eq!(fb[0].device_generation_id, "g1");
        assert_eq!(fb[0].description, "Success");
        assert_eq!(fb[0].enqueued_time_utc, "1970-01-01T00:00:01.000Z");
    }

    #[test]
    fn reject_expire_and_purge_are_negative_outcomes() {
        let mut s = st();
        let a = enq(&mut s, "d", "rej", AckMode::Negative, 0);
        let b = enq(&mut s, "d", "exp", AckMode::Full, 0);
        let c = enq(&mut s, "d", "pos-only", AckMode::Positive, 0);
        enq(&mut s, "d", "pur", AckMode::Full, 0);
        settle(&mut s, "d", a, Settle::Reject);
        settle(&mut s, "d", b, Settle::Expire);
        settle(&mut s, "d", c, Settle::Reject);
        s.apply(&encode(&Event::Purge { device: "d".into(), at_ms: 5 })).unwrap();
        let got: Vec<_> = s.pending_feedback().iter().map(|r| (r.original_message_id.as_str(), r.status_code)).collect();
        assert_eq!(got, vec![("rej", FeedbackStatus::Rejected), ("exp", FeedbackStatus::Expired), ("pur", FeedbackStatus::Purged)]);
        assert_eq!(s.outcomes().get("Rejected"), Some(&2));
    }

    #[test]
    fn abandon_counts_and_dead_letters_at_max() {
        let mut s = st();
        let a = enq(&mut s, "d", "m", AckMode::Full, 0);
        for _ in 0..9 {
            settle(&mut s, "d", a, Settle::Abandon);
            assert!(s.contains("d", a));
        }
        settle(&mut s, "d", a, Settle::Abandon);
        assert!(!s.contains("d", a));
        assert_eq!(s.pending_feedback()[0].status_code, FeedbackStatus::DeliveryCountExceeded);
    }

    #[test]
    fn queue_limit_ttl_and_size_are_checked() {
        let mut s = st();
        let lim = C2dLimits::default();
        for i in 0..50 {
            enq(&mut s, "d", &format!("{i}"), AckMode::None, 0);
        }
        let e = s.enqueue(&lim, "d", "g", "x".into(), AckMode::None, None, vec![], 0, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::QueueFull);
        assert!(e.message().contains("50"));
        // Other devices are unaffected.
        assert!(s.enqueue(&lim, "other", "g", "x".into(), AckMode::None, None, vec![], 0, 0).is_ok());
        let e = s.enqueue(&lim, "o", "g", "x".into(), AckMode::None, Some(Duration::from_secs(49 * 3600)), vec![], 0, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        let e = s.enqueue(&lim, "o", "g", "x".into(), AckMode::None, None, vec![], 64 * 1024 + 1, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::MessageTooLarge);
    }

    #[test]
    fn batches_take_at_most_the_batch_size_and_leave_on_ack() {
        let mut s = st();
        for i in 0..70 {
            let seq = enq(&mut s, "d", &format!("m{i}"), AckMode::Positive, 0);
            settle(&mut s, "d", seq, Settle::Complete);
        }
        s.apply_event(Event::Batch { id: s.next_batch_id(), at_ms: 1, max: 64 });
        s.apply_event(Event::Batch { id: s.next_batch_id(), at_ms: 2, max: 64 });
        let sizes: Vec<_> = s.batches().map(|b| b.records.len()).collect();
        assert_eq!(sizes, vec![64, 6]);
        s.apply_event(Event::BatchAck { id: 1 });
        assert_eq!(s.batches().count(), 1);
        // Snapshot + restore keeps everything.
        let r = State::restore(Some(&s.snapshot())).unwrap();
        assert_eq!(r.batches().count(), 1);
        assert_eq!(r.next_batch_id(), 3);
    }

    #[test]
    fn locks_hide_messages_until_released_or_expired() {
        let mut s = st();
        let a = enq(&mut s, "d", "a", AckMode::None, 0);
        let b = enq(&mut s, "d", "b", AckMode::None, 0);
        let mut locks = Locks::default();
        assert_eq!(next_deliverable(&s, &locks, "d", 10).unwrap().seq, a);
        locks.lock("d", a, 7, 60_010);
        assert_eq!(next_deliverable(&s, &locks, "d", 10).unwrap().seq, b);
        locks.lock("d", b, 7, 60_010);
        assert!(next_deliverable(&s, &locks, "d", 10).is_none());
        locks.release_conn(7);
        assert_eq!(next_deliverable(&s, &locks, "d", 10).unwrap().seq, a);
        locks.lock("d", a, 8, 100);
        assert_eq!(locks.expire(200), vec!["d".to_string()]);
        assert_eq!(next_deliverable(&s, &locks, "d", 200).unwrap().seq, a);
        // Expired messages are never delivered.
        assert!(next_deliverable(&s, &locks, "d", 3_600_000).is_none());
        assert_eq!(s.expired(3_600_000).len(), 2);
    }

    #[test]
    fn feedback_batches_follow_iothub_rule_64_or_15_s_after_the_previous() {
        let (full, iv) = (64, 15_000);
        // Nothing waits: nothing to form.
        assert_eq!(batch_due(0, full, None, iv, 1_000), BatchDue::Idle);
        assert_eq!(batch_due(0, full, Some(0), iv, 1_000), BatchDue::Idle);
        // The first outcome since start, or the first after a quiet interval, leaves at once.
        assert_eq!(batch_due(1, full, None, iv, 1_000), BatchDue::Now);
        assert_eq!(batch_due(1, full, Some(1_000), iv, 16_000), BatchDue::Now);
        assert_eq!(batch_due(1, full, Some(1_000), iv, 90_000), BatchDue::Now);
        // Within 15 s of the previous batch a partial one waits for the interval to end…
        assert_eq!(batch_due(1, full, Some(1_000), iv, 1_001), BatchDue::At(16_000));
        assert_eq!(batch_due(63, full, Some(1_000), iv, 15_999), BatchDue::At(16_000));
        // …unless 64 accumulated, which leave at once whenever the previous went.
        assert_eq!(batch_due(64, full, Some(1_000), iv, 1_001), BatchDue::Now);
        assert_eq!(batch_due(200, full, Some(1_000), iv, 1_001), BatchDue::Now);
        // A degenerate batch size of 0 still forms batches of one.
        assert_eq!(batch_due(1, 0, Some(1_000), iv, 1_001), BatchDue::Now);
    }

    #[test]
    fn ack_mode_parses_case_insensitively() {
        assert_eq!("Full".parse::<AckMode>().unwrap(), AckMode::Full);
        assert!("sometimes".parse::<AckMode>().is_err());
    }

    #[test]
    fn feedback_json_matches_iothub() {
        let r = FeedbackRecord {
            original_message_id: "0987654321".into(),
            device_id: "123".into(),
            device_generation_id: "abc".into(),
            enqueued_time_utc: "2015-07-28T16:24:48.789Z".into(),
            status_code: FeedbackStatus::Success,
            description: "Success".into(),
        };
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"originalMessageId":"0987654321","deviceId":"123","deviceGenerationId":"abc",
                "enqueuedTimeUtc":"2015-07-28T16:24:48.789Z","statusCode":"Success","description":"Success"})
        );
    }

    /// A batch is locked by the reader it went to until its acknowledgement is applied: another
    /// reader polling meanwhile never gets it (it would be delivered twice and counted twice).
    #[test]
    fn a_batch_being_acknowledged_never_goes_to_another_reader() {
        let dir = tempfile::tempdir().unwrap();
        let c2d = C2d::open(dir.path(), Durability::Never, C2dLimits::default(), Duration::ZERO).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        let acked = Mutex::new(std::collections::HashSet::new());
        let stolen = std::thread::scope(|scope| {
            let other = scope.spawn(|| {
                let mut stolen = Vec::new();
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    if let Some(b) = c2d.take_feedback(2) {
                        if acked.lock().contains(&b.id) {
                            stolen.push(b.id);
                        }
                        c2d.release_feedback(2);
                    }
                }
                stolen
            });
            let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                for k in 0..3_000 {
                    let msg = super::super::backend::C2dEnqueue {
                        device_id: "d".into(),
                        generation_id: "g".into(),
                        message_id: format!("m{k}"),
                        ack: AckMode::Full,
                        ttl: None,
                        record: vec![1].into(),
                        size: 1,
                        send_id: None,
                    };
                    let seq = rt.block_on(c2d.send(&msg)).unwrap();
                    assert!(c2d.settle("d", seq, Settle::Complete).unwrap());
                    if let Some(b) = c2d.take_feedback(1) {
                        acked.lock().insert(b.id);
                        c2d.ack_feedback(b.id).unwrap();
                    }
                }
            }));
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Err(p) = mine {
                std::panic::resume_unwind(p);
            }
            other.join().unwrap()
        });
        assert!(stolen.is_empty(), "batches handed to a second reader while being acknowledged: {stolen:?}");
    }
}

/// The hub's C2D service: the durable [`State`] on a [`StateLog`], volatile locks, and wake-ups
/// for the device and service sessions that deliver messages and feedback.
pub struct C2d {
    log: StateLog<State>,
    limits: C2dLimits,
    locks: Mutex<Locks>,
    /// Per device: notified when it may have something new to deliver.
    wake: Mutex<HashMap<String, Arc<Notify>>>,
    /// Bumped when feedback batches appear or become unlocked.
    feedback: watch::Sender<u64>,
    /// Feedback batch id → (connection, lock expiry ms).
    feedback_locks: Mutex<HashMap<u64, (u64, u64)>>,
    /// The `15 s` of [`batch_due`] (`HubConfig::feedback_interval`).
    feedback_interval: Duration,
    /// When this process last formed a feedback batch (`None` since start). Held while a
    /// batch is formed, so two callers never form one each for the same records.
    last_batch_ms: Mutex<Option<u64>>,
    /// Where feedback records are reported as their outcomes are committed
    /// ([`super::backend::Feedback::on_outcome`]).
    outcome_sink: Mutex<Option<super::backend::OutcomeSink>>,
}

/// What a device session sends: the message with its C2D system properties filled in.
pub type Delivery = super::backend::C2dDelivery;

/// The message and PUBLISH a device receives for `e` (reference §5.1: `$.to`, `iothub-ack`
/// and hubmsg's sequence number, enqueued time and delivery count in the bag).
pub fn delivery(device: &str, e: &Entry) -> Result<(crate::Message, Publish)> {
    let what = DeliveryOf {
        seq: e.seq,
        message_id: &e.message_id,
        ack: e.ack,
        enqueued_ms: e.enqueued_ms,
        expiry_ms: e.expiry_ms,
        delivery_count: e.delivery_count,
    };
    build_delivery(device, &e.record, &what)
}

/// What a delivery of one queued message carries besides its record.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryOf<'a> {
    /// Sequence number in the device queue.
    pub seq: u64,
    /// Message id.
    pub message_id: &'a str,
    /// Requested feedback.
    pub ack: AckMode,
    /// Enqueue time (ms since the Unix epoch).
    pub enqueued_ms: u64,
    /// Absolute expiry (ms since the Unix epoch).
    pub expiry_ms: u64,
    /// Explicit abandons so far.
    pub delivery_count: u32,
}

/// The message and PUBLISH a device receives for a queued `record` (the one function both
/// backends build deliveries with).
pub fn build_delivery(device: &str, record: &[u8], d: &DeliveryOf<'_>) -> Result<(crate::Message, Publish)> {
    let mut message = crate::Message::decode(&bytes::Bytes::copy_from_slice(record))?;
    message.message_id = Some(d.message_id.to_string());
    message.expiry_time_ms = Some(d.expiry_ms);
    message.system.retain(|(k, _)| {
        !matches!(k.as_str(), "$.to" | "iothub-ack" | "iothub-sequencenumber" | "iothub-enqueuedtime" | "iothub-deliverycount")
    });
    message.system.extend([
        ("$.to".to_string(), format!("/devices/{device}/messages/devicebound")),
        ("iothub-ack".to_string(), d.ack.as_str().to_string()),
        ("iothub-sequencenumber".to_string(), d.seq.to_string()),
        ("iothub-enqueuedtime".to_string(), d.enqueued_ms.to_string()),
        ("iothub-deliverycount".to_string(), d.delivery_count.to_string()),
    ]);
    let topic = wire::c2d_topic(device, &wire::c2d_bag(&message));
    let publish = Publish::from_bytes(topic, QoS::AtLeastOnce, message.body.clone());
    Ok((message, publish))
}

/// Why a delivery cannot go to a device (a packet over what devices accept, or a topic over
/// MQTT's 65,535 bytes — possible only with a raised `max_size`); such a message is
/// dead-lettered (`Rejected`) instead, so it never costs the device its connection.
pub fn undeliverable(publish: &Publish) -> Option<String> {
    if publish_len(publish) <= crate::transport::MAX_PACKET_SIZE && publish.topic.len() <= u16::MAX as usize {
        return None;
    }
    Some(format!("its delivery packet has {} bytes with a {}-byte topic", publish_len(publish), publish.topic.len()))
}

/// The size a send is checked with: the whole delivery packet, with the worst case for the
/// numbers the hub fills in at delivery time.
pub fn delivery_size(device: &str, message_id: &str, ack: AckMode, record: &[u8], limits: &C2dLimits) -> Result<usize> {
    let now = now_ms();
    let probe = DeliveryOf {
        seq: u64::MAX,
        message_id,
        ack,
        enqueued_ms: now,
        expiry_ms: now + limits.max_ttl.as_millis() as u64,
        delivery_count: u32::MAX,
    };
    Ok(publish_len(&build_delivery(device, record, &probe).map_err(|e| Error::invalid(format!("c2d.send: {e}")))?.1))
}

/// Bytes of a QoS 1 PUBLISH on the wire: fixed header, topic, packet id, payload.
pub fn publish_len(p: &Publish) -> usize {
    let rem = 2 + p.topic.len() + 2 + p.payload.len();
    let len_len = match rem {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + len_len + rem
}

impl C2d {
    /// Opens the C2D store in `dir`; feedback batches follow [`batch_due`] with
    /// `feedback_interval`.
    pub fn open(dir: &std::path::Path, durability: Durability, limits: C2dLimits, feedback_interval: Duration) -> Result<Arc<C2d>> {
        let log = StateLog::<State>::open(dir, StateOptions { durability, ..StateOptions::default() })?;
        // Outcomes replayed from the log were reported (or not) by the process that recorded them.
        drop(log.read(|s| s.take_fresh()));
        let (feedback, _) = watch::channel(0);
        Ok(Arc::new(C2d {
            log,
            limits,
            locks: Mutex::new(Locks::default()),
            wake: Mutex::new(HashMap::new()),
            feedback,
            feedback_locks: Mutex::new(HashMap::new()),
            feedback_interval,
            last_batch_ms: Mutex::new(None),
            outcome_sink: Mutex::new(None),
        }))
    }

    /// Sets where feedback records are reported once their outcome is committed.
    pub fn on_outcome(&self, sink: super::backend::OutcomeSink) {
        *self.outcome_sink.lock() = Some(sink);
    }

    /// The limits in force.
    pub fn limits(&self) -> &C2dLimits {
        &self.limits
    }

    /// Runs `f` on the state.
    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        self.log.read(f)
    }

    /// The wake-up of `device`'s session.
    pub fn device_notify(&self, device: &str) -> Arc<Notify> {
        self.wake.lock().entry(device.to_string()).or_default().clone()
    }

    fn wake_device(&self, device: &str) {
        if let Some(n) = self.wake.lock().get(device) {
            n.notify_one();
        }
    }

    /// A watch that changes when feedback batches may be deliverable.
    pub fn feedback_watch(&self) -> watch::Receiver<u64> {
        self.feedback.subscribe()
    }

    /// Appends and applies the event `decide` builds, then reports the feedback records it
    /// produced (outside every lock; a concurrent commit may report them instead — each record
    /// is reported once).
    fn commit(&self, decide: impl FnOnce(&State) -> Result<Event>) -> Result<u64> {
        let ((), seq) = self.log.commit_with(|s| Ok((encode(&decide(s)?), ())))?;
        let fresh = self.log.read(|s| s.take_fresh());
        if !fresh.is_empty() {
            let sink = self.outcome_sink.lock().clone();
            if let Some(sink) = sink {
                for r in fresh {
                    sink(r);
                }
            }
        }
        Ok(seq)
    }

    /// Accepts a message; returns its sequence number once durable. The size limit applies to
    /// the whole delivery packet (`msg.size`, see [`delivery_size`]). A `send_id` already
    /// accepted for this device answers with the first copy's sequence number and queues
    /// nothing.
    pub async fn send(&self, msg: &super::backend::C2dEnqueue) -> Result<u64> {
        let now = now_ms();
        let device = msg.device_id.as_str();
        let mut seq_out = 0;
        let mut repeated = None;
        let r = self.commit(|s| {
            if let Some(seq) = msg.send_id.as_deref().and_then(|id| s.find_send(device, id)) {
                repeated = Some(seq);
                return Err(Error::new(ErrorKind::AlreadyExists, "repeated send"));
            }
            let mut ev = s.enqueue(
                &self.limits,
                device,
                &msg.generation_id,
                msg.message_id.clone(),
                msg.ack,
                msg.ttl,
                msg.record.to_vec(),
                msg.size,
                now,
            )?;
            if let Event::Enqueue { entry, .. } = &mut ev {
                entry.send_id = msg.send_id.clone();
                seq_out = entry.seq;
            }
            Ok(ev)
        });
        let seq = match (r, repeated) {
            (_, Some(seq)) => return Ok(seq),
            (r, None) => r?,
        };
        self.log.wait_durable(seq).await?;
        self.wake_device(device);
        Ok(seq_out)
    }

    /// Removes `device`'s messages (`Purged` feedback) and its persistent subscription because
    /// the device was deleted; durable on return. Idempotent.
    pub async fn delete_device(&self, device: &str) -> Result<()> {
        let seq = self.commit(|_| Ok(Event::DeleteDevice { device: device.to_string(), at_ms: now_ms() }))?;
        self.log.wait_durable(seq).await?;
        self.locks.lock().held.retain(|(d, _), _| d != device);
        self.feedback.send_modify(|v| *v += 1);
        Ok(())
    }

    /// Settles message `seq` of `device`. A reject or abandon of a message whose TTL passed is
    /// recorded as expired. Returns false if the message is no longer queued. Does not wait for
    /// durability (use [`C2d::sync`]).
    pub fn settle(&self, device: &str, seq: u64, how: Settle) -> Result<bool> {
        let now = now_ms();
        let mut found = false;
        let r = self.commit(|s| {
            let Some(e) = s.queue(device).find(|e| e.seq == seq) else {
                return Err(Error::new(ErrorKind::LockLost, format!("message {seq} of '{device}' is no longer queued")));
            };
            found = true;
            let how = effective(how, e.expiry_ms <= now);
            Ok(Event::Settle { device: device.to_string(), seq, how, at_ms: now, max_delivery: self.limits.max_delivery_count })
        });
        match r {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::LockLost => return Ok(false),
            Err(e) => return Err(e),
        }
        self.locks.lock().unlock(device, seq);
        self.wake_device(device);
        self.form_feedback(now)?;
        // A record held back by the interval: a waiting reader re-reads when it is due.
        self.feedback.send_modify(|v| *v += 1);
        Ok(found)
    }

    /// Removes every message of `device` (feedback `Purged` where requested). Returns the count.
    pub async fn purge(&self, device: &str) -> Result<usize> {
        let mut n = 0;
        let seq = self.commit(|s| {
            n = s.depth(device);
            Ok(Event::Purge { device: device.to_string(), at_ms: now_ms() })
        })?;
        self.log.wait_durable(seq).await?;
        self.feedback.send_modify(|v| *v += 1);
        Ok(n)
    }

    /// Records whether `device` keeps its C2D subscription across connections (clean session 0
    /// keeps it; clean session 1 drops it). Durable before it returns.
    pub async fn set_subscription(&self, device: &str, on: bool) -> Result<()> {
        if self.log.read(|s| s.subscribed(device)) == on {
            return Ok(());
        }
        let seq = self.commit(|_| Ok(Event::Subscription { device: device.to_string(), on }))?;
        self.log.wait_durable(seq).await
    }

    /// Locks and returns the next deliverable message of `device` for connection `conn`. A
    /// message whose delivery would exceed the MQTT packet limit of devices
    /// ([`crate::transport::MAX_PACKET_SIZE`]), whose topic (property bag) exceeds MQTT's 65,535
    /// bytes, or that cannot be decoded is dead-lettered
    /// (`Rejected` feedback) instead, so it never costs the device its connection.
    pub fn take_deliverable(&self, device: &str, conn: u64) -> Option<Delivery> {
        loop {
            let now = now_ms();
            let found = self.log.read(|s| {
                let mut locks = self.locks.lock();
                let e = next_deliverable(s, &locks, device, now)?;
                match delivery(device, e) {
                    Ok((message, publish)) => match undeliverable(&publish) {
                        None => {
                            locks.lock(device, e.seq, conn, now + self.limits.lock.as_millis() as u64);
                            Some(Ok(Delivery { seq: e.seq, message, publish }))
                        }
                        Some(why) => Some(Err((e.seq, why))),
                    },
                    Err(err) => Some(Err((e.seq, format!("its record cannot be decoded: {err}")))),
                }
            })?;
            match found {
                Ok(d) => return Some(d),
                Err((seq, why)) => {
                    tracing::warn!(device, seq, reason = %why, "dead-lettering an undeliverable C2D message");
                    if self.settle(device, seq, Settle::TooLarge).is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// Whether connection `conn` holds the lock of (device, seq).
    pub fn holds_lock(&self, device: &str, seq: u64, conn: u64) -> bool {
        self.locks.lock().holder(device, seq, now_ms()) == Some(conn)
    }

    /// Returns every message locked by device connection `conn` to the queue (disconnect).
    pub fn release_conn(&self, device: &str, conn: u64) {
        self.locks.lock().release_conn(conn);
        self.wake_device(device);
    }

    /// Releases the feedback batches locked by service connection `conn` (disconnect).
    pub fn release_feedback(&self, conn: u64) {
        let mut fl = self.feedback_locks.lock();
        let before = fl.len();
        fl.retain(|_, (c, _)| *c != conn);
        if fl.len() != before {
            self.feedback.send_modify(|v| *v += 1);
        }
    }

    /// Forms every feedback batch [`batch_due`] says is due at `now` and wakes waiting readers
    /// when it formed one; returns what is due next ([`BatchDue::Idle`] or [`BatchDue::At`]).
    pub fn form_feedback(&self, now: u64) -> Result<BatchDue> {
        let max = self.limits.feedback_batch.max(1);
        let interval = self.feedback_interval.as_millis() as u64;
        let mut last = self.last_batch_ms.lock();
        let mut formed = false;
        let due = loop {
            let pending = self.log.read(|s| s.pending_feedback().len());
            match batch_due(pending, max, *last, interval, now) {
                BatchDue::Now => {
                    self.commit(|s| Ok(Event::Batch { id: s.next_batch_id(), at_ms: now, max }))?;
                    *last = Some(now);
                    formed = true;
                }
                other => break other,
            }
        };
        drop(last);
        if formed {
            self.feedback.send_modify(|v| *v += 1);
        }
        Ok(due)
    }

    /// Periodic work: dead-letter expired messages, release expired locks, form the feedback
    /// batches that are due ([`C2d::form_feedback`]), drop feedback batches older than
    /// `feedback_ttl`. Returns how many messages expired.
    pub fn sweep(&self, feedback_ttl: Duration) -> Result<usize> {
        let now = now_ms();
        let mut expired = 0;
        for (device, seq) in self.log.read(|s| s.expired(now)) {
            if self.settle(&device, seq, Settle::Expire)? {
                expired += 1;
            }
        }
        for device in self.locks.lock().expire(now) {
            self.wake_device(&device);
        }
        let expired_batches = self
            .log
            .read(|s| s.batches().filter(|b| b.created_ms + feedback_ttl.as_millis() as u64 <= now).map(|b| b.id).collect::<Vec<u64>>());
        for id in expired_batches {
            tracing::warn!(batch = id, "feedback batch expired unconsumed");
            self.commit(|_| Ok(Event::BatchExpire { id }))?;
        }
        self.form_feedback(now)?;
        Ok(expired)
    }

    /// Locks and returns the oldest feedback batch no other connection holds.
    pub fn take_feedback(&self, conn: u64) -> Option<Batch> {
        let now = now_ms();
        let lock_ms = self.limits.lock.as_millis() as u64;
        self.log.read(|s| {
            let mut fl = self.feedback_locks.lock();
            let b = s.batches().find(|b| fl.get(&b.id).is_none_or(|(_, until)| *until <= now))?;
            fl.insert(b.id, (conn, now + lock_ms));
            Some(b.clone())
        })
    }

    /// Acknowledges feedback batch `id` (it is removed).
    pub fn ack_feedback(&self, id: u64) -> Result<()> {
        // The lock goes only once the batch is gone from the state: dropped first, another
        // reader polling in between takes the batch again (delivered and counted twice).
        let r = self.commit(|_| Ok(Event::BatchAck { id }));
        self.feedback_locks.lock().remove(&id);
        r.map(|_| ())
    }

    /// Flushes and closes the store.
    pub fn close(&self) -> Result<()> {
        self.log.close()
    }
}
