//! Engine errors as JS errors: every message a native method rejects or throws with starts
//! with the kind's code from the one table (`hubmsg_bind::errors`, generated from core's
//! `ErrorKind::ALL`), e.g. `HUBMSG_QUEUE_FULL: device outbox is full …`.
//!
//! napi-rs gives a JS error the `code` of its napi status, and an `async` result can only carry
//! a status, so the code travels in the message: `index.js` moves the prefix into `err.code`
//! (and leaves the message without it) for every method of every class, synchronous or not.
//! Wrong JS types are thrown with status `InvalidArg`, which `index.js` turns into a `TypeError`
//! whose code is `HUBMSG_INVALID_ARGUMENT`.

use hubmsg_core::{Error, ErrorKind};
use napi::Status;

/// The JS error for an engine error.
pub(crate) fn to_js(e: Error) -> napi::Error {
    napi::Error::new(Status::GenericFailure, format!("{}: {}", hubmsg_bind::errors::c_name(e.kind()), e.message()))
}

/// An `InvalidArgument` error (a wrong value).
pub(crate) fn invalid(message: impl Into<String>) -> napi::Error {
    to_js(Error::invalid(message))
}

/// A `TypeError` with code `HUBMSG_INVALID_ARGUMENT` (a value of the wrong JS type).
pub(crate) fn type_error(message: impl AsRef<str>) -> napi::Error {
    napi::Error::new(Status::InvalidArg, format!("{}: {}", hubmsg_bind::errors::c_name(ErrorKind::InvalidArgument), message.as_ref()))
}

/// `?` on engine results in napi functions.
pub(crate) trait IntoJs<T> {
    /// The value, or the error as a JS error.
    fn js(self) -> napi::Result<T>;
}

impl<T> IntoJs<T> for hubmsg_core::Result<T> {
    fn js(self) -> napi::Result<T> {
        self.map_err(to_js)
    }
}
