//! No key or token in any log line: a full run (devices, services, C2D, feedback, bad
//! credentials, key regeneration, deletes) logs at TRACE into a buffer, and the buffer is
//! searched for every key and every token signature that existed during the run.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hubmsg_core::auth;
use hubmsg_core::message::now_ms;
use hubmsg_core::proto::AckMode;
use hubmsg_core::transport::{self, ConnectParams, Endpoint};
use hubmsg_core::{wire, Message};
use parking_lot::Mutex;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_run_logs_no_key_and_no_token() {
    let cap = Capture::default();
    let writer = cap.clone();
    tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(move || writer.clone()).with_ansi(false).init();

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = hubmsg_core::hub::HubConfig::new(dir.path());
    cfg.feedback_interval = Duration::from_millis(50);
    let hub = hubmsg_core::hub::Hub::start(cfg).await.unwrap();
    let mut secrets: Vec<String> = Vec::new();
    let svc = service(&hub).await;
    let dev = device(&hub, "logged").await;
    let mut rx = dev.c2d().unwrap();
    for i in 0..5 {
        dev.send(Message::new(format!("m{i}"))).await.unwrap();
        svc.send_c2d("logged", Message::new(format!("c{i}")), AckMode::Full).await.unwrap();
        rx.recv_timeout(T).await.unwrap().unwrap().complete().unwrap();
    }
    let mut ev = svc.events("$Default", hubmsg_core::proto::StartPosition::Earliest).await.unwrap();
    for _ in 0..5 {
        ev.next_timeout(T).await.unwrap().unwrap().ack();
    }
    // Bad credentials of every kind.
    let host = hub.host_name();
    let a = hub.mqtt_addr().unwrap();
    let ep = Endpoint { host: a.ip().to_string(), port: a.port(), tls: None };
    let real_key = hub.registry().device("logged").await.unwrap().unwrap().primary_key;
    for (key, scope, se) in [
        (auth::generate_key(), auth::device_resource_uri(&host, "logged"), now_ms() / 1000 + 60),
        (real_key.clone(), host.clone(), now_ms() / 1000 + 60),
        (real_key.clone(), auth::device_resource_uri(&host, "logged"), 10),
    ] {
        let token = auth::generate_sas_token(&scope, &key, se, None).unwrap();
        secrets.push(key.clone());
        secrets.push(auth::SasToken::parse(&token).unwrap().sig);
        secrets.push(token.clone());
        let p = ConnectParams {
            client_id: "logged".into(),
            username: wire::device_username(&host, "logged", None),
            password: token,
            keep_alive_secs: 60,
            clean_session: false,
        };
        assert!(transport::client_connect(&ep, &p, T).await.is_err());
    }
    // Key changes and deletes.
    svc.regenerate_keys("logged", "both").await.unwrap();
    svc.regenerate_policy_key("device", "both").await.unwrap();
    svc.create_device("doomed").await.unwrap();
    svc.delete_device("doomed").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for d in hub.registry().devices().await.unwrap() {
        secrets.push(d.primary_key);
        secrets.push(d.secondary_key);
    }
    for p in hub.registry().policies().await.unwrap() {
        secrets.push(p.primary_key);
        secrets.push(p.secondary_key);
    }
    secrets.push(real_key);
    dev.close().await.unwrap();
    svc.close().await;
    hub.shutdown().await.unwrap();

    let log = String::from_utf8_lossy(&cap.0.lock()).to_string();
    assert!(log.lines().count() >= 5, "the run logged something:\n{log}");
    assert!(log.contains("CONNECT refused"), "refusals were logged");
    for s in &secrets {
        // Also look for a distinctive prefix, in case a secret was cut or escaped.
        for needle in [s.as_str(), &s[..16.min(s.len())]] {
            assert!(!log.contains(needle), "a secret ({}…) appears in the log", &needle[..6.min(needle.len())]);
        }
    }
}
