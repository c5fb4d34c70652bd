//! receive_commands [count]: a device receives cloud-to-device commands with a timeout,
//! completes the ones it can execute and rejects the others, until `count` commands arrived
//! (default 5) or 30 s passed without one.
//!
//! HUBMSG_DEVICE_CONNECTION_STRING: the device (else: demo mode, where an embedded hub and a
//! service send the commands with feedback "full" and the outcomes are printed at the end).
//!
//! `cargo run -p hubmsg-core --example receive_commands -- 8`

mod example;

use std::time::Duration;

use hubmsg_core::outbox::OutboxOptions;
use hubmsg_core::proto::AckMode;
use hubmsg_core::service::{C2dOptions, ServiceClient};
use hubmsg_core::{DeviceClient, DeviceOptions, Message};

async fn send_commands(svc: &ServiceClient, count: usize) -> hubmsg_core::Result<()> {
    for i in 0..count {
        let body = if i % 4 == 3 { "self-destruct" } else { "open-valve" };
        let msg = Message::new(body).with_message_id(format!("cmd-{i}"));
        svc.send_c2d_with("valve-1", msg, C2dOptions { ack: AckMode::Full, ttl: Some(Duration::from_secs(60)) }).await?;
    }
    Ok(())
}

async fn print_feedback(svc: &ServiceClient, count: usize) -> hubmsg_core::Result<()> {
    let mut stream = svc.feedback()?;
    let mut seen = 0;
    while seen < count {
        let Some(batch) = stream.next_timeout(Duration::from_secs(30)).await? else { break };
        for r in &batch.records {
            println!("feedback: {} -> {}", r.original_message_id, r.description);
            seen += 1;
        }
        batch.ack();
    }
    Ok(())
}

#[tokio::main]
async fn main() -> hubmsg_core::Result<()> {
    let count: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let mut demo = None;
    let mut svc = None;
    let cs = match std::env::var("HUBMSG_DEVICE_CONNECTION_STRING") {
        Ok(cs) => cs,
        Err(_) => {
            let hub = demo.insert(example::Demo::new()?).start().await?;
            hub.create_device("valve-1").await?;
            let s = svc.insert(ServiceClient::from_connection_string(&hub.service_connection_string()).await?);
            send_commands(s, count).await?;
            hub.device_connection_string("valve-1").await?
        }
    };
    let mut opts = DeviceOptions::from_connection_string(&cs)?;
    opts.outbox = OutboxOptions::in_memory(); // it only receives
    let dev = DeviceClient::connect(opts).await?;
    let mut commands = dev.c2d()?;
    let mut received = 0;
    while received < count {
        let Some(cmd) = commands.recv_timeout(Duration::from_secs(30)).await? else {
            println!("no command for 30 s; stopping");
            break;
        };
        let known = cmd.message.body.as_ref() == b"open-valve";
        let id = cmd.message.message_id.clone().unwrap_or_default();
        println!("command {id}: {} -> {}", String::from_utf8_lossy(&cmd.message.body), if known { "complete" } else { "reject" });
        if known {
            cmd.complete()?;
        } else {
            cmd.reject()?;
        }
        received += 1;
    }
    println!("received {received} commands");
    if let Some(s) = &svc {
        print_feedback(s, received).await?;
        s.close().await;
    }
    dev.close().await?;
    if let Some(mut d) = demo {
        d.stop_hub().await?;
    }
    std::process::exit(if received == count { 0 } else { 1 });
}
