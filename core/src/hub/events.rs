//! The D2C side of the hub: the partitioned durable event log and consumer groups.
//!
//! Invariants:
//! - a device's events always go to the same partition (hash of the device id), so per-device
//!   order is the partition order;
//! - a partition is owned by at most one member of a group at a time; only the owner's
//!   acknowledgements move the group's checkpoint, and the checkpoint only moves forward over a
//!   contiguous acknowledged prefix, so a crash or a takeover redelivers, never skips;
//! - checkpoints are persisted within `checkpoint_interval` of an ack (and immediately on an
//!   explicit checkpoint request); a hub crash can only rewind a checkpoint to its last durable
//!   value, which redelivers.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::{Error, ErrorKind, Result};
use crate::message::now_ms;
use crate::proto::StartPosition;
use crate::store::{Durability, Log, LogOptions, Machine, StateLog, StateOptions};

/// The partition a device's events go to.
pub fn partition_for(device_id: &str, partitions: u32) -> u32 {
    crc32c::crc32c(device_id.as_bytes()) % partitions.max(1)
}

/// The partitioned D2C event log. Consumers wait on their partitions' own durable heads
/// ([`Log::durable`]): a group commit wakes only the readers of its partition, directly.
pub struct EventLog {
    partitions: Vec<Log>,
}

impl EventLog {
    /// Opens `n` partitions under `dir/p{i}`.
    pub fn open(dir: &Path, n: u32, durability: Durability, segment_bytes: u64) -> Result<Arc<EventLog>> {
        let mut partitions = Vec::new();
        for i in 0..n {
            let opts = LogOptions { durability, segment_bytes, ..LogOptions::default() };
            partitions.push(Log::open(&dir.join(format!("p{i}")), opts)?);
        }
        Ok(Arc::new(EventLog { partitions }))
    }

    /// Number of partitions.
    pub fn count(&self) -> u32 {
        self.partitions.len() as u32
    }

    /// Partition `p`'s log.
    pub fn partition(&self, p: u32) -> &Log {
        &self.partitions[p as usize]
    }

    /// Where a consumer starting at `from` begins reading partition `p` (given the group's
    /// checkpoint, the last acknowledged sequence number, if any).
    pub fn start_seq(&self, p: u32, from: StartPosition, checkpoint: Option<u64>) -> Result<u64> {
        let log = self.partition(p);
        let first = log.first_seq();
        Ok(match from {
            StartPosition::Checkpoint => checkpoint.map_or(first, |c| c + 1).max(first),
            StartPosition::Earliest => first,
            StartPosition::Latest => log.last_seq() + 1,
            StartPosition::Sequence(s) => s.max(first),
            StartPosition::Time(ms) => log.seek_time(ms)?.max(first),
        })
    }

    /// Applies retention: drops whole segments older than `max_age` and, oldest first, segments
    /// beyond `max_bytes` per partition. Returns the number of events removed.
    pub fn apply_retention(&self, max_age: Duration, max_bytes: u64) -> Result<u64> {
        let mut removed = 0;
        let cutoff = now_ms().saturating_sub(max_age.as_millis() as u64);
        for log in &self.partitions {
            let segs = log.segments();
            let mut total: u64 = segs.iter().map(|s| s.bytes).sum();
            let mut drop_before = 0;
            for s in segs.iter().take(segs.len().saturating_sub(1)) {
                let too_old = s.last_timestamp_ms != 0 && s.last_timestamp_ms < cutoff;
                if too_old || total > max_bytes {
                    drop_before = s.last_seq + 1;
                    total -= s.bytes;
                } else {
                    break;
                }
            }
            if drop_before > 0 {
                removed += log.truncate_before(drop_before)?;
            }
        }
        Ok(removed)
    }

    /// Flushes and closes every partition.
    pub fn close(&self) -> Result<()> {
        for p in &self.partitions {
            p.close()?;
        }
        Ok(())
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Checkpoints {
    /// (group, partition) → last acknowledged sequence number.
    by_group: BTreeMap<String, BTreeMap<u32, u64>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointEvent {
    g: String,
    p: u32,
    s: u64,
}

impl Machine for Checkpoints {
    fn apply(&mut self, event: &[u8]) -> Result<()> {
        let ev: CheckpointEvent =
            serde_json::from_slice(event).map_err(|e| Error::new(ErrorKind::Storage, format!("corrupt checkpoint event: {e}")))?;
        let slot = self.by_group.entry(ev.g).or_default().entry(ev.p).or_insert(0);
        *slot = (*slot).max(ev.s);
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("checkpoints serialize")
    }

    fn restore(snapshot: Option<&[u8]>) -> Result<Self> {
        match snapshot {
            None => Ok(Checkpoints::default()),
            Some(b) => serde_json::from_slice(b).map_err(|e| Error::new(ErrorKind::Storage, format!("corrupt checkpoint snapshot: {e}"))),
        }
    }
}

struct Member {
    id: u64,
    assignment: watch::Sender<Vec<u32>>,
}

#[derive(Default)]
struct Group {
    members: Vec<Member>,
    /// In-memory checkpoints (>= the durable ones).
    acked: HashMap<u32, u64>,
    dirty: HashMap<u32, u64>,
}

/// Consumer groups: membership, partition assignment, checkpoints.
pub struct Groups {
    partitions: u32,
    inner: Mutex<HashMap<String, Group>>,
    store: StateLog<Checkpoints>,
}

/// Most consumer groups a hub keeps (IoT Hub allows 20 per hub, plus `$Default`).
pub const MAX_GROUPS: usize = 64;

impl Groups {
    /// Opens the checkpoint store in `dir`.
    pub fn open(dir: &Path, partitions: u32, durability: Durability) -> Result<Arc<Groups>> {
        let store = StateLog::<Checkpoints>::open(dir, StateOptions { durability, ..StateOptions::default() })?;
        Ok(Arc::new(Groups { partitions, inner: Mutex::new(HashMap::new()), store }))
    }

    /// Validates a consumer group name.
    pub fn validate_name(group: &str) -> Result<()> {
        if group.is_empty() || group.len() > 50 || group.contains(['/', '+', '#']) {
            return Err(Error::invalid(format!("consumer group name '{group}' must be 1-50 characters without '/', '+' or '#'")));
        }
        Ok(())
    }

    /// Adds member `id` to `group`; returns its assignment watch. Partitions are spread over the
    /// members in join order (partition p → member p mod n); every member's assignment updates.
    pub fn join(&self, group: &str, id: u64) -> Result<watch::Receiver<Vec<u32>>> {
        Groups::validate_name(group)?;
        let mut g = self.inner.lock();
        if !g.contains_key(group) && g.len() >= MAX_GROUPS {
            // A quota, not a full queue: nothing drains it by waiting (QUEUE_FULL would say so).
            return Err(Error::invalid(format!(
                "this hub already has {MAX_GROUPS} consumer groups (the limit); use one of them, e.g. '$Default'"
            )));
        }
        let grp = g.entry(group.to_string()).or_default();
        let (tx, rx) = watch::channel(Vec::new());
        grp.members.push(Member { id, assignment: tx });
        self.rebalance(grp);
        Ok(rx)
    }

    /// Removes member `id` from `group`; its partitions move to the remaining members.
    pub fn leave(&self, group: &str, id: u64) {
        let mut g = self.inner.lock();
        if let Some(grp) = g.get_mut(group) {
            grp.members.retain(|m| m.id != id);
            self.rebalance(grp);
        }
    }

    fn rebalance(&self, grp: &mut Group) {
        let n = grp.members.len();
        for (i, m) in grp.members.iter().enumerate() {
            let parts: Vec<u32> = (0..self.partitions).filter(|p| (*p as usize) % n == i).collect();
            m.assignment.send_if_modified(|cur| {
                if *cur != parts {
                    *cur = parts;
                    true
                } else {
                    false
                }
            });
        }
    }

    /// The group's checkpoint for partition `p`: the last acknowledged sequence number.
    pub fn checkpoint(&self, group: &str, p: u32) -> Option<u64> {
        if let Some(s) = self.inner.lock().get(group).and_then(|g| g.acked.get(&p).copied()) {
            return Some(s);
        }
        self.store.read(|c| c.by_group.get(group).and_then(|m| m.get(&p).copied()))
    }

    /// Records that `member` acknowledged everything up to `seq` in partition `p`. Ignored unless
    /// `member` currently owns `p` (a late ack from a former owner must not skip events).
    pub fn advance(&self, group: &str, p: u32, member: u64, seq: u64) {
        let mut g = self.inner.lock();
        let Some(grp) = g.get_mut(group) else { return };
        let n = grp.members.len();
        let owns = grp.members.iter().position(|m| m.id == member).is_some_and(|i| (p as usize) % n == i);
        if !owns {
            return;
        }
        let cur = grp.acked.entry(p).or_insert(0);
        if seq > *cur {
            *cur = seq;
            grp.dirty.insert(p, seq);
        }
    }

    /// Persists every changed checkpoint; returns once durable.
    pub async fn flush(&self) -> Result<()> {
        let dirty: Vec<(String, u32, u64)> = {
            let mut g = self.inner.lock();
            g.iter_mut().flat_map(|(name, grp)| grp.dirty.drain().map(move |(p, s)| (name.clone(), p, s)).collect::<Vec<_>>()).collect()
        };
        let mut last = None;
        for (g, p, s) in dirty {
            let ev = serde_json::to_vec(&CheckpointEvent { g, p, s }).expect("checkpoint serializes");
            last = Some(self.store.commit(&ev)?);
        }
        if let Some(seq) = last {
            self.store.wait_durable(seq).await?;
        }
        Ok(())
    }

    /// Closes the checkpoint store.
    pub fn close(&self) -> Result<()> {
        self.store.close()
    }
}
