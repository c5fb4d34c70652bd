//! Outcome notifications against competing feedback readers, one body for every backend:
//! `core/tests/feedback_readers.rs` runs it on one embedded hub, `nats/tests/hub_nodes.rs`
//! on two hub nodes over JetStream (the waiter on one node, the device and the reader on the
//! other).

use std::collections::HashSet;
use std::time::Duration;

use super::common::*;
use hubmsg_core::hub::Hub;
use hubmsg_core::proto::{AckMode, FeedbackStatus};
use hubmsg_core::Message;

/// A reader sends 40 messages and reads their feedback through `feedback()`; a waiter sends 40
/// with `send_c2d_and_wait` in between. Every record of the reader's reaches its stream (the
/// waiter takes none from the shared queue) and every wait resolves with its own record.
pub async fn readers_keep_their_feedback_and_waiters_get_their_outcomes(reader_hub: &Hub, waiter_hub: &Hub, device_hub: &Hub) {
    let reader = service(reader_hub).await; // reads feedback of what it sends
    let waiter = service(waiter_hub).await; // only waits for its own outcomes
    let dev = device(device_hub, "fb-dev").await;
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
        let wid = format!("waiter-{i}");
        match waiter.send_c2d_and_wait("fb-dev", Message::new("w").with_message_id(&wid), AckMode::Full, Duration::from_secs(2)).await {
            Ok(r) => assert_eq!((r.original_message_id.as_str(), r.status_code), (wid.as_str(), FeedbackStatus::Success)),
            Err(_) => waits_failed += 1,
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
    assert_eq!(waiter.pending_counts(), (0, 0, 0), "the waiter keeps nothing of finished waits");
    settle.abort();
    dev.close().await.unwrap();
    reader.close().await;
    waiter.close().await;
}
