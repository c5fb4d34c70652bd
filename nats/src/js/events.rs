//! D2C on JetStream: one R3 stream per partition, consumer groups as durable pull consumers per
//! (group, partition), members and partition owners as KV leases.
//!
//! Invariants: a partition is read for a group only by the member holding its owner lease
//! (`o.{group}.{p}`, created by compare-and-swap, renewed with the expected revision, expiring
//! with its TTL when the holder dies); the checkpoint is the consumer's ack floor, which
//! JetStream keeps at the contiguous acknowledged prefix; a reader opened at the checkpoint
//! redelivers at once whatever an earlier owner had in flight (the consumer is recreated at the
//! ack floor), rather than after the consumer's ack wait.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::kv;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use tokio::sync::watch;

use hubmsg_core::proto::StartPosition;
use hubmsg_core::{Error, ErrorKind, Result};

use super::{await_ack, is_conflict, js_err, kv_put_ttl, submit, Inner, LEASES};
use crate::backend::{AppendTicket, Appended, Bounds, BoxFut, ConsumerGroups, EventLog, Membership, PartitionReader, StoredEvent};
use crate::names;

pub(crate) struct NatsEvents {
    pub(crate) inner: Arc<Inner>,
}

fn check_partition(inner: &Inner, p: u32) -> Result<()> {
    if p >= inner.partitions {
        return Err(Error::invalid(format!("partition {p} does not exist (this hub has {})", inner.partitions)));
    }
    Ok(())
}

pub(crate) fn ms_of(t: time::OffsetDateTime) -> u64 {
    (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64
}

impl EventLog for NatsEvents {
    fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    fn append<'a>(&'a self, partition: u32, device_id: &'a str, message_id: Option<&'a str>, record: Bytes) -> BoxFut<'a, AppendTicket> {
        Box::pin(async move {
            check_partition(&self.inner, partition)?;
            let subject = names::d2c_subject(partition, device_id);
            let mut headers = HeaderMap::new();
            if let Some(id) = message_id {
                headers.insert("Nats-Msg-Id", names::d2c_msg_id(device_id, id).as_str());
            }
            let deadline = tokio::time::Instant::now() + self.inner.cfg.append_timeout;
            let first = submit(&self.inner.js, &subject, &headers, &record).await;
            if let Err(e) = &first {
                if e.kind() == async_nats::jetstream::context::PublishErrorKind::MaxPayloadExceeded {
                    return Err(Error::new(
                        ErrorKind::MessageTooLarge,
                        format!("D2C record of {} bytes exceeds the NATS max_payload", record.len()),
                    ));
                }
            }
            let js = self.inner.js.clone();
            let ticket: AppendTicket = Box::pin(async move {
                let ack = await_ack(&js, &subject, &headers, &record, first, deadline).await.map_err(|e| js_err("D2C append", e))?;
                Ok(Appended { seq: ack.sequence, duplicate: ack.duplicate })
            });
            Ok(ticket)
        })
    }

    fn read(&self, partition: u32, from: u64, max: usize) -> BoxFut<'_, Vec<StoredEvent>> {
        Box::pin(async move {
            check_partition(&self.inner, partition)?;
            let stream =
                self.inner.js.get_stream_no_info(names::d2c_stream(partition)).await.map_err(|e| js_err("opening a partition", e))?;
            let filter = format!("hubmsg.d2c.{partition}.>");
            let mut out = Vec::new();
            let mut seq = from.max(1);
            while out.len() < max {
                match stream.raw_message_builder().sequence(seq).next_by_subject(filter.clone()).send().await {
                    Ok(m) => {
                        seq = m.sequence + 1;
                        out.push(StoredEvent { seq: m.sequence, stored_ms: ms_of(m.time), record: m.payload });
                    }
                    Err(e) if e.kind() == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound => break,
                    Err(e) => return Err(js_err("reading a partition", e)),
                }
            }
            Ok(out)
        })
    }

    fn bounds(&self, partition: u32) -> BoxFut<'_, Bounds> {
        Box::pin(async move {
            check_partition(&self.inner, partition)?;
            let mut stream = self.inner.js.get_stream(names::d2c_stream(partition)).await.map_err(|e| js_err("opening a partition", e))?;
            let st = &stream.info().await.map_err(|e| js_err("reading a partition", e))?.state;
            Ok(Bounds { first: st.first_sequence.max(1), last: st.last_sequence })
        })
    }
}

pub(crate) struct NatsGroups {
    pub(crate) inner: Arc<Inner>,
}

struct Member {
    inner: Arc<Inner>,
    group: String,
    member: String,
    assignment: watch::Receiver<Vec<u32>>,
    stop: watch::Sender<bool>,
    task: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl ConsumerGroups for NatsGroups {
    fn join<'a>(&'a self, group: &'a str, member: &'a str) -> BoxFut<'a, Box<dyn Membership>> {
        Box::pin(async move {
            hubmsg_core::hub::events::Groups::validate_name(group)?;
            let key = names::member_key(group, hubmsg_core::message::now_ms(), member);
            let (tx, rx) = watch::channel(Vec::new());
            let (stop, stop_rx) = watch::channel(false);
            let lease = self.inner.cfg.lease_ttl;
            kv_put_ttl(&self.inner.js, LEASES, &key, Bytes::new(), lease, None).await.map_err(|e| js_err("joining a consumer group", e))?;
            let (first, first_rx) = tokio::sync::oneshot::channel();
            let task = tokio::spawn(membership_loop(self.inner.clone(), group.to_string(), member.to_string(), key, tx, stop_rx, first));
            // Return with the partitions that were free already owned (as the embedded hub's join
            // does): the session applies its start position to the first assignment it sees, and
            // an empty one would leave every partition to open later at the checkpoint instead.
            let _ = tokio::time::timeout(self.inner.cfg.request_timeout, first_rx).await;
            Ok(Box::new(Member {
                inner: self.inner.clone(),
                group: group.to_string(),
                member: member.to_string(),
                assignment: rx,
                stop,
                task: parking_lot::Mutex::new(Some(task)),
            }) as Box<dyn Membership>)
        })
    }
}

/// Keeps one member's lease and partition owner leases; publishes the owned partitions.
async fn membership_loop(
    inner: Arc<Inner>,
    group: String,
    me: String,
    key: String,
    tx: watch::Sender<Vec<u32>>,
    mut stop: watch::Receiver<bool>,
    first: tokio::sync::oneshot::Sender<()>,
) {
    let mut first = Some(first);
    let lease = inner.cfg.lease_ttl;
    let tick = (lease / 4).max(Duration::from_millis(100));
    let mut owned: BTreeMap<u32, u64> = BTreeMap::new();
    let prefix = names::member_prefix(&group);
    let owner_prefix = format!("o.{}.", names::token(&group));
    let mut watch = inner.leases.watch_many([format!("{prefix}>"), format!("{owner_prefix}>")]).await.ok();
    let mut last_beat = tokio::time::Instant::now();
    loop {
        if *stop.borrow() {
            break;
        }
        // Leases are written once per tick: a pass woken by the watch (often by this member's
        // own writes) only takes free partitions and releases moved ones.
        let now = tokio::time::Instant::now();
        let due = now >= last_beat + tick;
        if due {
            if let Err(e) = kv_put_ttl(&inner.js, LEASES, &key, Bytes::new(), lease, None).await {
                tracing::warn!(%group, member = %me, error = %e, "group heartbeat failed; will retry");
            }
            last_beat = now;
            if watch.is_none() {
                watch = inner.leases.watch_many([format!("{prefix}>"), format!("{owner_prefix}>")]).await.ok();
            }
        }
        match members(&inner.leases, &prefix).await {
            Ok(list) => {
                let assigned = names::assignment(&list, &me, inner.partitions);
                rebalance(&inner, &group, &me, &assigned, &mut owned, due).await;
                let parts: Vec<u32> = owned.keys().copied().collect();
                tx.send_if_modified(|cur| {
                    let changed = *cur != parts;
                    *cur = parts;
                    changed
                });
            }
            Err(e) => tracing::warn!(%group, error = %e, "listing group members failed; will retry"),
        }
        if let Some(f) = first.take() {
            let _ = f.send(());
        }
        // True for a change; false when the watch ended or failed (made again on the next tick,
        // so a broken watch cannot turn this loop into a busy one).
        let changed = async {
            match &mut watch {
                Some(w) => matches!(w.next().await, Some(Ok(_))),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ok = changed => {
                if !ok {
                    watch = None;
                }
            }
            _ = tokio::time::sleep(tick) => {}
            _ = stop.changed() => {}
        }
    }
    // Leave: give the partitions back at once.
    for (p, rev) in owned {
        let _ = inner.leases.delete_expect_revision(names::owner_key(&group, p), Some(rev)).await;
    }
    let _ = inner.leases.purge(&key).await;
    tx.send_replace(Vec::new());
}

/// Live members of a group, in join order.
async fn members(leases: &kv::Store, prefix: &str) -> Result<Vec<String>> {
    let keys: Vec<String> = leases
        .keys()
        .await
        .map_err(|e| js_err("listing group members", e))?
        .try_collect()
        .await
        .map_err(|e| js_err("listing group members", e))?;
    let mut mine: Vec<&String> = keys.iter().filter(|k| k.starts_with(prefix)).collect();
    mine.sort();
    mine.into_iter().map(|k| names::untoken(k.rsplit('.').next().unwrap_or(""))).collect()
}

/// Takes and releases owner leases so that `owned` converges to `assigned`, and renews the ones
/// kept when `renew` (once per tick).
async fn rebalance(inner: &Inner, group: &str, me: &str, assigned: &[u32], owned: &mut BTreeMap<u32, u64>, renew: bool) {
    let lease = inner.cfg.lease_ttl;
    let released: Vec<u32> = owned.keys().filter(|p| !assigned.contains(p)).copied().collect();
    for p in released {
        let rev = owned.remove(&p).expect("owned");
        let _ = inner.leases.delete_expect_revision(names::owner_key(group, p), Some(rev)).await;
    }
    for &p in assigned {
        let key = names::owner_key(group, p);
        let value = Bytes::from(me.to_string());
        match owned.get(&p).copied() {
            Some(_) if !renew => {}
            Some(rev) => match kv_put_ttl(&inner.js, LEASES, &key, value, lease, Some(rev)).await {
                Ok(r) => {
                    owned.insert(p, r);
                }
                Err(e) if is_conflict(&e) => {
                    tracing::warn!(group, partition = p, "lost a partition lease");
                    owned.remove(&p);
                }
                Err(e) => tracing::warn!(group, partition = p, error = %e, "renewing a partition lease failed; will retry"),
            },
            None => {
                // Free if absent or deleted (its last revision is then the delete marker's).
                let expect = match inner.leases.entry(&key).await {
                    Ok(None) => 0,
                    Ok(Some(e)) if e.operation != kv::Operation::Put => e.revision,
                    Ok(Some(_)) => continue,
                    Err(_) => continue,
                };
                if let Ok(r) = kv_put_ttl(&inner.js, LEASES, &key, value, lease, Some(expect)).await {
                    owned.insert(p, r);
                }
            }
        }
    }
}

impl Membership for Member {
    fn assignment(&self) -> watch::Receiver<Vec<u32>> {
        self.assignment.clone()
    }

    fn open(&self, partition: u32, from: StartPosition, window: usize) -> BoxFut<'_, Box<dyn PartitionReader>> {
        Box::pin(async move {
            check_partition(&self.inner, partition)?;
            if !self.assignment.borrow().contains(&partition) {
                return Err(Error::new(
                    ErrorKind::LockLost,
                    format!("member '{}' of group '{}' does not own partition {partition}", self.member, self.group),
                ));
            }
            let stream =
                self.inner.js.get_stream_no_info(names::d2c_stream(partition)).await.map_err(|e| js_err("opening a partition", e))?;
            let name = names::group_consumer(&self.group);
            let existing = stream.consumer_info(&name).await.ok();
            let start = match from {
                StartPosition::Checkpoint => match &existing {
                    None => Some(DeliverPolicy::All),
                    Some(i) if i.num_ack_pending == 0 => None,
                    // An earlier owner had events in flight: redeliver them now, from the floor.
                    Some(i) => Some(DeliverPolicy::ByStartSequence { start_sequence: i.ack_floor.stream_sequence + 1 }),
                },
                StartPosition::Earliest => Some(DeliverPolicy::All),
                StartPosition::Latest => Some(DeliverPolicy::New),
                StartPosition::Sequence(s) => Some(DeliverPolicy::ByStartSequence { start_sequence: s.max(1) }),
                StartPosition::Time(ms) => Some(DeliverPolicy::ByStartTime {
                    start_time: time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
                        .map_err(|e| Error::invalid(format!("start time {ms}: {e}")))?,
                }),
            };
            if let Some(deliver_policy) = start {
                if existing.is_some() {
                    stream.delete_consumer(&name).await.map_err(|e| js_err("repositioning a consumer group", e))?;
                }
                stream
                    .create_consumer(pull::Config {
                        durable_name: Some(name.clone()),
                        deliver_policy,
                        ack_policy: AckPolicy::Explicit,
                        ack_wait: Duration::from_secs(30),
                        max_deliver: -1,
                        max_ack_pending: window.max(1) as i64,
                        num_replicas: self.inner.cfg.replicas,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| js_err("creating a consumer group", e))?;
            }
            let consumer: async_nats::jetstream::consumer::PullConsumer =
                stream.get_consumer(&name).await.map_err(|e| js_err("opening a consumer group", e))?;
            let messages = super::pull_messages(&consumer, window.clamp(1, 1000), "reading a consumer group").await?;
            Ok(Box::new(Reader {
                inner: self.inner.clone(),
                consumer,
                messages,
                ackers: HashMap::new(),
                delivered: VecDeque::new(),
                floor: 0,
            }) as Box<dyn PartitionReader>)
        })
    }

    fn leave(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let _ = self.stop.send(true);
            let task = self.task.lock().take();
            if let Some(t) = task {
                let _ = t.await;
            }
            Ok(())
        })
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        // A member dropped without leave() stops at once, as if its node died: its leases are
        // not released and expire with their TTL (then the others take its partitions).
        if let Some(t) = self.task.lock().take() {
            t.abort();
        }
    }
}

struct Reader {
    inner: Arc<Inner>,
    consumer: async_nats::jetstream::consumer::PullConsumer,
    messages: async_nats::jetstream::consumer::pull::Stream,
    ackers: HashMap<u64, async_nats::jetstream::message::Acker>,
    /// (seq, acknowledged) in delivery order, for the contiguous prefix.
    delivered: VecDeque<(u64, bool)>,
    /// The checkpoint this reader's acknowledgements reached.
    floor: u64,
}

impl Reader {
    fn take(&mut self, m: async_nats::jetstream::Message) -> Result<StoredEvent> {
        let info = m.info().map_err(|e| Error::protocol(format!("JetStream delivery without metadata: {e}")))?;
        let (seq, stored_ms) = (info.stream_sequence, ms_of(info.published));
        let (msg, acker) = m.split();
        self.ackers.insert(seq, acker);
        self.delivered.push_back((seq, false));
        Ok(StoredEvent { seq, stored_ms, record: msg.payload })
    }
}

impl PartitionReader for Reader {
    fn poll_next(&mut self, cx: &mut std::task::Context<'_>, max: usize, max_bytes: usize) -> std::task::Poll<Result<Vec<StoredEvent>>> {
        use std::task::Poll;
        // The consumer's max_ack_pending bounds what is delivered and not acknowledged; pulled
        // messages wait in the client until taken here, so a dropped poll loses nothing.
        let mut out: Vec<StoredEvent> = Vec::new();
        let mut bytes = 0usize;
        while out.len() < max.max(1) && (out.is_empty() || bytes < max_bytes) {
            match std::pin::Pin::new(&mut self.messages).poll_next(cx) {
                Poll::Ready(Some(Ok(m))) => match self.take(m) {
                    Ok(e) => {
                        bytes += e.record.len();
                        out.push(e);
                    }
                    Err(e) if out.is_empty() => return Poll::Ready(Err(e)),
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping a JetStream delivery without metadata");
                    }
                },
                Poll::Ready(Some(Err(e))) if out.is_empty() => return Poll::Ready(Err(js_err("reading a consumer group", e))),
                Poll::Ready(None) if out.is_empty() => return Poll::Ready(Err(Error::closed("consumer group reader"))),
                Poll::Pending if out.is_empty() => return Poll::Pending,
                _ => break,
            }
        }
        Poll::Ready(Ok(out))
    }

    fn ack(&mut self, seq: u64) -> BoxFut<'_, ()> {
        Box::pin(async move {
            if let Some(a) = self.ackers.remove(&seq) {
                a.ack().await.map_err(|e| js_err("acknowledging an event", e))?;
                if let Some(d) = self.delivered.iter_mut().find(|d| d.0 == seq) {
                    d.1 = true;
                }
            }
            Ok(())
        })
    }

    fn checkpoint(&mut self) -> BoxFut<'_, u64> {
        Box::pin(async move {
            // The contiguous acknowledged prefix of what this reader delivered.
            let mut expected = None;
            while self.delivered.front().is_some_and(|d| d.1) {
                expected = self.delivered.pop_front().map(|d| d.0);
            }
            if let Some(e) = expected {
                self.floor = self.floor.max(e);
            }
            self.inner.client.flush().await.map_err(|e| js_err("flushing acknowledgements", e))?;
            // Acks are applied (and replicated) asynchronously: wait until the floor shows them.
            let deadline = tokio::time::Instant::now() + self.inner.cfg.request_timeout;
            loop {
                let floor = self.consumer.info().await.map_err(|e| js_err("reading a checkpoint", e))?.ack_floor.stream_sequence;
                if floor >= self.floor {
                    return Ok(floor);
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        format!("the consumer's ack floor is {floor}, not yet {} as acknowledged; try the checkpoint again", self.floor),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }
}
