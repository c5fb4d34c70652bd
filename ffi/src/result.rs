//! Result codes, the thread-local last error, and the panic boundary every export goes through.
//!
//! Invariants: codes are never renumbered or reused ([`RESULTS`] is the one table, mapped from
//! core's `ErrorKind`); no panic leaves an exported function; a failing call always leaves a
//! message in [`hubmsg_last_error_message`] for the calling thread.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use hubmsg_bind::panic_text;
use hubmsg_core::{Error, ErrorKind};

/// The result of every fallible hubmsg call: 0 (`HUBMSG_OK`) on success, a negative
/// `HUBMSG_<ERROR>` on failure (details in hubmsg_last_error_message()), or a positive
/// non-error status (`HUBMSG_EMPTY`, `HUBMSG_PENDING`).
#[allow(non_camel_case_types)]
pub type hubmsg_result = i32;

/// Success.
pub const HUBMSG_OK: hubmsg_result = 0;
/// Not an error: a receive timed out without a message (the out-pointer is NULL).
pub const HUBMSG_EMPTY: hubmsg_result = 1;
/// Not an error: the awaited outcome is not there yet (wait again later).
pub const HUBMSG_PENDING: hubmsg_result = 2;
/// A caller-supplied value is NULL, malformed or out of range.
pub const HUBMSG_INVALID_ARGUMENT: hubmsg_result = -1;
/// Credentials were refused (wrong key, expired token, disabled device, missing right).
pub const HUBMSG_UNAUTHORIZED: hubmsg_result = -2;
/// The named device, policy or message does not exist.
pub const HUBMSG_NOT_FOUND: hubmsg_result = -3;
/// The thing to create already exists.
pub const HUBMSG_ALREADY_EXISTS: hubmsg_result = -4;
/// A bounded queue is full (device outbox with policy reject, a device's C2D queue of 50).
pub const HUBMSG_QUEUE_FULL: hubmsg_result = -5;
/// A message is larger than allowed (256 KB D2C, 64 KB C2D, or the outbox byte bound).
pub const HUBMSG_MESSAGE_TOO_LARGE: hubmsg_result = -6;
/// An operation did not finish within its time limit (nothing is lost; it may continue).
pub const HUBMSG_TIMEOUT: hubmsg_result = -7;
/// The connection is down (transient: the engine retries).
pub const HUBMSG_DISCONNECTED: hubmsg_result = -8;
/// The durable store failed (I/O error, full disk, corrupt file).
pub const HUBMSG_STORAGE: hubmsg_result = -9;
/// The peer broke the protocol.
pub const HUBMSG_PROTOCOL: hubmsg_result = -10;
/// The client, hub, stream or message was closed.
pub const HUBMSG_CLOSED: hubmsg_result = -11;
/// The message expired before it could be delivered.
pub const HUBMSG_EXPIRED: hubmsg_result = -12;
/// The message lock was lost before it was settled.
pub const HUBMSG_LOCK_LOST: hubmsg_result = -13;
/// The API was used in a way it does not support (e.g. a blocking call on a hubmsg runtime
/// thread, recv() while a callback is set, settling a message twice).
pub const HUBMSG_USAGE: hubmsg_result = -14;
/// A bug in hubmsg (including a caught panic). Please report it with the last error message.
pub const HUBMSG_INTERNAL: hubmsg_result = -15;

/// The one table: code, name, and the core `ErrorKind` it stands for. Append only.
pub(crate) const RESULTS: &[(hubmsg_result, &str, Option<ErrorKind>)] = &[
    (HUBMSG_OK, "HUBMSG_OK", None),
    (HUBMSG_EMPTY, "HUBMSG_EMPTY", None),
    (HUBMSG_PENDING, "HUBMSG_PENDING", None),
    (HUBMSG_INVALID_ARGUMENT, "HUBMSG_INVALID_ARGUMENT", Some(ErrorKind::InvalidArgument)),
    (HUBMSG_UNAUTHORIZED, "HUBMSG_UNAUTHORIZED", Some(ErrorKind::Unauthorized)),
    (HUBMSG_NOT_FOUND, "HUBMSG_NOT_FOUND", Some(ErrorKind::NotFound)),
    (HUBMSG_ALREADY_EXISTS, "HUBMSG_ALREADY_EXISTS", Some(ErrorKind::AlreadyExists)),
    (HUBMSG_QUEUE_FULL, "HUBMSG_QUEUE_FULL", Some(ErrorKind::QueueFull)),
    (HUBMSG_MESSAGE_TOO_LARGE, "HUBMSG_MESSAGE_TOO_LARGE", Some(ErrorKind::MessageTooLarge)),
    (HUBMSG_TIMEOUT, "HUBMSG_TIMEOUT", Some(ErrorKind::Timeout)),
    (HUBMSG_DISCONNECTED, "HUBMSG_DISCONNECTED", Some(ErrorKind::Disconnected)),
    (HUBMSG_STORAGE, "HUBMSG_STORAGE", Some(ErrorKind::Storage)),
    (HUBMSG_PROTOCOL, "HUBMSG_PROTOCOL", Some(ErrorKind::Protocol)),
    (HUBMSG_CLOSED, "HUBMSG_CLOSED", Some(ErrorKind::Closed)),
    (HUBMSG_EXPIRED, "HUBMSG_EXPIRED", Some(ErrorKind::Expired)),
    (HUBMSG_LOCK_LOST, "HUBMSG_LOCK_LOST", Some(ErrorKind::LockLost)),
    (HUBMSG_USAGE, "HUBMSG_USAGE", Some(ErrorKind::Usage)),
    (HUBMSG_INTERNAL, "HUBMSG_INTERNAL", Some(ErrorKind::Internal)),
];

/// The C code for a core error kind (a kind added to core later maps to `HUBMSG_INTERNAL` until
/// it gets its own row).
pub(crate) fn code_of(kind: ErrorKind) -> hubmsg_result {
    RESULTS.iter().find(|r| r.2 == Some(kind)).map_or(HUBMSG_INTERNAL, |r| r.0)
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Stores `message` as this thread's last error (cut at an interior NUL).
pub(crate) fn set_last_error(message: &str) {
    let c = to_cstring(message);
    LAST_ERROR.with(|l| *l.borrow_mut() = c);
}

/// Records `e` as the last error and returns its code.
pub(crate) fn fail(e: &Error) -> hubmsg_result {
    set_last_error(&format!("{}: {}", e.kind().code(), e));
    code_of(e.kind())
}

/// A C string of `s`, cut at the first NUL byte (C cannot see past it anyway).
pub(crate) fn to_cstring(s: &str) -> CString {
    let end = s.find('\0').unwrap_or(s.len());
    CString::new(&s[..end]).expect("no interior NUL before `end`")
}

/// The panic boundary of a fallible export: runs `f`, maps its error to a code (recording the
/// message) and a panic to `HUBMSG_INTERNAL`.
pub(crate) fn guard(f: impl FnOnce() -> Result<hubmsg_result, Error>) -> hubmsg_result {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => fail(&e),
        Err(p) => {
            set_last_error(&format!("INTERNAL: hubmsg panicked (a bug; please report it): {}", panic_text(&*p)));
            HUBMSG_INTERNAL
        }
    }
}

/// The panic boundary of an infallible export (getters, free): `f`'s value, or `default` when it
/// fails or panics (the reason goes to the last error).
pub(crate) fn guard_or<T>(default: T, f: impl FnOnce() -> Result<T, Error>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            fail(&e);
            default
        }
        Err(p) => {
            set_last_error(&format!("INTERNAL: hubmsg panicked (a bug; please report it): {}", panic_text(&*p)));
            default
        }
    }
}

/// The name of a result code, e.g. `"HUBMSG_QUEUE_FULL"`; `"HUBMSG_UNKNOWN"` for a code hubmsg
/// does not define.
///
/// @param code A result code returned by a hubmsg function.
/// @return A static NUL-terminated string (never NULL; do not free).
#[no_mangle]
pub extern "C" fn hubmsg_result_str(code: hubmsg_result) -> *const c_char {
    static NAMES: std::sync::OnceLock<Vec<(hubmsg_result, CString)>> = std::sync::OnceLock::new();
    static UNKNOWN: &CStr = c"HUBMSG_UNKNOWN";
    guard_or(UNKNOWN.as_ptr(), || {
        let names = NAMES.get_or_init(|| RESULTS.iter().map(|r| (r.0, CString::new(r.1).expect("names have no NUL"))).collect());
        Ok(names.iter().find(|n| n.0 == code).map_or(UNKNOWN.as_ptr(), |n| n.1.as_ptr()))
    })
}

/// The message of the most recent failed hubmsg call on this thread (e.g.
/// `"QUEUE_FULL: outbox holds 1000 messages (limit 1000)"`), or `""` if none failed yet.
///
/// @return A NUL-terminated string owned by hubmsg, valid until the next hubmsg call on this
///         thread (never NULL; do not free). Copy it to keep it.
#[no_mangle]
pub extern "C" fn hubmsg_last_error_message() -> *const c_char {
    guard_or(c"".as_ptr(), || Ok(LAST_ERROR.with(|l| l.borrow().as_ptr())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_unique_and_names_match_core_codes() {
        for (i, a) in RESULTS.iter().enumerate() {
            for b in &RESULTS[i + 1..] {
                assert_ne!(a.0, b.0, "{} and {} share a code", a.1, b.1);
                assert!(!(a.2.is_some() && a.2 == b.2), "{} and {} map the same kind", a.1, b.1);
            }
            match a.2 {
                Some(kind) => {
                    assert!(a.0 < 0, "{} is an error and must be negative", a.1);
                    assert_eq!(a.1, format!("HUBMSG_{}", kind.code()));
                    assert_eq!(code_of(kind), a.0);
                }
                None => assert!(a.0 >= 0, "{} is a status and must not be negative", a.1),
            }
        }
    }

    #[test]
    fn every_core_kind_has_its_own_code() {
        for kind in ErrorKind::ALL {
            let row = RESULTS.iter().find(|r| r.2 == Some(kind));
            assert!(row.is_some(), "core ErrorKind::{kind:?} has no C result code: append a HUBMSG_{} row to RESULTS", kind.code());
        }
        assert_eq!(RESULTS.iter().filter(|r| r.2.is_some()).count(), ErrorKind::ALL.len());
    }

    #[test]
    fn a_panic_inside_an_export_becomes_internal_with_a_message() {
        assert_eq!(guard(|| panic!("boom")), HUBMSG_INTERNAL);
        // SAFETY: the last error is a valid C string.
        let msg = unsafe { CStr::from_ptr(hubmsg_last_error_message()) }.to_str().unwrap().to_string();
        assert!(msg.contains("panicked") && msg.contains("boom"), "{msg}");
        assert_eq!(guard_or(7, || -> Result<i32, Error> { panic!("again") }), 7);
        assert_eq!(guard(|| Err(Error::new(ErrorKind::QueueFull, "full"))), HUBMSG_QUEUE_FULL);
        // SAFETY: as above.
        let msg = unsafe { CStr::from_ptr(hubmsg_last_error_message()) }.to_str().unwrap().to_string();
        assert_eq!(msg, "QUEUE_FULL: full");
    }

    #[test]
    fn cstrings_are_cut_at_nul() {
        assert_eq!(to_cstring("ab\0cd").as_bytes(), b"ab");
        assert_eq!(to_cstring("").as_bytes(), b"");
    }
}
