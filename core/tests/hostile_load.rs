//! The hub under hostile, broken and slow peers at once — 2,000 idle TCP connections that never
//! send CONNECT, a slowloris CONNECT, a device that never reads its PUBACKs, a flood of 255 KiB
//! publishes on a slow disk, a consumer that never acknowledges, a consumer that stops reading —
//! while 10 well-behaved devices keep D2C and C2D flowing with nothing lost, and the process
//! stays under the memory bound `docs/protocol.md` (limits) derives from the hub's limits.
//! Bounded: about half a minute.
//!
//! The disk is slowed by the store's own I/O seam (`HUBMSG_DEV_SLOW_DISK`, docs/storage.md): a
//! cgroup I/O throttle does not slow buffered writes, and an unthrottled disk here takes the
//! flood as fast as the flooders send it, so nothing would ever queue.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hubmsg_core::auth;
use hubmsg_core::hub::{Hub, HubConfig};
use hubmsg_core::message::now_ms;
use hubmsg_core::outbox::Outcome;
use hubmsg_core::proto::{self, AckMode, StartPosition};
use hubmsg_core::transport::{self, ConnectParams, Endpoint};
use hubmsg_core::{wire, Message};
use rumqttc::mqttbytes::v4::{Packet, Publish};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

const T: Duration = Duration::from_secs(30);
/// The slow disk: 8 MiB/s of writes, 1 ms per write and 10 ms per fdatasync, one queue for
/// every file of the process. Two flooders offer far more than 8 MiB/s.
const SLOW_DISK: &str = "write_ms=1,sync_ms=10,mib_per_s=8";
const DISK_MIB_PER_S: f64 = 8.0;
/// A commit latency above this (the histogram bucket past one slowed write + fdatasync) means
/// the commit waited behind others.
const QUEUED: Duration = Duration::from_millis(25);
/// Connections that get past CONNECT in this test: 10 good devices, 2 flooders, the service
/// client's connections (requests, events "shared", events "lazy"), the member that stops
/// reading, and the attackers' own clients in the same process.
const AUTHENTICATED: u64 = 16;
/// Consumers with events in flight: "shared" (two members) and "lazy".
const CONSUMERS: u64 = 3;
const MIB: u64 = 1024 * 1024;
/// A flood publish: as large as a D2C message may be (256 KB counting its properties, as IoT
/// Hub counts them) less room for the properties the hub counts, so none is refused as too large.
const FLOOD_BODY: usize = 255 * 1024;

/// The resident-memory bound of `docs/protocol.md` (limits) for this test's configuration and
/// peers, above the process's resident set before the first peer connects: every byte the
/// limits let the hub hold at once, counted twice because this process holds the clients'
/// side of the same buffers (and the store copies an appended body into its write buffer).
fn rss_bound_mb(cfg: &HubConfig, idle: u64, start_mb: u64) -> u64 {
    let pending = cfg.hub_pending_bytes as u64; // bodies appended, not yet durable (hub-wide)
    let packets = AUTHENTICATED * transport::MAX_PACKET_SIZE as u64; // one packet read buffer each
    let connects = idle * transport::MAX_CONNECT_SIZE as u64; // pre-CONNECT read buffers
    let windows = CONSUMERS * cfg.consumer_window_bytes as u64; // events in flight to consumers
    start_mb + 2 * (pending + packets + connects + windows).div_ceil(MIB)
}

fn rss_mb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()).unwrap_or(0)
        / 1024
}

fn raise_nofile(want: u64) {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain libc calls on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < want {
            r.rlim_cur = want.min(r.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn endpoint(hub: &Hub) -> Endpoint {
    let a = hub.mqtt_addr().unwrap();
    Endpoint { host: a.ip().to_string(), port: a.port(), tls: None }
}

async fn device_params(hub: &Hub, id: &str) -> ConnectParams {
    let host = hub.host_name();
    let key = hub.registry().device(id).await.unwrap().unwrap().primary_key;
    ConnectParams {
        client_id: id.into(),
        username: wire::device_username(&host, id, None),
        password: auth::generate_sas_token(&auth::device_resource_uri(&host, id), &key, now_ms() / 1000 + 3600, None).unwrap(),
        keep_alive_secs: 60,
        clean_session: true,
    }
}

async fn service_params(hub: &Hub) -> ConnectParams {
    let host = hub.host_name();
    let key = hub.registry().policy("service").await.unwrap().unwrap().primary_key;
    ConnectParams {
        client_id: format!("{}/stalled", proto::SERVICE_MARKER),
        username: format!("{host}/{}/?api-version={}", proto::SERVICE_MARKER, wire::API_VERSION),
        password: auth::generate_sas_token(&host, &key, now_ms() / 1000 + 3600, Some("service")).unwrap(),
        keep_alive_secs: 60,
        clean_session: true,
    }
}

/// A device that publishes `size`-byte QoS 1 (and every other one QoS 0) messages as fast as
/// TCP lets it and never reads anything back (no PUBACK is ever read), until `stop`. Counts the
/// publishes the hub took off the socket's way (each flush that completed) and returns how it
/// ended. A flush is never cut short while the flood runs — a cancelled write leaves half a
/// packet on the wire and the hub rightly closes the stream as malformed, which would end the
/// flood instead of keeping the back-pressure on.
async fn flood(ep: Endpoint, params: ConnectParams, size: usize, mut stop: watch::Receiver<bool>, written: Arc<AtomicU64>) -> String {
    let id = params.client_id.clone();
    let ((_r, mut w), _) = match transport::client_connect(&ep, &params, T).await {
        Ok(c) => c,
        Err(e) => return format!("{id}: connect failed: {e}"),
    };
    let topic = wire::d2c_topic(&id, "");
    let mut pkid: u16 = 1;
    let mut sent = 0u64;
    loop {
        let qos = if pkid % 2 == 0 { QoS::AtMostOnce } else { QoS::AtLeastOnce };
        let mut p = Publish::new(topic.clone(), qos, vec![0xabu8; size]);
        p.pkid = if qos == QoS::AtLeastOnce { pkid } else { 0 };
        pkid = pkid.wrapping_add(1).max(1);
        if let Err(e) = w.queue(&Packet::Publish(p)) {
            return format!("{id}: encode failed after {sent}: {e}");
        }
        tokio::select! {
            r = w.flush() => match r {
                Ok(()) => {
                    written.fetch_add(1, Ordering::Relaxed);
                    sent += 1;
                }
                Err(e) => return format!("{id}: the hub closed the connection after {sent} publishes: {e}"),
            },
            _ = stop.wait_for(|s| *s) => return format!("{id}: still flooding after {sent} publishes"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_cost_the_good_devices_nothing_and_memory_stays_bounded() {
    raise_nofile(8192);
    // Read once, when the first store of the process opens (this file's only test).
    std::env::set_var("HUBMSG_DEV_SLOW_DISK", SLOW_DISK);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = HubConfig::new(dir.path());
    cfg.feedback_interval = Duration::from_millis(100);
    cfg.connect_timeout = Duration::from_secs(3);
    cfg.max_connections = 3000;
    cfg.write_timeout = Duration::from_secs(2);
    cfg.consumer_stall_timeout = Duration::from_secs(3);
    cfg.session_pending_bytes = 1024 * 1024;
    cfg.hub_pending_bytes = 16 * 1024 * 1024;
    let hub = Hub::start(cfg.clone()).await.unwrap();
    let addr = hub.mqtt_addr().unwrap();
    let rss_start = rss_mb();
    let rss_bound = rss_bound_mb(&cfg, 2000, rss_start);
    let peak = Arc::new(AtomicU64::new(rss_start));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_mb(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // The good side: 10 devices and a consumer in group "shared".
    let svc = service(&hub).await;
    let mut good = Vec::new();
    for i in 0..10 {
        good.push(device(&hub, &format!("good-{i}")).await);
    }
    let mut c2d_rx: Vec<_> = good.iter().map(|d| d.c2d().unwrap()).collect();
    let mut consumer = svc.events("shared", StartPosition::Earliest).await.unwrap();

    // 1. 2,000 idle connections that never send CONNECT.
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // 2. Slowloris: a CONNECT one byte every 300 ms.
    let slowloris = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = std::time::Instant::now();
        let mut c = bytes::BytesMut::new();
        transport::encode(&Packet::Connect(rumqttc::mqttbytes::v4::Connect::new("slow")), &mut c).unwrap();
        for b in c.iter().cycle() {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            let mut probe = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(300), s.read(&mut probe)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                _ => {}
            }
        }
        started.elapsed()
    });
    // 3 + 4. A device that never reads its PUBACKs flooding 255 KiB publishes, and a second one.
    let (stop, stop_rx) = watch::channel(false);
    let written = Arc::new(AtomicU64::new(0));
    for id in ["flood-a", "flood-b"] {
        hub.create_device(id).await.unwrap();
    }
    let mut floods = Vec::new();
    let flood_started = std::time::Instant::now();
    for id in ["flood-a", "flood-b"] {
        floods.push(tokio::spawn(flood(endpoint(&hub), device_params(&hub, id).await, FLOOD_BODY, stop_rx.clone(), written.clone())));
    }
    // 5. A consumer that never acknowledges (reads, never acks) in its own group.
    let mut lazy = svc.events("lazy", StartPosition::Earliest).await.unwrap();
    let lazy_reader = tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok(Some(_e)) = lazy.next_timeout(Duration::from_secs(20)).await {
            n += 1; // never acked
        }
        n
    });
    // 6. A member of "shared" that joins and then stops reading altogether (like SIGSTOP).
    let ((_sr, mut sw), _) = transport::client_connect(&endpoint(&hub), &service_params(&hub).await, T).await.unwrap();
    let body = serde_json::to_vec(&serde_json::json!({"group": "shared", "from": "earliest", "window": 1000})).unwrap();
    let mut p = Publish::new(proto::request_topic("consume", 0), QoS::AtLeastOnce, body);
    p.pkid = 1;
    sw.send(&Packet::Publish(p)).await.unwrap();
    // It keeps pinging (so keep-alive alone would never drop it) but never reads: the hub must
    // drop it by its write deadline. Our write fails once the hub has closed the socket.
    let stalled = tokio::spawn(async move {
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if sw.send(&Packet::PingReq).await.is_err() {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    });

    // Meanwhile the good devices send D2C and get C2D.
    let mut expected = HashSet::new();
    let mut deliveries = Vec::new();
    for round in 0..20 {
        for (i, d) in good.iter().enumerate() {
            let body = format!("good-{i}-{round}");
            expected.insert(body.clone());
            deliveries.push(d.send(Message::new(body)).await.unwrap());
        }
        if round % 4 == 0 {
            for i in 0..10 {
                svc.send_c2d(&format!("good-{i}"), Message::new(format!("cmd-{round}")), AckMode::None).await.unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    for d in deliveries {
        assert_eq!(tokio::time::timeout(T, d.outcome()).await.unwrap().unwrap(), Outcome::Delivered);
    }
    for rx in &mut c2d_rx {
        for round in (0..20).step_by(4) {
            let m = rx.recv_timeout(T).await.unwrap().unwrap_or_else(|| panic!("C2D round {round} arrived"));
            assert_eq!(m.message.body, format!("cmd-{round}"));
            m.complete().unwrap();
        }
    }
    // The "shared" group got every good message even though one member stopped reading: its
    // partitions moved to the consumer that reads.
    let mut seen = HashSet::new();
    while !expected.is_subset(&seen) {
        let e = consumer.next_timeout(T).await.unwrap().expect("events keep flowing to the reading member");
        let body = String::from_utf8_lossy(&e.body()).to_string();
        if body.starts_with("good-") {
            seen.insert(body);
        }
        e.ack();
    }
    stop.send(true).unwrap();
    let flood_secs = flood_started.elapsed().as_secs_f64();
    let took_over = tokio::time::timeout(T, stalled).await.unwrap().unwrap().expect("the hub dropped the member that stopped reading");
    let mut flood_ends = Vec::new();
    for f in floods {
        flood_ends.push(tokio::time::timeout(T, f).await.unwrap().unwrap());
    }

    // Every idle connection was closed by the CONNECT deadline, and so was the slowloris.
    let mut closed = 0;
    for mut s in idle {
        let mut b = [0u8; 1];
        if matches!(tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await, Ok(Ok(0)) | Ok(Err(_))) {
            closed += 1;
        }
    }
    assert_eq!(closed, 2000, "idle pre-CONNECT connections closed");
    let slow = tokio::time::timeout(T, slowloris).await.unwrap().unwrap();
    assert!(slow < Duration::from_secs(6), "slowloris held its connection {slow:?}");
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    lazy_reader.abort();
    let peak = peak.load(Ordering::Relaxed);
    let flooded = written.load(Ordering::Relaxed);
    let st = hub.stats();
    let commit = |q| st.commit_latency.quantile_bound(q).map_or("-".to_string(), |d| format!("{d:?}"));
    let flood_mib_s = flooded as f64 * FLOOD_BODY as f64 / MIB as f64 / flood_secs;
    eprintln!(
        "hostile load: RSS {rss_start} MB at start, peak {peak} MB (bound {rss_bound} MB); slow disk {SLOW_DISK}; \
         {flooded} flood publishes of {} KiB written in {flood_secs:.1} s ({flood_mib_s:.1} MiB/s taken by the hub, onto a {DISK_MIB_PER_S} MiB/s disk; {flood_ends:?}); \
         {} D2C appended ({} MiB); commit latency p50 <= {}, p99 <= {}; \
         the member that stopped reading was dropped after {took_over:?}; {} violations, {} refused",
        FLOOD_BODY / 1024,
        st.d2c_messages.load(Ordering::Relaxed),
        st.d2c_bytes.load(Ordering::Relaxed) / MIB,
        commit(0.5),
        commit(0.99),
        st.violations.load(Ordering::Relaxed),
        st.refused.load(Ordering::Relaxed)
    );
    // The disk was the bottleneck: a commit on its own takes one slowed write and fdatasync
    // (11 ms, the 25 ms bucket); the median one took longer, queued behind the flood.
    assert!(
        st.commit_latency.quantile_bound(0.5).unwrap() > QUEUED,
        "appends did not queue on the slow disk: the median commit took <= {}",
        commit(0.5)
    );
    for end in &flood_ends {
        assert!(end.contains("still flooding"), "a flooder was not held by back-pressure until the end: {end}");
    }
    assert!(peak < rss_bound, "peak RSS {peak} MB exceeds the bound of {rss_bound} MB");
    assert!(took_over < Duration::from_secs(20), "the member that stopped reading kept its partitions {took_over:?}");
    hub.shutdown().await.unwrap();
}
