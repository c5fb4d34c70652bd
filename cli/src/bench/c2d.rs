//! C2D round trip: the service sends with `ack=full`, the device completes, the feedback record
//! reaches the service. One message at a time, each timed from the `send` call to the feedback.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hubmsg_core::outbox::OutboxOptions;
use hubmsg_core::proto::{AckMode, FeedbackStatus};
use hubmsg_core::service::C2dOptions;
use hubmsg_core::{DeviceClient, Error, ErrorKind, Message};
use parking_lot::Mutex;
use serde_json::json;

use super::common::{self, Hub};
use super::plot::PlotData;
use super::procstat::Meters;
use super::stats::Samples;
use super::{Ctx, Outcome, Row, Scenario, Target};

/// The C2D `ack=full` round-trip target (p99, ms).
pub const ROUNDTRIP_TARGET_MS: f64 = 5.0;

/// The hub's feedback batching interval for this scenario (IoT Hub's is 15 s: one message at a
/// time would wait for it). Batches form when the device's settle is recorded (the previous
/// batch left more than the interval ago), so the sweep keeps its default 100 ms tick.
const FEEDBACK_INTERVAL: &str = "1ms";

/// Scenario 3.
pub async fn roundtrip(ctx: &Ctx, plots: &mut PlotData) -> Result<Outcome, Error> {
    let (n, warm) = if ctx.quick { (200, 20) } else { (2000, 100) };
    let hub = Hub::start(ctx, "c2d", &["--feedback-interval", FEEDBACK_INTERVAL]).await?;
    let svc = common::service(&hub.proc.cs).await?;
    let id = "bench-c2d";
    common::register(&svc, &[id.to_string()], &ctx.device_key, 1).await?;
    let outbox = OutboxOptions { dir: Some(hub.run_dir.join("device")), ..OutboxOptions::default() };
    let dev = DeviceClient::connect(common::device_options(&hub.host(), id, &ctx.device_key, outbox)).await?;
    let mut rx = dev.c2d()?;
    common::connected(&dev, Duration::from_secs(30)).await?;

    // The device completes everything at once and notes when each message arrived.
    let arrived: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let device_task = {
        let arrived = arrived.clone();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if let Some(mid) = &m.message.message_id {
                    arrived.lock().insert(mid.clone(), Instant::now());
                }
                if m.complete().is_err() {
                    break;
                }
            }
        })
    };

    let (mut total, mut accepted, mut to_device) = (Samples::default(), Samples::default(), Samples::default());
    let meters = Meters::start(hub.pid());
    let started = Instant::now();
    for i in 0..warm + n {
        let mid = format!("c2d-{i}");
        let t0 = Instant::now();
        let outcome = svc.await_outcome(&mid)?;
        let msg = Message::new(format!("{{\"setpoint\":{i}}}")).with_message_id(mid.clone());
        svc.send_c2d_with(id, msg, C2dOptions { ack: AckMode::Full, ttl: Some(Duration::from_secs(60)) }).await?;
        let t_accepted = Instant::now();
        let record = tokio::time::timeout(Duration::from_secs(30), outcome)
            .await
            .map_err(|_| Error::new(ErrorKind::Timeout, format!("no feedback for {mid} within 30 s")))?
            .map_err(|_| Error::closed("service client"))?;
        let t_done = Instant::now();
        if record.status_code != FeedbackStatus::Success {
            return Err(Error::new(ErrorKind::Internal, format!("{mid}: feedback {:?}, expected Success", record.status_code)));
        }
        if i >= warm {
            total.push(t_done - t0);
            accepted.push(t_accepted - t0);
            if let Some(at) = arrived.lock().remove(&mid) {
                to_device.push(at - t0);
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = meters.finish();
    device_task.abort();
    let _ = dev.close().await;
    svc.close().await;
    drop(hub);

    let s = total.summary();
    println!(
        "  hubmsg    round trip p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  ({} round trips, feedback interval {FEEDBACK_INTERVAL})",
        s.p50_ms, s.p99_ms, s.p999_ms, s.max_ms, s.count
    );
    plots.latency_curves.push(("C2D round trip (ack=full)".into(), total.percentile_curve()));
    let rows = vec![
        Row::new(Scenario::C2dRoundtrip, "C2D send -> complete -> feedback, p50", s.p50_ms, "ms").other_cpu(cpu.rest_cores),
        Row::new(Scenario::C2dRoundtrip, "C2D send -> complete -> feedback, p99", s.p99_ms, "ms")
            .target(Target::AtMost(ROUNDTRIP_TARGET_MS))
            .other_cpu(cpu.rest_cores),
    ];
    Ok(Outcome {
        rows,
        detail: json!({
            "round_trips": n,
            "warmup": warm,
            "hub": format!("hubmsg hub --feedback-interval {FEEDBACK_INTERVAL} (durability always, default 100 ms sweep)"),
            "device": "DeviceClient with a durable outbox (completed ids recorded with fsync before the PUBACK); completes every message at once",
            "service": "ServiceClient::await_outcome + send_c2d_with(ack=full), one message at a time",
            "total": s,
            "until_hub_accepted": accepted.summary(),
            "until_device_received": to_device.summary(),
            "seconds": elapsed,
            "cpu": cpu,
        }),
        unavailable: None,
    })
}
