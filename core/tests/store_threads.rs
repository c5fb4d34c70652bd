//! One process with 1,000 device clients (each a durable outbox and a completed-id store: 2,000
//! logs) runs a bounded pool of store threads, not a thread per log.

use std::time::Duration;

use hubmsg_core::outbox::OutboxOptions;
use hubmsg_core::retry::RetryPolicy;
use hubmsg_core::store::Durability;
use hubmsg_core::{DeviceClient, DeviceOptions, Message};

fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|s| s.trim().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_device_clients_share_a_bounded_pool_of_store_threads() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens here; the clients only queue.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let before = thread_names().len();
    // Opened 50 at a time (their directory fsyncs overlap).
    let mut clients = Vec::new();
    for batch in 0..20 {
        let mut set = tokio::task::JoinSet::new();
        for i in batch * 50..batch * 50 + 50 {
            let cs = format!("HostName=127.0.0.1:{port};DeviceId=dev-{i};SharedAccessKey=c2VjcmV0c2VjcmV0c2VjcmV0");
            let mut o = DeviceOptions::from_connection_string(&cs).unwrap();
            // (durability never: this is about threads, not fsync cost)
            o.outbox =
                OutboxOptions { dir: Some(dir.path().join(format!("dev-{i}"))), durability: Durability::Never, ..OutboxOptions::default() };
            o.retry =
                RetryPolicy { initial_delay: Duration::from_secs(3600), max_delay: Duration::from_secs(3600), ..RetryPolicy::default() };
            set.spawn(async move {
                let c = DeviceClient::connect(o).await.unwrap();
                c.send(Message::new(format!("reading of {i}"))).await.unwrap();
                c
            });
        }
        while let Some(c) = set.join_next().await {
            clients.push(c.unwrap());
        }
    }
    let names = thread_names();
    let store = names.iter().filter(|n| n.starts_with("hubmsg-store")).count();
    eprintln!("{} threads with 1,000 device clients ({} before), {store} of them store threads", names.len(), before);
    assert!((1..=64).contains(&store), "store threads: {store}");
    assert!(names.len() < 200, "{} threads for 1,000 clients", names.len());
    for c in &clients {
        assert_eq!(c.stats().outbox.depth, 1);
    }
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(5), c.close()).await;
    }
    // Once no log is open the pool can be released (the C library does so when its last handle
    // is freed), leaving no store thread; the next log starts it again.
    assert!(hubmsg_core::store::release_threads(Duration::from_secs(10)), "a log is still open");
    let left = thread_names().into_iter().filter(|n| n.starts_with("hubmsg-store")).count();
    assert_eq!(left, 0, "store threads left after release_threads");
    let log = hubmsg_core::store::Log::open(&dir.path().join("after"), hubmsg_core::store::LogOptions::default()).unwrap();
    let seq = log.append(b"again").unwrap();
    log.wait_durable(seq).await.unwrap();
    log.close().unwrap();
}
