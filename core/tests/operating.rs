//! Operating a hub: `/healthz`, `/readyz` and Prometheus `/metrics` scraped during a run and
//! checked against what was sent; readiness drops as soon as a drain starts.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use hubmsg_core::hub::{Hub, HubConfig};
use hubmsg_core::outbox::Outcome;
use hubmsg_core::proto::AckMode;
use hubmsg_core::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

/// GET `path` from the hub's HTTP endpoint: (status code, body). A scrape that fails at the
/// TCP level is tried again (at most 5 times), as a scraper would.
async fn get(hub_http: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut last = None;
    for _ in 0..5 {
        let once = async {
            let mut s = tokio::net::TcpStream::connect(hub_http).await?;
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        match tokio::time::timeout(T, once).await.expect("an answer within 20 s") {
            Ok(buf) => {
                let text = String::from_utf8(buf).unwrap();
                let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP head in {text:?}"));
                return (head.split(' ').nth(1).unwrap().parse().unwrap(), body.to_string());
            }
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    panic!("GET {path} failed 5 times: {last:?}");
}

/// The unlabelled samples of a Prometheus text page.
fn samples(page: &str) -> HashMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| l.split_once(' ').map(|(k, v)| (k.to_string(), v.parse().unwrap())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_sent_and_readiness_drops_on_drain() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HubConfig::new(dir.path());
    cfg.feedback_interval = Duration::from_millis(50);
    cfg.http = Some(([127, 0, 0, 1], 0).into());
    let hub = Hub::start(cfg).await.unwrap();
    let http = hub.http_addr().unwrap();
    assert_eq!(get(http, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(get(http, "/readyz").await.0, 200);
    assert_eq!(get(http, "/nothing").await.0, 404);

    let svc = service(&hub).await;
    let mut devices = Vec::new();
    for i in 0..3 {
        devices.push(device(&hub, &format!("m{i}")).await);
    }
    let mut rx = devices[0].c2d().unwrap();
    // 3 × 30 D2C, every one delivered.
    for d in &devices {
        let sent = d.send_batch((0..30).map(|k| Message::new(format!("{k}"))).collect()).await.unwrap();
        for s in sent {
            assert_eq!(tokio::time::timeout(T, s.outcome()).await.unwrap().unwrap(), Outcome::Delivered);
        }
    }
    // Scraped during the run: the D2C counters and the live connections.
    let during = samples(&get(http, "/metrics").await.1);
    assert_eq!(during["hubmsg_d2c_telemetry_ingress_success_total"], 90.0);
    assert_eq!(during["hubmsg_connected_device_count"], 3.0);
    assert!(during["hubmsg_store_commit_seconds_count"] >= 90.0);

    // C2D: 5 sent; 3 completed, 1 rejected, 1 abandoned once and then completed.
    for k in 0..5 {
        svc.send_c2d("m0", Message::new(format!("c{k}")).with_message_id(format!("c{k}")), AckMode::Full).await.unwrap();
    }
    let mut abandoned = false;
    let mut settled = 0;
    while settled < 5 {
        let m = rx.recv_timeout(T).await.unwrap().expect("a C2D message");
        match m.message.message_id.as_deref() {
            Some("c3") => {
                m.reject().unwrap();
                settled += 1;
            }
            Some("c4") if !abandoned => {
                abandoned = true;
                m.abandon().unwrap();
            }
            _ => {
                m.complete().unwrap();
                settled += 1;
            }
        }
    }
    let mut fb = svc.feedback().unwrap();
    let mut records = 0;
    while records < 5 {
        let b = fb.next_timeout(T).await.unwrap().expect("feedback");
        records += b.records.len();
        b.ack();
    }
    let acked = eventually_async(T, || async { samples(&get(http, "/metrics").await.1)["hubmsg_c2d_feedback_records_total"] == 5.0 }).await;
    let after = samples(&get(http, "/metrics").await.1);
    assert!(acked, "feedback records acknowledged: {} (the service read {records})", after["hubmsg_c2d_feedback_records_total"]);
    assert_eq!(after["hubmsg_c2d_commands_sent_total"], 5.0);
    assert_eq!(after["hubmsg_c2d_commands_egress_complete_success_total"], 4.0);
    assert_eq!(after["hubmsg_c2d_commands_egress_reject_success_total"], 1.0);
    assert_eq!(after["hubmsg_c2d_commands_egress_abandon_success_total"], 1.0);
    assert_eq!(after["hubmsg_c2d_commands_expired_total"], 0.0);
    assert_eq!(after["hubmsg_c2d_queue_depth"], 0.0);
    assert_eq!(after["hubmsg_c2d_feedback_pending"], 0.0);
    assert_eq!(after["hubmsg_backend_errors_total"], 0.0);
    assert!(after["hubmsg_c2d_feedback_batches_total"] >= 1.0);
    assert_eq!((after["hubmsg_c2d_outcome_notifications_total"], after["hubmsg_c2d_outcome_watches"]), (0.0, 0.0));

    // A waited-for outcome is notified to the waiting connection (and stays in the queue).
    let waiter = svc.clone();
    let wait = tokio::spawn(async move { waiter.send_c2d_and_wait("m0", Message::new("w").with_message_id("w0"), AckMode::Full, T).await });
    let m = rx.recv_timeout(T).await.unwrap().expect("the waited-for message");
    let watching = samples(&get(http, "/metrics").await.1)["hubmsg_c2d_outcome_watches"];
    assert_eq!(watching, 1.0, "the hub watches w0 for the waiting connection");
    m.complete().unwrap();
    assert_eq!(tokio::time::timeout(T, wait).await.unwrap().unwrap().unwrap().original_message_id, "w0");
    let b = fb.next_timeout(T).await.unwrap().expect("the record in the shared queue too");
    assert_eq!(b.records[0].original_message_id, "w0");
    b.ack();
    let notified = samples(&get(http, "/metrics").await.1);
    assert_eq!((notified["hubmsg_c2d_outcome_notifications_total"], notified["hubmsg_c2d_outcome_watches"]), (1.0, 0.0));
    let page = get(http, "/metrics").await.1;
    assert!(page.contains("hubmsg_info{version=") && page.contains("backend=\"embedded\""), "{page}");
    assert!(page.contains("# TYPE hubmsg_store_commit_seconds histogram"));

    // A drain makes the hub unready at once, then closes every session. (A connection that
    // never sends CONNECT keeps the drain waiting for its connect timeout, long enough to look.)
    let open = |h: &Hub| h.stats().open_connections.load(std::sync::atomic::Ordering::SeqCst);
    let before = open(&hub);
    let _silent = tokio::net::TcpStream::connect(hub.mqtt_addr().unwrap()).await.unwrap();
    assert!(eventually(T, || open(&hub) > before).await, "the hub took the silent connection");
    let started = std::time::Instant::now();
    let drain = tokio::spawn(hub.drain(Duration::from_secs(10)));
    assert!(eventually_async(T, || async { get(http, "/readyz").await.0 == 503 }).await);
    assert!(started.elapsed() < Duration::from_secs(4), "readiness dropped at once");
    tokio::time::timeout(T, drain).await.unwrap().unwrap().unwrap();
    assert!(eventually(T, || !matches!(devices[1].status(), hubmsg_core::ConnectionStatus::Connected)).await);
}
