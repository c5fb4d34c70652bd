//! The message model shared by D2C and C2D, device and service, and its compact binary record
//! format (used by the device outbox and the hub's logs).
//!
//! A [`Message`] is owned data: body bytes plus the IoT Hub system properties a sender may set
//! and the application (user) properties, in the order they were added. Properties the hub stamps
//! on receipt (`iothub-connection-device-id`, `iothub-enqueuedtime`, …) live in
//! [`Message::system`]; a sender never sets them.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{Error, Result};

/// Largest D2C message the hub accepts (reference §4.5): body + system property values +
/// application property names and values.
pub const MAX_D2C_SIZE: usize = 256 * 1024;
/// Largest C2D message (reference §9.4).
pub const MAX_C2D_SIZE: usize = 64 * 1024;

/// One message, in either direction. Cheap to clone (the body is reference-counted).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// The payload.
    pub body: Bytes,
    /// `$.mid` / `message-id`. The device client fills in a UUID when it is `None`.
    pub message_id: Option<String>,
    /// `$.cid` / `correlation-id`.
    pub correlation_id: Option<String>,
    /// `$.uid` / `user-id`.
    pub user_id: Option<String>,
    /// `$.ct` / `content-type`, e.g. `application/json`.
    pub content_type: Option<String>,
    /// `$.ce` / `content-encoding`, e.g. `utf-8`.
    pub content_encoding: Option<String>,
    /// `$.ctime`: creation time, milliseconds since the Unix epoch (UTC).
    pub creation_time_ms: Option<u64>,
    /// `$.exp`: absolute expiry time, milliseconds since the Unix epoch (UTC). An expired D2C
    /// message is not sent; an expired C2D message is dead-lettered.
    pub expiry_time_ms: Option<u64>,
    /// Application properties, in insertion order. Names are case-sensitive.
    pub properties: Vec<(String, String)>,
    /// Properties stamped by the hub (read-only for senders): `iothub-connection-device-id`,
    /// `iothub-enqueuedtime`, `iothub-ack`, `$.to`, `sequence-number`, …
    pub system: Vec<(String, String)>,
}

impl Message {
    /// A message with this body and nothing else set.
    pub fn new(body: impl Into<Bytes>) -> Message {
        Message { body: body.into(), ..Default::default() }
    }

    /// Builder: sets the message id.
    pub fn with_message_id(mut self, id: impl Into<String>) -> Message {
        self.message_id = Some(id.into());
        self
    }

    /// Builder: sets the correlation id.
    pub fn with_correlation_id(mut self, id: impl Into<String>) -> Message {
        self.correlation_id = Some(id.into());
        self
    }

    /// Builder: sets content type and encoding (e.g. `application/json`, `utf-8`).
    pub fn with_content(mut self, content_type: impl Into<String>, encoding: impl Into<String>) -> Message {
        self.content_type = Some(content_type.into());
        self.content_encoding = Some(encoding.into());
        self
    }

    /// Builder: adds an application property (kept in order; a repeated name is kept twice and
    /// rejected when the message is sent).
    pub fn with_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Message {
        self.properties.push((name.into(), value.into()));
        self
    }

    /// Builder: sets the absolute expiry time (ms since the Unix epoch).
    pub fn with_expiry_ms(mut self, expiry_ms: u64) -> Message {
        self.expiry_time_ms = Some(expiry_ms);
        self
    }

    /// The first application property with this exact name.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The first hub-stamped system property with this exact name.
    pub fn system_property(&self, name: &str) -> Option<&str> {
        self.system.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Size as IoT Hub meters it (reference §4.5): body bytes + bytes of all system-property
    /// values set by the sender + bytes of all application-property names and values.
    pub fn iothub_size(&self) -> usize {
        let sys = [&self.message_id, &self.correlation_id, &self.user_id, &self.content_type, &self.content_encoding]
            .iter()
            .map(|v| v.as_ref().map_or(0, |s| s.len()))
            .sum::<usize>()
            + self.creation_time_ms.map_or(0, |_| 24)
            + self.expiry_time_ms.map_or(0, |_| 24);
        let app: usize = self.properties.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.body.len() + sys + app
    }

    /// Whether the message has an expiry time at or before `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expiry_time_ms.is_some_and(|e| e <= now_ms)
    }

    /// Serializes into the compact record format (version byte 1). Inverse of [`Message::decode`].
    pub fn encode(&self, out: &mut BytesMut) {
        self.encode_with_system(&[], out)
    }

    /// [`Message::encode`] with `extra` appended to the system properties, without building
    /// owned strings for them (the hub stamps every D2C message this way).
    pub fn encode_with_system(&self, extra: &[(&str, &str)], out: &mut BytesMut) {
        let fixed =
            [&self.message_id, &self.correlation_id, &self.user_id, &self.content_type, &self.content_encoding].map(|v| v.as_deref());
        let props = self.properties.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let system = self.system.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(extra.iter().copied());
        encode_record(fixed, [self.creation_time_ms, self.expiry_time_ms], props, system, &self.body, out);
    }

    /// Bytes [`Message::encode_with_system`] writes for this message and `extra`.
    pub fn encoded_len_with_system(&self, extra: &[(&str, &str)]) -> usize {
        let fixed =
            [&self.message_id, &self.correlation_id, &self.user_id, &self.content_type, &self.content_encoding].map(|v| v.as_deref());
        let props = self.properties.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let system = self.system.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(extra.iter().copied());
        record_len(fixed, [self.creation_time_ms, self.expiry_time_ms], props, system, self.body.len())
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }

    /// Parses a record written by [`Message::encode`]. The body shares `record`'s memory.
    pub fn decode(record: &Bytes) -> Result<Message> {
        let mut r = record.clone();
        let bad = || Error::new(crate::ErrorKind::Storage, "message record is truncated or malformed");
        if r.remaining() < 2 {
            return Err(bad());
        }
        let version = r.get_u8();
        if version != RECORD_VERSION {
            return Err(Error::new(crate::ErrorKind::Storage, format!("unknown message record version {version}")));
        }
        let flags = r.get_u8();
        let mut m = Message::default();
        let slots: [&mut Option<String>; 5] =
            [&mut m.message_id, &mut m.correlation_id, &mut m.user_id, &mut m.content_type, &mut m.content_encoding];
        for (bit, slot) in slots.into_iter().enumerate() {
            if flags & (1 << bit) != 0 {
                *slot = Some(get_str(&mut r).ok_or_else(bad)?);
            }
        }
        for (bit, slot) in [(5, &mut m.creation_time_ms), (6, &mut m.expiry_time_ms)] {
            if flags & (1 << bit) != 0 {
                if r.remaining() < 8 {
                    return Err(bad());
                }
                *slot = Some(r.get_u64_le());
            }
        }
        for list in [&mut m.properties, &mut m.system] {
            if r.remaining() < 4 {
                return Err(bad());
            }
            let n = r.get_u32_le() as usize;
            if n > r.remaining() {
                return Err(bad());
            }
            list.reserve(n);
            for _ in 0..n {
                let k = get_str(&mut r).ok_or_else(bad)?;
                let v = get_str(&mut r).ok_or_else(bad)?;
                list.push((k, v));
            }
        }
        if r.remaining() < 4 {
            return Err(bad());
        }
        let n = r.get_u32_le() as usize;
        if r.remaining() != n {
            return Err(bad());
        }
        m.body = r.split_to(n);
        Ok(m)
    }
}

const RECORD_VERSION: u8 = 1;

/// A message record read in place: [`RecordView::parse`] checks the whole record once (layout
/// and UTF-8, no allocation) and the accessors borrow from it, so a reader that needs only a few
/// fields — the message id, the body, the sending device — never builds the dozen owned strings
/// of [`Message::decode`]; [`RecordView::to_message`] builds them when asked.
#[derive(Debug, Clone)]
pub struct RecordView {
    record: Bytes,
    /// Offset of the application property count.
    props_at: usize,
    /// Offset of the system property count.
    system_at: usize,
    /// Offset of the body (after its length).
    body_at: usize,
}

impl RecordView {
    /// Checks `record` (the format [`Message::encode`] writes) and wraps it. The same errors
    /// as [`Message::decode`] for the same records.
    pub fn parse(record: Bytes) -> Result<RecordView> {
        let bad = || Error::new(crate::ErrorKind::Storage, "message record is truncated or malformed");
        let b = &record[..];
        if b.len() < 2 {
            return Err(bad());
        }
        if b[0] != RECORD_VERSION {
            return Err(Error::new(crate::ErrorKind::Storage, format!("unknown message record version {}", b[0])));
        }
        let flags = b[1];
        let mut at = 2;
        for bit in 0..5 {
            if flags & (1 << bit) != 0 {
                at = skip_str(b, at).ok_or_else(bad)?;
            }
        }
        for bit in 5..7 {
            if flags & (1 << bit) != 0 {
                at = at.checked_add(8).filter(|&e| e <= b.len()).ok_or_else(bad)?;
            }
        }
        let props_at = at;
        let mut lists = [0usize; 2];
        for slot in &mut lists {
            *slot = at;
            let n = read_u32(b, at).ok_or_else(bad)? as usize;
            at += 4;
            if n > b.len() - at {
                return Err(bad());
            }
            for _ in 0..2 * n {
                at = skip_str(b, at).ok_or_else(bad)?;
            }
        }
        let n = read_u32(b, at).ok_or_else(bad)? as usize;
        if b.len() - at - 4 != n {
            return Err(bad());
        }
        Ok(RecordView { props_at, system_at: lists[1], body_at: at + 4, record })
    }

    /// The record as received.
    pub fn record(&self) -> &Bytes {
        &self.record
    }

    /// One of the five optional strings: 0 message id, 1 correlation id, 2 user id, 3 content
    /// type, 4 content encoding.
    fn fixed(&self, which: u8) -> Option<&str> {
        let flags = self.record[1];
        if flags & (1 << which) == 0 {
            return None;
        }
        let mut at = 2;
        for bit in 0..which {
            if flags & (1 << bit) != 0 {
                at += 4 + read_u32(&self.record, at).expect("checked by parse") as usize;
            }
        }
        Some(str_at(&self.record, at))
    }

    /// `$.mid`, the message id.
    pub fn message_id(&self) -> Option<&str> {
        self.fixed(0)
    }

    /// The body (shares the record's memory).
    pub fn body(&self) -> Bytes {
        self.record.slice(self.body_at..)
    }

    /// The first application property with this exact name.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.pairs(self.props_at).find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// The first system property (hub-stamped: `iothub-connection-device-id`, …) with this
    /// exact name.
    pub fn system_property(&self, name: &str) -> Option<&str> {
        self.pairs(self.system_at).find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    fn pairs(&self, at: usize) -> impl Iterator<Item = (&str, &str)> {
        let b = &self.record[..];
        let n = read_u32(b, at).expect("checked by parse") as usize;
        let mut at = at + 4;
        (0..n).map(move |_| {
            let k = str_at(b, at);
            at += 4 + k.len();
            let v = str_at(b, at);
            at += 4 + v.len();
            (k, v)
        })
    }

    /// The owned message (every field decoded).
    pub fn to_message(&self) -> Message {
        Message::decode(&self.record).expect("a record RecordView::parse accepted decodes")
    }
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

/// The end of the length-prefixed UTF-8 string at `at`, if it is whole and valid.
fn skip_str(b: &[u8], at: usize) -> Option<usize> {
    let n = read_u32(b, at)? as usize;
    let end = (at + 4).checked_add(n).filter(|&e| e <= b.len())?;
    std::str::from_utf8(&b[at + 4..end]).ok()?;
    Some(end)
}

/// The string at `at` of a record [`RecordView::parse`] checked.
fn str_at(b: &[u8], at: usize) -> &str {
    let n = read_u32(b, at).expect("checked by parse") as usize;
    std::str::from_utf8(&b[at + 4..at + 4 + n]).expect("checked by parse")
}

/// Length of the record [`encode_record`] writes for these parts.
pub(crate) fn record_len<'s>(
    fixed: [Option<&str>; 5],
    times: [Option<u64>; 2],
    props: impl Iterator<Item = (&'s str, &'s str)>,
    system: impl Iterator<Item = (&'s str, &'s str)>,
    body: usize,
) -> usize {
    let strs: usize = fixed.iter().flatten().map(|s| 4 + s.len()).sum();
    let times = 8 * times.iter().flatten().count();
    let pairs = |it: &mut dyn Iterator<Item = (&'s str, &'s str)>| it.map(|(k, v)| 8 + k.len() + v.len()).sum::<usize>();
    2 + strs + times + 4 + pairs(&mut { props }) + 4 + pairs(&mut { system }) + 4 + body
}

/// Writes one message record (version 1, the inverse of [`Message::decode`]) from borrowed
/// parts: the five optional strings (message id, correlation id, user id, content type, content
/// encoding), the creation and expiry times, the application and system properties, the body.
/// The buffer is reserved once for the whole record. [`Message::encode_with_system`] and the
/// hub's D2C path (which has no owned [`Message`]) both write records through it.
pub(crate) fn encode_record<'s, P, S>(
    fixed: [Option<&str>; 5],
    times: [Option<u64>; 2],
    props: P,
    system: S,
    body: &[u8],
    out: &mut BytesMut,
) where
    P: Iterator<Item = (&'s str, &'s str)> + Clone,
    S: Iterator<Item = (&'s str, &'s str)> + Clone,
{
    out.reserve(record_len(fixed, times, props.clone(), system.clone(), body.len()));
    out.put_u8(RECORD_VERSION);
    let mut flags = 0u8;
    for (bit, set) in fixed.iter().map(Option::is_some).chain(times.iter().map(Option::is_some)).enumerate() {
        if set {
            flags |= 1 << bit;
        }
    }
    out.put_u8(flags);
    for s in fixed.into_iter().flatten() {
        put_str(out, s);
    }
    for t in times.into_iter().flatten() {
        out.put_u64_le(t);
    }
    for list in [&mut props.clone() as &mut dyn Iterator<Item = (&'s str, &'s str)>, &mut system.clone()] {
        let at = out.len();
        out.put_u32_le(0);
        let mut n = 0u32;
        for (k, v) in list {
            put_str(out, k);
            put_str(out, v);
            n += 1;
        }
        out[at..at + 4].copy_from_slice(&n.to_le_bytes());
    }
    out.put_u32_le(body.len() as u32);
    out.put_slice(body);
}

fn put_str(out: &mut BytesMut, s: &str) {
    out.put_u32_le(s.len() as u32);
    out.put_slice(s.as_bytes());
}

fn get_str(r: &mut Bytes) -> Option<String> {
    if r.remaining() < 4 {
        return None;
    }
    let n = r.get_u32_le() as usize;
    if r.remaining() < n {
        return None;
    }
    let s = std::str::from_utf8(&r[..n]).ok()?.to_owned();
    r.advance(n);
    Some(s)
}

/// Milliseconds since the Unix epoch, now (UTC).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        let m = Message::new("hello")
            .with_message_id("m1")
            .with_correlation_id("c1")
            .with_content("application/json", "utf-8")
            .with_property("a", "1")
            .with_property("b b", "")
            .with_expiry_ms(42);
        let mut m = m;
        m.creation_time_ms = Some(7);
        m.system.push(("iothub-connection-device-id".into(), "d1".into()));
        let b = m.to_bytes();
        assert_eq!(Message::decode(&b).unwrap(), m);
        let extra = [("iothub-enqueuedtime", "123"), ("x", "")];
        let mut out = BytesMut::new();
        m.encode_with_system(&extra, &mut out);
        assert_eq!(out.len(), m.encoded_len_with_system(&extra));
        assert_eq!(b.len(), m.encoded_len_with_system(&[]));
        assert_eq!(Message::decode(&Message::default().to_bytes()).unwrap(), Message::default());
    }

    #[test]
    fn truncated_records_are_errors_not_panics() {
        let b = Message::new(vec![1u8; 100]).with_message_id("x").with_property("k", "v").to_bytes();
        for cut in 0..b.len() {
            assert!(Message::decode(&b.slice(..cut)).is_err(), "cut at {cut}");
            assert!(RecordView::parse(b.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut bad_utf8 = BytesMut::from(&b[..]);
        let at = bad_utf8.iter().position(|&c| c == b'x').unwrap();
        bad_utf8[at] = 0xff;
        assert!(Message::decode(&bad_utf8.clone().freeze()).is_err());
        assert!(RecordView::parse(bad_utf8.freeze()).is_err());
    }

    #[test]
    fn record_view_reads_what_decode_reads_without_decoding() {
        let mut m = Message::new("body").with_correlation_id("c1").with_content("application/json", "utf-8").with_property("a", "1");
        m.user_id = Some("u".into());
        m.creation_time_ms = Some(7);
        m.system.push(("iothub-connection-device-id".into(), "d1".into()));
        for id in [None, Some("m-1")] {
            m.message_id = id.map(str::to_string);
            let mut rec = BytesMut::new();
            m.encode_with_system(&[("iothub-enqueuedtime", "123")], &mut rec);
            let v = RecordView::parse(rec.freeze()).unwrap();
            assert_eq!(v.message_id(), id);
            assert_eq!(v.body(), "body");
            assert_eq!(v.property("a"), Some("1"));
            assert_eq!(v.property("b"), None);
            assert_eq!(v.system_property("iothub-connection-device-id"), Some("d1"));
            assert_eq!(v.system_property("iothub-enqueuedtime"), Some("123"));
            let full = v.to_message();
            assert_eq!((full.correlation_id.as_deref(), full.user_id.as_deref(), full.creation_time_ms), (Some("c1"), Some("u"), Some(7)));
            assert_eq!(full, Message::decode(v.record()).unwrap());
        }
        assert!(RecordView::parse(Message::default().to_bytes()).is_ok());
    }

    #[test]
    fn size_counts_body_system_values_and_app_props() {
        let m = Message::new(vec![0u8; 10]).with_message_id("abc").with_property("k", "vv");
        assert_eq!(m.iothub_size(), 10 + 3 + 3);
    }
}
