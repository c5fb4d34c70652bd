//! send_telemetry [count]: a device sends `count` telemetry readings (default 10) with
//! properties and counts their outcomes, then waits until all are delivered.
//!
//! HUBMSG_DEVICE_CONNECTION_STRING: the device to send as (else: demo mode with an embedded hub).
//! HUBMSG_OUTBOX_DIR: where the durable outbox lives (default: in the demo directory, or the
//!                    engine's default with a connection string).
//! HUBMSG_DURABILITY: always (default) | interval | never.
//!
//! `cargo run -p hubmsg-core --example send_telemetry -- 1000`

mod example;

use std::time::Duration;

use hubmsg_core::{DeviceClient, DeviceOptions, Message, Outcome};

#[tokio::main]
async fn main() -> hubmsg_core::Result<()> {
    let count: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let mut demo = None;
    let mut outbox_dir = std::env::var_os("HUBMSG_OUTBOX_DIR").map(std::path::PathBuf::from);
    let cs = match std::env::var("HUBMSG_DEVICE_CONNECTION_STRING") {
        Ok(cs) => cs,
        Err(_) => {
            let d = demo.insert(example::Demo::new()?);
            let hub = d.start().await?;
            hub.create_device("sensor-1").await?;
            let cs = hub.device_connection_string("sensor-1").await?;
            outbox_dir.get_or_insert(d.path("outbox"));
            cs
        }
    };
    let mut opts = DeviceOptions::from_connection_string(&cs)?;
    opts.outbox.dir = outbox_dir;
    opts.outbox.durability = std::env::var("HUBMSG_DURABILITY").as_deref().unwrap_or("always").parse()?;
    let dev = DeviceClient::connect(opts).await?;
    let mut deliveries = Vec::with_capacity(count);
    for i in 0..count {
        let body = format!("{{\"temperature\":{:.1},\"seq\":{i}}}", 20.0 + (i % 50) as f64 / 10.0);
        let msg = Message::new(body)
            .with_content("application/json", "utf-8")
            .with_property("unit", "celsius")
            .with_property("seq", i.to_string());
        deliveries.push(dev.send(msg).await?); // returns once durable in the outbox
    }
    dev.flush(Duration::from_secs(120)).await?;
    let mut delivered = 0;
    for d in deliveries {
        delivered += usize::from(d.outcome().await? == Outcome::Delivered);
    }
    let st = dev.stats();
    println!(
        "delivered {delivered} of {count} (outbox: {} delivered, {} pending; {} connects)",
        st.outbox.delivered, st.outbox.depth, st.connects
    );
    dev.close().await?;
    if let Some(mut d) = demo {
        d.stop_hub().await?;
    }
    std::process::exit(if delivered == count { 0 } else { 1 });
}
