//! Scale-out with real processes: `hubmsg demo --backend nats` runs a 3-node `nats-server`
//! cluster and 2 `hubmsg hub --backend nats://…` nodes; 20 devices spread over both nodes send
//! D2C through a chaos link while a consumer group of 2 reads and C2D commands flow; one NATS
//! node is SIGKILLed and restarted and one hub node is SIGKILLed (its devices reconnect to the
//! other). The run must lose nothing; duplicates are counted in its table. Also: a hub refuses a
//! server without JetStream with an error that says what to do.
#![cfg(feature = "nats")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_hubmsg");

/// The number in the accounting-table line starting with `label` under `section`.
fn figure(out: &str, section: &str, label: &str) -> u64 {
    let rest = &out[out.find(section).unwrap_or_else(|| panic!("no section {section} in:\n{out}"))..];
    let line = rest.lines().find(|l| l.trim_start().starts_with(label)).unwrap_or_else(|| panic!("no line {label} in:\n{out}"));
    line.split_whitespace().last().unwrap().parse().unwrap()
}

#[test]
fn two_hub_nodes_over_a_cluster_lose_nothing_when_a_nats_node_and_a_hub_node_are_killed() {
    hubmsg_nats::cluster::server_binary().expect("nats-server 2.11+ (run nats/install-server.sh)");
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(["demo", "--backend", "nats", "--devices", "20", "--duration", "15s", "--rate", "20", "--seed", "11"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the demo");
    // Bounded: the run takes about 25 s; give it 150 s before killing it.
    let deadline = Instant::now() + Duration::from_secs(150);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not finish within 150 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{stdout}\n{stderr}\nin {:?}", started.elapsed());
    assert!(out.status.success(), "the demo reported a loss or failed:\n{stdout}\n{stderr}");
    let sent = figure(&stdout, "D2C", "sent");
    assert!(sent > 1000, "{sent} D2C sent");
    assert_eq!(figure(&stdout, "D2C", "delivered"), sent);
    assert_eq!(figure(&stdout, "D2C", "LOST"), 0);
    let duplicates = figure(&stdout, "D2C", "duplicates");
    assert_eq!(figure(&stdout, "C2D", "LOST"), 0);
    assert!(figure(&stdout, "C2D", "sent") > 50);
    assert_eq!(figure(&stdout, "chaos", "NATS node SIGKILL"), 1);
    assert_eq!(figure(&stdout, "chaos", "hub node SIGKILL"), 1);
    println!("scale-out: {sent} D2C, 0 lost, {duplicates} duplicates");
}

#[test]
fn a_hub_refuses_a_server_without_jetstream_and_says_what_to_do() {
    let bin = hubmsg_nats::cluster::server_binary().expect("nats-server 2.11+ (run nats/install-server.sh)");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server =
        Command::new(bin).args(["-a", "127.0.0.1", "-p", &port.to_string()]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let mut last = String::new();
    // The server takes a moment to listen; a refused TCP connect is retried.
    for _ in 0..100 {
        let out = Command::new(BIN)
            .args(["hub", "--data", dir.path().to_str().unwrap(), "--mqtt", "127.0.0.1:0", "--backend", &url, "--replicas", "1"])
            .output()
            .unwrap();
        last = String::from_utf8_lossy(&out.stderr).to_string();
        if last.contains("cannot connect") {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        assert_eq!(out.status.code(), Some(2), "refused as a usage error: {last}");
        break;
    }
    let _ = server.kill();
    let _ = server.wait();
    assert!(last.contains("JetStream off") && last.contains("-js") && last.contains(&url), "{last}");
}
