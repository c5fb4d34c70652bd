//! The error-kind table as each binding names it, generated from
//! [`hubmsg_core::ErrorKind::ALL`], so that a kind added to core shows up in every language.
//!
//! - C: `HUBMSG_<CODE>` result codes (the numbers live in `ffi/src/result.rs`, append-only);
//! - Python: one exception class per kind, `<CamelCode>Error` (`QUEUE_FULL` → `QueueFullError`),
//!   under `HubmsgError`; the timeout class is `HubmsgTimeoutError` (it also derives from the
//!   built-in `TimeoutError`, whose name it must not shadow);
//! - Node: `err.code` = `HUBMSG_<CODE>`.

use hubmsg_core::ErrorKind;

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindNames {
    /// The core kind.
    pub kind: ErrorKind,
    /// Its stable code (`QUEUE_FULL`).
    pub code: &'static str,
    /// The C / Node name (`HUBMSG_QUEUE_FULL`).
    pub c_name: String,
    /// The Python exception class (`QueueFullError`).
    pub python_class: String,
    /// A built-in Python exception the class also derives from, when one fits.
    pub python_builtin_base: Option<&'static str>,
}

/// The C result-code name of a kind, which is also its Node `err.code` (`HUBMSG_QUEUE_FULL`).
pub fn c_name(kind: ErrorKind) -> String {
    format!("HUBMSG_{}", kind.code())
}

/// The Python class name of a kind (see the module doc).
pub fn python_class_name(kind: ErrorKind) -> String {
    if kind == ErrorKind::Timeout {
        return "HubmsgTimeoutError".into();
    }
    let mut name = String::new();
    for word in kind.code().split('_') {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            name.push(first.to_ascii_uppercase());
            name.extend(chars.map(|c| c.to_ascii_lowercase()));
        }
    }
    name.push_str("Error");
    name
}

/// The built-in Python exception a kind's class also derives from: `TimeoutError` for
/// timeouts, `ValueError` for invalid arguments; none for the others.
pub fn python_builtin_base(kind: ErrorKind) -> Option<&'static str> {
    match kind {
        ErrorKind::Timeout => Some("TimeoutError"),
        ErrorKind::InvalidArgument => Some("ValueError"),
        _ => None,
    }
}

/// Every kind with its names, in [`ErrorKind::ALL`] order.
pub fn table() -> Vec<KindNames> {
    ErrorKind::ALL
        .into_iter()
        .map(|kind| KindNames {
            kind,
            code: kind.code(),
            c_name: c_name(kind),
            python_class: python_class_name(kind),
            python_builtin_base: python_builtin_base(kind),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_unique_python_class_and_c_name() {
        let t = table();
        assert_eq!(t.len(), ErrorKind::ALL.len());
        for (i, a) in t.iter().enumerate() {
            assert!(a.python_class.ends_with("Error") && a.python_class.chars().all(|c| c.is_ascii_alphanumeric()), "{a:?}");
            for b in &t[i + 1..] {
                assert_ne!(a.python_class, b.python_class);
                assert_ne!(a.c_name, b.c_name);
            }
        }
        assert_eq!(python_class_name(ErrorKind::QueueFull), "QueueFullError");
        assert_eq!(python_class_name(ErrorKind::MessageTooLarge), "MessageTooLargeError");
        assert_eq!(python_class_name(ErrorKind::Timeout), "HubmsgTimeoutError");
    }
}
