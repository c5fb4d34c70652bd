//! Pieces every hubmsg scenario uses: the hub child process per run, the service client,
//! registering and connecting bench devices, the consumer, and the message body layout.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use hubmsg_core::outbox::OutboxOptions;
use hubmsg_core::proto::{CreateDevice, StartPosition};
use hubmsg_core::retry::RetryPolicy;
use hubmsg_core::service::{EventStream, ServiceClient, ServiceOptions};
use hubmsg_core::{ConnectionStatus, Credential, DeviceClient, DeviceOptions, Error, ErrorKind};
use tokio::task::JoinSet;

use super::Ctx;
use crate::hubproc::{self, HubProcess};

/// Body size of every bench message.
pub const BODY_BYTES: usize = 256;

/// What a bench body carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// When `send()` was called, ns since the bench epoch.
    pub sent_ns: u64,
    /// Sending device (index).
    pub device: u32,
    /// Message number within the device.
    pub seq: u64,
    /// When the paced sender meant to send it, ns since the bench epoch (0 if not paced).
    pub scheduled_ns: u64,
}

/// A 256-byte body starting with `stamp` (little endian), padded with dots.
pub fn body(stamp: Stamp) -> Bytes {
    let mut b = vec![b'.'; BODY_BYTES];
    b[0..8].copy_from_slice(&stamp.sent_ns.to_le_bytes());
    b[8..12].copy_from_slice(&stamp.device.to_le_bytes());
    b[12..20].copy_from_slice(&stamp.seq.to_le_bytes());
    b[20..28].copy_from_slice(&stamp.scheduled_ns.to_le_bytes());
    Bytes::from(b)
}

/// Reads what [`body`] wrote.
pub fn parse_body(b: &[u8]) -> Option<Stamp> {
    if b.len() < 28 {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    Some(Stamp {
        sent_ns: u64_at(0),
        device: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
        seq: u64_at(12),
        scheduled_ns: u64_at(20),
    })
}

/// Most messages the bench keeps in all device outboxes of a run together (queued + in flight);
/// senders wait for deliveries beyond it, as an application would, so a run measures delivery
/// rather than how fast an outbox can grow in memory.
pub const OUTBOX_BUDGET: usize = 20_000;

/// Sends messages `0..count` of device `d` with `send_batch` (up to 1,000 per batch, one group
/// commit each), keeping at most `limit` messages in its outbox. Returns when the last batch was
/// accepted (durable in the outbox).
pub async fn send_all(
    dev: &DeviceClient,
    d: usize,
    count: u64,
    limit: usize,
    epoch: std::time::Instant,
) -> Result<std::time::Instant, Error> {
    let mut seq = 0;
    while seq < count {
        let n = count.min(seq + 1000) - seq;
        while dev.stats().outbox.depth + n as usize > limit.max(n as usize) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let sent_ns = epoch.elapsed().as_nanos() as u64;
        let msgs = (seq..seq + n)
            .map(|s| {
                hubmsg_core::Message::new(body(Stamp { sent_ns, device: d as u32, seq: s, scheduled_ns: 0 }))
                    .with_message_id(super::stats::message_id(d, s))
            })
            .collect();
        dev.send_batch(msgs).await?;
        seq += n;
    }
    Ok(std::time::Instant::now())
}

/// Reconnect quickly: the hub is local and restarts are part of some scenarios.
pub fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(500),
        jitter: Duration::from_millis(20),
        ..RetryPolicy::default()
    }
}

/// A hub child process for one run, with its own data directory.
pub struct Hub {
    /// The process.
    pub proc: HubProcess,
    /// Its plain MQTT port on 127.0.0.1.
    pub port: u16,
    /// Its data directory.
    pub data: PathBuf,
    /// The run's scratch directory (hub data, device outboxes); removed with the bench's
    /// scratch space at the end, not here (see [`Ctx::dir`]).
    pub run_dir: PathBuf,
    /// The arguments it was started with (after `--data` and `--mqtt`).
    pub args: Vec<String>,
}

impl Hub {
    /// Starts `hubmsg hub ARGS…` on a free port with a fresh data directory under `name`.
    pub async fn start(ctx: &Ctx, name: &str, args: &[&str]) -> Result<Hub, Error> {
        let run_dir = ctx.dir(name)?;
        let data = run_dir.join("hub");
        let port = hubproc::free_port()?;
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let proc = HubProcess::start(&data, port, &args, Some(&ctx.hub_log)).await?;
        Ok(Hub { proc, port, data, run_dir, args })
    }

    /// `HostName` for device options.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The hub's process id.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.proc.kill();
    }
}

/// A service client with fast reconnects and generous request timeouts.
pub async fn service(cs: &str) -> Result<ServiceClient, Error> {
    let mut o = ServiceOptions::from_connection_string(cs)?;
    o.retry = fast_retry();
    o.request_timeout = Duration::from_secs(120);
    ServiceClient::connect(o).await
}

/// Registers `ids` with the bench key, `concurrency` requests at a time.
pub async fn register(svc: &ServiceClient, ids: &[String], key: &str, concurrency: usize) -> Result<(), Error> {
    let mut set = JoinSet::new();
    let mut next = 0;
    loop {
        while set.len() < concurrency && next < ids.len() {
            let (svc, id, key) = (svc.clone(), ids[next].clone(), key.to_string());
            set.spawn(async move {
                svc.create_device_with(CreateDevice {
                    device_id: id,
                    primary_key: Some(key.clone()),
                    secondary_key: Some(key),
                    status: None,
                })
                .await
                .map(|_| ())
            });
            next += 1;
        }
        match set.join_next().await {
            None => return Ok(()),
            Some(r) => r.map_err(|e| Error::new(ErrorKind::Internal, format!("register task: {e}")))??,
        }
    }
}

/// Device options for bench device `id` on the hub at `host`.
pub fn device_options(host: &str, id: &str, key: &str, outbox: OutboxOptions) -> DeviceOptions {
    let mut o = DeviceOptions::new(host, id, Credential::SymmetricKey(key.to_string()));
    o.outbox = outbox;
    o.retry = fast_retry();
    o
}

/// Waits until `dev` is connected (error if it fails or `timeout` passes).
pub async fn connected(dev: &DeviceClient, timeout: Duration) -> Result<(), Error> {
    let mut w = dev.status_watch();
    let r = tokio::time::timeout(
        timeout,
        w.wait_for(|s| matches!(s, ConnectionStatus::Connected | ConnectionStatus::Failed { .. } | ConnectionStatus::Closed)),
    )
    .await
    .map_err(|_| Error::new(ErrorKind::Timeout, format!("device {} not connected within {timeout:?}", dev.device_id())))?
    .map_err(|_| Error::closed("device client"))?
    .clone();
    match r {
        ConnectionStatus::Connected => Ok(()),
        other => Err(Error::new(ErrorKind::Disconnected, format!("device {} did not connect: {other:?}", dev.device_id()))),
    }
}

/// Opens a consumer of `group` from `from` and waits until its connection is up.
pub async fn consumer(svc: &ServiceClient, group: &str, from: StartPosition) -> Result<EventStream, Error> {
    let events = svc.events(group, from).await?;
    let ok = super::wait_until(Duration::from_secs(30), Duration::from_millis(2), || events.status() == ConnectionStatus::Connected).await;
    if !ok {
        return Err(Error::new(ErrorKind::Timeout, format!("consumer not connected within 30 s: {:?}", events.status())));
    }
    // A request on the consumer's connection is answered after its `consume` was handled.
    events.checkpoint().await?;
    Ok(events)
}

/// Ids `bench-0 … bench-{n-1}`.
pub fn device_ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trip() {
        let s = Stamp { sent_ns: 1 << 40, device: 77, seq: 123_456_789, scheduled_ns: 42 };
        let b = body(s);
        assert_eq!(b.len(), BODY_BYTES);
        assert_eq!(parse_body(&b), Some(s));
        assert_eq!(parse_body(b"short"), None);
    }
}
