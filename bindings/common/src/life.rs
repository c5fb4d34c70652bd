//! Whether a binding's client handle is open, and what a handle dropped without `close()` does.
//!
//! The rule every binding follows: the first `close` (explicit, or the drop of a handle that was
//! never closed) does the closing; every call after it fails with a `Closed` error naming the
//! handle. A handle dropped while open closes its client in the background, on the runtime it
//! ran on, and only in the process that runtime belongs to (after `fork()` the parent's runtime
//! has no threads in the child).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};

use hubmsg_core::{Error, Result};

use crate::Spawner;

/// The open/closed state of one client handle.
pub struct Life {
    closed: AtomicBool,
    what: &'static str,
}

impl Life {
    /// An open handle named `what` in errors ("device client").
    pub fn new(what: &'static str) -> Life {
        Life { closed: AtomicBool::new(false), what }
    }

    /// `Closed` (naming the handle) once closed, `Ok` while open.
    pub fn check(&self) -> Result<()> {
        if self.is_closed() {
            return Err(Error::closed(self.what));
        }
        Ok(())
    }

    /// Marks the handle closed; true only the first time (that caller does the closing).
    pub fn close(&self) -> bool {
        !self.closed.swap(true, Ordering::SeqCst)
    }

    /// Whether it was closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// For a handle dropped without `close()`: marks it closed and, if this was the first close
    /// and `rt` belongs to this process, runs `close` on `rt` without waiting for it
    /// (undelivered messages stay in a durable outbox either way).
    pub fn close_in_background<S, F>(&self, rt: &S, close: F)
    where
        S: Spawner + ?Sized,
        F: Future<Output = ()> + Send + 'static,
    {
        if self.close() && rt.owned_here() {
            rt.handle().spawn(close);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_close_does_the_closing_and_later_calls_fail_with_closed() {
        let life = Life::new("device client");
        life.check().unwrap();
        assert!(!life.is_closed());
        assert!(life.close(), "the first close does the closing");
        assert!(!life.close(), "a second close is a no-op");
        let e = life.check().unwrap_err();
        assert_eq!(e.kind(), hubmsg_core::ErrorKind::Closed);
        assert!(e.to_string().contains("device client"), "{e}");
    }

    #[test]
    fn a_dropped_open_handle_closes_in_the_background_only_once() {
        let rt = crate::runtime().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let life = Life::new("service client");
        let tx2 = tx.clone();
        life.close_in_background(&rt, async move { tx.send(1).unwrap() });
        life.close_in_background(&rt, async move { tx2.send(2).unwrap() });
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap(), 1);
        assert!(rx.recv_timeout(std::time::Duration::from_millis(200)).is_err(), "the second drop closed again");
    }
}
