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
        out.reserve(self.body.len() + 64);
        out.put_u8(RECORD_VERSION);
        let mut flags = 0u8;
        for (bit, set) in [
            self.message_id.is_some(),
            self.correlation_id.is_some(),
            self.user_id.is_some(),
            self.content_type.is_some(),
            self.content_encoding.is_some(),
            self.creation_time_ms.is_some(),
            self.expiry_time_ms.is_some(),
        ]
        .into_iter()
        .enumerate()
        {
            if set {
                flags |= 1 << bit;
            }
        }
        out.put_u8(flags);
        for s in [&self.message_id, &self.correlation_id, &self.user_id, &self.content_type, &self.content_encoding].into_iter().flatten() {
            put_str(out, s);
        }
        if let Some(t) = self.creation_time_ms {
            out.put_u64_le(t);
        }
        if let Some(t) = self.expiry_time_ms {
            out.put_u64_le(t);
        }
        out.put_u32_le(self.properties.len() as u32);
        for (k, v) in &self.properties {
            put_str(out, k);
            put_str(out, v);
        }
        out.put_u32_le((self.system.len() + extra.len()) as u32);
        for (k, v) in self.system.iter().map(|(k, v)| (k.as_str(), v.as_str())).chain(extra.iter().copied()) {
            put_str(out, k);
            put_str(out, v);
        }
        out.put_u32_le(self.body.len() as u32);
        out.put_slice(&self.body);
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
        assert_eq!(Message::decode(&Message::default().to_bytes()).unwrap(), Message::default());
    }

    #[test]
    fn truncated_records_are_errors_not_panics() {
        let b = Message::new(vec![1u8; 100]).with_message_id("x").with_property("k", "v").to_bytes();
        for cut in 0..b.len() {
            assert!(Message::decode(&b.slice(..cut)).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn size_counts_body_system_values_and_app_props() {
        let m = Message::new(vec![0u8; 10]).with_message_id("abc").with_property("k", "vv");
        assert_eq!(m.iothub_size(), 10 + 3 + 3);
    }
}
