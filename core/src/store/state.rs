//! Event-sourced state on a [`Log`], compacted by snapshot.
//!
//! Invariants: the in-memory state always equals snapshot + every event after it, applied in log
//! order; a snapshot is written atomically (temp file, fsync, rename, fsync dir) before any log
//! segment it covers is deleted.

use std::path::Path;

use crate::error::Result;
use crate::store::Durability;

/// A deterministic state machine whose events are opaque bytes.
pub trait Machine: Send + 'static {
    /// Applies one event. Must be deterministic. An error here at replay is a corrupt store.
    fn apply(&mut self, event: &[u8]) -> Result<()>;
    /// Serializes the whole state.
    fn snapshot(&self) -> Vec<u8>;
    /// Rebuilds the state from a snapshot (`None` = empty state).
    fn restore(snapshot: Option<&[u8]>) -> Result<Self>
    where
        Self: Sized;
}

/// Options for [`StateLog::open`].
#[derive(Debug, Clone)]
pub struct StateOptions {
    /// Durability of event appends. Default [`Durability::Always`].
    pub durability: Durability,
    /// Take a snapshot once this many event bytes accumulated since the last one. Default 4 MiB.
    pub compact_after_bytes: u64,
}

impl Default for StateOptions {
    fn default() -> Self {
        todo!()
    }
}

/// Event-sourced state. Cheap to clone (shared).
pub struct StateLog<M: Machine> {
    _m: std::marker::PhantomData<M>,
}

impl<M: Machine> Clone for StateLog<M> {
    fn clone(&self) -> Self {
        todo!()
    }
}

impl<M: Machine> StateLog<M> {
    /// Opens `dir` (snapshot + event log), replaying events after the snapshot.
    pub fn open(dir: &Path, opts: StateOptions) -> Result<StateLog<M>> {
        todo!()
    }

    /// Runs `f` on the current state under the lock.
    pub fn read<R>(&self, f: impl FnOnce(&M) -> R) -> R {
        todo!()
    }

    /// Atomically: lets `decide` inspect the state and produce an event (or an error, in which
    /// case nothing happens), appends the event, applies it. Returns `decide`'s extra output and
    /// the event's sequence number; durability is awaited with [`StateLog::wait_durable`].
    pub fn commit_with<R>(&self, decide: impl FnOnce(&M) -> Result<(Vec<u8>, R)>) -> Result<(R, u64)> {
        todo!()
    }

    /// Appends and applies one event (no inspection).
    pub fn commit(&self, event: &[u8]) -> Result<u64> {
        todo!()
    }

    /// Waits until the event with this sequence number is durable.
    pub async fn wait_durable(&self, seq: u64) -> Result<()> {
        todo!()
    }

    /// Blocking form of [`StateLog::wait_durable`].
    pub fn wait_durable_blocking(&self, seq: u64) -> Result<()> {
        todo!()
    }

    /// Writes a snapshot now and deletes the log segments it covers.
    pub fn compact(&self) -> Result<()> {
        todo!()
    }

    /// Flushes and closes the underlying log.
    pub fn close(&self) -> Result<()> {
        todo!()
    }
}
