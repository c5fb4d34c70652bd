//! A device client given no outbox option keeps its outbox on disk (README: `send()` returns once
//! the message is durable in an fsync'd outbox), under `HUBMSG_OUTBOX_DIR/<host name>/<device id>`.
//! This file is its own test binary because it sets that environment variable.

use std::time::Duration;

use hubmsg_core::{DeviceClient, DeviceOptions, Message};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_without_outbox_options_keeps_its_messages_on_disk() {
    let base = tempfile::tempdir().unwrap();
    std::env::set_var("HUBMSG_OUTBOX_DIR", base.path());
    // Nothing listens on this port: every message stays queued.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cs = format!("HostName=127.0.0.1:{port};DeviceId=pump-7;SharedAccessKey=c2VjcmV0c2VjcmV0c2VjcmV0");
    {
        let dev = DeviceClient::connect(DeviceOptions::from_connection_string(&cs).unwrap()).await.unwrap();
        for i in 0..5 {
            dev.send(Message::new(format!("reading {i}"))).await.unwrap();
        }
        // The process ends with the messages still queued.
        dev.close().await.unwrap();
    }
    assert!(
        base.path().join(format!("127.0.0.1:{port}")).join("pump-7").is_dir(),
        "the outbox lives under HUBMSG_OUTBOX_DIR/<host name>/<device id>"
    );
    let dev = DeviceClient::connect(DeviceOptions::from_connection_string(&cs).unwrap()).await.unwrap();
    let st = dev.stats();
    assert_eq!((st.outbox.recovered, st.outbox.depth), (5, 5), "every accepted message survives in the default outbox");
    let _ = tokio::time::timeout(Duration::from_secs(5), dev.close()).await;
    // The same device id at another hub has an outbox of its own: nothing queued for the first
    // hub is ever sent to the second.
    let other = cs.replace(&format!("127.0.0.1:{port}"), "127.0.0.1:1");
    let dev = DeviceClient::connect(DeviceOptions::from_connection_string(&other).unwrap()).await.unwrap();
    assert_eq!(dev.stats().outbox.recovered, 0, "another hub's device of the same id starts with an empty outbox");
    let _ = tokio::time::timeout(Duration::from_secs(5), dev.close()).await;
}
