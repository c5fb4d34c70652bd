//! The IoT Hub MQTT device contract (reference §3–§5, §11): topic names, property-bag
//! encode/decode, CONNECT user names, ISO-8601 times. Pure functions: no I/O, no tokio.
//!
//! Invariants: `decode_bag(encode_bag(x)) == x` for every list of (name, value) pairs with
//! non-empty names; encoding follows sdk-for-c exactly (unreserved `A–Z a–z 0–9 - _ . ~` kept,
//! every other byte `%XX` with upper-case hex), decoding accepts `$` raw or `%24`, never turns
//! `+` into a space.

use std::borrow::Cow;

use crate::error::{Error, Result};
use crate::message::Message;

/// The IoT Hub api-version hubmsg devices put in their CONNECT user name.
pub const API_VERSION: &str = "2021-04-12";

/// Percent-encodes per sdk-for-c (reference §4.2): `abc/=%012` → `abc%2F%3D%25012`.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    encode_into(&mut out, s);
    out
}

/// Appends the sdk-for-c encoding of `s` to `out`.
fn encode_into(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let unreserved = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~');
    let bytes = s.as_bytes();
    out.reserve(bytes.len());
    // Copy runs of unreserved bytes as slices (the common case is one run: the whole text).
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if unreserved(b) {
            continue;
        }
        if run < i {
            // bytes[run..i] are unreserved ASCII, so both ends are char boundaries.
            out.push_str(&s[run..i]);
        }
        out.push('%');
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0F)]));
        run = i + 1;
    }
    if run < bytes.len() {
        // The tail after the last escape is unreserved ASCII.
        out.push_str(&s[run..]);
    }
}

/// Percent-decodes (`%XX`, either hex case). `+` stays `+`. Malformed escapes or non-UTF-8
/// results are an `InvalidArgument` error. Error messages never echo the input (it may be a
/// signature).
pub fn url_decode(s: &str) -> Result<String> {
    url_decode_cow(s).map(Cow::into_owned)
}

/// [`url_decode`] that borrows `s` when it holds no escape (no allocation, no copy).
pub fn url_decode_cow(s: &str) -> Result<Cow<'_, str>> {
    let bytes = s.as_bytes();
    let Some(first) = bytes.iter().position(|&b| b == b'%') else {
        return Ok(Cow::Borrowed(s));
    };
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..first]);
    let mut i = first;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let byte = bytes.get(i + 1..i + 3).and_then(|h| Some(hex_digit(h[0])? << 4 | hex_digit(h[1])?)).ok_or_else(|| {
                Error::invalid(format!(
                    "malformed percent-escape at byte {i}: `%` must be followed by two hex digits \
                         (write a literal `%` as %25)"
                ))
            })?;
            out.push(byte);
            i += 3;
        } else {
            // Copy the run up to the next escape at once.
            let run = bytes[i..].iter().position(|&b| b == b'%').map_or(bytes.len(), |n| i + n);
            out.extend_from_slice(&bytes[i..run]);
            i = run;
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| Error::invalid("percent-escapes decode to invalid UTF-8; percent-encode the UTF-8 bytes of the text"))
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Encodes a property bag: `name=value` joined by `&`, both URL-encoded; a `None` value emits
/// the name alone (reference §5.1 null representation).
pub fn encode_bag(props: &[(String, Option<String>)]) -> String {
    let mut out = String::new();
    for (name, value) in props {
        push_pair(&mut out, name, value.as_deref());
    }
    out
}

/// Appends one encoded `name[=value]` entry to a bag under construction.
fn push_pair(bag: &mut String, name: &str, value: Option<&str>) {
    if !bag.is_empty() {
        bag.push('&');
    }
    encode_into(bag, name);
    if let Some(value) = value {
        bag.push('=');
        encode_into(bag, value);
    }
}

/// Decodes a property bag with the C# tokenizer semantics (reference §11.3): `&` separates, the
/// first `=` splits name/value, a key without `=` has a `None` value (`key=` is `Some("")`), a
/// leading `?` is skipped, and a `/` ends the bag: a trailing `/` is ignored, but text after a
/// `/` is an error rather than silently dropped. An empty name (`&&`, a leading `=`, a trailing
/// `&`), `=` inside a value, or a bad escape is an `InvalidArgument` error. Empty input → empty
/// list.
pub fn decode_bag(bag: &str) -> Result<Vec<(String, Option<String>)>> {
    let mut out = Vec::new();
    for_each_bag_entry(bag, |name, value| {
        out.push((name.into_owned(), value.map(Cow::into_owned)));
        Ok(())
    })?;
    Ok(out)
}

/// Walks a property bag by the rules of [`decode_bag`] and hands each entry, decoded, to `f` in
/// order; names and values borrow from `bag` unless they hold escapes. Stops at the first error
/// (of the bag or of `f`). The hub's D2C path reads bags this way, without owned strings.
pub fn for_each_bag_entry<'a>(bag: &'a str, mut f: impl FnMut(Cow<'a, str>, Option<Cow<'a, str>>) -> Result<()>) -> Result<()> {
    let bag = bag.strip_prefix('?').unwrap_or(bag);
    let bag = match bag.split_once('/') {
        None | Some((_, "")) => bag.strip_suffix('/').unwrap_or(bag),
        Some(_) => {
            return Err(Error::invalid(
                "property bag has text after a `/`; only a trailing `/` may end a bag \
                 (encode `/` inside names and values as %2F)",
            ))
        }
    };
    if bag.is_empty() {
        return Ok(());
    }
    for (index, entry) in bag.split('&').enumerate() {
        let (name, value) = match entry.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (entry, None),
        };
        if name.is_empty() {
            return Err(Error::invalid(format!(
                "property bag entry {index} has an empty name (`&&`, a leading `=` or a trailing `&`); \
                 write entries as name=value joined by `&`"
            )));
        }
        if value.is_some_and(|v| v.as_bytes().contains(&b'=')) {
            return Err(Error::invalid(format!("property bag entry {index} has a raw `=` in its value; encode it as %3D")));
        }
        let decode =
            |text: &'a str| url_decode_cow(text).map_err(|e| Error::invalid(format!("property bag entry {index}: {}", e.message())));
        f(decode(name)?, value.map(decode).transpose()?)?;
    }
    Ok(())
}

/// `devices/{device}/messages/events/` + bag (device id raw, not encoded).
pub fn d2c_topic(device_id: &str, bag: &str) -> String {
    let mut t = String::with_capacity(8 + device_id.len() + 17 + bag.len());
    t.push_str("devices/");
    t.push_str(device_id);
    t.push_str("/messages/events/");
    t.push_str(bag);
    t
}

/// A parsed D2C topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct D2cTopic<'a> {
    /// Device id from the topic path.
    pub device_id: &'a str,
    /// Module id when the topic is `devices/{d}/modules/{m}/messages/events/…`.
    pub module_id: Option<&'a str>,
    /// The raw (still encoded) property bag, possibly empty, without a leading `?` or a
    /// trailing `/`.
    pub bag: &'a str,
}

/// Parses `devices/{d}[/modules/{m}]/messages/events[/][?]{bag}[/]` with the tolerant variants of
/// reference §4.1 (no trailing slash, a `/` after the bag, a `?` before it). Device and module
/// ids must be non-empty. Anything else → `None`.
pub fn parse_d2c_topic(topic: &str) -> Option<D2cTopic<'_>> {
    let (device_id, rest) = topic.strip_prefix("devices/")?.split_once('/')?;
    let (module_id, rest) = match rest.strip_prefix("modules/") {
        Some(rest) => {
            let (module_id, rest) = rest.split_once('/')?;
            (Some(module_id), rest)
        }
        None => (None, rest),
    };
    if device_id.is_empty() || module_id.is_some_and(str::is_empty) {
        return None;
    }
    let rest = rest.strip_prefix("messages/events")?;
    let bag = if rest.is_empty() { rest } else { rest.strip_prefix('/')? };
    let bag = bag.strip_prefix('?').unwrap_or(bag);
    let bag = bag.strip_suffix('/').unwrap_or(bag);
    Some(D2cTopic { device_id, module_id, bag })
}

/// `devices/{device}/messages/devicebound/` + bag.
pub fn c2d_topic(device_id: &str, bag: &str) -> String {
    format!("devices/{device_id}{C2D_MARKER}{bag}")
}

/// The C2D subscription filter `devices/{device}/messages/devicebound/#`.
pub fn c2d_filter(device_id: &str) -> String {
    c2d_topic(device_id, "#")
}

const C2D_MARKER: &str = "/messages/devicebound/";

/// The raw bag of a C2D topic, per the sdk-for-c algorithm (reference §11.1): text after the first
/// `/messages/devicebound/` up to a second occurrence. `None` if the marker is absent.
pub fn parse_c2d_topic(topic: &str) -> Option<&str> {
    let (_, rest) = topic.split_once(C2D_MARKER)?;
    Some(rest.split_once(C2D_MARKER).map_or(rest, |(bag, _)| bag))
}

/// CONNECT user name `{host}/{device}/?api-version={API_VERSION}` (+ `&DeviceClientType=…` when
/// `client_type` is given, URL-encoded).
pub fn device_username(host: &str, device_id: &str, client_type: Option<&str>) -> String {
    let mut username = format!("{host}/{device_id}/?api-version={API_VERSION}");
    if let Some(client_type) = client_type {
        username.push_str("&DeviceClientType=");
        encode_into(&mut username, client_type);
    }
    username
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
/// `{host}/{device}/api-version=…` (reference §3.2). The options part may be empty
/// (`{host}/{device}/`); empty `&&` entries are skipped, an option without `=` has an empty
/// value. Malformed (empty host, device or module id, no `/` after the identity, a repeated
/// `api-version`, a bad escape) → `InvalidArgument`.
pub fn parse_username(username: &str) -> Result<Username> {
    let bad = |what: &str| {
        Error::invalid(format!("CONNECT user name `{username}` {what}; expected {{host}}/{{device}}[/{{module}}]/?api-version=…"))
    };
    let (host, rest) = username.split_once('/').ok_or_else(|| bad("has no `/`"))?;
    let (device_id, rest) = rest.split_once('/').ok_or_else(|| bad("has no `/` after the device id"))?;
    let (module_id, query) = if is_username_query(rest) {
        (None, rest)
    } else {
        let (module_id, query) = rest.split_once('/').ok_or_else(|| bad("has no `/` after the module id"))?;
        if !is_username_query(query) {
            return Err(bad("has an unexpected path segment"));
        }
        (Some(module_id), query)
    };
    if host.is_empty() || device_id.is_empty() || module_id.is_some_and(str::is_empty) {
        return Err(bad("has an empty host, device id or module id"));
    }
    let query = query.strip_prefix('?').unwrap_or(query);
    let mut api_version = None;
    let mut options = Vec::new();
    for option in query.split('&').filter(|o| !o.is_empty()) {
        let (name, value) = option.split_once('=').unwrap_or((option, ""));
        if name.is_empty() {
            return Err(bad("has an option with an empty name"));
        }
        let decode = |text: &str| url_decode(text).map_err(|e| bad(&format!("has a bad option ({})", e.message())));
        let (name, value) = (decode(name)?, decode(value)?);
        if name == "api-version" {
            if api_version.replace(value).is_some() {
                return Err(bad("repeats api-version"));
            }
        } else {
            options.push((name, value));
        }
    }
    Ok(Username { host: host.to_owned(), device_id: device_id.to_owned(), module_id: module_id.map(str::to_owned), api_version, options })
}

/// Whether a user-name path remainder is the options part (`?…`, legacy `api-version=…`, or
/// nothing) rather than a module id.
fn is_username_query(rest: &str) -> bool {
    rest.is_empty() || rest.starts_with('?') || rest.starts_with("api-version=")
}

const MS_PER_DAY: u64 = 86_400_000;
/// `9999-12-31T23:59:59.999Z`, the last instant four-digit ISO-8601 years can express
/// (10000-01-01 is day 2,932,897 after the epoch).
const MAX_TIME_MS: u64 = 2_932_897 * MS_PER_DAY - 1;

/// Formats ms since the Unix epoch as ISO-8601 UTC with milliseconds: `2021-04-21T11:30:16.123Z`.
/// Times after year 9999 get a longer year (which [`parse_time_ms`] rejects).
pub fn format_time_ms(ms: u64) -> String {
    let (days, ms_of_day) = (ms / MS_PER_DAY, ms % MS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let (secs, millis) = (ms_of_day / 1000, ms_of_day % 1000);
    if year > 9999 {
        // Not a wire time (senders refuse these); keep the general formatter for the text.
        return format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z", secs / 3600, secs / 60 % 60, secs % 60);
    }
    // Hot path (every D2C publish): fixed layout, digits written directly.
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, secs / 3600);
    put(14, 2, secs / 60 % 60);
    put(17, 2, secs % 60);
    put(20, 3, millis);
    String::from_utf8(b.to_vec()).expect("ASCII digits")
}

/// Parses ISO-8601 UTC (`Z` suffix, 0–9 fractional digits, e.g. `3237-07-19T23:06:40.0000000Z`)
/// into ms since the Unix epoch (extra fractional digits are truncated). Years 1970–9999 only.
/// Offsets other than `Z`, or malformed text → `InvalidArgument`.
pub fn parse_time_ms(s: &str) -> Result<u64> {
    let bad = |what: &str| Error::invalid(format!("`{s}` is not an ISO-8601 UTC time ({what}); expected e.g. 2021-04-21T11:30:16.123Z"));
    let body = s.strip_suffix('Z').ok_or_else(|| bad("it must end in `Z`: offsets are not accepted"))?;
    let (main, fraction) = match body.split_once('.') {
        Some((main, fraction)) => (main.as_bytes(), Some(fraction.as_bytes())),
        None => (body.as_bytes(), None),
    };
    let layout_ok = main.len() == 19
        && main.iter().enumerate().all(|(i, &b)| match i {
            4 | 7 => b == b'-',
            10 => b == b'T',
            13 | 16 => b == b':',
            _ => b.is_ascii_digit(),
        });
    if !layout_ok {
        return Err(bad("the date and time must be YYYY-MM-DDTHH:MM:SS"));
    }
    let field = |range: std::ops::Range<usize>| main[range].iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
    let (year, month, day) = (field(0..4), field(5..7), field(8..10));
    let (hour, minute, second) = (field(11..13), field(14..16), field(17..19));
    if year < 1970 {
        return Err(bad("years before 1970 are not supported"));
    }
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(bad("no such date"));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(bad("no such time of day"));
    }
    let millis = match fraction {
        None => 0,
        Some(digits) if (1..=9).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit) => {
            digits.iter().chain(b"00").take(3).fold(0, |n, &d| n * 10 + u64::from(d - b'0'))
        }
        Some(_) => return Err(bad("the fraction must be 1 to 9 digits")),
    };
    Ok(days_from_civil(year, month, day) * MS_PER_DAY + ((hour * 60 + minute) * 60 + second) * 1000 + millis)
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date in or after 1970 (H. Hinnant's
/// `days_from_civil`, unsigned because earlier years are not representable here).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let (era, year_of_era) = (year / 400, year % 400);
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The (year, month, day) of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let days = days + 719_468;
    let (era, day_of_era) = (days / 146_097, days % 146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

/// A message time as it goes on the wire; `InvalidArgument` past year 9999.
fn wire_time(name: &str, ms: u64) -> Result<String> {
    if ms > MAX_TIME_MS {
        return Err(Error::invalid(format!("{name} is {ms} ms since the epoch, after year 9999; use a time before 10000-01-01")));
    }
    Ok(format_time_ms(ms))
}

/// The D2C property bag for a message (reference §4.2/§4.3): system properties first in the
/// order `$.mid, $.cid, $.uid, $.ct, $.ce, $.ctime, $.exp` (names sent as `%24.mid` etc., times
/// ISO-8601), then application properties in order. Errors (`InvalidArgument`) on an empty or
/// duplicate application property name, or a time after year 9999.
pub fn d2c_bag(msg: &Message) -> Result<String> {
    let creation = msg.creation_time_ms.map(|ms| wire_time("the creation time", ms)).transpose()?;
    let expiry = msg.expiry_time_ms.map(|ms| wire_time("the expiry time", ms)).transpose()?;
    let mut bag = String::with_capacity(128);
    for (name, value) in [
        ("$.mid", msg.message_id.as_deref()),
        ("$.cid", msg.correlation_id.as_deref()),
        ("$.uid", msg.user_id.as_deref()),
        ("$.ct", msg.content_type.as_deref()),
        ("$.ce", msg.content_encoding.as_deref()),
        ("$.ctime", creation.as_deref()),
        ("$.exp", expiry.as_deref()),
    ] {
        if let Some(value) = value {
            push_pair(&mut bag, name, Some(value));
        }
    }
    // Messages usually carry a handful of properties: a scan beats building a set per message.
    let mut seen = (msg.properties.len() > 16).then(std::collections::HashSet::new);
    for (i, (name, value)) in msg.properties.iter().enumerate() {
        if name.is_empty() {
            return Err(Error::invalid("an application property has an empty name; give every property a name"));
        }
        let repeated = match &mut seen {
            Some(set) => !set.insert(name.as_str()),
            None => msg.properties[..i].iter().any(|(n, _)| n == name),
        };
        if repeated {
            return Err(Error::invalid(format!(
                "application property `{name}` is set twice; IoT Hub keeps only one, so set each name once"
            )));
        }
        push_pair(&mut bag, name, Some(value));
    }
    Ok(bag)
}

/// The inverse of [`d2c_bag`] applied to a decoded bag: fills `$.`-prefixed known keys into the
/// message's fields (a `None` value clears the field: value-less `%24.cid` means no correlation
/// id), other `$.` keys and `iothub-*` keys into `system`, the rest into `properties` (a `None`
/// value becomes an empty string). Bad times → `InvalidArgument`.
pub fn apply_bag(msg: &mut Message, bag: Vec<(String, Option<String>)>) -> Result<()> {
    for (name, value) in bag {
        match name.as_str() {
            "$.mid" => msg.message_id = value,
            "$.cid" => msg.correlation_id = value,
            "$.uid" => msg.user_id = value,
            "$.ct" => msg.content_type = value,
            "$.ce" => msg.content_encoding = value,
            "$.ctime" => msg.creation_time_ms = bag_time(&name, value.as_deref())?,
            "$.exp" => msg.expiry_time_ms = bag_time(&name, value.as_deref())?,
            _ => {
                let value = value.unwrap_or_default();
                if name.starts_with("$.") || name.starts_with("iothub-") {
                    msg.system.push((name, value));
                } else {
                    msg.properties.push((name, value));
                }
            }
        }
    }
    Ok(())
}

/// Checks a PUBLISH topic name as MQTT 3.1.1 requires (§4.7.3, MQTT-3.3.2-2, MQTT-1.5.3-2):
/// not empty, no wildcard (`+`, `#`) and no U+0000. The error names the problem.
pub fn check_topic_name(topic: &str) -> Result<()> {
    if topic.is_empty() {
        return Err(Error::protocol("PUBLISH with an empty topic name (MQTT-4.7.3-1)"));
    }
    // One pass over the bytes (these are ASCII, so no UTF-8 decoding is needed to find them).
    let (mut wildcard, mut nul) = (false, false);
    for b in topic.bytes() {
        wildcard |= b == b'+' || b == b'#';
        nul |= b == 0;
    }
    if wildcard {
        return Err(Error::protocol("PUBLISH topic names must not contain the wildcards '+' or '#' (MQTT-3.3.2-2)"));
    }
    if nul {
        return Err(Error::protocol("MQTT strings must not contain U+0000 (MQTT-1.5.3-2)"));
    }
    Ok(())
}

/// Checks a message id against IoT Hub's rule (reference §4.5): 1–128 characters, none of them
/// a control character (NUL included). `InvalidArgument` with the reason.
pub fn check_message_id(id: &str) -> Result<()> {
    if id.is_empty() || id.chars().count() > 128 {
        return Err(Error::invalid(format!("message id must be 1 to 128 characters, got {}", id.chars().count())));
    }
    if id.chars().any(char::is_control) {
        return Err(Error::invalid("message id contains a control character (such as NUL); use printable characters only"));
    }
    Ok(())
}

/// A time property of a decoded bag; errors name the property.
pub(crate) fn bag_time(name: &str, value: Option<&str>) -> Result<Option<u64>> {
    value.map(|v| parse_time_ms(v).map_err(|e| Error::invalid(format!("property {name}: {}", e.message())))).transpose()
}

/// The C2D property bag the hub emits (reference §5.1 emit order): `%24.mid`, `%24.cid`,
/// `%24.uid`, `%24.exp`, `%24.to`, `%24.ct`, `%24.ce`, `iothub-ack` (`$.to` and `iothub-ack`
/// taken from `msg.system`), then the system entries from `msg.system` whose names are not
/// already emitted, then application properties.
pub fn c2d_bag(msg: &Message) -> String {
    let expiry = msg.expiry_time_ms.map(format_time_ms);
    let mut bag = String::new();
    let mut emitted = Vec::new();
    for (name, value) in [
        ("$.mid", msg.message_id.as_deref()),
        ("$.cid", msg.correlation_id.as_deref()),
        ("$.uid", msg.user_id.as_deref()),
        ("$.exp", expiry.as_deref()),
        ("$.to", msg.system_property("$.to")),
        ("$.ct", msg.content_type.as_deref()),
        ("$.ce", msg.content_encoding.as_deref()),
        ("iothub-ack", msg.system_property("iothub-ack")),
    ] {
        if let Some(value) = value {
            push_pair(&mut bag, name, Some(value));
            emitted.push(name);
        }
    }
    for (name, value) in &msg.system {
        if !emitted.contains(&name.as_str()) {
            push_pair(&mut bag, name, Some(value));
            emitted.push(name.as_str());
        }
    }
    for (name, value) in &msg.properties {
        push_pair(&mut bag, name, Some(value));
    }
    bag
}

#[cfg(test)]
mod tests {
    use super::*;

    type Bag = Vec<(String, Option<String>)>;

    fn some(name: &str, value: &str) -> (String, Option<String>) {
        (name.to_owned(), Some(value.to_owned()))
    }

    fn none(name: &str) -> (String, Option<String>) {
        (name.to_owned(), None)
    }

    fn bad(result: Result<impl std::fmt::Debug>) -> Error {
        let err = result.expect_err("expected an error");
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument, "{err}");
        err
    }

    #[test]
    fn url_encode_follows_sdk_for_c() {
        assert_eq!(url_encode("abc/=%012"), "abc%2F%3D%25012");
        assert_eq!(url_encode("AZaz09-_.~"), "AZaz09-_.~");
        assert_eq!(url_encode("a b+c&d?e$.mid"), "a%20b%2Bc%26d%3Fe%24.mid");
        assert_eq!(url_encode("é\n"), "%C3%A9%0A");
        assert_eq!(url_encode(""), "");
    }

    #[test]
    fn url_decode_accepts_both_hex_cases_and_keeps_plus() {
        assert_eq!(url_decode("abc%2F%3D%25012").unwrap(), "abc/=%012");
        assert_eq!(url_decode("iothubclient%2f1.9.0%20(native%3b)").unwrap(), "iothubclient/1.9.0 (native;)");
        assert_eq!(url_decode("a+b").unwrap(), "a+b");
        assert_eq!(url_decode("$.mid").unwrap(), "$.mid");
        assert_eq!(url_decode("%C3%A9").unwrap(), "é");
        for malformed in ["%", "%2", "a%zz", "%2G", "%%41"] {
            bad(url_decode(malformed));
        }
        let err = bad(url_decode("%FF"));
        assert!(err.message().contains("UTF-8"), "{err}");
    }

    #[test]
    fn url_round_trip_of_every_ascii_char_and_unicode() {
        let all: String = (0u8..128).map(char::from).chain("ü€😀".chars()).collect();
        let encoded = url_encode(&all);
        assert!(encoded.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~%".contains(&b)), "{encoded}");
        assert_eq!(url_decode(&encoded).unwrap(), all);
    }

    #[test]
    fn encode_bag_null_empty_and_values() {
        assert_eq!(encode_bag(&[]), "");
        let bag = vec![none("prop1"), some("prop2", ""), some("prop3", "a string"), some("$.ct", "application/json")];
        assert_eq!(encode_bag(&bag), "prop1&prop2=&prop3=a%20string&%24.ct=application%2Fjson");
    }

    #[test]
    fn decode_bag_reference_null_and_empty_values() {
        let expected = vec![none("prop1"), some("prop2", ""), some("prop3", "a string")];
        assert_eq!(decode_bag("prop1&prop2=&prop3=a%20string").unwrap(), expected);
        assert_eq!(decode_bag("?prop1&prop2=&prop3=a%20string").unwrap(), expected);
        assert_eq!(decode_bag("prop1&prop2=&prop3=a%20string/").unwrap(), expected);
        // The reference's `/?prop1…` is a topic tail; through a real topic it decodes as documented.
        let topic = "devices/d/messages/devicebound/?prop1&prop2=&prop3=a%20string";
        assert_eq!(decode_bag(parse_c2d_topic(topic).unwrap()).unwrap(), expected);
        // Handed the tail with its leading `/`, nothing is silently dropped: it is an error.
        bad(decode_bag("/?prop1&prop2=&prop3=a%20string"));
    }

    #[test]
    fn decode_bag_dollar_raw_or_encoded_and_plus_is_literal() {
        assert_eq!(decode_bag("$.mid=1&%24.cid=2").unwrap(), vec![some("$.mid", "1"), some("$.cid", "2")]);
        assert_eq!(decode_bag("a=1+1").unwrap(), vec![some("a", "1+1")]);
    }

    #[test]
    fn decode_bag_empty_inputs() {
        for empty in ["", "?", "/", "?/"] {
            assert_eq!(decode_bag(empty).unwrap(), vec![], "{empty:?}");
        }
    }

    #[test]
    fn decode_bag_rejects_what_the_csharp_tokenizer_rejects() {
        for malformed in ["a&&b", "&a", "=x", "a=1&", "a=b=c", "a==b", "a=%zz", "%zz", "a=1/b=2", "a=%FF"] {
            bad(decode_bag(malformed));
        }
    }

    #[test]
    fn bag_round_trip() {
        let bags = vec![
            vec![],
            vec![none("k")],
            vec![some("k", "")],
            vec![some("a b", "c&d=e/f?g"), none("$.cid"), some("+", "%"), some("ü", "😀"), some("x", "=")],
        ];
        for bag in bags {
            assert_eq!(decode_bag(&encode_bag(&bag)).unwrap(), bag);
        }
    }

    #[test]
    fn real_c2d_topics_parse() {
        let cases: [(&str, Bag); 4] = [
            (
                "devices/pubsub/messages/devicebound/%24.mid=2c2db32a-9c41-4073-baa4-db584e021573&%24.to=%2Fdevices%2Fpubsub%2Fmessages%2Fdevicebound&%24.ce=utf-8&iothub-ack=none",
                vec![
                    some("$.mid", "2c2db32a-9c41-4073-baa4-db584e021573"),
                    some("$.to", "/devices/pubsub/messages/devicebound"),
                    some("$.ce", "utf-8"),
                    some("iothub-ack", "none"),
                ],
            ),
            (
                "devices/test-dev-0/messages/devicebound/%24.mid=4e6f49cb-feaa-4970-9756-57860c666ba8&%24.to=%2Fdevices%2Ftest-dev-0%2Fmessages%2FdeviceBound&iothub-ack=full",
                vec![
                    some("$.mid", "4e6f49cb-feaa-4970-9756-57860c666ba8"),
                    some("$.to", "/devices/test-dev-0/messages/deviceBound"),
                    some("iothub-ack", "full"),
                ],
            ),
            (
                "devices/dev_c/messages/devicebound/propertyName=propertyValue&%24.to=%2Fdevices%2Fdev_c%2Fmessages%2FdeviceBound",
                vec![some("propertyName", "propertyValue"), some("$.to", "/devices/dev_c/messages/deviceBound")],
            ),
            (
                "devices/mydevice/modules/hello/messages/devicebound/%24.mid=Hi%20jody&%24.to=%2Fdevices%2Fsah-rfidprinter1%2Fmodules%2Fhello%2Fmessages%2FdeviceBound",
                vec![some("$.mid", "Hi jody"), some("$.to", "/devices/sah-rfidprinter1/modules/hello/messages/deviceBound")],
            ),
        ];
        for (topic, expected) in cases {
            assert_eq!(decode_bag(parse_c2d_topic(topic).unwrap()).unwrap(), expected, "{topic}");
        }
    }

    #[test]
    fn sdk_fixture_c2d_bag_with_value_less_keys_and_seven_digit_expiry() {
        let topic =
            "devices/d/messages/devicebound/%24.exp=3237-07-19T23%3A06%3A40.0000000Z&%24.cid&%24.uid&iothub-ack=Full&%24.ct=text%2Fplain";
        let bag = decode_bag(parse_c2d_topic(topic).unwrap()).unwrap();
        assert_eq!(bag[1], none("$.cid"));
        assert_eq!(bag[2], none("$.uid"));
        let mut msg = Message::default();
        apply_bag(&mut msg, bag).unwrap();
        assert_eq!(msg.expiry_time_ms, Some(40_000_000_000_000));
        assert_eq!(msg.correlation_id, None);
        assert_eq!(msg.user_id, None);
        assert_eq!(msg.content_type.as_deref(), Some("text/plain"));
        assert_eq!(msg.system_property("iothub-ack"), Some("Full"));
        assert!(msg.properties.is_empty());
    }

    #[test]
    fn parse_c2d_topic_is_the_sdk_for_c_algorithm() {
        assert_eq!(parse_c2d_topic("devices/d/messages/devicebound/"), Some(""));
        assert_eq!(parse_c2d_topic("devices/d/messages/devicebound/a=b"), Some("a=b"));
        assert_eq!(parse_c2d_topic("devices/d/messages/devicebound"), None);
        assert_eq!(parse_c2d_topic("devices/d/messages/deviceBound/a=b"), None);
        assert_eq!(parse_c2d_topic(""), None);
        assert_eq!(parse_c2d_topic("devices/d/messages/events/a=b"), None);
        // The device id is not checked.
        assert_eq!(parse_c2d_topic("devices/useragent_c/messages/devicebound/x=1"), Some("x=1"));
        // A second marker ends the bag; a capital-B look-alike does not.
        assert_eq!(parse_c2d_topic("devices/d/messages/devicebound/a=b/messages/devicebound/c=d"), Some("a=b"));
        assert_eq!(parse_c2d_topic("devices/d/messages/devicebound/a=b/messages/deviceBound/c"), Some("a=b/messages/deviceBound/c"));
    }

    #[test]
    fn c2d_topic_and_filter() {
        assert_eq!(c2d_topic("dev-1", "a=b"), "devices/dev-1/messages/devicebound/a=b");
        assert_eq!(c2d_topic("dev-1", ""), "devices/dev-1/messages/devicebound/");
        assert_eq!(c2d_filter("dev-1"), "devices/dev-1/messages/devicebound/#");
        assert_eq!(parse_c2d_topic(&c2d_topic("dev-1", "x=%2F")), Some("x=%2F"));
    }

    #[test]
    fn parse_d2c_topic_accepts_the_tolerant_variants() {
        let device = |device_id, bag| Some(D2cTopic { device_id, module_id: None, bag });
        assert_eq!(parse_d2c_topic("devices/d1/messages/events/"), device("d1", ""));
        assert_eq!(parse_d2c_topic("devices/d1/messages/events"), device("d1", ""));
        assert_eq!(parse_d2c_topic("devices/d1/messages/events/a=b&c"), device("d1", "a=b&c"));
        assert_eq!(parse_d2c_topic("devices/d1/messages/events/a=b/"), device("d1", "a=b"));
        assert_eq!(parse_d2c_topic("devices/d1/messages/events/%24.on=alert/"), device("d1", "%24.on=alert"));
        assert_eq!(
            parse_d2c_topic("devices/d1/messages/events/?food=I%20like%20fries&pet=I%20like%20cats"),
            device("d1", "food=I%20like%20fries&pet=I%20like%20cats")
        );
        assert_eq!(
            parse_d2c_topic("devices/d1/modules/m1/messages/events/a=b/"),
            Some(D2cTopic { device_id: "d1", module_id: Some("m1"), bag: "a=b" })
        );
        assert_eq!(
            parse_d2c_topic("devices/d1/modules/m1/messages/events"),
            Some(D2cTopic { device_id: "d1", module_id: Some("m1"), bag: "" })
        );
        let topic = d2c_topic("dev.1", "%24.mid=x&k=v");
        assert_eq!(topic, "devices/dev.1/messages/events/%24.mid=x&k=v");
        assert_eq!(parse_d2c_topic(&topic), device("dev.1", "%24.mid=x&k=v"));
    }

    #[test]
    fn parse_d2c_topic_rejects_other_topics() {
        for topic in [
            "",
            "devices/",
            "devices/d1",
            "devices//messages/events/",
            "devices/d1/messages/eventsX",
            "devices/d1/messages/events?a=b",
            "devices/d1/messages/devicebound/",
            "devices/d1/modules//messages/events/",
            "devices/d1/modules/m1",
            "devices/d1/x/messages/events/",
            "Devices/d1/messages/events/",
            "/devices/d1/messages/events/",
            "$iothub/twin/PATCH/properties/reported/",
        ] {
            assert_eq!(parse_d2c_topic(topic), None, "{topic:?}");
        }
    }

    #[test]
    fn device_username_layout() {
        assert_eq!(device_username("hub.azure-devices.net", "d1", None), format!("hub.azure-devices.net/d1/?api-version={API_VERSION}"));
        assert_eq!(
            device_username("127.0.0.1:18830", "d1", Some("hubmsg/0.1 (rust)")),
            format!("127.0.0.1:18830/d1/?api-version={API_VERSION}&DeviceClientType=hubmsg%2F0.1%20%28rust%29")
        );
    }

    #[test]
    fn parse_username_forms() {
        let u = parse_username(&device_username("hub.azure-devices.net", "d1", Some("hubmsg/0.1"))).unwrap();
        assert_eq!(
            u,
            Username {
                host: "hub.azure-devices.net".into(),
                device_id: "d1".into(),
                module_id: None,
                api_version: Some(API_VERSION.into()),
                options: vec![("DeviceClientType".into(), "hubmsg/0.1".into())],
            }
        );

        let u = parse_username("hub/d1/m1/?api-version=2020-09-30&model-id=dtmi%3Acom%3Aexample%3B1").unwrap();
        assert_eq!((u.device_id.as_str(), u.module_id.as_deref()), ("d1", Some("m1")));
        assert_eq!(u.api_version.as_deref(), Some("2020-09-30"));
        assert_eq!(u.options, vec![("model-id".to_owned(), "dtmi:com:example;1".to_owned())]);

        let u = parse_username("hub/d1/api-version=2016-11-14").unwrap();
        assert_eq!((u.host.as_str(), u.device_id.as_str(), u.module_id), ("hub", "d1", None));
        assert_eq!(u.api_version.as_deref(), Some("2016-11-14"));

        let u = parse_username("hub/d1/?api-version=2018-06-30&DeviceClientType=iothubclient%2f1.9.0%20(native%3b%20Linux%3b%20aarch64)")
            .unwrap();
        assert_eq!(u.options[0].1, "iothubclient/1.9.0 (native; Linux; aarch64)");

        let u = parse_username("hub/d1/").unwrap();
        assert_eq!((u.api_version, u.options), (None, vec![]));
        let u = parse_username("hub/d1/?DeviceClientType=x&flag&").unwrap();
        assert_eq!(u.options, vec![("DeviceClientType".into(), "x".into()), ("flag".into(), String::new())]);
    }

    #[test]
    fn parse_username_rejects_malformed() {
        for username in [
            "",
            "hub",
            "hub/d1",
            "/d1/?api-version=1",
            "hub//?api-version=1",
            "hub/d1//?api-version=1",
            "hub/d1/m1",
            "hub/d1/m1/extra/?api-version=1",
            "hub/d1/?api-version=1&api-version=2",
            "hub/d1/?=x",
            "hub/d1/?api-version=%zz",
        ] {
            bad(parse_username(username));
        }
    }

    #[test]
    fn format_time_examples() {
        assert_eq!(format_time_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time_ms(1_619_004_616_123), "2021-04-21T11:30:16.123Z");
        assert_eq!(format_time_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_time_ms(1_735_689_599_999), "2024-12-31T23:59:59.999Z");
        assert_eq!(format_time_ms(40_000_000_000_000), "3237-07-19T23:06:40.000Z");
        assert_eq!(format_time_ms(MAX_TIME_MS), "9999-12-31T23:59:59.999Z");
        assert_eq!(format_time_ms(MAX_TIME_MS + 1), "10000-01-01T00:00:00.000Z");
        // Total: no panic at the top of the range.
        assert!(format_time_ms(u64::MAX).ends_with('Z'));
    }

    #[test]
    fn parse_time_examples() {
        assert_eq!(parse_time_ms("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(parse_time_ms("2021-04-21T11:30:16.123Z").unwrap(), 1_619_004_616_123);
        assert_eq!(parse_time_ms("2021-04-21T11:30:16Z").unwrap(), 1_619_004_616_000);
        assert_eq!(parse_time_ms("2021-04-21T11:30:16.1Z").unwrap(), 1_619_004_616_100);
        assert_eq!(parse_time_ms("2021-04-21T11:30:16.12Z").unwrap(), 1_619_004_616_120);
        assert_eq!(parse_time_ms("2021-04-21T11:30:16.1239999Z").unwrap(), 1_619_004_616_123);
        assert_eq!(parse_time_ms("2021-04-21T11:30:16.123456789Z").unwrap(), 1_619_004_616_123);
        assert_eq!(parse_time_ms("3237-07-19T23:06:40.0000000Z").unwrap(), 40_000_000_000_000);
        assert_eq!(parse_time_ms("2000-02-29T00:00:00Z").unwrap(), 951_782_400_000);
        assert_eq!(parse_time_ms("9999-12-31T23:59:59.999Z").unwrap(), MAX_TIME_MS);
    }

    #[test]
    fn parse_time_rejects_malformed() {
        for text in [
            "",
            "Z",
            "2021-04-21T11:30:16",
            "2021-04-21T11:30:16z",
            "2021-04-21T11:30:16+00:00",
            "2021-04-21T11:30:16.123-07:00",
            "2021-04-21 11:30:16Z",
            "2021-4-21T11:30:16Z",
            "2021-04-21T11:30:16.Z",
            "2021-04-21T11:30:16.1234567890Z",
            "2021-04-21T11:30:16.12a4Z",
            "2021-04-21T11:30:16,123Z",
            "+2021-04-21T11:30:16Z",
            "1969-12-31T23:59:59Z",
            "2021-00-21T11:30:16Z",
            "2021-13-21T11:30:16Z",
            "2021-04-00T11:30:16Z",
            "2021-04-31T11:30:16Z",
            "2021-02-29T11:30:16Z",
            "1900-02-29T00:00:00Z",
            "2100-02-29T00:00:00Z",
            "2021-04-21T24:00:00Z",
            "2021-04-21T11:60:16Z",
            "2021-04-21T11:30:60Z",
            "2021-04-21T11:30:1éZ",
            "10000-01-01T00:00:00Z",
        ] {
            bad(parse_time_ms(text));
        }
    }

    #[test]
    fn civil_conversions_agree_for_every_day_in_range() {
        let last_day = MAX_TIME_MS / MS_PER_DAY;
        let mut previous = (1969, 12, 31);
        for days in 0..=last_day {
            let (year, month, day) = civil_from_days(days);
            assert_eq!(days_from_civil(year, month, day), days);
            let next_day = (previous.0, previous.1, previous.2 + 1);
            let next_month = (previous.0, previous.1 + 1, 1);
            let next_year = (previous.0 + 1, 1, 1);
            assert!([next_day, next_month, next_year].contains(&(year, month, day)), "{days}: {year}-{month}-{day}");
            assert!(day <= days_in_month(year, month));
            previous = (year, month, day);
        }
        assert_eq!(previous, (9999, 12, 31));
    }

    #[test]
    fn time_round_trip() {
        for ms in [0, 1, 999, 1000, 86_399_999, 86_400_000, 951_782_400_000, 1_619_004_616_123, MAX_TIME_MS] {
            assert_eq!(parse_time_ms(&format_time_ms(ms)).unwrap(), ms, "{ms}");
        }
        for _ in 0..1000 {
            let ms = fastrand::u64(0..=MAX_TIME_MS);
            assert_eq!(parse_time_ms(&format_time_ms(ms)).unwrap(), ms, "{ms}");
        }
    }

    fn full_message() -> Message {
        let mut msg = Message::new("body")
            .with_message_id("m 1")
            .with_correlation_id("c/1")
            .with_content("application/json", "utf-8")
            .with_property("temp", "21.5")
            .with_property("a&b", "x=y")
            .with_property("empty", "")
            .with_expiry_ms(1_619_004_616_123);
        msg.user_id = Some("user+1".into());
        msg.creation_time_ms = Some(1_619_004_000_000);
        msg
    }

    #[test]
    fn d2c_bag_layout() {
        assert_eq!(
            d2c_bag(&full_message()).unwrap(),
            "%24.mid=m%201&%24.cid=c%2F1&%24.uid=user%2B1&%24.ct=application%2Fjson&%24.ce=utf-8\
             &%24.ctime=2021-04-21T11%3A20%3A00.000Z&%24.exp=2021-04-21T11%3A30%3A16.123Z\
             &temp=21.5&a%26b=x%3Dy&empty="
        );
        assert_eq!(d2c_bag(&Message::new("x")).unwrap(), "");
        assert_eq!(d2c_bag(&Message::new("x").with_property("k", "v")).unwrap(), "k=v");
    }

    #[test]
    fn d2c_bag_rejects_bad_properties_and_times() {
        let err = bad(d2c_bag(&Message::new("x").with_property("", "v")));
        assert!(err.message().contains("empty name"), "{err}");
        let err = bad(d2c_bag(&Message::new("x").with_property("k", "1").with_property("k", "2")));
        assert!(err.message().contains("`k`"), "{err}");
        // Names differing only in case are distinct.
        assert!(d2c_bag(&Message::new("x").with_property("k", "1").with_property("K", "2")).is_ok());
        bad(d2c_bag(&Message::new("x").with_expiry_ms(MAX_TIME_MS + 1)));
        let mut msg = Message::new("x");
        msg.creation_time_ms = Some(u64::MAX);
        bad(d2c_bag(&msg));
    }

    #[test]
    fn d2c_round_trip_through_the_wire() {
        let msg = full_message();
        let mut received = Message::new("body");
        apply_bag(&mut received, decode_bag(&d2c_bag(&msg).unwrap()).unwrap()).unwrap();
        assert_eq!(received, msg);
    }

    #[test]
    fn apply_bag_routes_keys() {
        let mut msg = Message::default();
        let bag = decode_bag("$.mid=1&%24.to=%2Fdevices%2Fd%2Fmessages%2Fdevicebound&iothub-ack=full&%24.cdid=edge&k&j=2").unwrap();
        apply_bag(&mut msg, bag).unwrap();
        assert_eq!(msg.message_id.as_deref(), Some("1"));
        assert_eq!(
            msg.system,
            vec![
                ("$.to".to_owned(), "/devices/d/messages/devicebound".to_owned()),
                ("iothub-ack".to_owned(), "full".to_owned()),
                ("$.cdid".to_owned(), "edge".to_owned()),
            ]
        );
        assert_eq!(msg.properties, vec![("k".to_owned(), String::new()), ("j".to_owned(), "2".to_owned())]);
    }

    #[test]
    fn apply_bag_rejects_bad_times() {
        for bag in [vec![some("$.exp", "tomorrow")], vec![some("$.ctime", "2021-04-21T11:30:16+02:00")]] {
            let name = bag[0].0.clone();
            let err = bad(apply_bag(&mut Message::default(), bag));
            assert!(err.message().contains(&name), "{err}");
        }
    }

    #[test]
    fn c2d_bag_emit_order() {
        let mut msg = full_message();
        msg.system = vec![
            ("iothub-ack".into(), "full".into()),
            ("sequence-number".into(), "7".into()),
            ("$.to".into(), "/devices/d/messages/devicebound".into()),
            ("$.to".into(), "/devices/other".into()),
        ];
        assert_eq!(
            c2d_bag(&msg),
            "%24.mid=m%201&%24.cid=c%2F1&%24.uid=user%2B1&%24.exp=2021-04-21T11%3A30%3A16.123Z\
             &%24.to=%2Fdevices%2Fd%2Fmessages%2Fdevicebound&%24.ct=application%2Fjson&%24.ce=utf-8\
             &iothub-ack=full&sequence-number=7&temp=21.5&a%26b=x%3Dy&empty="
        );
        assert_eq!(c2d_bag(&Message::new("x")), "");
    }

    #[test]
    fn c2d_round_trip_through_the_topic() {
        let mut msg = full_message();
        msg.creation_time_ms = None; // not carried on C2D
        msg.system = vec![("$.to".into(), "/devices/d/messages/devicebound".into()), ("iothub-ack".into(), "positive".into())];
        let topic = c2d_topic("d", &c2d_bag(&msg));
        let mut received = Message::new("body");
        apply_bag(&mut received, decode_bag(parse_c2d_topic(&topic).unwrap()).unwrap()).unwrap();
        assert_eq!(received, msg);
    }
}
