//! The hub's data directory as an operator's mistakes treat it: a second hub started on it, the
//! newest segment of a partition deleted.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use hubmsg_core::hub::{Hub, HubConfig};
use hubmsg_core::proto::StartPosition;
use hubmsg_core::{ErrorKind, Message};

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_hub_on_the_same_data_directory_is_refused() {
    let h = start_hub().await;
    let e = Hub::start(HubConfig::new(h.dir.path())).await.err().expect("a second hub on the same data must not start");
    assert_eq!(e.kind(), ErrorKind::Storage, "{e}");
    assert!(e.to_string().contains(&std::process::id().to_string()), "the error names the holder's pid: {e}");
    // The first hub is unaffected.
    let dev = device(&h.hub, "still-served").await;
    dev.send(Message::new("x")).await.unwrap().outcome().await.unwrap();
    dev.close().await.unwrap();
    h.hub.shutdown().await.unwrap();
}

async fn send_all(hub: &Hub, id: &str, prefix: &str, n: usize) {
    let dev = device(hub, id).await;
    for i in 0..n {
        dev.send(Message::new(format!("{prefix} {i}"))).await.unwrap();
    }
    dev.flush(T).await.unwrap();
    dev.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_newest_segment_never_reuses_sequence_numbers_a_checkpoint_has_seen() {
    let dir = tempfile::tempdir().unwrap();
    let config = || {
        let mut c = HubConfig::new(dir.path());
        c.partitions = 1;
        c.segment_bytes = 16 * 1024;
        c
    };
    let hub = Hub::start(config()).await.unwrap();
    send_all(&hub, "meter", "old", 300).await;
    let svc = service(&hub).await;
    let mut ev = svc.events("$Default", StartPosition::Checkpoint).await.unwrap();
    for _ in 0..300 {
        ev.next_timeout(T).await.unwrap().expect("event").ack();
    }
    ev.checkpoint().await.unwrap();
    ev.close().await;
    svc.close().await;
    hub.shutdown().await.unwrap();

    // The operator's mistake: the newest segment of the partition is deleted.
    let p0 = dir.path().join("events").join("p0");
    let mut segs: Vec<_> =
        std::fs::read_dir(&p0).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "seg")).collect();
    segs.sort();
    assert!(segs.len() > 2, "{} segments", segs.len());
    std::fs::remove_file(segs.last().unwrap()).unwrap();

    let hub = Hub::start(config()).await.unwrap();
    send_all(&hub, "meter", "new", 300).await;
    let svc = service(&hub).await;
    let mut ev = svc.events("$Default", StartPosition::Checkpoint).await.unwrap();
    let mut got = HashSet::new();
    while got.len() < 300 {
        let Some(e) = ev.next_timeout(Duration::from_secs(5)).await.unwrap() else { break };
        let body = String::from_utf8_lossy(&e.message().body).to_string();
        if body.starts_with("new ") {
            got.insert(body);
        }
        e.ack();
    }
    assert_eq!(got.len(), 300, "every message PUBACKed after the restart reaches the group whose checkpoint lay past the cut");
    ev.close().await;
    svc.close().await;
    hub.shutdown().await.unwrap();
}
