//! C2D on JetStream: per-device subjects of one WorkQueue stream (50 per subject, discard new
//! per subject → `QUEUE_FULL`), a per-device consumer owned by the node holding the device's
//! session, hubmsg's own locks, per-message state in KV, feedback and outcome streams.
//!
//! Invariants:
//! - every terminal outcome is first claimed in the message's KV state by compare-and-swap, so
//!   whichever of complete / reject / abandon ×max / expiry sweep / purge comes first decides it,
//!   and exactly one outcome (one feedback record, de-duplicated by `Nats-Msg-Id`) results; a
//!   message whose outcome is claimed but not yet removed (a node died in between) is finished by
//!   whoever meets it next;
//! - only an explicit abandon bumps the delivery count (the KV counter; JetStream's own count,
//!   which also counts lock expiries, is not used: `max_deliver` is unlimited);
//! - the lock is the hub's (60 s); a lock that expires is released with a NAK (no count bump),
//!   and a settle after it answers `LockLost`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;

use hubmsg_core::hub::c2d::{self, AckMode, C2dLimits, Event, FeedbackRecord, FeedbackStatus, Settle, State};
use hubmsg_core::message::now_ms;
use hubmsg_core::{Error, ErrorKind, Result};

use super::{await_ack, is_conflict, js_code, js_err, kv_put_ttl, submit, Inner, LEASES, MAX_MSGS_PER_SUBJECT};
use crate::backend::{BoxFut, C2dDelivery, C2dEnqueue, C2dQueues, DeviceQueue, Feedback, FeedbackBatch, Settled};
use crate::names::{self, C2dMsgState, Decision};

const H_ID: &str = "Hubmsg-Message-Id";
const H_ACK: &str = "Hubmsg-Ack";
const H_ENQUEUED: &str = "Hubmsg-Enqueued";
const H_EXPIRY: &str = "Hubmsg-Expiry";
const H_GENERATION: &str = "Hubmsg-Generation";

/// What the headers of a C2D message say.
#[derive(Debug, Clone)]
struct Meta {
    message_id: String,
    ack: AckMode,
    enqueued_ms: u64,
    expiry_ms: u64,
    generation_id: String,
}

impl Meta {
    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(H_ID, names::token(&self.message_id).as_str());
        h.insert(H_ACK, self.ack.as_str());
        h.insert(H_ENQUEUED, self.enqueued_ms.to_string().as_str());
        h.insert(H_EXPIRY, self.expiry_ms.to_string().as_str());
        h.insert(H_GENERATION, self.generation_id.as_str());
        h
    }

    fn parse(h: Option<&HeaderMap>) -> Result<Meta> {
        let h = h.ok_or_else(|| Error::new(ErrorKind::Storage, "C2D message without headers"))?;
        let get = |k: &str| {
            h.get(k).map(|v| v.as_str().to_string()).ok_or_else(|| Error::new(ErrorKind::Storage, format!("C2D message without {k}")))
        };
        let num = |k: &str| get(k)?.parse::<u64>().map_err(|e| Error::new(ErrorKind::Storage, format!("C2D header {k}: {e}")));
        Ok(Meta {
            message_id: names::untoken(&get(H_ID)?)?,
            ack: get(H_ACK)?.parse()?,
            enqueued_ms: num(H_ENQUEUED)?,
            expiry_ms: num(H_EXPIRY)?,
            generation_id: get(H_GENERATION)?,
        })
    }
}

/// How a message whose outcome is decided leaves the stream.
enum Removal<'a> {
    /// Through the device consumer (complete = double ack, others = term).
    Acker(&'a Acker),
    /// Directly by sequence number (sweeper).
    Delete,
    /// By a subject purge that follows (purge); the outcome notifications are collected here
    /// and published once the purge removed the messages.
    Purge(&'a Mutex<Vec<Bytes>>),
}

pub(crate) struct NatsC2d {
    inner: Arc<Inner>,
    sweeper_rev: Mutex<Option<u64>>,
    last_sweep: Mutex<Option<std::time::Instant>>,
}

impl NatsC2d {
    pub(crate) fn new(inner: Arc<Inner>) -> NatsC2d {
        NatsC2d { inner, sweeper_rev: Mutex::new(None), last_sweep: Mutex::new(None) }
    }

    /// Gives up the sweeper lease (on close), so another node takes over at once.
    pub(crate) async fn release_sweeper(&self) {
        let rev = self.sweeper_rev.lock().take();
        if let Some(rev) = rev {
            let _ = self.inner.leases.delete_expect_revision(names::SWEEPER_KEY, Some(rev)).await;
        }
    }

    /// Takes or renews the sweeper lease; whether this node sweeps now.
    async fn sweeper_lease(&self) -> bool {
        let lease = self.inner.cfg.lease_ttl;
        let node = Bytes::from(self.inner.cfg.node.clone());
        let held = *self.sweeper_rev.lock();
        let expect = match held {
            Some(rev) => rev,
            None => match self.inner.leases.entry(names::SWEEPER_KEY).await {
                Ok(None) => 0,
                Ok(Some(e)) if e.operation != async_nats::jetstream::kv::Operation::Put => e.revision,
                _ => return false,
            },
        };
        match kv_put_ttl(&self.inner.js, LEASES, names::SWEEPER_KEY, node, lease, Some(expect)).await {
            Ok(rev) => {
                *self.sweeper_rev.lock() = Some(rev);
                true
            }
            Err(_) => {
                *self.sweeper_rev.lock() = None;
                false
            }
        }
    }

    async fn stream(&self) -> Result<async_nats::jetstream::stream::Stream<()>> {
        self.inner.js.get_stream_no_info(names::C2D_STREAM).await.map_err(|e| js_err("opening the C2D stream", e))
    }
}

/// The messages of one device queue in order (at most `max_queue`, read from the stream leader).
async fn queue_of(
    stream: &async_nats::jetstream::stream::Stream<()>,
    device: &str,
) -> Result<Vec<async_nats::jetstream::message::StreamMessage>> {
    let subject = names::c2d_subject(device);
    let mut out = Vec::new();
    let mut seq = 1;
    loop {
        match stream.raw_message_builder().sequence(seq).next_by_subject(subject.clone()).send().await {
            Ok(m) => {
                seq = m.sequence + 1;
                out.push(m);
            }
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(out),
            Err(e) => return Err(js_err("reading a C2D queue", e)),
        }
    }
}

/// Reads the KV state of (device, seq): the state and its revision (0 = none yet).
async fn read_state(inner: &Inner, device: &str, seq: u64) -> Result<(C2dMsgState, u64)> {
    let key = names::c2d_state_key(device, seq);
    match inner.c2d_state.entry(&key).await.map_err(|e| js_err("reading C2D state", e))? {
        Some(e) if e.operation == async_nats::jetstream::kv::Operation::Put => {
            let s = serde_json::from_slice(&e.value)
                .map_err(|err| Error::new(ErrorKind::Storage, format!("corrupt C2D state {key}: {err}")))?;
            Ok((s, e.revision))
        }
        Some(e) => Ok((C2dMsgState::default(), e.revision)),
        None => Ok((C2dMsgState::default(), 0)),
    }
}

/// Applies a settle or a forced outcome to (device, seq) and, if terminal, finishes the message.
async fn apply(
    inner: &Inner,
    device: &str,
    seq: u64,
    meta: &Meta,
    decide: impl Fn(&C2dMsgState) -> Decision,
    removal: Removal<'_>,
) -> Result<Settled> {
    let key = names::c2d_state_key(device, seq);
    for _ in 0..16 {
        let (state, rev) = read_state(inner, device, seq).await?;
        match decide(&state) {
            Decision::AlreadyDone(status) => {
                finish(inner, device, seq, meta, status, removal, false).await?;
                return Ok(Settled::Done(status));
            }
            Decision::Write(next) => {
                let body = Bytes::from(serde_json::to_vec(&next).expect("state serializes"));
                let r = if rev == 0 {
                    inner
                        .c2d_state
                        .create(&key, body)
                        .await
                        .map(|_| ())
                        .map_err(|e| (e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists, e.to_string()))
                } else {
                    inner.c2d_state.update(&key, body, rev).await.map(|_| ()).map_err(|e| (is_conflict(&e), e.to_string()))
                };
                match r {
                    Ok(()) => {}
                    Err((true, _)) => continue,
                    Err((false, e)) => return Err(js_err("writing C2D state", e)),
                }
                return match next.outcome {
                    Some(status) => {
                        finish(inner, device, seq, meta, status, removal, true).await?;
                        Ok(Settled::Done(status))
                    }
                    None => {
                        if let Removal::Acker(a) = removal {
                            a.ack_with(AckKind::Nak(None)).await.map_err(|e| js_err("returning a C2D message", e))?;
                        }
                        Ok(Settled::Requeued(next.abandons))
                    }
                };
            }
        }
    }
    Err(Error::new(ErrorKind::Storage, format!("C2D message {seq} of '{device}' kept changing under concurrent settles; try again")))
}

/// Writes the feedback record and the outcome (if asked), counts it (first claimer only), and
/// removes the message from the stream.
async fn finish(
    inner: &Inner,
    device: &str,
    seq: u64,
    meta: &Meta,
    status: FeedbackStatus,
    removal: Removal<'_>,
    first: bool,
) -> Result<()> {
    let notification = if meta.ack.wants(status) {
        let rec = c2d::feedback_record(&meta.message_id, device, &meta.generation_id, status, now_ms());
        let body = Bytes::from(serde_json::to_vec(&rec).expect("feedback serializes"));
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("{}.{seq}", names::token(device)).as_str());
        let deadline = tokio::time::Instant::now() + inner.cfg.append_timeout;
        let first_try = submit(&inner.js, names::FEEDBACK_SUBJECT, &h, &body).await;
        await_ack(&inner.js, names::FEEDBACK_SUBJECT, &h, &body, first_try, deadline).await.map_err(|e| js_err("writing feedback", e))?;
        Some(body)
    } else {
        None
    };
    if first {
        if let Err(e) = super::registry::add_counter(&inner.counters, &format!("c2d.{}", status.as_str()), 1).await {
            tracing::warn!(error = %e, "counting a C2D outcome failed");
        }
    }
    match removal {
        Removal::Acker(a) => {
            let r = if status == FeedbackStatus::Success { a.double_ack().await } else { a.ack_with(AckKind::Term).await };
            // The message may already be gone (purged, swept): its outcome is recorded.
            if let Err(e) = r {
                tracing::debug!(device, seq, error = %e, "removing a settled C2D message");
            }
        }
        Removal::Delete => {
            let stream = inner.js.get_stream_no_info(names::C2D_STREAM).await.map_err(|e| js_err("opening the C2D stream", e))?;
            if let Err(e) = stream.delete_message(seq).await {
                tracing::debug!(device, seq, error = %e, "deleting an expired C2D message");
            }
        }
        Removal::Purge(later) => {
            later.lock().extend(notification);
            return Ok(());
        }
    }
    // Durable in the feedback stream, counted and out of the queue (as on the embedded hub,
    // where the notification follows the commit that removed the message): now every node's
    // waiting connections hear of it. A lost publish costs only the notification (the record
    // stays in the shared queue and the waiting call times out), so it is not retried.
    if let Some(body) = notification {
        notify(inner, body).await;
    }
    Ok(())
}

/// Publishes a feedback record on [`names::OUTCOMES_SUBJECT`] for every node's watchers.
async fn notify(inner: &Inner, body: Bytes) {
    if let Err(e) = inner.client.publish(names::OUTCOMES_SUBJECT, body).await {
        tracing::warn!(error = %e, "publishing an outcome notification failed");
    }
}

impl C2dQueues for NatsC2d {
    fn limits(&self) -> &C2dLimits {
        &self.inner.cfg.c2d
    }

    fn send(&self, msg: C2dEnqueue) -> BoxFut<'_, u64> {
        Box::pin(async move {
            let limits = &self.inner.cfg.c2d;
            let now = now_ms();
            // Core's own validation (size, TTL range, default TTL) on an empty queue; the depth
            // limit is the stream's max_msgs_per_subject.
            let ev = State::default().enqueue(
                limits,
                &msg.device_id,
                &msg.generation_id,
                msg.message_id.clone(),
                msg.ack,
                msg.ttl,
                Vec::new(),
                msg.size,
                now,
            )?;
            let Event::Enqueue { entry, .. } = ev else { return Err(Error::new(ErrorKind::Internal, "enqueue built no Enqueue event")) };
            let meta = Meta {
                message_id: msg.message_id,
                ack: msg.ack,
                enqueued_ms: now,
                expiry_ms: entry.expiry_ms,
                generation_id: msg.generation_id,
            };
            let mut h = meta.headers();
            // A repeated send (same send id) within the stream's de-dup window answers with the
            // first copy's sequence number and queues nothing.
            let dedup = match &msg.send_id {
                Some(id) => format!("{}.s.{}", names::token(&msg.device_id), names::token(id)),
                None => uuid::Uuid::new_v4().to_string(),
            };
            h.insert("Nats-Msg-Id", dedup.as_str());
            let subject = names::c2d_subject(&msg.device_id);
            let deadline = tokio::time::Instant::now() + self.inner.cfg.append_timeout;
            let first = submit(&self.inner.js, &subject, &h, &msg.record).await;
            match await_ack(&self.inner.js, &subject, &h, &msg.record, first, deadline).await {
                Ok(ack) => Ok(ack.sequence),
                Err(e) if js_code(&e) == Some(MAX_MSGS_PER_SUBJECT) => Err(Error::new(
                    ErrorKind::QueueFull,
                    format!(
                        "device '{}' has {} pending messages (limit {}); wait for it to complete some or purge its queue (403004)",
                        msg.device_id, limits.max_queue, limits.max_queue
                    ),
                )),
                Err(e) => Err(js_err("C2D enqueue", e)),
            }
        })
    }

    fn open_device<'a>(&'a self, device_id: &'a str, _conn: u64, window: usize) -> BoxFut<'a, Box<dyn DeviceQueue>> {
        Box::pin(async move {
            let stream = self.stream().await?;
            let name = names::c2d_consumer(device_id);
            // Recreating the consumer releases every lock an earlier session held, on any node.
            let _ = stream.delete_consumer(&name).await;
            let limits = &self.inner.cfg.c2d;
            let consumer: async_nats::jetstream::consumer::PullConsumer = stream
                .create_consumer(pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: names::c2d_subject(device_id),
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::Explicit,
                    // The hub enforces the lock; this only bounds a dead node's hold.
                    ack_wait: limits.lock + Duration::from_secs(5),
                    max_deliver: -1,
                    max_ack_pending: window.max(1) as i64,
                    inactive_threshold: Duration::from_secs(3600),
                    // A WorkQueue stream refuses consumers with fewer replicas than the
                    // stream (10134), so this is an R3 consumer: one Raft group per connected
                    // device (docs/scale-out.md, gap 5).
                    num_replicas: self.inner.cfg.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| js_err("creating a C2D delivery consumer", e))?;
            let messages = super::pull_messages(&consumer, window.clamp(1, 100), "reading a C2D queue").await?;
            Ok(Box::new(NatsDeviceQueue {
                inner: self.inner.clone(),
                device: device_id.to_string(),
                name,
                messages,
                stash: None,
                held: HashMap::new(),
            }) as Box<dyn DeviceQueue>)
        })
    }

    fn purge<'a>(&'a self, device_id: &'a str) -> BoxFut<'a, usize> {
        Box::pin(async move {
            let stream = self.stream().await?;
            let queue = queue_of(&stream, device_id).await?;
            let Some(last) = queue.last().map(|m| m.sequence) else { return Ok(0) };
            let notifications = Mutex::new(Vec::new());
            let mut purged = 0;
            for m in &queue {
                let meta = Meta::parse(Some(&m.headers))?;
                let claim = |s: &C2dMsgState| names::claim(s, FeedbackStatus::Purged);
                // A message whose outcome was decided before (its removal through the consumer
                // is not applied to the stream yet) keeps that outcome and is not counted.
                if apply(&self.inner, device_id, m.sequence, &meta, claim, Removal::Purge(&notifications)).await?
                    == Settled::Done(FeedbackStatus::Purged)
                {
                    purged += 1;
                }
            }
            // Only what was read (and got its feedback) goes: later sends are kept.
            stream.purge().filter(names::c2d_subject(device_id)).sequence(last + 1).await.map_err(|e| js_err("purging a C2D queue", e))?;
            for body in notifications.into_inner() {
                notify(&self.inner, body).await;
            }
            Ok(purged)
        })
    }

    fn depth<'a>(&'a self, device_id: &'a str) -> BoxFut<'a, usize> {
        Box::pin(async move {
            let stream = self.stream().await?;
            let subject = names::c2d_subject(device_id);
            let mut subjects = stream.info_with_subjects(&subject).await.map_err(|e| js_err("reading a C2D queue depth", e))?;
            let mut n = 0;
            while let Some(s) = subjects.next().await {
                let (subj, count) = s.map_err(|e| js_err("reading a C2D queue depth", e))?;
                if subj == subject {
                    n += count;
                }
            }
            Ok(n)
        })
    }

    fn total_depth(&self) -> BoxFut<'_, u64> {
        Box::pin(async move {
            let mut stream = self.inner.js.get_stream(names::C2D_STREAM).await.map_err(|e| js_err("opening the C2D stream", e))?;
            Ok(stream.info().await.map_err(|e| js_err("reading the C2D stream", e))?.state.messages)
        })
    }

    fn sweep(&self) -> BoxFut<'_, usize> {
        Box::pin(async move {
            // A sweep reads every queued message: at most one per second, whatever the hub's
            // sweep interval.
            {
                let mut last = self.last_sweep.lock();
                if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                    return Ok(0);
                }
                *last = Some(std::time::Instant::now());
            }
            if !self.sweeper_lease().await {
                return Ok(0);
            }
            let stream = self.stream().await?;
            let mut subjects = stream.info_with_subjects("hubmsg.c2d.>").await.map_err(|e| js_err("listing C2D queues", e))?;
            let mut devices = Vec::new();
            while let Some(s) = subjects.next().await {
                let (subj, _) = s.map_err(|e| js_err("listing C2D queues", e))?;
                if let Some(t) = subj.strip_prefix("hubmsg.c2d.") {
                    devices.push(names::untoken(t)?);
                }
            }
            let now = now_ms();
            let mut expired = 0;
            for device in devices {
                for m in queue_of(&stream, &device).await? {
                    let meta = match Meta::parse(Some(&m.headers)) {
                        Ok(meta) => meta,
                        Err(e) => {
                            tracing::error!(device, seq = m.sequence, error = %e, "undecodable C2D message left in place");
                            continue;
                        }
                    };
                    if meta.expiry_ms > now {
                        continue;
                    }
                    let claim = |s: &C2dMsgState| names::claim(s, FeedbackStatus::Expired);
                    if let Settled::Done(FeedbackStatus::Expired) =
                        apply(&self.inner, &device, m.sequence, &meta, claim, Removal::Delete).await?
                    {
                        expired += 1;
                    }
                }
            }
            Ok(expired)
        })
    }

    fn set_subscription<'a>(&'a self, device_id: &'a str, on: bool) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let key = names::subscription_key(device_id);
            if on {
                self.inner.sessions.put(&key, Bytes::from_static(b"1")).await.map_err(|e| js_err("recording a C2D subscription", e))?;
            } else {
                self.inner.sessions.delete(&key).await.map_err(|e| js_err("dropping a C2D subscription", e))?;
            }
            Ok(())
        })
    }

    fn subscribed<'a>(&'a self, device_id: &'a str) -> BoxFut<'a, bool> {
        Box::pin(async move {
            let v =
                self.inner.sessions.get(names::subscription_key(device_id)).await.map_err(|e| js_err("reading a C2D subscription", e))?;
            Ok(v.is_some_and(|v| !v.is_empty()))
        })
    }
}

struct Held {
    acker: Acker,
    meta: Meta,
    until_ms: u64,
}

struct NatsDeviceQueue {
    inner: Arc<Inner>,
    device: String,
    name: String,
    messages: async_nats::jetstream::consumer::pull::Stream,
    /// A message taken from the consumer and not yet handed out (so `next` is cancel-safe).
    stash: Option<(async_nats::Message, Acker, u64)>,
    held: HashMap<u64, Held>,
}

impl DeviceQueue for NatsDeviceQueue {
    fn next(&mut self, wait: Duration) -> BoxFut<'_, Option<C2dDelivery>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                // Cancel-safe: a message taken from the consumer waits in `stash` until it is
                // handed out or finished, so a dropped call loses nothing.
                if self.stash.is_none() {
                    let m = match tokio::time::timeout_at(deadline, self.messages.next()).await {
                        Err(_) => return Ok(None),
                        Ok(None) => return Err(Error::closed("C2D delivery consumer")),
                        Ok(Some(r)) => r.map_err(|e| js_err("reading a C2D queue", e))?,
                    };
                    let seq = m.info().map_err(|e| Error::protocol(format!("JetStream delivery without metadata: {e}")))?.stream_sequence;
                    let (msg, acker) = m.split();
                    self.stash = Some((msg, acker, seq));
                }
                let (msg, acker, seq) = self.stash.as_ref().expect("stashed");
                let seq = *seq;
                let meta = match Meta::parse(msg.headers.as_ref()) {
                    Ok(meta) => meta,
                    Err(e) => {
                        tracing::error!(device = %self.device, seq, error = %e, "undecodable C2D message rejected");
                        let _ = acker.ack_with(AckKind::Term).await;
                        self.stash = None;
                        continue;
                    }
                };
                let (state, _) = read_state(&self.inner, &self.device, seq).await?;
                if state.outcome.is_some() || meta.expiry_ms <= now_ms() {
                    // Decided earlier (finish it) or expired at the head: never delivered.
                    let how = |s: &C2dMsgState| names::decide(s, Settle::Expire, true, u32::MAX);
                    apply(&self.inner, &self.device, seq, &meta, how, Removal::Acker(acker)).await?;
                    self.stash = None;
                    continue;
                }
                let what = c2d::DeliveryOf {
                    seq,
                    message_id: &meta.message_id,
                    ack: meta.ack,
                    enqueued_ms: meta.enqueued_ms,
                    expiry_ms: meta.expiry_ms,
                    delivery_count: state.abandons,
                };
                let why = match c2d::build_delivery(&self.device, &msg.payload, &what) {
                    Ok((message, publish)) => match c2d::undeliverable(&publish) {
                        None => {
                            let (_, acker, _) = self.stash.take().expect("stashed");
                            let until_ms = now_ms() + self.inner.cfg.c2d.lock.as_millis() as u64;
                            self.held.insert(seq, Held { acker, meta, until_ms });
                            return Ok(Some(C2dDelivery { seq, message, publish }));
                        }
                        Some(why) => why,
                    },
                    Err(e) => format!("its record cannot be decoded: {e}"),
                };
                // Dead-lettered (Rejected) so it never costs the device its connection.
                tracing::warn!(device = %self.device, seq, reason = %why, "dead-lettering an undeliverable C2D message");
                let how = |s: &C2dMsgState| names::decide(s, Settle::TooLarge, false, u32::MAX);
                apply(&self.inner, &self.device, seq, &meta, how, Removal::Acker(acker)).await?;
                self.stash = None;
            }
        })
    }

    fn settle(&mut self, seq: u64, how: Settle) -> BoxFut<'_, Settled> {
        Box::pin(async move {
            let why = format!("message {seq} of '{}' is not locked by this session (412002)", self.device);
            let lost = || Error::new(ErrorKind::LockLost, why.clone());
            let Some(h) = self.held.remove(&seq) else { return Err(lost()) };
            let now = now_ms();
            if h.until_ms <= now {
                let _ = h.acker.ack_with(AckKind::Nak(None)).await;
                return Err(lost());
            }
            let max = self.inner.cfg.c2d.max_delivery_count;
            let expired = h.meta.expiry_ms <= now;
            let decide = |s: &C2dMsgState| names::decide(s, how, expired, max);
            apply(&self.inner, &self.device, seq, &h.meta, decide, Removal::Acker(&h.acker)).await
        })
    }

    fn expire_locks(&mut self) -> BoxFut<'_, Vec<u64>> {
        Box::pin(async move {
            let now = now_ms();
            let gone: Vec<u64> = self.held.iter().filter(|(_, h)| h.until_ms <= now).map(|(s, _)| *s).collect();
            for seq in &gone {
                if let Some(h) = self.held.remove(seq) {
                    h.acker.ack_with(AckKind::Nak(None)).await.map_err(|e| js_err("releasing an expired C2D lock", e))?;
                }
            }
            Ok(gone)
        })
    }

    fn close(self: Box<Self>) -> BoxFut<'static, ()> {
        Box::pin(async move {
            let this = *self;
            drop(this.messages);
            let stream = this.inner.js.get_stream_no_info(names::C2D_STREAM).await.map_err(|e| js_err("opening the C2D stream", e))?;
            // Deleting the consumer returns every message it held to the queue at once.
            let _ = stream.delete_consumer(&this.name).await;
            Ok(())
        })
    }
}

pub(crate) struct NatsFeedback {
    inner: Arc<Inner>,
    consumer: async_nats::jetstream::consumer::PullConsumer,
    next_id: AtomicU64,
    /// Batch id → (connection, ackers).
    batches: Mutex<HashMap<u64, (u64, Vec<Acker>)>>,
    /// When this node last handed out a batch (`None` since start): the "previous send" of
    /// core's batching rule (`c2d::batch_due`), kept per node.
    last_sent_ms: Mutex<Option<u64>>,
}

impl NatsFeedback {
    pub(crate) async fn open(inner: Arc<Inner>) -> Result<NatsFeedback> {
        let stream = inner.js.get_stream_no_info(names::FEEDBACK_STREAM).await.map_err(|e| js_err("opening the feedback stream", e))?;
        let consumer = stream
            .get_or_create_consumer(
                names::FEEDBACK_CONSUMER,
                pull::Config {
                    durable_name: Some(names::FEEDBACK_CONSUMER.into()),
                    ack_policy: AckPolicy::Explicit,
                    // IoT Hub's feedback queue: 60 s lock, 10 deliveries.
                    ack_wait: inner.cfg.c2d.lock,
                    max_deliver: 10,
                    num_replicas: inner.cfg.replicas,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| js_err("creating the feedback consumer", e))?;
        Ok(NatsFeedback {
            inner,
            consumer,
            next_id: AtomicU64::new(1),
            batches: Mutex::new(HashMap::new()),
            last_sent_ms: Mutex::new(None),
        })
    }

    /// Pulls up to `max` feedback records into `records` / `ackers`: waiting up to `expires` for
    /// them, or (`expires` = `None`) only those available now.
    async fn pull(&self, max: usize, expires: Option<Duration>, records: &mut Vec<FeedbackRecord>, ackers: &mut Vec<Acker>) -> Result<()> {
        if max == 0 {
            return Ok(());
        }
        let mut batch = match expires {
            Some(e) => self.consumer.batch().max_messages(max).expires(e).messages().await,
            None => self.consumer.fetch().max_messages(max).messages().await,
        }
        .map_err(|e| js_err("fetching feedback", e))?;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| js_err("fetching feedback", e))?;
            let (msg, acker) = m.split();
            match serde_json::from_slice::<FeedbackRecord>(&msg.payload) {
                Ok(r) => {
                    records.push(r);
                    ackers.push(acker);
                }
                Err(e) => {
                    tracing::error!(error = %e, "malformed feedback record dropped");
                    let _ = acker.ack_with(AckKind::Term).await;
                }
            }
        }
        Ok(())
    }
}

/// Hands every record heard on [`names::OUTCOMES_SUBJECT`] to the hub's outcome notifications.
pub(crate) async fn relay_outcomes(mut sub: async_nats::Subscriber, sink: Arc<Mutex<Option<crate::backend::OutcomeSink>>>) {
    while let Some(m) = sub.next().await {
        match serde_json::from_slice::<FeedbackRecord>(&m.payload) {
            Ok(r) => {
                let s = sink.lock().clone();
                if let Some(s) = s {
                    s(r);
                }
            }
            Err(e) => tracing::warn!(error = %e, "malformed outcome notification ignored"),
        }
    }
}

impl Feedback for NatsFeedback {
    fn next_batch(&self, conn: u64, interval: Duration) -> BoxFut<'_, Option<FeedbackBatch>> {
        Box::pin(async move {
            let max = self.inner.cfg.c2d.feedback_batch.max(1);
            let mut records = Vec::new();
            let mut ackers = Vec::new();
            // Wait for the first record, then apply IoT Hub's rule as the embedded backend does
            // (`c2d::batch_due`): at once when the previous batch left at least `interval` ago,
            // with whatever else is already there; otherwise keep pulling until `max` arrived
            // or the interval since the previous batch ended.
            self.pull(1, Some(interval.max(Duration::from_millis(100))), &mut records, &mut ackers).await?;
            if records.is_empty() {
                return Ok(None);
            }
            let now = now_ms();
            let last = *self.last_sent_ms.lock();
            let more = match c2d::batch_due(records.len(), max, last, interval.as_millis() as u64, now) {
                c2d::BatchDue::At(t) => Some(Duration::from_millis(t.saturating_sub(now)).max(Duration::from_millis(10))),
                _ => None,
            };
            // The record in hand goes out even if pulling the rest fails (they stay queued).
            if let Err(e) = self.pull(max - records.len(), more, &mut records, &mut ackers).await {
                tracing::debug!(error = %e, "fetching more feedback for a batch failed; sending what arrived");
            }
            *self.last_sent_ms.lock() = Some(now_ms());
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            self.batches.lock().insert(id, (conn, ackers));
            Ok(Some(FeedbackBatch { id, records }))
        })
    }

    fn ack_batch(&self, id: u64) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let Some((_, ackers)) = self.batches.lock().remove(&id) else { return Ok(()) };
            for a in &ackers {
                a.ack().await.map_err(|e| js_err("acknowledging feedback", e))?;
            }
            self.inner.client.flush().await.map_err(|e| js_err("acknowledging feedback", e))?;
            Ok(())
        })
    }

    fn release(&self, conn: u64) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let mine: Vec<Vec<Acker>> = {
                let mut b = self.batches.lock();
                let ids: Vec<u64> = b.iter().filter(|(_, (c, _))| *c == conn).map(|(id, _)| *id).collect();
                ids.into_iter().filter_map(|id| b.remove(&id)).map(|(_, a)| a).collect()
            };
            for a in mine.iter().flatten() {
                let _ = a.ack_with(AckKind::Nak(None)).await;
            }
            Ok(())
        })
    }

    fn pending(&self) -> BoxFut<'_, u64> {
        Box::pin(async move {
            let mut stream =
                self.inner.js.get_stream(names::FEEDBACK_STREAM).await.map_err(|e| js_err("opening the feedback stream", e))?;
            Ok(stream.info().await.map_err(|e| js_err("reading the feedback stream", e))?.state.messages)
        })
    }

    fn on_outcome(&self, sink: crate::backend::OutcomeSink) {
        *self.inner.outcome_sink.lock() = Some(sink);
    }
}
