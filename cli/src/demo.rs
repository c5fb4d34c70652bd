//! `hubmsg demo`: the whole promise in one command. A hub runs as a child process (so it can be
//! SIGKILLed and restarted mid-run); simulated devices reach it through a fault-injecting TCP
//! link (cuts, stalls and latency: `hubmsg_cli::chaos`); a service consumes the D2C events with a consumer group
//! of two members and sends C2D commands with `ack=full` that the devices complete, reject or
//! abandon. At the end an accounting table shows what was sent, delivered, duplicated and lost
//! in each direction; the exit status is 0 only when nothing was lost.
//!
//! `--backend nats` runs two hub nodes over a local 3-node JetStream cluster it starts from the
//! installed `nats-server` (free loopback ports, stopped at the end; `--backend nats://…` uses a
//! cluster you run). The link balances devices over the live nodes; one NATS node is SIGKILLed
//! and restarted and one hub node is SIGKILLed for good mid-run, so its devices reconnect to the
//! other node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hubmsg_cli::chaos::{ChaosLink, Faults, Rng};
use hubmsg_core::outbox::OutboxOptions;
use hubmsg_core::proto::{AckMode, FeedbackStatus, StartPosition};
use hubmsg_core::retry::RetryPolicy;
use hubmsg_core::service::{C2dOptions, ServiceClient, ServiceOptions};
use hubmsg_core::{DeviceClient, DeviceOptions, Error, ErrorKind, Message};
use parking_lot::Mutex;

use crate::hubproc::{self, HubProcess};

/// Options of `hubmsg demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 20)]
    devices: usize,
    /// How long devices and the service send (draining afterwards takes a few seconds more).
    #[arg(long, default_value = "30s", value_parser = crate::parse_duration)]
    duration: Duration,
    /// Seed of the chaos (disconnects, stalls, device decisions); random when not given.
    #[arg(long)]
    seed: Option<u64>,
    /// D2C messages per device per second.
    #[arg(long, default_value_t = 50)]
    rate: u64,
    /// `embedded` (one hub process), `nats` (two hub nodes over a local 3-node JetStream
    /// cluster started from the installed nats-server) or `nats://HOST:PORT[,…]` (two hub nodes
    /// over that cluster).
    #[arg(long, default_value = "embedded")]
    backend: String,
}

#[derive(Default)]
struct Counters {
    d2c_sent: AtomicU64,
    /// Ids of every D2C message whose send returned (durable in an outbox).
    d2c_ids: Mutex<Vec<String>>,
    c2d_sent: AtomicU64,
    c2d_completed: AtomicU64,
    c2d_rejected: AtomicU64,
    c2d_abandoned: AtomicU64,
}

fn retry() -> RetryPolicy {
    RetryPolicy {
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(2),
        jitter: Duration::from_millis(100),
        healthy_after: Duration::from_secs(2),
        ..RetryPolicy::default()
    }
}

/// Connections the devices made beyond their first one (each a recovery from a cut, a stall
/// past keep-alive, or the hub restart).
fn reconnects(devices: &[DeviceClient]) -> u64 {
    devices.iter().map(|d| d.stats().connects.saturating_sub(1)).sum()
}

/// Runs the demo.
pub async fn run(a: DemoArgs) -> Result<(), Error> {
    let seed =
        a.seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64));
    let dir = tempfile::tempdir().map_err(|e| Error::storage("create a temporary directory", e))?;
    let mut cluster = Cluster::for_backend(&a.backend).await?;
    let nodes = if cluster.is_some() { 2 } else { 1 };
    let mut hub_ports = Vec::new();
    for _ in 0..nodes {
        hub_ports.push(hubproc::free_port()?);
    }
    // Services reach the nodes through a plain balancer, devices through the chaos link (cuts
    // after 1-6 s, half the connections stall once, half with latency), both round robin over
    // the live nodes; tokens may name either, the hub's public addresses.
    let targets: Vec<std::net::SocketAddr> = hub_ports.iter().map(|p| ([127, 0, 0, 1], *p).into()).collect();
    let link = ChaosLink::start(targets.clone(), seed, Faults::default()).await?;
    let balance = ChaosLink::start(targets, seed, Faults::NONE).await?;
    let (proxy_port, lb_port) = (link.port(), balance.port());
    let mut hub_args: Vec<String> = ["--feedback-interval", "200ms", "--public-address", &format!("127.0.0.1:{lb_port}")]
        .into_iter()
        .chain(["--public-address", &format!("127.0.0.1:{proxy_port}")])
        .map(String::from)
        .collect();
    if let Some(c) = &cluster {
        hub_args.extend(["--backend".to_string(), c.urls(), "--replicas".into(), c.replicas().to_string()]);
        hub_args.extend(["--retention-bytes", "67108864", "--lease-ttl", "3s"].map(String::from));
    }
    let data = |i: usize| dir.path().join(format!("hub{i}"));
    let mut hubs = Vec::new();
    for (i, port) in hub_ports.iter().enumerate() {
        hubs.push(HubProcess::start(&data(i), *port, &hub_args, None).await?);
    }
    match &cluster {
        None => println!("hubmsg demo: hub process on 127.0.0.1:{}, {} devices behind a chaos link on :{proxy_port}, seed {seed}", hub_ports[0], a.devices),
        Some(c) => println!(
            "hubmsg demo: 2 hub nodes on 127.0.0.1:{} and :{} over JetStream ({}), {} devices behind a chaos link on :{proxy_port}, seed {seed}",
            hub_ports[0],
            hub_ports[1],
            c.describe(),
            a.devices
        ),
    }

    let c = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));

    let mut sopts = ServiceOptions::from_connection_string(&hubs[0].cs)?;
    sopts.retry = retry();
    let svc = ServiceClient::connect(sopts.clone()).await?;

    // A consumer group of two members: every D2C message id and how often it arrived.
    let d2c_seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let member = ServiceClient::connect(sopts.clone()).await?;
        let mut events = member.events("$Default", StartPosition::Earliest).await?;
        let seen = d2c_seen.clone();
        consumers.push(tokio::spawn(async move {
            while let Some(Ok(ev)) = events.next().await {
                *seen.lock().entry(ev.message_id().unwrap_or_default().to_string()).or_default() += 1;
                ev.ack();
            }
        }));
    }
    // Feedback: message id → final status.
    let feedback: Arc<Mutex<HashMap<String, FeedbackStatus>>> = Arc::default();
    let mut fb = svc.feedback()?;
    {
        let feedback = feedback.clone();
        tokio::spawn(async move {
            while let Some(b) = fb.next().await {
                let mut f = feedback.lock();
                for r in &b.records {
                    f.insert(r.original_message_id.clone(), r.status_code);
                }
                drop(f);
                b.ack();
            }
        });
    }

    // Devices.
    let mut devices = Vec::new();
    // Senders (telemetry, C2D commands) stop at the drain; receivers run to the end.
    let mut tasks = Vec::new();
    let mut receivers = Vec::new();
    for d in 0..a.devices {
        let id = format!("demo-{d:03}");
        let ident = svc.create_device(&id).await?;
        let cs = svc.device_connection_string(&ident).replace(&format!(":{lb_port}"), &format!(":{proxy_port}"));
        let mut o = DeviceOptions::from_connection_string(&cs)?;
        o.retry = retry();
        o.keep_alive = Duration::from_secs(5);
        o.outbox = OutboxOptions { dir: Some(dir.path().join("devices").join(&id)), ..OutboxOptions::default() };
        let dev = DeviceClient::connect(o).await?;
        // C2D: complete 80 %, reject 10 %, abandon 10 % — decided by the seed.
        let mut rx = dev.c2d()?;
        let (c2, mut rng) = (c.clone(), Rng(seed ^ ((d as u64 + 1) * 7919)));
        receivers.push(tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let r = match rng.below(10) {
                    0 => {
                        c2.c2d_rejected.fetch_add(1, Ordering::Relaxed);
                        m.reject()
                    }
                    1 => {
                        c2.c2d_abandoned.fetch_add(1, Ordering::Relaxed);
                        m.abandon()
                    }
                    _ => {
                        c2.c2d_completed.fetch_add(1, Ordering::Relaxed);
                        m.complete()
                    }
                };
                if r.is_err() {
                    break;
                }
            }
        }));
        // Telemetry at `rate` per second in batches of 10.
        let (dev2, c3, stop2, rate) = (dev.clone(), c.clone(), stop.clone(), a.rate.max(1));
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis((10_000 / rate).max(1)));
            while !stop2.load(Ordering::Relaxed) {
                tick.tick().await;
                let batch: Vec<Message> = (i..i + 10)
                    .map(|k| {
                        Message::new(format!("{{\"t\":{}}}", 20 + k % 7))
                            .with_message_id(format!("{id}/{k}"))
                            .with_property("kind", "telemetry")
                    })
                    .collect();
                match dev2.send_batch(batch).await {
                    Ok(ds) => {
                        c3.d2c_sent.fetch_add(ds.len() as u64, Ordering::Relaxed);
                        c3.d2c_ids.lock().extend(ds.into_iter().map(|d| d.message_id));
                        i += 10;
                    }
                    Err(e) if e.kind() == ErrorKind::QueueFull => {}
                    Err(e) => {
                        eprintln!("device {id}: {e}");
                        break;
                    }
                }
            }
        }));
        devices.push(dev);
    }

    // C2D commands: 20 per second to random devices, ack=full, TTL 20 s.
    let c2d_ids: Arc<Mutex<Vec<String>>> = Arc::default();
    {
        let (svc, c, stop, ids, n) = (svc.clone(), c.clone(), stop.clone(), c2d_ids.clone(), a.devices.max(1) as u64);
        let mut rng = Rng(seed.rotate_left(17));
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let target = format!("demo-{:03}", rng.below(n));
                let id = format!("cmd-{k}");
                k += 1;
                let msg = Message::new(format!("{{\"setpoint\":{}}}", rng.below(100))).with_message_id(id.clone());
                let opts = C2dOptions { ack: AckMode::Full, ttl: Some(Duration::from_secs(20)) };
                if svc.send_c2d_with(&target, msg, opts).await.is_ok() {
                    ids.lock().push(id);
                    c.c2d_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    // Live progress. Embedded: the hub is SIGKILLed and restarted once half-way. JetStream: a
    // NATS node is SIGKILLed (and restarted) at a third, a hub node for good at two thirds.
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(indicatif::ProgressStyle::with_template("{spinner} {elapsed:>3} {msg}").expect("template"));
    bar.enable_steady_tick(Duration::from_millis(120));
    let started = Instant::now();
    let mut killed = false;
    let mut nats_killed = false;
    let mut nats_restarted = false;
    let status = |note: &str| {
        let fbn = feedback.lock().len();
        format!(
            "D2C sent {} delivered {} | C2D sent {} completed {} feedback {} | reconnects {} | link cuts {} stalls {} | {note}",
            c.d2c_sent.load(Ordering::Relaxed),
            d2c_seen.lock().len(),
            c.c2d_sent.load(Ordering::Relaxed),
            c.c2d_completed.load(Ordering::Relaxed),
            fbn,
            reconnects(&devices),
            link.stats().cuts.load(Ordering::Relaxed),
            link.stats().stalls.load(Ordering::Relaxed),
        )
    };
    while started.elapsed() < a.duration {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = started.elapsed().as_secs_f64();
        match &mut cluster {
            None if !killed && started.elapsed() >= a.duration / 2 => {
                killed = true;
                hubs[0].kill(); // SIGKILL
                bar.println(format!("{t:>5.1}s  hub process SIGKILLed; restarting it on the same data"));
                tokio::time::sleep(Duration::from_millis(500)).await;
                hubs[0] = HubProcess::start(&data(0), hub_ports[0], &hub_args, None).await?;
            }
            Some(cl) if !nats_killed && started.elapsed() >= a.duration / 3 => {
                nats_killed = true;
                if let Some(name) = cl.kill_one().await? {
                    bar.println(format!("{t:>5.1}s  NATS node {name} SIGKILLed"));
                }
            }
            Some(cl) if nats_killed && !nats_restarted && started.elapsed() >= a.duration / 3 + Duration::from_secs(2) => {
                nats_restarted = true;
                if let Some(name) = cl.restart_killed().await? {
                    bar.println(format!("{t:>5.1}s  NATS node {name} restarted"));
                }
            }
            Some(_) if !killed && started.elapsed() >= a.duration * 2 / 3 => {
                killed = true;
                hubs[0].kill(); // SIGKILL, for good: its devices reconnect to the other node
                bar.println(format!("{t:>5.1}s  hub node 1 (:{}) SIGKILLed; its devices move to hub node 2", hub_ports[0]));
            }
            _ => {}
        }
        bar.set_message(status("running"));
    }

    // Drain: stop sending (and wait for the senders), deliver what devices hold, wait for the
    // consumer and the feedback.
    stop.store(true, Ordering::Relaxed);
    link.calm();
    bar.set_message(status("draining"));
    for t in tasks.drain(..) {
        if !t.is_finished() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
    // Every device flushes at once, under one deadline.
    let flushes: Vec<_> = devices
        .iter()
        .map(|d| {
            let d = d.clone();
            tokio::spawn(async move { d.flush(Duration::from_secs(60)).await })
        })
        .collect();
    while !flushes.iter().all(|f| f.is_finished()) {
        bar.set_message(status("draining: devices flushing their outboxes"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sent_d2c = c.d2c_sent.load(Ordering::Relaxed) as usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let c2d_done = {
            let f = feedback.lock();
            c2d_ids.lock().iter().all(|id| f.contains_key(id))
        };
        let d2c_done = {
            let seen = d2c_seen.lock();
            c.d2c_ids.lock().iter().all(|id| seen.contains_key(id))
        };
        if d2c_done && c2d_done {
            break;
        }
        bar.set_message(status("draining"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();

    let (received, duplicates, d2c_lost) = {
        let s = d2c_seen.lock();
        let ids = c.d2c_ids.lock();
        let missing: Vec<&String> = ids.iter().filter(|id| !s.contains_key(*id)).collect();
        if !missing.is_empty() {
            eprintln!("missing D2C ids (first 10): {:?}", &missing[..missing.len().min(10)]);
            for dev in devices
                .iter()
                .filter(|d| d.stats().outbox.depth != 0 || missing.iter().any(|m| m.starts_with(&format!("{}/", d.device_id()))))
            {
                eprintln!("  {}: status {:?}, {:?}", dev.device_id(), dev.status(), dev.stats());
            }
        }
        (ids.len() - missing.len(), s.values().map(|c| u64::from(c.saturating_sub(1))).sum::<u64>(), missing.len())
    };
    // A message still in a device outbox is not lost (it is durable and will be delivered), but
    // it was not delivered before the deadline: both make the demo fail.
    let d2c_queued: usize = devices.iter().map(|d| d.stats().outbox.depth).sum();
    let d2c_lost = d2c_lost.saturating_sub(d2c_queued);
    let (fb_total, by_status, c2d_lost, c2d_sent) = {
        let f = feedback.lock();
        let ids = c2d_ids.lock();
        let mut by: HashMap<FeedbackStatus, u64> = HashMap::new();
        for id in ids.iter() {
            if let Some(s) = f.get(id) {
                *by.entry(*s).or_default() += 1;
            }
        }
        let lost = ids.iter().filter(|id| !f.contains_key(*id)).count();
        (ids.len() - lost, by, lost, ids.len())
    };
    let n = |s: FeedbackStatus| by_status.get(&s).copied().unwrap_or(0);
    println!();
    println!("{:<36}{:>10}", "D2C (device → cloud)", "messages");
    println!("{:<36}{:>10}", "  sent (durable in device outboxes)", sent_d2c);
    println!("{:<36}{:>10}", "  delivered to the consumer group", received);
    println!("{:<36}{:>10}", "  duplicates (same message id)", duplicates);
    println!("{:<36}{:>10}", "  still queued in outboxes (late)", d2c_queued);
    println!("{:<36}{:>10}", "  LOST", d2c_lost);
    println!("{:<36}{:>10}", "C2D (cloud → device), ack=full", "messages");
    println!("{:<36}{:>10}", "  sent (durable at the hub)", c2d_sent);
    println!("{:<36}{:>10}", "  completed (feedback Success)", n(FeedbackStatus::Success));
    println!("{:<36}{:>10}", "  rejected", n(FeedbackStatus::Rejected));
    println!("{:<36}{:>10}", "  dead-lettered (count/expired)", n(FeedbackStatus::DeliveryCountExceeded) + n(FeedbackStatus::Expired));
    println!("{:<36}{:>10}", "  abandons (redelivered)", c.c2d_abandoned.load(Ordering::Relaxed));
    println!("{:<36}{:>10}", "  feedback received", fb_total);
    println!("{:<36}{:>10}", "  LOST", c2d_lost);
    println!("{:<36}{:>10}", "chaos", "");
    println!("{:<36}{:>10}", "  device reconnects", reconnects(&devices));
    let (_, cuts, stalls, delayed) = link.stats().snapshot();
    println!("{:<36}{:>10}", "  link cuts", cuts);
    println!("{:<36}{:>10}", "  link stalls", stalls);
    println!("{:<36}{:>10}", "  connections with latency", delayed);
    match &cluster {
        None => println!("{:<36}{:>10}", "  hub SIGKILL + restart", 1),
        Some(cl) => {
            println!("{:<36}{:>10}", "  NATS node SIGKILL + restart", if cl.local() { "1" } else { "n/a" });
            println!("{:<36}{:>10}", "  hub node SIGKILL (devices moved)", 1);
        }
    }
    for dev in &devices {
        let _ = dev.close().await;
    }
    svc.close().await;
    drop((link, balance));
    for r in receivers.into_iter().chain(consumers) {
        r.abort();
    }
    drop(hubs);
    if let Some(cl) = cluster {
        cl.stop().await;
    }
    if d2c_lost + c2d_lost > 0 {
        return Err(Error::new(ErrorKind::Internal, format!("{d2c_lost} D2C and {c2d_lost} C2D messages were lost (seed {seed})")));
    }
    if d2c_queued > 0 {
        return Err(Error::new(
            ErrorKind::Timeout,
            format!("nothing was lost, but {d2c_queued} D2C messages were still queued in device outboxes at the end of the drain (seed {seed})"),
        ));
    }
    println!("nothing lost.");
    Ok(())
}

/// The JetStream cluster of `--backend nats…`: a local one this demo started (and can kill a
/// node of), or one given by URL.
enum Cluster {
    #[cfg(feature = "nats")]
    Local(hubmsg_nats::cluster::Cluster, Option<usize>),
    Remote(String),
}

impl Cluster {
    /// `embedded` → none; `nats` → a local 3-node cluster; `nats://…` → that cluster.
    async fn for_backend(spec: &str) -> Result<Option<Cluster>, Error> {
        match spec {
            "embedded" => Ok(None),
            "nats" => {
                #[cfg(feature = "nats")]
                {
                    let c = hubmsg_nats::cluster::Cluster::start(3, Duration::from_secs(30)).await?;
                    Ok(Some(Cluster::Local(c, None)))
                }
                #[cfg(not(feature = "nats"))]
                Err(Error::invalid("this hubmsg was built without the NATS backend (cargo feature `nats` of hubmsg-cli)"))
            }
            s if s.starts_with("nats://") => Ok(Some(Cluster::Remote(s.to_string()))),
            s => Err(Error::invalid(format!("--backend '{s}' is not embedded, nats or nats://HOST:PORT[,…]"))),
        }
    }

    fn urls(&self) -> String {
        match self {
            #[cfg(feature = "nats")]
            Cluster::Local(c, _) => c.urls(),
            Cluster::Remote(u) => u.clone(),
        }
    }

    fn replicas(&self) -> usize {
        match self {
            #[cfg(feature = "nats")]
            Cluster::Local(..) => 3,
            Cluster::Remote(u) => u.split(',').count().min(3),
        }
    }

    fn local(&self) -> bool {
        !matches!(self, Cluster::Remote(_))
    }

    fn describe(&self) -> String {
        match self {
            #[cfg(feature = "nats")]
            Cluster::Local(c, _) => format!("a local 3-node nats-server cluster on {}", c.urls()),
            Cluster::Remote(u) => u.clone(),
        }
    }

    /// SIGKILLs one node of a local cluster; its name.
    async fn kill_one(&mut self) -> Result<Option<String>, Error> {
        match self {
            #[cfg(feature = "nats")]
            Cluster::Local(c, killed) => {
                c.kill(0).await?;
                *killed = Some(0);
                Ok(Some(c.nodes()[0].name.clone()))
            }
            Cluster::Remote(_) => Ok(None),
        }
    }

    /// Restarts the node [`Cluster::kill_one`] killed; its name.
    async fn restart_killed(&mut self) -> Result<Option<String>, Error> {
        match self {
            #[cfg(feature = "nats")]
            Cluster::Local(c, killed) => match killed.take() {
                Some(i) => {
                    c.restart(i, Duration::from_secs(30)).await?;
                    Ok(Some(c.nodes()[i].name.clone()))
                }
                None => Ok(None),
            },
            Cluster::Remote(_) => Ok(None),
        }
    }

    async fn stop(self) {
        match self {
            #[cfg(feature = "nats")]
            Cluster::Local(c, _) => c.stop().await,
            Cluster::Remote(_) => {}
        }
    }
}
