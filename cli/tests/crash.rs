//! Crash tests with real processes killed by SIGKILL: a device process in the middle of sending
//! 10,000 messages, and the hub process in the middle of a stream. Every message whose `send()`
//! returned (printed as `accepted <id>` by `hubmsg device send --print-accepted`) must reach a
//! consumer at least once; duplicates are counted and reported.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::*;
use hubmsg_core::proto::StartPosition;
use hubmsg_core::service::{ServiceClient, ServiceOptions};
use parking_lot::Mutex;

const TOTAL: u64 = 10_000;

/// Spawns `hubmsg device send`; returns the child and a channel of accepted message numbers.
fn spawn_sender(cs: &str, outbox: &Path, start: u64, count: u64) -> (Child, mpsc::Receiver<u64>) {
    let mut child = Command::new(BIN)
        .args(["device", "send", "--data", "m{i}", "--message-id-prefix", "m-", "--print-accepted", "--batch", "50"])
        .args(["--outbox", outbox.to_str().unwrap(), "--start", &start.to_string(), "--count", &count.to_string()])
        .args(["--flush-timeout-secs", "120"])
        .env("HUBMSG_DEVICE_CONNECTION_STRING", cs)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn device");
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("accepted m-").and_then(|n| n.parse().ok()) {
                let _ = tx.send(n);
            }
        }
    });
    (child, rx)
}

/// A consumer that records how often each message number arrived.
fn consume(rt: &tokio::runtime::Runtime, cs: &str) -> Arc<Mutex<HashMap<u64, u32>>> {
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let mut opts = ServiceOptions::from_connection_string(cs).unwrap();
    opts.retry = retry();
    let s = seen.clone();
    rt.spawn(async move {
        let svc = ServiceClient::connect(opts).await.unwrap();
        let mut events = svc.events("$Default", StartPosition::Earliest).await.unwrap();
        while let Some(Ok(ev)) = events.next().await {
            if let Some(n) = ev.message_id().and_then(|m| m.strip_prefix("m-")).and_then(|n| n.parse().ok()) {
                *s.lock().entry(n).or_insert(0) += 1;
            }
            ev.ack();
        }
    });
    seen
}

fn wait_all(seen: &Mutex<HashMap<u64, u32>>, expected: &[u64], limit: Duration) -> (usize, u64) {
    let deadline = Instant::now() + limit;
    loop {
        let (missing, dups) = {
            let s = seen.lock();
            (expected.iter().filter(|n| !s.contains_key(n)).count(), s.values().map(|c| (*c as u64).saturating_sub(1)).sum())
        };
        if missing == 0 || Instant::now() >= deadline {
            return (missing, dups);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn device_sigkilled_mid_stream_loses_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut hub = spawn_hub(&dir.path().join("hub"), free_port());
    let dev_cs = create_device(&rt, &hub.cs, "crashy");
    let seen = consume(&rt, &hub.cs);
    let outbox = dir.path().join("outbox");

    let (mut child, rx) = spawn_sender(&dev_cs, &outbox, 0, TOTAL);
    let mut accepted = Vec::new();
    while accepted.len() < 3000 {
        accepted.push(rx.recv_timeout(Duration::from_secs(60)).expect("device keeps accepting"));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    accepted.extend(rx.iter()); // lines printed before the kill
    let resume = accepted.iter().max().unwrap() + 1;
    assert!(resume < TOTAL, "the kill happened mid-stream");
    let delivered_before_restart = seen.lock().len();

    let (mut child, rx) = spawn_sender(&dev_cs, &outbox, resume, TOTAL - resume);
    assert!(child.wait().unwrap().success(), "restarted sender delivers and exits cleanly");
    accepted.extend(rx.iter());
    let (missing, dups) = wait_all(&seen, &accepted, Duration::from_secs(60));
    eprintln!(
        "device kill: accepted {} (killed after {}, {} delivered before restart), lost {missing}, duplicates {dups}",
        accepted.len(),
        resume,
        delivered_before_restart
    );
    assert_eq!(missing, 0, "every accepted message reaches the consumer");
    let all: Vec<u64> = (0..TOTAL).collect();
    assert_eq!(wait_all(&seen, &all, Duration::from_secs(5)).0, 0, "all 10,000 arrive");
    hub.child.kill().unwrap();
    let _ = hub.child.wait();
}

#[test]
fn hub_sigkilled_mid_stream_loses_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("hub");
    let mut hub = spawn_hub(&data, port);
    let dev_cs = create_device(&rt, &hub.cs, "steady");
    let seen = consume(&rt, &hub.cs);

    let (mut child, rx) = spawn_sender(&dev_cs, &dir.path().join("outbox"), 0, TOTAL);
    let mut accepted = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.lock().len() < 2000 {
        assert!(Instant::now() < deadline, "stream started");
        while let Ok(n) = rx.try_recv() {
            accepted.push(n);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    hub.child.kill().unwrap(); // SIGKILL mid-stream
    hub.child.wait().unwrap();
    let at_kill = seen.lock().len();
    std::thread::sleep(Duration::from_millis(300));
    let mut hub = spawn_hub(&data, port);

    assert!(child.wait().unwrap().success(), "sender delivers everything after the hub returns");
    accepted.extend(rx.iter());
    let (missing, dups) = wait_all(&seen, &accepted, Duration::from_secs(60));
    eprintln!("hub kill: accepted {}, consumed {at_kill} before the kill, lost {missing}, duplicates {dups}", accepted.len());
    assert_eq!(accepted.len() as u64, TOTAL);
    assert_eq!(missing, 0, "every accepted message reaches the consumer");
    hub.child.kill().unwrap();
    let _ = hub.child.wait();
}

#[test]
fn hub_sigkilled_with_c2d_in_flight_loses_and_doubles_nothing() {
    use hubmsg_core::proto::{AckMode, FeedbackStatus};
    use hubmsg_core::{DeviceClient, DeviceOptions, ErrorKind, Message};
    const N: usize = 1000;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("hub");
    let mut hub = spawn_hub(&data, port);
    let dev_cs = create_device(&rt, &hub.cs, "actuator");

    // The device app: completes everything, counting how often it saw each message.
    let app_seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut dopts = DeviceOptions::from_connection_string(&dev_cs).unwrap();
    dopts.retry = retry();
    dopts.outbox.dir = Some(dir.path().join("device-state"));
    let seen = app_seen.clone();
    rt.spawn(async move {
        let dev = DeviceClient::connect(dopts).await.unwrap();
        let mut rx = dev.c2d().unwrap();
        while let Some(m) = rx.recv().await {
            *seen.lock().entry(m.message.message_id.clone().unwrap()).or_default() += 1;
            m.complete().unwrap();
        }
    });

    // The service: sends N with ack=full (waiting while the device queue is full) and collects
    // feedback.
    let feedback: Arc<Mutex<HashMap<String, FeedbackStatus>>> = Arc::default();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut sopts = ServiceOptions::from_connection_string(&hub.cs).unwrap();
    sopts.retry = retry();
    let (fbm, sent2) = (feedback.clone(), sent.clone());
    rt.spawn(async move {
        let svc = ServiceClient::connect(sopts).await.unwrap();
        let mut fb = svc.feedback().unwrap();
        tokio::spawn(async move {
            while let Some(b) = fb.next().await {
                for r in &b.records {
                    fbm.lock().insert(r.original_message_id.clone(), r.status_code);
                }
                b.ack();
            }
        });
        for i in 0..N {
            loop {
                match svc.send_c2d("actuator", Message::new(format!("cmd {i}")).with_message_id(format!("c-{i}")), AckMode::Full).await {
                    Ok(_) => break,
                    Err(e) if e.kind() == ErrorKind::QueueFull => tokio::time::sleep(Duration::from_millis(20)).await,
                    Err(e) => panic!("send {i}: {e}"),
                }
            }
            sent2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });

    let deadline = Instant::now() + Duration::from_secs(60);
    while app_seen.lock().len() < 300 {
        assert!(Instant::now() < deadline, "C2D flowing");
        std::thread::sleep(Duration::from_millis(5));
    }
    hub.child.kill().unwrap(); // SIGKILL with C2D messages in flight
    hub.child.wait().unwrap();
    let at_kill = app_seen.lock().len();
    std::thread::sleep(Duration::from_millis(300));
    let mut hub = spawn_hub(&data, port);

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let done = app_seen.lock().len() == N && feedback.lock().len() == N;
        if done || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = app_seen.lock();
    let twice: Vec<_> = seen.iter().filter(|(_, c)| **c > 1).map(|(k, _)| k.clone()).collect();
    let fb = feedback.lock();
    let success = fb.values().filter(|s| **s == FeedbackStatus::Success).count();
    eprintln!(
        "c2d hub kill: sent {}, app completed {} ({} before the kill), completed twice {}, feedback {} ({} Success)",
        sent.load(std::sync::atomic::Ordering::SeqCst),
        seen.len(),
        at_kill,
        twice.len(),
        fb.len(),
        success
    );
    assert_eq!(seen.len(), N, "every message reached the app");
    assert!(twice.is_empty(), "no message completed twice by the app: {twice:?}");
    assert_eq!(fb.len(), N, "feedback accounts for every message");
    assert_eq!(success, N);
    hub.child.kill().unwrap();
    let _ = hub.child.wait();
}

/// The operator's mistake the data directory lock exists for: a second `hubmsg hub` started on
/// the data of a running one. It must refuse to start, naming the first one's pid, and the first
/// keeps serving every message.
#[test]
fn a_second_hub_on_the_same_data_is_refused_and_the_first_loses_nothing() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hub");
    let mut hub = spawn_hub(&data, free_port());
    let mut second = Command::new(BIN)
        .args(["hub", "--data", data.to_str().unwrap(), "--mqtt", &format!("127.0.0.1:{}", free_port())])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the second hub");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second hub kept running on the same data directory");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains(&format!("process {}", hub.child.id())), "the error names the running hub: {err}");

    let dev_cs = create_device(&rt, &hub.cs, "after-refusal");
    let seen = consume(&rt, &hub.cs);
    let (mut child, rx) = spawn_sender(&dev_cs, &dir.path().join("outbox"), 0, 2000);
    assert!(child.wait().unwrap().success());
    let accepted: Vec<u64> = rx.iter().collect();
    assert_eq!(accepted.len(), 2000);
    assert_eq!(wait_all(&seen, &accepted, Duration::from_secs(60)).0, 0, "the first hub delivers everything");
    hub.child.kill().unwrap();
    let _ = hub.child.wait();
}
