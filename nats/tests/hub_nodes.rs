//! Two hub nodes in one process over one 3-node JetStream cluster: a device's new connection on
//! one node ends its old session on the other (IoT Hub 400027), a device disabled through one
//! node is disconnected from the other, what one node accepted the other serves, and a client
//! waiting for outcomes on one node takes no feedback from a reader on the other.

#[path = "../../core/tests/common.rs"]
mod common;
#[path = "../../core/tests/suite/outcomes.rs"]
mod suite;

use std::sync::Arc;
use std::time::Duration;

use hubmsg_core::hub::{Hub, HubConfig};
use hubmsg_core::message::now_ms;
use hubmsg_core::proto::{AckMode, DeviceStatus};
use hubmsg_core::transport::{self, ConnectParams, Endpoint};
use hubmsg_core::{auth, wire, Message};
use hubmsg_nats::cluster::Cluster;
use hubmsg_nats::NatsConnector;

const T: Duration = Duration::from_secs(20);

async fn node(c: &Cluster, dir: &std::path::Path) -> Hub {
    let mut cfg = HubConfig::new(dir);
    cfg.retention_bytes = 64 << 20;
    cfg.feedback_interval = Duration::from_millis(50);
    let mut n = NatsConnector::new(c.urls());
    n.config.lease_ttl = Duration::from_secs(2);
    cfg.backend = Some(Arc::new(n));
    Hub::start(cfg).await.unwrap()
}

/// A raw device connection to `hub` (no reconnects): true once the hub closed it.
async fn raw_device(hub: &Hub, id: &str, key: &str) -> tokio::task::JoinHandle<bool> {
    let a = hub.mqtt_addr().unwrap();
    let host = hub.host_name();
    let params = ConnectParams {
        client_id: id.into(),
        username: wire::device_username(&host, id, None),
        password: auth::generate_sas_token(&auth::device_resource_uri(&host, id), key, now_ms() / 1000 + 3600, None).unwrap(),
        keep_alive_secs: 60,
        clean_session: true,
    };
    let ((mut r, _w), _) =
        transport::client_connect(&Endpoint { host: a.ip().to_string(), port: a.port(), tls: None }, &params, T).await.unwrap();
    tokio::spawn(async move {
        let _keep = _w;
        loop {
            match r.next().await {
                Ok(Some(_)) => continue,
                _ => return true,
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_moves_between_nodes_and_identity_changes_reach_every_node() {
    let c = Cluster::start(3, T).await.expect("start a 3-node cluster (nats/install-server.sh)");
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node(&c, da.path()).await;
    let b = node(&c, db.path()).await;
    let d = a.create_device("roamer").await.unwrap();
    assert_eq!(b.registry().device("roamer").await.unwrap().unwrap(), d, "one registry for both nodes");

    // Connected to node a; a new connection of the same device on node b ends it.
    let on_a = raw_device(&a, "roamer", &d.primary_key).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!on_a.is_finished());
    let on_b = raw_device(&b, "roamer", &d.primary_key).await;
    assert!(tokio::time::timeout(T, on_a).await.expect("node a closed the old session").unwrap());
    assert!(!on_b.is_finished(), "the newest connection stays");

    // Disabled through node a: node b disconnects it.
    let svc_cs = a.service_connection_string();
    let mut so = hubmsg_core::service::ServiceOptions::from_connection_string(&svc_cs).unwrap();
    so.retry.max_elapsed = Some(T);
    let svc = hubmsg_core::service::ServiceClient::connect(so).await.unwrap();
    svc.set_device_status("roamer", DeviceStatus::Disabled).await.unwrap();
    assert!(tokio::time::timeout(T, on_b).await.expect("node b closed the disabled device").unwrap());

    // A C2D message accepted through node a reaches the device connected to node b.
    svc.set_device_status("roamer", DeviceStatus::Enabled).await.unwrap();
    let mut o = hubmsg_core::DeviceOptions::from_connection_string(&b.device_connection_string("roamer").await.unwrap()).unwrap();
    o.retry.max_elapsed = Some(T);
    o.outbox = hubmsg_core::outbox::OutboxOptions::in_memory(); // about the hub nodes, not the disk
    let dev = hubmsg_core::DeviceClient::connect(o).await.unwrap();
    let mut rx = dev.c2d().unwrap();
    let fb = svc.await_outcome("hop").unwrap();
    svc.send_c2d("roamer", Message::new("across nodes").with_message_id("hop"), AckMode::Full).await.unwrap();
    let m = rx.recv_timeout(T).await.unwrap().expect("delivered by node b");
    assert_eq!(m.message.body, "across nodes");
    m.complete().unwrap();
    assert_eq!(tokio::time::timeout(T, fb).await.unwrap().unwrap().status_code, hubmsg_core::proto::FeedbackStatus::Success);
    dev.close().await.unwrap();
    svc.close().await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    c.stop().await;
}

/// A consumer group that starts from `Latest` on a node over JetStream gets only what was sent
/// after it joined, as on the embedded hub. It got everything: the node's membership published
/// its partitions only after `join` had returned, so the session applied `Latest` to an empty
/// first assignment and opened every partition later at the checkpoint — for a new group, the
/// start of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_from_latest_skips_what_was_sent_before_it_joined() {
    let c = Cluster::start(3, T).await.expect("start a 3-node cluster (nats/install-server.sh)");
    let d = tempfile::tempdir().unwrap();
    let a = node(&c, d.path()).await;
    a.create_device("early").await.unwrap();
    let mut o = hubmsg_core::DeviceOptions::from_connection_string(&a.device_connection_string("early").await.unwrap()).unwrap();
    o.retry.max_elapsed = Some(T);
    o.outbox = hubmsg_core::outbox::OutboxOptions::in_memory();
    let dev = hubmsg_core::DeviceClient::connect(o).await.unwrap();
    for i in 0..5 {
        dev.send(Message::new("before").with_message_id(format!("before-{i}"))).await.unwrap();
    }
    dev.flush(T).await.unwrap();

    let mut so = hubmsg_core::service::ServiceOptions::from_connection_string(&a.service_connection_string()).unwrap();
    so.retry.max_elapsed = Some(T);
    let svc = hubmsg_core::service::ServiceClient::connect(so).await.unwrap();
    let mut events = svc.events("$Default", hubmsg_core::proto::StartPosition::Latest).await.unwrap();
    // Answered after the hub handled the consume request.
    tokio::time::timeout(T, events.checkpoint()).await.expect("checkpoint answered").unwrap();
    dev.send(Message::new("after").with_message_id("after-0")).await.unwrap();
    let ev = events.next_timeout(T).await.unwrap().expect("the event sent after joining arrives");
    assert_eq!(ev.message_id(), Some("after-0"), "a group from Latest starts after what was already stored");
    ev.ack();
    events.close().await;
    dev.close().await.unwrap();
    svc.close().await;
    a.shutdown().await.unwrap();
    c.stop().await;
}

/// Competing feedback readers across nodes (`core/tests/suite/outcomes.rs`, the body
/// `core/tests/feedback_readers.rs` runs on one embedded hub): the waiting client is connected to
/// node a, the device and the feedback reader to node b. Each waited-for outcome is settled on
/// node b, published on `hubmsg.outcomes` and notified by node a; the reader's records stay in
/// the shared feedback stream for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_on_one_node_never_takes_feedback_read_on_another() {
    let c = Cluster::start(3, T).await.expect("start a 3-node cluster (nats/install-server.sh)");
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node(&c, da.path()).await;
    let b = node(&c, db.path()).await;
    suite::readers_keep_their_feedback_and_waiters_get_their_outcomes(&b, &a, &b).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    c.stop().await;
}
