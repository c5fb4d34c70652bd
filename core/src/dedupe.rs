//! The device's record of C2D message ids it already completed, so a redelivery (after a crash,
//! a lost PUBACK or a hub restart) is completed again without reaching the application twice.
//!
//! Invariants: an id is recorded durably before the PUBACK that completes it is sent; the window
//! keeps the newest `capacity` ids (older ones are forgotten, oldest first).

use std::collections::{HashSet, VecDeque};
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::store::{Durability, Machine, StateLog, StateOptions};

/// How many completed ids a device remembers by default.
pub const DEFAULT_CAPACITY: usize = 4096;

#[derive(Default)]
struct Window {
    order: VecDeque<String>,
    set: HashSet<String>,
    capacity: usize,
}

impl Window {
    fn insert(&mut self, id: String) {
        if self.set.insert(id.clone()) {
            self.order.push_back(id);
            while self.order.len() > self.capacity.max(1) {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

impl Machine for Window {
    fn apply(&mut self, event: &[u8]) -> Result<()> {
        let id = std::str::from_utf8(event).map_err(|_| Error::new(ErrorKind::Storage, "corrupt completed-id record"))?;
        self.insert(id.to_string());
        Ok(())
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&self.order).expect("ids serialize")
    }

    fn restore(snapshot: Option<&[u8]>) -> Result<Self> {
        let mut w = Window { capacity: DEFAULT_CAPACITY, ..Window::default() };
        if let Some(b) = snapshot {
            let ids: Vec<String> =
                serde_json::from_slice(b).map_err(|e| Error::new(ErrorKind::Storage, format!("corrupt completed-id snapshot: {e}")))?;
            for id in ids {
                w.insert(id);
            }
        }
        Ok(w)
    }
}

/// The completed-id window, durable (in a directory) or in memory. Cheap to clone.
#[derive(Clone)]
pub struct Completed(Inner);

#[derive(Clone)]
enum Inner {
    Durable(StateLog<Window>),
    Memory(std::sync::Arc<parking_lot::Mutex<Window>>),
}

impl Completed {
    /// Opens the window in `dir`, or in memory when `dir` is `None`.
    pub fn open(dir: Option<&Path>, durability: Durability) -> Result<Completed> {
        match dir {
            Some(d) => Ok(Completed(Inner::Durable(StateLog::open(d, StateOptions { durability, compact_after_bytes: 256 * 1024 })?))),
            None => Ok(Completed(Inner::Memory(std::sync::Arc::new(parking_lot::Mutex::new(Window {
                capacity: DEFAULT_CAPACITY,
                ..Window::default()
            }))))),
        }
    }

    /// Whether `id` was completed before.
    pub fn contains(&self, id: &str) -> bool {
        match &self.0 {
            Inner::Durable(s) => s.read(|w| w.set.contains(id)),
            Inner::Memory(w) => w.lock().set.contains(id),
        }
    }

    /// Records `id` and waits until it is durable.
    pub async fn record(&self, id: &str) -> Result<()> {
        match &self.0 {
            Inner::Durable(s) => {
                let seq = s.commit(id.as_bytes())?;
                s.wait_durable(seq).await
            }
            Inner::Memory(w) => {
                w.lock().insert(id.to_string());
                Ok(())
            }
        }
    }

    /// Closes the store.
    pub fn close(&self) -> Result<()> {
        match &self.0 {
            Inner::Durable(s) => s.close(),
            Inner::Memory(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_forgets_oldest_beyond_capacity() {
        let mut w = Window { capacity: 3, ..Window::default() };
        for id in ["a", "b", "c", "a", "d"] {
            w.insert(id.to_string());
        }
        assert!(!w.set.contains("a"));
        assert!(w.set.contains("b") && w.set.contains("c") && w.set.contains("d"));
        let r = Window::restore(Some(&w.snapshot())).unwrap();
        assert_eq!(r.order, w.order);
    }
}
