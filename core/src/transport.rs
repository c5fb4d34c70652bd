//! The MQTT 3.1.1 byte layer shared by the clients and the hub: rumqttc's `mqttbytes::v4` codec
//! over TCP or TLS (rustls). Only framing and dialing live here; sessions, retransmission and
//! pacing belong to the outbox and the drivers above, so nothing in this module keeps state
//! across connections.
//!
//! Invariants: a [`PacketReader`] never yields a partial packet and never buffers more than one
//! maximum-size packet plus one read chunk; an oversize or malformed frame (including fixed-header
//! flags MQTT 3.1.1 §2.2.2 reserves) is an error, after which the connection must be closed. A
//! reader or writer allocates nothing before its first byte, and their buffers follow the
//! traffic: a read chunk grows (up to [`MAX_READ_CHUNK`]) while reads fill it and falls back to
//! the size reads need when they stop, a buffer emptied of a large packet or burst is given back,
//! so an idle connection holds at most one small read chunk besides its socket
//! (`docs/benchmarks/README.md`, memory per connection).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{self, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::{Error, ErrorKind, Result};

/// Largest packet a client or the hub accepts: a 256 KB D2C message plus a long topic (property
/// bag) and framing. rumqttc's 10 KB default would reject legal IoT Hub messages.
pub const MAX_PACKET_SIZE: usize = 256 * 1024 + 64 * 1024;

/// Most packets a connection loop handles from one read (via [`PacketReader::try_next`]) before
/// it writes and looks at its other inputs again: large enough to batch acknowledgements under
/// load, small enough that one busy peer cannot starve timers and commands.
pub const DRAIN_BATCH: usize = 256;

/// Hands out the packets already buffered behind the one a connection loop woke up for, at
/// most [`DRAIN_BATCH`] per wake-up in all (see [`PacketReader::try_next`]).
#[derive(Debug)]
pub struct Drain {
    left: usize,
}

impl Drain {
    /// A fresh batch (the packet the loop woke up for counts as the first).
    pub fn new() -> Drain {
        Drain { left: DRAIN_BATCH - 1 }
    }

    /// The next buffered packet; `Ok(None)` when none is buffered or the batch is used up.
    pub fn next<R: AsyncRead + Unpin>(&mut self, reader: &mut PacketReader<R>) -> Result<Option<Packet>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        reader.try_next()
    }
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

/// Any byte stream a connection can run on (TCP or TLS over TCP).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// A boxed [`Stream`].
pub type BoxStream = Box<dyn Stream>;

/// Serializes one packet into `buf`.
pub fn encode(packet: &Packet, buf: &mut BytesMut) -> Result<()> {
    let r = match packet {
        Packet::Connect(p) => p.write(buf),
        Packet::ConnAck(p) => p.write(buf),
        Packet::Publish(p) => p.write(buf),
        Packet::PubAck(p) => p.write(buf),
        Packet::PubRec(p) => p.write(buf),
        Packet::PubRel(p) => p.write(buf),
        Packet::PubComp(p) => p.write(buf),
        Packet::Subscribe(p) => p.write(buf),
        Packet::SubAck(p) => p.write(buf),
        Packet::Unsubscribe(p) => p.write(buf),
        Packet::UnsubAck(p) => p.write(buf),
        Packet::PingReq => v4::PingReq.write(buf),
        Packet::PingResp => v4::PingResp.write(buf),
        Packet::Disconnect => v4::Disconnect.write(buf),
    };
    r.map(|_| ()).map_err(|e| Error::protocol(format!("cannot encode MQTT packet: {e}")))
}

/// Largest CONNECT the hub reads (user name, SAS token, client id and a small will); anything
/// bigger is refused before authentication, so an unauthenticated peer cannot make the hub
/// reserve a full-size packet buffer.
pub const MAX_CONNECT_SIZE: usize = 8 * 1024;

/// The first packet of a connection as the hub sees it (see [`PacketReader::next_connect`]).
#[derive(Debug)]
pub enum ConnectRead {
    /// An MQTT 3.1.1 CONNECT.
    Connect(v4::Connect),
    /// A CONNECT of another protocol version (`MQIsdp` level 3, MQTT 5, …): the spec wants
    /// CONNACK 1 and a close (MQTT-3.1.2-2).
    UnsupportedVersion {
        /// The protocol name as sent.
        name: String,
        /// The protocol level as sent.
        level: u8,
    },
    /// Any other packet.
    Other(Packet),
    /// End of stream before a packet.
    Closed,
}

/// Checks the flags of an MQTT 3.1.1 fixed header's first byte (§2.2.2): PUBREL, SUBSCRIBE and
/// UNSUBSCRIBE must carry `0010`, PUBLISH any flags but QoS 3 and DUP on QoS 0, every other type
/// `0000`; packet types 0 and 15 are reserved. The error says what is wrong.
pub fn check_fixed_header(byte1: u8) -> std::result::Result<(), String> {
    let (kind, flags) = (byte1 >> 4, byte1 & 0x0f);
    let want = match kind {
        0 | 15 => return Err(format!("reserved packet type {kind}")),
        3 => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err("PUBLISH with QoS 3".into());
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err("PUBLISH with QoS 0 and DUP set (MQTT-3.3.1-2)".into());
            }
            return Ok(());
        }
        6 | 8 | 10 => 0b0010,
        _ => 0,
    };
    if flags != want {
        return Err(format!("packet type {kind} with fixed-header flags {flags:04b}; MQTT 3.1.1 requires {want:04b} (§2.2.2)"));
    }
    Ok(())
}

/// Protocol name and level of a whole CONNECT frame (`None` if it is too short to tell).
pub fn connect_version(frame: &[u8]) -> Option<(String, u8)> {
    // Skip the fixed header: type byte plus 1–4 remaining-length bytes.
    let mut i = 1;
    while i < frame.len() && i <= 4 && frame[i] & 0x80 != 0 {
        i += 1;
    }
    let rest = frame.get(i + 1..)?;
    let len = u16::from_be_bytes([*rest.first()?, *rest.get(1)?]) as usize;
    let name = rest.get(2..2 + len)?;
    let level = *rest.get(2 + len)?;
    Some((String::from_utf8_lossy(name).into_owned(), level))
}

/// Largest chunk one read asks the socket for: a busy connection's read chunk doubles up to this
/// while reads fill it (hundreds of small packets per system call under load).
pub const MAX_READ_CHUNK: usize = 64 * 1024;

/// Smallest read chunk by default: what an idle or slow connection keeps while it waits.
pub const MIN_READ_CHUNK: usize = 512;

/// The read chunk after a read of `got` bytes into `room` bytes of space, for a reader whose
/// chunk is `chunk` and may range over `min..=MAX_READ_CHUNK` (pure, see [`PacketReader`]): a
/// read that filled its space doubles the chunk (more is probably waiting), one that used less
/// than an eighth of it shrinks the chunk to what it needed (twice `got`, rounded up to a power
/// of two), anything between keeps it.
pub fn next_read_chunk(chunk: usize, min: usize, room: usize, got: usize) -> usize {
    let max = MAX_READ_CHUNK.max(min);
    if got >= room {
        (chunk * 2).clamp(min, max)
    } else if got < room / 8 {
        (got * 2).next_power_of_two().clamp(min, max)
    } else {
        chunk.clamp(min, max)
    }
}

/// Reads whole MQTT packets from a byte stream.
///
/// Memory: each read reserves the current read chunk (see [`next_read_chunk`]); when parsing
/// leaves the buffer empty and it holds more than one chunk (a large packet, a burst that
/// ended), the allocation is dropped, and a packet handed out keeps only its own bytes alive.
pub struct PacketReader<R> {
    inner: R,
    buf: BytesMut,
    max_size: usize,
    min_read: usize,
    chunk: usize,
}

impl<R: AsyncRead + Unpin> PacketReader<R> {
    /// Wraps `inner`; frames larger than `max_size` are rejected.
    pub fn new(inner: R, max_size: usize) -> Self {
        PacketReader { inner, buf: BytesMut::new(), max_size, min_read: MIN_READ_CHUNK, chunk: MIN_READ_CHUNK }
    }

    /// Changes the largest frame accepted from now on and the smallest read chunk (e.g. a
    /// small frame limit before CONNECT, the full one once authenticated). The read chunk still
    /// grows with the traffic up to [`MAX_READ_CHUNK`].
    pub fn set_limits(&mut self, max_size: usize, min_read: usize) {
        self.max_size = max_size;
        self.min_read = min_read.max(64);
        self.chunk = self.chunk.max(self.min_read);
    }

    /// Capacity of the read buffer now (bytes reserved, whether filled or not).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Makes room for a read: at least `missing` bytes (the rest of a packet) and one chunk.
    /// An empty buffer larger than a chunk is given back first.
    fn make_room(&mut self, missing: usize) {
        if self.buf.is_empty() && self.buf.capacity() > self.chunk.max(missing) {
            self.buf = BytesMut::new();
        }
        self.buf.reserve(missing.max(self.chunk));
    }

    /// The first packet of a connection: like [`PacketReader::next`], but a CONNECT whose
    /// protocol is not MQTT 3.1.1 (name `MQTT`, level 4) comes back as
    /// [`ConnectRead::UnsupportedVersion`] instead of an error or a parsed MQTT 5 CONNECT.
    pub async fn next_connect(&mut self) -> Result<ConnectRead> {
        loop {
            if let Some(len) = self.buffered_frame_len()? {
                if self.buf[0] >> 4 == 1 {
                    if let Some((name, level)) = connect_version(&self.buf[..len]) {
                        if (name.as_str(), level) != ("MQTT", 4) {
                            let _ = self.buf.split_to(len);
                            return Ok(ConnectRead::UnsupportedVersion { name, level });
                        }
                    }
                }
            }
            match self.parse()? {
                Ok(Packet::Connect(c)) => return Ok(ConnectRead::Connect(c)),
                Ok(p) => return Ok(ConnectRead::Other(p)),
                Err(missing) => self.make_room(missing),
            }
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(ConnectRead::Closed)
                } else {
                    Err(Error::new(ErrorKind::Disconnected, "connection closed in the middle of a packet"))
                };
            }
        }
    }

    /// Length of the whole frame at the front of the buffer, if it is all there.
    fn buffered_frame_len(&self) -> Result<Option<usize>> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        check_fixed_header(self.buf[0]).map_err(|e| Error::protocol(format!("malformed MQTT packet: {e}")))?;
        match rumqttc::mqttbytes::check(self.buf.iter(), self.max_size) {
            Ok(h) => Ok(Some(h.frame_length())),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n)) => Err(self.too_large(n)),
            Err(e) => Err(Error::protocol(format!("malformed MQTT packet: {e}"))),
        }
    }

    /// Reads once into the buffer and adapts the read chunk to what came; false at end of
    /// stream.
    async fn fill(&mut self) -> Result<bool> {
        let room = self.buf.capacity() - self.buf.len();
        let n = self
            .inner
            .read_buf(&mut self.buf)
            .await
            .map_err(|e| Error::new(ErrorKind::Disconnected, format!("connection read failed: {e}")).with_source(e))?;
        self.chunk = next_read_chunk(self.chunk, self.min_read, room, n);
        Ok(n > 0)
    }

    fn too_large(&self, n: usize) -> Error {
        Error::new(ErrorKind::MessageTooLarge, format!("MQTT packet of {n} bytes exceeds the limit of {} bytes", self.max_size))
    }

    /// The next packet; `Ok(None)` on a clean end of stream between packets. Cancel-safe: a
    /// cancelled call loses no bytes.
    pub async fn next(&mut self) -> Result<Option<Packet>> {
        loop {
            match self.parse()? {
                Ok(p) => return Ok(Some(p)),
                Err(missing) => self.make_room(missing),
            }
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Error::new(ErrorKind::Disconnected, "connection closed in the middle of a packet"))
                };
            }
        }
    }

    /// Whether a complete packet may already be buffered (so a caller can drain without waiting).
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// The next packet if a whole one is already buffered, without any I/O. Loops call this
    /// after [`PacketReader::next`] to handle everything that arrived in one read before they
    /// write again, so acknowledgements and refills go out in batches instead of one packet
    /// per syscall.
    pub fn try_next(&mut self) -> Result<Option<Packet>> {
        Ok(self.parse()?.ok())
    }

    /// One packet from the buffer, or `Err(bytes still missing)` (at least 1).
    fn parse(&mut self) -> Result<std::result::Result<Packet, usize>> {
        if self.buf.is_empty() {
            return Ok(Err(2));
        }
        check_fixed_header(self.buf[0]).map_err(|e| Error::protocol(format!("malformed MQTT packet: {e}")))?;
        match v4::read(&mut self.buf, self.max_size) {
            Ok(p) => Ok(Ok(p)),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(n)) => Ok(Err(n.max(1))),
            Err(rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(n)) => Err(self.too_large(n)),
            Err(e) => Err(Error::protocol(format!("malformed MQTT packet: {e}"))),
        }
    }
}

impl<R> std::fmt::Debug for PacketReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketReader").field("buffered", &self.buf.len()).finish_non_exhaustive()
    }
}

impl<W> std::fmt::Debug for PacketWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketWriter").field("pending", &self.buf.len()).finish_non_exhaustive()
    }
}

/// Largest write buffer a [`PacketWriter`] keeps across flushes regardless of use; a larger one is
/// kept while it is at most four times the recent flushes (a high-water mark that decays by an
/// eighth per flush), so a busy connection reuses its buffer and one whose burst ended gives it
/// back after a few small flushes.
pub const KEEP_WRITE_BUFFER: usize = 1024;

/// Writes packets through a buffer; [`PacketWriter::flush`] sends everything queued in one write.
pub struct PacketWriter<W> {
    inner: W,
    buf: BytesMut,
    /// Recent flush size, decaying (see [`KEEP_WRITE_BUFFER`]).
    high_water: usize,
}

impl<W: AsyncWrite + Unpin> PacketWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        PacketWriter { inner, buf: BytesMut::new(), high_water: 0 }
    }

    /// Queues a packet (no I/O).
    pub fn queue(&mut self, packet: &Packet) -> Result<()> {
        encode(packet, &mut self.buf)
    }

    /// Queues bytes exactly as given (no encoding): for proxies and for tests that must put
    /// malformed packets on the wire.
    pub fn queue_raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes queued and not yet flushed.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Capacity of the write buffer now (bytes reserved, whether queued or not).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = async {
            self.inner.write_all(&self.buf).await?;
            self.inner.flush().await
        }
        .await;
        // Keep the buffer for the next batch of the same size; give back one that a burst grew
        // once flushes stay small, so an idle connection holds no large write buffer.
        self.high_water = self.buf.len().max(self.high_water - self.high_water / 8);
        if self.buf.capacity() > KEEP_WRITE_BUFFER.max(4 * self.high_water) {
            self.buf = BytesMut::new();
        } else {
            self.buf.clear();
        }
        r.map_err(|e| Error::new(ErrorKind::Disconnected, format!("connection write failed: {e}")).with_source(e))
    }

    /// [`PacketWriter::flush`] within `limit`: a peer that does not take the bytes in time (it
    /// stopped reading, its window stays closed) gets a `Timeout` error, after which the
    /// connection must be closed (part of the buffer may have been written).
    pub async fn flush_within(&mut self, limit: Duration) -> Result<()> {
        match tokio::time::timeout(limit, self.flush()).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("the peer did not read {} queued bytes within {limit:?}; closing the connection", self.buf.len()),
            )),
        }
    }

    /// Queues and flushes one packet.
    pub async fn send(&mut self, packet: &Packet) -> Result<()> {
        self.queue(packet)?;
        self.flush().await
    }

    /// Shuts the write side down (best effort, at most 1 s: a peer that does not read cannot
    /// hold it up).
    pub async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let _ = self.flush().await;
            let _ = self.inner.shutdown().await;
        })
        .await;
    }
}

/// How a client reaches a hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or IP address (no port, no brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// TLS settings; `None` means plain MQTT over TCP (local hubs only; Azure requires TLS).
    pub tls: Option<TlsOptions>,
}

/// Client TLS settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM file with the CA certificate(s) to trust instead of the built-in web PKI roots (e.g.
    /// the self-signed certificate a local hub generated).
    pub ca_file: Option<PathBuf>,
}

impl Endpoint {
    /// The endpoint a connection-string `HostName` means: no port → TLS on 8883 (IoT Hub);
    /// an explicit port → plain TCP to that port (a local hub), unless `tls` is given, which
    /// always turns TLS on.
    pub fn from_host_name(host: &str, port: Option<u16>, tls: Option<TlsOptions>) -> Endpoint {
        match (port, tls) {
            (None, tls) => Endpoint { host: host.to_string(), port: 8883, tls: Some(tls.unwrap_or_default()) },
            (Some(port), tls) => Endpoint { host: host.to_string(), port, tls },
        }
    }
}

/// TCP keep-alive and user-timeout settings put on every socket (hub and clients), so a peer
/// that vanished (power cut, cable pulled, NAT entry dropped) is noticed by the kernel even
/// while nothing is being sent, and written data that stays unacknowledged ends the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketTuning {
    /// Idle time before the first keep-alive probe. Default 30 s.
    pub keepalive_idle: Duration,
    /// Time between probes. Default 10 s.
    pub keepalive_interval: Duration,
    /// Unanswered probes before the connection is dropped. Default 3.
    pub keepalive_probes: u32,
    /// Longest time written data may stay unacknowledged by the peer (`TCP_USER_TIMEOUT`).
    /// Default 60 s.
    pub user_timeout: Duration,
}

impl Default for SocketTuning {
    fn default() -> Self {
        SocketTuning {
            keepalive_idle: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(10),
            keepalive_probes: 3,
            user_timeout: Duration::from_secs(60),
        }
    }
}

/// Applies [`SocketTuning`] and `TCP_NODELAY` to a socket (best effort: a setting the platform
/// lacks is skipped).
pub fn tune_socket(tcp: &TcpStream, t: &SocketTuning) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    let ka = socket2::TcpKeepalive::new().with_time(t.keepalive_idle).with_interval(t.keepalive_interval);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "macos", target_os = "freebsd"))]
    let ka = ka.with_retries(t.keepalive_probes);
    let _ = sock.set_tcp_keepalive(&ka);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = sock.set_tcp_user_timeout(Some(t.user_timeout));
}

/// Opens a TCP (and, if configured, TLS) connection to `endpoint` within `timeout`.
pub async fn dial(endpoint: &Endpoint, timeout: Duration) -> Result<BoxStream> {
    let fut = async {
        let addr = format!("{}:{}", bracket(&endpoint.host), endpoint.port);
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|e| Error::new(ErrorKind::Disconnected, format!("cannot connect to {addr}: {e}")).with_source(e))?;
        tune_socket(&tcp, &SocketTuning::default());
        match &endpoint.tls {
            None => Ok(Box::new(tcp) as BoxStream),
            Some(tls) => tls_connect(tcp, &endpoint.host, tls).await,
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => {
            Err(Error::new(ErrorKind::Timeout, format!("connecting to {}:{} took longer than {timeout:?}", endpoint.host, endpoint.port)))
        }
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

#[cfg(feature = "tls")]
async fn tls_connect(tcp: TcpStream, host: &str, opts: &TlsOptions) -> Result<BoxStream> {
    use std::sync::Arc;
    let config = client_tls_config(opts)?;
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|_| Error::invalid(format!("'{host}' is not a valid TLS server name")))?;
    let conn = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| {
        let kind = if e.kind() == std::io::ErrorKind::InvalidData { ErrorKind::Unauthorized } else { ErrorKind::Disconnected };
        Error::new(kind, format!("TLS handshake with {host} failed: {e}")).with_source(e)
    })?;
    Ok(Box::new(conn))
}

#[cfg(not(feature = "tls"))]
async fn tls_connect(_tcp: TcpStream, host: &str, _opts: &TlsOptions) -> Result<BoxStream> {
    Err(Error::invalid(format!("TLS to {host} requested but hubmsg was built without the `tls` feature")))
}

/// Builds a rustls client configuration trusting `opts.ca_file` (or the web PKI roots).
#[cfg(feature = "tls")]
pub fn client_tls_config(opts: &TlsOptions) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    match &opts.ca_file {
        Some(path) => {
            for cert in load_certs(path)? {
                roots.add(cert).map_err(|e| Error::invalid(format!("CA file {}: unusable certificate: {e}", path.display())))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(ErrorKind::Internal, format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Reads every certificate from a PEM file.
#[cfg(feature = "tls")]
pub fn load_certs(path: &std::path::Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let data = std::fs::read(path).map_err(|e| Error::invalid(format!("cannot read {}: {e}", path.display())))?;
    let certs: std::result::Result<Vec<_>, _> = rustls_pemfile::certs(&mut data.as_slice()).collect();
    let certs = certs.map_err(|e| Error::invalid(format!("{}: not a PEM certificate file: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::invalid(format!("{}: no certificate found", path.display())));
    }
    Ok(certs)
}

/// A listener address with the kind of traffic it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// Bound address (port 0 is replaced by the real port once bound).
    pub addr: SocketAddr,
    /// Whether the listener speaks TLS.
    pub tls: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::QoS;

    #[tokio::test]
    async fn reader_reassembles_packets_split_anywhere() {
        let mut wire = BytesMut::new();
        let p1 = Packet::Publish(v4::Publish::new("devices/d/messages/events/", QoS::AtLeastOnce, vec![7u8; 3000]));
        let mut p1b = p1.clone();
        if let Packet::Publish(p) = &mut p1b {
            p.pkid = 9;
        }
        encode(&p1b, &mut wire).unwrap();
        encode(&Packet::PingReq, &mut wire).unwrap();
        // Feed the bytes one at a time through a duplex pipe.
        let (mut a, b) = tokio::io::duplex(1);
        let bytes = wire.to_vec();
        tokio::spawn(async move {
            for chunk in bytes.chunks(1) {
                a.write_all(chunk).await.unwrap();
            }
        });
        let mut r = PacketReader::new(b, MAX_PACKET_SIZE);
        assert_eq!(r.next().await.unwrap(), Some(p1b));
        assert_eq!(r.next().await.unwrap(), Some(Packet::PingReq));
        assert_eq!(r.next().await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversize_and_garbage_are_errors() {
        let mut wire = BytesMut::new();
        let mut p = v4::Publish::new("t", QoS::AtLeastOnce, vec![0u8; 5000]);
        p.pkid = 1;
        encode(&Packet::Publish(p), &mut wire).unwrap();
        let mut r = PacketReader::new(&wire[..], 1000);
        assert_eq!(r.next().await.unwrap_err().kind(), ErrorKind::MessageTooLarge);

        let garbage = [0xffu8, 0xff, 0xff, 0xff, 0xff, 0x01];
        let mut r = PacketReader::new(&garbage[..], MAX_PACKET_SIZE);
        assert!(r.next().await.is_err());
    }

    #[test]
    fn read_chunk_follows_the_traffic() {
        // Filled reads double the chunk up to the ceiling.
        let mut c = MIN_READ_CHUNK;
        for _ in 0..20 {
            c = next_read_chunk(c, MIN_READ_CHUNK, c, c);
        }
        assert_eq!(c, MAX_READ_CHUNK);
        // A small read after a burst falls back to what it needed at once.
        assert_eq!(next_read_chunk(MAX_READ_CHUNK, MIN_READ_CHUNK, MAX_READ_CHUNK, 200), MIN_READ_CHUNK);
        assert_eq!(next_read_chunk(MAX_READ_CHUNK, MIN_READ_CHUNK, MAX_READ_CHUNK, 300), 1024);
        assert_eq!(next_read_chunk(MAX_READ_CHUNK, MIN_READ_CHUNK, MAX_READ_CHUNK, 3000), 8192);
        // A read using a fair part of its room keeps the chunk; the floor is respected.
        assert_eq!(next_read_chunk(4096, MIN_READ_CHUNK, 4096, 1024), 4096);
        assert_eq!(next_read_chunk(4096, 16 * 1024, 4096, 10), 16 * 1024);
    }

    #[tokio::test]
    async fn buffers_shrink_back_after_a_large_packet_and_a_burst() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut w = PacketWriter::new(a);
        let mut r = PacketReader::new(b, MAX_PACKET_SIZE);
        // A burst of small packets and one large one, in one write.
        for i in 1..=200u16 {
            let mut p = v4::Publish::new("devices/d/messages/events/", QoS::AtLeastOnce, vec![1u8; 256]);
            p.pkid = i;
            w.queue(&Packet::Publish(p)).unwrap();
        }
        let mut big = v4::Publish::new("devices/d/messages/events/", QoS::AtLeastOnce, vec![2u8; 200_000]);
        big.pkid = 201;
        w.queue(&Packet::Publish(big)).unwrap();
        assert!(w.buffer_capacity() > 200_000);
        w.flush().await.unwrap();
        assert!(w.buffer_capacity() > 200_000, "a busy writer keeps its buffer for the next batch");
        let mut n = 0;
        while n < 201 {
            let Some(Packet::Publish(p)) = r.next().await.unwrap() else { panic!("expected a publish") };
            n += 1;
            assert_eq!(p.pkid, n);
            while let Some(Packet::Publish(p)) = r.try_next().unwrap() {
                n += 1;
                assert_eq!(p.pkid, n);
            }
        }
        // Then the connection goes quiet: one small packet now and then.
        for _ in 0..100 {
            w.send(&Packet::PingReq).await.unwrap();
            assert_eq!(r.next().await.unwrap(), Some(Packet::PingReq));
        }
        assert!(w.buffer_capacity() <= KEEP_WRITE_BUFFER);
        assert!(r.buffer_capacity() <= MIN_READ_CHUNK, "reader kept {} bytes while quiet", r.buffer_capacity());
    }

    #[test]
    fn host_name_port_rules() {
        let e = Endpoint::from_host_name("h.azure-devices.net", None, None);
        assert_eq!((e.port, e.tls.is_some()), (8883, true));
        let e = Endpoint::from_host_name("127.0.0.1", Some(18830), None);
        assert_eq!((e.port, e.tls.is_some()), (18830, false));
        let e = Endpoint::from_host_name("localhost", Some(18831), Some(TlsOptions::default()));
        assert_eq!((e.port, e.tls.is_some()), (18831, true));
    }
}

/// Reader and writer halves of an established client connection.
pub type ClientHalves = (PacketReader<tokio::io::ReadHalf<BoxStream>>, PacketWriter<tokio::io::WriteHalf<BoxStream>>);

/// What a client puts in CONNECT.
#[derive(Debug, Clone)]
pub struct ConnectParams {
    /// MQTT client id.
    pub client_id: String,
    /// User name.
    pub username: String,
    /// Password (a SAS token).
    pub password: String,
    /// Keep-alive in seconds.
    pub keep_alive_secs: u16,
    /// Clean session flag (IoT Hub devices use `false`).
    pub clean_session: bool,
}

/// Dials `endpoint`, sends CONNECT, and waits for an accepting CONNACK, all within `timeout`.
/// Returns the halves and the CONNACK session-present flag. A refusing CONNACK maps to
/// `Unauthorized` (codes 4, 5), `InvalidArgument` (1, 2) or `Disconnected` (3, server busy).
pub async fn client_connect(endpoint: &Endpoint, params: &ConnectParams, timeout: Duration) -> Result<(ClientHalves, bool)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let stream = dial(endpoint, timeout).await?;
    let (rd, wr) = tokio::io::split(stream);
    let mut reader = PacketReader::new(rd, MAX_PACKET_SIZE);
    let mut writer = PacketWriter::new(wr);
    let mut connect = v4::Connect::new(params.client_id.clone());
    connect.keep_alive = params.keep_alive_secs;
    connect.clean_session = params.clean_session;
    connect.set_login(params.username.clone(), params.password.clone());
    writer.send(&Packet::Connect(connect)).await?;
    let ack = match tokio::time::timeout_at(deadline, reader.next()).await {
        Err(_) => {
            return Err(Error::new(ErrorKind::Timeout, format!("no CONNACK from {}:{} within {timeout:?}", endpoint.host, endpoint.port)))
        }
        Ok(Ok(Some(Packet::ConnAck(ack)))) => ack,
        Ok(Ok(Some(other))) => return Err(Error::protocol(format!("expected CONNACK, got {other:?}"))),
        Ok(Ok(None)) => return Err(Error::new(ErrorKind::Disconnected, "the hub closed the connection before CONNACK")),
        Ok(Err(e)) => return Err(e),
    };
    use v4::ConnectReturnCode as C;
    match ack.code {
        C::Success => Ok(((reader, writer), ack.session_present)),
        C::NotAuthorized => Err(Error::new(ErrorKind::Unauthorized, "the hub refused the credentials (CONNACK 5, not authorized): check the key, the token's expiry and that the device exists and is enabled")),
        C::BadUserNamePassword => Err(Error::new(ErrorKind::Unauthorized, "the hub refused the user name or password format (CONNACK 4)")),
        C::BadClientId => Err(Error::invalid("the hub rejected the client id (CONNACK 2): it must equal the device id")),
        C::RefusedProtocolVersion => Err(Error::invalid("the hub does not speak MQTT 3.1.1 (CONNACK 1)")),
        C::ServiceUnavailable => Err(Error::new(ErrorKind::Disconnected, "the hub is busy (CONNACK 3); retrying later")),
    }
}

/// Why one connection of a client driver ended (see [`Link`]).
#[derive(Debug)]
pub(crate) enum End {
    /// The application closed the client: stop.
    Closed,
    /// The SAS token is due for renewal: reconnect at once with a fresh one. Not a failure: no
    /// backoff, no `Disconnected` status, counted as a renewal.
    Renew,
    /// The connection failed: retry per the policy (or stop on a permanent error).
    Failed(Error),
}

/// What a command that arrived while a driver waited (backing off, or failed) asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Idle {
    /// Handled; keep waiting.
    Continue,
    /// Try to connect now (e.g. [`crate::DeviceClient::reconnect`]).
    Reconnect,
    /// The application closed the client: stop.
    Close,
}

/// One client driver's connection lifecycle. The device driver and the service drivers (main
/// client and event streams) implement it; [`run_link`] is the one reconnect / renewal loop
/// they share.
pub(crate) trait Link {
    /// An established connection and when its token must be renewed.
    type Conn;
    /// One connection attempt (token generation, dial, CONNECT, CONNACK).
    fn connect(&mut self) -> impl std::future::Future<Output = Result<Self::Conn>> + Send;
    /// Runs one connection until it ends.
    fn serve(&mut self, conn: Self::Conn) -> impl std::future::Future<Output = End> + Send;
    /// Waits for the next command while not connected and handles it; `failed` is the
    /// permanent error when the driver gave up (commands should then fail with it).
    fn idle(&mut self, failed: Option<&Error>) -> impl std::future::Future<Output = Idle> + Send;
    /// A connection came up (before `serve`).
    fn connected(&mut self) {}
    /// A connection ended (after `serve`), whatever the reason.
    fn ended(&mut self, _end: &End) {}
    /// A connect attempt or a connection failed; `retrying` says whether a retry follows.
    fn failed(&mut self, _err: &Error, _retrying: bool) {}
}

/// The reconnect loop of every client: connect; serve; on [`End::Renew`] reconnect at once; on
/// a failure wait per `policy` (the backoff resets only after a healthy connection, see
/// [`crate::retry::Backoff`]) or, for a permanent error, stay `Failed` until a command asks to
/// reconnect; publish every state on `status`. Returns when the link is closed.
pub(crate) async fn run_link<L: Link + Send>(
    link: &mut L,
    policy: &crate::retry::RetryPolicy,
    status: &tokio::sync::watch::Sender<crate::device::ConnectionStatus>,
) {
    use crate::device::ConnectionStatus;
    use crate::retry::{classify, Backoff, Retry};
    let mut backoff = Backoff::new(policy.clone());
    let epoch = tokio::time::Instant::now();
    loop {
        status.send_replace(ConnectionStatus::Connecting);
        let err = match link.connect().await {
            Ok(conn) => {
                backoff.connected(epoch.elapsed());
                link.connected();
                status.send_replace(ConnectionStatus::Connected);
                let end = link.serve(conn).await;
                link.ended(&end);
                match end {
                    End::Closed => return,
                    End::Renew => continue,
                    End::Failed(e) => {
                        status.send_replace(ConnectionStatus::Disconnected { reason: e.to_string() });
                        e
                    }
                }
            }
            Err(e) => e,
        };
        let delay = match classify(&err) {
            Retry::Permanent => None,
            Retry::Transient => backoff.failed(epoch.elapsed(), fastrand::f64()),
        };
        link.failed(&err, delay.is_some());
        match delay {
            Some(delay) => {
                status.send_replace(ConnectionStatus::Retrying { attempt: backoff.attempt(), delay });
                let sleep = tokio::time::sleep(delay);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        i = link.idle(None) => match i {
                            Idle::Continue => {}
                            Idle::Reconnect => break,
                            Idle::Close => return,
                        },
                    }
                }
            }
            None => {
                status.send_replace(ConnectionStatus::Failed { kind: err.kind(), reason: err.to_string() });
                loop {
                    match link.idle(Some(&err)).await {
                        Idle::Continue => {}
                        Idle::Reconnect => {
                            backoff = Backoff::new(policy.clone());
                            break;
                        }
                        Idle::Close => return,
                    }
                }
            }
        }
    }
}
