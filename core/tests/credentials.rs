//! Hostile clients at the CONNECT and packet level, and credential enforcement: each attack gets
//! the reaction `docs/security.md` lists (CONNACK code, close, error kind), and nothing secret
//! ever shows in `Debug` output, errors or logs.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use hubmsg_core::auth::{self, ConnectionString};
use hubmsg_core::hub::Hub;
use hubmsg_core::message::now_ms;
use hubmsg_core::proto::{CreateDevice, StartPosition};
use hubmsg_core::service::{ServiceClient, ServiceOptions};
use hubmsg_core::transport::{self, ConnectParams, Endpoint};
use hubmsg_core::{wire, ErrorKind, Message};
use rumqttc::mqttbytes::v4::{Packet, Publish};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

fn endpoint(hub: &Hub) -> Endpoint {
    let a = hub.mqtt_addr().unwrap();
    Endpoint { host: a.ip().to_string(), port: a.port(), tls: None }
}

async fn key(hub: &Hub, id: &str) -> String {
    hub.registry().device(id).await.unwrap().unwrap().primary_key
}

/// CONNECT parameters for `id` with a device-key token scoped to `scope` (host and path).
async fn params_scoped(hub: &Hub, id: &str, scope: &str, expiry: u64) -> ConnectParams {
    ConnectParams {
        client_id: id.into(),
        username: wire::device_username(&hub.host_name(), id, None),
        password: auth::generate_sas_token(scope, &key(hub, id).await, expiry, None).unwrap(),
        keep_alive_secs: 60,
        clean_session: false,
    }
}

async fn params(hub: &Hub, id: &str) -> ConnectParams {
    params_scoped(hub, id, &auth::device_resource_uri(&hub.host_name(), id), now_ms() / 1000 + 3600).await
}

/// Writes raw bytes on a fresh TCP connection; returns everything the hub sent until it closed.
async fn raw_exchange(hub: &Hub, bytes: &[u8]) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(hub.mqtt_addr().unwrap()).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut out)).await.expect("hub closes in time").unwrap_or(0);
    out
}

/// A raw CONNECT with protocol `name`/`level` (MQTT 5 adds an empty properties block).
fn raw_connect(name: &str, level: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(name.len() as u16).to_be_bytes());
    body.extend_from_slice(name.as_bytes());
    body.push(level);
    body.push(0x02); // clean session
    body.extend_from_slice(&60u16.to_be_bytes());
    if level == 5 {
        body.push(0); // properties length
    }
    body.extend_from_slice(&2u16.to_be_bytes());
    body.extend_from_slice(b"d1");
    let mut pkt = vec![0x10, body.len() as u8];
    pkt.extend_from_slice(&body);
    pkt
}

/// Connects as `id`, sends `bytes` raw, and reports whether the hub closed without answering.
async fn closes_on_raw(hub: &Hub, id: &str, bytes: &[u8]) -> bool {
    let ((mut r, mut w), _) = transport::client_connect(&endpoint(hub), &params(hub, id).await, T).await.unwrap();
    // A well-behaved exchange first, so the close below is the attack's doing.
    w.send(&Packet::PingReq).await.unwrap();
    assert!(matches!(r.next().await, Ok(Some(Packet::PingResp))));
    w.queue_raw(bytes);
    let _ = w.flush().await;
    match tokio::time::timeout(T, r.next()).await.expect("hub reacts in time") {
        Ok(None) | Err(_) => true,
        Ok(Some(other)) => panic!("expected a close, got {other:?}"),
    }
}

fn publish_bytes(topic: &str) -> Vec<u8> {
    let mut p = Publish::new(topic, QoS::AtLeastOnce, "x");
    p.pkid = 7;
    let mut b = bytes::BytesMut::new();
    transport::encode(&Packet::Publish(p), &mut b).unwrap();
    b.to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_protocol_versions_get_connack_1_and_a_close() {
    let h = start_hub().await;
    for (name, level) in [("MQTT", 5), ("MQIsdp", 3), ("MQTT", 3), ("MQTT", 6)] {
        let got = raw_exchange(&h.hub, &raw_connect(name, level)).await;
        assert_eq!(got, vec![0x20, 0x02, 0x00, 0x01], "{name} level {level}: CONNACK 1 then close");
    }
    assert!(h.hub.stats().refused.load(Ordering::Relaxed) >= 4);
    h.hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_nul_topics_bad_flags_and_nul_message_ids_close_the_connection() {
    let h = start_hub().await;
    let hub = &h.hub;
    hub.create_device("d1").await.unwrap();
    let healthy = device(hub, "healthy").await;
    for topic in
        ["devices/d1/messages/events/#", "devices/d1/messages/events/+", "devices/d1/messages/events/a\0b", "devices/+/messages/events/"]
    {
        assert!(closes_on_raw(hub, "d1", &publish_bytes(topic)).await, "{topic:?}");
    }
    // SUBSCRIBE with fixed-header flags 0000 instead of 0010 (MQTT-3.8.1-1).
    let mut sub = bytes::BytesMut::new();
    let mut s = rumqttc::mqttbytes::v4::Subscribe::new("devices/d1/messages/devicebound/#", QoS::AtLeastOnce);
    s.pkid = 3;
    transport::encode(&Packet::Subscribe(s), &mut sub).unwrap();
    assert_eq!(sub[0], 0x82);
    sub[0] = 0x80;
    assert!(closes_on_raw(hub, "d1", &sub).await, "SUBSCRIBE with flags 0000");
    // PUBACK with flags set, PUBLISH QoS 0 with DUP.
    assert!(closes_on_raw(hub, "d1", &[0x41, 0x02, 0x00, 0x01]).await, "PUBACK with flags 0001");
    let mut dup0 = publish_bytes("devices/d1/messages/events/");
    dup0[0] = 0x38; // DUP, QoS 0 (no packet id, so the frame stays parseable)
    assert!(closes_on_raw(hub, "d1", &dup0).await, "PUBLISH QoS 0 with DUP");
    // A message id with NUL (or another control character) in the bag.
    for bag in ["%24.mid=a%00b", "%24.mid=%07"] {
        assert!(closes_on_raw(hub, "d1", &publish_bytes(&format!("devices/d1/messages/events/{bag}"))).await, "{bag}");
    }
    // The healthy device never noticed.
    let d = healthy.send(Message::new("still here")).await.unwrap();
    assert_eq!(tokio::time::timeout(T, d.outcome()).await.unwrap().unwrap(), hubmsg_core::Outcome::Delivered);
    h.hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_must_be_device_scoped_for_this_hub_and_unexpired() {
    let h = start_hub().await;
    let hub = &h.hub;
    hub.create_device("d1").await.unwrap();
    let host = hub.host_name();
    let later = now_ms() / 1000 + 3600;
    let refused = |p: ConnectParams| {
        let ep = endpoint(hub);
        async move { transport::client_connect(&ep, &p, T).await.map(|_| ()).unwrap_err().kind() }
    };
    // A device key whose token covers the whole hub or every device is not that device's token.
    for scope in [host.clone(), format!("{host}/devices"), format!("{host}/devices/d1/modules/m")] {
        assert_eq!(refused(params_scoped(hub, "d1", &scope, later).await).await, ErrorKind::Unauthorized, "scope {scope}");
    }
    // A token (and user name) for another hub name.
    let mut other = params_scoped(hub, "d1", &auth::device_resource_uri("otherhub.azure-devices.net", "d1"), later).await;
    other.username = wire::device_username("otherhub.azure-devices.net", "d1", None);
    assert_eq!(refused(other).await, ErrorKind::Unauthorized);
    // The right token works.
    transport::client_connect(&endpoint(hub), &params(hub, "d1").await, T).await.unwrap();

    // A connection whose token expires is closed when it does (IoT Hub 401003).
    let short = params_scoped(hub, "d1", &auth::device_resource_uri(&host, "d1"), now_ms() / 1000 + 2).await;
    let ((mut r, _w), _) = transport::client_connect(&endpoint(hub), &short, T).await.unwrap();
    let started = std::time::Instant::now();
    assert!(matches!(tokio::time::timeout(T, r.next()).await.unwrap(), Ok(None) | Err(_)));
    assert!(started.elapsed() < Duration::from_secs(4), "closed {:?} after connect", started.elapsed());
    h.hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_keys_must_have_16_to_64_bytes() {
    let h = start_hub().await;
    let svc = service(&h.hub).await;
    use base64::Engine;
    let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; n]);
    for n in [1, 15, 65] {
        let req = CreateDevice { device_id: format!("k{n}"), primary_key: Some(b64(n)), ..Default::default() };
        let e = svc.create_device_with(req).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{n}: {e}");
        assert!(e.message().contains("16 to 64 bytes") && !e.message().contains(&b64(n)), "{e}");
    }
    for n in [16, 64] {
        let req = CreateDevice { device_id: format!("k{n}"), primary_key: Some(b64(n)), secondary_key: Some(b64(n)), ..Default::default() };
        svc.create_device_with(req).await.unwrap();
    }
    h.hub.shutdown().await.unwrap();
}

async fn policy_client(hub: &Hub, policy: &str) -> ServiceClient {
    let mut o = ServiceOptions::from_connection_string(&hub.policy_connection_string(policy).unwrap()).unwrap();
    o.retry = fast_retry();
    ServiceClient::connect(o).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rights_are_enforced_per_operation_as_iot_hub_defines_them() {
    let h = start_hub().await;
    let hub = &h.hub;
    hub.create_device("d1").await.unwrap();
    // DeviceConnect alone opens no service session at all.
    let dev_policy = policy_client(hub, "device").await;
    let mut st = dev_policy_status(&dev_policy);
    let s =
        tokio::time::timeout(T, st.wait_for(|s| matches!(s, hubmsg_core::ConnectionStatus::Failed { .. }))).await.unwrap().unwrap().clone();
    assert!(matches!(s, hubmsg_core::ConnectionStatus::Failed { kind: ErrorKind::Unauthorized, .. }), "{s:?}");

    // registryRead: reads, cannot write, cannot send C2D or read events.
    let ro = policy_client(hub, "registryRead").await;
    assert_eq!(ro.list_devices().await.unwrap().len(), 1);
    assert_eq!(ro.create_device("x").await.unwrap_err().kind(), ErrorKind::Unauthorized);
    assert_eq!(ro.send_c2d("d1", Message::new("x"), Default::default()).await.unwrap_err().kind(), ErrorKind::Unauthorized);
    // registryReadWrite includes read.
    let rw = policy_client(hub, "registryReadWrite").await;
    rw.create_device("made-by-rw").await.unwrap();
    assert_eq!(rw.get_device("made-by-rw").await.unwrap().device_id, "made-by-rw");
    assert_eq!(rw.purge_c2d("d1").await.unwrap_err().kind(), ErrorKind::Unauthorized);
    // service: C2D, no registry.
    let svc = policy_client(hub, "service").await;
    svc.send_c2d("d1", Message::new("x"), Default::default()).await.unwrap();
    assert_eq!(svc.get_device("d1").await.unwrap_err().kind(), ErrorKind::Unauthorized);
    // Policy management needs an owner.
    assert_eq!(rw.list_policies().await.unwrap_err().kind(), ErrorKind::Unauthorized);
    assert_eq!(svc.regenerate_policy_key("service", "primary").await.unwrap_err().kind(), ErrorKind::Unauthorized);
    h.hub.shutdown().await.unwrap();
}

fn dev_policy_status(c: &ServiceClient) -> tokio::sync::watch::Receiver<hubmsg_core::ConnectionStatus> {
    c.status_watch()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_keys_are_listed_and_regenerated() {
    let h = start_hub().await;
    let hub = &h.hub;
    let owner = service(hub).await;
    let before = owner.list_policies().await.unwrap();
    let names: Vec<&str> = before.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["device", "iothubowner", "registryRead", "registryReadWrite", "service"]);
    let old_cs = hub.policy_connection_string("service").unwrap();
    let after = owner.regenerate_policy_key("service", "primary").await.unwrap();
    let old = before.iter().find(|p| p.name == "service").unwrap();
    assert_ne!(after.primary_key, old.primary_key);
    assert_eq!(after.secondary_key, old.secondary_key);
    // The old key no longer connects; the new one does.
    let mut o = ServiceOptions::from_connection_string(&old_cs).unwrap();
    o.retry = fast_retry();
    let stale = ServiceClient::connect(o).await.unwrap();
    assert_eq!(stale.send_c2d("nobody", Message::new("x"), Default::default()).await.unwrap_err().kind(), ErrorKind::Unauthorized);
    let fresh = policy_client(hub, "service").await;
    assert_eq!(fresh.send_c2d("nobody", Message::new("x"), Default::default()).await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(owner.regenerate_policy_key("nope", "primary").await.unwrap_err().kind(), ErrorKind::NotFound);
    assert_eq!(owner.regenerate_policy_key("service", "tertiary").await.unwrap_err().kind(), ErrorKind::InvalidArgument);
    h.hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_consumer_groups_is_not_reported_as_queue_full() {
    let h = start_hub().await;
    let svc = service(&h.hub).await;
    let mut streams = Vec::new();
    for g in 0..hubmsg_core::hub::events::MAX_GROUPS {
        streams.push(svc.events(&format!("g{g}"), StartPosition::Latest).await.unwrap());
    }
    // Joining is asynchronous: wait until every group exists, then ask for one more. A stream
    // being connected is not enough (its `consume` may still be on the way, and the extra one
    // could take the last place); an answered `checkpoint`, sent after the `consume` on the
    // same connection, is.
    for s in &mut streams {
        tokio::time::timeout(T, s.checkpoint()).await.unwrap().unwrap();
    }
    let mut extra = svc.events("one-too-many", StartPosition::Latest).await.unwrap();
    let e = tokio::time::timeout(T, extra.next()).await.unwrap().unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.message().contains("consumer groups"), "{e}");
    h.hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_output_never_shows_keys_or_tokens() {
    let h = start_hub().await;
    let hub = &h.hub;
    let id = hub.create_device("dbg").await.unwrap();
    let policy = hub.registry().policy("iothubowner").await.unwrap().unwrap();
    let cs = ConnectionString::parse(&hub.device_connection_string("dbg").await.unwrap()).unwrap();
    let token = auth::generate_sas_token("h/devices/dbg", &id.primary_key, 99, None).unwrap();
    let parsed = auth::SasToken::parse(&token).unwrap();
    let svc_opts = ServiceOptions::from_connection_string(&hub.service_connection_string()).unwrap();
    let dev_opts = hubmsg_core::DeviceOptions::from_connection_string(&hub.device_connection_string("dbg").await.unwrap()).unwrap();
    let create = CreateDevice { device_id: "x".into(), primary_key: Some(id.primary_key.clone()), ..Default::default() };
    let printed = [
        format!("{id:?}"),
        format!("{policy:?}"),
        format!("{cs:?}"),
        format!("{parsed:?}"),
        format!("{svc_opts:?}"),
        format!("{dev_opts:?}"),
        format!("{create:?}"),
        format!("{:?}", hub.registry().policies().await.unwrap()),
    ];
    for p in &printed {
        for secret in [&id.primary_key, &id.secondary_key, &policy.primary_key, &policy.secondary_key, &parsed.sig] {
            assert!(!p.contains(secret.as_str()), "secret in {p}");
        }
        assert!(!p.contains(&parsed.sig[..12]), "signature in {p}");
    }
    assert!(printed[0].contains("<redacted>"));
    h.hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_device_purges_its_queue_with_feedback_and_its_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = hubmsg_core::hub::HubConfig::new(dir.path());
    cfg.feedback_interval = Duration::from_millis(50);
    let hub = Hub::start(cfg).await.unwrap();
    let svc = service(&hub).await;
    // Subscribe persistently once, then go offline with two commands queued.
    let dev = device(&hub, "gone").await;
    let _rx = dev.c2d().unwrap();
    assert!(eventually_async(T, || async { hub.c2d().subscribed("gone").await.unwrap() }).await);
    dev.close().await.unwrap();
    let fb = svc.await_outcome("old-1").unwrap();
    svc.send_c2d("gone", Message::new("old").with_message_id("old-1"), hubmsg_core::proto::AckMode::Full).await.unwrap();
    svc.send_c2d("gone", Message::new("old").with_message_id("old-2"), hubmsg_core::proto::AckMode::None).await.unwrap();
    svc.delete_device("gone").await.unwrap();
    assert_eq!(tokio::time::timeout(T, fb).await.unwrap().unwrap().status_code, hubmsg_core::proto::FeedbackStatus::Purged);
    assert_eq!((hub.c2d().depth("gone").await.unwrap(), hub.c2d().subscribed("gone").await.unwrap()), (0, false));
    // A device re-created under the same id starts empty: nothing old reaches it.
    svc.create_device("gone").await.unwrap();
    let dev = device(&hub, "gone").await;
    let mut rx = dev.c2d().unwrap();
    svc.send_c2d("gone", Message::new("new").with_message_id("new-1"), hubmsg_core::proto::AckMode::None).await.unwrap();
    let m = rx.recv_timeout(T).await.unwrap().unwrap();
    assert_eq!(m.message.body, "new");
    m.complete().unwrap();
    assert!(rx.recv_timeout(Duration::from_millis(500)).await.unwrap().is_none());
    hub.shutdown().await.unwrap();
}

/// A raw connection of a service (policy token) or a device (device or policy token).
async fn raw_session(hub: &Hub, params: ConnectParams) -> transport::ClientHalves {
    transport::client_connect(&endpoint(hub), &params, T).await.unwrap().0
}

fn service_params_with(hub: &Hub, policy: &str, key: &str) -> ConnectParams {
    let host = hub.host_name();
    ConnectParams {
        client_id: format!("{}/{policy}", hubmsg_core::proto::SERVICE_MARKER),
        username: format!("{host}/{}/?api-version={}", hubmsg_core::proto::SERVICE_MARKER, wire::API_VERSION),
        password: auth::generate_sas_token(&host, key, now_ms() / 1000 + 3600, Some(policy)).unwrap(),
        keep_alive_secs: 60,
        clean_session: true,
    }
}

fn device_params_with(hub: &Hub, id: &str, key: &str, policy: Option<&str>) -> ConnectParams {
    let host = hub.host_name();
    ConnectParams {
        client_id: id.into(),
        username: wire::device_username(&host, id, None),
        password: auth::generate_sas_token(&auth::device_resource_uri(&host, id), key, now_ms() / 1000 + 3600, policy).unwrap(),
        keep_alive_secs: 60,
        clean_session: false,
    }
}

/// Whether the hub closes this connection (within `T`).
async fn is_closed(c: &mut transport::ClientHalves) -> bool {
    matches!(tokio::time::timeout(T, c.0.next()).await, Ok(Ok(None) | Err(_)))
}

/// Whether this connection still answers a PINGREQ.
async fn is_open(c: &mut transport::ClientHalves) -> bool {
    c.1.send(&Packet::PingReq).await.is_ok() && matches!(tokio::time::timeout(T, c.0.next()).await, Ok(Ok(Some(Packet::PingResp))))
}

/// A policy as the hub holds it now.
async fn policy_of(hub: &Hub, name: &str) -> hubmsg_core::hub::Policy {
    hub.registry().policy(name).await.unwrap().unwrap()
}

/// A device identity as the hub holds it now.
async fn device_of(hub: &Hub, id: &str) -> hubmsg_core::proto::DeviceIdentity {
    hub.registry().device(id).await.unwrap().unwrap()
}

/// A replaced key closes the connections that authenticated with it — and only those — as does
/// disabling or deleting the device they speak for; the connection that asked for the change
/// still gets its answer first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_keys_and_disabled_devices_close_the_connections_that_used_them() {
    let h = start_hub().await;
    let hub = &h.hub;
    for d in ["d1", "d2", "d3", "d4"] {
        hub.create_device(d).await.unwrap();
    }
    let owner = service(hub).await;

    // Policy keys: the secondary's connection closes, the primary's stays.
    let mut svc_primary = raw_session(hub, service_params_with(hub, "service", &policy_of(hub, "service").await.primary_key)).await;
    let mut svc_secondary = raw_session(hub, service_params_with(hub, "service", &policy_of(hub, "service").await.secondary_key)).await;
    owner.regenerate_policy_key("service", "secondary").await.unwrap();
    assert!(is_closed(&mut svc_secondary).await, "a connection with the replaced service key stays open");
    assert!(is_open(&mut svc_primary).await, "the primary key was not replaced");

    // Device keys: replacing the secondary leaves a primary-key connection alone; replacing
    // the primary closes it.
    let mut d1 = raw_session(hub, device_params_with(hub, "d1", &device_of(hub, "d1").await.primary_key, None)).await;
    owner.regenerate_keys("d1", "secondary").await.unwrap();
    assert!(is_open(&mut d1).await, "a connection with an unchanged key was closed");
    owner.regenerate_keys("d1", "primary").await.unwrap();
    assert!(is_closed(&mut d1).await, "a connection with the replaced device key stays open");

    // A disabled device's connection closes; so does a deleted one's.
    let mut d2 = raw_session(hub, device_params_with(hub, "d2", &device_of(hub, "d2").await.secondary_key, None)).await;
    owner.set_device_status("d2", hubmsg_core::proto::DeviceStatus::Disabled).await.unwrap();
    assert!(is_closed(&mut d2).await, "a disabled device stays connected");
    let mut d4 = raw_session(hub, device_params_with(hub, "d4", &device_of(hub, "d4").await.primary_key, None)).await;
    owner.delete_device("d4").await.unwrap();
    assert!(is_closed(&mut d4).await, "a deleted device stays connected");

    // A device connected with a policy token (token service) goes with the policy's key.
    let mut d3 = raw_session(hub, device_params_with(hub, "d3", &policy_of(hub, "device").await.primary_key, Some("device"))).await;
    owner.regenerate_policy_key("device", "secondary").await.unwrap();
    assert!(is_open(&mut d3).await, "a connection with an unchanged policy key was closed");
    owner.regenerate_policy_key("device", "primary").await.unwrap();
    assert!(is_closed(&mut d3).await, "a device connection with the replaced policy key stays open");

    // The owner replacing its own key gets the answer, then loses its connection for good.
    let mut st = owner.status_watch();
    let p = owner.regenerate_policy_key("iothubowner", "primary").await.expect("the answer arrives before the close");
    assert_ne!(p.primary_key, policy_of(hub, "service").await.primary_key);
    let s =
        tokio::time::timeout(T, st.wait_for(|s| matches!(s, hubmsg_core::ConnectionStatus::Failed { .. }))).await.unwrap().unwrap().clone();
    assert!(matches!(s, hubmsg_core::ConnectionStatus::Failed { kind: ErrorKind::Unauthorized, .. }), "{s:?}");
    h.hub.shutdown().await.unwrap();
}

/// A hub behind a proxy or load balancer answers to the names it is configured with
/// (`public_addresses`) and to no other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_addresses_are_names_of_this_hub() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = hubmsg_core::hub::HubConfig::new(dir.path());
    cfg.public_addresses = vec!["gateway.example:9000".into()];
    let hub = Hub::start(cfg).await.unwrap();
    hub.create_device("d1").await.unwrap();
    let later = now_ms() / 1000 + 3600;
    let via = |host: &'static str| {
        let hub = &hub;
        async move {
            let mut p = params_scoped(hub, "d1", &auth::device_resource_uri(host, "d1"), later).await;
            p.username = wire::device_username(host, "d1", None);
            p
        }
    };
    transport::client_connect(&endpoint(&hub), &via("gateway.example:9000").await, T).await.unwrap();
    let Err(e) = transport::client_connect(&endpoint(&hub), &via("gateway.example:9001").await, T).await else {
        panic!("a name the hub was not given was accepted")
    };
    assert_eq!(e.kind(), ErrorKind::Unauthorized);
    hub.shutdown().await.unwrap();
}
