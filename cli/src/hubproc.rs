//! The hub as a child process: `hubmsg hub …` started from the current executable, so it can be
//! SIGKILLed and restarted (demo, bench) and its memory and CPU read from `/proc` (bench).
//!
//! Invariant: a [`HubProcess`] never outlives its owner — dropping it kills the child, so a
//! failing run leaves no hub behind.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hubmsg_core::{Error, ErrorKind};
use tokio::sync::oneshot;

/// A running `hubmsg hub` child process.
pub struct HubProcess {
    child: Child,
    ready: Option<oneshot::Receiver<(String, Instant)>>,
    /// The `iothubowner` connection string (empty until [`HubProcess::ready`] returned).
    pub cs: String,
    /// When the hub printed its connection string (its stores are open and it listens).
    pub ready_at: Option<Instant>,
}

/// A free port on 127.0.0.1 (bound and released; the hub binds it right after).
pub fn free_port() -> Result<u16, Error> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::storage("pick a free port", e))
}

impl HubProcess {
    /// Starts `hubmsg hub --data DATA --mqtt 127.0.0.1:PORT EXTRA…` and returns at once; await
    /// [`HubProcess::ready`] for the connection string. The hub's stderr goes to `stderr_log`
    /// (appended) when given, else nowhere.
    pub fn spawn(data: &Path, port: u16, extra: &[String], stderr_log: Option<&Path>) -> Result<HubProcess, Error> {
        let exe = std::env::current_exe().map_err(|e| Error::new(ErrorKind::Internal, format!("own executable: {e}")))?;
        let stderr = match stderr_log {
            Some(p) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| Error::storage(format!("open {}", p.display()), e))?,
            ),
            None => Stdio::null(),
        };
        let mut child = Command::new(exe)
            .args(["hub", "--data", &data.display().to_string(), "--mqtt", &format!("127.0.0.1:{port}")])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| Error::new(ErrorKind::Internal, format!("cannot start the hub process: {e}")))?;
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = oneshot::channel();
        // Read stdout on a thread: note when the connection string appears, then keep draining
        // so the hub never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                // The hub is ready once it names the file with its owner connection string.
                if let Some(path) = line.strip_prefix("HUBMSG_HUB_CONNECTION_STRING_FILE=") {
                    let cs = std::fs::read_to_string(path).map(|s| s.trim().to_string()).unwrap_or_default();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send((cs, Instant::now()));
                    }
                }
            }
        });
        Ok(HubProcess { child, ready: Some(rx), cs: String::new(), ready_at: None })
    }

    /// Starts the hub and waits until it printed its connection string.
    pub async fn start(data: &Path, port: u16, extra: &[String], stderr_log: Option<&Path>) -> Result<HubProcess, Error> {
        let mut hub = HubProcess::spawn(data, port, extra, stderr_log)?;
        hub.ready(Duration::from_secs(120)).await?;
        Ok(hub)
    }

    /// Waits (up to `timeout`) for the connection string; returns it.
    pub async fn ready(&mut self, timeout: Duration) -> Result<&str, Error> {
        if let Some(rx) = self.ready.take() {
            let (cs, at) = match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(v)) => v,
                Ok(Err(_)) => return Err(Error::new(ErrorKind::Internal, "the hub process exited before printing its connection string")),
                Err(_) => {
                    return Err(Error::new(ErrorKind::Timeout, format!("the hub process printed no connection string within {timeout:?}")))
                }
            };
            self.cs = cs;
            self.ready_at = Some(at);
        }
        Ok(&self.cs)
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
