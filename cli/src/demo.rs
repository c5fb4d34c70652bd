//! `hubmsg demo`: D2C end to end in one command — an in-process hub in a temporary directory,
//! simulated devices with durable outboxes, and a consumer group reader — ending with an
//! accounting table. Exit status 0 only when nothing was lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hubmsg_core::hub::{Hub, HubConfig};
use hubmsg_core::outbox::OutboxOptions;
use hubmsg_core::proto::StartPosition;
use hubmsg_core::service::{ServiceClient, ServiceOptions};
use hubmsg_core::{DeviceClient, DeviceOptions, Error, ErrorKind, Message};
use parking_lot::Mutex;

/// Options of `hubmsg demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 20)]
    devices: usize,
    /// Messages per device.
    #[arg(long, default_value_t = 500)]
    messages: usize,
}

/// Runs the demo.
pub async fn run(a: DemoArgs) -> Result<(), Error> {
    let dir = tempfile::tempdir().map_err(|e| Error::storage("create a temporary directory", e))?;
    let hub = Hub::start(HubConfig::new(dir.path().join("hub"))).await?;
    println!("hub on {} (data in {})", hub.host_name(), dir.path().display());
    let started = Instant::now();

    let mut svc_opts = ServiceOptions::from_connection_string(&hub.service_connection_string())?;
    svc_opts.retry = hubmsg_core::retry::RetryPolicy::exponential(Duration::from_millis(100), Duration::from_secs(1));
    let svc = ServiceClient::connect(svc_opts).await?;
    let mut events = svc.events("$Default", StartPosition::Earliest).await?;
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let total = a.devices * a.messages;
    let consumer = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while seen.lock().len() < total {
                match events.next_timeout(Duration::from_secs(30)).await {
                    Ok(Some(ev)) => {
                        *seen.lock().entry(ev.message.message_id.clone().unwrap_or_default()).or_default() += 1;
                        ev.ack();
                    }
                    _ => break,
                }
            }
            let _ = events.checkpoint().await;
            events.close().await;
        })
    };

    let mut senders = Vec::new();
    for d in 0..a.devices {
        let id = format!("demo-{d:03}");
        hub.create_device(&id).await?;
        let mut opts = DeviceOptions::from_connection_string(&hub.device_connection_string(&id)?)?;
        opts.outbox = OutboxOptions { dir: Some(dir.path().join("outbox").join(&id)), ..OutboxOptions::default() };
        let client = DeviceClient::connect(opts).await?;
        let n = a.messages;
        senders.push(tokio::spawn(async move {
            let mut sent = 0usize;
            for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
                let batch = chunk
                    .iter()
                    .map(|i| Message::new(format!("{{\"t\":{}}}", 20 + i % 10)).with_message_id(format!("{id}/{i}")).with_property("kind", "telemetry"))
                    .collect();
                sent += client.send_batch(batch).await?.len();
            }
            client.flush(Duration::from_secs(60)).await?;
            let stats = client.stats();
            client.close().await?;
            Ok::<_, Error>((sent, stats))
        }));
    }
    let mut sent = 0;
    let mut delivered = 0;
    for s in senders {
        let (n, st) = s.await.map_err(|e| Error::new(ErrorKind::Internal, e.to_string()))??;
        sent += n;
        delivered += st.outbox.delivered;
    }
    let _ = tokio::time::timeout(Duration::from_secs(60), consumer).await;
    let (received, duplicates) = {
        let seen = seen.lock();
        (seen.len(), seen.values().map(|c| u64::from(c.saturating_sub(1))).sum::<u64>())
    };
    let lost = sent.saturating_sub(received);
    let secs = started.elapsed().as_secs_f64();
    println!();
    println!("{:<28}{:>12}", "D2C", "messages");
    println!("{:<28}{:>12}", "sent (durable in outbox)", sent);
    println!("{:<28}{:>12}", "acknowledged by the hub", delivered);
    println!("{:<28}{:>12}", "received by the consumer", received);
    println!("{:<28}{:>12}", "duplicates", duplicates);
    println!("{:<28}{:>12}", "LOST", lost);
    println!("{:<28}{:>12.0}", "end-to-end msg/s", sent as f64 / secs);
    hub.shutdown().await?;
    if lost > 0 {
        return Err(Error::new(ErrorKind::Internal, format!("{lost} messages were lost")));
    }
    Ok(())
}
