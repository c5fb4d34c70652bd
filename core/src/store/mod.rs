//! The one durable storage engine: a segmented append-only log ([`Log`]) and event-sourced state
//! with snapshot compaction on top of it ([`StateLog`]). Used for the device outbox, the hub's
//! D2C partitions, C2D queues, feedback, consumer checkpoints and the identity registry.
//!
//! On-disk format and recovery rules: `docs/storage.md`.

mod log;
mod state;

pub use log::{Durability, Log, LogOptions, LogStats, Record, SegmentInfo};
pub use state::{Machine, StateLog, StateOptions};
