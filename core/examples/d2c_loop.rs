//! An in-process D2C loop for profiling (`perf record`, callgrind): an embedded hub, N devices
//! sending 256-byte messages in batches with many outstanding, and one consumer-group reader
//! acknowledging every event. Prints messages/s delivered to the consumer.
//!
//! `cargo run --release -p hubmsg-core --example d2c_loop -- [devices] [messages] [always|never] [senders per device]`

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hubmsg_core::hub::{Hub, HubConfig};
use hubmsg_core::outbox::OutboxOptions;
use hubmsg_core::proto::StartPosition;
use hubmsg_core::service::{ServiceClient, ServiceOptions};
use hubmsg_core::store::Durability;
use hubmsg_core::{DeviceClient, DeviceOptions, Message};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let devices: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let total: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let durability: Durability = args.get(3).map_or("always", String::as_str).parse().unwrap();
    let senders: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(if devices == 1 { 8 } else { 1 });
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HubConfig::new(dir.path().join("hub"));
    cfg.durability = durability;
    if let Some(b) = std::env::var("SEGMENT_BYTES").ok().and_then(|s| s.parse().ok()) {
        cfg.segment_bytes = b;
    }
    let hub = Hub::start(cfg).await.unwrap();
    let svc = ServiceClient::connect(ServiceOptions::from_connection_string(&hub.service_connection_string()).unwrap()).await.unwrap();
    let mut events = svc.events("$Default", StartPosition::Earliest).await.unwrap();
    let per = total / devices;
    let mut clients = Vec::new();
    for d in 0..devices {
        let id = format!("dev-{d}");
        hub.create_device(&id).await.unwrap();
        let mut o = DeviceOptions::from_connection_string(&hub.device_connection_string(&id).await.unwrap()).unwrap();
        o.outbox = OutboxOptions {
            dir: Some(dir.path().join("dev").join(&id)),
            durability,
            max_messages: 1_000_000,
            max_bytes: 1 << 30,
            ..OutboxOptions::default()
        };
        clients.push(DeviceClient::connect(o).await.unwrap());
    }
    let body = Arc::new(vec![b'x'; 256]);
    let started = Instant::now();
    for (d, c) in clients.iter().enumerate() {
        for t in 0..senders {
            let c = c.clone();
            let body = body.clone();
            let mine: Vec<usize> = (0..per).filter(|k| k % senders == t).collect();
            tokio::spawn(async move {
                for chunk in mine.chunks(100) {
                    let batch: Vec<Message> =
                        chunk.iter().map(|k| Message::new(body.as_slice().to_vec()).with_message_id(format!("{d}/{k}"))).collect();
                    c.send_batch(batch).await.unwrap();
                }
            });
        }
    }
    let mut seen = HashSet::with_capacity(per * devices);
    while seen.len() < per * devices {
        let Some(ev) = events.next_timeout(Duration::from_secs(10)).await.unwrap() else {
            for c in &clients {
                eprintln!("{}: {:?}", c.device_id(), c.stats());
            }
            let st = hub.stats();
            eprintln!(
                "hub: d2c {} delivered {} open {}; consumer saw {}",
                st.d2c_messages.load(std::sync::atomic::Ordering::Relaxed),
                st.events_delivered.load(std::sync::atomic::Ordering::Relaxed),
                st.open_connections.load(std::sync::atomic::Ordering::Relaxed),
                seen.len()
            );
            std::process::exit(1);
        };
        seen.insert(ev.message_id().unwrap().to_string());
        ev.ack();
    }
    let secs = started.elapsed().as_secs_f64();
    let n = (per * devices) as f64;
    println!(
        "{devices} devices, {n} messages, durability {durability:?}: {:.0} msg/s ({secs:.2} s), CPU {:.1} µs/msg",
        n / secs,
        cpu_secs() * 1e6 / n
    );
    for c in &clients {
        c.close().await.unwrap();
    }
}

/// User + system CPU time of this process so far (a steadier figure than wall time on a busy
/// machine).
fn cpu_secs() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}
