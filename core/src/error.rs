//! The one error type of hubmsg and its stable kind table.
//!
//! Every binding (C result codes, Python exception classes, Node `code` strings) maps from
//! [`ErrorKind`] in exactly one table; the kinds are never renumbered or reused.

use std::fmt;

/// What went wrong, in a form stable enough to branch on (and to map to C / Python / Node).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A caller-supplied value is malformed or out of range (connection string, property, TTL…).
    InvalidArgument,
    /// Credentials were refused: wrong key, expired or mis-scoped token, disabled device.
    Unauthorized,
    /// The named thing (device, consumer group, message) does not exist.
    NotFound,
    /// The thing to create already exists.
    AlreadyExists,
    /// A bounded queue is full (device outbox with policy `reject`, C2D queue of 50…).
    QueueFull,
    /// A message is larger than the protocol allows (256 KB D2C, 64 KB C2D).
    MessageTooLarge,
    /// An operation did not finish within its time limit.
    Timeout,
    /// The connection is down (transient: the engine retries).
    Disconnected,
    /// The durable store failed: I/O error, full disk, corrupt file.
    Storage,
    /// The peer broke the protocol or sent something we cannot parse.
    Protocol,
    /// The client, hub or queue was closed.
    Closed,
    /// The message expired before it could be delivered.
    Expired,
    /// The message lock was lost (complete / abandon / reject after the lock expired).
    LockLost,
    /// The API was used in a way it does not support (e.g. blocking inside the runtime).
    Usage,
    /// A bug in hubmsg.
    Internal,
}

impl ErrorKind {
    /// Every kind, in table order (the order of the C result codes, -1 downwards). Bindings
    /// generate their tables from this list (C codes, Python exception classes, Node codes), so
    /// a new kind appended here shows up in every language or fails their table tests.
    pub const ALL: [ErrorKind; 15] = [
        ErrorKind::InvalidArgument,
        ErrorKind::Unauthorized,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::QueueFull,
        ErrorKind::MessageTooLarge,
        ErrorKind::Timeout,
        ErrorKind::Disconnected,
        ErrorKind::Storage,
        ErrorKind::Protocol,
        ErrorKind::Closed,
        ErrorKind::Expired,
        ErrorKind::LockLost,
        ErrorKind::Usage,
        ErrorKind::Internal,
    ];

    /// A short, stable, upper-case name (`QUEUE_FULL`), used by bindings as an error code.
    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "INVALID_ARGUMENT",
            ErrorKind::Unauthorized => "UNAUTHORIZED",
            ErrorKind::NotFound => "NOT_FOUND",
            ErrorKind::AlreadyExists => "ALREADY_EXISTS",
            ErrorKind::QueueFull => "QUEUE_FULL",
            ErrorKind::MessageTooLarge => "MESSAGE_TOO_LARGE",
            ErrorKind::Timeout => "TIMEOUT",
            ErrorKind::Disconnected => "DISCONNECTED",
            ErrorKind::Storage => "STORAGE",
            ErrorKind::Protocol => "PROTOCOL",
            ErrorKind::Closed => "CLOSED",
            ErrorKind::Expired => "EXPIRED",
            ErrorKind::LockLost => "LOCK_LOST",
            ErrorKind::Usage => "USAGE",
            ErrorKind::Internal => "INTERNAL",
        }
    }

    /// Parses [`ErrorKind::code`] back (used on the service wire contract).
    pub fn from_code(code: &str) -> Option<ErrorKind> {
        Some(match code {
            "INVALID_ARGUMENT" => ErrorKind::InvalidArgument,
            "UNAUTHORIZED" => ErrorKind::Unauthorized,
            "NOT_FOUND" => ErrorKind::NotFound,
            "ALREADY_EXISTS" => ErrorKind::AlreadyExists,
            "QUEUE_FULL" => ErrorKind::QueueFull,
            "MESSAGE_TOO_LARGE" => ErrorKind::MessageTooLarge,
            "TIMEOUT" => ErrorKind::Timeout,
            "DISCONNECTED" => ErrorKind::Disconnected,
            "STORAGE" => ErrorKind::Storage,
            "PROTOCOL" => ErrorKind::Protocol,
            "CLOSED" => ErrorKind::Closed,
            "EXPIRED" => ErrorKind::Expired,
            "LOCK_LOST" => ErrorKind::LockLost,
            "USAGE" => ErrorKind::Usage,
            "INTERNAL" => ErrorKind::Internal,
            _ => return None,
        })
    }

    /// Whether retrying the same operation later can succeed (the retry engine's classification).
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorKind::Timeout | ErrorKind::Disconnected | ErrorKind::Storage)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A hubmsg error: a stable [`ErrorKind`] plus a message that says what happened and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with a human message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into(), source: None }
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Error {
        self.source = Some(Box::new(source));
        self
    }

    /// The stable kind to branch on.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The human message (without the kind).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::InvalidArgument, message)
    }

    /// Shorthand for [`ErrorKind::Protocol`].
    pub fn protocol(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Protocol, message)
    }

    /// Shorthand for [`ErrorKind::Storage`] wrapping an I/O error with context.
    pub fn storage(context: impl Into<String>, err: std::io::Error) -> Error {
        let context = context.into();
        let hint = match err.raw_os_error() {
            Some(libc::ENOSPC) => "; the disk is full: free space, nothing acknowledged was lost",
            Some(libc::EACCES) | Some(libc::EPERM) => "; check the directory's permissions",
            _ => "",
        };
        Error::new(ErrorKind::Storage, format!("{context}: {err}{hint}")).with_source(err)
    }

    /// Shorthand for [`ErrorKind::Closed`].
    pub fn closed(what: &str) -> Error {
        Error::new(ErrorKind::Closed, format!("{what} is closed"))
    }
}

impl Clone for Error {
    fn clone(&self) -> Self {
        // Sources are not Clone; keep their text so nothing is lost for humans.
        let message = match &self.source {
            Some(s) if !self.message.contains(&s.to_string()) => format!("{} ({s})", self.message),
            _ => self.message.clone(),
        };
        Error { kind: self.kind, message, source: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The position of `k` in [`ErrorKind::ALL`]. The match is exhaustive, so adding a variant
    /// without listing it here (and in `ALL`) does not compile.
    fn ordinal(k: ErrorKind) -> usize {
        match k {
            ErrorKind::InvalidArgument => 0,
            ErrorKind::Unauthorized => 1,
            ErrorKind::NotFound => 2,
            ErrorKind::AlreadyExists => 3,
            ErrorKind::QueueFull => 4,
            ErrorKind::MessageTooLarge => 5,
            ErrorKind::Timeout => 6,
            ErrorKind::Disconnected => 7,
            ErrorKind::Storage => 8,
            ErrorKind::Protocol => 9,
            ErrorKind::Closed => 10,
            ErrorKind::Expired => 11,
            ErrorKind::LockLost => 12,
            ErrorKind::Usage => 13,
            ErrorKind::Internal => 14,
        }
    }

    #[test]
    fn all_lists_every_kind_once_and_codes_round_trip() {
        for (i, k) in ErrorKind::ALL.into_iter().enumerate() {
            assert_eq!(ordinal(k), i, "{k} is out of place in ErrorKind::ALL");
            assert_eq!(ErrorKind::from_code(k.code()), Some(k));
        }
        assert_eq!(ErrorKind::from_code("nope"), None);
    }

    #[test]
    fn enospc_says_disk_full() {
        let e = Error::storage("append to outbox", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.kind(), ErrorKind::Storage);
        assert!(e.to_string().contains("disk is full"), "{e}");
    }
}
