//! The D2C side of the hub: the partitioned durable event log and consumer groups.
//!
//! Invariants:
//! - a device's events always go to the same partition (hash of the device id), so per-device
//!   order is the partition order;
//! - a partition is owned by at most one member of a group at a time; only the owner's
//!   acknowledgements move the group's checkpoint, and the checkpoint only moves forward over a
//!   contiguous acknowledged prefix, so a crash or a takeover redelivers, never skips;
//! - checkpoints are persisted within `checkpoint_interval` of an ack (and on an explicit
//!   checkpoint request, which is answered only once every position acknowledged before it is
//!   durable, whoever wrote it); a failed write keeps the positions queued; a checkpoint never
//!   points past what its partition has fsync'd, so a power loss (durability `interval`) can
//!   only rewind it, which redelivers;
//! - a partition never hands out a sequence number at or below a group's checkpoint, even when
//!   its newest segment went missing (the checkpoint is the floor it opens with).

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
    /// Opens `n` partitions under `dir/p{i}`. Appends are refused while the disk has less than
    /// `reserve_bytes` free (so C2D settles and checkpoints keep working on a full disk);
    /// partition `i` continues at least at `floors[i]` (the highest checkpoint + 1).
    pub fn open(
        dir: &Path,
        n: u32,
        durability: Durability,
        segment_bytes: u64,
        reserve_bytes: u64,
        floors: &[u64],
    ) -> Result<Arc<EventLog>> {
        let mut partitions = Vec::new();
        for i in 0..n {
            let min_next_seq = floors.get(i as usize).copied().unwrap_or(0);
            let opts = LogOptions { durability, segment_bytes, reserve_bytes, min_next_seq, ..LogOptions::default() };
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

    /// Flushes and closes every partition (all of them, reporting the first error).
    pub fn close(&self) -> Result<()> {
        self.partitions.iter().map(Log::close).fold(Ok(()), Result::and)
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
    /// Sequence number of the newest checkpoint event committed (by any flush).
    last_commit: std::sync::atomic::AtomicU64,
}

/// Most consumer groups a hub keeps (IoT Hub allows 20 per hub, plus `$Default`).
pub const MAX_GROUPS: usize = 64;

impl Groups {
    /// Opens the checkpoint store in `dir`.
    pub fn open(dir: &Path, partitions: u32, durability: Durability) -> Result<Arc<Groups>> {
        Groups::open_with(dir, partitions, durability, crate::store::Env::real())
    }

    pub(crate) fn open_with(dir: &Path, partitions: u32, durability: Durability, env: crate::store::Env) -> Result<Arc<Groups>> {
        let store = StateLog::<Checkpoints>::open_with(dir, StateOptions { durability, ..StateOptions::default() }, env)?;
        Ok(Arc::new(Groups { partitions, inner: Mutex::new(HashMap::new()), store, last_commit: std::sync::atomic::AtomicU64::new(0) }))
    }

    /// The highest durable checkpoint of any group in partition `p` (0 if none).
    pub fn max_checkpoint(&self, p: u32) -> u64 {
        self.store.read(|c| c.by_group.values().filter_map(|m| m.get(&p).copied()).max().unwrap_or(0))
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

    /// Persists every changed checkpoint (each clamped to what its partition has fsync'd) and
    /// returns once every checkpoint acknowledged before the call is durable — also those a
    /// concurrent flush is writing. On an error the positions stay queued for the next flush.
    pub async fn flush(&self, events: &EventLog) -> Result<()> {
        self.flush_clamped(|p| if p < events.count() { events.partition(p).synced() } else { u64::MAX }).await
    }

    /// [`Groups::flush`] with `on_disk(p)`: how far partition `p` is fsync'd.
    async fn flush_clamped(&self, on_disk: impl Fn(u32) -> u64) -> Result<()> {
        use std::sync::atomic::Ordering;
        let (committed, target, err) = {
            let mut g = self.inner.lock();
            let mut committed: Vec<(String, u32, u64)> = Vec::new();
            let mut err = None;
            'groups: for (name, grp) in g.iter_mut() {
                let mut dirty: Vec<(u32, u64)> = grp.dirty.iter().map(|(p, s)| (*p, *s)).collect();
                dirty.sort();
                for (p, s) in dirty {
                    let s = s.min(on_disk(p));
                    if s == 0 {
                        continue;
                    }
                    let ev = serde_json::to_vec(&CheckpointEvent { g: name.clone(), p, s }).expect("checkpoint serializes");
                    match self.store.commit(&ev) {
                        Ok(seq) => {
                            self.last_commit.fetch_max(seq, Ordering::SeqCst);
                            if grp.dirty.get(&p) == Some(&s) {
                                grp.dirty.remove(&p);
                            }
                            committed.push((name.clone(), p, s));
                        }
                        Err(e) => {
                            err = Some(e);
                            break 'groups;
                        }
                    }
                }
            }
            (committed, self.last_commit.load(Ordering::SeqCst), err)
        };
        let r = match err {
            Some(e) => Err(e),
            None if target > 0 => self.store.wait_durable(target).await,
            None => Ok(()),
        };
        if r.is_err() {
            // Not known to be durable: write them again next time (checkpoints only move forward).
            let mut g = self.inner.lock();
            for (name, p, s) in committed {
                if let Some(grp) = g.get_mut(&name) {
                    let d = grp.dirty.entry(p).or_insert(s);
                    *d = (*d).max(s);
                }
            }
        }
        r
    }

    /// Closes the checkpoint store.
    pub fn close(&self) -> Result<()> {
        self.store.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sim::{Faults, Sim};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_request_waits_for_positions_a_concurrent_flush_is_writing() {
        let dir = tempfile::tempdir().unwrap();
        let groups = Groups::open(dir.path(), 1, Durability::Always).unwrap();
        let _a = groups.join("g", 1).unwrap();
        for round in 1..=100u64 {
            groups.advance("g", 0, 1, round);
            let g = groups.clone();
            let first = tokio::spawn(async move { g.flush_clamped(|_| u64::MAX).await });
            // The first flush took the position; the request that comes now finds nothing new
            // to write, yet must not answer before that position is durable.
            while groups.store.log().last_seq() < round {
                tokio::task::yield_now().await;
            }
            groups.flush_clamped(|_| u64::MAX).await.unwrap();
            let durable = *groups.store.log().durable().borrow();
            assert!(durable >= round, "round {round}: the checkpoint request was answered with the position not durable ({durable})");
            first.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn a_failed_checkpoint_write_keeps_the_positions_queued() {
        let root = std::path::Path::new("/hub");
        let sim = Sim::new(3, root);
        let (env, inline) = sim.env();
        let groups = Groups::open_with(&root.join("checkpoints"), 2, Durability::Always, env).unwrap();
        let _a = groups.join("g", 1).unwrap();
        groups.advance("g", 0, 1, 40);
        groups.advance("g", 1, 1, 7);
        sim.set_faults(Faults { enospc_write: 1.0, ..Faults::default() });
        assert_eq!(groups.flush_clamped(|_| u64::MAX).await.unwrap_err().kind(), ErrorKind::Storage);
        sim.set_faults(Faults::default());
        inline.fire_timers(); // the store retries its write
        groups.flush_clamped(|_| u64::MAX).await.unwrap();
        assert_eq!(groups.store.read(|c| c.by_group["g"].clone()), BTreeMap::from([(0, 40), (1, 7)]));
    }

    #[tokio::test]
    async fn a_checkpoint_never_points_past_what_its_partition_fsynced() {
        let dir = tempfile::tempdir().unwrap();
        let groups = Groups::open(dir.path(), 1, Durability::Always).unwrap();
        let _a = groups.join("g", 1).unwrap();
        groups.advance("g", 0, 1, 100);
        groups.flush_clamped(|_| 60).await.unwrap();
        assert_eq!(groups.max_checkpoint(0), 60, "clamped to the partition's fsync'd head");
        groups.flush_clamped(|_| 1000).await.unwrap();
        assert_eq!(groups.max_checkpoint(0), 100, "the rest follows once it is on disk");
    }
}
