//! Operating a hub: the HTTP endpoint (`hubmsg hub --http ADDR`, off by default) with
//! `/healthz` (the process serves), `/readyz` (it accepts devices and its backend answers: what
//! a load balancer routes by) and `/metrics` (Prometheus text format 0.0.4), plus the latency
//! [`Histogram`] the hub keeps.
//!
//! The server is deliberately minimal: `GET` only, one request per connection
//! (`Connection: close`), the request head bounded to 8 KB and read within 5 s, loopback or
//! whatever address the operator gives. Metric names follow Azure IoT Hub's own metrics where
//! one exists (`d2c.telemetry.ingress.success` → `hubmsg_d2c_telemetry_ingress_success_total`,
//! `c2d.commands.egress.complete.success` → `hubmsg_c2d_commands_egress_complete_success_total`,
//! `connectedDeviceCount` → `hubmsg_connected_device_count`); the table is in
//! `docs/operating.md`.
//!
//! Invariants: counters only grow; a histogram's buckets are cumulative when rendered and its
//! `_count` equals the `+Inf` bucket; a scrape never blocks a session (atomics and one backend
//! query per gauge, bounded by a 2 s timeout).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::Shared;
use crate::error::{Error, ErrorKind, Result};

/// Bucket bounds of [`Histogram`], in microseconds (100 µs … 10 s).
pub const BUCKETS_US: [u64; 16] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000];

/// A latency histogram with fixed buckets ([`BUCKETS_US`]); lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS_US.len()],
    above: AtomicU64,
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        match BUCKETS_US.iter().position(|b| us <= *b) {
            Some(i) => self.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.above.fetch_add(1, Ordering::Relaxed),
        };
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The upper bound of the bucket holding the `q`-quantile (0 ≤ q ≤ 1) of the observations
    /// so far: `None` before any, `Duration::MAX` past the last bucket.
    pub fn quantile_bound(&self, q: f64) -> Option<Duration> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let want = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut cum = 0;
        for (i, b) in BUCKETS_US.iter().enumerate() {
            cum += self.buckets[i].load(Ordering::Relaxed);
            if cum >= want {
                return Some(Duration::from_micros(*b));
            }
        }
        Some(Duration::MAX)
    }

    /// Renders it in Prometheus text format as `name` (seconds).
    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (i, b) in BUCKETS_US.iter().enumerate() {
            cum += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cum}", *b as f64 / 1e6);
        }
        cum += self.above.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {cum}");
    }
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
}

fn gauge(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

/// The `/metrics` page of a hub.
pub(crate) async fn render(shared: &Shared) -> String {
    let s = &shared.stats;
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::with_capacity(4096);
    let backend = shared.backend.kind();
    let _ = writeln!(out, "# HELP hubmsg_info The hub's version and storage backend.\n# TYPE hubmsg_info gauge");
    let _ = writeln!(out, "hubmsg_info{{version=\"{}\",backend=\"{backend}\"}} 1", env!("CARGO_PKG_VERSION"));
    gauge(
        &mut out,
        "hubmsg_connected_device_count",
        "Devices connected to this node (IoT Hub connectedDeviceCount).",
        shared.devices.lock().len() as u64,
    );
    gauge(
        &mut out,
        "hubmsg_open_connections",
        "Connections open on this node (devices, services, not yet authenticated).",
        l(&s.open_connections),
    );
    counter(&mut out, "hubmsg_connections_total", "Connections accepted.", l(&s.connections));
    counter(
        &mut out,
        "hubmsg_connections_refused_total",
        "CONNECTs refused (credentials, protocol version, capacity).",
        l(&s.refused) + l(&s.refused_capacity),
    );
    counter(&mut out, "hubmsg_violations_total", "Connections closed for a protocol or authorization violation.", l(&s.violations));
    counter(
        &mut out,
        "hubmsg_d2c_telemetry_ingress_success_total",
        "D2C messages stored durably and acknowledged (IoT Hub d2c.telemetry.ingress.success).",
        l(&s.d2c_messages),
    );
    counter(&mut out, "hubmsg_d2c_telemetry_ingress_bytes_total", "D2C body bytes stored.", l(&s.d2c_bytes));
    counter(
        &mut out,
        "hubmsg_d2c_refused_total",
        "D2C messages the store could not take (a full disk); the device retries from its outbox.",
        l(&s.d2c_refused),
    );
    counter(&mut out, "hubmsg_d2c_duplicates_total", "D2C re-sends the backend de-duplicated by message id.", l(&s.d2c_duplicates));
    counter(
        &mut out,
        "hubmsg_d2c_events_delivered_total",
        "D2C events delivered to consumer groups (redeliveries included).",
        l(&s.events_delivered),
    );
    counter(&mut out, "hubmsg_c2d_commands_sent_total", "C2D messages accepted into device queues.", l(&s.c2d_sent));
    counter(
        &mut out,
        "hubmsg_c2d_commands_egress_complete_success_total",
        "C2D messages completed by devices (IoT Hub c2d.commands.egress.complete.success).",
        l(&s.c2d_completed),
    );
    counter(
        &mut out,
        "hubmsg_c2d_commands_egress_abandon_success_total",
        "C2D deliveries abandoned by devices (IoT Hub c2d.commands.egress.abandon.success).",
        l(&s.c2d_abandoned),
    );
    counter(
        &mut out,
        "hubmsg_c2d_commands_egress_reject_success_total",
        "C2D messages rejected by devices (IoT Hub c2d.commands.egress.reject.success).",
        l(&s.c2d_rejected),
    );
    counter(&mut out, "hubmsg_c2d_commands_expired_total", "C2D messages whose TTL passed before completion.", l(&s.c2d_expired));
    counter(
        &mut out,
        "hubmsg_c2d_commands_deadlettered_total",
        "C2D messages dead-lettered at the maximum delivery count.",
        l(&s.c2d_dead_lettered),
    );
    counter(&mut out, "hubmsg_c2d_commands_purged_total", "C2D messages removed by purges.", l(&s.c2d_purged));
    counter(
        &mut out,
        "hubmsg_c2d_feedback_batches_total",
        "Feedback batches delivered to services (redeliveries included).",
        l(&s.feedback_batches),
    );
    counter(&mut out, "hubmsg_c2d_feedback_records_total", "Feedback records in batches services acknowledged.", l(&s.feedback_records));
    counter(
        &mut out,
        "hubmsg_c2d_outcome_notifications_total",
        "Feedback records notified to service connections waiting for them (outcomes.watch).",
        l(&s.outcome_notifications),
    );
    gauge(
        &mut out,
        "hubmsg_c2d_outcome_watches",
        "Message ids service connections of this node wait for.",
        shared.outcomes.inspect(|w| w.total_watched()) as u64,
    );
    let q = |f| async move { tokio::time::timeout(Duration::from_secs(2), f).await.ok().and_then(|r: Result<u64>| r.ok()) };
    let depth = q(shared.backend.c2d().total_depth()).await;
    let pending = q(shared.backend.feedback().pending()).await;
    let mut errors = l(&s.backend_errors);
    for (name, help, v) in [
        ("hubmsg_c2d_queue_depth", "C2D messages queued for all devices, locked ones included.", depth),
        ("hubmsg_c2d_feedback_pending", "Feedback records not yet acknowledged by a service.", pending),
    ] {
        match v {
            Some(v) => gauge(&mut out, name, help, v),
            None => errors += 1,
        }
    }
    counter(&mut out, "hubmsg_backend_errors_total", "Backend operations that failed (storage errors, an unreachable cluster).", errors);
    s.commit_latency.render(&mut out, "hubmsg_store_commit_seconds", "Time from a D2C append to its durability in the backend.");
    out
}

/// Serves the HTTP endpoint on `listener` until the task is aborted.
pub(crate) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (mut tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(5), handle(&shared, &mut tcp)).await;
            if !matches!(r, Ok(Ok(()))) {
                tracing::debug!(%peer, "HTTP request failed or timed out");
            }
            let _ = tcp.shutdown().await;
        });
    }
}

/// Reads one request head (at most 8 KB) and answers it.
async fn handle(shared: &Shared, tcp: &mut tokio::net::TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 8192 {
            return respond(tcp, "431 Request Header Fields Too Large", "text/plain", "request head over 8 KB\n").await;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return respond(tcp, "405 Method Not Allowed", "text/plain", "only GET is served\n").await;
    }
    match path {
        "/healthz" => respond(tcp, "200 OK", "text/plain", "ok\n").await,
        "/readyz" => match readiness(shared).await {
            Ok(()) => respond(tcp, "200 OK", "text/plain", "ready\n").await,
            Err(why) => respond(tcp, "503 Service Unavailable", "text/plain", &format!("not ready: {why}\n")).await,
        },
        "/metrics" => respond(tcp, "200 OK", "text/plain; version=0.0.4", &render(shared).await).await,
        _ => respond(tcp, "404 Not Found", "text/plain", "try /healthz, /readyz or /metrics\n").await,
    }
}

/// Whether the hub should get new devices: not draining, and its backend answers.
pub(crate) async fn readiness(shared: &Shared) -> std::result::Result<(), String> {
    if shared.draining.load(Ordering::SeqCst) {
        return Err("draining (shutting down); connect to another node".into());
    }
    match tokio::time::timeout(Duration::from_secs(2), shared.backend.ready()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("backend {}: {e}", shared.backend.kind())),
        Err(_) => Err(format!("backend {} did not answer within 2 s", shared.backend.kind())),
    }
}

async fn respond(tcp: &mut tokio::net::TcpStream, status: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(body.as_bytes()).await?;
    tcp.flush().await
}

/// Binds the HTTP endpoint.
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        Error::new(ErrorKind::InvalidArgument, format!("cannot listen for HTTP on {addr}: {e} (is another process using the port?)"))
            .with_source(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(20));
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
        assert_eq!(h.count(), 3);
        assert_eq!(h.quantile_bound(0.0), Some(Duration::from_micros(100)));
        assert_eq!(h.quantile_bound(0.5), Some(Duration::from_millis(5)));
        assert_eq!(h.quantile_bound(1.0), Some(Duration::MAX));
        assert_eq!(Histogram::default().quantile_bound(0.5), None);
    }
}
