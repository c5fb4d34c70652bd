//! A baseline broker running as a child process of the bench: its own configuration, data
//! directory and free ports under the run's scratch space, its MQTT port on 127.0.0.1, the
//! process whose CPU and memory are the broker's, and how to stop it.
//!
//! Invariant: a [`Broker`] never outlives its owner — dropping it stops the broker (and anything
//! it started, such as RabbitMQ's epmd), so a failing run leaves nothing listening behind.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hubmsg_core::{Error, ErrorKind};

use super::mqtt::Target;

/// How a broker is stopped beyond killing its process.
pub type Cleanup = Box<dyn FnOnce() + Send>;

/// A running baseline broker.
pub struct Broker {
    /// Product name (`Mosquitto`, `RabbitMQ`, `NATS`).
    pub name: &'static str,
    /// Version as the broker reports it.
    pub version: String,
    /// The persistence setting this instance runs with (table label).
    pub setting: String,
    /// A short name for this instance in ratio columns (`RabbitMQ quorum`).
    pub short: String,
    /// Whether a QoS 1 PUBACK is sent only once the message is on disk (fsync'd).
    pub acks_after_disk: bool,
    /// How the clients reach it.
    pub target: Target,
    /// The process whose CPU and resident memory are measured.
    pub pid: u32,
    child: Child,
    cleanup: Option<Cleanup>,
}

impl Broker {
    /// Spawns `cmd` (stdout and stderr appended to `log`) and waits up to `timeout` until its
    /// MQTT port accepts connections.
    pub async fn spawn(
        name: &'static str,
        mut cmd: Command,
        target: Target,
        log: &Path,
        timeout: Duration,
        cleanup: Option<Cleanup>,
    ) -> Result<Broker, Error> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| Error::storage(format!("open {}", log.display()), e))?;
        let err = out.try_clone().map_err(|e| Error::storage(format!("open {}", log.display()), e))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| Error::new(ErrorKind::Internal, format!("cannot start {name} ({cmd:?}): {e}")))?;
        let pid = child.id();
        let mut broker = Broker {
            name,
            version: String::new(),
            setting: String::new(),
            short: name.to_string(),
            acks_after_disk: false,
            target,
            pid,
            child,
            cleanup,
        };
        let deadline = Instant::now() + timeout;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", broker.target.port)).await.is_ok() {
                return Ok(broker);
            }
            if let Ok(Some(st)) = broker.child.try_wait() {
                return Err(Error::new(ErrorKind::Internal, format!("{name} exited ({st}) before listening; see {}", log_tail(log))));
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("{name} did not listen on 127.0.0.1:{} within {timeout:?}; see {}", broker.target.port, log_tail(log)),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The table label: `RabbitMQ 3.10.8, durable session queue`.
    pub fn label(&self) -> String {
        format!("{} {}, {}", self.name, self.version, self.setting)
    }

    /// The pid of the child process itself (may differ from [`Broker::pid`]).
    pub fn child_pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // SIGTERM first so the broker shuts down in order (RabbitMQ, NATS), then SIGKILL.
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(c) = self.cleanup.take() {
            c();
        }
    }
}

/// `path` and its last lines, for an error message.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().filter(|l| !l.trim().is_empty()).take(4).collect();
    if tail.is_empty() {
        path.display().to_string()
    } else {
        format!("{} ({})", path.display(), tail.into_iter().rev().collect::<Vec<_>>().join(" | "))
    }
}

/// The first line of `cmd`'s output (stdout, else stderr), trimmed; empty when it cannot run.
pub fn first_line(cmd: &mut Command) -> String {
    cmd.stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).lines().next().map(|l| l.trim().to_string())
        })
        .unwrap_or_default()
}
