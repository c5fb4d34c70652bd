//! Plain MQTT 3.1.1 clients for the baseline brokers, in two implementations of the same two
//! roles, so a figure can be told apart from the client that produced it:
//!
//! - [`ClientKind::Transport`]: hubmsg's own transport (`client_connect`, `PacketReader`,
//!   `PacketWriter` from `hubmsg_core::transport`). The publisher keeps a window of QoS 1
//!   publishes in flight and writes each refill with one syscall; the subscriber PUBACKs
//!   everything one read brought with one write.
//! - [`ClientKind::Rumqttc`]: rumqttc's `AsyncClient` and `EventLoop` (one publish call per
//!   message through its request channel, `inflight` as the window, manual acks).
//!
//! Both connect with `clean_session = false` (persistent sessions, as IoT Hub devices do) and use
//! QoS 1 throughout. Invariant of [`PkidWindow`]: a packet id is never in flight twice, and a
//! PUBACK for an id not in flight is a protocol error, never a silent count.

use std::time::{Duration, Instant};

use hubmsg_core::transport::{self, ClientHalves, ConnectParams, Drain, Endpoint};
use hubmsg_core::{Error, ErrorKind};
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use tokio::sync::mpsc;

use super::common::{body, parse_body, Stamp};

/// Which client library drives a baseline run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientKind {
    /// hubmsg's transport (pipelined publisher, batching subscriber).
    Transport,
    /// rumqttc 0.24's event loop.
    Rumqttc,
}

impl ClientKind {
    /// Both, in the order runs use them.
    pub const ALL: [ClientKind; 2] = [ClientKind::Transport, ClientKind::Rumqttc];

    /// The label in tables.
    pub fn label(self) -> &'static str {
        match self {
            ClientKind::Transport => "hubmsg transport client",
            ClientKind::Rumqttc => "rumqttc client",
        }
    }

    /// A one-word name.
    pub fn short(self) -> &'static str {
        match self {
            ClientKind::Transport => "transport",
            ClientKind::Rumqttc => "rumqttc",
        }
    }
}

/// Where and how the clients log in.
#[derive(Debug, Clone)]
pub struct Target {
    /// MQTT port on 127.0.0.1.
    pub port: u16,
    /// User name (empty: none sent).
    pub username: String,
    /// Password (empty: none sent).
    pub password: String,
}

/// Packet ids of QoS 1 publishes in flight, at most `limit` of them.
#[derive(Debug)]
pub struct PkidWindow {
    used: Vec<u64>,
    next: u16,
    in_flight: usize,
    limit: usize,
}

impl PkidWindow {
    /// A window of `limit` publishes (1 ..= 65,535).
    pub fn new(limit: usize) -> PkidWindow {
        PkidWindow { used: vec![0; 1024], next: 1, in_flight: 0, limit: limit.clamp(1, u16::MAX as usize) }
    }

    /// Whether another publish may go out.
    pub fn has_room(&self) -> bool {
        self.in_flight < self.limit
    }

    fn bit(pkid: u16) -> (usize, u64) {
        (pkid as usize / 64, 1u64 << (pkid % 64))
    }

    /// Takes the next free packet id (call only when [`PkidWindow::has_room`]).
    pub fn open(&mut self) -> u16 {
        debug_assert!(self.has_room());
        loop {
            let id = self.next;
            self.next = if id == u16::MAX { 1 } else { id + 1 };
            let (w, b) = Self::bit(id);
            if self.used[w] & b == 0 {
                self.used[w] |= b;
                self.in_flight += 1;
                return id;
            }
        }
    }

    /// Releases `pkid` on its PUBACK; false when it was not in flight.
    pub fn close(&mut self, pkid: u16) -> bool {
        let (w, b) = Self::bit(pkid);
        if pkid == 0 || self.used[w] & b == 0 {
            return false;
        }
        self.used[w] &= !b;
        self.in_flight -= 1;
        true
    }
}

fn mqtt_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Disconnected, format!("{what}: {e}"))
}

/// How long a broker may take to answer CONNECT or SUBSCRIBE.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

async fn transport_connect(target: &Target, client_id: &str) -> Result<ClientHalves, Error> {
    let endpoint = Endpoint { host: "127.0.0.1".into(), port: target.port, tls: None };
    let params = ConnectParams {
        client_id: client_id.to_string(),
        username: target.username.clone(),
        password: target.password.clone(),
        keep_alive_secs: 60,
        clean_session: false,
    };
    let (halves, _) = transport::client_connect(&endpoint, &params, ANSWER_WITHIN).await?;
    Ok(halves)
}

fn rumqttc_options(target: &Target, client_id: &str, window: usize) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(client_id, "127.0.0.1", target.port);
    o.set_clean_session(false).set_keep_alive(Duration::from_secs(60)).set_inflight(window as u16).set_manual_acks(true);
    if !target.username.is_empty() {
        o.set_credentials(target.username.clone(), target.password.clone());
    }
    o
}

/// Polls `el` until `done` says the wanted packet arrived.
async fn rumqttc_until(el: &mut rumqttc::EventLoop, what: &str, mut done: impl FnMut(&rumqttc::Packet) -> bool) -> Result<(), Error> {
    let fut = async {
        loop {
            if let rumqttc::Event::Incoming(p) = el.poll().await.map_err(|e| mqtt_err(what, e))? {
                if done(&p) {
                    return Ok(());
                }
            }
        }
    };
    tokio::time::timeout(ANSWER_WITHIN, fut)
        .await
        .map_err(|_| Error::new(ErrorKind::Timeout, format!("{what}: no answer within {ANSWER_WITHIN:?}")))?
}

/// A connected publisher (`clean_session = false`), ready to [`Publisher::run`].
pub struct Publisher {
    client_id: String,
    window: usize,
    conn: PublisherConn,
}

enum PublisherConn {
    Transport(ClientHalves),
    Rumqttc(Box<(rumqttc::AsyncClient, rumqttc::EventLoop)>),
}

impl Publisher {
    /// Connects as `client_id`; at most `window` QoS 1 publishes will be in flight.
    pub async fn connect(kind: ClientKind, target: &Target, client_id: &str, window: usize) -> Result<Publisher, Error> {
        let conn = match kind {
            ClientKind::Transport => PublisherConn::Transport(transport_connect(target, client_id).await?),
            ClientKind::Rumqttc => {
                let (client, mut el) = rumqttc::AsyncClient::new(rumqttc_options(target, client_id, window), window);
                rumqttc_until(&mut el, client_id, |p| matches!(p, rumqttc::Packet::ConnAck(_))).await?;
                PublisherConn::Rumqttc(Box::new((client, el)))
            }
        };
        Ok(Publisher { client_id: client_id.to_string(), window, conn })
    }

    /// Publishes messages `0..count` of device `device` on `topic` (QoS 1, bodies stamped with
    /// the time since `epoch`) and returns when the broker acknowledged the last one.
    pub async fn run(self, topic: String, device: u32, count: u64, epoch: Instant) -> Result<Instant, Error> {
        let Publisher { client_id, window, conn } = self;
        let stamp = |seq| body(Stamp { sent_ns: epoch.elapsed().as_nanos() as u64, device, seq, scheduled_ns: 0 });
        match conn {
            PublisherConn::Transport((mut reader, mut writer)) => {
                let mut w = PkidWindow::new(window);
                let (mut seq, mut acked) = (0u64, 0u64);
                while acked < count {
                    while seq < count && w.has_room() {
                        let mut p = Publish::from_bytes(topic.as_str(), QoS::AtLeastOnce, stamp(seq));
                        p.pkid = w.open();
                        writer.queue(&Packet::Publish(p))?;
                        seq += 1;
                    }
                    writer.flush().await?;
                    let mut pkt = reader.next().await?;
                    if pkt.is_none() {
                        return Err(Error::new(
                            ErrorKind::Disconnected,
                            format!("{client_id}: the broker closed the connection after {acked} PUBACKs"),
                        ));
                    }
                    let mut drain = Drain::new();
                    while let Some(p) = pkt.take() {
                        match p {
                            Packet::PubAck(a) if w.close(a.pkid) => acked += 1,
                            Packet::PubAck(a) => {
                                return Err(Error::protocol(format!("{client_id}: PUBACK for packet id {} not in flight", a.pkid)))
                            }
                            Packet::PingResp => {}
                            other => return Err(Error::protocol(format!("{client_id}: unexpected {other:?} while publishing"))),
                        }
                        pkt = drain.next(&mut reader)?;
                    }
                }
                let at = Instant::now();
                let _ = writer.send(&Packet::Disconnect).await;
                writer.shutdown().await;
                Ok(at)
            }
            PublisherConn::Rumqttc(boxed) => {
                let (client, mut el) = *boxed;
                let publisher = async {
                    for seq in 0..count {
                        client
                            .publish_bytes(topic.as_str(), rumqttc::QoS::AtLeastOnce, false, stamp(seq))
                            .await
                            .map_err(|e| mqtt_err(&client_id, e))?;
                    }
                    Ok::<(), Error>(())
                };
                let acks = async {
                    let mut acked = 0;
                    while acked < count {
                        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                            el.poll().await.map_err(|e| mqtt_err(&client_id, e))?
                        {
                            acked += 1;
                        }
                    }
                    Ok::<Instant, Error>(Instant::now())
                };
                let ((), at) = tokio::try_join!(publisher, acks)?;
                let _ = client.disconnect().await;
                let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
                Ok(at)
            }
        }
    }
}

/// A persistent-session subscriber that acknowledges every message, running as a task of its
/// own: it hands the stamps of what arrived to [`Subscriber::next`] in batches (one per read for
/// the transport client), so the caller can wait for arrivals and senders at once.
pub struct Subscriber {
    rx: mpsc::UnboundedReceiver<Result<Vec<Option<Stamp>>, Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Connects as `client_id` (`clean_session = false`), subscribes to `filter` with QoS 1 and
    /// returns once the broker granted the subscription.
    pub async fn start(kind: ClientKind, target: &Target, client_id: &str, filter: &str, window: usize) -> Result<Subscriber, Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = client_id.to_string();
        let task = match kind {
            ClientKind::Transport => {
                let (mut reader, mut writer) = transport_connect(target, client_id).await?;
                let mut sub = Subscribe::new(filter, QoS::AtLeastOnce);
                sub.pkid = 1;
                writer.send(&Packet::Subscribe(sub)).await?;
                match tokio::time::timeout(ANSWER_WITHIN, reader.next()).await {
                    Ok(Ok(Some(Packet::SubAck(_)))) => {}
                    Ok(Ok(other)) => return Err(Error::protocol(format!("{id}: expected SUBACK, got {other:?}"))),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(Error::new(ErrorKind::Timeout, format!("{id}: no SUBACK within {ANSWER_WITHIN:?}"))),
                }
                tokio::spawn(async move {
                    let r = async {
                        loop {
                            let mut pkt = reader.next().await?;
                            if pkt.is_none() {
                                return Err(Error::new(ErrorKind::Disconnected, format!("{id}: the broker closed the connection")));
                            }
                            let mut batch = Vec::new();
                            let mut drain = Drain::new();
                            while let Some(p) = pkt.take() {
                                if let Packet::Publish(p) = p {
                                    if p.qos == QoS::AtLeastOnce {
                                        writer.queue(&Packet::PubAck(PubAck::new(p.pkid)))?;
                                    }
                                    batch.push(parse_body(&p.payload));
                                }
                                pkt = drain.next(&mut reader)?;
                            }
                            writer.flush().await?;
                            if !batch.is_empty() && tx.send(Ok(batch)).is_err() {
                                return Ok(());
                            }
                        }
                    }
                    .await;
                    if let Err(e) = r {
                        let _ = tx.send(Err(e));
                    }
                })
            }
            ClientKind::Rumqttc => {
                // A large request channel: `try_ack` must never find it full (the previous bench
                // used the same size), and awaiting `ack` here could wait for this very task.
                let (client, mut el) = rumqttc::AsyncClient::new(rumqttc_options(target, client_id, window), 200_000);
                client.subscribe(filter, rumqttc::QoS::AtLeastOnce).await.map_err(|e| mqtt_err(client_id, e))?;
                rumqttc_until(&mut el, client_id, |p| matches!(p, rumqttc::Packet::SubAck(_))).await?;
                tokio::spawn(async move {
                    loop {
                        let batch = match el.poll().await {
                            Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                                if let Err(e) = client.try_ack(&p) {
                                    let _ = tx.send(Err(mqtt_err(&id, format!("ack not queued: {e}"))));
                                    return;
                                }
                                vec![parse_body(&p.payload)]
                            }
                            Ok(_) => continue,
                            Err(e) => {
                                let _ = tx.send(Err(mqtt_err(&id, e)));
                                return;
                            }
                        };
                        if tx.send(Ok(batch)).is_err() {
                            return;
                        }
                    }
                })
            }
        };
        Ok(Subscriber { rx, task })
    }

    /// The stamps of the next batch of arrivals (`None` for a body the bench did not write);
    /// cancel-safe. An error when the subscriber's connection failed.
    pub async fn next(&mut self) -> Result<Vec<Option<Stamp>>, Error> {
        match self.rx.recv().await {
            Some(r) => r,
            None => Err(Error::closed("subscriber task")),
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hubmsg_core::transport::{PacketReader, PacketWriter, MAX_PACKET_SIZE};
    use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, SubAck, SubscribeReasonCode};
    use tokio::net::TcpListener;

    /// The broker's side of one connection on 127.0.0.1: answers CONNECT, then runs `serve`.
    async fn peer<F, Fut>(serve: F) -> (Target, tokio::task::JoinHandle<Result<(), Error>>)
    where
        F: FnOnce(PacketReader<tokio::net::tcp::OwnedReadHalf>, PacketWriter<tokio::net::tcp::OwnedWriteHalf>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), Error>> + Send,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.map_err(|e| Error::storage("accept", e))?;
            let (rd, wr) = tcp.into_split();
            let (mut r, mut w) = (PacketReader::new(rd, MAX_PACKET_SIZE), PacketWriter::new(wr));
            match r.next().await? {
                Some(Packet::Connect(c)) if !c.clean_session => {}
                other => return Err(Error::protocol(format!("expected a persistent-session CONNECT, got {other:?}"))),
            }
            w.send(&Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false))).await?;
            serve(r, w).await
        });
        (Target { port, username: String::new(), password: String::new() }, task)
    }

    #[tokio::test]
    async fn publisher_keeps_its_window_and_counts_acks_that_come_out_of_order() {
        const COUNT: u64 = 5_000;
        const WINDOW: usize = 64;
        let (target, broker) = peer(|mut r, mut w| async move {
            let mut seen = std::collections::HashSet::new();
            let mut unacked: Vec<u16> = Vec::new();
            let mut most_in_flight = 0;
            while (seen.len() as u64) < COUNT {
                let mut pkt = r.next().await?;
                let mut drain = Drain::new();
                while let Some(p) = pkt.take() {
                    let Packet::Publish(p) = p else { return Err(Error::protocol(format!("unexpected {p:?}"))) };
                    let stamp = parse_body(&p.payload).ok_or_else(|| Error::protocol("a body the bench did not write"))?;
                    assert!(seen.insert(stamp.seq), "message {} sent twice", stamp.seq);
                    assert!(!unacked.contains(&p.pkid), "packet id {} reused while in flight", p.pkid);
                    unacked.push(p.pkid);
                    most_in_flight = most_in_flight.max(unacked.len());
                    pkt = drain.next(&mut r)?;
                }
                // Acknowledge what arrived, newest first, leaving the oldest few for later.
                let keep = unacked.len().min(3);
                for id in unacked.drain(keep..).rev() {
                    w.queue(&Packet::PubAck(PubAck::new(id)))?;
                }
                if (seen.len() as u64) == COUNT {
                    for id in unacked.drain(..) {
                        w.queue(&Packet::PubAck(PubAck::new(id)))?;
                    }
                }
                w.flush().await?;
            }
            assert!(most_in_flight <= WINDOW, "{most_in_flight} publishes in flight, window {WINDOW}");
            Ok(())
        })
        .await;
        let p = Publisher::connect(ClientKind::Transport, &target, "pub", WINDOW).await.unwrap();
        tokio::time::timeout(Duration::from_secs(60), p.run("t".into(), 7, COUNT, Instant::now())).await.unwrap().unwrap();
        broker.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn publisher_refuses_a_puback_for_an_id_not_in_flight() {
        let (target, _broker) = peer(|mut r, mut w| async move {
            while r.next().await?.is_some() {
                w.send(&Packet::PubAck(PubAck::new(999))).await?;
            }
            Ok(())
        })
        .await;
        let p = Publisher::connect(ClientKind::Transport, &target, "pub", 10).await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(60), p.run("t".into(), 0, 100, Instant::now())).await.unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
        assert!(e.to_string().contains("999"), "{e}");
    }

    #[tokio::test]
    async fn subscriber_acknowledges_every_message_and_hands_over_every_stamp() {
        const COUNT: u64 = 3_000;
        let (target, broker) = peer(|mut r, mut w| async move {
            match r.next().await? {
                Some(Packet::Subscribe(s)) if s.filters[0].path == "bench/#" => {
                    w.send(&Packet::SubAck(SubAck::new(s.pkid, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]))).await?
                }
                other => return Err(Error::protocol(format!("expected SUBSCRIBE, got {other:?}"))),
            }
            for seq in 0..COUNT {
                let mut p = Publish::from_bytes("bench/1", QoS::AtLeastOnce, body(Stamp { sent_ns: 0, device: 1, seq, scheduled_ns: 0 }));
                p.pkid = (seq % 60_000) as u16 + 1;
                w.queue(&Packet::Publish(p))?;
            }
            w.flush().await?;
            let mut acked = 0;
            while acked < COUNT {
                match r.next().await? {
                    Some(Packet::PubAck(_)) => acked += 1,
                    other => return Err(Error::protocol(format!("expected PUBACK, got {other:?}"))),
                }
            }
            Ok(())
        })
        .await;
        let mut sub = Subscriber::start(ClientKind::Transport, &target, "sub", "bench/#", 1000).await.unwrap();
        let mut seqs = Vec::new();
        while (seqs.len() as u64) < COUNT {
            let batch = tokio::time::timeout(Duration::from_secs(60), sub.next()).await.unwrap().unwrap();
            seqs.extend(batch.into_iter().map(|s| s.expect("a bench body").seq));
        }
        assert_eq!(seqs, (0..COUNT).collect::<Vec<_>>());
        tokio::time::timeout(Duration::from_secs(60), broker).await.unwrap().unwrap().unwrap();
    }

    #[test]
    fn window_never_reuses_an_id_in_flight() {
        let mut w = PkidWindow::new(3);
        let a = w.open();
        let b = w.open();
        let c = w.open();
        assert_eq!((a, b, c), (1, 2, 3));
        assert!(!w.has_room());
        assert!(w.close(b));
        assert!(!w.close(b), "a second PUBACK for the same id is refused");
        assert!(!w.close(0));
        assert!(!w.close(77));
        assert_eq!(w.open(), 4);
        assert!(!w.has_room(), "three in flight again");
    }

    #[test]
    fn window_wraps_past_65535_and_skips_ids_still_in_flight() {
        let mut w = PkidWindow::new(2);
        let first = w.open();
        assert_eq!(first, 1);
        // Cycle the second slot all the way round while id 1 stays in flight.
        for _ in 0..70_000 {
            let id = w.open();
            assert_ne!(id, first);
            assert_ne!(id, 0);
            assert!(w.close(id));
        }
        assert!(w.close(first));
        assert!(w.has_room() && w.open() != 0);
    }

    #[test]
    fn window_limit_is_clamped_to_the_id_space() {
        let mut w = PkidWindow::new(100_000);
        for _ in 0..u16::MAX {
            w.open();
        }
        assert!(!w.has_room());
        let mut w = PkidWindow::new(0);
        assert!(w.has_room());
        w.open();
        assert!(!w.has_room());
    }
}
