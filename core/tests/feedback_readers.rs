//! Feedback is one hub-wide queue read by every service connection that subscribes to it (as in
//! IoT Hub). A client that waits for outcomes (`send_c2d_and_wait`) learns them from
//! notifications to its own connection (`outcomes.watch`, docs/protocol.md), never by taking
//! batches from that queue: so it takes no record another client reads through `feedback()`, and
//! no reader's stream takes the record it waits for. Before the notifications, the waiting client
//! subscribed to the queue and acknowledged what it got: 37 to 39 of the reader's 40 records were
//! taken from it and 1 to 3 of 40 waits timed out.
//!
//! The wait is connection-scoped: after a reconnect the client watches again, and the hub answers
//! from its cache of recent outcomes what happened in between — unless the hub restarted in
//! between too (the cache is in memory): that wait ends with a clean `Timeout`.

mod common;
#[path = "suite/outcomes.rs"]
mod suite;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hubmsg_core::hub::{Hub, HubConfig};
use hubmsg_core::proto::{AckMode, FeedbackStatus};
use hubmsg_core::service::ServiceClient;
use hubmsg_core::{ConnectionStatus, DeviceClient, ErrorKind, Message};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_for_its_own_outcomes_never_takes_another_clients_feedback() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HubConfig::new(dir.path());
    cfg.feedback_interval = Duration::from_millis(20);
    let hub = Hub::start(cfg).await.unwrap();
    suite::readers_keep_their_feedback_and_waiters_get_their_outcomes(&hub, &hub, &hub).await;
    hub.shutdown().await.unwrap();
}

/// A TCP relay in front of the hub that can be cut (every relayed connection closed and new
/// ones refused) and restored: a real network outage for one client.
struct Relay {
    addr: SocketAddr,
    up: Arc<tokio::sync::watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let up = Arc::new(tokio::sync::watch::channel(true).0);
        let state = up.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = l.accept().await {
                let mut rx = state.subscribe();
                if !*rx.borrow_and_update() {
                    continue; // cut: refused (dropped at once)
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(to).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = rx.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Relay { addr, up, task }
    }

    fn set(&self, up: bool) {
        self.up.send_replace(up);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A hub on `port` (0: any) in `dir` whose tokens may also name `relay`, with fast feedback.
async fn hub_at(dir: &std::path::Path, port: u16, relay: Option<SocketAddr>) -> Hub {
    let mut c = HubConfig::new(dir);
    c.feedback_interval = Duration::from_millis(20);
    c.mqtt = Some(SocketAddr::from(([127, 0, 0, 1], port)));
    c.public_addresses = relay.map(|r| format!("127.0.0.1:{}", r.port())).into_iter().collect();
    Hub::start(c).await.unwrap()
}

/// A service client connected to `host` (`127.0.0.1:PORT`, the hub or a relay in front of it).
async fn service_via(hub: &Hub, host: &str) -> ServiceClient {
    service_with(hub, |o| o.host_name = host.to_string()).await
}

/// A device client connected to the hub directly (its connection string names the relay).
async fn device_direct(hub: &Hub, id: &str) -> DeviceClient {
    let port = hub.mqtt_addr().unwrap().port();
    device_with(hub, id, |o| o.host_name = format!("127.0.0.1:{port}")).await
}

async fn connected(status: &mut tokio::sync::watch::Receiver<ConnectionStatus>, want: bool) {
    tokio::time::timeout(T, status.wait_for(|s| matches!(s, ConnectionStatus::Connected) == want))
        .await
        .expect("connection status changes")
        .unwrap();
}

/// The message is queued at the hub, so the waiter's watch (sent before it) is in place there.
async fn queued(hub: &Hub, device: &str, n: usize) {
    assert!(
        eventually_async(T, || async { hub.c2d().depth(device).await.unwrap() == n }).await,
        "queue depth of '{device}' never reached {n}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_spans_a_hub_restart_and_resolves_when_the_device_completes_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub_at(dir.path(), 0, None).await;
    let port = hub.mqtt_addr().unwrap().port(); // the restart reuses it
    hub.create_device("late").await.unwrap();
    let waiter = service(&hub).await;
    let w = waiter.clone();
    let wait = tokio::spawn(async move {
        w.send_c2d_and_wait("late", Message::new("after the restart").with_message_id("R1"), AckMode::Full, T).await
    });
    queued(&hub, "late", 1).await;

    hub.shutdown().await.unwrap();
    let hub = hub_at(dir.path(), port, None).await;
    // The device first connects to the new hub process and completes there: the watch the
    // waiter re-sent on reconnecting (or, if the outcome came first, the cache) answers it.
    let dev = device_direct(&hub, "late").await;
    let mut rx = dev.c2d().unwrap();
    let m = rx.recv_timeout(T).await.unwrap().expect("delivered after the restart");
    assert_eq!(m.message.message_id.as_deref(), Some("R1"));
    m.complete().unwrap();
    let r = tokio::time::timeout(T, wait).await.expect("the wait ends").unwrap().expect("the wait resolves");
    assert_eq!((r.original_message_id.as_str(), r.status_code, r.device_id.as_str()), ("R1", FeedbackStatus::Success, "late"));
    assert_eq!(waiter.pending_counts(), (0, 0, 0));
    dev.close().await.unwrap();
    waiter.close().await;
    hub.shutdown().await.unwrap();
}

/// A waiter (through a [`Relay`]) whose connection is cut while the device completes the message
/// it waits for: the outcome is recorded while it is away.
struct Away {
    hub: Hub,
    port: u16,
    relay: Relay,
    waiter: ServiceClient,
    status: tokio::sync::watch::Receiver<ConnectionStatus>,
    dev: DeviceClient,
    wait: tokio::task::JoinHandle<hubmsg_core::Result<hubmsg_core::proto::FeedbackRecord>>,
}

async fn outcome_while_away(dir: &std::path::Path, device: &str, message_id: &str, limit: Duration) -> Away {
    let first = hub_at(dir, 0, None).await;
    let relay = Relay::start(first.mqtt_addr().unwrap()).await;
    let port = first.mqtt_addr().unwrap().port();
    first.shutdown().await.unwrap();
    let hub = hub_at(dir, port, Some(relay.addr)).await;
    let dev = device_direct(&hub, device).await;
    let mut rx = dev.c2d().unwrap();
    let waiter = service_via(&hub, &relay.addr.to_string()).await;
    let mut status = waiter.status_watch();
    connected(&mut status, true).await;
    let (w, d, m) = (waiter.clone(), device.to_string(), Message::new("while away").with_message_id(message_id));
    let wait = tokio::spawn(async move { w.send_c2d_and_wait(&d, m, AckMode::Full, limit).await });
    let m = rx.recv_timeout(T).await.unwrap().expect("delivered");
    relay.set(false);
    connected(&mut status, false).await;
    m.complete().unwrap();
    queued(&hub, device, 0).await;
    assert!(!wait.is_finished(), "nothing could reach the disconnected waiter");
    Away { hub, port, relay, waiter, status, dev, wait }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_while_the_waiter_was_disconnected_is_answered_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let a = outcome_while_away(dir.path(), "away", "A1", T).await;
    a.relay.set(true);
    let r = tokio::time::timeout(T, a.wait).await.expect("the wait ends").unwrap().expect("answered from the cache on reconnect");
    assert_eq!((r.original_message_id.as_str(), r.status_code), ("A1", FeedbackStatus::Success));
    a.dev.close().await.unwrap();
    a.waiter.close().await;
    a.hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_missed_across_a_hub_restart_ends_the_wait_with_a_clean_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = outcome_while_away(dir.path(), "gone", "G1", Duration::from_secs(6)).await;
    // The hub restarts before the waiter is back: the outcome is in the shared feedback queue
    // (durable), but the cache that would answer the re-sent watch is gone.
    a.hub.shutdown().await.unwrap();
    let hub = hub_at(dir.path(), a.port, Some(a.relay.addr)).await;
    a.relay.set(true);
    connected(&mut a.status, true).await;
    let e = tokio::time::timeout(T, a.wait).await.expect("the wait ends").unwrap().expect_err("nothing answers the wait");
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("'G1'"), "the error names the message: {e}");
    // The record is still in the shared queue for feedback readers.
    let mut fb = a.waiter.feedback().unwrap();
    let b = fb.next_timeout(T).await.unwrap().expect("the record is in the feedback queue");
    assert_eq!((b.records[0].original_message_id.as_str(), b.records[0].status_code), ("G1", FeedbackStatus::Success));
    b.ack();
    assert!(
        eventually(T, || a.waiter.pending_counts() == (0, 0, 0)).await,
        "the timed-out wait is forgotten: {:?}",
        a.waiter.pending_counts()
    );
    a.dev.close().await.unwrap();
    a.waiter.close().await;
    hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_feedback_and_waits_resolves_the_wait_once_and_still_reads_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub_at(dir.path(), 0, None).await;
    let svc = service(&hub).await;
    let mut fb = svc.feedback().unwrap();
    let dev = device_direct(&hub, "both").await;
    let mut rx = dev.c2d().unwrap();
    let settle = tokio::spawn(async move {
        while let Ok(Some(m)) = rx.recv_timeout(T).await {
            m.complete().unwrap();
        }
    });
    let r = svc.send_c2d_and_wait("both", Message::new("x").with_message_id("B1"), AckMode::Full, T).await.unwrap();
    assert_eq!(r.original_message_id, "B1");
    let b = fb.next_timeout(T).await.unwrap().expect("the record stays in the shared queue");
    assert_eq!(b.records.iter().map(|r| r.original_message_id.as_str()).collect::<Vec<_>>(), vec!["B1"]);
    b.ack();
    assert_eq!(svc.pending_counts(), (0, 0, 0));
    settle.abort();
    dev.close().await.unwrap();
    svc.close().await;
    hub.shutdown().await.unwrap();
}

/// A raw service connection speaking the wire contract of `docs/protocol.md` (no client logic).
struct RawService {
    halves: hubmsg_core::transport::ClientHalves,
    next: u16,
}

impl RawService {
    async fn connect(hub: &Hub, policy: &str) -> RawService {
        use hubmsg_core::{auth, proto, wire};
        let host = hub.host_name();
        let key = hub.registry().policy(policy).await.unwrap().unwrap().primary_key;
        let params = hubmsg_core::transport::ConnectParams {
            client_id: format!("{}/raw-{policy}", proto::SERVICE_MARKER),
            username: format!("{host}/{}/?api-version={}", proto::SERVICE_MARKER, wire::API_VERSION),
            password: auth::generate_sas_token(&host, &key, hubmsg_core::message::now_ms() / 1000 + 3600, Some(policy)).unwrap(),
            keep_alive_secs: 60,
            clean_session: true,
        };
        let a = hub.mqtt_addr().unwrap();
        let endpoint = hubmsg_core::transport::Endpoint { host: a.ip().to_string(), port: a.port(), tls: None };
        let (halves, _) = hubmsg_core::transport::client_connect(&endpoint, &params, T).await.unwrap();
        RawService { halves, next: 1 }
    }

    /// Sends request `op` with `body`; returns the hub's answer.
    async fn request(&mut self, op: &str, body: Vec<u8>) -> hubmsg_core::proto::Response {
        use rumqttc::mqttbytes::v4::{Packet, Publish};
        let rid = self.next as u64;
        let mut p = Publish::new(hubmsg_core::proto::request_topic(op, rid), rumqttc::mqttbytes::QoS::AtLeastOnce, body);
        p.pkid = self.next;
        self.next += 1;
        self.halves.1.send(&Packet::Publish(p)).await.unwrap();
        loop {
            match tokio::time::timeout(T, self.halves.0.next()).await.expect("an answer").unwrap() {
                Some(Packet::Publish(p)) if p.topic == hubmsg_core::proto::response_topic(rid) => {
                    return serde_json::from_slice(&p.payload).unwrap();
                }
                Some(_) => continue,
                None => panic!("the hub closed the connection after '{op}'"),
            }
        }
    }

    /// The next outcome notification: its records.
    async fn notification(&mut self) -> Vec<hubmsg_core::proto::FeedbackRecord> {
        use rumqttc::mqttbytes::v4::Packet;
        loop {
            match tokio::time::timeout(T, self.halves.0.next()).await.expect("a notification").unwrap() {
                Some(Packet::Publish(p)) if p.topic == hubmsg_core::proto::OUTCOMES_TOPIC => {
                    assert_eq!(p.qos, rumqttc::mqttbytes::QoS::AtMostOnce);
                    return serde_json::from_slice(&p.payload).unwrap();
                }
                Some(_) => continue,
                None => panic!("the hub closed the connection"),
            }
        }
    }
}

fn code(r: &hubmsg_core::proto::Response) -> &str {
    r.error.as_ref().map_or("", |e| e.code.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_contract_on_the_wire_with_clear_errors_for_bad_watches() {
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let hub = hub_at(dir.path(), 0, None).await;
    let mut raw = RawService::connect(&hub, "service").await;
    let body = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();

    // Bad watches: a clear error each, nothing watched, and the connection keeps serving.
    let r = raw.request("outcomes.watch", b"{not json".to_vec()).await;
    assert_eq!((r.status, code(&r)), (400, "INVALID_ARGUMENT"), "{r:?}");
    let r = raw.request("outcomes.watch", body(json!({"ids": [""]}))).await;
    assert_eq!(code(&r), "INVALID_ARGUMENT", "{r:?}");
    let r = raw.request("outcomes.watch", body(json!({"ids": ["x".repeat(1025)]}))).await;
    assert_eq!(code(&r), "INVALID_ARGUMENT", "{r:?}");
    let too_many: Vec<String> = (0..=hubmsg_core::proto::MAX_WATCHES).map(|i| format!("m{i}")).collect();
    let r = raw.request("outcomes.watch", body(json!({ "ids": too_many }))).await;
    assert_eq!(code(&r), "QUEUE_FULL", "{r:?}");
    assert!(r.error.as_ref().unwrap().message.contains("limit 10000"), "{r:?}");
    let mut registry_only = RawService::connect(&hub, "registryRead").await;
    let r = registry_only.request("outcomes.watch", body(json!({"ids": ["x"]}))).await;
    assert_eq!(code(&r), "UNAUTHORIZED", "{r:?}");

    // A watch, its answer, and the notification (QoS 0, on this connection only).
    let r = raw.request("outcomes.watch", body(json!({"ids": ["wire-1", "wire-2"]}))).await;
    assert_eq!(r.status, 200, "{r:?}");
    let at = r.body["at"].as_u64().expect("the watch is answered with the hub's time");
    let r = raw.request("outcomes.unwatch", body(json!({"ids": ["wire-2"]}))).await;
    assert_eq!(r.status, 200, "{r:?}");
    let svc = service(&hub).await;
    let dev = device_direct(&hub, "wire").await;
    let mut rx = dev.c2d().unwrap();
    for id in ["wire-2", "wire-1"] {
        svc.send_c2d("wire", Message::new("x").with_message_id(id), AckMode::Full).await.unwrap();
        rx.recv_timeout(T).await.unwrap().expect("delivered").complete().unwrap();
    }
    let got = raw.notification().await;
    assert_eq!(got.iter().map(|r| r.original_message_id.as_str()).collect::<Vec<_>>(), vec!["wire-1"], "wire-2 was unwatched");
    assert_eq!(got[0].status_code, FeedbackStatus::Success);

    // Re-sent on a new connection: answered from the cache when `since` is at or before the
    // record's arrival, never on a first watch (no `since`: an earlier message's record).
    drop(raw);
    let mut again = RawService::connect(&hub, "service").await;
    let r = again.request("outcomes.watch", body(json!({"ids": ["wire-2"]}))).await;
    assert_eq!(r.status, 200);
    let r = again.request("outcomes.watch", body(json!({"ids": ["wire-1"], "since": at}))).await;
    assert_eq!(r.status, 200);
    let got = again.notification().await;
    assert_eq!(got.iter().map(|r| r.original_message_id.as_str()).collect::<Vec<_>>(), vec!["wire-1"]);
    dev.close().await.unwrap();
    svc.close().await;
    hub.shutdown().await.unwrap();
}
