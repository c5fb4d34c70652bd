//! The C2D lifecycle suite, one for every backend: each lifecycle path with its feedback
//! (complete, reject, abandon ×10, TTL expiry, purge), the queue limits, offline delivery, locks
//! released by a disconnect and by a hub restart, lock expiry, and a plain MQTT client that
//! knows nothing of hubmsg. `core/tests/c2d.rs` runs it on the embedded backend and
//! `nats/tests/c2d_lifecycle.rs` on a 3-node JetStream cluster; the bodies are the same.

use std::time::Duration;

use super::common::*;
use hubmsg_core::hub::{Hub, HubConfig};
use hubmsg_core::proto::{AckMode, FeedbackStatus};
use hubmsg_core::service::{C2dOptions, ServiceClient};
use hubmsg_core::{ErrorKind, Message};

const T: Duration = Duration::from_secs(20);

/// Where the hubs of a suite run keep their state.
pub trait Fixture: Send + Sync {
    /// A hub configuration in `dir` on this fixture's backend (plain listener on 127.0.0.1:0).
    fn config(&self, dir: &std::path::Path) -> HubConfig;
}

/// A hub with fast feedback batching.
pub async fn fast_hub(fx: &dyn Fixture) -> (Hub, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = fx.config(dir.path());
    cfg.feedback_interval = Duration::from_millis(50);
    (Hub::start(cfg).await.unwrap(), dir)
}

/// Every test of the suite as a `#[tokio::test]` calling it with the fixture `$make` builds
/// (an async expression; `$stop` is awaited with it afterwards).
#[macro_export]
macro_rules! c2d_lifecycle_suite {
    ($make:expr, $stop:path) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn every_lifecycle_path_reports_its_feedback() {
            let fx = $make.await;
            suite::every_lifecycle_path_reports_its_feedback(&fx).await;
            $stop(fx).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn send_errors_have_specific_kinds_and_lose_nothing() {
            let fx = $make.await;
            suite::send_errors_have_specific_kinds_and_lose_nothing(&fx).await;
            $stop(fx).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn messages_sent_while_offline_arrive_in_order_after_reconnect() {
            let fx = $make.await;
            suite::messages_sent_while_offline_arrive_in_order_after_reconnect(&fx).await;
            $stop(fx).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_disconnect_returns_locked_messages_and_a_reused_id_is_a_new_command() {
            let fx = $make.await;
            suite::a_disconnect_returns_locked_messages_and_a_reused_id_is_a_new_command(&fx).await;
            $stop(fx).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_message_held_across_a_hub_restart_reaches_the_app_once_and_its_late_settle_counts() {
            let fx = $make.await;
            suite::a_message_held_across_a_hub_restart_reaches_the_app_once_and_its_late_settle_counts(&fx).await;
            $stop(fx).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn plain_mqtt_client_with_puback_only_receives_and_completes() {
            let fx = $make.await;
            suite::plain_mqtt_client_with_puback_only_receives_and_completes(&fx).await;
            $stop(fx).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn feedback_leaves_on_settle_then_waits_for_64_or_the_interval() {
            let fx = $make.await;
            suite::feedback_leaves_on_settle_then_waits_for_64_or_the_interval(&fx).await;
            $stop(fx).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn lock_expiry_redelivers_without_counting() {
            let fx = $make.await;
            suite::lock_expiry_redelivers_without_counting(&fx).await;
            $stop(fx).await;
        }
    };
}

pub async fn outcome(
    svc: &ServiceClient,
    dev: &str,
    body: &str,
    ack: AckMode,
) -> (String, tokio::sync::oneshot::Receiver<hubmsg_core::proto::FeedbackRecord>) {
    let id = format!("{dev}-{body}");
    let rx = svc.await_outcome(&id).unwrap();
    svc.send_c2d(dev, Message::new(body.to_string()).with_message_id(id.clone()), ack).await.unwrap();
    (id, rx)
}

pub async fn every_lifecycle_path_reports_its_feedback(fx: &dyn Fixture) {
    let (hub, _dir) = fast_hub(fx).await;
    let svc = service(&hub).await;
    let dev = device(&hub, "valve").await;
    let mut rx = dev.c2d().unwrap();

    // complete → Success
    let (_, fb) = outcome(&svc, "valve", "open", AckMode::Full).await;
    let m = rx.recv_timeout(T).await.unwrap().unwrap();
    assert_eq!(m.message.body, "open");
    assert_eq!(m.message.system_property("iothub-ack"), Some("full"));
    assert_eq!(m.message.system_property("$.to"), Some("/devices/valve/messages/devicebound"));
    m.complete().unwrap();
    assert_eq!(tokio::time::timeout(T, fb).await.unwrap().unwrap().status_code, FeedbackStatus::Success);

    // reject → Rejected
    let (_, fb) = outcome(&svc, "valve", "bad", AckMode::Negative).await;
    rx.recv_timeout(T).await.unwrap().unwrap().reject().unwrap();
    assert_eq!(tokio::time::timeout(T, fb).await.unwrap().unwrap().status_code, FeedbackStatus::Rejected);

    // abandon 10× → DeliveryCountExceeded
    let (_, fb) = outcome(&svc, "valve", "flaky", AckMode::Full).await;
    for i in 0..10 {
        let m = rx.recv_timeout(T).await.unwrap().unwrap_or_else(|| panic!("delivery {i}"));
        assert_eq!(m.message.body, "flaky");
        assert_eq!(m.message.system_property("iothub-deliverycount"), Some(i.to_string().as_str()));
        m.abandon().unwrap();
    }
    let r = tokio::time::timeout(T, fb).await.unwrap().unwrap();
    assert_eq!(r.status_code, FeedbackStatus::DeliveryCountExceeded);
    assert_eq!(r.device_id, "valve");
    assert!(!r.device_generation_id.is_empty());
    dev.close().await.unwrap();

    // TTL passes while offline → Expired
    let id = "valve-short".to_string();
    let fb = svc.await_outcome(&id).unwrap();
    svc.send_c2d_with(
        "valve",
        Message::new("short").with_message_id(id),
        C2dOptions { ack: AckMode::Full, ttl: Some(Duration::from_secs(1)) },
    )
    .await
    .unwrap();
    assert_eq!(tokio::time::timeout(T, fb).await.unwrap().unwrap().status_code, FeedbackStatus::Expired);
    // A message that expired or was purged is out of the queue when its waiter hears of it (on
    // JetStream a complete, reject or dead-letter goes through the device consumer, whose
    // removal from the stream may show a moment later; a purge counts only what it purged).
    let gone = || async { hub.c2d().depth("valve").await.unwrap() };
    assert_eq!(gone().await, 0, "notified of Expired while the message was still queued");

    // purge → Purged (and the count)
    let (_, fb1) = outcome(&svc, "valve", "p1", AckMode::Full).await;
    let (_, fb2) = outcome(&svc, "valve", "p2", AckMode::None).await;
    assert_eq!(svc.purge_c2d("valve").await.unwrap(), 2);
    assert_eq!(tokio::time::timeout(T, fb1).await.unwrap().unwrap().status_code, FeedbackStatus::Purged);
    assert_eq!(gone().await, 0, "notified of Purged while the message was still queued");
    drop(fb2);
    let stats: std::collections::HashMap<String, u64> = hub.backend().counters().all().await.unwrap().into_iter().collect();
    assert_eq!(stats.get("c2d.Purged"), Some(&2));
    hub.shutdown().await.unwrap();
}

pub async fn send_errors_have_specific_kinds_and_lose_nothing(fx: &dyn Fixture) {
    let (hub, _dir) = fast_hub(fx).await;
    let svc = service(&hub).await;
    assert_eq!(svc.send_c2d("nobody", Message::new("x"), AckMode::None).await.unwrap_err().kind(), ErrorKind::NotFound);
    hub.create_device("full").await.unwrap();
    for i in 0..50 {
        svc.send_c2d("full", Message::new(format!("{i}")), AckMode::None).await.unwrap();
    }
    let e = svc.send_c2d("full", Message::new("51"), AckMode::None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::QueueFull, "{e}");
    let e = svc.send_c2d("full", Message::new(vec![0u8; 64 * 1024 + 1]), AckMode::None).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::MessageTooLarge);
    let e = svc
        .send_c2d_with("full", Message::new("x"), C2dOptions { ack: AckMode::None, ttl: Some(Duration::from_secs(49 * 3600)) })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    // The 50 queued ones are all still there and arrive in order.
    let dev = device(&hub, "full").await;
    let mut rx = dev.c2d().unwrap();
    for i in 0..50 {
        let m = rx.recv_timeout(T).await.unwrap().expect("queued message");
        assert_eq!(m.message.body, format!("{i}"));
        m.complete().unwrap();
    }
    // A policy without ServiceConnect cannot send.
    let mut o =
        hubmsg_core::service::ServiceOptions::from_connection_string(&hub.policy_connection_string("registryRead").unwrap()).unwrap();
    o.retry = fast_retry();
    let ro = ServiceClient::connect(o).await.unwrap();
    assert_eq!(ro.send_c2d("full", Message::new("x"), AckMode::None).await.unwrap_err().kind(), ErrorKind::Unauthorized);
    hub.shutdown().await.unwrap();
}

pub async fn messages_sent_while_offline_arrive_in_order_after_reconnect(fx: &dyn Fixture) {
    let (hub, _dir) = fast_hub(fx).await;
    let svc = service(&hub).await;
    // The device subscribes once (persistent session), then goes offline.
    let dev = device(&hub, "sleepy").await;
    let _rx = dev.c2d().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    dev.close().await.unwrap();
    for i in 0..50 {
        svc.send_c2d("sleepy", Message::new(format!("{i}")), AckMode::Positive).await.unwrap();
    }
    let dev = device(&hub, "sleepy").await;
    let mut rx = dev.c2d().unwrap();
    for i in 0..50 {
        let m = rx.recv_timeout(T).await.unwrap().expect("offline message");
        assert_eq!(m.message.body, format!("{i}"));
        m.complete().unwrap();
    }
    // Positive feedback for all 50 eventually.
    let mut fb = svc.feedback().unwrap();
    let mut n = 0;
    while n < 50 {
        let b = fb.next_timeout(T).await.unwrap().expect("feedback batch");
        n += b.records.iter().filter(|r| r.status_code == FeedbackStatus::Success).count();
        b.ack();
    }
    hub.shutdown().await.unwrap();
}

pub async fn a_disconnect_returns_locked_messages_and_a_reused_id_is_a_new_command(fx: &dyn Fixture) {
    let (hub, dir) = fast_hub(fx).await;
    let svc = service(&hub).await;
    hub.create_device("dd").await.unwrap();
    let mut o = hubmsg_core::DeviceOptions::from_connection_string(&hub.device_connection_string("dd").await.unwrap()).unwrap();
    o.retry = fast_retry();
    o.outbox.dir = Some(dir.path().join("dd-outbox"));
    let dev = hubmsg_core::DeviceClient::connect(o.clone()).await.unwrap();
    let mut rx = dev.c2d().unwrap();
    svc.send_c2d("dd", Message::new("a").with_message_id("A"), AckMode::None).await.unwrap();
    svc.send_c2d("dd", Message::new("b").with_message_id("B"), AckMode::None).await.unwrap();
    let a = rx.recv_timeout(T).await.unwrap().unwrap();
    let _b = rx.recv_timeout(T).await.unwrap().unwrap(); // never settled
    a.complete().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    dev.close().await.unwrap();
    // B comes back because its lock died with the connection. The same message id sent again
    // is a new command (IoT Hub de-duplicates nothing by id; hubmsg devices de-duplicate by
    // delivery identity, the hub's sequence number with the id), so it reaches the app too.
    svc.send_c2d("dd", Message::new("a again").with_message_id("A"), AckMode::None).await.unwrap();
    let dev = hubmsg_core::DeviceClient::connect(o).await.unwrap();
    let mut rx = dev.c2d().unwrap();
    for (id, body) in [("B", "b"), ("A", "a again")] {
        let m = rx.recv_timeout(T).await.unwrap().unwrap();
        assert_eq!((m.message.message_id.as_deref(), &m.message.body[..]), (Some(id), body.as_bytes()));
        m.complete().unwrap();
    }
    assert!(rx.recv_timeout(Duration::from_millis(500)).await.unwrap().is_none());
    assert_eq!(dev.stats().c2d_duplicates, 0);
    assert!(eventually_async(T, || async { hub.c2d().depth("dd").await.unwrap() == 0 }).await);
    hub.shutdown().await.unwrap();
}

pub async fn a_message_held_across_a_hub_restart_reaches_the_app_once_and_its_late_settle_counts(fx: &dyn Fixture) {
    let dir = tempfile::tempdir().unwrap();
    let config = |port: u16| {
        let mut c = fx.config(dir.path());
        c.feedback_interval = Duration::from_millis(50);
        c.mqtt = Some(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
        c
    };
    let hub = Hub::start(config(0)).await.unwrap();
    let port = hub.mqtt_addr().unwrap().port(); // restarts reuse it
    let svc = service(&hub).await;
    let dev = device(&hub, "held").await;
    let mut rx = dev.c2d().unwrap();
    svc.send_c2d("held", Message::new("one").with_message_id("H1"), AckMode::Full).await.unwrap();
    let first = rx.recv_timeout(T).await.unwrap().unwrap();

    // The hub goes away while the application still holds H1; after the restart the lock is
    // gone and the hub delivers H1 again. The device recognises it and keeps it from the app.
    hub.shutdown().await.unwrap();
    let hub = Hub::start(config(port)).await.unwrap();
    assert!(eventually(T, || dev.stats().c2d_duplicates == 1).await, "the redelivery of a held message is recognised");

    // The settle made on the old connection completes the delivery the hub is waiting on.
    let svc = service(&hub).await;
    let mut fb = svc.feedback().unwrap();
    first.complete().unwrap();
    let batch = tokio::time::timeout(T, fb.next()).await.unwrap().unwrap();
    assert_eq!(batch.records.len(), 1);
    assert_eq!((batch.records[0].original_message_id.as_str(), batch.records[0].status_code), ("H1", FeedbackStatus::Success));
    batch.ack();
    assert!(eventually_async(T, || async { hub.c2d().depth("held").await.unwrap() == 0 }).await);
    assert!(rx.recv_timeout(Duration::from_millis(300)).await.unwrap().is_none(), "the app saw H1 once");

    // Dropping a message unsettled releases it: its redelivery does reach the application.
    svc.send_c2d("held", Message::new("two").with_message_id("H2"), AckMode::None).await.unwrap();
    drop(rx.recv_timeout(T).await.unwrap().unwrap());
    hub.shutdown().await.unwrap();
    let hub = Hub::start(config(port)).await.unwrap();
    let again = rx.recv_timeout(T).await.unwrap().expect("H2 comes back after it was released");
    assert_eq!(again.message.message_id.as_deref(), Some("H2"));
    again.complete().unwrap();
    assert!(eventually_async(T, || async { hub.c2d().depth("held").await.unwrap() == 0 }).await);
    hub.shutdown().await.unwrap();
}

pub async fn plain_mqtt_client_with_puback_only_receives_and_completes(fx: &dyn Fixture) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let (hub, _dir) = fast_hub(fx).await;
    let svc = service(&hub).await;
    hub.create_device("sdk-dev").await.unwrap();
    let key = hub.registry().device("sdk-dev").await.unwrap().unwrap().primary_key;
    let host = hub.host_name();
    let addr = hub.mqtt_addr().unwrap();
    // An IoT-Hub-SDK-style client: rumqttc, IoT Hub user name and SAS password, clean session
    // false, subscribe to the devicebound filter, automatic PUBACKs.
    let mut mo = MqttOptions::new("sdk-dev", addr.ip().to_string(), addr.port());
    let token = hubmsg_core::auth::generate_sas_token(
        &hubmsg_core::auth::device_resource_uri(&host, "sdk-dev"),
        &key,
        hubmsg_core::message::now_ms() / 1000 + 3600,
        None,
    )
    .unwrap();
    mo.set_credentials(format!("{host}/sdk-dev/?api-version=2021-04-12"), token);
    mo.set_clean_session(false);
    mo.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(mo, 10);
    client.subscribe("devices/sdk-dev/messages/devicebound/#", QoS::AtLeastOnce).await.unwrap();
    let fb = svc.await_outcome("sdk-1").unwrap();
    let sender = svc.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        sender
            .send_c2d("sdk-dev", Message::new("hello sdk").with_message_id("sdk-1").with_property("k", "v w"), AckMode::Full)
            .await
            .unwrap();
    });
    let publish = tokio::time::timeout(T, async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = el.poll().await.unwrap() {
                break p;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(&publish.payload[..], b"hello sdk");
    assert!(publish.topic.starts_with("devices/sdk-dev/messages/devicebound/"), "{}", publish.topic);
    assert!(publish.topic.contains("%24.mid=sdk-1"), "{}", publish.topic);
    assert!(publish.topic.contains("k=v%20w"), "{}", publish.topic);
    // Keep polling so rumqttc sends its PUBACK.
    let poller = tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                break;
            }
        }
    });
    let r = tokio::time::timeout(T, fb).await.unwrap().unwrap();
    assert_eq!(r.status_code, FeedbackStatus::Success);
    poller.abort();
    hub.shutdown().await.unwrap();
}

/// A delivery the device holds without settling is delivered again once its lock expires, with
/// the delivery count unchanged (only abandons count), and completes normally then.
pub async fn lock_expiry_redelivers_without_counting(fx: &dyn Fixture) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = fx.config(dir.path());
    cfg.feedback_interval = Duration::from_millis(50);
    cfg.c2d.lock = Duration::from_secs(2);
    let hub = Hub::start(cfg).await.unwrap();
    let svc = service(&hub).await;
    hub.create_device("holder").await.unwrap();
    let key = hub.registry().device("holder").await.unwrap().unwrap().primary_key;
    let (host, addr) = (hub.host_name(), hub.mqtt_addr().unwrap());
    let mut mo = MqttOptions::new("holder", addr.ip().to_string(), addr.port());
    let token = hubmsg_core::auth::generate_sas_token(
        &hubmsg_core::auth::device_resource_uri(&host, "holder"),
        &key,
        hubmsg_core::message::now_ms() / 1000 + 3600,
        None,
    )
    .unwrap();
    mo.set_credentials(format!("{host}/holder/?api-version=2021-04-12"), token);
    mo.set_keep_alive(Duration::from_secs(30));
    mo.set_manual_acks(true);
    let (client, mut el) = AsyncClient::new(mo, 10);
    client.subscribe("devices/holder/messages/devicebound/#", QoS::AtLeastOnce).await.unwrap();
    let fb = svc.await_outcome("held-1").unwrap();
    let mut sent = false;
    let mut deliveries = Vec::new();
    let started = tokio::time::Instant::now();
    tokio::time::timeout(T, async {
        while deliveries.len() < 2 {
            match el.poll().await.unwrap() {
                Event::Incoming(Packet::SubAck(_)) if !sent => {
                    sent = true;
                    svc.send_c2d("holder", Message::new("hold me").with_message_id("held-1"), AckMode::Full).await.unwrap();
                }
                Event::Incoming(Packet::Publish(p)) => deliveries.push((p, started.elapsed())),
                _ => {}
            }
        }
    })
    .await
    .expect("the message is delivered, held, and delivered again");
    let (first, second) = (&deliveries[0], &deliveries[1]);
    assert!(second.1 - first.1 >= Duration::from_millis(1500), "redelivered after the 2 s lock, not before: {:?}", second.1 - first.1);
    for (p, _) in &deliveries {
        assert!(p.topic.contains("iothub-deliverycount=0"), "a lock expiry does not count: {}", p.topic);
    }
    let seq = |t: &str| t.split("iothub-sequencenumber=").nth(1).map(|r| r.split('&').next().unwrap().to_string());
    assert_eq!(seq(&first.0.topic), seq(&second.0.topic), "the same queued message");
    client.ack(&second.0).await.unwrap();
    let poller = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    assert_eq!(tokio::time::timeout(T, fb).await.unwrap().unwrap().status_code, FeedbackStatus::Success);
    assert!(eventually_async(T, || async { hub.c2d().depth("holder").await.unwrap() == 0 }).await);
    poller.abort();
    hub.shutdown().await.unwrap();
}

/// IoT Hub's batching rule (reference §7.2: 64 records or 15 s after the previous send): with an
/// interval of an hour, the first outcome still reaches the service as it is settled (no batch
/// went out within the interval), the next ones wait — until 64 accumulated, which leave at once.
pub async fn feedback_leaves_on_settle_then_waits_for_64_or_the_interval(fx: &dyn Fixture) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = fx.config(dir.path());
    cfg.feedback_interval = Duration::from_secs(3600);
    let hub = Hub::start(cfg).await.unwrap();
    let svc = service(&hub).await;
    let mut fb = svc.feedback().unwrap();
    let dev = device(&hub, "burst").await;
    let mut rx = dev.c2d().unwrap();
    async fn round_trip(svc: &ServiceClient, rx: &mut hubmsg_core::device::C2dReceiver, i: usize) {
        svc.send_c2d("burst", Message::new(format!("{i}")).with_message_id(format!("B{i}")), AckMode::Full).await.unwrap();
        rx.recv_timeout(T).await.unwrap().expect("delivery").complete().unwrap();
    }
    round_trip(&svc, &mut rx, 0).await;
    let b = fb.next_timeout(T).await.unwrap().expect("the first outcome's batch, formed on settle (not an hour later)");
    let ids: Vec<&str> = b.records.iter().map(|r| r.original_message_id.as_str()).collect();
    assert_eq!(ids, ["B0"]);
    b.ack();
    for i in 1..64 {
        round_trip(&svc, &mut rx, i).await;
    }
    assert!(fb.next_timeout(Duration::from_millis(500)).await.unwrap().is_none(), "63 records wait for the interval or a 64th");
    round_trip(&svc, &mut rx, 64).await;
    let b = fb.next_timeout(T).await.unwrap().expect("a full batch of 64, formed at once");
    let ids: Vec<String> = b.records.iter().map(|r| r.original_message_id.clone()).collect();
    assert_eq!(ids, (1..=64).map(|i| format!("B{i}")).collect::<Vec<_>>());
    assert!(b.records.iter().all(|r| r.status_code == FeedbackStatus::Success));
    b.ack();
    hub.shutdown().await.unwrap();
}
