//! The baseline: the D2C throughput workload against Mosquitto (Debian's package, `persistence
//! true`) with rumqttc publishers and a subscriber, QoS 1, persistent sessions
//! (`clean_session=false`), the subscriber acknowledging every message. Mosquitto is installed
//! with apt-get when missing and the bench runs as root; otherwise the baseline is reported as
//! unavailable, with the reason.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hubmsg_core::{Error, ErrorKind};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::json;
use tokio::task::JoinSet;

use super::common::{body, parse_body, Stamp};
use super::d2c::{throughput_messages, Tally, ThroughputRun};
use super::plot::PlotData;
use super::stats;
use super::{Ctx, Outcome, Row, Scenario};

/// Finds the mosquitto binary.
fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain(["/usr/sbin".into(), "/usr/local/sbin".into()]).map(|d| d.join("mosquitto")).find(|p| p.is_file())
}

fn run_quiet(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.stdin(Stdio::null()).env("DEBIAN_FRONTEND", "noninteractive").output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let tail: Vec<&str> = text.lines().rev().take(3).collect();
    Err(format!("{cmd:?} failed ({}): {}", out.status, tail.into_iter().rev().collect::<Vec<_>>().join(" | ")))
}

/// The mosquitto binary, installing Debian's package when missing and running as root.
fn ensure_installed() -> Result<PathBuf, String> {
    if let Some(p) = find() {
        return Ok(p);
    }
    // SAFETY: geteuid has no memory effects.
    if unsafe { libc::geteuid() } != 0 {
        return Err("mosquitto is not installed and the bench is not running as root; install it with `apt-get install mosquitto`".into());
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        return Err("mosquitto is not installed and there is no apt-get to install it with".into());
    }
    println!("  installing mosquitto: apt-get update && apt-get install -y mosquitto");
    run_quiet(Command::new("apt-get").args(["update", "-q"]))?;
    run_quiet(Command::new("apt-get").args(["install", "-y", "-q", "mosquitto"]))?;
    find().ok_or_else(|| "apt-get installed mosquitto but no mosquitto binary was found".into())
}

/// A mosquitto process with its own config and persistence directory.
struct Broker {
    child: Child,
    port: u16,
    version: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The configuration the baseline runs with.
fn config(port: u16, dir: &Path, root: bool) -> String {
    let mut c = format!(
        "# written by hubmsg bench\n\
         listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         persistence true\n\
         persistence_location {}/\n\
         # as many unacknowledged deliveries per subscriber as a hubmsg consumer has per partition\n\
         max_inflight_messages 1000\n\
         # never drop queued QoS 1 messages of the persistent subscriber (every id is counted)\n\
         max_queued_messages 0\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n",
        dir.display()
    );
    if root {
        // Otherwise mosquitto drops to its own user, which cannot write the temp directory.
        c.push_str("user root\n");
    }
    c
}

async fn start(bin: &Path, dir: &Path, log: &Path) -> Result<Broker, Error> {
    let port = crate::hubproc::free_port()?;
    // SAFETY: geteuid has no memory effects.
    let root = unsafe { libc::geteuid() } == 0;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, config(port, dir, root)).map_err(|e| Error::storage(format!("write {}", conf.display()), e))?;
    let version = Command::new(bin)
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_default();
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::storage(format!("open {}", log.display()), e))?;
    let child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .map_err(|e| Error::new(ErrorKind::Internal, format!("cannot start {}: {e}", bin.display())))?;
    let mut broker = Broker { child, port, version };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(broker);
        }
        if let Ok(Some(st)) = broker.child.try_wait() {
            return Err(Error::new(ErrorKind::Internal, format!("mosquitto exited ({st}); see {}", log.display())));
        }
        if Instant::now() >= deadline {
            return Err(Error::new(ErrorKind::Timeout, "mosquitto did not listen within 10 s"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn mqtt_err(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Disconnected, format!("mosquitto baseline: {e}"))
}

/// Polls `el` until `done` says the wanted packet arrived.
async fn poll_until(el: &mut EventLoop, mut done: impl FnMut(&Packet) -> bool) -> Result<(), Error> {
    let fut = async {
        loop {
            if let Event::Incoming(p) = el.poll().await.map_err(mqtt_err)? {
                if done(&p) {
                    return Ok(());
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| Error::new(ErrorKind::Timeout, "mosquitto did not answer within 10 s"))?
}

fn options(id: String, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_clean_session(false).set_keep_alive(Duration::from_secs(30)).set_inflight(1000).set_manual_acks(true);
    o
}

/// Scenario 6.
pub async fn baseline(ctx: &Ctx, plots: &mut PlotData) -> Result<Outcome, Error> {
    let bin = match tokio::task::spawn_blocking(ensure_installed)
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("install task: {e}")))?
    {
        Ok(b) => b,
        Err(why) => return Ok(Outcome { unavailable: Some(why), ..Default::default() }),
    };
    let total = throughput_messages(ctx);
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    let mut version = String::new();
    for devices in [1usize, 100] {
        let dir = ctx.dir(&format!("mosquitto-{devices}"))?;
        let broker = start(&bin, &dir, &dir.join("mosquitto.log")).await?;
        version = broker.version.clone();
        let run = run(ctx, &broker, devices, total).await;
        drop(broker);
        let run = run?;
        println!("  {}", run.line());
        rows.push(
            Row::new(Scenario::Baseline, format!("Mosquitto, {}", run.label), stats::round(run.msgs_per_sec), "msg/s")
                .key(&format!("d2c-{devices}"))
                .other_cpu(run.cpu.rest_cores),
        );
        plots.add_throughput(&run);
        runs.push(run);
    }
    Ok(Outcome {
        rows,
        detail: json!({
            "broker": version,
            "config": config(0, Path::new("<temp dir>"), false),
            "clients": "rumqttc 0.24 AsyncClient, QoS 1, clean_session=false, inflight 1000; the subscriber (bench/#) acks every message manually",
            "note": "Mosquitto's persistence writes its in-memory database to disk every autosave_interval (default 1800 s) and at exit; its PUBACK does not wait for a disk write",
            "messages_per_run": total,
            "runs": runs,
        }),
        unavailable: None,
    })
}

async fn run(ctx: &Ctx, broker: &Broker, devices: usize, total: u64) -> Result<ThroughputRun, Error> {
    let per = total / devices as u64;
    let total = per * devices as u64;
    let (sub, mut sub_el) = AsyncClient::new(options(format!("bench-sub-{devices}"), broker.port), 200_000);
    sub.subscribe("bench/#", QoS::AtLeastOnce).await.map_err(mqtt_err)?;
    poll_until(&mut sub_el, |p| matches!(p, Packet::SubAck(_))).await?;
    let mut pubs = Vec::new();
    for d in 0..devices {
        let (client, mut el) = AsyncClient::new(options(format!("bench-pub-{d}"), broker.port), 1000);
        poll_until(&mut el, |p| matches!(p, Packet::ConnAck(_))).await?;
        pubs.push((client, el));
    }
    let mut tally = Tally::start(per, devices, broker.child.id());
    let mut tasks = JoinSet::new();
    for (d, (client, mut el)) in pubs.into_iter().enumerate() {
        let epoch = ctx.epoch;
        tasks.spawn(async move {
            let publisher = async {
                for seq in 0..per {
                    let sent_ns = epoch.elapsed().as_nanos() as u64;
                    let b = body(Stamp { sent_ns, device: d as u32, seq, scheduled_ns: 0 });
                    client.publish_bytes(format!("bench/{d}"), QoS::AtLeastOnce, false, b).await.map_err(mqtt_err)?;
                }
                Ok::<Instant, Error>(Instant::now())
            };
            let acks = async {
                let mut acked = 0;
                while acked < per {
                    if let Event::Incoming(Packet::PubAck(_)) = el.poll().await.map_err(mqtt_err)? {
                        acked += 1;
                    }
                }
                Ok::<(), Error>(())
            };
            let (accepted, ()) = tokio::try_join!(publisher, acks)?;
            let _ = client.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
            Ok::<Instant, Error>(accepted)
        });
    }
    let idle = Duration::from_secs(30);
    let mut ack_errors = 0u64;
    while !tally.tracker.complete() {
        tokio::select! {
            ev = tokio::time::timeout(idle, sub_el.poll()) => match ev {
                Err(_) => break,
                Ok(Err(e)) => return Err(mqtt_err(e)),
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                    let first = parse_body(&p.payload).is_some_and(|s| tally.tracker.record(s.device as usize, s.seq));
                    tally.arrived(first);
                    if sub.try_ack(&p).is_err() {
                        ack_errors += 1;
                    }
                }
                Ok(Ok(_)) => {}
            },
            Some(j) = tasks.join_next(), if !tasks.is_empty() => tally.sender_done(j)?,
        }
    }
    let label = format!("{} device{}, persistence true", devices, if devices == 1 { "" } else { "s" });
    let run = tally.stop(&mut tasks, "Mosquitto", label, "persistence true (periodic snapshot)".into()).await;
    let _ = sub.disconnect().await;
    if run.counts.missing > 0 || ack_errors > 0 {
        return Err(Error::new(
            ErrorKind::Internal,
            format!(
                "mosquitto baseline: {} of {total} messages never reached the subscriber ({ack_errors} acks not queued)",
                run.counts.missing
            ),
        ));
    }
    Ok(run)
}
