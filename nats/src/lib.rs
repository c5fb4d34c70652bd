//! # hubmsg-nats
//!
//! The NATS JetStream storage backend of the hubmsg hub: hub nodes become stateless front ends
//! over a replicated JetStream cluster (`docs/scale-out.md` has the mapping, the semantic gaps and
//! how each is closed).
//!
//! - [`backend`]: the backend interface (defined in core, `hubmsg_core::hub::backend`, and
//!   re-exported here) — every operation the hub needs from durable state;
//! - [`NatsBackend`]: its JetStream implementation, and [`NatsConnector`], which makes one for
//!   `HubConfig::backend` (`hubmsg hub --backend nats://…`);
//! - [`names`]: the pure part of the mapping (name encoding, version check, assignment, the
//!   per-message C2D decisions), unit-tested without a server;
//! - [`cluster`]: a local cluster of real `nats-server` processes for tests and demos.
//!
//! This crate needs Rust 1.89 (async-nats 0.51) and is not part of the firmware build.

pub use hubmsg_core::hub::backend;
pub mod cluster;
mod js;
pub mod names;

pub use js::{NatsBackend, NatsConfig, NatsConnector};
