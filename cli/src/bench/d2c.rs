//! D2C scenarios against a hubmsg hub: throughput to an acknowledging consumer (1 and 100
//! devices, fsync'd and `never`), and latency at a fixed offered load with a paced open-loop
//! sender.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hubmsg_core::outbox::OutboxOptions;
use hubmsg_core::proto::StartPosition;
use hubmsg_core::service::ServiceClient;
use hubmsg_core::store::Durability;
use hubmsg_core::{DeviceClient, Error, ErrorKind, Message, Overflow};
use serde_json::json;
use tokio::task::JoinSet;

use super::common::{self, body, parse_body, Hub, Stamp};
use super::plot::PlotData;
use super::procstat::{self, CpuSplit, Meters};
use super::stats::{self, message_id, Counts, IdTracker, Samples, Timeline};
use super::{fmt_value, Ctx, Outcome, Row, Scenario, Target};

/// The throughput target (messages/s, both sides fsync'd).
pub const THROUGHPUT_TARGET: f64 = 150_000.0;
/// The throughput target with durability `never` (messages/s): the protocol path itself.
pub const THROUGHPUT_NEVER_TARGET: f64 = 200_000.0;
/// hubmsg (fsync'd) must reach this multiple of the best durable baseline (one whose PUBACK
/// waits for its disk) with the same number of publishers.
pub const RATIO_TARGET: f64 = 2.0;

/// A hub plus connected bench devices (with outboxes under the run directory) and a service.
pub struct Rig {
    /// The hub process (killed and its data removed on drop).
    pub hub: Hub,
    /// Service client (registry, consumer).
    pub svc: ServiceClient,
    /// Connected devices `0..n`.
    pub devices: Vec<DeviceClient>,
}

impl Rig {
    /// Starts a hub with `durability`, registers `n` devices and connects them with durable
    /// outboxes of the same durability, big enough for `per_device` messages.
    pub async fn start(ctx: &Ctx, name: &str, n: usize, durability: &str, per_device: u64) -> Result<Rig, Error> {
        let hub = Hub::start(ctx, name, &["--durability", durability]).await?;
        let svc = common::service(&hub.proc.cs).await?;
        let ids = common::device_ids("bench", n);
        common::register(&svc, &ids, &ctx.device_key, 64).await?;
        let durability: Durability = durability.parse()?;
        let mut devices = Vec::with_capacity(n);
        for id in &ids {
            let outbox = OutboxOptions {
                dir: Some(hub.run_dir.join("devices").join(id)),
                in_memory: false,
                durability,
                max_messages: per_device as usize + 1,
                max_bytes: 1 << 30,
                overflow: Overflow::Reject,
            };
            devices.push(DeviceClient::connect(common::device_options(&hub.host(), id, &ctx.device_key, outbox)).await?);
        }
        for d in &devices {
            common::connected(d, Duration::from_secs(30)).await?;
        }
        Ok(Rig { hub, svc, devices })
    }

    /// Closes the clients (the hub is killed when the rig drops).
    pub async fn close(self) {
        for d in &self.devices {
            let _ = tokio::time::timeout(Duration::from_secs(10), d.close()).await;
        }
        self.svc.close().await;
    }
}

/// One throughput measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ThroughputRun {
    /// `hubmsg` or `Mosquitto`.
    pub system: &'static str,
    /// Table label.
    pub label: String,
    /// Publishing devices.
    pub devices: usize,
    /// `always`, `never`, or the broker's persistence setting.
    pub durability: String,
    /// Messages sent.
    pub messages: u64,
    /// First send to the last message received.
    pub seconds: f64,
    /// messages / seconds.
    pub msgs_per_sec: f64,
    /// First send until every send returned (durable in the outboxes / handed to the client).
    pub accepted_seconds: f64,
    /// Id accounting at the consumer.
    pub counts: Counts,
    /// CPU over the run: broker / hub, bench process (devices + consumer), rest of the machine.
    pub cpu: CpuSplit,
    /// Server CPU time per message, µs.
    pub server_us_per_msg: f64,
    /// Client (bench process) CPU time per message, µs.
    pub client_us_per_msg: f64,
    /// Broker / hub resident memory at the end, KiB.
    pub server_rss_kb: u64,
    /// `(s, msg/s)` received per 100 ms.
    #[serde(skip)]
    pub timeline: Vec<(f64, f64)>,
}

impl ThroughputRun {
    /// The progress line printed after a run.
    pub fn line(&self) -> String {
        format!(
            "{:<9} {:<40} {:>9} msg/s  ({} msgs in {:.2} s; duplicates {}; {}; CPU per message: server {:.1} µs, clients {:.1} µs)",
            self.system,
            self.label,
            fmt_value(self.msgs_per_sec),
            self.messages,
            self.seconds,
            self.counts.duplicates,
            self.cpu,
            self.server_us_per_msg,
            self.client_us_per_msg
        )
    }
}

/// The receiving side's bookkeeping of one throughput run: ids, arrivals over time, when the
/// senders finished, and CPU from the first send to the last arrival.
pub struct Tally {
    /// Which ids arrived.
    pub tracker: IdTracker,
    timeline: Timeline,
    t0: Instant,
    accepted_at: Instant,
    meters: Meters,
    server: u32,
}

/// A sender task's result: when its last send was accepted.
pub type SenderResult = Result<Result<Instant, Error>, tokio::task::JoinError>;

impl Tally {
    /// Starts the clocks: `per` messages expected from each of `devices`; `server` is the hub or
    /// broker process.
    pub fn start(per: u64, devices: usize, server: u32) -> Tally {
        let t0 = Instant::now();
        Tally {
            tracker: IdTracker::new(&vec![per; devices]),
            timeline: Timeline::new(t0, Duration::from_millis(100)),
            t0,
            accepted_at: t0,
            meters: Meters::start(server),
            server,
        }
    }

    /// Notes an arrival (`first`: the id had not arrived before).
    pub fn arrived(&mut self, first: bool) {
        if first {
            self.timeline.tick(Instant::now());
        }
    }

    /// Notes a finished sender task; its error ends the run.
    pub fn sender_done(&mut self, r: SenderResult) -> Result<(), Error> {
        let at = r.map_err(|e| Error::new(ErrorKind::Internal, format!("sender task: {e}")))??;
        self.accepted_at = self.accepted_at.max(at);
        Ok(())
    }

    /// Stops the clocks (call once the last message arrived or the wait gave up), waits for the
    /// remaining senders and describes the run.
    pub async fn stop(
        &mut self,
        senders: &mut JoinSet<Result<Instant, Error>>,
        system: &'static str,
        label: String,
        durability: String,
    ) -> ThroughputRun {
        let end = Instant::now();
        let cpu = self.meters.finish();
        let server_rss_kb = procstat::rss_kb(self.server).unwrap_or(0);
        while let Some(j) = senders.join_next().await {
            let _ = self.sender_done(j);
        }
        let counts = self.tracker.counts();
        let seconds = (end - self.t0).as_secs_f64();
        let per_msg = |cores: f64| stats::round(cores * seconds * 1e6 / counts.expected.max(1) as f64);
        ThroughputRun {
            system,
            label,
            devices: self.tracker.devices(),
            durability,
            messages: counts.expected,
            seconds: stats::round(seconds),
            msgs_per_sec: counts.expected as f64 / seconds,
            accepted_seconds: stats::round((self.accepted_at - self.t0).as_secs_f64()),
            counts,
            server_us_per_msg: per_msg(cpu.server.cores),
            client_us_per_msg: per_msg(cpu.client.cores),
            cpu,
            server_rss_kb,
            timeline: self.timeline.rates(),
        }
    }
}

/// Messages per throughput run.
pub fn throughput_messages(ctx: &Ctx) -> u64 {
    if ctx.quick {
        20_000
    } else {
        300_000
    }
}

/// Scenario 1.
pub async fn throughput(ctx: &Ctx, plots: &mut PlotData) -> Result<Outcome, Error> {
    let total = throughput_messages(ctx);
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    for durability in ["always", "never"] {
        for devices in [1usize, 100] {
            let run = hubmsg_throughput(ctx, devices, durability, total).await?;
            println!("  {}", run.line());
            let fsync = durability == "always";
            let mut row = Row::new(Scenario::D2cThroughput, run.label.clone(), stats::round(run.msgs_per_sec), "msg/s")
                .other_cpu(run.cpu.rest_cores)
                .cpu_per_msg(&run)
                .compare(devices, fsync, fsync.then_some(RATIO_TARGET));
            row = row.target(Target::AtLeast(if fsync { THROUGHPUT_TARGET } else { THROUGHPUT_NEVER_TARGET }));
            rows.push(row);
            plots.add_throughput(&run);
            runs.push(run);
        }
    }
    Ok(Outcome {
        rows,
        detail: json!({
            "messages_per_run": total,
            "hub": "hubmsg hub --durability <d> (4 partitions)",
            "devices": "DeviceClient with a durable outbox of the same durability; send_batch of up to 1,000 messages while the outbox holds at most max(20,000 / devices, 2,000); 1,000 in flight (default)",
            "consumer": "one consumer-group reader ($Default, from earliest) that acks every event",
            "runs": runs,
        }),
        unavailable: None,
    })
}

async fn hubmsg_throughput(ctx: &Ctx, devices: usize, durability: &str, total: u64) -> Result<ThroughputRun, Error> {
    let per = total / devices as u64;
    let total = per * devices as u64;
    let rig = Rig::start(ctx, &format!("throughput-{durability}-{devices}"), devices, durability, per).await?;
    let mut events = common::consumer(&rig.svc, "$Default", StartPosition::Earliest).await?;
    let mut tally = Tally::start(per, devices, rig.hub.pid());
    let mut senders = JoinSet::new();
    let limit = (common::OUTBOX_BUDGET / devices).max(2000);
    for (d, dev) in rig.devices.iter().enumerate() {
        let (dev, epoch) = (dev.clone(), ctx.epoch);
        senders.spawn(async move { common::send_all(&dev, d, per, limit, epoch).await });
    }
    let idle = Duration::from_secs(30);
    while !tally.tracker.complete() {
        tokio::select! {
            ev = events.next_timeout(idle) => match ev? {
                Some(ev) => {
                    let first = tally.tracker.record_id(ev.message_id());
                    tally.arrived(first);
                    ev.ack();
                }
                None => break,
            },
            Some(j) = senders.join_next(), if !senders.is_empty() => tally.sender_done(j)?,
        }
    }
    let label = format!(
        "{} device{}, {}",
        devices,
        if devices == 1 { "" } else { "s" },
        if durability == "always" { "outbox + hub log fsync'd" } else { "durability never" }
    );
    let run = tally.stop(&mut senders, "hubmsg", label, durability.to_string()).await;
    let why = (run.counts.missing > 0).then(|| missing_report(&tally.tracker, &rig.devices));
    events.close().await;
    rig.close().await;
    if let Some(why) = why {
        return Err(Error::new(
            ErrorKind::Internal,
            format!("{} of {total} messages never reached the consumer (no event for {idle:?}): {why}", run.counts.missing),
        ));
    }
    Ok(run)
}

/// Which devices' messages are missing, with what their clients say.
pub fn missing_report(tracker: &IdTracker, devices: &[DeviceClient]) -> String {
    let by = tracker.missing_by_device();
    let mut parts: Vec<String> = by
        .iter()
        .take(5)
        .map(|&(d, n, first)| match devices.get(d) {
            Some(c) => {
                let s = c.stats();
                format!(
                    "device {d}: {n} missing from #{first} (client: {:?}, outbox depth {}, in flight {}, delivered {}, connects {})",
                    c.status(),
                    s.outbox.depth,
                    s.outbox.in_flight,
                    s.outbox.delivered,
                    s.connects
                )
            }
            None => format!("device {d}: {n} missing from #{first}"),
        })
        .collect();
    if by.len() > 5 {
        parts.push(format!("… {} devices in all", by.len()));
    }
    parts.join("; ")
}

/// Settings of the latency scenario.
struct LatencyPlan {
    rate: u64,
    warmup: Duration,
    window: Duration,
}

/// The latency target (p99, ms, fsync'd).
pub const LATENCY_TARGET_MS: f64 = 5.0;

/// Scenario 2: 10,000 msg/s from one device (fsync'd, then `never`), and from ten devices whose
/// fsync'd outboxes share the machine's disk with the hub (as on a gateway hosting many device
/// identities).
pub async fn latency(ctx: &Ctx, plots: &mut PlotData) -> Result<Outcome, Error> {
    let plan = LatencyPlan {
        rate: 10_000,
        warmup: if ctx.quick { Duration::from_millis(500) } else { Duration::from_secs(1) },
        window: if ctx.quick { Duration::from_secs(2) } else { Duration::from_secs(10) },
    };
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    // What the disk itself takes for one fdatasync, measured on the same file system first: the
    // fsync'd figures below pay two of them in a row (device outbox, then hub log).
    let probe = procstat::fsync_probe(&ctx.dir("fsync-probe")?, if ctx.quick { 300 } else { 2000 })
        .map_err(|e| Error::storage("fsync probe", e))?;
    println!("  disk      fdatasync of a 4 KiB append: {probe}");
    rows.push(Row::new(Scenario::D2cLatency, "disk: fdatasync of a 4 KiB append, p50", probe.p50_ms, "ms"));
    rows.push(Row::new(Scenario::D2cLatency, "disk: fdatasync of a 4 KiB append, p99", probe.p99_ms, "ms"));
    for (devices, durability) in [(1usize, "always"), (1, "never"), (10, "always")] {
        let r = latency_run(ctx, &plan, devices, durability).await?;
        let s = &r.from_send;
        let what = format!(
            "{devices} device{}, {}",
            if devices == 1 { "" } else { "s" },
            if durability == "always" { "fsync'd" } else { "durability never" }
        );
        println!(
            "  hubmsg    {what:<26} p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms; from schedule p99 {:.2} ms  ({} samples; {} over 10 ms in {} episodes; pacer lag max {:.2} ms; {})",
            s.p50_ms, s.p99_ms, s.p999_ms, s.max_ms, r.from_schedule.p99_ms, s.count, r.over_10ms, r.slow_episodes, r.pacer_lag_max_ms, r.cpu
        );
        for (name, v) in [("p50", s.p50_ms), ("p99", s.p99_ms), ("p99.9", s.p999_ms)] {
            let mut row = Row::new(Scenario::D2cLatency, format!("{name} at 10,000 msg/s, {what}"), v, "ms").other_cpu(r.cpu.rest_cores);
            if name == "p99" && durability == "always" {
                row = row.target(Target::AtMost(LATENCY_TARGET_MS));
            }
            rows.push(row);
        }
        plots.latency_curves.push((format!("D2C, {what}"), r.curve.clone()));
        plots.latency_points.push((format!("D2C, {what}"), r.points.clone()));
        runs.push(r);
    }
    Ok(Outcome {
        rows,
        detail: json!({
            "offered_msgs_per_sec": plan.rate,
            "warmup_s": plan.warmup.as_secs_f64(),
            "window_s": plan.window.as_secs_f64(),
            "sender": "open loop: a pacer thread releases each message at its scheduled time and calls send() in a task of its own, so a slow send never delays the next; devices take messages round robin",
            "latency": "from the send() call (timestamp in the body) to the consumer's receipt; from_schedule is from the time the pacer meant to call send(), so it also counts a late pacer or a busy runtime",
            "slow_episodes": "messages over 10 ms grouped into episodes (a gap of more than 20 ms between two of them starts a new one)",
            "fsync_probe": probe,
            "runs": runs,
        }),
        unavailable: None,
    })
}

#[derive(serde::Serialize)]
struct LatencyRun {
    devices: usize,
    durability: String,
    sent: u64,
    send_errors: u64,
    counts: Counts,
    from_send: stats::Summary,
    from_schedule: stats::Summary,
    pacer_lag_max_ms: f64,
    /// Messages slower than 10 ms, and how many separate episodes they form.
    over_10ms: usize,
    slow_episodes: usize,
    cpu: CpuSplit,
    #[serde(skip)]
    curve: Vec<(f64, f64)>,
    #[serde(skip)]
    points: Vec<(f64, f64)>,
}

async fn latency_run(ctx: &Ctx, plan: &LatencyPlan, devices: usize, durability: &str) -> Result<LatencyRun, Error> {
    let total = plan.rate * (plan.warmup + plan.window).as_millis() as u64 / 1000;
    let per = total / devices as u64;
    let total = per * devices as u64;
    let warm = plan.rate * plan.warmup.as_millis() as u64 / 1000;
    let rig = Rig::start(ctx, &format!("latency-{durability}-{devices}"), devices, durability, per).await?;
    let mut events = common::consumer(&rig.svc, "$Default", StartPosition::Earliest).await?;

    // Receiver: latency of every message after the warm-up, ids of all.
    let epoch = ctx.epoch;
    let interval_ns = 1_000_000_000 / plan.rate;
    let receiver = tokio::spawn(async move {
        let mut tracker = IdTracker::new(&vec![per; devices]);
        let (mut from_send, mut from_sched) = (Samples::default(), Samples::default());
        let mut points = Vec::new();
        while !tracker.complete() {
            let Some(ev) = events.next_timeout(Duration::from_secs(30)).await? else { break };
            let now_ns = epoch.elapsed().as_nanos() as u64;
            let first = tracker.record_id(ev.message_id());
            ev.ack();
            let Some(st) = parse_body(&ev.body()) else { continue };
            let index = st.seq * devices as u64 + st.device as u64;
            if first && index >= warm {
                from_send.push(Duration::from_nanos(now_ns.saturating_sub(st.sent_ns)));
                from_sched.push(Duration::from_nanos(now_ns.saturating_sub(st.scheduled_ns)));
                points.push(((index - warm) as f64 * interval_ns as f64 / 1e9, now_ns.saturating_sub(st.sent_ns) as f64 / 1e6));
            }
        }
        events.close().await;
        Ok::<_, Error>((tracker, from_send, from_sched, points))
    });

    // Pacer: message i is due at start + i / rate. It runs on its own thread (so a busy runtime
    // cannot make it late) and hands each send() to the runtime as a task of its own (so a slow
    // send never delays the next).
    let errors = Arc::new(AtomicU64::new(0));
    let meters = Meters::start(rig.hub.pid());
    let start = Instant::now() + Duration::from_millis(20);
    let start_ns = (start - ctx.epoch).as_nanos() as u64;
    let pacer = {
        let (runtime, devs, errors) = (tokio::runtime::Handle::current(), rig.devices.clone(), errors.clone());
        std::thread::Builder::new()
            .name("bench-pacer".into())
            .spawn(move || {
                let mut lag_max = Duration::ZERO;
                let mut i = 0u64;
                while i < total {
                    let due_at = start + Duration::from_nanos(i * interval_ns);
                    let now = Instant::now();
                    if due_at > now {
                        std::thread::sleep(due_at - now);
                    }
                    let now = Instant::now();
                    let due = (((now - start).as_nanos() as u64) / interval_ns + 1).min(total);
                    while i < due {
                        let d = (i % devices as u64) as usize;
                        let seq = i / devices as u64;
                        let scheduled_ns = start_ns + i * interval_ns;
                        lag_max = lag_max.max(now.saturating_duration_since(start + Duration::from_nanos(i * interval_ns)));
                        let (dev, errors) = (devs[d].clone(), errors.clone());
                        runtime.spawn(async move {
                            let sent_ns = epoch.elapsed().as_nanos() as u64;
                            let m = Message::new(body(Stamp { sent_ns, device: d as u32, seq, scheduled_ns }))
                                .with_message_id(message_id(d, seq));
                            if dev.send(m).await.is_err() {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        });
                        i += 1;
                    }
                }
                lag_max
            })
            .map_err(|e| Error::new(ErrorKind::Internal, format!("pacer thread: {e}")))?
    };
    let (tracker, mut from_send, mut from_sched, mut points) =
        receiver.await.map_err(|e| Error::new(ErrorKind::Internal, format!("receiver task: {e}")))??;
    let cpu = meters.finish();
    let lag_max = pacer.join().map_err(|_| Error::new(ErrorKind::Internal, "pacer thread panicked"))?;
    rig.close().await;
    let counts = tracker.counts();
    let send_errors = errors.load(Ordering::Relaxed);
    if counts.missing > 0 || send_errors > 0 {
        return Err(Error::new(
            ErrorKind::Internal,
            format!("{} of {total} messages never reached the consumer ({send_errors} send errors)", counts.missing),
        ));
    }
    let (over_10ms, slow_episodes) = slow_episodes(&points, 10.0, 0.020);
    if let Some(dir) = std::env::var_os("HUBMSG_BENCH_POINTS") {
        // Every message's (seconds into the window, latency ms), for looking for bands.
        let csv: String = points.iter().map(|(t, l)| format!("{t:.6},{l:.3}\n")).collect();
        let path = std::path::Path::new(&dir).join(format!("latency-points-{devices}-{durability}.csv"));
        std::fs::write(&path, csv).map_err(|e| Error::storage(format!("write {}", path.display()), e))?;
    }
    let step = (points.len() / 20_000).max(1);
    points = points.into_iter().step_by(step).collect();
    let from_send_summary = from_send.summary();
    let curve = from_send.percentile_curve();
    Ok(LatencyRun {
        devices,
        durability: durability.to_string(),
        sent: total,
        send_errors,
        counts,
        from_send: from_send_summary,
        from_schedule: from_sched.summary(),
        pacer_lag_max_ms: stats::round(lag_max.as_secs_f64() * 1e3),
        over_10ms,
        slow_episodes,
        cpu,
        curve,
        points,
    })
}

/// Messages slower than `over_ms` among `(seconds, ms)` points, and the episodes they form
/// (a gap longer than `gap_s` between two slow messages starts a new one).
fn slow_episodes(points: &[(f64, f64)], over_ms: f64, gap_s: f64) -> (usize, usize) {
    let mut slow: Vec<f64> = points.iter().filter(|p| p.1 > over_ms).map(|p| p.0).collect();
    slow.sort_by(f64::total_cmp);
    let episodes = slow.windows(2).filter(|w| w[1] - w[0] > gap_s).count() + usize::from(!slow.is_empty());
    (slow.len(), episodes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn slow_messages_group_into_episodes() {
        let pts = [(0.0, 1.0), (0.100, 15.0), (0.105, 12.0), (0.5, 30.0), (0.9, 2.0)];
        assert_eq!(super::slow_episodes(&pts, 10.0, 0.020), (3, 2));
        assert_eq!(super::slow_episodes(&[], 10.0, 0.020), (0, 0));
    }
}
