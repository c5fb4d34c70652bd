//! The chaos soak: device, hub and service run as real `hubmsg` processes for minutes while a
//! supervisor SIGKILLs one of them about every second (the hub included) and every client
//! connection goes through a link that cuts, stalls and delays (`hubmsg_cli::chaos`; `tc netem`
//! is not available here). Then the link calms down, the senders are stopped and their outboxes
//! flushed, and the books are closed:
//!
//! - D2C: every message a `hubmsg device send` printed as accepted (durable in its outbox)
//!   reached the consumer group (`hubmsg monitor-events --json`, which prints before it acks);
//! - C2D: every command a `hubmsg c2d send` printed a receipt for (durable at the hub, ack=full)
//!   reached an outcome reported by feedback (`hubmsg monitor-feedback`): completed, rejected,
//!   dead-lettered or expired — and a `Success` or `Rejected` outcome only for a command a
//!   `hubmsg device receive` printed (before settling) with that action.
//!
//! It reports kills per process kind, link faults, reconnects and duplicates in each direction.
//! `HUBMSG_SOAK_SECONDS` sets the chaos phase (default 120; at least 100 kills per 120 s are
//! required), `HUBMSG_SOAK_SEED` the seed. Run by the soak layer of `tests/all.sh`:
//! `cargo test -p hubmsg-cli --test soak -- --ignored --nocapture`.

mod common;

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hubmsg_cli::chaos::{ChaosLink, Faults, Rng};
use parking_lot::Mutex;

const SENDERS: usize = 3;
const RECEIVERS: usize = 2;
/// Kills per 120 s of chaos that the run must reach.
const KILLS_PER_120S: u64 = 100;

/// What the processes printed, as the test reads it from their stdout.
#[derive(Default)]
struct Books {
    /// D2C message ids accepted by a sender (durable in its outbox).
    d2c_accepted: HashSet<String>,
    /// D2C message id → times the consumer printed it.
    d2c_consumed: HashMap<String, u32>,
    /// D2C message id → (partition, sequence number) of each stored copy → times printed: a
    /// copy printed again is a redelivery of one stored event (the consumer or the hub
    /// restarted before the group's checkpoint covered it); a second copy is a re-send the hub
    /// stored again (the device did not get its PUBACK and the hub did not recognise the id).
    d2c_copies: HashMap<String, HashMap<(u64, u64), u32>>,
    /// C2D message ids the hub accepted (a receipt was printed).
    c2d_accepted: HashSet<String>,
    /// C2D message id → actions the device app took on each delivery it printed.
    c2d_seen: HashMap<String, Vec<String>>,
    /// C2D message id → feedback status codes printed.
    feedback: HashMap<String, Vec<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Hub,
    Sender(usize),
    Receiver(usize),
    Consumer,
    Feedback,
    C2dSender(usize),
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Hub => "hub",
            Kind::Sender(_) => "device send",
            Kind::Receiver(_) => "device receive",
            Kind::Consumer => "monitor-events",
            Kind::Feedback => "monitor-feedback",
            Kind::C2dSender(_) => "c2d send",
        }
    }

    /// Relative chance of being the next one killed.
    fn weight(self) -> u64 {
        match self {
            Kind::Hub => 12,
            Kind::Sender(_) => 9,
            Kind::Receiver(_) => 8,
            Kind::Consumer => 15,
            Kind::Feedback => 10,
            Kind::C2dSender(_) => 10,
        }
    }
}

/// One supervised process kind and instance.
struct Role {
    kind: Kind,
    child: Option<Child>,
    /// Incarnation number (part of the message ids it sends, so no two share an id).
    generation: u64,
    restart_at: Option<Instant>,
    starts: u64,
    kills: u64,
    exits: u64,
}

/// Everything a process needs to know about the run.
struct Env {
    dir: PathBuf,
    /// Owner connection string through the link.
    owner_cs: String,
    /// Device connection strings through the link, by device id.
    device_cs: HashMap<String, String>,
    books: Arc<Mutex<Books>>,
}

impl Env {
    fn log(&self, kind: Kind) -> Stdio {
        let name = match kind {
            Kind::Sender(k) | Kind::Receiver(k) | Kind::C2dSender(k) => format!("{}-{k}.log", kind.label().replace(' ', "-")),
            _ => format!("{}.log", kind.label()),
        };
        Stdio::from(OpenOptions::new().create(true).append(true).open(self.dir.join(name)).unwrap())
    }
}

fn sender_id(k: usize) -> String {
    format!("soak-d{k}")
}

fn receiver_id(k: usize) -> String {
    format!("soak-r{k}")
}

/// Spawns a `hubmsg` client process whose stdout lines go to `on_line` (on a reader thread).
fn spawn_client(env: &Env, kind: Kind, args: &[String], cs_env: (&str, &str), mut on_line: impl FnMut(&str) + Send + 'static) -> Child {
    let mut child = Command::new(BIN)
        .arg("--retry-max-delay")
        .arg("1s")
        .args(args)
        .env(cs_env.0, cs_env.1)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(env.log(kind))
        .spawn()
        .expect("spawn a hubmsg client");
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            on_line(&line);
        }
    });
    child
}

fn json(line: &str) -> Option<serde_json::Value> {
    serde_json::from_str(line).ok()
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Starts the process of `kind` (not the hub) for its `generation`.
fn start(env: &Env, kind: Kind, generation: u64) -> Child {
    let books = env.books.clone();
    let dir = env.dir.display().to_string();
    match kind {
        Kind::Hub => unreachable!("the hub is started by spawn_hub_with"),
        Kind::Sender(k) => {
            let id = sender_id(k);
            let mut args = s(&["device", "send", "--data", "reading {i}", "--print-accepted", "--batch", "5", "--rate", "20"]);
            args.extend(s(&["--count", "1000000000", "--flush-timeout-secs", "300"]));
            args.extend(["--outbox".into(), format!("{dir}/outbox-{id}"), "--message-id-prefix".into(), format!("{id}-g{generation}-")]);
            spawn_client(env, kind, &args, ("HUBMSG_DEVICE_CONNECTION_STRING", &env.device_cs[&id]), move |line| {
                if let Some(id) = line.strip_prefix("accepted ") {
                    books.lock().d2c_accepted.insert(id.to_string());
                }
            })
        }
        Kind::Receiver(k) => {
            let id = receiver_id(k);
            let mut args = s(&["device", "receive", "--reject-percent", "10", "--abandon-percent", "10"]);
            args.extend(["--outbox".into(), format!("{dir}/state-{id}")]);
            spawn_client(env, kind, &args, ("HUBMSG_DEVICE_CONNECTION_STRING", &env.device_cs[&id]), move |line| {
                if let Some(v) = json(line) {
                    let (Some(mid), Some(action)) = (v["messageId"].as_str(), v["action"].as_str()) else { return };
                    books.lock().c2d_seen.entry(mid.to_string()).or_default().push(action.to_string());
                }
            })
        }
        Kind::Consumer => {
            let args = s(&["monitor-events", "--json", "--consumer-group", "soak"]);
            spawn_client(env, kind, &args, ("HUBMSG_HUB_CONNECTION_STRING", &env.owner_cs), move |line| {
                let Some(v) = json(line) else { return };
                if let Some(mid) = v["systemProperties"]["messageId"].as_str().map(str::to_string) {
                    let at = (v["partition"].as_u64().unwrap_or(u64::MAX), v["sequenceNumber"].as_u64().unwrap_or(u64::MAX));
                    let mut b = books.lock();
                    *b.d2c_copies.entry(mid.clone()).or_default().entry(at).or_default() += 1;
                    *b.d2c_consumed.entry(mid).or_default() += 1;
                }
            })
        }
        Kind::Feedback => {
            let args = s(&["monitor-feedback"]);
            spawn_client(env, kind, &args, ("HUBMSG_HUB_CONNECTION_STRING", &env.owner_cs), move |line| {
                if let Some(v) = json(line) {
                    let (Some(mid), Some(status)) = (v["originalMessageId"].as_str(), v["statusCode"].as_str()) else { return };
                    books.lock().feedback.entry(mid.to_string()).or_default().push(status.to_string());
                }
            })
        }
        Kind::C2dSender(k) => {
            let id = receiver_id(k);
            let mut args = s(&["c2d", "send", "--data", "setpoint {i}", "--ack", "full", "--ttl", "30s", "--rate", "3"]);
            args.extend(s(&["--count", "1000000000", "--device-id", &id]));
            args.extend(["--message-id".into(), format!("{id}-g{generation}-{{i}}")]);
            spawn_client(env, kind, &args, ("HUBMSG_HUB_CONNECTION_STRING", &env.owner_cs), move |line| {
                if let Some(mid) = json(line).and_then(|v| v["messageId"].as_str().map(str::to_string)) {
                    books.lock().c2d_accepted.insert(mid);
                }
            })
        }
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn print_tails(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(8).collect();
            eprintln!("--- {} (last lines)", p.display());
            for l in tail.iter().rev() {
                eprintln!("    {l}");
            }
        }
    }
}

#[test]
#[ignore = "minutes long: run by the soak layer of tests/all.sh (cargo test -p hubmsg-cli --test soak -- --ignored --nocapture)"]
fn chaos_soak_loses_nothing_in_either_direction() {
    let seconds = env_u64("HUBMSG_SOAK_SECONDS").unwrap_or(120).max(10);
    let seed = env_u64("HUBMSG_SOAK_SEED")
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64));
    eprintln!("soak: {seconds} s of chaos, seed {seed} (HUBMSG_SOAK_SECONDS, HUBMSG_SOAK_SEED)");
    let mut rng = Rng(seed);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let port = free_port();
    let link = rt.block_on(ChaosLink::start(vec![([127, 0, 0, 1], port).into()], seed, Faults::default())).unwrap();
    let alias = format!("127.0.0.1:{}", link.port());
    let hub_args = s(&["--feedback-interval", "200ms", "--public-address", &alias]);
    let data = dir.join("hub");
    let hub_log = |dir: &Path| Stdio::from(OpenOptions::new().create(true).append(true).open(dir.join("hub.log")).unwrap());
    let mut hub = spawn_hub_with(&data, port, &hub_args, hub_log(&dir));
    let through_link = |cs: &str| cs.replace(&format!("127.0.0.1:{port}"), &alias);
    let mut device_cs = HashMap::new();
    for id in (0..SENDERS).map(sender_id).chain((0..RECEIVERS).map(receiver_id)) {
        let cs = create_device(&rt, &hub.cs, &id);
        device_cs.insert(id, through_link(&cs));
    }
    let env = Env { dir: dir.clone(), owner_cs: through_link(&hub.cs), device_cs, books: Arc::default() };

    let mut roles: Vec<Role> = [Kind::Hub, Kind::Consumer, Kind::Feedback]
        .into_iter()
        .chain((0..SENDERS).map(Kind::Sender))
        .chain((0..RECEIVERS).map(Kind::Receiver))
        .chain((0..RECEIVERS).map(Kind::C2dSender))
        .map(|kind| Role { kind, child: None, generation: 0, restart_at: Some(Instant::now()), starts: 0, kills: 0, exits: 0 })
        .collect();
    roles[0].restart_at = None; // the hub runs already
    roles[0].starts = 1;
    let hub_kills = |roles: &[Role]| roles[0].kills;

    // Restarts what is due; notes processes that ended by themselves.
    let supervise = |roles: &mut [Role], hub: &mut HubProc, allow: &dyn Fn(Kind) -> bool| {
        let now = Instant::now();
        for r in roles.iter_mut() {
            if r.kind == Kind::Hub {
                if let Ok(Some(status)) = hub.child.try_wait() {
                    eprintln!("soak: the hub exited by itself ({status}); restarting it");
                    r.exits += 1;
                    *hub = spawn_hub_with(&data, port, &hub_args, hub_log(&dir));
                    r.starts += 1;
                }
                continue;
            }
            if let Some(c) = &mut r.child {
                if let Ok(Some(_)) = c.try_wait() {
                    r.child = None;
                    r.exits += 1;
                    r.restart_at = Some(now + Duration::from_millis(500));
                }
            }
            if r.child.is_none() && allow(r.kind) && r.restart_at.is_some_and(|t| t <= now) {
                r.generation += 1;
                r.child = Some(start(&env, r.kind, r.generation));
                r.starts += 1;
                r.restart_at = None;
            }
        }
    };

    // Chaos: one SIGKILL per second on a fixed timeline (kill i at about i + 0.5 s, ±0.4 s), so
    // time lost to a slow hub restart is caught up; the victim is drawn by weight among the live
    // processes.
    let planned = seconds.max(KILLS_PER_120S * seconds / 120 + 1);
    let slot = Duration::from_secs(seconds).div_f64(planned as f64);
    let kill_time = |i: u64, rng: &mut Rng| slot.mul_f64(i as f64 + 0.1 + rng.below(800) as f64 / 1000.0);
    let started = Instant::now();
    let mut kill_no = 0u64;
    let mut next_kill = started + kill_time(0, &mut rng);
    let mut next_report = started + Duration::from_secs(10);
    while started.elapsed() < Duration::from_secs(seconds) {
        supervise(&mut roles, &mut hub, &|_| true);
        let now = Instant::now();
        if now >= next_kill && kill_no < planned {
            kill_no += 1;
            next_kill = started + kill_time(kill_no, &mut rng);
            let live: Vec<usize> = (0..roles.len()).filter(|&i| i == 0 || roles[i].child.is_some()).collect();
            let total: u64 = live.iter().map(|&i| roles[i].kind.weight()).sum();
            let mut pick = rng.below(total);
            let victim = *live
                .iter()
                .find(|&&i| {
                    let w = roles[i].kind.weight();
                    if pick < w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .expect("a live victim");
            let r = &mut roles[victim];
            r.kills += 1;
            if r.kind == Kind::Hub {
                kill(&mut hub.child);
                std::thread::sleep(rng.millis((200, 800))); // down for a moment
                hub = spawn_hub_with(&data, port, &hub_args, hub_log(&dir));
                r.starts += 1;
            } else {
                kill(r.child.as_mut().unwrap());
                r.child = None;
                r.restart_at = Some(Instant::now() + rng.millis((100, 1000)));
            }
        }
        if now >= next_report {
            next_report = now + Duration::from_secs(10);
            let b = env.books.lock();
            let kills: u64 = roles.iter().map(|r| r.kills).sum();
            eprintln!(
                "soak: {:>4} s  kills {kills} (hub {})  D2C accepted {} consumed {}  C2D accepted {} outcomes {}",
                started.elapsed().as_secs(),
                hub_kills(&roles),
                b.d2c_accepted.len(),
                b.d2c_consumed.len(),
                b.c2d_accepted.len(),
                b.feedback.len()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let kills_by_kind = {
        let mut m: Vec<(&str, u64)> = Vec::new();
        for r in &roles {
            match m.iter_mut().find(|(l, _)| *l == r.kind.label()) {
                Some(e) => e.1 += r.kills,
                None => m.push((r.kind.label(), r.kills)),
            }
        }
        m
    };
    let kills: u64 = roles.iter().map(|r| r.kills).sum();
    let exits: u64 = roles.iter().map(|r| r.exits).sum();

    // Drain: no more faults or kills; senders stop and flush their outboxes; then wait until the
    // books balance.
    link.calm();
    let keeps_running = |k: Kind| !matches!(k, Kind::Sender(_) | Kind::C2dSender(_));
    for r in roles.iter_mut().filter(|r| !keeps_running(r.kind)) {
        if let Some(c) = &mut r.child {
            kill(c);
        }
        r.child = None;
    }
    supervise(&mut roles, &mut hub, &keeps_running);
    let mut flush_starts = 0u64;
    for k in 0..SENDERS {
        let id = sender_id(k);
        let out = Command::new(BIN)
            .args(["--retry-max-delay", "1s", "device", "send", "--data", "x", "--count", "0", "--flush-timeout-secs", "180"])
            .args(["--outbox", &format!("{}/outbox-{id}", dir.display())])
            .env("HUBMSG_DEVICE_CONNECTION_STRING", &env.device_cs[&id])
            .output()
            .expect("run a flush-only sender");
        flush_starts += 1;
        assert!(out.status.success(), "{id}: the outbox did not flush: {}", String::from_utf8_lossy(&out.stderr));
    }
    let balanced = |b: &Books| {
        b.d2c_accepted.iter().all(|id| b.d2c_consumed.contains_key(id)) && b.c2d_accepted.iter().all(|id| b.feedback.contains_key(id))
    };
    let deadline = Instant::now() + Duration::from_secs(150);
    while !balanced(&env.books.lock()) && Instant::now() < deadline {
        supervise(&mut roles, &mut hub, &keeps_running);
        std::thread::sleep(Duration::from_millis(100));
    }
    let drain_secs = started.elapsed().as_secs_f64() - seconds as f64;
    for r in roles.iter_mut() {
        if let Some(c) = &mut r.child {
            kill(c);
        }
    }
    drop(hub);

    let b = env.books.lock();
    let d2c_lost: Vec<&String> = b.d2c_accepted.iter().filter(|id| !b.d2c_consumed.contains_key(*id)).collect();
    let d2c_dups: u64 = b.d2c_consumed.values().map(|c| u64::from(c - 1)).sum();
    // Duplicates by cause (they add up to d2c_dups).
    let stored_again: u64 = b.d2c_copies.values().map(|c| c.len() as u64 - 1).sum();
    let redelivered: u64 = b.d2c_copies.values().flat_map(|c| c.values()).map(|n| u64::from(n - 1)).sum();
    let copies_hist = {
        let mut h: std::collections::BTreeMap<usize, u64> = std::collections::BTreeMap::new();
        for c in b.d2c_copies.values() {
            *h.entry(c.len()).or_default() += 1;
        }
        h
    };
    let d2c_extra = b.d2c_consumed.keys().filter(|id| !b.d2c_accepted.contains(*id)).count();
    let c2d_lost: Vec<&String> = b.c2d_accepted.iter().filter(|id| !b.feedback.contains_key(*id)).collect();
    let mut outcomes: HashMap<&str, u64> = HashMap::new();
    for id in &b.c2d_accepted {
        if let Some(s) = b.feedback.get(id).and_then(|v| v.first()) {
            *outcomes.entry(s.as_str()).or_default() += 1;
        }
    }
    let outcome = |s: &str| outcomes.get(s).copied().unwrap_or(0);
    let app_dups: u64 = b.c2d_seen.values().map(|v| v.len() as u64 - 1).sum();
    let fb_dups: u64 = b.feedback.values().map(|v| v.len() as u64 - 1).sum();
    // An outcome the app decided must have been seen by the app with that action.
    let unseen: Vec<String> = b
        .feedback
        .iter()
        .filter_map(|(id, st)| {
            let want = match st.first().map(String::as_str) {
                Some("Success") => "complete",
                Some("Rejected") => "reject",
                _ => return None,
            };
            let seen = b.c2d_seen.get(id).is_some_and(|acts| acts.iter().any(|a| a == want));
            (!seen).then(|| format!("{id}: {st:?}, app saw {:?}", b.c2d_seen.get(id)))
        })
        .collect();
    let starts: u64 = roles.iter().filter(|r| r.kind != Kind::Hub).map(|r| r.starts).sum::<u64>() + flush_starts;
    let (conns, cuts, stalls, delayed) = link.stats().snapshot();

    eprintln!("soak: chaos {seconds} s + drain {drain_secs:.1} s, seed {seed}");
    eprintln!(
        "soak: kills {kills} ({}); processes that ended by themselves {exits}",
        kills_by_kind.iter().map(|(l, n)| format!("{l} {n}")).collect::<Vec<_>>().join(", ")
    );
    eprintln!(
        "soak: link connections {conns}, cuts {cuts}, stalls {stalls}, with latency {delayed}; reconnects {} (connections beyond each process's first)",
        conns.saturating_sub(starts)
    );
    eprintln!(
        "soak: D2C accepted {}, delivered {}, duplicates {d2c_dups}, delivered but never reported accepted {d2c_extra} (sent by a sender killed before it printed), LOST {}",
        b.d2c_accepted.len(),
        b.d2c_accepted.len() - d2c_lost.len(),
        d2c_lost.len()
    );
    eprintln!(
        "soak: C2D accepted {}, outcomes: Success {}, Rejected {}, DeliveryCountExceeded {}, Expired {}, Purged {}; app saw a delivery again {app_dups}, feedback duplicates {fb_dups}, LOST {}",
        b.c2d_accepted.len(),
        outcome("Success"),
        outcome("Rejected"),
        outcome("DeliveryCountExceeded"),
        outcome("Expired"),
        outcome("Purged"),
        c2d_lost.len()
    );
    let kills_of = |l: &str| kills_by_kind.iter().find(|(k, _)| *k == l).map_or(0, |e| e.1);
    eprintln!(
        "soak: D2C duplicates by cause: {redelivered} redeliveries of a stored event (consumer restarts {}, hub restarts {} before the checkpoint covered it), \
         {stored_again} re-sends stored again as new events (a device that lost its PUBACK to a hub kill or a link cut; stored copies per message {copies_hist:?})",
        kills_of(Kind::Consumer.label()),
        hub_kills(&roles)
    );
    assert_eq!(redelivered + stored_again, d2c_dups, "every duplicate has a cause");
    if !d2c_lost.is_empty() || !c2d_lost.is_empty() || !unseen.is_empty() {
        eprintln!("soak: first lost D2C {:?}", d2c_lost.iter().take(10).collect::<Vec<_>>());
        eprintln!("soak: first lost C2D {:?}", c2d_lost.iter().take(10).collect::<Vec<_>>());
        eprintln!("soak: outcomes the app never decided {:?}", unseen.iter().take(10).collect::<Vec<_>>());
        print_tails(&dir);
    }
    assert!(!b.d2c_accepted.is_empty() && !b.c2d_accepted.is_empty(), "traffic flowed in both directions");
    assert!(d2c_lost.is_empty(), "{} accepted D2C messages never reached the consumer group", d2c_lost.len());
    assert!(c2d_lost.is_empty(), "{} accepted C2D messages reached no outcome", c2d_lost.len());
    assert!(unseen.is_empty(), "{} C2D outcomes the device app never decided", unseen.len());
    let required = KILLS_PER_120S * seconds / 120;
    assert!(kills >= required, "only {kills} kills in {seconds} s (at least {required} required)");
    assert!(hub_kills(&roles) > 0, "the hub was never killed");
}
