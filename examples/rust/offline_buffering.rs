//! offline_buffering [count]: the device keeps sending while the hub is down; its durable outbox
//! holds the messages, and once the hub is back they are all delivered — none lost.
//!
//! 1. start a hub (embedded, 127.0.0.1 port 0), register the device, stop the hub;
//! 2. send `count` messages (default 100): each send returns once the message is durable locally;
//! 3. start the hub again on the same address and data directory;
//! 4. the device reconnects and delivers; a consumer checks every message id arrived.
//!
//! Exit status 0 only when nothing was lost.
//!
//! `cargo run -p hubmsg-core --example offline_buffering -- 500`

mod example;

use std::collections::HashSet;
use std::time::Duration;

use hubmsg_core::outbox::OutboxOptions;
use hubmsg_core::proto::StartPosition;
use hubmsg_core::retry::RetryPolicy;
use hubmsg_core::service::ServiceClient;
use hubmsg_core::{ConnectionStatus, DeviceClient, DeviceOptions, Message, Overflow};

#[tokio::main]
async fn main() -> hubmsg_core::Result<()> {
    let count: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(100);
    let mut demo = example::Demo::new()?;
    let hub = demo.start().await?;
    hub.create_device("field-unit-7").await?;
    let cs = hub.device_connection_string("field-unit-7").await?;
    demo.stop_hub().await?; // the hub goes down
    println!("hub stopped");

    let mut opts = DeviceOptions::from_connection_string(&cs)?;
    opts.outbox = OutboxOptions {
        dir: Some(demo.path("outbox")),
        max_messages: 100_000,
        max_bytes: 64 << 20,
        overflow: Overflow::Reject,
        ..OutboxOptions::default()
    };
    opts.retry = RetryPolicy {
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(500),
        jitter: Duration::from_millis(50),
        ..RetryPolicy::default()
    };
    let dev = DeviceClient::connect(opts).await?;
    let mut status = dev.status_watch();
    tokio::spawn(async move {
        let mut last = String::new();
        while status.changed().await.is_ok() {
            let s = status.borrow_and_update().clone();
            let line = match &s {
                ConnectionStatus::Disconnected { reason } => format!("disconnected {reason}"),
                other => format!("{other:?}").to_lowercase(),
            };
            if line != last && !matches!(s, ConnectionStatus::Connecting) {
                println!("device: {line}");
            }
            last = line;
        }
    });
    for i in 0..count {
        dev.send(Message::new(format!("offline-{i}")).with_message_id(format!("offline-{i}"))).await?;
        // durable: safe
    }
    let st = dev.stats();
    println!("queued {} messages while the hub was down (delivered so far: {})", st.outbox.depth, st.outbox.delivered);
    let hub = demo.start().await?; // the hub is back, same address and data
    println!("hub restarted on {}", hub.mqtt_addr().map(|a| a.to_string()).unwrap_or_default());
    dev.flush(Duration::from_secs(120)).await?;
    let retries = dev.stats().retries;
    dev.close().await?;

    // Check at the hub: every id arrived (duplicates are allowed: at-least-once).
    let svc = ServiceClient::from_connection_string(&hub.service_connection_string()).await?;
    let mut stream = svc.events("$Default", StartPosition::Earliest).await?;
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    while seen.len() < count {
        let Some(ev) = stream.next_timeout(Duration::from_secs(30)).await? else { break };
        if let Some(n) = ev.message().message_id.as_deref().and_then(|m| m.strip_prefix("offline-")).and_then(|n| n.parse::<usize>().ok()) {
            duplicates += usize::from(!seen.insert(n));
        }
        ev.ack();
    }
    stream.checkpoint().await?;
    stream.close().await;
    svc.close().await;
    demo.stop_hub().await?;
    println!(
        "sent {count} while the hub was down, received {} distinct, lost {} (duplicates {duplicates}, retries {retries})",
        seen.len(),
        count - seen.len()
    );
    std::process::exit(if seen.len() == count { 0 } else { 1 });
}
