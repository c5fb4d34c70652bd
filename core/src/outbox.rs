//! The bounded, durable at-least-once send queue used by device (D2C) and service (C2D) clients.
//!
//! Invariants:
//! - a message is accepted ([`Outbox::push`] returns) only once it is durable per the configured
//!   durability; what is durable is what the store holds on disk, and after any storage failure
//!   the outbox reloads itself from disk, so memory never claims more than the disk has;
//! - entries leave in sequence order; a message is handed to the transport as soon as it is
//!   queued, while its own fdatasync runs (the hub's PUBACK may even come first): `push` still
//!   returns only once it is durable, so a message whose `push` returned survives any crash, and
//!   one lost with an unfinished `push` was either never accepted or already at the hub — this
//!   takes the outbox's fdatasync off the delivery latency;
//! - every entry ends in exactly one [`Outcome`] (delivered, expired, dropped), and every drop and
//!   expiry is counted in [`OutboxStats`]; nothing is discarded silently;
//! - the persisted ack watermark only covers entries that reached an outcome, so a crash can only
//!   cause re-sends (duplicates with the same message id), never losses; it is written in the
//!   background by the store (after 1,024 outcomes or a second), never under the outbox's lock,
//!   and on close; drops by `drop_oldest` move it like deliveries (a dropped message comes back
//!   only after a crash within that second, never after a close);
//! - a storage failure never leaves the outbox failing until a restart: the store retries a
//!   failed write or fdatasync by itself (sends fail with `Storage` meanwhile and work again
//!   once the disk takes data), and a log that had to be poisoned is reopened on the next send.
//!
//! Where it lives: `dir`, or — for a device client given neither a directory nor `in_memory` —
//! the default directory [`OutboxOptions::default_dir`] of its hub and device id.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{oneshot, watch};

use crate::error::{Error, ErrorKind, Result};
use crate::message::{now_ms, Message};
use crate::store::{Durability, Env, Log, LogOptions, OnDamage};

/// What to do when a new message does not fit in the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Refuse the new message with a `QueueFull` error.
    Reject,
    /// Drop the oldest queued messages (counted in `dropped`, outcome [`Outcome::Dropped`]).
    DropOldest,
}

impl std::str::FromStr for Overflow {
    type Err = Error;
    /// `reject` or `drop_oldest` (also `drop-oldest`).
    fn from_str(s: &str) -> Result<Overflow> {
        match s {
            "reject" => Ok(Overflow::Reject),
            "drop_oldest" | "drop-oldest" => Ok(Overflow::DropOldest),
            _ => Err(Error::invalid(format!("overflow policy '{s}' is not one of: reject, drop_oldest"))),
        }
    }
}

/// Outbox settings.
#[derive(Debug, Clone)]
pub struct OutboxOptions {
    /// Directory of the durable outbox. `None`: a device client uses
    /// [`OutboxOptions::default_dir`] of its hub and device id (unless `in_memory`); opening an
    /// [`Outbox`] directly needs one.
    pub dir: Option<PathBuf>,
    /// Keep messages in memory only: a crash or restart loses every queued message, and
    /// `send()` returning means only "queued". Must be asked for explicitly. Default false.
    pub in_memory: bool,
    /// Most messages held (queued + in flight). Default 100,000.
    pub max_messages: usize,
    /// Most bytes held (encoded records). Default 64 MiB.
    pub max_bytes: usize,
    /// What to do when full. Default [`Overflow::Reject`].
    pub overflow: Overflow,
    /// Store durability. Default [`Durability::Always`].
    pub durability: Durability,
}

impl Default for OutboxOptions {
    fn default() -> Self {
        OutboxOptions {
            dir: None,
            in_memory: false,
            max_messages: 100_000,
            max_bytes: 64 * 1024 * 1024,
            overflow: Overflow::Reject,
            durability: Durability::Always,
        }
    }
}

impl OutboxOptions {
    /// Options for an outbox in memory only (see [`OutboxOptions::in_memory`]).
    pub fn in_memory() -> OutboxOptions {
        OutboxOptions { in_memory: true, ..OutboxOptions::default() }
    }

    /// The directory a device client without an outbox directory uses for `device_id` of the hub
    /// `host_name` (the connection string's `HostName`, port included):
    /// `$HUBMSG_OUTBOX_DIR/<host name>/<device id>` if that variable is set, else
    /// `$XDG_STATE_HOME/hubmsg/outbox/<host name>/<device id>`, else
    /// `$HOME/.local/state/hubmsg/outbox/<host name>/<device id>` (like Paho's default file
    /// persistence, one directory per server and client id: a message queued for one hub is never
    /// sent to another hub that knows the same device id). `%`, `/` and a leading `.` in either
    /// name are percent-encoded so every name maps to its own directory.
    pub fn default_dir(host_name: &str, device_id: &str) -> Result<PathBuf> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let base = var("HUBMSG_OUTBOX_DIR")
            .or_else(|| var("XDG_STATE_HOME").map(|d| d.join("hubmsg").join("outbox")))
            .or_else(|| var("HOME").map(|h| h.join(".local").join("state").join("hubmsg").join("outbox")))
            .ok_or_else(|| {
                Error::invalid(
                    "no outbox directory: set the outbox directory option, or HUBMSG_OUTBOX_DIR (or HOME), or ask for an in-memory outbox explicitly",
                )
            })?;
        Ok(base.join(path_component("host name", host_name)?).join(path_component("device id", device_id)?))
    }

    fn log_options(&self) -> LogOptions {
        // The outbox bounds itself (max_bytes); a device has no operator to repair damage, so
        // damaged data is moved aside and every valid message kept.
        LogOptions { durability: self.durability, max_pending_bytes: usize::MAX, on_damage: OnDamage::Quarantine, ..LogOptions::default() }
    }
}

/// `name` as one directory name: `%` and `/` percent-encoded, a leading `.` too (so `.` and `..`
/// stay names); empty names and NUL are refused.
fn path_component(what: &str, name: &str) -> Result<String> {
    if name.is_empty() || name.contains('\0') {
        return Err(Error::invalid(format!("{what} '{name}' cannot name an outbox directory")));
    }
    let mut out = name.replace('%', "%25").replace('/', "%2F");
    if out.starts_with('.') {
        out = format!("%2E{}", &out[1..]);
    }
    Ok(out)
}

/// How one message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The hub acknowledged it (durable at the hub).
    Delivered,
    /// Its expiry time passed before it could be sent.
    Expired,
    /// The overflow policy `drop_oldest` removed it.
    Dropped,
    /// The receiver answered with a refusal (e.g. a C2D send to a full device queue); the error
    /// itself goes to the sender.
    Rejected,
}

/// Outbox counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Messages held (queued + in flight).
    pub depth: usize,
    /// Bytes held.
    pub bytes: usize,
    /// Messages sent and not yet acknowledged.
    pub in_flight: usize,
    /// Messages acknowledged since open.
    pub delivered: u64,
    /// Messages dropped by the overflow policy since open.
    pub dropped: u64,
    /// Messages expired before sending since open.
    pub expired: u64,
    /// Messages the receiver refused since open.
    pub rejected: u64,
    /// Messages recovered from disk at open (sent again).
    pub recovered: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    Sent,
    Done,
}

struct Entry {
    seq: u64,
    record: Bytes,
    expiry_ms: Option<u64>,
    state: State,
    prepared: Option<Prepared>,
    /// Who waits for the outcome (the sender's `Delivery`); none for entries recovered from disk.
    /// Kept in the entry, not in a map by seq: finding it costs nothing where the entry is at
    /// hand (a hash map of 100,000 waiters cost a cache miss per outcome).
    waiter: Option<oneshot::Sender<Outcome>>,
}

/// The transport form of a message, computed when it was queued (for D2C: the topic with its
/// property bag, and the body), kept in memory so that sending needs no decoding or
/// re-encoding. Never persisted: entries recovered from disk have none and are encoded when
/// they are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// MQTT topic.
    pub topic: String,
    /// MQTT payload.
    pub payload: Bytes,
}

/// One message handed to the transport by [`Outbox::take_sendable`].
#[derive(Debug, Clone)]
pub struct Sendable {
    /// Outbox sequence number (settle it with [`Outbox::acked`] / [`Outbox::rejected`]).
    pub seq: u64,
    /// The stored record ([`Message::encode`] format).
    pub record: Bytes,
    /// The transport form given when it was queued, if any.
    pub prepared: Option<Prepared>,
}

enum Backend {
    Disk { log: Log, opts: LogOptions, dir: PathBuf, env: Env },
    Memory { next_seq: u64, durable: watch::Sender<u64> },
}

/// A message encoded for the outbox, not yet appended.
struct Encoded {
    record: Bytes,
    prepared: Option<Prepared>,
    expiry_ms: Option<u64>,
}

struct Inner {
    backend: Backend,
    entries: VecDeque<Entry>,
    /// Every entry with seq < this and state Done has been popped.
    bytes: usize,
    live: usize,
    in_flight: usize,
    stats: OutboxStats,
    acked_unpersisted: u64,
    last_popped: u64,
}

/// The outbox. Cheap to clone (shared).
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Mutex<Inner>>,
    opts: Arc<OutboxOptions>,
    /// Bumped whenever new entries become sendable or the driver should look again.
    wake: Arc<tokio::sync::Notify>,
}

impl Outbox {
    /// Opens the outbox (recovering unsent messages from `opts.dir`, which is locked: a second
    /// opener gets a `Storage` error naming the holder). Needs `dir` or `in_memory`.
    pub fn open(opts: OutboxOptions) -> Result<Outbox> {
        Outbox::open_with(opts, Env::real())
    }

    pub(crate) fn open_with(opts: OutboxOptions, env: Env) -> Result<Outbox> {
        if opts.max_messages == 0 || opts.max_bytes == 0 {
            return Err(Error::invalid("outbox bounds must be at least 1 message and 1 byte"));
        }
        let (backend, entries) = match (&opts.dir, opts.in_memory) {
            (Some(_), true) => return Err(Error::invalid("an outbox is either in a directory or in memory, not both")),
            (None, false) => {
                return Err(Error::invalid(
                    "the outbox needs a directory (or in_memory: true); a device client uses OutboxOptions::default_dir",
                ))
            }
            (Some(dir), false) => {
                let lopts = opts.log_options();
                let log = Log::open_with(dir, lopts.clone(), env.clone())?;
                let entries = load_entries(&log)?;
                (Backend::Disk { log, opts: lopts, dir: dir.clone(), env }, entries)
            }
            (None, true) => (Backend::Memory { next_seq: 1, durable: watch::channel(0).0 }, VecDeque::new()),
        };
        let bytes = entries.iter().map(|e| e.record.len()).sum();
        let live = entries.len();
        let recovered = live as u64;
        let inner = Inner {
            backend,
            entries,
            bytes,
            live,
            in_flight: 0,
            stats: OutboxStats { recovered, ..Default::default() },
            acked_unpersisted: 0,
            last_popped: 0,
        };
        Ok(Outbox { inner: Arc::new(Mutex::new(inner)), opts: Arc::new(opts), wake: Arc::new(tokio::sync::Notify::new()) })
    }

    /// Adds a message; returns once it is durable, with a receiver for its [`Outcome`].
    /// Errors: `QueueFull` (policy reject), `MessageTooLarge` (bigger than `max_bytes`),
    /// `Storage` (the disk refused it: nothing was accepted).
    pub async fn push(&self, msg: &Message) -> Result<(u64, oneshot::Receiver<Outcome>)> {
        let (seq, rx, log) = self.append_one(msg, None)?;
        self.wake.notify_one();
        if let Some(log) = log {
            if let Err(e) = log.wait_durable(seq).await {
                self.after_failure(&log, &e);
                return Err(e);
            }
        }
        self.wake.notify_one();
        Ok((seq, rx))
    }

    /// Adds several messages in order with one durability wait (one group commit); returns once
    /// all are durable. A batch that does not fit (policy reject) or holds a message larger than
    /// `max_bytes` is refused whole: nothing of it is queued. On a storage error the batch
    /// counts as not accepted, but messages before the failing one may already be queued and are
    /// still delivered; sending the batch again can only duplicate them (same message ids),
    /// never lose them.
    pub async fn push_batch(&self, msgs: &[Message]) -> Result<Vec<(u64, oneshot::Receiver<Outcome>)>> {
        self.push_batch_prepared(msgs, Vec::new()).await
    }

    /// [`Outbox::push_batch`] with the transport form of each message (`prepared[i]` belongs to
    /// `msgs[i]`; missing ones are encoded at send time).
    pub async fn push_batch_prepared(&self, msgs: &[Message], prepared: Vec<Prepared>) -> Result<Vec<(u64, oneshot::Receiver<Outcome>)>> {
        let mut prepared = prepared.into_iter();
        let encoded = msgs.iter().map(|m| self.encode(m, prepared.next())).collect::<Result<Vec<_>>>()?;
        let (out, last_log) = self.append(encoded)?;
        self.wake.notify_one();
        if let Some((log, seq)) = last_log {
            if let Err(e) = log.wait_durable(seq).await {
                self.after_failure(&log, &e);
                return Err(e);
            }
        }
        self.wake.notify_one();
        Ok(out)
    }

    /// Blocking form of [`Outbox::push`] (not on a runtime thread).
    pub fn push_blocking(&self, msg: &Message) -> Result<(u64, oneshot::Receiver<Outcome>)> {
        self.push_blocking_prepared(msg, None)
    }

    /// [`Outbox::push_blocking`] with the message's transport form.
    pub fn push_blocking_prepared(&self, msg: &Message, prepared: Option<Prepared>) -> Result<(u64, oneshot::Receiver<Outcome>)> {
        let (seq, rx, log) = self.append_one(msg, prepared)?;
        self.wake.notify_one();
        if let Some(log) = log {
            if let Err(e) = log.wait_durable_blocking(seq) {
                self.after_failure(&log, &e);
                return Err(e);
            }
        }
        self.wake.notify_one();
        Ok((seq, rx))
    }

    fn append_one(&self, msg: &Message, prepared: Option<Prepared>) -> Result<(u64, oneshot::Receiver<Outcome>, Option<Log>)> {
        let (mut out, log) = self.append(vec![self.encode(msg, prepared)?])?;
        let (seq, rx) = out.pop().expect("one message appended");
        Ok((seq, rx, log.map(|(l, _)| l)))
    }

    /// Appends `encoded` in order under one hold of the lock: a batch of several that does not
    /// fit (policy reject) is refused whole; otherwise each makes room by the overflow policy.
    /// Returns the seqs and outcome receivers, and the log with the last seq to wait for (disk).
    #[allow(clippy::type_complexity)]
    fn append(&self, encoded: Vec<Encoded>) -> Result<(Vec<(u64, oneshot::Receiver<Outcome>)>, Option<(Log, u64)>)> {
        let mut out = Vec::with_capacity(encoded.len());
        let mut last_log = None;
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let bytes: usize = encoded.iter().map(|e| e.record.len()).sum();
        let fits = inner.live + encoded.len() <= self.opts.max_messages && inner.bytes + bytes <= self.opts.max_bytes;
        if encoded.len() > 1 && self.opts.overflow == Overflow::Reject && !fits {
            return Err(Error::new(
                ErrorKind::QueueFull,
                format!(
                    "outbox cannot take a batch of {} messages ({bytes} bytes): it holds {} messages, {} bytes; limits {} and \
                     {}; nothing of the batch was queued; wait for delivery (flush), send smaller batches or use overflow \
                     policy drop_oldest",
                    encoded.len(),
                    inner.live,
                    inner.bytes,
                    self.opts.max_messages,
                    self.opts.max_bytes
                ),
            ));
        }
        for e in encoded {
            match self.append_locked(inner, e) {
                Ok((seq, rx, log)) => {
                    last_log = log.map(|l| (l, seq));
                    out.push((seq, rx));
                }
                Err((e, log)) => {
                    drop(g);
                    if let Some(log) = log {
                        self.after_failure(&log, &e);
                    }
                    if !out.is_empty() {
                        self.wake.notify_one(); // what was queued before the failure goes out
                    }
                    return Err(e);
                }
            }
        }
        Ok((out, last_log))
    }

    /// The record of `msg` and its transport form; `MessageTooLarge` past `max_bytes`.
    fn encode(&self, msg: &Message, prepared: Option<Prepared>) -> Result<Encoded> {
        let record = msg.to_bytes();
        // The record ends with the body: let the transport form share that memory rather than
        // keep a second copy of every queued body.
        let prepared = prepared.map(|p| {
            let tail = record.slice(record.len() - p.payload.len().min(record.len())..);
            debug_assert_eq!(tail, p.payload);
            Prepared { payload: tail, ..p }
        });
        let size = record.len();
        if size > self.opts.max_bytes {
            return Err(Error::new(
                ErrorKind::MessageTooLarge,
                format!("message of {size} bytes is larger than the outbox bound of {} bytes", self.opts.max_bytes),
            ));
        }
        Ok(Encoded { record, prepared, expiry_ms: msg.expiry_time_ms })
    }

    /// Appends `e` (the caller holds the lock): makes room by the overflow policy, writes the
    /// record to the store (disk) or numbers it (memory). On a store error also the log, for
    /// [`Outbox::after_failure`] once the lock is released.
    #[allow(clippy::type_complexity)]
    fn append_locked(
        &self,
        inner: &mut Inner,
        e: Encoded,
    ) -> std::result::Result<(u64, oneshot::Receiver<Outcome>, Option<Log>), (Error, Option<Log>)> {
        let Encoded { record, prepared, expiry_ms } = e;
        let size = record.len();
        while inner.live + 1 > self.opts.max_messages || inner.bytes + size > self.opts.max_bytes {
            match self.opts.overflow {
                Overflow::Reject => {
                    return Err((
                        Error::new(
                            ErrorKind::QueueFull,
                            format!(
                                "outbox is full ({} messages, {} bytes; limits {} and {}); wait for delivery (flush) or use overflow policy drop_oldest",
                                inner.live, inner.bytes, self.opts.max_messages, self.opts.max_bytes
                            ),
                        ),
                        None,
                    ))
                }
                Overflow::DropOldest => {
                    let Some(victim) = inner.entries.iter().position(|e| e.state != State::Done) else { break };
                    inner.finish(victim, Outcome::Dropped);
                }
            }
        }
        // A drop is an outcome like a delivery: the oldest entries are done, so the ack
        // watermark moves over them (or they would come back when the outbox is reopened).
        inner.pop_done_front();
        inner.persist_ack();
        let (seq, log) = match &mut inner.backend {
            Backend::Disk { log, .. } => match log.append(&record) {
                Ok(s) => (s, Some(log.clone())),
                Err(e) => return Err((e, Some(log.clone()))),
            },
            Backend::Memory { next_seq, durable } => {
                let s = *next_seq;
                *next_seq += 1;
                durable.send_replace(s);
                (s, None)
            }
        };
        let (tx, rx) = oneshot::channel();
        inner.entries.push_back(Entry { seq, record, expiry_ms, state: State::Queued, prepared, waiter: Some(tx) });
        inner.bytes += size;
        inner.live += 1;
        Ok((seq, rx, log))
    }

    /// After a storage error: the store heals a failed write or fdatasync by itself, so only a
    /// poisoned (or unexpectedly closed) log needs more — reopening it, since what is on disk
    /// is then the truth.
    fn after_failure(&self, failed: &Log, err: &Error) {
        if failed.is_poisoned() {
            self.reload_after_failure(err);
        }
    }

    fn reload_after_failure(&self, err: &Error) {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let Backend::Disk { log, opts, dir, env } = &mut inner.backend else { return };
        if !log.is_poisoned() {
            return; // reloaded already
        }
        tracing::warn!(error = %err, "outbox store failed; reloading from disk");
        let _ = log.close();
        match Log::open_with(dir, opts.clone(), env.clone()).and_then(|l| load_entries(&l).map(|e| (l, e))) {
            Ok((new_log, entries)) => {
                *log = new_log;
                // Keep outcomes already reached in memory, and who waits for the rest (those no
                // longer on disk are dropped: their waits end as closed); everything else is
                // queued again.
                let mut old: HashMap<u64, Entry> = inner.entries.drain(..).map(|e| (e.seq, e)).collect();
                inner.entries = entries;
                for e in inner.entries.iter_mut() {
                    if let Some(o) = old.remove(&e.seq) {
                        if o.state == State::Done {
                            e.state = State::Done;
                        }
                        e.waiter = o.waiter;
                    }
                }
                inner.bytes = inner.entries.iter().filter(|e| e.state != State::Done).map(|e| e.record.len()).sum();
                inner.live = inner.entries.iter().filter(|e| e.state != State::Done).count();
                inner.in_flight = 0;
                inner.pop_done_front();
            }
            Err(e) => tracing::error!(error = %e, "outbox could not be reopened; sends will fail until it can"),
        }
        self.wake.notify_one();
    }

    /// Takes up to `max` queued messages in order (durable or with their fdatasync still
    /// running) and marks them sent. Expired ones are finished as [`Outcome::Expired`] and
    /// skipped.
    pub fn take_sendable(&self, max: usize) -> Vec<Sendable> {
        let now = now_ms();
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let mut out = Vec::new();
        let mut i = 0;
        while i < inner.entries.len() && out.len() < max {
            let e = &inner.entries[i];
            if e.state == State::Queued {
                if e.expiry_ms.is_some_and(|x| x <= now) {
                    inner.finish(i, Outcome::Expired);
                } else {
                    let e = &mut inner.entries[i];
                    e.state = State::Sent;
                    out.push(Sendable { seq: e.seq, record: e.record.clone(), prepared: e.prepared.clone() });
                    inner.in_flight += 1;
                }
            }
            i += 1;
        }
        inner.pop_done_front();
        out
    }

    /// Records the hub's acknowledgement of `seq`.
    pub fn acked(&self, seq: u64) {
        self.settle(seq, Outcome::Delivered)
    }

    /// Records that the receiver refused `seq` (it will not be sent again).
    pub fn rejected(&self, seq: u64) {
        self.settle(seq, Outcome::Rejected)
    }

    fn settle(&self, seq: u64, outcome: Outcome) {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        if let Some(i) = inner.index_of(seq) {
            if inner.entries[i].state != State::Done {
                inner.finish(i, outcome);
            }
        }
        inner.pop_done_front();
        inner.persist_ack();
    }

    /// Marks every sent-but-unacknowledged message queued again (after a disconnect).
    pub fn rewind(&self) {
        let mut g = self.inner.lock();
        for e in g.entries.iter_mut() {
            if e.state == State::Sent {
                e.state = State::Queued;
            }
        }
        g.in_flight = 0;
        drop(g);
        self.wake.notify_one();
    }

    /// Hands the ack watermark to the store and has it written now (on flush).
    pub fn persist_ack(&self) {
        let log = {
            let mut g = self.inner.lock();
            g.persist_ack();
            match &g.backend {
                Backend::Disk { log, .. } => log.clone(),
                Backend::Memory { .. } => return,
            }
        };
        if let Err(e) = log.flush_ack() {
            tracing::warn!(error = %e, "could not persist the outbox ack watermark (messages may be sent again)");
        }
    }

    /// Counters.
    pub fn stats(&self) -> OutboxStats {
        let g = self.inner.lock();
        OutboxStats { depth: g.live, bytes: g.bytes, in_flight: g.in_flight, ..g.stats.clone() }
    }

    /// The store's counters (`None` for an in-memory outbox).
    pub fn store_stats(&self) -> Option<crate::store::LogStats> {
        match &self.inner.lock().backend {
            Backend::Disk { log, .. } => Some(log.stats()),
            Backend::Memory { .. } => None,
        }
    }

    /// Whether nothing is held (every message reached an outcome).
    pub fn is_empty(&self) -> bool {
        self.inner.lock().live == 0
    }

    /// Resolves when there may be new sendable messages (a cheap edge-triggered hint).
    pub async fn changed(&self) {
        self.wake.notified().await
    }

    /// Wakes anyone waiting in [`Outbox::changed`].
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// A watch of the highest durable sequence number.
    pub fn durable_watch(&self) -> watch::Receiver<u64> {
        match &self.inner.lock().backend {
            Backend::Disk { log, .. } => log.durable(),
            Backend::Memory { durable, .. } => durable.subscribe(),
        }
    }

    /// Persists the watermark and closes the store (releasing its directory lock).
    pub fn close(&self) -> Result<()> {
        let log = {
            let mut g = self.inner.lock();
            g.persist_ack();
            match &g.backend {
                Backend::Disk { log, .. } => log.clone(),
                Backend::Memory { .. } => return Ok(()),
            }
        };
        log.close()
    }
}

impl Inner {
    fn index_of(&self, seq: u64) -> Option<usize> {
        let first = self.entries.front()?.seq;
        // Entries are in increasing seq order; usually dense, so try the direct index first.
        let guess = seq.checked_sub(first)? as usize;
        if self.entries.get(guess).is_some_and(|e| e.seq == seq) {
            return Some(guess);
        }
        self.entries.binary_search_by_key(&seq, |e| e.seq).ok()
    }

    fn finish(&mut self, i: usize, outcome: Outcome) {
        let e = &mut self.entries[i];
        debug_assert!(e.state != State::Done);
        if e.state == State::Sent {
            self.in_flight -= 1;
        }
        e.state = State::Done;
        self.live -= 1;
        self.bytes -= e.record.len();
        match outcome {
            Outcome::Delivered => self.stats.delivered += 1,
            Outcome::Expired => self.stats.expired += 1,
            Outcome::Dropped => self.stats.dropped += 1,
            Outcome::Rejected => self.stats.rejected += 1,
        }
        if let Some(w) = e.waiter.take() {
            let _ = w.send(outcome);
        }
    }

    fn pop_done_front(&mut self) {
        while self.entries.front().is_some_and(|e| e.state == State::Done) {
            let e = self.entries.pop_front().expect("front exists");
            self.last_popped = e.seq;
            self.acked_unpersisted += 1;
        }
    }

    /// Hands the watermark to the store, which writes it in the background (no I/O here).
    fn persist_ack(&mut self) {
        if self.acked_unpersisted == 0 {
            return;
        }
        if let Backend::Disk { log, .. } = &self.backend {
            if let Err(e) = log.ack_through(self.last_popped) {
                tracing::debug!(error = %e, "could not hand the outbox ack watermark to the store (messages may be sent again)");
                return;
            }
            if log.acked() < self.last_popped {
                // Clamped to what is fsync'd (an entry dropped while its own write was in
                // flight): hand it again on the next outcome or on close.
                return;
            }
        }
        self.acked_unpersisted = 0;
    }
}

fn load_entries(log: &Log) -> Result<VecDeque<Entry>> {
    let mut entries = VecDeque::new();
    let mut from = log.acked() + 1;
    loop {
        let batch = log.read(from, 4096, 8 * 1024 * 1024)?;
        let Some(last) = batch.last() else { break };
        from = last.seq + 1;
        for r in batch {
            let expiry_ms = Message::decode(&r.payload)?.expiry_time_ms;
            entries.push_back(Entry { seq: r.seq, record: r.payload, expiry_ms, state: State::Queued, prepared: None, waiter: None });
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_dir_is_one_directory_per_hub_and_device() {
        assert_eq!(path_component("device id", "pump-7").unwrap(), "pump-7");
        assert_eq!(path_component("host name", "hub.example:8883").unwrap(), "hub.example:8883");
        assert_eq!(path_component("device id", "a/b").unwrap(), "a%2Fb");
        assert_eq!(path_component("device id", "a%2Fb").unwrap(), "a%252Fb");
        assert_eq!(path_component("device id", "..").unwrap(), "%2E.");
        assert!(path_component("device id", "").is_err());
        assert!(path_component("device id", "a\0b").is_err());
    }

    fn mem(max_messages: usize, overflow: Overflow) -> Outbox {
        Outbox::open(OutboxOptions { max_messages, overflow, ..OutboxOptions::in_memory() }).unwrap()
    }

    #[tokio::test]
    async fn reject_policy_refuses_when_full_and_loses_nothing() {
        let ob = mem(2, Overflow::Reject);
        ob.push(&Message::new("a")).await.unwrap();
        ob.push(&Message::new("b")).await.unwrap();
        let err = ob.push(&Message::new("c")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::QueueFull);
        let sent = ob.take_sendable(10);
        assert_eq!(sent.len(), 2);
        assert_eq!(Message::decode(&sent[0].record).unwrap().body, "a");
    }

    #[tokio::test]
    async fn drop_oldest_counts_and_reports_drops() {
        let ob = mem(2, Overflow::DropOldest);
        let (_, a) = ob.push(&Message::new("a")).await.unwrap();
        ob.push(&Message::new("b")).await.unwrap();
        ob.push(&Message::new("c")).await.unwrap();
        assert_eq!(a.await.unwrap(), Outcome::Dropped);
        let st = ob.stats();
        assert_eq!((st.depth, st.dropped), (2, 1));
        let bodies: Vec<_> = ob.take_sendable(10).into_iter().map(|s| Message::decode(&s.record).unwrap().body).collect();
        assert_eq!(bodies, vec!["b", "c"]);
    }

    #[tokio::test]
    async fn a_batch_that_does_not_fit_is_refused_whole() {
        let ob = mem(5, Overflow::Reject);
        ob.push_batch(&[Message::new("1"), Message::new("2"), Message::new("3")]).await.unwrap();
        let err = ob.push_batch(&[Message::new("4"), Message::new("5"), Message::new("6")]).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::QueueFull, "{err}");
        assert!(err.to_string().contains("batch of 3"), "{err}");
        // Nothing of the refused batch was queued: the caller may send it again as it is.
        let bodies: Vec<_> = ob.take_sendable(10).into_iter().map(|s| Message::decode(&s.record).unwrap().body).collect();
        assert_eq!(bodies, vec!["1", "2", "3"]);
        assert_eq!(ob.stats().depth, 3);
        // What fits still goes.
        ob.push_batch(&[Message::new("4"), Message::new("5")]).await.unwrap();
        assert_eq!(ob.stats().depth, 5);
        // drop_oldest makes room for a whole batch as for one message.
        let ob = mem(2, Overflow::DropOldest);
        ob.push_batch(&[Message::new("a"), Message::new("b"), Message::new("c")]).await.unwrap();
        let bodies: Vec<_> = ob.take_sendable(10).into_iter().map(|s| Message::decode(&s.record).unwrap().body).collect();
        assert_eq!(bodies, vec!["b", "c"]);
    }

    #[tokio::test]
    async fn ack_rewind_and_expiry() {
        let ob = mem(10, Overflow::Reject);
        let (s1, o1) = ob.push(&Message::new("1")).await.unwrap();
        let (_, o2) = ob.push(&Message::new("2").with_expiry_ms(1)).await.unwrap();
        let (s3, _) = ob.push(&Message::new("3")).await.unwrap();
        let sent = ob.take_sendable(10);
        assert_eq!(sent.iter().map(|s| s.seq).collect::<Vec<_>>(), vec![s1, s3]);
        assert_eq!(o2.await.unwrap(), Outcome::Expired);
        ob.acked(s1);
        assert_eq!(o1.await.unwrap(), Outcome::Delivered);
        ob.rewind();
        assert_eq!(ob.take_sendable(10).iter().map(|s| s.seq).collect::<Vec<_>>(), vec![s3]);
        ob.acked(s3);
        assert!(ob.is_empty());
        assert_eq!(ob.stats().delivered, 2);
        assert_eq!(ob.stats().expired, 1);
    }

    #[test]
    fn a_failed_write_or_fdatasync_does_not_leave_sends_failing() {
        use crate::store::sim::{Faults, Sim};
        let root = std::path::Path::new("/device");
        let sim = Sim::new(11, root);
        let (env, inline) = sim.env();
        let ob = Outbox::open_with(OutboxOptions { dir: Some(root.join("outbox")), ..Default::default() }, env).unwrap();
        ob.push_blocking(&Message::new("before")).unwrap();
        for fault in [Faults { enospc_write: 1.0, ..Faults::default() }, Faults { eio_sync: 1.0, ..Faults::default() }] {
            sim.set_faults(fault);
            let e = ob.push_blocking(&Message::new("while failing")).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Storage, "{e}");
            assert_eq!(ob.push_blocking(&Message::new("again")).unwrap_err().kind(), ErrorKind::Storage);
            sim.set_faults(Faults::default());
            inline.fire_timers(); // the store retries by itself
            ob.push_blocking(&Message::new("after")).expect("sending works again without a restart");
        }
        let bodies: Vec<String> =
            ob.take_sendable(100).iter().map(|s| String::from_utf8_lossy(&Message::decode(&s.record).unwrap().body).into_owned()).collect();
        // The message whose send failed may still be delivered (at-least-once); all accepted are.
        assert_eq!(bodies.iter().filter(|b| *b == "before" || *b == "after").count(), 3, "{bodies:?}");
    }

    #[test]
    fn a_poisoned_store_is_reopened_on_the_next_send() {
        use crate::store::sim::{Faults, Sim};
        let root = std::path::Path::new("/device");
        let sim = Sim::new(12, root);
        let (env, inline) = sim.env();
        let dir = root.join("outbox");
        let ob = Outbox::open_with(OutboxOptions { dir: Some(dir.clone()), ..Default::default() }, env).unwrap();
        let (kept, mut kept_outcome) = ob.push_blocking(&Message::new("kept")).unwrap();
        // An fdatasync fails and the unsynced bytes come back changed: the store cannot tell
        // what is on disk and poisons itself.
        sim.set_faults(Faults { eio_sync: 1.0, ..Faults::default() });
        assert!(ob.push_blocking(&Message::new("lost in the cache")).is_err());
        sim.set_faults(Faults::default());
        let seg = dir.join("00000000000000000001.seg");
        let len = sim.fs().open(&seg, false, 0o644).unwrap().len().unwrap() as usize;
        assert!(sim.rot(&seg, len - 3));
        inline.fire_timers();
        assert!(ob.push_blocking(&Message::new("during")).is_err(), "the poisoned log refuses");
        ob.push_blocking(&Message::new("after")).expect("the outbox reopened its store from disk");
        let bodies: Vec<String> =
            ob.take_sendable(100).iter().map(|s| String::from_utf8_lossy(&Message::decode(&s.record).unwrap().body).into_owned()).collect();
        assert_eq!(bodies.first().map(String::as_str), Some("kept"));
        assert_eq!(bodies.last().map(String::as_str), Some("after"));
        // Who waited for a message that survived the reopening still gets its outcome.
        assert!(kept_outcome.try_recv().is_err(), "no outcome yet");
        ob.acked(kept);
        assert_eq!(kept_outcome.try_recv().ok(), Some(Outcome::Delivered), "the wait for 'kept' was lost in the reopening");
    }

    #[tokio::test]
    async fn messages_dropped_by_drop_oldest_stay_dropped_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let opts =
            OutboxOptions { dir: Some(dir.path().to_path_buf()), max_messages: 3, overflow: Overflow::DropOldest, ..Default::default() };
        {
            // Never connected: nothing is sent or acknowledged, only dropped.
            let ob = Outbox::open(opts.clone()).unwrap();
            for i in 0..5 {
                ob.push(&Message::new(format!("{i}"))).await.unwrap();
            }
            assert_eq!((ob.stats().depth, ob.stats().dropped), (3, 2));
            ob.close().unwrap();
        }
        {
            let ob = Outbox::open(opts.clone()).unwrap();
            assert_eq!(ob.stats().recovered, 3, "the 2 messages reported dropped must not come back");
            // One batch that drops what it queued itself, before its fdatasync.
            let batch: Vec<Message> = (5..9).map(|i| Message::new(format!("{i}"))).collect();
            ob.push_batch(&batch).await.unwrap();
            assert_eq!((ob.stats().depth, ob.stats().dropped), (3, 4));
            ob.close().unwrap();
        }
        let ob = Outbox::open(opts).unwrap();
        let bodies: Vec<_> = ob.take_sendable(10).into_iter().map(|s| Message::decode(&s.record).unwrap().body).collect();
        assert_eq!(bodies, vec!["6", "7", "8"]);
    }

    #[tokio::test]
    async fn durable_outbox_recovers_unacked_messages() {
        let dir = tempfile::tempdir().unwrap();
        let opts = OutboxOptions { dir: Some(dir.path().to_path_buf()), ..Default::default() };
        {
            let ob = Outbox::open(opts.clone()).unwrap();
            for i in 0..3000 {
                ob.push(&Message::new(format!("{i}"))).await.unwrap();
            }
            let sent = ob.take_sendable(2000);
            for s in &sent {
                ob.acked(s.seq);
            }
            ob.close().unwrap();
        }
        let ob = Outbox::open(opts).unwrap();
        let rest = ob.take_sendable(10_000);
        assert_eq!(rest.len(), 1000);
        assert_eq!(Message::decode(&rest[0].record).unwrap().body, "2000");
    }
}
