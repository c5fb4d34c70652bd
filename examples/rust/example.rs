//! Shared by the Rust examples: the "demo mode" that runs a hub inside the example's own process
//! (in a temporary directory) when no connection string is given — the counterpart of
//! examples/c/example.h, examples/python/example.py and examples/node/example.mjs.

#![allow(dead_code)] // each example uses only part of it
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hubmsg_core::hub::{Hub, HubConfig};

/// A temporary directory and an embedded hub in it on 127.0.0.1, port 0, with C2D feedback
/// batched every 200 ms (IoT Hub batches every 15 s). The directory goes when it is dropped.
pub struct Demo {
    dir: tempfile::TempDir,
    addr: Option<SocketAddr>,
    /// The running hub, if started.
    pub hub: Option<Hub>,
}

impl Demo {
    /// A new demo directory (no hub yet).
    pub fn new() -> hubmsg_core::Result<Demo> {
        let dir = tempfile::Builder::new()
            .prefix("hubmsg-example-")
            .tempdir()
            .map_err(|e| hubmsg_core::Error::storage("create a temporary directory", e))?;
        Ok(Demo { dir, addr: None, hub: None })
    }

    /// Starts (or restarts) the hub on its data directory and address.
    pub async fn start(&mut self) -> hubmsg_core::Result<&Hub> {
        let mut cfg = HubConfig::new(self.dir.path().join("hub"));
        cfg.mqtt = Some(self.addr.unwrap_or_else(|| "127.0.0.1:0".parse().expect("an address")));
        cfg.host_name = "127.0.0.1".into();
        cfg.feedback_interval = Duration::from_millis(200);
        let hub = Hub::start(cfg).await?;
        self.addr = hub.mqtt_addr();
        println!(
            "demo mode: embedded hub on {} (data in {})",
            hub.mqtt_addr().map(|a| a.to_string()).unwrap_or_default(),
            self.dir.path().display()
        );
        Ok(self.hub.insert(hub))
    }

    /// Stops the hub (its data stays).
    pub async fn stop_hub(&mut self) -> hubmsg_core::Result<()> {
        match self.hub.take() {
            Some(h) => h.shutdown().await,
            None => Ok(()),
        }
    }

    /// A path inside the demo directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
