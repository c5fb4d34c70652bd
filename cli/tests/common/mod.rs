//! Real `hubmsg` processes for the CLI tests (crash tests, chaos soak): a hub child that is killed
//! when its owner drops it, free ports, and device registration through a service client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hubmsg_core::retry::RetryPolicy;
use hubmsg_core::service::{ServiceClient, ServiceOptions};

/// The `hubmsg` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_hubmsg");

/// A `hubmsg hub` child process and its owner connection string.
pub struct HubProc {
    /// The process.
    pub child: Child,
    /// The `iothubowner` connection string (read from the file the hub names).
    pub cs: String,
}

impl Drop for HubProc {
    /// A failing test must not leave a hub process behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `hubmsg hub --data DATA --mqtt 127.0.0.1:PORT` and waits until it is ready.
pub fn spawn_hub(data: &Path, port: u16) -> HubProc {
    spawn_hub_with(data, port, &[], Stdio::inherit())
}

/// [`spawn_hub`] with extra arguments and where its stderr goes.
pub fn spawn_hub_with(data: &Path, port: u16, extra: &[String], stderr: Stdio) -> HubProc {
    let child = Command::new(BIN)
        .args(["hub", "--data", data.to_str().unwrap(), "--mqtt", &format!("127.0.0.1:{port}")])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn hub");
    // Owned by a HubProc from here on, so a failed start still kills and reaps the child.
    let mut hub = HubProc { child, cs: String::new() };
    let mut lines = BufReader::new(hub.child.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "hub did not start");
        let line = lines.next().expect("hub named its connection string file").unwrap();
        if let Some(path) = line.strip_prefix("HUBMSG_HUB_CONNECTION_STRING_FILE=") {
            // Keep draining stdout so the hub never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            hub.cs = std::fs::read_to_string(path).unwrap().trim().to_string();
            return hub;
        }
    }
}

/// Reconnect pacing for the test's own clients: 100 ms → 500 ms.
pub fn retry() -> RetryPolicy {
    RetryPolicy {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_millis(500),
        jitter: Duration::from_millis(50),
        ..RetryPolicy::default()
    }
}

/// Registers `id` with the owner connection string `cs`; returns its connection string.
pub fn create_device(rt: &tokio::runtime::Runtime, cs: &str, id: &str) -> String {
    rt.block_on(async {
        let mut opts = ServiceOptions::from_connection_string(cs).unwrap();
        opts.retry = retry();
        let svc = ServiceClient::connect(opts).await.unwrap();
        let d = svc.create_device(id).await.unwrap();
        let cs = svc.device_connection_string(&d);
        svc.close().await;
        cs
    })
}
