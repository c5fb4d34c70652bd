//! Recovery: a hub holding many stored D2C messages (1,000,000, then 10,000,000 in a full run) is
//! SIGKILLed and restarted on the same data; how long until it accepts a connection (TCP +
//! CONNACK), until a consumer group reading from earliest gets its first event, and the hub's
//! memory after the restart (which must not grow with the records stored).

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

/// What one restart measured.
struct Restart {
    stored: u64,
    fill_s: f64,
    on_disk: u64,
    rss_before_kb: u64,
    tcp_s: f64,
    connack_s: f64,
    ready_s: f64,
    first_s: f64,
    rss_after_kb: u64,
}

/// Scenario 5: the hub is filled to each stage (1,000,000 then 10,000,000 stored events in a full
/// run), SIGKILLed and restarted on the same data each time.
pub async fn recovery(ctx: &Ctx) -> Result<Outcome, Error> {
    let (stages, devices): (&[u64], usize) = if ctx.quick { (&[20_000, 100_000], 10) } else { (&[1_000_000, 10_000_000], 100) };
    ctx.free_earlier_runs();
    let mut hub = Hub::start(ctx, "recovery", &[]).await?;
    let svc = common::service(&hub.proc.cs).await?;
    let mut ids = common::device_ids("fill", devices);
    ids.push("probe".into());
    common::register(&svc, &ids, &ctx.device_key, 64).await?;
    svc.close().await;

    let mut restarts = Vec::new();
    let mut stored = 0u64;
    for (k, &target) in stages.iter().enumerate() {
        let fill_s = fill(ctx, &hub, &ids[..devices], k, target - stored).await?;
        stored = target;
        let rss_before_kb = procstat::rss_kb(hub.pid()).unwrap_or(0);
        let on_disk = disk_bytes(&hub.data.join("events"));
        println!(
            "  stored {} messages from {devices} devices ({:.0} msg/s while filling), {:.0} MiB of event log, hub RSS {} MiB",
            fmt_count(stored),
            (target - restarts.last().map_or(0, |r: &Restart| r.stored)) as f64 / fill_s,
            on_disk as f64 / 1048576.0,
            rss_before_kb / 1024
        );
        let r = restart(ctx, &mut hub, stored, fill_s, on_disk, rss_before_kb).await?;
        println!(
            "  restart after SIGKILL with {} stored: TCP accept {:.3} s, CONNACK {:.3} s, first event {:.3} s (hub printed ready at {:.3} s); hub RSS {} MiB",
            fmt_count(stored),
            r.tcp_s,
            r.connack_s,
            r.first_s,
            r.ready_s,
            r.rss_after_kb / 1024
        );
        restarts.push(r);
    }
    drop(hub);

    let mut rows = Vec::new();
    for r in &restarts {
        let n = fmt_count(r.stored);
        rows.push(Row::new(Scenario::Recovery, format!("restart with {n} stored: CONNACK"), r.connack_s, "s").target(Target::AtMost(1.0)));
        rows.push(
            Row::new(Scenario::Recovery, format!("restart with {n} stored: first event"), r.first_s, "s").target(Target::AtMost(1.0)),
        );
        rows.push(Row::new(
            Scenario::Recovery,
            format!("hub RSS after restart with {n} stored"),
            stats::round(r.rss_after_kb as f64 / 1024.0),
            "MiB",
        ));
    }
    let detail: Vec<_> = restarts
        .iter()
        .map(|r| {
            json!({
                "stored_messages": r.stored,
                "fill_seconds": stats::round(r.fill_s),
                "event_log_bytes": r.on_disk,
                "seconds_after_restart": {"tcp_accept": r.tcp_s, "connack": r.connack_s, "hub_printed_ready": r.ready_s, "first_event": r.first_s},
                "hub_rss_kb": {"before_kill": r.rss_before_kb, "after_first_event": r.rss_after_kb},
            })
        })
        .collect();
    Ok(Outcome {
        rows,
        detail: json!({
            "fill": {"devices": devices, "device_outbox": "in memory, durability never", "hub_durability": "always"},
            "kill": "SIGKILL, then restart on the same data and port",
            "consumer": "a new consumer group per restart reading from earliest",
            "restarts": detail,
        }),
        unavailable: None,
    })
}

/// Pushes `count` more messages through `devices` (in-memory outboxes, no device fsync; the hub
/// stores them with its default durability: fsync, group commit). Returns the seconds it took.
async fn fill(ctx: &Ctx, hub: &Hub, ids: &[String], stage: usize, count: u64) -> Result<f64, Error> {
    let devices = ids.len();
    let per = count / devices as u64;
    let mut devs = Vec::new();
    for id in ids {
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
        // Distinct message ids per stage (device index offset by the stage).
        let d = k + stage * devices;
        set.spawn(async move {
            common::send_all(&dev, d, per, limit, epoch).await?;
            dev.flush(Duration::from_secs(1800)).await?;
            Ok::<u64, Error>(dev.stats().outbox.delivered)
        });
    }
    let mut delivered = 0;
    while let Some(r) = set.join_next().await {
        delivered += r.map_err(|e| Error::new(ErrorKind::Internal, format!("fill task: {e}")))??;
    }
    let secs = t.elapsed().as_secs_f64();
    for d in &devs {
        let _ = d.close().await;
    }
    if delivered != per * devices as u64 {
        return Err(Error::new(ErrorKind::Internal, format!("the hub acknowledged {delivered} of {} messages", per * devices as u64)));
    }
    Ok(secs)
}

/// SIGKILLs the hub, restarts it on the same data and port, and times CONNACK and the first
/// event of a new consumer group reading from earliest.
async fn restart(ctx: &Ctx, hub: &mut Hub, stored: u64, fill_s: f64, on_disk: u64, rss_before_kb: u64) -> Result<Restart, Error> {
    hub.proc.kill();
    // The page cache keeps the data (as after a process crash): the figure is the store's work.
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
    let mut events = svc.events(&format!("recovery-{stored}"), StartPosition::Earliest).await?;
    let first = events
        .next_timeout(Duration::from_secs(300))
        .await?
        .ok_or_else(|| Error::new(ErrorKind::Timeout, "no event within 300 s of the restart"))?;
    let first_event_at = Instant::now();
    first.ack();
    let ready_at = hub.proc.ready_at.unwrap_or(connack_at);
    let rss_after_kb = procstat::rss_kb(hub.pid()).unwrap_or(0);
    events.close().await;
    svc.close().await;
    let secs = |at: Instant| stats::round((at - t0).as_secs_f64());
    Ok(Restart {
        stored,
        fill_s,
        on_disk,
        rss_before_kb,
        tcp_s: secs(tcp_at.unwrap_or(connack_at)),
        connack_s: secs(connack_at),
        ready_s: secs(ready_at),
        first_s: secs(first_event_at),
        rss_after_kb,
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
