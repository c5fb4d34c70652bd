//! RabbitMQ (Debian's `rabbitmq-server`) with its MQTT plugin as a baseline: the durable MQTT
//! broker a user would pick. A persistent-session (`clean_session = false`) QoS 1 subscription
//! is a durable queue; a QoS 1 publish is a persistent message, and the plugin sends its PUBACK
//! when the broker confirms the message (publisher confirm), which for a persistent message in a
//! durable queue happens once it is fsync'd — or once every queue it went to has delivered it
//! and had it acknowledged, when that comes first.
//!
//! The node runs as a child of the bench with everything of its own under the run's scratch
//! space: `RABBITMQ_MNESIA_BASE`, config, enabled-plugins file, logs, `HOME` (Erlang cookie), a
//! node name of its own, and free ports on 127.0.0.1 for MQTT, Erlang distribution and epmd
//! (`ERL_EPMD_PORT`). Its epmd is stopped with the node.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hubmsg_core::{Error, ErrorKind};

use super::broker::{Broker, Cleanup};
use super::install;
use super::mqtt::Target;
use super::procstat;

/// Where Debian's package puts the scripts that run a node without switching users.
const SCRIPTS: &str = "/usr/lib/rabbitmq/bin";

/// The queue type of durable (QoS 1, persistent session) subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueType {
    /// A durable classic queue (the plugin's default).
    Classic,
    /// A quorum queue (Raft log, every write fsync'd; one replica on one node).
    Quorum,
}

impl QueueType {
    fn conf(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }

    /// The table label.
    pub fn label(self) -> &'static str {
        match self {
            QueueType::Classic => "durable session queue (classic)",
            QueueType::Quorum => "durable session queue (quorum)",
        }
    }
}

/// The `rabbitmq-server` script, installing Debian's package when missing (as root).
pub fn ensure_installed() -> Result<PathBuf, String> {
    let find = || {
        let p = Path::new(SCRIPTS).join("rabbitmq-server");
        p.is_file().then_some(p)
    };
    install::apt_install("RabbitMQ", &["rabbitmq-server"], find)
}

/// The version of the installed package (`3.10.8`).
fn version() -> String {
    let out = super::broker::first_line(Command::new("dpkg-query").args(["-W", "-f", "${Version}", "rabbitmq-server"]));
    out.split('-').next().unwrap_or_default().to_string()
}

/// `rabbitmq.conf` for the bench node.
pub fn config(mqtt_port: u16, dist_port: u16, queue: QueueType) -> String {
    format!(
        "# written by hubmsg bench\n\
         # no AMQP listener: the bench speaks MQTT only\n\
         listeners.tcp = none\n\
         mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}\n\
         mqtt.allow_anonymous = false\n\
         # unacknowledged deliveries per subscriber: as many as a hubmsg consumer has per partition\n\
         mqtt.prefetch = 1000\n\
         mqtt.durable_queue_type = {}\n\
         distribution.listener.interface = 127.0.0.1\n\
         distribution.listener.port_range.min = {dist_port}\n\
         distribution.listener.port_range.max = {dist_port}\n\
         log.console = true\n\
         log.console.level = warning\n\
         log.file = false\n",
        queue.conf()
    )
}

/// Starts a node with [`config`] in `dir`.
pub async fn start(script: &Path, dir: &Path, queue: QueueType) -> Result<Broker, Error> {
    let (mqtt, dist, epmd) = (crate::hubproc::free_port()?, crate::hubproc::free_port()?, crate::hubproc::free_port()?);
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| Error::storage(format!("write {}", p.display()), e))?;
        Ok::<PathBuf, Error>(p)
    };
    let conf = write("rabbitmq.conf", config(mqtt, dist, queue))?;
    let plugins = write("enabled_plugins", "[rabbitmq_mqtt].\n".into())?;
    let home = dir.join("home");
    let mnesia = dir.join("mnesia");
    for d in [&home, &mnesia] {
        std::fs::create_dir_all(d).map_err(|e| Error::storage(format!("create {}", d.display()), e))?;
    }
    let node = format!("hubmsgbench{}@localhost", std::process::id());
    let mut cmd = Command::new(script);
    cmd.env("RABBITMQ_CONFIG_FILE", &conf)
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", &plugins)
        .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
        .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
        .env("RABBITMQ_MNESIA_BASE", &mnesia)
        .env("RABBITMQ_LOG_BASE", dir.join("log"))
        .env("RABBITMQ_PID_FILE", dir.join("rabbitmq.pid"))
        .env("RABBITMQ_NODENAME", &node)
        .env("RABBITMQ_USE_LONGNAME", "false")
        .env("RABBITMQ_DIST_PORT", dist.to_string())
        .env("ERL_EPMD_PORT", epmd.to_string())
        .env("ERL_EPMD_ADDRESS", "127.0.0.1")
        .env("HOME", &home);
    // epmd is started by the node and outlives it: stop ours (only ours: it listens on our port).
    let cleanup: Cleanup = Box::new(move || {
        let _ = Command::new("epmd").arg("-kill").env("ERL_EPMD_PORT", epmd.to_string()).output();
    });
    let target = Target { port: mqtt, username: "guest".into(), password: "guest".into() };
    let mut b = Broker::spawn("RabbitMQ", cmd, target, &dir.join("rabbitmq.log"), Duration::from_secs(120), Some(cleanup)).await?;
    // The script waits for the Erlang VM (beam.smp) it started: that process is the broker.
    b.pid = procstat::descendant_named(b.child_pid(), "beam.smp")
        .ok_or_else(|| Error::new(ErrorKind::Internal, "RabbitMQ listens but no beam.smp process was found under its script"))?;
    b.version = version();
    b.setting = queue.label().into();
    b.short = format!("RabbitMQ {}", queue.conf());
    b.acks_after_disk = true;
    Ok(b)
}
