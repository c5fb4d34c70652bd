//! Feedback is one hub-wide queue read by every service connection that subscribes to it (as in
//! IoT Hub). A client that waits for outcomes (`send_c2d_and_wait`) learns them from
//! notifications to its own connection (`outcomes.watch`, docs/protocol.md), never by taking
//! batches from that queue: so it takes no record another client reads through `feedback()`, and
//! no reader's stream takes the record it waits for. Before the notifications, the waiting client
//! subscribed to the queue and acknowledged what it got: 37 of the reader's 40 records were
//! taken from it and 1 of 40 waits timed out.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use hubmsg_core::hub::{Hub, HubConfig};
use hubmsg_core::proto::AckMode;
use hubmsg_core::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_for_its_own_outcomes_never_takes_another_clients_feedback() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HubConfig::new(dir.path());
    cfg.feedback_interval = Duration::from_millis(20);
    let hub = Hub::start(cfg).await.unwrap();
    let reader = service(&hub).await; // reads feedback of what it sends
    let waiter = service(&hub).await; // only waits for its own outcomes
    let dev = device(&hub, "fb-dev").await;
    let mut rx = dev.c2d().unwrap();
    let settle = tokio::spawn(async move {
        while let Ok(Some(m)) = rx.recv_timeout(Duration::from_secs(20)).await {
            m.complete().unwrap();
        }
    });
    let mut fb = reader.feedback().unwrap();
    let mut expected = HashSet::new();
    let mut waits_failed = 0;
    for i in 0..40 {
        let id = format!("reader-{i}");
        reader.send_c2d("fb-dev", Message::new("r").with_message_id(&id), AckMode::Full).await.unwrap();
        expected.insert(id);
        if waiter.send_c2d_and_wait("fb-dev", Message::new("w"), AckMode::Full, Duration::from_secs(2)).await.is_err() {
            waits_failed += 1;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !expected.is_empty() && tokio::time::Instant::now() < deadline {
        if let Some(b) = fb.next_timeout(Duration::from_millis(500)).await.unwrap() {
            for r in &b.records {
                expected.remove(&r.original_message_id);
            }
            b.ack();
        }
    }
    assert!(
        expected.is_empty() && waits_failed == 0,
        "{} of 40 feedback records of the reader's messages never reached its feedback stream; {waits_failed} of 40 \
         send_c2d_and_wait calls of the other client got no feedback within 2 s",
        expected.len()
    );
    settle.abort();
    hub.shutdown().await.unwrap();
}
