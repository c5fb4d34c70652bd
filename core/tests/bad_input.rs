//! Bad input at the hub: each gets the documented reaction (CONNACK refusal or connection close,
//! as IoT Hub does) and the hub keeps serving everyone else.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use hubmsg_core::auth;
use hubmsg_core::hub::Hub;
use hubmsg_core::message::now_ms;
use hubmsg_core::outbox::Outcome;
use hubmsg_core::transport::{self, ConnectParams, Endpoint};
use hubmsg_core::{wire, ConnectionStatus, ErrorKind, Message};
use rumqttc::mqttbytes::v4::{Packet, Publish};
use rumqttc::mqttbytes::QoS;
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(20);

fn endpoint(hub: &Hub) -> Endpoint {
    let a = hub.mqtt_addr().unwrap();
    Endpoint { host: a.ip().to_string(), port: a.port(), tls: None }
}

fn params(hub: &Hub, id: &str, key: &str, expiry: u64) -> ConnectParams {
    let host = hub.host_name();
    ConnectParams {
        client_id: id.into(),
        username: wire::device_username(&host, id, None),
        password: auth::generate_sas_token(&auth::device_resource_uri(&host, id), key, expiry, None).unwrap(),
        keep_alive_secs: 60,
        clean_session: false,
    }
}

async fn key(hub: &Hub, id: &str) -> String {
    hub.registry().device(id).await.unwrap().unwrap().primary_key
}

/// Connects raw, sends `packet`, and returns true if the hub closed the connection without
/// acknowledging it.
async fn closes_on(hub: &Hub, id: &str, packet: Packet) -> bool {
    let p = params(hub, id, &key(hub, id).await, now_ms() / 1000 + 3600);
    let ((mut r, mut w), _) = transport::client_connect(&endpoint(hub), &p, T).await.unwrap();
    if w.send(&packet).await.is_err() {
        return true; // closed while we were still writing (oversize packets)
    }
    match tokio::time::timeout(T, r.next()).await.expect("hub reacts in time") {
        Ok(None) | Err(_) => true,
        Ok(Some(other)) => panic!("expected the connection to close, got {other:?}"),
    }
}

fn publish(topic: &str, qos: QoS, payload: impl Into<Vec<u8>>) -> Packet {
    let mut p = Publish::new(topic, qos, payload);
    p.pkid = 1;
    Packet::Publish(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_contained_and_the_hub_keeps_serving() {
    let h = start_hub().await;
    let hub = &h.hub;
    hub.create_device("d1").await.unwrap();
    hub.create_device("d2").await.unwrap();
    // A healthy device stays connected throughout.
    let healthy = device(hub, "healthy").await;
    let first = healthy.send(Message::new("before")).await.unwrap();
    assert_eq!(tokio::time::timeout(T, first.outcome()).await.unwrap().unwrap(), Outcome::Delivered);

    // Wrong key → CONNACK 5 (not authorized).
    let wrong = params(hub, "d1", &auth::generate_key(), now_ms() / 1000 + 3600);
    assert_eq!(transport::client_connect(&endpoint(hub), &wrong, T).await.unwrap_err().kind(), ErrorKind::Unauthorized);
    // Expired token → CONNACK 5.
    let expired = params(hub, "d1", &key(hub, "d1").await, now_ms() / 1000 - 10);
    assert_eq!(transport::client_connect(&endpoint(hub), &expired, T).await.unwrap_err().kind(), ErrorKind::Unauthorized);
    // Unknown device → CONNACK 5.
    let unknown = params(hub, "ghost", &key(hub, "d1").await, now_ms() / 1000 + 3600);
    assert_eq!(transport::client_connect(&endpoint(hub), &unknown, T).await.unwrap_err().kind(), ErrorKind::Unauthorized);
    // Client id that is not the device id → CONNACK 2.
    let mut mismatched = params(hub, "d1", &key(hub, "d1").await, now_ms() / 1000 + 3600);
    mismatched.client_id = "d2".into();
    assert_eq!(transport::client_connect(&endpoint(hub), &mismatched, T).await.unwrap_err().kind(), ErrorKind::InvalidArgument);
    // Garbage password → CONNACK 4.
    let mut garbage = params(hub, "d1", &key(hub, "d1").await, now_ms() / 1000 + 3600);
    garbage.password = "not a token".into();
    assert_eq!(transport::client_connect(&endpoint(hub), &garbage, T).await.unwrap_err().kind(), ErrorKind::Unauthorized);

    // Another device's topic, an unknown topic, QoS 2, oversize, malformed bag → closed.
    assert!(closes_on(hub, "d1", publish("devices/d2/messages/events/", QoS::AtLeastOnce, "spoof")).await);
    assert!(closes_on(hub, "d1", publish("$iothub/anything", QoS::AtLeastOnce, "x")).await);
    assert!(closes_on(hub, "d1", publish("devices/d1/messages/events/", QoS::ExactlyOnce, "x")).await);
    assert!(closes_on(hub, "d1", publish("devices/d1/messages/events/", QoS::AtLeastOnce, vec![0u8; 262_145])).await);
    assert!(closes_on(hub, "d1", publish("devices/d1/messages/events/", QoS::AtLeastOnce, vec![0u8; 2_000_000])).await);
    assert!(closes_on(hub, "d1", publish("devices/d1/messages/events/a=%zz", QoS::AtLeastOnce, "x")).await);
    assert!(closes_on(hub, "d1", publish("devices/d1/messages/events/=x", QoS::AtLeastOnce, "x")).await);

    // Garbage bytes instead of MQTT → closed.
    let a = hub.mqtt_addr().unwrap();
    let mut raw = tokio::net::TcpStream::connect(a).await.unwrap();
    raw.write_all(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x13, 0x37]).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(T, tokio::io::AsyncReadExt::read(&mut raw, &mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "hub closes on garbage");
    // A publish before CONNECT → closed.
    let mut raw = tokio::net::TcpStream::connect(a).await.unwrap();
    let mut b = bytes::BytesMut::new();
    transport::encode(&publish("devices/d1/messages/events/", QoS::AtLeastOnce, "x"), &mut b).unwrap();
    raw.write_all(&b).await.unwrap();
    let n = tokio::time::timeout(T, tokio::io::AsyncReadExt::read(&mut raw, &mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0);

    // None of that touched the healthy device, and nothing bad reached the log.
    assert_eq!(healthy.status(), ConnectionStatus::Connected);
    let after = healthy.send(Message::new("after")).await.unwrap();
    assert_eq!(tokio::time::timeout(T, after.outcome()).await.unwrap().unwrap(), Outcome::Delivered);
    let svc = service(hub).await;
    let mut ev = svc.events("$Default", hubmsg_core::proto::StartPosition::Earliest).await.unwrap();
    let mut bodies = Vec::new();
    while let Some(e) = ev.next_timeout(Duration::from_millis(500)).await.unwrap() {
        bodies.push(e.body());
    }
    assert_eq!(bodies, vec![Bytes::from("before"), Bytes::from("after")]);
    assert!(hub.stats().violations.load(std::sync::atomic::Ordering::Relaxed) >= 7);
    h.hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_key_is_permanent_not_a_retry_loop() {
    let h = start_hub().await;
    h.hub.create_device("d1").await.unwrap();
    let cs = h.hub.device_connection_string("d1").await.unwrap();
    let cs = cs.replace(&key(&h.hub, "d1").await, &auth::generate_key());
    let mut o = hubmsg_core::DeviceOptions::from_connection_string(&cs).unwrap();
    o.retry = fast_retry();
    o.outbox = hubmsg_core::outbox::OutboxOptions::in_memory();
    let dev = hubmsg_core::DeviceClient::connect(o).await.unwrap();
    // It still accepts messages into the outbox while failed.
    dev.send(Message::new("kept")).await.unwrap();
    let mut st = dev.status_watch();
    let s = tokio::time::timeout(T, st.wait_for(|s| matches!(s, ConnectionStatus::Failed { .. }))).await.unwrap().unwrap().clone();
    assert!(matches!(s, ConnectionStatus::Failed { kind: ErrorKind::Unauthorized, .. }));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = dev.stats();
    assert_eq!(stats.retries, 0, "bad credentials are not retried in a loop");
    assert_eq!(stats.outbox.depth, 1);
    assert!(h.hub.stats().refused.load(std::sync::atomic::Ordering::Relaxed) <= 1);
    h.hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_per_device_and_keep_alive_enforced() {
    let h = start_hub().await;
    let hub = &h.hub;
    hub.create_device("dup").await.unwrap();
    let p = params(hub, "dup", &key(hub, "dup").await, now_ms() / 1000 + 3600);
    let ((mut r1, _w1), _) = transport::client_connect(&endpoint(hub), &p, T).await.unwrap();
    let ((_r2, _w2), _) = transport::client_connect(&endpoint(hub), &p, T).await.unwrap();
    // The first connection is dropped by the second (IoT Hub 400027).
    assert!(matches!(tokio::time::timeout(T, r1.next()).await.unwrap(), Ok(None) | Err(_)));

    // Keep-alive 1 s and silence → closed after 1.5 s.
    hub.create_device("quiet").await.unwrap();
    let mut p = params(hub, "quiet", &key(hub, "quiet").await, now_ms() / 1000 + 3600);
    p.keep_alive_secs = 1;
    let ((mut r, _w), _) = transport::client_connect(&endpoint(hub), &p, T).await.unwrap();
    let started = std::time::Instant::now();
    assert!(matches!(tokio::time::timeout(T, r.next()).await.unwrap(), Ok(None) | Err(_)));
    assert!(started.elapsed() >= Duration::from_millis(1400), "closed too early: {:?}", started.elapsed());
    h.hub.shutdown().await.unwrap();
}

/// Past `max_connections` both listeners refuse with CONNACK 3 (server unavailable: clients
/// retry later) rather than a bare close, and the connection already open keeps working.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_both_listeners_answer_connack_3() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = hubmsg_core::hub::HubConfig::new(dir.path());
    cfg.mqtts = Some("127.0.0.1:0".parse().unwrap());
    cfg.host_name = "localhost".into();
    cfg.max_connections = 1;
    let hub = Hub::start(cfg).await.unwrap();
    hub.create_device("one").await.unwrap();
    hub.create_device("two").await.unwrap();
    let plain = endpoint(&hub);
    let tls = Endpoint {
        host: "localhost".into(),
        port: hub.mqtts_addr().unwrap().port(),
        tls: Some(transport::TlsOptions { ca_file: hub.ca_file().map(|p| p.to_path_buf()) }),
    };
    let expiry = now_ms() / 1000 + 3600;
    let ((mut r1, mut w1), _) = transport::client_connect(&plain, &params(&hub, "one", &key(&hub, "one").await, expiry), T).await.unwrap();
    for ep in [&plain, &tls] {
        let Err(err) = transport::client_connect(ep, &params(&hub, "two", &key(&hub, "two").await, expiry), T).await else {
            panic!("a connection past max_connections was accepted")
        };
        assert!(err.message().contains("CONNACK 3"), "{}: {err}", if ep.tls.is_some() { "TLS" } else { "plain" });
        assert_eq!(err.kind(), ErrorKind::Disconnected, "busy is transient: {err}");
    }
    assert_eq!(hub.stats().refused_capacity.load(std::sync::atomic::Ordering::Relaxed), 2);
    w1.send(&Packet::PingReq).await.unwrap();
    assert_eq!(tokio::time::timeout(T, r1.next()).await.unwrap().unwrap(), Some(Packet::PingResp));
    hub.shutdown().await.unwrap();
}
