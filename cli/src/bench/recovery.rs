//! Recovery: a hub holding many stored D2C messages is SIGKILLed and restarted on the same data;
//! how long until it accepts a connection (TCP + CONNACK) and until a consumer group reading from
//! earliest gets its first event.

use std::time::{Duration, Instant};

use hubmsg_core::outbox::OutboxOptions;
use hubmsg_core::proto::StartPosition;
use hubmsg_core::store::Durability;
use hubmsg_core::transport::{self, ConnectParams, Endpoint};
use hubmsg_core::{DeviceClient, Error, ErrorKind, Overflow};
use serde_json::json;
use tokio::task::JoinSet;

use super::common::{self, Hub};
use super::procstat;
use super::stats;
use super::{Ctx, Outcome, Row, Scenario, Target};
use crate::hubproc::HubProcess;

/// Bytes under `dir`, recursively.
fn disk_bytes(dir: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Scenario 5.
pub async fn recovery(ctx: &Ctx) -> Result<Outcome, Error> {
    let (stored, devices) = if ctx.quick { (50_000u64, 10usize) } else { (1_000_000, 100) };
    let per = stored / devices as u64;
    let mut hub = Hub::start(ctx, "recovery", &[]).await?;
    let svc = common::service(&hub.proc.cs).await?;
    let mut ids = common::device_ids("fill", devices);
    ids.push("probe".into());
    common::register(&svc, &ids, &ctx.device_key, 64).await?;
    svc.close().await;

    // Fill: devices with in-memory outboxes (no device-side fsync) push everything; the hub
    // stores it with its default durability (fsync, group commit).
    let mut devs = Vec::new();
    for id in &ids[..devices] {
        let outbox = OutboxOptions {
            dir: None,
            in_memory: true,
            durability: Durability::Never,
            max_messages: per as usize + 1,
            max_bytes: 1 << 30,
            overflow: Overflow::Reject,
        };
        devs.push(DeviceClient::connect(common::device_options(&hub.host(), id, &ctx.device_key, outbox)).await?);
    }
    for d in &devs {
        common::connected(d, Duration::from_secs(30)).await?;
    }
    let t = Instant::now();
    let mut set = JoinSet::new();
    let (limit, epoch) = ((common::OUTBOX_BUDGET / devices).max(2000), ctx.epoch);
    for (k, dev) in devs.iter().cloned().enumerate() {
        set.spawn(async move {
            common::send_all(&dev, k, per, limit, epoch).await?;
            dev.flush(Duration::from_secs(600)).await?;
            Ok::<u64, Error>(dev.stats().outbox.delivered)
        });
    }
    let mut delivered = 0;
    while let Some(r) = set.join_next().await {
        delivered += r.map_err(|e| Error::new(ErrorKind::Internal, format!("fill task: {e}")))??;
    }
    let fill_s = t.elapsed().as_secs_f64();
    for d in &devs {
        let _ = d.close().await;
    }
    if delivered != stored {
        return Err(Error::new(ErrorKind::Internal, format!("the hub acknowledged {delivered} of {stored} messages")));
    }
    let rss_before = procstat::rss_kb(hub.pid()).unwrap_or(0);
    let on_disk = disk_bytes(&hub.data.join("events"));
    println!(
        "  stored {stored} messages from {devices} devices in {fill_s:.1} s ({:.0} msg/s), {:.0} MiB of event log",
        stored as f64 / fill_s,
        on_disk as f64 / 1048576.0
    );

    // SIGKILL, then restart on the same data and port.
    hub.proc.kill();
    let t0 = Instant::now();
    hub.proc = HubProcess::spawn(&hub.data, hub.port, &hub.args, Some(&ctx.hub_log))?;
    let endpoint = Endpoint { host: "127.0.0.1".into(), port: hub.port, tls: None };
    let mut tcp_at = None;
    let connack_at = loop {
        if t0.elapsed() > Duration::from_secs(300) {
            return Err(Error::new(ErrorKind::Timeout, "the restarted hub accepted no connection within 300 s"));
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", hub.port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        tcp_at.get_or_insert_with(Instant::now);
        if transport::client_connect(&endpoint, &probe_params(&hub.host(), &ctx.device_key)?, Duration::from_secs(30)).await.is_ok() {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let cs = hub.proc.ready(Duration::from_secs(300)).await?.to_string();
    let svc = common::service(&cs).await?;
    let mut events = svc.events("recovery", StartPosition::Earliest).await?;
    let first = events
        .next_timeout(Duration::from_secs(300))
        .await?
        .ok_or_else(|| Error::new(ErrorKind::Timeout, "no event within 300 s of the restart"))?;
    let first_event_at = Instant::now();
    first.ack();
    let ready_at = hub.proc.ready_at.unwrap_or(connack_at);
    let rss_after = procstat::rss_kb(hub.pid()).unwrap_or(0);
    events.close().await;
    svc.close().await;
    drop(hub);

    let secs = |at: Instant| stats::round((at - t0).as_secs_f64());
    let (tcp_s, connack_s, ready_s, first_s) = (secs(tcp_at.unwrap_or(connack_at)), secs(connack_at), secs(ready_at), secs(first_event_at));
    println!("  restart after SIGKILL: TCP accept {tcp_s:.3} s, CONNACK {connack_s:.3} s, first event {first_s:.3} s (hub printed ready at {ready_s:.3} s)");
    let rows = vec![
        Row::new(Scenario::Recovery, format!("restart with {} stored: CONNACK", fmt_count(stored)), connack_s, "s")
            .target(Target::AtMost(1.0)),
        Row::new(Scenario::Recovery, format!("restart with {} stored: first event", fmt_count(stored)), first_s, "s")
            .target(Target::AtMost(1.0)),
    ];
    Ok(Outcome {
        rows,
        detail: json!({
            "stored_messages": stored,
            "fill": {"devices": devices, "seconds": stats::round(fill_s), "msgs_per_sec": stats::round(stored as f64 / fill_s), "device_outbox": "in memory, durability never", "hub_durability": "always"},
            "event_log_bytes": on_disk,
            "kill": "SIGKILL",
            "seconds_after_restart": {"tcp_accept": tcp_s, "connack": connack_s, "hub_printed_ready": ready_s, "first_event": first_s},
            "hub_rss_kb": {"before_kill": rss_before, "after_first_event": rss_after},
            "consumer": "a new consumer group reading from earliest",
        }),
        unavailable: None,
    })
}

/// CONNECT parameters of the `probe` device.
fn probe_params(host: &str, key: &str) -> Result<ConnectParams, Error> {
    let expiry = hubmsg_core::message::now_ms() / 1000 + 3600;
    let token = hubmsg_core::auth::generate_sas_token(&hubmsg_core::auth::device_resource_uri(host, "probe"), key, expiry, None)?;
    Ok(ConnectParams {
        client_id: "probe".into(),
        username: hubmsg_core::wire::device_username(host, "probe", None),
        password: token,
        keep_alive_secs: 60,
        clean_session: false,
    })
}

fn fmt_count(n: u64) -> String {
    super::fmt_value(n as f64)
}
