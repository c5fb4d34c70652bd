//! Outcome notifications (`docs/protocol.md`, "Outcome notifications"): which service
//! connections of this hub node wait for the outcome of which C2D message id, and a bounded
//! cache of the newest outcomes, so a watch that arrives after its outcome (a reconnect gap, a
//! re-sent watch) is answered at once. Backend-independent: every backend reports the feedback
//! records it produces (on any node) to [`OutcomeRouter::record`], and the service sessions of
//! this node watch and unwatch through it.
//!
//! [`Watches`] is the pure part (no clock, no sockets; time is passed in). Invariants:
//! - a connection watches at most `per_conn` ids; a watch that would pass the bound is refused
//!   whole (`QueueFull`) and changes nothing;
//! - a record removes every watch of its message id (each watcher is told once) and enters the
//!   cache; the cache holds at most `cache` records, the newest per message id, and evicts in
//!   the order records arrived (oldest first);
//! - only a re-sent watch (`since` given) is answered from the cache, and only by a record that
//!   arrived at or after `since`: a first watch is sent before its message, so whatever the cache
//!   holds for that id belongs to an earlier message that reused the id.
//!
//! Records are shared-queue records too: the notification is an extra copy for the waiting
//! connection, never taken from the hub-wide feedback queue.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::c2d::FeedbackRecord;
use crate::error::{Error, ErrorKind, Result};

/// Message ids one service connection may watch at a time.
pub const MAX_WATCHES_PER_CONNECTION: usize = crate::proto::MAX_WATCHES;
/// Recent outcomes a hub node keeps for watches that arrive late.
pub const OUTCOME_CACHE: usize = 10_000;

/// The watcher map and the recent-outcome cache (pure; see the module invariants).
#[derive(Debug)]
pub struct Watches {
    per_conn: usize,
    cache_cap: usize,
    /// Message id → connections watching it.
    by_id: HashMap<String, Vec<u64>>,
    /// Connection → the ids it watches.
    by_conn: HashMap<u64, HashSet<String>>,
    /// Message id → (arrival number, arrival time ms, record): the newest record of the id.
    cache: HashMap<String, (u64, u64, FeedbackRecord)>,
    /// (arrival number, message id), oldest first; entries of ids re-recorded since are stale
    /// (at most as many as the cache holds).
    order: VecDeque<(u64, String)>,
    arrivals: u64,
}

impl Watches {
    /// An empty map: at most `per_conn` ids per connection, `cache` records cached.
    pub fn new(per_conn: usize, cache: usize) -> Watches {
        Watches {
            per_conn,
            cache_cap: cache,
            by_id: HashMap::new(),
            by_conn: HashMap::new(),
            cache: HashMap::new(),
            order: VecDeque::new(),
            arrivals: 0,
        }
    }

    /// Connection `conn` watches `ids`. With `since` (a re-sent watch: the hub time the first
    /// watch was answered with), ids whose record arrived at or after `since` are answered from
    /// the cache instead of watched; the answers are returned. `QueueFull` if the new watches
    /// would pass the per-connection bound (nothing is changed then).
    pub fn watch(&mut self, conn: u64, ids: &[String], since: Option<u64>) -> Result<Vec<FeedbackRecord>> {
        let mut answers = Vec::new();
        let mut new: Vec<&String> = Vec::new();
        let mine = self.by_conn.get(&conn);
        let mut seen = HashSet::new();
        for id in ids {
            if !seen.insert(id.as_str()) {
                continue;
            }
            if let (Some(s), Some((_, at, rec))) = (since, self.cache.get(id)) {
                if *at >= s {
                    answers.push(rec.clone());
                    continue;
                }
            }
            if !mine.is_some_and(|m| m.contains(id)) {
                new.push(id);
            }
        }
        let have = mine.map_or(0, |m| m.len());
        if have + new.len() > self.per_conn {
            return Err(Error::new(
                ErrorKind::QueueFull,
                format!(
                    "this connection already waits for {have} outcomes and asked for {} more (limit {}); wait for some to finish \
                     or cancel them before waiting for more",
                    new.len(),
                    self.per_conn
                ),
            ));
        }
        if !new.is_empty() {
            let set = self.by_conn.entry(conn).or_default();
            for id in new {
                set.insert(id.clone());
                self.by_id.entry(id.clone()).or_default().push(conn);
            }
        }
        Ok(answers)
    }

    /// Connection `conn` no longer watches `ids` (ids it does not watch are ignored).
    pub fn unwatch(&mut self, conn: u64, ids: &[String]) {
        let Some(set) = self.by_conn.get_mut(&conn) else { return };
        let gone: Vec<&String> = ids.iter().filter(|id| set.remove(*id)).collect();
        if set.is_empty() {
            self.by_conn.remove(&conn);
        }
        for id in gone {
            self.drop_watcher(id, conn);
        }
    }

    /// Forgets every watch of connection `conn` (it closed).
    pub fn drop_conn(&mut self, conn: u64) {
        for id in self.by_conn.remove(&conn).unwrap_or_default() {
            self.drop_watcher(&id, conn);
        }
    }

    fn drop_watcher(&mut self, id: &str, conn: u64) {
        if let Some(v) = self.by_id.get_mut(id) {
            v.retain(|c| *c != conn);
            if v.is_empty() {
                self.by_id.remove(id);
            }
        }
    }

    /// A record arrived at `now_ms`: caches it and returns the connections that watched its
    /// message id (their watches are gone).
    pub fn record(&mut self, rec: &FeedbackRecord, now_ms: u64) -> Vec<u64> {
        let id = rec.original_message_id.clone();
        let conns = self.by_id.remove(&id).unwrap_or_default();
        for c in &conns {
            if let Some(set) = self.by_conn.get_mut(c) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_conn.remove(c);
                }
            }
        }
        if self.cache_cap > 0 {
            self.arrivals += 1;
            let n = self.arrivals;
            self.cache.insert(id.clone(), (n, now_ms, rec.clone()));
            self.order.push_back((n, id));
            while self.cache.len() > self.cache_cap {
                let (old, id) = self.order.pop_front().expect("every cached record is in the order");
                if self.cache.get(&id).is_some_and(|(n, _, _)| *n == old) {
                    self.cache.remove(&id);
                }
            }
            // Entries of re-recorded ids are stale: drop them before they outnumber the rest.
            if self.order.len() > 2 * self.cache_cap {
                let cache = &self.cache;
                self.order.retain(|(n, id)| cache.get(id).is_some_and(|(m, _, _)| m == n));
            }
        }
        conns
    }

    /// Ids connection `conn` watches.
    pub fn watched(&self, conn: u64) -> usize {
        self.by_conn.get(&conn).map_or(0, |s| s.len())
    }

    /// (connection, id) watches of every connection.
    pub fn total_watched(&self) -> usize {
        self.by_conn.values().map(|s| s.len()).sum()
    }

    /// Records in the cache.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// Whether the cache holds a record of `message_id`.
    pub fn is_cached(&self, message_id: &str) -> bool {
        self.cache.contains_key(message_id)
    }
}

/// Where a connection's notifications go: the records for it, in arrival order.
pub type NotificationTx = mpsc::UnboundedSender<FeedbackRecord>;

/// The [`Watches`] of one hub node and the notification channels of its service connections.
/// Every record a backend reports goes through [`OutcomeRouter::record`]. The channels are
/// unbounded, yet hold at most what their connection watched plus what its watches were
/// answered with from the cache: each record removes the watch it satisfies.
pub struct OutcomeRouter {
    inner: Mutex<(Watches, HashMap<u64, NotificationTx>)>,
}

impl std::fmt::Debug for OutcomeRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutcomeRouter").finish_non_exhaustive()
    }
}

impl OutcomeRouter {
    /// A router with the default bounds ([`MAX_WATCHES_PER_CONNECTION`], [`OUTCOME_CACHE`]).
    pub fn new() -> Arc<OutcomeRouter> {
        OutcomeRouter::with_bounds(MAX_WATCHES_PER_CONNECTION, OUTCOME_CACHE)
    }

    /// A router with explicit bounds.
    pub fn with_bounds(per_conn: usize, cache: usize) -> Arc<OutcomeRouter> {
        Arc::new(OutcomeRouter { inner: Mutex::new((Watches::new(per_conn, cache), HashMap::new())) })
    }

    /// A record arrived: every connection watching its id is sent a copy.
    pub fn record(&self, rec: FeedbackRecord) {
        let mut g = self.inner.lock();
        let (watches, conns) = &mut *g;
        for c in watches.record(&rec, crate::message::now_ms()) {
            if let Some(tx) = conns.get(&c) {
                let _ = tx.send(rec.clone());
            }
        }
    }

    /// Connection `conn` watches `ids` (see [`Watches::watch`]); its notifications, and the
    /// answers from the cache, go to `tx` (kept for the connection until [`OutcomeRouter::close`]).
    pub fn watch(&self, conn: u64, tx: &NotificationTx, ids: &[String], since: Option<u64>) -> Result<()> {
        let mut g = self.inner.lock();
        let (watches, conns) = &mut *g;
        let answers = watches.watch(conn, ids, since)?;
        conns.entry(conn).or_insert_with(|| tx.clone());
        for r in answers {
            let _ = tx.send(r);
        }
        Ok(())
    }

    /// Connection `conn` no longer watches `ids`.
    pub fn unwatch(&self, conn: u64, ids: &[String]) {
        self.inner.lock().0.unwatch(conn, ids);
    }

    /// Connection `conn` closed: its watches and channel are dropped.
    pub fn close(&self, conn: u64) {
        let mut g = self.inner.lock();
        g.0.drop_conn(conn);
        g.1.remove(&conn);
    }

    /// Runs `f` on the watches (tests, gauges).
    pub fn inspect<R>(&self, f: impl FnOnce(&Watches) -> R) -> R {
        f(&self.inner.lock().0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::FeedbackStatus;

    fn rec(id: &str) -> FeedbackRecord {
        super::super::c2d::feedback_record(id, "d", "g", FeedbackStatus::Success, 0)
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_record_goes_to_every_watcher_once_and_drops_the_watches() {
        let mut w = Watches::new(10, 10);
        w.watch(1, &ids(&["a", "b"]), None).unwrap();
        w.watch(2, &ids(&["a"]), None).unwrap();
        let mut got = w.record(&rec("a"), 5);
        got.sort();
        assert_eq!(got, vec![1, 2]);
        assert_eq!(w.record(&rec("a"), 6), Vec::<u64>::new(), "a second record of the id goes to nobody");
        assert_eq!((w.watched(1), w.watched(2), w.total_watched()), (1, 0, 1));
        assert_eq!(w.record(&rec("unwatched"), 7), Vec::<u64>::new());
    }

    #[test]
    fn watching_the_same_id_twice_counts_once() {
        let mut w = Watches::new(2, 10);
        w.watch(1, &ids(&["a", "a"]), None).unwrap();
        w.watch(1, &ids(&["a"]), None).unwrap();
        assert_eq!(w.watched(1), 1);
        assert_eq!(w.record(&rec("a"), 1), vec![1], "one notification, not one per watch call");
    }

    #[test]
    fn the_per_connection_bound_refuses_the_whole_watch_and_changes_nothing() {
        let mut w = Watches::new(3, 10);
        w.watch(1, &ids(&["a", "b"]), None).unwrap();
        let e = w.watch(1, &ids(&["c", "d"]), None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::QueueFull);
        assert!(e.to_string().contains("limit 3"), "{e}");
        assert_eq!(w.watched(1), 2);
        assert!(w.record(&rec("c"), 1).is_empty(), "a refused watch registered nothing");
        // Ids already watched do not count again; other connections have their own bound.
        w.watch(1, &ids(&["a", "b", "c"]), None).unwrap();
        w.watch(2, &ids(&["x", "y", "z"]), None).unwrap();
        // A finished watch makes room.
        w.record(&rec("a"), 2);
        w.watch(1, &ids(&["d"]), None).unwrap();
        assert_eq!(w.watched(1), 3);
    }

    #[test]
    fn unwatch_and_close_forget_watches() {
        let mut w = Watches::new(10, 10);
        w.watch(1, &ids(&["a", "b"]), None).unwrap();
        w.watch(2, &ids(&["a"]), None).unwrap();
        w.unwatch(1, &ids(&["a", "never"]));
        assert_eq!(w.record(&rec("a"), 1), vec![2]);
        w.drop_conn(1);
        assert_eq!(w.watched(1), 0);
        assert!(w.record(&rec("b"), 2).is_empty());
    }

    #[test]
    fn only_a_resent_watch_is_answered_from_the_cache_and_only_by_a_record_since() {
        let mut w = Watches::new(10, 10);
        w.record(&rec("a"), 100);
        // A first watch: the cached record is an earlier message's that reused the id.
        assert!(w.watch(1, &ids(&["a"]), None).unwrap().is_empty());
        assert_eq!(w.watched(1), 1);
        w.drop_conn(1);
        // Re-sent, first answered at 150: the record of 100 is not this message's.
        assert!(w.watch(1, &ids(&["a"]), Some(150)).unwrap().is_empty());
        w.drop_conn(1);
        // Re-sent, first answered at 100 or before: answered, and not watched any more.
        let got = w.watch(1, &ids(&["a", "b"]), Some(90)).unwrap();
        assert_eq!(got.iter().map(|r| r.original_message_id.as_str()).collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(w.watched(1), 1, "only b is watched");
    }

    #[test]
    fn the_cache_keeps_the_newest_records_and_evicts_oldest_first() {
        let mut w = Watches::new(10, 3);
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            w.record(&rec(id), i as u64);
        }
        // Re-recording b makes it the newest: the next record evicts a, then c.
        w.record(&rec("b"), 10);
        assert_eq!(w.cached(), 3);
        w.record(&rec("d"), 11);
        assert!(!w.is_cached("a") && w.is_cached("b") && w.is_cached("c") && w.is_cached("d"));
        w.record(&rec("e"), 12);
        assert!(!w.is_cached("c") && w.is_cached("b"), "c arrived before b's second record");
        assert_eq!(w.cached(), 3);
        w.record(&rec("f"), 13);
        assert!(!w.is_cached("b"));
        assert_eq!(w.cached(), 3);
        // The arrival time of the newest record of an id is what a re-sent watch compares.
        let got = w.watch(1, &ids(&["f"]), Some(13)).unwrap();
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn re_recording_one_id_keeps_the_order_bounded() {
        let mut w = Watches::new(10, 4);
        for i in 0..100 {
            w.record(&rec("same"), i);
        }
        assert_eq!(w.cached(), 1);
        assert!(w.order.len() <= 8, "{} order entries", w.order.len());
        for id in ["a", "b", "c", "d"] {
            w.record(&rec(id), 200);
        }
        assert!(!w.is_cached("same") && w.cached() == 4);
    }

    #[test]
    fn a_cache_of_zero_keeps_nothing() {
        let mut w = Watches::new(10, 0);
        w.record(&rec("a"), 1);
        assert_eq!(w.cached(), 0);
        assert!(w.watch(1, &ids(&["a"]), Some(0)).unwrap().is_empty());
    }

    #[test]
    fn the_router_sends_answers_and_notifications_to_the_connection() {
        let r = OutcomeRouter::with_bounds(10, 10);
        let (tx, mut rx) = mpsc::unbounded_channel();
        r.record(rec("early"));
        r.watch(7, &tx, &ids(&["early", "late"]), Some(0)).unwrap();
        assert_eq!(rx.try_recv().unwrap().original_message_id, "early");
        assert!(rx.try_recv().is_err());
        r.record(rec("late"));
        assert_eq!(rx.try_recv().unwrap().original_message_id, "late");
        r.watch(7, &tx, &ids(&["gone"]), None).unwrap();
        r.close(7);
        r.record(rec("gone"));
        assert!(rx.try_recv().is_err(), "a closed connection is sent nothing");
        assert_eq!(r.inspect(|w| w.watched(7)), 0);
    }
}
