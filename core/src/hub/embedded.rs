//! The embedded backend (the default): the hub's own stores in its data directory — the
//! partitioned [`events::EventLog`], [`events::Groups`] checkpoints, the [`c2d::C2d`] queues and
//! feedback, the [`Registry`] — behind the [`backend`](super::backend) interface. Thin adapters:
//! the stores keep their behaviour and speed, and the one hub code path serves both backends.
//!
//! Invariants: the partition count is fixed by `hub.json` when the data directory is created;
//! a D2C ticket resolves only once its record is durable in the partition; only the current
//! owner's acknowledgements move a group's checkpoint (a former owner's are ignored by
//! [`events::Groups::advance`]); every registry change made through this backend is announced on
//! [`RegistryStore::watch`]; claims are in-process (one node).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use super::backend::{
    AppendTicket, Appended, Backend, Bounds, BoxFut, C2dDelivery, C2dEnqueue, C2dQueues, ConsumerGroups, Counters, DeviceQueue, EventLog,
    Feedback, FeedbackBatch, LocalClaims, Membership, PartitionReader, RegistryChange, RegistryStore, SessionClaim, Sessions, Settled,
    StoredEvent,
};
use super::c2d::{self, C2dLimits, Settle};
use super::events;
use super::{HubConfig, Registry};
use crate::error::{Error, ErrorKind, Result};
use crate::message::now_ms;
use crate::proto::{CreateDevice, DeviceIdentity, DeviceStatus, Policy, StartPosition};

#[derive(Serialize, Deserialize)]
struct Meta {
    partitions: u32,
}

/// The embedded backend of one hub.
pub struct Embedded {
    /// The data directory's lock, held until [`Backend::close`] (or the drop).
    dir_lock: Mutex<Option<Box<dyn std::any::Any + Send + Sync>>>,
    config: HubConfig,
    registry: Registry,
    changes: broadcast::Sender<RegistryChange>,
    events: Arc<events::EventLog>,
    groups: Arc<events::Groups>,
    c2d: Arc<c2d::C2d>,
    claims: LocalClaims,
    next_claim: AtomicU64,
    next_member: AtomicU64,
    counters: Mutex<BTreeMap<String, u64>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Reads or records the partition count of `dir` (fixed at creation); returns the count in force.
fn fixed_partitions(dir: &std::path::Path, requested: u32) -> Result<u32> {
    let meta_path = dir.join("hub.json");
    match std::fs::read(&meta_path) {
        Ok(b) => {
            let meta: Meta =
                serde_json::from_slice(&b).map_err(|e| Error::new(ErrorKind::Storage, format!("{}: {e}", meta_path.display())))?;
            if meta.partitions != requested {
                tracing::warn!(existing = meta.partitions, requested, "partition count is fixed at creation; using the existing one");
            }
            Ok(meta.partitions)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if requested == 0 || requested > 128 {
                return Err(Error::invalid("partitions must be between 1 and 128"));
            }
            let b = serde_json::to_vec(&Meta { partitions: requested }).expect("meta serializes");
            crate::store::io::write_atomic(&*crate::store::io::real(), &meta_path, &b, false)?;
            Ok(requested)
        }
        Err(e) => Err(Error::storage(format!("read {}", meta_path.display()), e)),
    }
}

impl Embedded {
    /// Opens (creating on first start) the stores in `config.data_dir` and starts the
    /// checkpoint and retention loops.
    pub async fn open(config: &HubConfig) -> Result<Arc<Embedded>> {
        let dir = config.data_dir.clone();
        let fs = crate::store::io::real();
        crate::store::io::create_dir_durable(&*fs, &dir)?;
        let lock = crate::store::io::lock_dir(&*fs, &dir, "hub data directory")?;
        let partitions = fixed_partitions(&dir, config.partitions)?;
        let c = config.clone();
        let registry = tokio::task::spawn_blocking(move || Registry::open(&c.data_dir.join("registry"), c.durability))
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("registry open task: {e}")))??;
        let groups = events::Groups::open(&dir.join("checkpoints"), partitions, config.durability)?;
        // No partition hands out a sequence number a consumer group's checkpoint has seen.
        let floors: Vec<u64> = (0..partitions).map(|p| groups.max_checkpoint(p) + 1).collect();
        let events = events::EventLog::open(
            &dir.join("events"),
            partitions,
            config.durability,
            config.segment_bytes,
            config.disk_reserve_bytes,
            &floors,
        )?;
        let c2d = c2d::C2d::open(&dir.join("c2d"), config.durability, config.c2d.clone(), config.feedback_interval)?;
        let (changes, _) = broadcast::channel(1024);
        let mut config = config.clone();
        config.partitions = partitions;
        let e = Arc::new(Embedded {
            dir_lock: Mutex::new(Some(lock)),
            config,
            registry,
            changes,
            events,
            groups,
            c2d,
            claims: LocalClaims::default(),
            next_claim: AtomicU64::new(1),
            next_member: AtomicU64::new(1),
            counters: Mutex::new(BTreeMap::new()),
            tasks: Mutex::new(Vec::new()),
        });
        let tasks = vec![tokio::spawn(checkpoint_loop(e.clone())), tokio::spawn(retention_loop(e.clone()))];
        e.tasks.lock().extend(tasks);
        Ok(e)
    }

    /// The C2D store (inspection, in-process use).
    pub fn c2d_store(&self) -> &c2d::C2d {
        &self.c2d
    }

    /// The registry store.
    pub fn registry_store(&self) -> &Registry {
        &self.registry
    }
}

async fn checkpoint_loop(e: Arc<Embedded>) {
    let mut tick = tokio::time::interval(e.config.checkpoint_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let limit = super::guard::LogLimit::default();
    loop {
        tick.tick().await;
        if let Err(err) = e.groups.flush(&e.events).await {
            if let Some(suppressed) = limit.allow() {
                tracing::error!(error = %err, suppressed, "persisting consumer checkpoints failed; will retry");
            }
        }
    }
}

async fn retention_loop(e: Arc<Embedded>) {
    let mut tick = tokio::time::interval(e.config.retention_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = e.clone();
        let r = tokio::task::spawn_blocking(move || s.events.apply_retention(s.config.retention_age, s.config.retention_bytes)).await;
        match r {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(removed = n, "retention removed old events"),
            Ok(Err(err)) => tracing::error!(error = %err, "retention failed"),
            Err(err) => tracing::error!(error = %err, "retention task failed"),
        }
    }
}

fn ready<'a, T: Send + 'a>(r: Result<T>) -> BoxFut<'a, T> {
    Box::pin(std::future::ready(r))
}

impl Backend for Embedded {
    fn kind(&self) -> &'static str {
        "embedded"
    }
    fn events(&self) -> &dyn EventLog {
        self
    }
    fn groups(&self) -> &dyn ConsumerGroups {
        self
    }
    fn c2d(&self) -> &dyn C2dQueues {
        self
    }
    fn feedback(&self) -> &dyn Feedback {
        self
    }
    fn registry(&self) -> &dyn RegistryStore {
        self
    }
    fn sessions(&self) -> &dyn Sessions {
        self
    }
    fn counters(&self) -> &dyn Counters {
        self
    }
    fn ready(&self) -> BoxFut<'_, ()> {
        ready(Ok(()))
    }
    fn close(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            for t in self.tasks.lock().drain(..) {
                t.abort();
            }
            self.groups.flush(&self.events).await?;
            let (ev, gr, c2, reg) = (self.events.clone(), self.groups.clone(), self.c2d.clone(), self.registry.clone());
            let r = tokio::task::spawn_blocking(move || -> Result<()> {
                // Every store is closed even when one fails (the first error is reported).
                ev.close().and(gr.close()).and(c2.close()).and(reg.close())
            })
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("shutdown task: {e}")))?;
            self.dir_lock.lock().take();
            r
        })
    }
}

fn check_partition(e: &Embedded, p: u32) -> Result<()> {
    if p >= e.events.count() {
        return Err(Error::invalid(format!("partition {p} does not exist (this hub has {})", e.events.count())));
    }
    Ok(())
}

impl EventLog for Embedded {
    fn partitions(&self) -> u32 {
        self.events.count()
    }

    fn append<'a>(&'a self, partition: u32, _device_id: &'a str, _message_id: Option<&'a str>, record: Bytes) -> BoxFut<'a, AppendTicket> {
        // No de-dup here (a re-sent message is stored again: a duplicate with the same id).
        let r = check_partition(self, partition).and_then(|()| {
            let log = self.events.partition(partition).clone();
            let seq = log.append(&record)?;
            let ticket: AppendTicket = Box::pin(async move {
                log.wait_durable(seq).await?;
                Ok(Appended { seq, duplicate: false })
            });
            Ok(ticket)
        });
        ready(r)
    }

    fn read(&self, partition: u32, from: u64, max: usize) -> BoxFut<'_, Vec<StoredEvent>> {
        let r = check_partition(self, partition).and_then(|()| {
            let recs = self.events.partition(partition).read(from.max(1), max, usize::MAX)?;
            Ok(recs.into_iter().map(|r| StoredEvent { seq: r.seq, stored_ms: r.timestamp_ms, record: r.payload }).collect())
        });
        ready(r)
    }

    fn bounds(&self, partition: u32) -> BoxFut<'_, Bounds> {
        let r = check_partition(self, partition).map(|()| {
            let log = self.events.partition(partition);
            Bounds { first: log.first_seq(), last: log.last_seq() }
        });
        ready(r)
    }
}

impl ConsumerGroups for Embedded {
    fn join<'a>(&'a self, group: &'a str, _member: &'a str) -> BoxFut<'a, Box<dyn Membership>> {
        let id = self.next_member.fetch_add(1, Ordering::Relaxed);
        let r = self.groups.join(group, id).map(|assignment| {
            Box::new(EmbeddedMember {
                events: self.events.clone(),
                groups: self.groups.clone(),
                group: group.to_string(),
                id,
                assignment,
                left: std::sync::atomic::AtomicBool::new(false),
            }) as Box<dyn Membership>
        });
        ready(r)
    }
}

struct EmbeddedMember {
    events: Arc<events::EventLog>,
    groups: Arc<events::Groups>,
    group: String,
    id: u64,
    assignment: watch::Receiver<Vec<u32>>,
    left: std::sync::atomic::AtomicBool,
}

impl Membership for EmbeddedMember {
    fn assignment(&self) -> watch::Receiver<Vec<u32>> {
        self.assignment.clone()
    }

    fn open(&self, partition: u32, from: StartPosition, window: usize) -> BoxFut<'_, Box<dyn PartitionReader>> {
        let r = (|| {
            if partition >= self.events.count() {
                return Err(Error::invalid(format!("partition {partition} does not exist")));
            }
            let checkpoint = self.groups.checkpoint(&self.group, partition);
            let next = match self.events.start_seq(partition, from, checkpoint) {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(partition, error = %e, "cannot position consumer; starting at the checkpoint");
                    checkpoint.map_or(1, |s| s + 1)
                }
            };
            if from != StartPosition::Checkpoint && next > 1 {
                // An explicit start position moves the group's checkpoint, so a reconnect or a
                // takeover resumes from there rather than from an older checkpoint.
                self.groups.advance(&self.group, partition, self.id, next - 1);
            }
            let log = self.events.partition(partition).clone();
            Ok(Box::new(EmbeddedReader {
                rx: Some(log.durable()),
                log,
                wait: None,
                next,
                window: window.max(1),
                in_flight: VecDeque::new(),
                groups: self.groups.clone(),
                events: self.events.clone(),
                group: self.group.clone(),
                member: self.id,
                partition,
            }) as Box<dyn PartitionReader>)
        })();
        ready(r)
    }

    fn leave(&self) -> BoxFut<'_, ()> {
        if !self.left.swap(true, Ordering::SeqCst) {
            self.groups.leave(&self.group, self.id);
        }
        ready(Ok(()))
    }
}

impl Drop for EmbeddedMember {
    fn drop(&mut self) {
        // One process: a member dropped without leaving is gone at once.
        if !self.left.swap(true, Ordering::SeqCst) {
            self.groups.leave(&self.group, self.id);
        }
    }
}

type DurableWait = Pin<Box<dyn Future<Output = watch::Receiver<u64>> + Send>>;

struct EmbeddedReader {
    log: crate::store::Log,
    /// The durable-head watch, or the future waiting on it.
    rx: Option<watch::Receiver<u64>>,
    wait: Option<DurableWait>,
    next: u64,
    window: usize,
    /// (seq, acknowledged) in delivery order.
    in_flight: VecDeque<(u64, bool)>,
    groups: Arc<events::Groups>,
    /// For the checkpoint request (a checkpoint never points past what a partition fsync'd).
    events: Arc<events::EventLog>,
    group: String,
    member: u64,
    partition: u32,
}

impl PartitionReader for EmbeddedReader {
    fn poll_next(&mut self, cx: &mut Context<'_>, max: usize, max_bytes: usize) -> Poll<Result<Vec<StoredEvent>>> {
        loop {
            let room = self.window.saturating_sub(self.in_flight.len()).min(max);
            if room == 0 {
                // Polled again after the next acknowledgement.
                return Poll::Pending;
            }
            if let Some(rx) = &mut self.rx {
                let head = *rx.borrow_and_update();
                self.next = self.next.max(self.log.first_seq());
                if self.next <= head {
                    let recs = match self.log.read(self.next, room.min(512), max_bytes.min(1024 * 1024)) {
                        Ok(r) => r,
                        Err(e) => return Poll::Ready(Err(e)),
                    };
                    if !recs.is_empty() {
                        let out: Vec<StoredEvent> =
                            recs.into_iter().map(|r| StoredEvent { seq: r.seq, stored_ms: r.timestamp_ms, record: r.payload }).collect();
                        for e in &out {
                            self.in_flight.push_back((e.seq, false));
                        }
                        self.next = out.last().map_or(self.next, |e| e.seq + 1);
                        return Poll::Ready(Ok(out));
                    }
                }
                let mut rx = self.rx.take().expect("present");
                self.wait = Some(Box::pin(async move {
                    let _ = rx.changed().await;
                    rx
                }));
            }
            match self.wait.as_mut().expect("waiting").as_mut().poll(cx) {
                Poll::Ready(rx) => {
                    self.wait = None;
                    self.rx = Some(rx);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn ack(&mut self, seq: u64) -> BoxFut<'_, ()> {
        if let Some(e) = self.in_flight.iter_mut().find(|e| e.0 == seq) {
            e.1 = true;
        }
        let mut last = None;
        while self.in_flight.front().is_some_and(|e| e.1) {
            last = self.in_flight.pop_front().map(|e| e.0);
        }
        if let Some(s) = last {
            self.groups.advance(&self.group, self.partition, self.member, s);
        }
        ready(Ok(()))
    }

    fn checkpoint(&mut self) -> BoxFut<'_, u64> {
        Box::pin(async move {
            self.groups.flush(&self.events).await?;
            Ok(self.groups.checkpoint(&self.group, self.partition).unwrap_or(0))
        })
    }
}

impl C2dQueues for Embedded {
    fn limits(&self) -> &C2dLimits {
        self.c2d.limits()
    }

    fn send(&self, msg: C2dEnqueue) -> BoxFut<'_, u64> {
        Box::pin(async move { self.c2d.send(&msg).await })
    }

    fn open_device<'a>(&'a self, device_id: &'a str, conn: u64, _window: usize) -> BoxFut<'a, Box<dyn DeviceQueue>> {
        let q = EmbeddedDeviceQueue {
            c2d: self.c2d.clone(),
            device: device_id.to_string(),
            conn,
            wake: self.c2d.device_notify(device_id),
            held: HashSet::new(),
        };
        ready(Ok(Box::new(q) as Box<dyn DeviceQueue>))
    }

    fn purge<'a>(&'a self, device_id: &'a str) -> BoxFut<'a, usize> {
        Box::pin(self.c2d.purge(device_id))
    }

    fn delete_device<'a>(&'a self, device_id: &'a str) -> BoxFut<'a, ()> {
        Box::pin(self.c2d.delete_device(device_id))
    }

    fn depth<'a>(&'a self, device_id: &'a str) -> BoxFut<'a, usize> {
        ready(Ok(self.c2d.read(|s| s.depth(device_id))))
    }

    fn total_depth(&self) -> BoxFut<'_, u64> {
        ready(Ok(self.c2d.read(|s| s.total_depth()) as u64))
    }

    fn sweep(&self) -> BoxFut<'_, usize> {
        ready(self.c2d.sweep(self.config.feedback_ttl))
    }

    fn set_subscription<'a>(&'a self, device_id: &'a str, on: bool) -> BoxFut<'a, ()> {
        Box::pin(self.c2d.set_subscription(device_id, on))
    }

    fn subscribed<'a>(&'a self, device_id: &'a str) -> BoxFut<'a, bool> {
        ready(Ok(self.c2d.read(|s| s.subscribed(device_id))))
    }
}

struct EmbeddedDeviceQueue {
    c2d: Arc<c2d::C2d>,
    device: String,
    conn: u64,
    wake: Arc<tokio::sync::Notify>,
    /// Sequence numbers delivered to this session and not settled.
    held: HashSet<u64>,
}

impl DeviceQueue for EmbeddedDeviceQueue {
    fn next(&mut self, wait: Duration) -> BoxFut<'_, Option<C2dDelivery>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                if let Some(d) = self.c2d.take_deliverable(&self.device, self.conn) {
                    self.held.insert(d.seq);
                    return Ok(Some(d));
                }
                if tokio::time::timeout_at(deadline, self.wake.notified()).await.is_err() {
                    return Ok(None);
                }
            }
        })
    }

    fn settle(&mut self, seq: u64, how: Settle) -> BoxFut<'_, Settled> {
        let r = (|| {
            if !self.held.remove(&seq) || !self.c2d.holds_lock(&self.device, seq, self.conn) {
                return Err(Error::new(
                    ErrorKind::LockLost,
                    format!("message {seq} of '{}' is not locked by this session (412002)", self.device),
                ));
            }
            let max = self.c2d.limits().max_delivery_count;
            let now = now_ms();
            let Some((mut count, how)) = self.c2d.read(|s| {
                s.queue(&self.device).find(|e| e.seq == seq).map(|e| (e.delivery_count, c2d::effective(how, e.expiry_ms <= now)))
            }) else {
                return Err(Error::new(ErrorKind::LockLost, format!("message {seq} of '{}' is no longer queued (412002)", self.device)));
            };
            let settled = match c2d::outcome(how, &mut count, max) {
                Some(status) => Settled::Done(status),
                None => Settled::Requeued(count),
            };
            if !self.c2d.settle(&self.device, seq, how)? {
                return Err(Error::new(ErrorKind::LockLost, format!("message {seq} of '{}' is no longer queued (412002)", self.device)));
            }
            Ok(settled)
        })();
        ready(r)
    }

    fn expire_locks(&mut self) -> BoxFut<'_, Vec<u64>> {
        let gone: Vec<u64> = self.held.iter().copied().filter(|s| !self.c2d.holds_lock(&self.device, *s, self.conn)).collect();
        for s in &gone {
            self.held.remove(s);
        }
        ready(Ok(gone))
    }

    fn close(self: Box<Self>) -> BoxFut<'static, ()> {
        self.c2d.release_conn(&self.device, self.conn);
        ready(Ok(()))
    }
}

impl Feedback for Embedded {
    fn next_batch(&self, conn: u64, interval: Duration) -> BoxFut<'_, Option<FeedbackBatch>> {
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + interval;
            loop {
                let mut changed = self.c2d.feedback_watch();
                if let Some(b) = self.c2d.take_feedback(conn) {
                    return Ok(Some(FeedbackBatch { id: b.id, records: b.records }));
                }
                // Outcomes form batches as they are recorded; a partial batch held back by the
                // interval since the previous one is formed here when its time comes (not on a
                // later sweep tick).
                let now = now_ms();
                let wake = match self.c2d.form_feedback(now)? {
                    c2d::BatchDue::At(t) => deadline.min(tokio::time::Instant::now() + Duration::from_millis(t.saturating_sub(now))),
                    _ => deadline,
                };
                if tokio::time::timeout_at(wake, changed.changed()).await.is_err() && wake >= deadline {
                    return Ok(None);
                }
            }
        })
    }

    fn ack_batch(&self, id: u64) -> BoxFut<'_, ()> {
        ready(self.c2d.ack_feedback(id))
    }

    fn release(&self, conn: u64) -> BoxFut<'_, ()> {
        self.c2d.release_feedback(conn);
        ready(Ok(()))
    }

    fn pending(&self) -> BoxFut<'_, u64> {
        ready(Ok(self.c2d.read(|s| s.feedback_records()) as u64))
    }

    fn on_outcome(&self, sink: super::backend::OutcomeSink) {
        self.c2d.on_outcome(sink);
    }
}

impl RegistryStore for Embedded {
    fn device<'a>(&'a self, id: &'a str) -> BoxFut<'a, Option<DeviceIdentity>> {
        ready(Ok(self.registry.device(id)))
    }

    fn devices(&self) -> BoxFut<'_, Vec<DeviceIdentity>> {
        ready(Ok(self.registry.devices()))
    }

    fn create(&self, req: CreateDevice) -> BoxFut<'_, DeviceIdentity> {
        Box::pin(async move {
            let d = self.registry.create(req).await?;
            let _ = self.changes.send(RegistryChange::Put(d.clone()));
            Ok(d)
        })
    }

    fn update<'a>(&'a self, id: &'a str, status: Option<DeviceStatus>, regenerate: Option<&'a str>) -> BoxFut<'a, DeviceIdentity> {
        Box::pin(async move {
            let d = self.registry.update(id, status, regenerate).await?;
            let _ = self.changes.send(RegistryChange::Put(d.clone()));
            Ok(d)
        })
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.registry.delete(id).await?;
            let _ = self.changes.send(RegistryChange::Deleted(id.to_string()));
            Ok(())
        })
    }

    fn policy<'a>(&'a self, name: &'a str) -> BoxFut<'a, Option<Policy>> {
        ready(Ok(self.registry.policy(name)))
    }

    fn policies(&self) -> BoxFut<'_, Vec<Policy>> {
        ready(Ok(self.registry.policies()))
    }

    fn regenerate_policy<'a>(&'a self, name: &'a str, which: &'a str) -> BoxFut<'a, Policy> {
        Box::pin(async move {
            let p = self.registry.regenerate_policy(name, which).await?;
            let _ = self.changes.send(RegistryChange::Policy(p.clone()));
            Ok(p)
        })
    }

    fn watch(&self) -> broadcast::Receiver<RegistryChange> {
        self.changes.subscribe()
    }
}

impl Sessions for Embedded {
    fn claim<'a>(&'a self, device_id: &'a str, _conn: u64) -> BoxFut<'a, SessionClaim> {
        let rev = self.next_claim.fetch_add(1, Ordering::Relaxed);
        ready(Ok(self.claims.insert(device_id, rev)))
    }

    fn release(&self, claim: SessionClaim) -> BoxFut<'_, ()> {
        self.claims.remove(&claim);
        ready(Ok(()))
    }
}

impl Counters for Embedded {
    fn add<'a>(&'a self, name: &'a str, n: u64) -> BoxFut<'a, ()> {
        *self.counters.lock().entry(name.to_string()).or_default() += n;
        ready(Ok(()))
    }

    fn all(&self) -> BoxFut<'_, Vec<(String, u64)>> {
        // C2D outcomes come from the durable state (they survive restarts); others are this
        // process's.
        let mut all: BTreeMap<String, u64> = self.counters.lock().clone();
        self.c2d.read(|s| {
            for (k, v) in s.outcomes() {
                all.insert(format!("c2d.{k}"), *v);
            }
        });
        ready(Ok(all.into_iter().collect()))
    }
}
