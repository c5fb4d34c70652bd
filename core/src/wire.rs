//! The IoT Hub MQTT device contract (reference §3–§5, §11): topic names, property-bag
//! encode/decode, CONNECT user names, ISO-8601 times. Pure functions: no I/O, no tokio.
//!
//! Invariants: `decode_bag(encode_bag(x)) == x` for every list of (name, value) pairs; encoding
//! follows sdk-for-c exactly (unreserved `A–Z a–z 0–9 - _ . ~` kept, every other byte `%XX` with
//! upper-case hex), decoding accepts `$` raw or `%24`, never turns `+` into a space.

use crate::error::{Error, Result};
use crate::message::Message;

/// The IoT Hub api-version hubmsg devices put in their CONNECT user name.
pub const API_VERSION: &str = "2021-04-12";

/// Percent-encodes per sdk-for-c (reference §4.2): `abc/=%012` → `abc%2F%3D%25012`.
pub fn url_encode(s: &str) -> String {
    todo!()
}

/// Percent-decodes (`%XX`, either hex case). `+` stays `+`. Malformed escapes or non-UTF-8
/// results are an `InvalidArgument` error.
pub fn url_decode(s: &str) -> Result<String> {
    todo!()
}

/// Encodes a property bag: `name=value` joined by `&`, both URL-encoded; a `None` value emits
/// the name alone (reference §5.1 null representation).
pub fn encode_bag(props: &[(String, Option<String>)]) -> String {
    todo!()
}

/// Decodes a property bag with the C# tokenizer semantics (reference §11.3): `&` separates, the
/// first `=` splits name/value, a key without `=` has a `None` value, a `/` ends the bag (trailing
/// slash ignored), a leading `?` is skipped; an empty name, `=` inside a value, or a bad escape is
/// an `InvalidArgument` error. Empty input → empty list.
pub fn decode_bag(bag: &str) -> Result<Vec<(String, Option<String>)>> {
    todo!()
}

/// `devices/{device}/messages/events/` + bag (device id raw, not encoded).
pub fn d2c_topic(device_id: &str, bag: &str) -> String {
    todo!()
}

/// A parsed D2C topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct D2cTopic<'a> {
    /// Device id from the topic path.
    pub device_id: &'a str,
    /// Module id when the topic is `devices/{d}/modules/{m}/messages/events/…`.
    pub module_id: Option<&'a str>,
    /// The raw (still encoded) property bag, possibly empty.
    pub bag: &'a str,
}

/// Parses `devices/{d}[/modules/{m}]/messages/events[/][?]{bag}[/]` with the tolerant variants of
/// reference §4.1. Anything else → `None`.
pub fn parse_d2c_topic(topic: &str) -> Option<D2cTopic<'_>> {
    todo!()
}

/// `devices/{device}/messages/devicebound/` + bag.
pub fn c2d_topic(device_id: &str, bag: &str) -> String {
    todo!()
}

/// The C2D subscription filter `devices/{device}/messages/devicebound/#`.
pub fn c2d_filter(device_id: &str) -> String {
    todo!()
}

/// The raw bag of a C2D topic, per the sdk-for-c algorithm (reference §11.1): text after the first
/// `/messages/devicebound/` up to a second occurrence. `None` if the marker is absent.
pub fn parse_c2d_topic(topic: &str) -> Option<&str> {
    todo!()
}

/// CONNECT user name `{host}/{device}/?api-version={API_VERSION}` (+ `&DeviceClientType=…` when
/// `client_type` is given, URL-encoded).
pub fn device_username(host: &str, device_id: &str, client_type: Option<&str>) -> String {
    todo!()
}

/// A parsed CONNECT user name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username {
    /// Host part (before the first `/`).
    pub host: String,
    /// Device id.
    pub device_id: String,
    /// Module id, when present.
    pub module_id: Option<String>,
    /// `api-version` value, when present.
    pub api_version: Option<String>,
    /// Other `&name=value` options, decoded.
    pub options: Vec<(String, String)>,
}

/// Parses `{host}/{device}[/{module}]/?api-version=…[&opt=…]` and the legacy form
/// `{host}/{device}/api-version=…` (reference §3.2). Malformed → `InvalidArgument`.
pub fn parse_username(username: &str) -> Result<Username> {
    todo!()
}

/// Formats ms since the Unix epoch as ISO-8601 UTC with milliseconds: `2021-04-21T11:30:16.123Z`.
pub fn format_time_ms(ms: u64) -> String {
    todo!()
}

/// Parses ISO-8601 UTC (`Z` suffix, 0–9 fractional digits, e.g. `3237-07-19T23:06:40.0000000Z`)
/// into ms since the Unix epoch. Offsets other than `Z`, or malformed text → `InvalidArgument`.
pub fn parse_time_ms(s: &str) -> Result<u64> {
    todo!()
}

/// The D2C property bag for a message (reference §4.2/§4.3): system properties first in the
/// order `$.mid, $.cid, $.uid, $.ct, $.ce, $.ctime, $.exp` (names sent as `%24.mid` etc., times
/// ISO-8601), then application properties in order. Errors (`InvalidArgument`) on an empty or
/// duplicate application property name.
pub fn d2c_bag(msg: &Message) -> Result<String> {
    todo!()
}

/// The inverse of [`d2c_bag`] applied to a decoded bag: fills `$.`-prefixed known keys into the
/// message's fields, other `$.` keys and `iothub-*` keys into `system`, the rest into
/// `properties` (a `None` value becomes an empty string). Bad times → `InvalidArgument`.
pub fn apply_bag(msg: &mut Message, bag: Vec<(String, Option<String>)>) -> Result<()> {
    todo!()
}

/// The C2D property bag the hub emits (reference §5.1 emit order): `%24.mid`, `%24.cid`,
/// `%24.uid`, `%24.exp`, `%24.to`, `%24.ct`, `%24.ce`, `iothub-ack`, then the system entries
/// from `msg.system` whose names are not already emitted, then application properties.
pub fn c2d_bag(msg: &Message) -> String {
    todo!()
}
