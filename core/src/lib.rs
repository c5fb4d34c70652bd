//! # hubmsg-core
//!
//! Reliable device ↔ cloud messaging in the style of Azure IoT Hub. A tour of the concepts:
//!
//! - [`message::Message`]: owned body + IoT Hub system and application properties.
//! - [`wire`]: the IoT Hub MQTT device contract (topics, property bags, user names).
//! - [`auth`]: connection strings and SAS tokens.
//! - [`retry`]: backoff policies and error classification shared by every client.
//! - [`store`]: the one durable engine — a segmented, CRC-framed, group-committed log, and
//!   event-sourced state with snapshots on top of it.
//! - [`outbox`]: the bounded, durable at-least-once send queue (device D2C, service C2D).
//! - [`transport`]: the MQTT 3.1.1 connection (rumqttc's `mqttbytes::v4` codec over TCP/TLS)
//!   used by both clients and the hub.
//! - [`device::DeviceClient`]: send D2C telemetry, observe delivery and connection status.
//! - [`service::ServiceClient`]: read D2C events by consumer group, manage device identities.
//! - [`hub::Hub`] (feature `hub`): the hub server, embeddable in process.
//!
//! Handles are cheap `Clone`s that talk to one driver task through channels; public types own
//! their data (no borrowed lifetimes); every error carries a stable [`ErrorKind`].

pub mod auth;
pub mod error;
pub mod message;
pub mod retry;
pub mod store;
pub mod wire;

pub use error::{Error, ErrorKind, Result};
pub use message::Message;
pub mod dedupe;
pub mod device;
pub mod outbox;
pub mod transport;

pub use device::{ConnectionStatus, Credential, DeviceClient, DeviceOptions};
pub use outbox::{Outcome, Overflow};
#[cfg(feature = "hub")]
pub mod hub;
pub mod proto;
pub mod service;
