//! C2D exactly as IoT Hub defines it, and the service client's bookkeeping: de-duplication by
//! delivery identity, PUBACKs in receive order, expiry judged by the hub, oversize deliveries
//! dead-lettered without stopping D2C, SAS renewal that is not a failure, no map leaks.

mod common;

use std::time::Duration;

use common::*;
use hubmsg_core::hub::{Hub, HubConfig};
use hubmsg_core::message::now_ms;
use hubmsg_core::outbox::Outcome;
use hubmsg_core::proto::{AckMode, FeedbackRecord, FeedbackStatus};
use hubmsg_core::service::{ServiceClient, ServiceOptions};
use hubmsg_core::transport::{PacketReader, PacketWriter, MAX_PACKET_SIZE};
use hubmsg_core::{wire, ConnectionStatus, DeviceClient, DeviceOptions, Message};
use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, Packet, PubAck, Publish};
use rumqttc::mqttbytes::QoS;

const T: Duration = Duration::from_secs(20);

async fn fast_hub(tweak: impl FnOnce(&mut HubConfig)) -> (Hub, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HubConfig::new(dir.path());
    cfg.feedback_interval = Duration::from_millis(50);
    tweak(&mut cfg);
    (Hub::start(cfg).await.unwrap(), dir)
}

/// Collects feedback records until `n` arrived.
async fn feedback(svc: &ServiceClient, n: usize) -> Vec<FeedbackRecord> {
    let mut fb = svc.feedback().unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let b = fb.next_timeout(T).await.unwrap().expect("feedback in time");
        out.extend(b.records.iter().cloned());
        b.ack();
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_message_id_is_a_new_command() {
    let (hub, _dir) = fast_hub(|_| {}).await;
    let svc = service(&hub).await;
    let dev = device(&hub, "pump").await;
    let mut rx = dev.c2d().unwrap();
    for round in 0..3 {
        svc.send_c2d("pump", Message::new(format!("reboot {round}")).with_message_id("reboot"), AckMode::Positive).await.unwrap();
        let m = rx.recv_timeout(T).await.unwrap().unwrap_or_else(|| panic!("command {round} reached the app"));
        assert_eq!(m.message.body, format!("reboot {round}"));
        m.complete().unwrap();
    }
    let records = feedback(&svc, 3).await;
    assert!(records.iter().all(|r| r.status_code == FeedbackStatus::Success && r.original_message_id == "reboot"));
    assert_eq!(dev.stats().c2d_received, 3);
    hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubacks_leave_in_receive_order_whatever_order_the_app_settles_in() {
    let (hub, _dir) = fast_hub(|_| {}).await;
    let svc = service(&hub).await;
    let dev = device(&hub, "valve").await;
    let mut rx = dev.c2d().unwrap();
    for i in 1..=4 {
        svc.send_c2d("valve", Message::new(format!("{i}")).with_message_id(format!("m{i}")), AckMode::Full).await.unwrap();
    }
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(rx.recv_timeout(T).await.unwrap().unwrap());
    }
    // Settle backwards (4 rejected, 3 and 2 completed) and see nothing move until 1 is settled.
    let m1 = held.remove(0);
    let mut rest = held.into_iter().rev();
    rest.next().unwrap().reject().unwrap();
    for m in rest {
        m.complete().unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hub.c2d().depth("valve").await.unwrap(), 4, "later settles wait for the first");
    m1.complete().unwrap();
    let order: Vec<(String, FeedbackStatus)> =
        feedback(&svc, 4).await.into_iter().map(|r| (r.original_message_id, r.status_code)).collect();
    assert_eq!(
        order,
        [
            ("m1", FeedbackStatus::Success),
            ("m2", FeedbackStatus::Success),
            ("m3", FeedbackStatus::Success),
            ("m4", FeedbackStatus::Rejected)
        ]
        .map(|(id, s)| (id.to_string(), s))
    );
    hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_c2d_is_dead_lettered_and_d2c_keeps_flowing() {
    // A hub configured to accept bigger C2D than MQTT devices can take.
    let (hub, _dir) = fast_hub(|c| c.c2d.max_size = 1024 * 1024).await;
    let svc = service(&hub).await;
    let dev = device(&hub, "small").await;
    let mut rx = dev.c2d().unwrap();
    let fb = svc.await_outcome("huge").unwrap();
    // 70 KB of '/' become 210 KB of `%2F` in the delivery topic: more than MQTT's 65,535.
    let mut huge = Message::new("x").with_message_id("huge");
    huge.properties.push(("p".into(), "/".repeat(70_000)));
    svc.send_c2d("small", huge, AckMode::Full).await.unwrap();
    // A send too big for the service wire is refused at once instead of retried for ever.
    let e = svc.send_c2d("small", Message::new(vec![b'x'; MAX_PACKET_SIZE]), AckMode::None).await.unwrap_err();
    assert_eq!(e.kind(), hubmsg_core::ErrorKind::MessageTooLarge);
    svc.send_c2d("small", Message::new("after").with_message_id("after"), AckMode::None).await.unwrap();
    let r = tokio::time::timeout(T, fb).await.unwrap().unwrap();
    assert_eq!(r.status_code, FeedbackStatus::Rejected, "dead-lettered with feedback");
    let m = rx.recv_timeout(T).await.unwrap().unwrap();
    assert_eq!(m.message.body, "after");
    m.complete().unwrap();
    let d = dev.send(Message::new("d2c")).await.unwrap();
    assert_eq!(tokio::time::timeout(T, d.outcome()).await.unwrap().unwrap(), Outcome::Delivered);
    // With the default limit the whole delivery packet counts: a body that fits 64 KB alone
    // but not with its properties is refused at send.
    let (hub2, _dir2) = fast_hub(|_| {}).await;
    hub2.create_device("d").await.unwrap();
    let svc2 = service(&hub2).await;
    let mut m = Message::new(vec![0u8; 64 * 1024 - 100]);
    m.properties.push(("note".into(), "y".repeat(200)));
    let e = svc2.send_c2d("d", m, AckMode::None).await.unwrap_err();
    assert_eq!(e.kind(), hubmsg_core::ErrorKind::MessageTooLarge, "{e}");
    hub2.shutdown().await.unwrap();
    hub.shutdown().await.unwrap();
}

/// A stand-in hub speaking just enough MQTT to hand the device one PUBLISH after CONNACK, then
/// accept its D2C; reports the packets it received.
async fn fake_hub(first: Publish) -> (u16, tokio::sync::mpsc::UnboundedReceiver<Packet>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        for conn in 0..5u32 {
            let Ok((s, _)) = l.accept().await else { return };
            let (r, w) = tokio::io::split(s);
            let (mut r, mut w) = (PacketReader::new(r, 10 * MAX_PACKET_SIZE), PacketWriter::new(w));
            let tx = tx.clone();
            let first = first.clone();
            tokio::spawn(async move {
                let Ok(Some(Packet::Connect(_))) = r.next().await else { return };
                w.send(&Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))).await.unwrap();
                if conn == 0 {
                    w.send(&Packet::Publish(first)).await.unwrap();
                }
                while let Ok(Some(p)) = r.next().await {
                    if let Packet::Publish(p) = &p {
                        if p.qos == QoS::AtLeastOnce && p.topic.contains("/messages/events/") {
                            let _ = w.send(&Packet::PubAck(PubAck::new(p.pkid))).await;
                        }
                    }
                    let _ = tx.send(p);
                }
            });
        }
    });
    (port, rx)
}

fn fake_device(port: u16) -> DeviceOptions {
    let key = hubmsg_core::auth::generate_key();
    let mut o = DeviceOptions::from_connection_string(&format!("HostName=127.0.0.1:{port};DeviceId=dev;SharedAccessKey={key}")).unwrap();
    o.retry = fast_retry();
    o.outbox = hubmsg_core::outbox::OutboxOptions::in_memory(); // about the wire, not the disk
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_the_hubs_judgement_not_the_device_clock() {
    // The hub delivered it, so it was not expired by the hub's clock, though its expiry lies in
    // the device's past (the device clock runs ahead).
    let mut m = Message::new("late but valid").with_message_id("m1");
    m.expiry_time_ms = Some(now_ms() - 60_000);
    m.system.push(("iothub-sequencenumber".into(), "5".into()));
    let mut p = Publish::new(wire::c2d_topic("dev", &wire::c2d_bag(&m)), QoS::AtLeastOnce, m.body.to_vec());
    p.pkid = 1;
    let (port, mut seen) = fake_hub(p).await;
    let dev = DeviceClient::connect(fake_device(port)).await.unwrap();
    let mut rx = dev.c2d().unwrap();
    let got = rx.recv_timeout(T).await.unwrap().expect("handed to the app");
    assert_eq!(got.message.body, "late but valid");
    got.complete().unwrap();
    loop {
        match tokio::time::timeout(T, seen.recv()).await.unwrap().unwrap() {
            Packet::PubAck(a) if a.pkid == 1 => break,
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_packet_from_the_hub_never_stops_d2c() {
    let mut p = Publish::new(wire::c2d_topic("dev", ""), QoS::AtLeastOnce, vec![0u8; MAX_PACKET_SIZE + 10]);
    p.pkid = 1;
    let (port, mut seen) = fake_hub(p).await;
    let dev = DeviceClient::connect(fake_device(port)).await.unwrap();
    let _rx = dev.c2d().unwrap();
    let d = dev.send(Message::new("keeps going")).await.unwrap();
    assert_eq!(tokio::time::timeout(T, d.outcome()).await.unwrap().unwrap(), Outcome::Delivered);
    assert!(!matches!(dev.status(), ConnectionStatus::Failed { .. }), "{:?}", dev.status());
    while let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(200), seen.recv()).await {
        drop(p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sas_renewal_is_not_a_failure_for_either_client() {
    let (hub, _dir) = fast_hub(|_| {}).await;
    hub.create_device("renewer").await.unwrap();
    let mut so = ServiceOptions::from_connection_string(&hub.service_connection_string()).unwrap();
    so.retry = fast_retry();
    so.token_ttl = Duration::from_secs(1); // renews every 0.8 s
    let svc = ServiceClient::connect(so).await.unwrap();
    let mut o = DeviceOptions::from_connection_string(&hub.device_connection_string("renewer").await.unwrap()).unwrap();
    o.retry = fast_retry();
    o.outbox = hubmsg_core::outbox::OutboxOptions::in_memory(); // about token renewal, not the disk
    o.token_ttl = Duration::from_secs(1);
    let dev = DeviceClient::connect(o).await.unwrap();
    let mut svc_status = svc.status_watch();
    let mut dev_status = dev.status_watch();
    let watch = async {
        let mut bad = Vec::new();
        loop {
            tokio::select! {
                r = svc_status.changed() => { if r.is_err() { break } let s = svc_status.borrow().clone(); if matches!(s, ConnectionStatus::Retrying { .. } | ConnectionStatus::Disconnected { .. } | ConnectionStatus::Failed { .. }) { bad.push(format!("service {s:?}")) } }
                r = dev_status.changed() => { if r.is_err() { break } let s = dev_status.borrow().clone(); if matches!(s, ConnectionStatus::Retrying { .. } | ConnectionStatus::Disconnected { .. } | ConnectionStatus::Failed { .. }) { bad.push(format!("device {s:?}")) } }
            }
        }
        bad
    };
    let work = async {
        for i in 0..30 {
            assert_eq!(svc.get_device("renewer").await.unwrap().device_id, "renewer");
            let d = dev.send(Message::new(format!("{i}"))).await.unwrap();
            assert_eq!(tokio::time::timeout(T, d.outcome()).await.unwrap().unwrap(), Outcome::Delivered);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let bad = tokio::select! { b = watch => b, () = work => Vec::new() };
    assert!(bad.is_empty(), "renewals showed as failures: {bad:?}");
    assert!(dev.stats().renewals >= 2, "{:?}", dev.stats());
    assert_eq!(dev.stats().retries, 0);
    hub.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_waiters_do_not_leak() {
    let (hub, _dir) = fast_hub(|_| {}).await;
    hub.create_device("d").await.unwrap();
    let svc = service(&hub).await;
    for i in 0..200 {
        let rx = svc.await_outcome(&format!("gave-up-{i}")).unwrap();
        drop(rx); // a caller that timed out
    }
    for i in 0..20 {
        // A send whose caller is cancelled at once (its future dropped).
        let _ = tokio::time::timeout(Duration::from_micros(1), svc.send_c2d("d", Message::new(format!("{i}")), AckMode::None)).await;
    }
    assert!(eventually(T, || svc.pending_counts() == (0, 0, 0)).await, "maps still hold abandoned entries: {:?}", svc.pending_counts());
    hub.shutdown().await.unwrap();
}
