//! service_monitor [count]: a back-end service lists the registered devices, then reads D2C
//! telemetry from consumer group "monitor" (acknowledging each event and checkpointing at the
//! end) until `count` events arrived (default 20) or 30 s passed.
//!
//! HUBMSG_SERVICE_CONNECTION_STRING: a policy connection string (else: demo mode, where an
//! embedded hub and a device produce the telemetry).
//!
//! `cargo run -p hubmsg-core --example service_monitor -- 30`

mod example;

use std::time::Duration;

use hubmsg_core::outbox::OutboxOptions;
use hubmsg_core::proto::StartPosition;
use hubmsg_core::service::ServiceClient;
use hubmsg_core::{DeviceClient, DeviceOptions, Message};

async fn produce(cs: &str, count: usize) -> hubmsg_core::Result<()> {
    let mut opts = DeviceOptions::from_connection_string(cs)?;
    opts.outbox = OutboxOptions::in_memory(); // a demo producer
    let dev = DeviceClient::connect(opts).await?;
    dev.send_batch((0..count).map(|i| Message::new(format!("reading {i}"))).collect()).await?;
    dev.flush(Duration::from_secs(30)).await?;
    dev.close().await
}

#[tokio::main]
async fn main() -> hubmsg_core::Result<()> {
    let count: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let mut demo = None;
    let cs = match std::env::var("HUBMSG_SERVICE_CONNECTION_STRING") {
        Ok(cs) => cs,
        Err(_) => {
            let hub = demo.insert(example::Demo::new()?).start().await?;
            hub.create_device("thermostat-1").await?;
            produce(&hub.device_connection_string("thermostat-1").await?, count).await?;
            hub.service_connection_string()
        }
    };
    let svc = ServiceClient::from_connection_string(&cs).await?;
    for d in svc.list_devices().await? {
        println!("device {} ({:?})", d.device_id, d.status);
    }
    let mut stream = svc.events("monitor", StartPosition::Earliest).await?;
    let mut events = 0;
    while events < count {
        let Some(ev) = stream.next_timeout(Duration::from_secs(30)).await? else { break };
        println!("[{} p{} #{}] {}", ev.device_id(), ev.partition, ev.sequence_number, String::from_utf8_lossy(&ev.message().body));
        ev.ack();
        events += 1;
    }
    stream.checkpoint().await?; // acknowledged events are not read again by "monitor"
    stream.close().await;
    println!("received {events} events");
    svc.close().await;
    if let Some(mut d) = demo {
        d.stop_hub().await?;
    }
    std::process::exit(if events >= count { 0 } else { 1 });
}
