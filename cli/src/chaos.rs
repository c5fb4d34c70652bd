//! The fault-injecting TCP link shared by `hubmsg demo` and the chaos soak test
//! (`cli/tests/soak.rs`): a proxy that forwards each connection to one of its targets (round
//! robin, skipping targets that refuse, as a TCP load balancer does) and, per connection and
//! decided by a seeded generator, cuts it after a random lifetime, stalls it once for a while,
//! and delays every chunk by a fixed latency. With [`Faults::NONE`] it is a plain balancer. `tc netem` in a network namespace
//! would do the same below TCP; it is not available everywhere (this CI's kernel has no `netem`
//! qdisc), so the link is a proxy.
//!
//! Invariants: bytes are forwarded in order and never altered — a fault only delays or ends a
//! connection; at most [`DELAY_QUEUE`] chunks wait in a delayed direction, so a delayed link
//! pushes back on its sender instead of buffering without bound; once [`ChaosLink::calm`] was
//! called, new connections get no faults (connections already open keep theirs).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hubmsg_core::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Chunks in flight per delayed direction (16 KB each at most).
pub const DELAY_QUEUE: usize = 64;

/// A small deterministic generator (splitmix64), so a seed reproduces the chaos.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A duration in `lo..=hi` milliseconds.
    pub fn millis(&mut self, (lo, hi): (u64, u64)) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }
}

/// What the link does to each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    /// A connection is cut after a lifetime in this range (ms).
    pub life_ms: (u64, u64),
    /// Percentage of connections that stall once, at a random point of their life.
    pub stall_percent: u64,
    /// How long a stall lasts (ms); both directions stop forwarding meanwhile.
    pub stall_ms: (u64, u64),
    /// Percentage of connections with a latency.
    pub delay_percent: u64,
    /// The latency of such a connection (ms, each direction).
    pub delay_ms: (u64, u64),
}

impl Faults {
    /// No faults: connections are forwarded as they are (a plain TCP balancer).
    pub const NONE: Faults =
        Faults { life_ms: (u64::MAX / 4, u64::MAX / 4), stall_percent: 0, stall_ms: (0, 0), delay_percent: 0, delay_ms: (0, 0) };
}

impl Default for Faults {
    /// Cuts after 1–6 s, half the connections stall once for 0.1–1 s, half have 5–50 ms latency.
    fn default() -> Self {
        Faults { life_ms: (1000, 6000), stall_percent: 50, stall_ms: (100, 1000), delay_percent: 50, delay_ms: (5, 50) }
    }
}

/// What the link did so far.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections cut at the end of their lifetime.
    pub cuts: AtomicU64,
    /// Stalls.
    pub stalls: AtomicU64,
    /// Connections that ran with a latency.
    pub delayed: AtomicU64,
}

impl LinkStats {
    /// (connections, cuts, stalls, delayed) now.
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (g(&self.connections), g(&self.cuts), g(&self.stalls), g(&self.delayed))
    }
}

/// A running chaos link on 127.0.0.1. Dropping it stops accepting (open connections run on
/// until their lifetime or either side ends them).
pub struct ChaosLink {
    port: u16,
    calm: Arc<AtomicBool>,
    stats: Arc<LinkStats>,
    task: tokio::task::JoinHandle<()>,
}

impl ChaosLink {
    /// Listens on 127.0.0.1 (a free port) and forwards every connection to one of `targets`
    /// (the `n`-th connection to the first that accepts from target `n` on) with the given
    /// faults, decided by `seed`. A connection no target accepts is closed.
    pub async fn start(targets: Vec<SocketAddr>, seed: u64, faults: Faults) -> Result<ChaosLink, Error> {
        if targets.is_empty() {
            return Err(Error::invalid("the chaos link needs at least one target"));
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(|e| Error::storage("bind the chaos link", e))?;
        let port = listener.local_addr().map_err(|e| Error::storage("chaos link address", e))?.port();
        let calm = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(LinkStats::default());
        let task = tokio::spawn(accept(listener, Arc::new(targets), seed, faults, calm.clone(), stats.clone()));
        Ok(ChaosLink { port, calm, stats, task })
    }

    /// The port clients connect to instead of the target's.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Counters.
    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }

    /// From now on new connections are forwarded without faults (the drain phase of a run).
    pub fn calm(&self) {
        self.calm.store(true, Ordering::Relaxed);
    }
}

impl Drop for ChaosLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects to the first of `targets` that accepts, starting at the `n`-th.
async fn connect_any(targets: &[SocketAddr], n: u64) -> Option<TcpStream> {
    for i in 0..targets.len() {
        if let Ok(s) = TcpStream::connect(targets[(n as usize + i) % targets.len()]).await {
            return Some(s);
        }
    }
    None
}

async fn accept(
    listener: TcpListener,
    targets: Arc<Vec<SocketAddr>>,
    seed: u64,
    faults: Faults,
    calm: Arc<AtomicBool>,
    stats: Arc<LinkStats>,
) {
    let mut conn_no = 0u64;
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            // Out of file descriptors and the like: try again shortly.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        conn_no += 1;
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let mut rng = Rng(seed ^ conn_no.wrapping_mul(0xA24B_AED4_963E_E407));
        let plan = if calm.load(Ordering::Relaxed) || faults == Faults::NONE { Plan::clean() } else { Plan::draw(&mut rng, &faults) };
        let (stats, targets) = (stats.clone(), targets.clone());
        tokio::spawn(async move {
            let Some(outbound) = connect_any(&targets, conn_no).await else { return };
            let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
            if plan.stall.is_some() {
                stats.stalls.fetch_add(1, Ordering::Relaxed);
            }
            if !plan.delay.is_zero() {
                stats.delayed.fetch_add(1, Ordering::Relaxed);
            }
            let (ir, iw) = inbound.into_split();
            let (or, ow) = outbound.into_split();
            let started = Instant::now();
            tokio::select! {
                _ = pump(ir, ow, plan, started) => {}
                _ = pump(or, iw, plan, started) => {}
                _ = tokio::time::sleep(plan.life) => { stats.cuts.fetch_add(1, Ordering::Relaxed); }
            }
        });
    }
}

/// The faults of one connection.
#[derive(Debug, Clone, Copy)]
struct Plan {
    life: Duration,
    /// (when, for how long) after the start.
    stall: Option<(Duration, Duration)>,
    delay: Duration,
}

impl Plan {
    fn clean() -> Plan {
        Plan { life: Duration::from_secs(365 * 86_400), stall: None, delay: Duration::ZERO }
    }

    fn draw(rng: &mut Rng, f: &Faults) -> Plan {
        let life = rng.millis(f.life_ms);
        let stall_at = Duration::from_millis(rng.below(life.as_millis() as u64));
        let stall_for = rng.millis(f.stall_ms);
        let stall = (rng.below(100) < f.stall_percent).then_some((stall_at, stall_for));
        let delay = if rng.below(100) < f.delay_percent { rng.millis(f.delay_ms) } else { Duration::ZERO };
        Plan { life, stall, delay }
    }
}

/// Forwards one direction until EOF or an error, pausing once for the stall and holding each
/// chunk back by the latency (in order, at most [`DELAY_QUEUE`] chunks waiting).
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, plan: Plan, started: Instant) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(DELAY_QUEUE);
    let read = async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut stall = plan.stall;
        loop {
            if let Some((at, dur)) = stall {
                if started.elapsed() >= at {
                    stall = None;
                    tokio::time::sleep(dur).await;
                }
            }
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if tx.send((Instant::now() + plan.delay, buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_plans() {
        let f = Faults::default();
        let draw = |seed| {
            let mut r = Rng(seed);
            (0..50).map(|_| format!("{:?}", Plan::draw(&mut r, &f))).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let mut r = Rng(1);
        for _ in 0..1000 {
            let p = Plan::draw(&mut r, &f);
            assert!(p.life >= Duration::from_millis(1000) && p.life <= Duration::from_millis(6000));
            assert!(p.delay.is_zero() || (p.delay >= Duration::from_millis(5) && p.delay <= Duration::from_millis(50)));
            if let Some((at, dur)) = p.stall {
                assert!(at < p.life && dur >= Duration::from_millis(100) && dur <= Duration::from_millis(1000));
            }
        }
    }

    #[tokio::test]
    async fn bytes_arrive_in_order_through_stalls_and_delays() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let faults = Faults { life_ms: (60_000, 60_000), stall_percent: 100, stall_ms: (50, 100), delay_percent: 100, delay_ms: (5, 20) };
        let link = ChaosLink::start(vec![target], 3, faults).await.unwrap();
        let s = TcpStream::connect(("127.0.0.1", link.port())).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(1000) {
                w.write_all(chunk).await.unwrap();
            }
            w
        });
        let mut got = vec![0u8; expected.len()];
        tokio::time::timeout(Duration::from_secs(30), r.read_exact(&mut got)).await.unwrap().unwrap();
        assert!(got == expected, "bytes changed or reordered on the way");
        drop(writer.await.unwrap());
        let (conns, cuts, stalls, delayed) = link.stats().snapshot();
        assert_eq!((conns, cuts, stalls, delayed), (1, 0, 1, 1));
    }

    #[tokio::test]
    async fn connections_go_round_robin_to_the_targets_that_accept() {
        // Two live targets that answer with their number, and one that refuses (nothing
        // listens on a port just released).
        let mut targets = Vec::new();
        for tag in [b'a', b'b'] {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            targets.push(l.local_addr().unwrap());
            tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    let _ = s.write_all(&[tag]).await;
                }
            });
        }
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        targets.insert(1, dead);
        let link = ChaosLink::start(targets, 1, Faults::NONE).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..6 {
            let mut s = TcpStream::connect(("127.0.0.1", link.port())).await.unwrap();
            let mut b = [0u8; 1];
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b)).await.unwrap().unwrap();
            seen.push(b[0]);
        }
        // Connections 1..=6 start at targets 1, 2, 0, 1, 2, 0 (1 is dead: its turn goes to 2).
        assert_eq!(seen, b"bbabba");
        assert_eq!(link.stats().snapshot(), (6, 0, 0, 0));
    }
}
