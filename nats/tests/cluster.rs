//! The JetStream backend against a real 3-node cluster of `nats-server` 2.15.1 processes on
//! loopback (each test starts and stops its own). Every scenario is bounded (well under 30 s on
//! an idle machine) and asserts on outcomes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use hubmsg_core::hub::c2d::{AckMode, FeedbackStatus, Settle};
use hubmsg_core::hub::events::partition_for;
use hubmsg_core::proto::{CreateDevice, DeviceStatus, StartPosition};
use hubmsg_core::{ErrorKind, Message};
use hubmsg_nats::backend::{Backend, C2dEnqueue, RegistryChange, Settled};
use hubmsg_nats::cluster::Cluster;
use hubmsg_nats::{NatsBackend, NatsConfig};

const READY: Duration = Duration::from_secs(20);

async fn cluster() -> Cluster {
    Cluster::start(3, READY).await.expect("start a 3-node cluster (run nats/install-server.sh if nats-server is missing)")
}

fn config(c: &Cluster, node: &str) -> NatsConfig {
    let mut cfg = NatsConfig::new(c.urls());
    cfg.node = node.into();
    cfg.partitions = 2;
    cfg.lease_ttl = Duration::from_secs(2);
    cfg.c2d.lock = Duration::from_secs(2);
    cfg.d2c_max_bytes = 64 << 20;
    cfg
}

async fn backend(c: &Cluster, node: &str) -> NatsBackend {
    NatsBackend::connect(config(c, node)).await.expect("connect the backend")
}

fn record(body: &str, id: &str) -> Bytes {
    Message::new(body.as_bytes().to_vec()).with_message_id(id.to_string()).to_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d2c_appends_in_order_dedupes_and_loses_nothing_when_the_partition_leader_is_killed() {
    let mut c = cluster().await;
    let b = backend(&c, "hub-a").await;
    let ev = b.events();
    let dev = "pump.7*$x";
    let p = partition_for(dev, ev.partitions());

    // In order, and a re-send of the same message ids is a duplicate of the first copy.
    let mut seqs = Vec::new();
    for i in 0..100 {
        let t = ev.append(p, dev, Some(&format!("m{i}")), record(&format!("v{i}"), &format!("m{i}"))).await.unwrap();
        seqs.push(t);
    }
    let mut got = Vec::new();
    for t in seqs {
        let a = t.await.unwrap();
        assert!(!a.duplicate);
        got.push(a.seq);
    }
    assert!(got.windows(2).all(|w| w[0] < w[1]), "sequence numbers follow submission order");
    for (i, first) in got.iter().enumerate().take(10) {
        let a = ev.append(p, dev, Some(&format!("m{i}")), record("again", &format!("m{i}"))).await.unwrap().await.unwrap();
        assert!(a.duplicate, "m{i} is a duplicate");
        assert_eq!(a.seq, *first);
    }
    let events = ev.read(p, 1, 1000).await.unwrap();
    assert_eq!(events.len(), 100);
    assert_eq!(Message::decode(&events[5].record).unwrap().body, Bytes::from("v5"));
    let bounds = ev.bounds(p).await.unwrap();
    assert_eq!((bounds.first, bounds.last), (got[0], got[99]));

    // 1000 more, 64 in flight, while the partition's stream leader is SIGKILLed.
    let total = 1000;
    let started = std::time::Instant::now();
    let mut killed_at = None;
    let mut longest = Duration::ZERO;
    let mut inflight = VecDeque::new();
    let mut acked = 0;
    let mut killed = None;
    for i in 0..total {
        let id = format!("k{i}");
        inflight.push_back(ev.append(p, dev, Some(&id), record("x", &id)).await);
        while inflight.len() >= 64 || (i + 1 == total && !inflight.is_empty()) {
            let t = inflight.pop_front().unwrap().expect("submitted");
            let t0 = std::time::Instant::now();
            t.await.expect("every append is acknowledged, through the failover");
            longest = longest.max(t0.elapsed());
            acked += 1;
        }
        if acked >= 200 && killed.is_none() {
            let mut s = b.jetstream().get_stream(hubmsg_nats::names::d2c_stream(p)).await.unwrap();
            let leader = s.info().await.unwrap().cluster.as_ref().and_then(|ci| ci.leader.clone()).expect("stream has a leader");
            let i = c.index_of(&leader).expect("leader is a node");
            c.kill(i).await.unwrap();
            killed = Some(i);
            killed_at = Some(started.elapsed());
        }
    }
    assert_eq!(acked, total);
    let sent_in = started.elapsed();
    c.restart(killed.expect("a node was killed"), READY).await.unwrap();
    let events = ev.read(p, 1, 10_000).await.unwrap();
    let ids: Vec<String> = events.iter().map(|e| Message::decode(&e.record).unwrap().message_id.unwrap()).collect();
    let distinct: HashSet<&String> = ids.iter().collect();
    let lost = (0..total).filter(|i| !distinct.contains(&format!("k{i}"))).count();
    let duplicates = ids.len() - distinct.len();
    println!(
        "d2c failover: {total} sent in {sent_in:?} (leader killed at {:?}, longest ack wait {longest:?}), {lost} lost, {duplicates} duplicates (by message id)",
        killed_at.unwrap()
    );
    assert_eq!(lost, 0);
    b.close().await.unwrap();
    c.stop().await;
}

/// A hub's device sessions each hold up to 1,000 append tickets and resolve them in order, so
/// across sessions far more appends are submitted-not-durable than the NATS client's own
/// publish-ack window (5,000 per JetStream context in async-nats). Submitting must never wait for
/// tickets nobody is polling: it did, and every session of a hub node then waited inside a
/// submission while holding the tickets that would have freed it — a permanent stall of D2C and
/// of every KV write of the node (`hubmsg bench --scenario scale-out`, 100,000 messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d2c_submissions_never_wait_for_tickets_nobody_polls() {
    const SESSIONS: usize = 10;
    const PENDING: usize = 1000; // the hub's session_pending_messages
    let c = Cluster::start(1, READY).await.expect("start a JetStream server (run nats/install-server.sh if nats-server is missing)");
    let mut cfg = config(&c, "hub-a");
    cfg.replicas = 1;
    let b = NatsBackend::connect(cfg).await.expect("connect the backend");
    let ev = b.events();
    // One task submits for every session in turn (deterministic: no ticket is polled meanwhile).
    let mut sessions: Vec<(u32, VecDeque<hubmsg_nats::backend::AppendTicket>)> = Vec::new();
    for s in 0..SESSIONS {
        let dev = format!("pipe-{s}");
        let p = partition_for(&dev, ev.partitions());
        let mut tickets = VecDeque::new();
        for i in 0..PENDING {
            let id = format!("m{i}");
            let submitted = tokio::time::timeout(Duration::from_secs(10), ev.append(p, &dev, Some(&id), record("x", &id))).await;
            let outstanding = s * PENDING + i;
            let t = submitted
                .unwrap_or_else(|_| panic!("submission {i} of session {s} still waiting after 10 s with {outstanding} tickets outstanding"))
                .expect("submitted");
            tickets.push_back(t);
        }
        sessions.push((p, tickets));
    }
    // With all of them outstanding, the node's KV writes (a group join's lease) still go through.
    let m = tokio::time::timeout(Duration::from_secs(10), b.groups().join("g1", "a/1"))
        .await
        .expect("a group join while 10,000 tickets are outstanding completes within 10 s")
        .unwrap();
    m.leave().await.unwrap();
    // Every ticket resolves, in order per session, and each is one stored event.
    let mut stored: HashSet<(u32, u64)> = HashSet::new();
    for (p, tickets) in sessions {
        let mut last = 0;
        for t in tickets {
            let a = tokio::time::timeout(Duration::from_secs(30), t).await.expect("ticket resolves").expect("append is durable");
            assert!(!a.duplicate && a.seq > last, "in order and new");
            last = a.seq;
            stored.insert((p, a.seq));
        }
    }
    assert_eq!(stored.len(), SESSIONS * PENDING);
    let mut in_streams = 0;
    for p in 0..ev.partitions() {
        let bounds = ev.bounds(p).await.unwrap();
        in_streams += bounds.last + 1 - bounds.first;
    }
    assert_eq!(in_streams as usize, SESSIONS * PENDING, "every append stored once");
    b.close().await.unwrap();
    c.stop().await;
}

/// A member renews its leases once per tick (lease / 4), however often the lease bucket changes.
/// It renewed every owned partition on every pass, and its own renewals woke the next pass
/// through its watch of the bucket: hundreds of lease writes (and as many key listings, each an
/// ephemeral consumer) per second for as long as it was a member, competing with D2C for the
/// cluster and, once the listings' consumers piled up, failing with "maximum consumers limit
/// reached".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_member_writes_its_leases_once_per_tick() {
    let c = Cluster::start(1, READY).await.expect("start a JetStream server (run nats/install-server.sh if nats-server is missing)");
    let mut cfg = config(&c, "hub-a");
    cfg.replicas = 1;
    let b = NatsBackend::connect(cfg).await.expect("connect the backend");
    let m = b.groups().join("g1", "a/1").await.unwrap();
    let mut w = m.assignment();
    tokio::time::timeout(Duration::from_secs(10), w.wait_for(|v| *v == vec![0, 1])).await.expect("owns both partitions").unwrap();
    let writes = || async {
        let mut s = b.jetstream().get_stream("KV_hubmsg_groups").await.unwrap();
        s.info().await.unwrap().state.last_sequence
    };
    let before = writes().await;
    let watched = Duration::from_secs(3);
    tokio::time::sleep(watched).await;
    let n = writes().await - before;
    // Lease 2 s → a tick of 500 ms: 3 keys (the member and 2 partitions) 6 times in 3 s = 18.
    println!("lease writes in {watched:?}: {n}");
    assert!(n <= 30, "{n} lease writes in {watched:?}; at most 3 keys per 500 ms tick expected");
    m.leave().await.unwrap();
    b.close().await.unwrap();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_group_members_share_partitions_and_take_over_a_dead_members() {
    let c = cluster().await;
    let a = backend(&c, "hub-a").await;
    let b = backend(&c, "hub-b").await;
    // 20 events in each partition.
    for p in 0..2 {
        for i in 0..20 {
            a.events().append(p, &format!("d{p}"), Some(&format!("e{i}")), record("e", &format!("e{i}"))).await.unwrap().await.unwrap();
        }
    }
    let ma = a.groups().join("g1", "a/1").await.unwrap();
    let mut wa = ma.assignment();
    wa.wait_for(|v| *v == vec![0, 1]).await.unwrap();
    let mb = b.groups().join("g1", "b/1").await.unwrap();
    let mut wb = mb.assignment();
    tokio::time::timeout(Duration::from_secs(10), wa.wait_for(|v| *v == vec![0])).await.expect("a keeps partition 0").unwrap();
    tokio::time::timeout(Duration::from_secs(10), wb.wait_for(|v| *v == vec![1])).await.expect("b takes partition 1").unwrap();

    // b reads partition 1 and acknowledges 5 of 10 delivered (1..=5), then dies.
    let mut rb = mb.open(1, StartPosition::Checkpoint, 100).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 10 {
        seen.extend(rb.next(10 - seen.len(), Duration::from_secs(5)).await.unwrap());
    }
    let first = seen[0].seq;
    for e in &seen[..5] {
        rb.ack(e.seq).await.unwrap();
    }
    assert_eq!(rb.checkpoint().await.unwrap(), seen[4].seq);
    drop(rb);
    drop(mb); // dies: no leave, the leases expire

    tokio::time::timeout(Duration::from_secs(15), wa.wait_for(|v| *v == vec![0, 1])).await.expect("a takes over partition 1").unwrap();
    let mut ra = ma.open(1, StartPosition::Checkpoint, 100).await.unwrap();
    let mut rest = Vec::new();
    while rest.len() < 15 {
        let got = ra.next(100, Duration::from_secs(5)).await.unwrap();
        assert!(!got.is_empty(), "redelivery after takeover is immediate");
        rest.extend(got);
    }
    assert_eq!(rest[0].seq, seen[4].seq + 1, "resumes right after the checkpoint");
    assert_eq!(rest.last().unwrap().seq, first + 19);
    for e in &rest {
        ra.ack(e.seq).await.unwrap();
    }
    assert_eq!(ra.checkpoint().await.unwrap(), first + 19);

    // Explicit start positions (a new group).
    let m2 = a.groups().join("g2", "a/2").await.unwrap();
    m2.assignment().wait_for(|v| v.len() == 2).await.unwrap();
    let mut r = m2.open(0, StartPosition::Sequence(10), 100).await.unwrap();
    assert_eq!(r.next(1, Duration::from_secs(5)).await.unwrap()[0].seq, 10);
    let mut r = m2.open(0, StartPosition::Latest, 100).await.unwrap();
    assert!(r.next(1, Duration::from_millis(300)).await.unwrap().is_empty(), "latest skips stored events");
    let s = a.events().append(0, "d0", Some("new"), record("n", "new")).await.unwrap().await.unwrap().seq;
    assert_eq!(r.next(1, Duration::from_secs(5)).await.unwrap()[0].seq, s);
    let t = a.events().read(0, 15, 1).await.unwrap()[0].stored_ms;
    let mut r = m2.open(0, StartPosition::Time(t), 100).await.unwrap();
    assert!(r.next(1, Duration::from_secs(5)).await.unwrap()[0].seq <= 15);
    m2.leave().await.unwrap();
    ma.leave().await.unwrap();
    assert!(ma.assignment().borrow().is_empty());
    a.close().await.unwrap();
    b.close().await.unwrap();
    c.stop().await;
}

fn send(dev: &str, id: &str, ack: AckMode, ttl: Option<Duration>) -> C2dEnqueue {
    C2dEnqueue {
        device_id: dev.into(),
        generation_id: "123".into(),
        message_id: id.into(),
        ack,
        ttl,
        record: Message::new(id.as_bytes().to_vec()).to_bytes(),
        size: id.len(),
        send_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c2d_lifecycle_depth_abandon_reject_lock_ttl_purge_and_feedback() {
    let c = cluster().await;
    let b = backend(&c, "hub-a").await;
    let q = b.c2d();
    let dev = "valve#1.a";

    // Depth 50; the 51st is QUEUE_FULL; purge removes them all with Purged feedback.
    for i in 0..50 {
        q.send(send(dev, &format!("p{i}"), AckMode::Full, None)).await.unwrap();
    }
    let e = q.send(send(dev, "p50", AckMode::Full, None)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::QueueFull, "{e}");
    assert!(e.message().contains("50"), "{e}");
    assert_eq!(q.depth(dev).await.unwrap(), 50);
    assert!(q.send(send("other", "o", AckMode::None, None)).await.is_ok(), "other devices are unaffected");
    assert_eq!(q.purge(dev).await.unwrap(), 50);
    assert_eq!(q.depth(dev).await.unwrap(), 0);
    let batch = b.feedback().next_batch(1, Duration::from_secs(1)).await.unwrap().expect("a batch of Purged feedback");
    assert_eq!(batch.records.len(), 50);
    assert!(batch.records.iter().all(|r| r.status_code == FeedbackStatus::Purged && r.device_id == dev));
    b.feedback().ack_batch(batch.id).await.unwrap();
    assert!(b.feedback().next_batch(1, Duration::from_millis(500)).await.unwrap().is_none(), "an acknowledged batch is gone");

    // Abandon ×10 → DeliveryCountExceeded; the count shows in each delivery.
    let mut dq = q.open_device(dev, 1, 10).await.unwrap();
    q.send(send(dev, "ab", AckMode::Full, None)).await.unwrap();
    for i in 0..10u32 {
        let d = dq.next(Duration::from_secs(5)).await.unwrap().expect("delivered again");
        assert_eq!(d.message.message_id.as_deref(), Some("ab"));
        let count = d.message.system.iter().find(|(k, _)| k == "iothub-deliverycount").map(|(_, v)| v.clone());
        assert_eq!(count, Some(i.to_string()));
        let s = dq.settle(d.seq, Settle::Abandon).await.unwrap();
        if i < 9 {
            assert_eq!(s, Settled::Requeued(i + 1));
        } else {
            assert_eq!(s, Settled::Done(FeedbackStatus::DeliveryCountExceeded));
        }
    }
    // Reject.
    q.send(send(dev, "rej", AckMode::Negative, None)).await.unwrap();
    let d = dq.next(Duration::from_secs(5)).await.unwrap().unwrap();
    assert_eq!(dq.settle(d.seq, Settle::Reject).await.unwrap(), Settled::Done(FeedbackStatus::Rejected));
    // Lock expiry: the message comes back without a count bump; a late settle is LOCK_LOST.
    q.send(send(dev, "lock", AckMode::Full, None)).await.unwrap();
    let d = dq.next(Duration::from_secs(5)).await.unwrap().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    let expired = loop {
        let r = dq.expire_locks().await.unwrap();
        if !r.is_empty() {
            break r;
        }
        assert!(tokio::time::Instant::now() < deadline, "the 2 s lock did not expire");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(expired, vec![d.seq]);
    assert_eq!(dq.settle(d.seq, Settle::Complete).await.unwrap_err().kind(), ErrorKind::LockLost);
    let again = dq.next(Duration::from_secs(5)).await.unwrap().unwrap();
    assert_eq!(again.seq, d.seq);
    let count = again.message.system.iter().find(|(k, _)| k == "iothub-deliverycount").map(|(_, v)| v.clone());
    assert_eq!(count.as_deref(), Some("0"), "a lock expiry does not count as a delivery");
    assert_eq!(dq.settle(again.seq, Settle::Complete).await.unwrap(), Settled::Done(FeedbackStatus::Success));
    dq.close().await.unwrap();

    // TTL → Expired by the sweeper (no session holds the queue).
    q.send(send(dev, "ttl", AckMode::Full, Some(Duration::from_secs(1)))).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    while q.sweep().await.unwrap() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the sweeper did not expire the message");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(q.depth(dev).await.unwrap(), 0);

    // The feedback of all of it, in batches acknowledged one by one.
    let mut statuses = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while statuses.len() < 4 {
        assert!(tokio::time::Instant::now() < deadline, "feedback missing: got {statuses:?}");
        if let Some(batch) = b.feedback().next_batch(2, Duration::from_millis(500)).await.unwrap() {
            for r in &batch.records {
                statuses.insert(r.original_message_id.clone(), r.status_code);
            }
            b.feedback().ack_batch(batch.id).await.unwrap();
        }
    }
    assert_eq!(statuses["ab"], FeedbackStatus::DeliveryCountExceeded);
    assert_eq!(statuses["rej"], FeedbackStatus::Rejected);
    assert_eq!(statuses["lock"], FeedbackStatus::Success);
    assert_eq!(statuses["ttl"], FeedbackStatus::Expired);
    let counters: HashMap<String, u64> = b.counters().all().await.unwrap().into_iter().collect();
    assert_eq!(counters.get("c2d.Purged"), Some(&50));
    assert_eq!(counters.get("c2d.DeliveryCountExceeded"), Some(&1));
    b.close().await.unwrap();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_crud_with_optimistic_updates_watch_and_session_takeover() {
    let c = cluster().await;
    let a = backend(&c, "hub-a").await;
    let b = backend(&c, "hub-b").await;
    let mut watch_b = b.registry().watch();
    let id = "pump.7*$x";
    let d = a.registry().create(CreateDevice { device_id: id.into(), ..Default::default() }).await.unwrap();
    let e = b.registry().create(CreateDevice { device_id: id.into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert_eq!(b.registry().device(id).await.unwrap().unwrap(), d);
    let change = tokio::time::timeout(Duration::from_secs(5), watch_b.recv()).await.unwrap().unwrap();
    assert_eq!(change, RegistryChange::Put(d.clone()));
    assert!(a.registry().create(CreateDevice { device_id: "a/b".into(), ..Default::default() }).await.is_err());

    // Concurrent read-modify-write on two nodes: none is lost.
    let (ra, rb) = (a.registry(), b.registry());
    let ups_a = async {
        for _ in 0..8 {
            ra.update(id, None, Some("primary")).await.unwrap();
        }
    };
    let ups_b = async {
        for _ in 0..8 {
            rb.update(id, Some(DeviceStatus::Disabled), Some("secondary")).await.unwrap();
        }
    };
    tokio::join!(ups_a, ups_b);
    let now = a.registry().device(id).await.unwrap().unwrap();
    assert_eq!(now.status, DeviceStatus::Disabled);
    assert_ne!(now.primary_key, d.primary_key);
    assert_ne!(now.secondary_key, d.secondary_key);
    assert_eq!(now.generation_id, d.generation_id);
    assert_eq!(a.registry().devices().await.unwrap().len(), 1);
    a.registry().delete(id).await.unwrap();
    assert_eq!(b.registry().delete(id).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert!(b.registry().device(id).await.unwrap().is_none());
    let mut deleted = false;
    while let Ok(Ok(ch)) = tokio::time::timeout(Duration::from_secs(5), watch_b.recv()).await {
        if ch == RegistryChange::Deleted(id.into()) {
            deleted = true;
            break;
        }
    }
    assert!(deleted, "node b saw the delete");
    let pa = a.registry().policy("iothubowner").await.unwrap().unwrap();
    assert_eq!(b.registry().policy("iothubowner").await.unwrap().unwrap(), pa, "one set of policies for every node");

    // A new session of the device on node b ends the one on node a.
    let old = a.sessions().claim(id, 1).await.unwrap();
    let new = b.sessions().claim(id, 7).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), old.superseded.notified()).await.expect("the old session is told to end");
    a.sessions().release(old).await.unwrap();
    let again = b.sessions().claim(id, 8).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), new.superseded.notified()).await.expect("a newer local claim supersedes too");
    b.sessions().release(again).await.unwrap();
    // Persistent subscriptions.
    assert!(!a.c2d().subscribed(id).await.unwrap());
    a.c2d().set_subscription(id, true).await.unwrap();
    assert!(b.c2d().subscribed(id).await.unwrap());
    a.close().await.unwrap();
    b.close().await.unwrap();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_refuses_a_server_without_jetstream() {
    let bin = hubmsg_nats::cluster::server_binary().expect("nats-server installed");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = tokio::process::Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let mut cfg = NatsConfig::new(url.clone());
    cfg.replicas = 1;
    let mut err = None;
    for _ in 0..100 {
        match NatsBackend::connect(cfg.clone()).await {
            Err(e) if e.kind() == ErrorKind::Disconnected => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => {
                err = Some(e);
                break;
            }
            Ok(_) => panic!("a server without JetStream was accepted"),
        }
    }
    let e = err.expect("the server came up");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.message().contains("JetStream") && e.message().contains(&url), "{e}");
    child.start_kill().unwrap();
    let _ = child.wait().await;
}
