//! Checked conversions of what C passes in: pointers that may be NULL, strings that may not be
//! UTF-8, integers that stand for enumerations, and out-pointers (set to NULL first, so they are
//! NULL on every failure).

use std::ffi::{c_char, CStr, CString};
use std::time::Duration;

use hubmsg_core::{Error, Result};

/// `p` as a shared reference, or `InvalidArgument` naming `what` when it is NULL.
///
/// # Safety
/// `p` is NULL or points to a live `T` that nobody mutates for `'a`.
pub(crate) unsafe fn arg_ref<'a, T>(p: *const T, what: &str) -> Result<&'a T> {
    // SAFETY: the caller's contract.
    unsafe { p.as_ref() }.ok_or_else(|| null(what))
}

/// `p` as an exclusive reference, or `InvalidArgument` naming `what` when it is NULL.
///
/// # Safety
/// `p` is NULL or points to a live `T` that nothing else uses for `'a`.
pub(crate) unsafe fn arg_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T> {
    // SAFETY: the caller's contract.
    unsafe { p.as_mut() }.ok_or_else(|| null(what))
}

pub(crate) fn null(what: &str) -> Error {
    Error::invalid(format!("{what} is NULL"))
}

/// A required NUL-terminated UTF-8 string.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string that lives for `'a`.
pub(crate) unsafe fn arg_str<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    // SAFETY: the caller's contract.
    unsafe { opt_str(p, what) }?.ok_or_else(|| null(what))
}

/// An optional NUL-terminated UTF-8 string (NULL → `None`).
///
/// # Safety
/// As [`arg_str`].
pub(crate) unsafe fn opt_str<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL and NUL-terminated per the caller's contract.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str().map(Some).map_err(|_| Error::invalid(format!("{what} is not valid UTF-8")))
}

/// `len` bytes at `p`; NULL is allowed only with `len == 0`.
///
/// # Safety
/// `p` is NULL or points to `len` readable bytes that live for `'a`.
pub(crate) unsafe fn arg_bytes<'a>(p: *const u8, len: usize, what: &str) -> Result<&'a [u8]> {
    if p.is_null() {
        return if len == 0 { Ok(&[]) } else { Err(Error::invalid(format!("{what} is NULL but its length is {len}"))) };
    }
    // SAFETY: the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// An integer C passed for an enumeration: the matching value, or `InvalidArgument` listing the
/// valid ones.
pub(crate) fn arg_enum<T: Copy>(value: i32, what: &str, table: &[(i32, &str, T)]) -> Result<T> {
    table.iter().find(|t| t.0 == value).map(|t| t.2).ok_or_else(|| {
        let valid: Vec<String> = table.iter().map(|t| format!("{} ({})", t.1, t.0)).collect();
        Error::invalid(format!("{what} {value} is not one of {}", valid.join(", ")))
    })
}

/// Milliseconds from C as a duration.
pub(crate) fn ms(v: u32) -> Duration {
    Duration::from_millis(u64::from(v))
}

/// An out-pointer: nulled on creation, filled by [`Out::put`].
pub(crate) struct Out<T>(*mut *mut T);

impl<T> Out<T> {
    /// A required out-pointer; `*out` is set to NULL now.
    ///
    /// # Safety
    /// `out` is NULL or valid for writing a pointer.
    pub(crate) unsafe fn new(out: *mut *mut T, what: &str) -> Result<Out<T>> {
        // SAFETY: the caller's contract.
        unsafe { Out::optional(out) }.ok_or_else(|| null(what))
    }

    /// An optional out-pointer (NULL → `None`); `*out` is set to NULL now.
    ///
    /// # Safety
    /// As [`Out::new`].
    pub(crate) unsafe fn optional(out: *mut *mut T) -> Option<Out<T>> {
        if out.is_null() {
            return None;
        }
        // SAFETY: non-NULL and writable per the caller's contract.
        unsafe { *out = std::ptr::null_mut() };
        Some(Out(out))
    }

    /// Hands `value` to C as a heap handle.
    pub(crate) fn put(self, value: T) {
        // SAFETY: checked non-NULL and writable in `optional`.
        unsafe { *self.0 = Box::into_raw(Box::new(value)) };
    }
}

impl Out<c_char> {
    /// Hands a string to C (free it with `hubmsg_string_free`).
    pub(crate) fn put_string(self, s: &str) {
        // SAFETY: checked non-NULL and writable in `optional`.
        unsafe { *self.0 = crate::result::to_cstring(s).into_raw() };
    }
}

/// Writes `value` through an optional plain out-pointer.
///
/// # Safety
/// `out` is NULL or valid for writing a `T`.
pub(crate) unsafe fn put_opt<T>(out: *mut T, value: T) {
    if !out.is_null() {
        // SAFETY: the caller's contract.
        unsafe { out.write(value) };
    }
}

/// Frees a handle made by [`Out::put`]; NULL is a no-op.
///
/// # Safety
/// `p` is NULL or a pointer from [`Out::put`] not freed before.
pub(crate) unsafe fn free_box<T>(p: *mut T) -> Option<Box<T>> {
    // SAFETY: the caller's contract.
    (!p.is_null()).then(|| unsafe { Box::from_raw(p) })
}

/// The body of every plain `_free` export: frees a handle made by [`Out::put`]; NULL is a
/// no-op; a panic in a destructor is caught.
///
/// # Safety
/// As [`free_box`].
pub(crate) unsafe fn free_handle<T>(p: *mut T) {
    crate::result::guard_or((), || {
        // SAFETY: the caller's contract.
        drop(unsafe { free_box(p) });
        Ok(())
    })
}

/// An optional C string field as a pointer (NULL when absent).
pub(crate) fn c_ptr(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// A pull from `inbox` for an export: the item, converted, goes to `out` (`HUBMSG_OK`), or
/// `HUBMSG_EMPTY` on timeout (`out` stays NULL).
pub(crate) fn recv_into<S: hubmsg_bind::Source, U>(
    inbox: &hubmsg_bind::Inbox<S>,
    rt: &hubmsg_bind::Runtime,
    timeout_ms: u32,
    out: Out<U>,
    convert: impl FnOnce(S::Item) -> U,
) -> Result<crate::result::hubmsg_result> {
    Ok(match inbox.recv(rt, ms(timeout_ms))? {
        Some(item) => {
            out.put(convert(item));
            crate::result::HUBMSG_OK
        }
        None => crate::result::HUBMSG_EMPTY,
    })
}
