//! D2C end to end through an in-process hub: device client → durable log → consumer groups.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use hubmsg_core::outbox::{OutboxOptions, Outcome, Overflow};
use hubmsg_core::proto::StartPosition;
use hubmsg_core::{ConnectionStatus, ErrorKind, Message};

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_arrives_in_order_with_properties_and_hub_stamps() {
    let h = start_hub().await;
    let dev = device(&h.hub, "pump-1").await;
    let mut deliveries = Vec::new();
    for i in 0..200 {
        let m = Message::new(format!("reading {i}"))
            .with_property("seq", i.to_string())
            .with_property("unit", "°C & more")
            .with_content("application/json", "utf-8")
            .with_correlation_id(format!("c{i}"));
        deliveries.push(dev.send(m).await.unwrap());
    }
    for d in deliveries {
        assert_eq!(d.outcome().await.unwrap(), Outcome::Delivered);
    }
    let svc = service(&h.hub).await;
    let mut events = svc.events("$Default", StartPosition::Earliest).await.unwrap();
    for i in 0..200 {
        let ev = events.next_timeout(T).await.unwrap().expect("event");
        let m = ev.message();
        assert_eq!(m.body, format!("reading {i}"));
        assert_eq!(m.property("seq"), Some(i.to_string().as_str()));
        assert_eq!(m.property("unit"), Some("°C & more"));
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.correlation_id.as_deref(), Some(format!("c{i}").as_str()));
        assert!(m.message_id.is_some(), "$.mid is always set");
        assert!(m.creation_time_ms.is_some());
        assert_eq!(ev.device_id(), "pump-1");
        assert!(m.system_property("iothub-connection-auth-generation-id").is_some());
        assert!(m.system_property("iothub-connection-auth-method").unwrap().contains("\"scope\":\"device\""));
        assert!(ev.enqueued_time_ms() > 0);
        ev.ack();
    }
    let st = dev.stats();
    assert_eq!((st.outbox.delivered, st.outbox.depth, st.outbox.in_flight), (200, 0, 0));
    assert_eq!(dev.status(), ConnectionStatus::Connected);
    events.checkpoint().await.unwrap();
    events.close().await;
    dev.close().await.unwrap();
    h.hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_events_are_redelivered_and_acked_ones_are_not() {
    let h = start_hub().await;
    let dev = device(&h.hub, "d1").await;
    for i in 0..20 {
        dev.send(Message::new(format!("{i}"))).await.unwrap();
    }
    dev.flush(T).await.unwrap();
    let svc = service(&h.hub).await;
    let mut ev = svc.events("g1", StartPosition::Checkpoint).await.unwrap();
    for _ in 0..10 {
        ev.next_timeout(T).await.unwrap().unwrap().ack();
    }
    // Take five more without acking them.
    for _ in 0..5 {
        ev.next_timeout(T).await.unwrap().unwrap();
    }
    ev.checkpoint().await.unwrap();
    ev.close().await;
    let mut ev = svc.events("g1", StartPosition::Checkpoint).await.unwrap();
    let first = ev.next_timeout(T).await.unwrap().unwrap();
    assert_eq!(first.body(), "10", "resumes right after the last acknowledged event");
    // Another group is independent and starts at the beginning.
    let mut other = svc.events("g2", StartPosition::Checkpoint).await.unwrap();
    assert_eq!(other.next_timeout(T).await.unwrap().unwrap().body(), "0");
    h.hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_share_partitions_and_take_over_when_one_leaves() {
    let h = start_hub().await;
    let svc = service(&h.hub).await;
    let mut a = svc.events("workers", StartPosition::Earliest).await.unwrap();
    // Give `a` time to join first so the assignment order is deterministic.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut b = svc.events("workers", StartPosition::Earliest).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut sent = HashSet::new();
    for d in 0..16 {
        let dev = device(&h.hub, &format!("dev-{d}")).await;
        for i in 0..5 {
            let m = Message::new("x").with_message_id(format!("dev-{d}/{i}"));
            dev.send(m).await.unwrap();
            sent.insert(format!("dev-{d}/{i}"));
        }
        dev.flush(T).await.unwrap();
        dev.close().await.unwrap();
    }
    // Each member gets a disjoint set of partitions; b receives but does not ack, then leaves.
    let mut parts_a = HashSet::new();
    let mut parts_b = HashSet::new();
    let mut got = HashSet::new();
    let deadline = tokio::time::Instant::now() + T;
    while got.len() < sent.len() && tokio::time::Instant::now() < deadline {
        tokio::select! {
            Ok(Some(e)) = a.next_timeout(Duration::from_millis(100)) => {
                parts_a.insert(e.partition);
                got.insert(e.message_id().unwrap().to_string());
                e.ack();
            }
            Ok(Some(e)) = b.next_timeout(Duration::from_millis(100)) => {
                parts_b.insert(e.partition);
                got.insert(e.message_id().unwrap().to_string());
            }
        }
    }
    assert_eq!(got, sent);
    assert!(!parts_a.is_empty() && !parts_b.is_empty(), "both members got partitions: {parts_a:?} {parts_b:?}");
    assert!(parts_a.is_disjoint(&parts_b));
    b.close().await;
    // a takes over b's partitions and receives b's unacknowledged events again.
    let mut again = HashSet::new();
    let expected: usize =
        5 * (0..16).filter(|d| parts_b.contains(&hubmsg_core::hub::events::partition_for(&format!("dev-{d}"), 4))).count();
    while again.len() < expected {
        let e = a.next_timeout(T).await.unwrap().expect("takeover delivers b's events");
        assert!(parts_b.contains(&e.partition));
        again.insert(e.message_id().unwrap().to_string());
        e.ack();
    }
    h.hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_restart_keeps_events_registry_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hubmsg_core::hub::Hub::start(hubmsg_core::hub::HubConfig::new(dir.path())).await.unwrap();
    let dev = device(&hub, "keeper").await;
    for i in 0..50 {
        dev.send(Message::new(format!("{i}"))).await.unwrap();
    }
    dev.flush(T).await.unwrap();
    dev.close().await.unwrap();
    let svc = service(&hub).await;
    let mut ev = svc.events("$Default", StartPosition::Checkpoint).await.unwrap();
    for _ in 0..30 {
        ev.next_timeout(T).await.unwrap().unwrap().ack();
    }
    ev.checkpoint().await.unwrap();
    ev.close().await;
    svc.close().await;
    hub.shutdown().await.unwrap();

    let hub = hubmsg_core::hub::Hub::start(hubmsg_core::hub::HubConfig::new(dir.path())).await.unwrap();
    assert!(hub.registry().device("keeper").await.unwrap().is_some());
    let svc = service(&hub).await;
    let mut ev = svc.events("$Default", StartPosition::Checkpoint).await.unwrap();
    let e = ev.next_timeout(T).await.unwrap().unwrap();
    assert_eq!(e.body(), "30");
    hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_identity_management() {
    let h = start_hub().await;
    let svc = service(&h.hub).await;
    let d = svc.create_device("sensor-9").await.unwrap();
    assert_eq!(d.device_id, "sensor-9");
    assert_eq!(svc.create_device("sensor-9").await.unwrap_err().kind(), ErrorKind::AlreadyExists);
    assert_eq!(svc.get_device("sensor-9").await.unwrap(), d);
    assert_eq!(svc.list_devices().await.unwrap().len(), 1);
    assert_eq!(svc.create_device("bad/id").await.unwrap_err().kind(), ErrorKind::InvalidArgument);
    let r = svc.regenerate_keys("sensor-9", "primary").await.unwrap();
    assert_ne!(r.primary_key, d.primary_key);
    assert_eq!(r.secondary_key, d.secondary_key);
    // A disabled device is refused.
    svc.set_device_status("sensor-9", hubmsg_core::proto::DeviceStatus::Disabled).await.unwrap();
    let dev = hubmsg_core::DeviceClient::connect({
        let mut o = hubmsg_core::DeviceOptions::from_connection_string(&svc.device_connection_string(&r)).unwrap();
        o.retry = fast_retry();
        o.outbox = OutboxOptions::in_memory(); // about the registry, not the disk
        o
    })
    .await
    .unwrap();
    let mut st = dev.status_watch();
    let failed = tokio::time::timeout(T, st.wait_for(|s| matches!(s, ConnectionStatus::Failed { .. }))).await.unwrap().unwrap().clone();
    assert!(matches!(failed, ConnectionStatus::Failed { kind: ErrorKind::Unauthorized, .. }), "{failed:?}");
    svc.delete_device("sensor-9").await.unwrap();
    assert_eq!(svc.get_device("sensor-9").await.unwrap_err().kind(), ErrorKind::NotFound);
    // A policy without registry rights is refused registry operations.
    let mut o = hubmsg_core::service::ServiceOptions::from_connection_string(&h.hub.policy_connection_string("service").unwrap()).unwrap();
    o.retry = fast_retry();
    let limited = hubmsg_core::service::ServiceClient::connect(o).await.unwrap();
    assert_eq!(limited.list_devices().await.unwrap_err().kind(), ErrorKind::Unauthorized);
    h.hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_bounds_reject_or_drop_oldest_while_offline() {
    let h = start_hub().await;
    h.hub.create_device("offline").await.unwrap();
    let cs = h.hub.device_connection_string("offline").await.unwrap();
    // Point the device at a port where nothing listens: it stays offline.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cs = cs.replace(&h.hub.host_name(), &format!("127.0.0.1:{dead}"));
    let mut o = hubmsg_core::DeviceOptions::from_connection_string(&cs).unwrap();
    o.retry = fast_retry();
    o.outbox = OutboxOptions { max_messages: 3, overflow: Overflow::Reject, ..OutboxOptions::in_memory() };
    let dev = hubmsg_core::DeviceClient::connect(o.clone()).await.unwrap();
    for i in 0..3 {
        dev.send(Message::new(format!("{i}"))).await.unwrap();
    }
    let e = dev.send(Message::new("3")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::QueueFull);
    assert_eq!(dev.stats().outbox.depth, 3);
    assert!(dev.stats().retries > 0 || matches!(dev.status(), ConnectionStatus::Retrying { .. } | ConnectionStatus::Connecting));
    dev.close().await.unwrap();

    o.outbox.overflow = Overflow::DropOldest;
    let dev = hubmsg_core::DeviceClient::connect(o).await.unwrap();
    let first = dev.send(Message::new("a")).await.unwrap();
    for _ in 0..3 {
        dev.send(Message::new("b")).await.unwrap();
    }
    assert_eq!(first.outcome().await.unwrap(), Outcome::Dropped);
    assert_eq!(dev.stats().outbox.dropped, 1);
    // Oversize is refused up front.
    let e = dev.send(Message::new(vec![0u8; 256 * 1024 + 1])).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::MessageTooLarge);
    dev.close().await.unwrap();
    h.hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sas_renewal_drains_and_reconnects_without_loss() {
    let h = start_hub().await;
    h.hub.create_device("renewer").await.unwrap();
    let mut o = hubmsg_core::DeviceOptions::from_connection_string(&h.hub.device_connection_string("renewer").await.unwrap()).unwrap();
    o.retry = fast_retry();
    o.outbox = OutboxOptions::in_memory(); // about token renewal, not the disk
    o.token_ttl = Duration::from_millis(800); // renew every ~640 ms
    let dev = hubmsg_core::DeviceClient::connect(o).await.unwrap();
    let mut n = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < until {
        dev.send(Message::new(format!("{n}"))).await.unwrap();
        n += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    dev.flush(T).await.unwrap();
    let st = dev.stats();
    assert!(st.renewals >= 2, "renewed {} times", st.renewals);
    assert_eq!(st.outbox.delivered, n);
    let svc = service(&h.hub).await;
    let mut ev = svc.events("$Default", StartPosition::Earliest).await.unwrap();
    let mut bodies: HashMap<String, usize> = HashMap::new();
    while bodies.len() < n as usize {
        let e = ev.next_timeout(T).await.unwrap().expect("all messages arrive");
        *bodies.entry(String::from_utf8(e.body().to_vec()).unwrap()).or_default() += 1;
    }
    h.hub.shutdown().await.unwrap();
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_with_generated_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = hubmsg_core::hub::HubConfig::new(dir.path());
    cfg.mqtt = None;
    cfg.mqtts = Some("127.0.0.1:0".parse().unwrap());
    cfg.host_name = "localhost".into();
    let hub = hubmsg_core::hub::Hub::start(cfg).await.unwrap();
    hub.create_device("secure").await.unwrap();
    let mut o = hubmsg_core::DeviceOptions::from_connection_string(&hub.device_connection_string("secure").await.unwrap()).unwrap();
    o.tls = Some(hubmsg_core::transport::TlsOptions { ca_file: hub.ca_file().map(|p| p.to_path_buf()) });
    o.retry = fast_retry();
    o.outbox = OutboxOptions::in_memory(); // about TLS, not the disk
    let dev = hubmsg_core::DeviceClient::connect(o.clone()).await.unwrap();
    let d = dev.send(Message::new("over tls")).await.unwrap();
    assert_eq!(tokio::time::timeout(T, d.outcome()).await.unwrap().unwrap(), Outcome::Delivered);
    dev.close().await.unwrap();
    // Without trusting the CA, the handshake fails and is reported as a permanent error.
    o.tls = Some(hubmsg_core::transport::TlsOptions { ca_file: None });
    let dev = hubmsg_core::DeviceClient::connect(o).await.unwrap();
    let mut st = dev.status_watch();
    let s = tokio::time::timeout(T, st.wait_for(|s| matches!(s, ConnectionStatus::Failed { .. }))).await.unwrap().unwrap().clone();
    assert!(matches!(s, ConnectionStatus::Failed { kind: ErrorKind::Unauthorized, .. }), "{s:?}");
    hub.shutdown().await.unwrap();
}

/// An application that does not take events keeps at most `event_buffer` of them in the client:
/// the stream stops reading from the hub instead. (Without the bound the hub closing the
/// consumer — here after 300 ms without acknowledgements or with a stalled write — made it
/// reconnect and buffer the redelivered window again, 1000 more events each time.) Once the
/// application reads, every event arrives: none was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_event_stream_holds_a_bounded_buffer_and_loses_nothing() {
    const N: usize = 3000;
    const BUFFER: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = hubmsg_core::hub::HubConfig::new(dir.path());
    cfg.partitions = 1;
    cfg.consumer_stall_timeout = Duration::from_millis(300);
    cfg.write_timeout = Duration::from_millis(300);
    let hub = hubmsg_core::hub::Hub::start(cfg).await.unwrap();
    let dev = device(&hub, "chatty").await;
    let mut last = None;
    for chunk in (0..N).collect::<Vec<_>>().chunks(500) {
        let batch = chunk.iter().map(|i| Message::new(format!("{i}")).with_message_id(format!("m{i}"))).collect();
        last = dev.send_batch(batch).await.unwrap().pop();
    }
    assert_eq!(tokio::time::timeout(T, last.unwrap().outcome()).await.unwrap().unwrap(), Outcome::Delivered);

    let mut opts = hubmsg_core::service::ServiceOptions::from_connection_string(&hub.service_connection_string()).unwrap();
    opts.retry = fast_retry();
    opts.event_buffer = BUFFER;
    let svc = hubmsg_core::service::ServiceClient::connect(opts).await.unwrap();
    tokio::time::timeout(T, svc.status_watch().wait_for(|s| *s == ConnectionStatus::Connected)).await.unwrap().unwrap();
    let connections = || hub.stats().connections.load(std::sync::atomic::Ordering::Relaxed);
    let open = || hub.stats().open_connections.load(std::sync::atomic::Ordering::Relaxed);
    let (before, open_before) = (connections(), open());
    let mut events = svc.events("$Default", StartPosition::Earliest).await.unwrap();
    // Not reading until the hub has closed the consumer that stopped acknowledging.
    assert!(eventually(T, || connections() > before && open() == open_before).await, "the hub did not close the stalled consumer");
    let buffered = events.buffered();
    assert!(buffered <= BUFFER, "{buffered} events buffered in the client (bound {BUFFER})");

    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + T;
    while seen.len() < N && tokio::time::Instant::now() < deadline {
        if let Some(e) = events.next_timeout(Duration::from_secs(1)).await.unwrap() {
            seen.insert(e.message().message_id.clone().unwrap());
            e.ack();
        }
    }
    assert_eq!(seen.len(), N, "every event arrives once the application reads");
    events.close().await;
    svc.close().await;
    dev.close().await.unwrap();
    hub.shutdown().await.unwrap();
}

/// A `send` future dropped while its fdatasync runs (an asyncio task cancelled, a `select!` that
/// took another branch) has queued its message: it must still be announced to the connection
/// and delivered, not wait in the outbox for the next send. Nothing else is sent afterwards, so
/// only that announcement can deliver them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_dropped_during_its_fsync_is_still_delivered() {
    let h = start_hub().await;
    h.hub.create_device("dropper").await.unwrap();
    let mut o = hubmsg_core::DeviceOptions::from_connection_string(&h.hub.device_connection_string("dropper").await.unwrap()).unwrap();
    o.retry = fast_retry();
    let outbox = tempfile::tempdir().unwrap();
    o.outbox = OutboxOptions { dir: Some(outbox.path().join("dropper")), ..OutboxOptions::default() };
    let dev = hubmsg_core::DeviceClient::connect(o).await.unwrap();
    let svc = service(&h.hub).await;
    let mut events = svc.events("$Default", StartPosition::Earliest).await.unwrap();
    assert!(eventually(T, || dev.status() == ConnectionStatus::Connected).await);
    const N: usize = 20;
    let mut dropped_pending = 0;
    for i in 0..N {
        // Poll the send once (it queues the message and starts waiting for its fdatasync),
        // then drop it.
        let send = dev.send(Message::new(format!("m{i}")).with_message_id(format!("m{i}")));
        tokio::select! {
            biased;
            r = send => { r.unwrap(); }
            () = std::future::ready(()) => dropped_pending += 1,
        }
        // Let the connection drain what it was told about before the next one.
        assert!(eventually(T, || dev.stats().outbox.depth == 0).await, "message m{i} was never sent (outbox: {:?})", dev.stats().outbox);
    }
    assert!(dropped_pending > 0, "no send was still waiting for its fdatasync when dropped: the test proved nothing");
    let mut seen = HashSet::new();
    while seen.len() < N {
        let ev = events.next_timeout(T).await.unwrap().expect("every queued message arrives");
        seen.insert(ev.message().body.clone());
        ev.ack();
    }
    events.close().await;
    dev.close().await.unwrap();
    h.hub.shutdown().await.unwrap();
}
