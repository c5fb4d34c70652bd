//! The hubmsg service wire contract (`docs/protocol.md`): what a [`crate::service::ServiceClient`]
//! and the hub say to each other over MQTT 3.1.1. Pure data and (de)serialization; no I/O.
//!
//! - Requests: PUBLISH QoS 1 to `$hubmsg/req/{op}/{rid}` with a JSON body; the hub PUBACKs on
//!   receipt and answers with PUBLISH QoS 0 to `$hubmsg/res/{rid}` carrying a [`Response`].
//! - D2C events: the hub PUBLISHes QoS 1 to `$hubmsg/events/{group}/{partition}/{seq}` with a
//!   [`crate::Message`] record as the payload; the service's PUBACK acknowledges the event and
//!   advances the group's checkpoint for that partition.

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// Client id prefix and user-name marker of service connections.
pub const SERVICE_MARKER: &str = "$hubmsg-service";
/// Topic prefix of requests.
pub const REQ_PREFIX: &str = "$hubmsg/req/";
/// Topic prefix of responses.
pub const RES_PREFIX: &str = "$hubmsg/res/";
/// Topic prefix of D2C event deliveries.
pub const EVENTS_PREFIX: &str = "$hubmsg/events/";

/// Request topic for `op` with request id `rid`.
pub fn request_topic(op: &str, rid: u64) -> String {
    format!("{REQ_PREFIX}{op}/{rid}")
}

/// Parses `$hubmsg/req/{op}/{rid}`.
pub fn parse_request_topic(topic: &str) -> Option<(&str, u64)> {
    let rest = topic.strip_prefix(REQ_PREFIX)?;
    let (op, rid) = rest.rsplit_once('/')?;
    Some((op, rid.parse().ok()?))
}

/// Response topic for request id `rid`.
pub fn response_topic(rid: u64) -> String {
    format!("{RES_PREFIX}{rid}")
}

/// Event delivery topic.
pub fn event_topic(group: &str, partition: u32, seq: u64) -> String {
    // Built by hand: this runs for every event delivered.
    let mut t = String::with_capacity(EVENTS_PREFIX.len() + group.len() + 32);
    t.push_str(EVENTS_PREFIX);
    t.push_str(group);
    t.push('/');
    push_decimal(&mut t, u64::from(partition));
    t.push('/');
    push_decimal(&mut t, seq);
    t
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[i..]).expect("ASCII digits"));
}

/// Parses `$hubmsg/events/{group}/{partition}/{seq}` into (group, partition, seq).
pub fn parse_event_topic(topic: &str) -> Option<(&str, u32, u64)> {
    let rest = topic.strip_prefix(EVENTS_PREFIX)?;
    let (rest, seq) = rest.rsplit_once('/')?;
    let (group, partition) = rest.rsplit_once('/')?;
    Some((group, partition.parse().ok()?, seq.parse().ok()?))
}

/// A response to a request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    /// HTTP-like status: 200 ok, 4xx caller error, 5xx hub error.
    pub status: u16,
    /// The result on success.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub body: serde_json::Value,
    /// The error on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

/// An error on the wire: the [`ErrorKind`] code and the human message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WireError {
    /// [`ErrorKind::code`].
    pub code: String,
    /// Human message.
    pub message: String,
}

impl Response {
    /// A success carrying `body`.
    pub fn ok(body: serde_json::Value) -> Response {
        Response { status: 200, body, error: None }
    }

    /// A failure from an error.
    pub fn err(e: &Error) -> Response {
        let status = match e.kind() {
            ErrorKind::InvalidArgument | ErrorKind::MessageTooLarge => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::NotFound => 404,
            ErrorKind::AlreadyExists => 409,
            ErrorKind::LockLost => 412,
            ErrorKind::QueueFull => 403,
            ErrorKind::Timeout => 504,
            _ => 500,
        };
        Response {
            status,
            body: serde_json::Value::Null,
            error: Some(WireError { code: e.kind().code().to_string(), message: e.message().to_string() }),
        }
    }

    /// Converts back into a result.
    pub fn into_result(self) -> Result<serde_json::Value> {
        match self.error {
            None if self.status < 400 => Ok(self.body),
            None => Err(Error::protocol(format!("hub answered status {} without an error", self.status))),
            Some(e) => Err(Error::new(ErrorKind::from_code(&e.code).unwrap_or(ErrorKind::Internal), e.message)),
        }
    }
}

/// Where a consumer starts reading a partition.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum StartPosition {
    /// The group's checkpoint; the beginning of the partition if there is none.
    #[default]
    Checkpoint,
    /// The oldest retained event.
    Earliest,
    /// Only events enqueued after the consumer started.
    Latest,
    /// From this sequence number (inclusive) in every partition.
    Sequence(u64),
    /// From the first event enqueued at or after this time (ms since the Unix epoch).
    Time(u64),
}

impl std::str::FromStr for StartPosition {
    type Err = Error;
    /// `checkpoint`, `earliest`, `latest`, `seq:N`, or `time:MS`.
    fn from_str(s: &str) -> Result<StartPosition> {
        Ok(match s {
            "checkpoint" => StartPosition::Checkpoint,
            "earliest" => StartPosition::Earliest,
            "latest" => StartPosition::Latest,
            _ => {
                let bad = || Error::invalid(format!("start position '{s}' is not checkpoint, earliest, latest, seq:N or time:MS"));
                match s.split_once(':') {
                    Some(("seq", n)) => StartPosition::Sequence(n.parse().map_err(|_| bad())?),
                    Some(("time", n)) => StartPosition::Time(n.parse().map_err(|_| bad())?),
                    _ => return Err(bad()),
                }
            }
        })
    }
}

/// `consume` request body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConsumeRequest {
    /// Consumer group (`$Default` or a named group).
    pub group: String,
    /// Where to start.
    #[serde(default)]
    pub from: StartPosition,
    /// Most unacknowledged events per partition in flight to this consumer.
    #[serde(default = "default_window")]
    pub window: u32,
}

fn default_window() -> u32 {
    1000
}

/// `checkpoint` request body: wait until the group's checkpoints are durable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointRequest {
    /// Consumer group.
    pub group: String,
}

/// A device identity as the registry returns it (keys included: callers need a policy with
/// registry read rights).
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceIdentity {
    /// Device id.
    pub device_id: String,
    /// Generation id (distinguishes re-created devices with the same id).
    pub generation_id: String,
    /// `enabled` or `disabled`.
    pub status: DeviceStatus,
    /// Primary symmetric key (base64).
    pub primary_key: String,
    /// Secondary symmetric key (base64).
    pub secondary_key: String,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
}

impl std::fmt::Debug for DeviceIdentity {
    /// Keys are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceIdentity")
            .field("device_id", &self.device_id)
            .field("generation_id", &self.generation_id)
            .field("status", &self.status)
            .field("primary_key", &crate::auth::Redacted)
            .field("secondary_key", &crate::auth::Redacted)
            .field("created_ms", &self.created_ms)
            .finish()
    }
}

/// Whether a device may connect.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DeviceStatus {
    /// May connect.
    Enabled,
    /// Refused at CONNECT (and dropped if connected).
    Disabled,
}

/// `devices.create` request body.
#[derive(Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CreateDevice {
    /// Device id.
    pub device_id: String,
    /// Keys to use instead of generated ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_key: Option<String>,
    /// Secondary key to use instead of a generated one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
    /// Initial status (default enabled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DeviceStatus>,
}

impl std::fmt::Debug for CreateDevice {
    /// Keys are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = |k: &Option<String>| k.as_ref().map(|_| crate::auth::Redacted);
        f.debug_struct("CreateDevice")
            .field("device_id", &self.device_id)
            .field("primary_key", &key(&self.primary_key))
            .field("secondary_key", &key(&self.secondary_key))
            .field("status", &self.status)
            .finish()
    }
}

/// What a policy may do (reference §2.3, IoT Hub's permission names).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Right {
    /// Read identities (`devices.get`, `devices.list`).
    RegistryRead,
    /// Read, create, update and delete identities (includes RegistryRead).
    #[serde(alias = "registryWrite")]
    RegistryReadWrite,
    /// Read D2C events, send and purge C2D, receive feedback, checkpoints.
    ServiceConnect,
    /// Connect as a device (token service / protocol gateway); no service session.
    DeviceConnect,
}

/// A hub-level shared access policy. `Debug` never prints the keys.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// Policy name (`skn` in tokens).
    pub name: String,
    /// Primary key (base64).
    pub primary_key: String,
    /// Secondary key (base64).
    pub secondary_key: String,
    /// Granted rights.
    pub rights: Vec<Right>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("name", &self.name)
            .field("primary_key", &crate::auth::Redacted)
            .field("secondary_key", &crate::auth::Redacted)
            .field("rights", &self.rights)
            .finish()
    }
}

/// `policies.regenerate` request body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RegeneratePolicyKey {
    /// Policy name.
    pub name: String,
    /// `primary`, `secondary` or `both`.
    pub key: String,
}

/// Body of requests naming one device (`devices.get`, `devices.delete`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRef {
    /// Device id.
    pub device_id: String,
}

/// `devices.update` request body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpdateDevice {
    /// Device id.
    pub device_id: String,
    /// New status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DeviceStatus>,
    /// Regenerate `primary`, `secondary` or `both` keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regenerate: Option<String>,
}

/// Parses a request body, mapping JSON errors to `InvalidArgument`.
pub fn parse_body<T: serde::de::DeserializeOwned>(op: &str, body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::invalid(format!("request '{op}': malformed body: {e}")))
}

/// Which outcomes the sender wants feedback for (`iothub-ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AckMode {
    /// No feedback.
    #[default]
    None,
    /// Feedback on completion.
    Positive,
    /// Feedback on dead-lettering (expired, delivery count exceeded, rejected) and purge.
    Negative,
    /// Both.
    Full,
}

impl AckMode {
    /// The wire value (`none`, `positive`, `negative`, `full`).
    pub fn as_str(self) -> &'static str {
        match self {
            AckMode::None => "none",
            AckMode::Positive => "positive",
            AckMode::Negative => "negative",
            AckMode::Full => "full",
        }
    }

    /// Whether a message with this mode wants feedback for `status`.
    pub fn wants(self, status: FeedbackStatus) -> bool {
        match self {
            AckMode::None => false,
            AckMode::Full => true,
            AckMode::Positive => status == FeedbackStatus::Success,
            AckMode::Negative => status != FeedbackStatus::Success,
        }
    }
}

impl std::str::FromStr for AckMode {
    type Err = Error;
    /// Case-insensitive `none`, `positive`, `negative`, `full` (reference §7.1).
    fn from_str(s: &str) -> Result<AckMode> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "none" => AckMode::None,
            "positive" => AckMode::Positive,
            "negative" => AckMode::Negative,
            "full" => AckMode::Full,
            _ => return Err(Error::invalid(format!("ack '{s}' is not none, positive, negative or full"))),
        })
    }
}

/// Feedback status codes (reference §7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FeedbackStatus {
    /// Completed by the device.
    Success,
    /// TTL passed before completion.
    Expired,
    /// Abandoned `max_delivery_count` times.
    DeliveryCountExceeded,
    /// Rejected by the device.
    Rejected,
    /// Removed by a purge.
    Purged,
}

impl FeedbackStatus {
    /// The status name (also used as the description).
    pub fn as_str(self) -> &'static str {
        match self {
            FeedbackStatus::Success => "Success",
            FeedbackStatus::Expired => "Expired",
            FeedbackStatus::DeliveryCountExceeded => "DeliveryCountExceeded",
            FeedbackStatus::Rejected => "Rejected",
            FeedbackStatus::Purged => "Purged",
        }
    }
}

/// One feedback record, serialized exactly as IoT Hub's JSON (reference §7.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackRecord {
    /// `message-id` of the C2D message.
    pub original_message_id: String,
    /// Target device.
    pub device_id: String,
    /// Target device's generation id.
    pub device_generation_id: String,
    /// When the outcome happened (ISO-8601 UTC).
    pub enqueued_time_utc: String,
    /// Outcome.
    pub status_code: FeedbackStatus,
    /// Text for the status (the status name).
    pub description: String,
}

/// Topic prefix of the hubmsg device extension that settles a C2D message without completing
/// it: `$hubmsg/c2d/abandon/{sequenceNumber}` or `$hubmsg/c2d/reject/{sequenceNumber}`.
pub const C2D_SETTLE_PREFIX: &str = "$hubmsg/c2d/";

/// Topic prefix of feedback batch deliveries: `$hubmsg/feedback/{batchId}`.
pub const FEEDBACK_PREFIX: &str = "$hubmsg/feedback/";

/// Topic of outcome notifications: the hub publishes (QoS 0) a JSON array of feedback records
/// of message ids this connection watches (`outcomes.watch`), to this connection only.
pub const OUTCOMES_TOPIC: &str = "$hubmsg/outcomes";

/// Message ids one service connection may watch at a time (`outcomes.watch`); the hub refuses
/// more with `QUEUE_FULL`, and a [`crate::service::ServiceClient`] refuses the wait itself.
pub const MAX_WATCHES: usize = 10_000;

/// `outcomes.watch` request body: the message ids whose outcomes this connection waits for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WatchOutcomes {
    /// Message ids (`originalMessageId` of the records to notify).
    pub ids: Vec<String>,
    /// Absent on a first watch (sent before its message: never answered from the hub's cache);
    /// on a re-sent watch the `at` the hub answered the first one with, so a cached record that
    /// arrived at or after it answers at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
}

/// `outcomes.watch` answer.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Watching {
    /// The hub node's time (ms since the Unix epoch) when it registered the watch.
    pub at: u64,
}

/// `outcomes.unwatch` request body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct UnwatchOutcomes {
    /// Message ids no longer waited for.
    pub ids: Vec<String>,
}

/// `c2d.send` request body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct C2dSend {
    /// Target device.
    pub device_id: String,
    /// Requested feedback.
    #[serde(default)]
    pub ack: AckMode,
    /// Time to live in ms (default 1 h, at most 48 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// The message as a record ([`crate::Message::encode`]), base64.
    pub record: String,
    /// Identity of this send, the same on every re-send of it: the hub answers a repeated
    /// send id with the first copy's receipt instead of queueing the message twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_id: Option<String>,
}

/// `c2d.send` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct C2dReceipt {
    /// Message id (the sender's, or one the hub generated).
    pub message_id: String,
    /// Sequence number in the device queue.
    pub sequence_number: u64,
}

/// `c2d.purge` answer (IoT Hub's purge response shape).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PurgeResult {
    /// The device.
    pub device_id: String,
    /// How many messages were removed.
    pub total_messages_purged: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        assert_eq!(parse_request_topic(&request_topic("devices.create", 42)), Some(("devices.create", 42)));
        assert_eq!(parse_event_topic(&event_topic("$Default", 3, 99)), Some(("$Default", 3, 99)));
        assert_eq!(event_topic("g", 0, 1_234_567_890), format!("{EVENTS_PREFIX}g/0/1234567890"));
        assert_eq!(event_topic("g", 12, u64::MAX), format!("{EVENTS_PREFIX}g/12/{}", u64::MAX));
        assert_eq!(parse_event_topic("$hubmsg/events/g/x/1"), None);
        assert_eq!(parse_request_topic("$hubmsg/req/op"), None);
    }

    #[test]
    fn errors_cross_the_wire_with_their_kind() {
        let e = Error::new(ErrorKind::NotFound, "device 'x' not found");
        let r: Response = serde_json::from_str(&serde_json::to_string(&Response::err(&e)).unwrap()).unwrap();
        let back = r.into_result().unwrap_err();
        assert_eq!((back.kind(), back.message()), (ErrorKind::NotFound, "device 'x' not found"));
    }

    #[test]
    fn start_positions_parse() {
        assert_eq!("earliest".parse::<StartPosition>().unwrap(), StartPosition::Earliest);
        assert_eq!("seq:5".parse::<StartPosition>().unwrap(), StartPosition::Sequence(5));
        assert!("seq:x".parse::<StartPosition>().is_err());
        let j = serde_json::to_string(&StartPosition::Time(7)).unwrap();
        assert_eq!(serde_json::from_str::<StartPosition>(&j).unwrap(), StartPosition::Time(7));
    }
}
