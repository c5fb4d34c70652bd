//! Shared helpers for the integration tests: an in-process hub on 127.0.0.1:0 in a temp dir.
#![allow(dead_code)]

use std::time::Duration;

use hubmsg_core::hub::{Hub, HubConfig};
use hubmsg_core::outbox::OutboxOptions;
use hubmsg_core::retry::RetryPolicy;
use hubmsg_core::service::{ServiceClient, ServiceOptions};
use hubmsg_core::{DeviceClient, DeviceOptions};

/// A hub and the directory it lives in (removed on drop).
pub struct TestHub {
    /// The hub.
    pub hub: Hub,
    /// Its data directory.
    pub dir: tempfile::TempDir,
}

/// Starts a hub on 127.0.0.1:0 in a new temporary directory.
pub async fn start_hub() -> TestHub {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(HubConfig::new(dir.path())).await.unwrap();
    TestHub { hub, dir }
}

/// Fast retry for tests: 50 ms → 500 ms.
pub fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(500),
        jitter: Duration::from_millis(20),
        healthy_after: Duration::from_millis(200),
        ..RetryPolicy::default()
    }
}

/// Registers `id` if needed and connects a device client with fast retries.
pub async fn device(hub: &Hub, id: &str) -> DeviceClient {
    device_with(hub, id, |_| ()).await
}

/// [`device`] with its options changed by `adjust` before it connects.
pub async fn device_with(hub: &Hub, id: &str, adjust: impl FnOnce(&mut DeviceOptions)) -> DeviceClient {
    if hub.registry().device(id).await.unwrap().is_none() {
        hub.create_device(id).await.unwrap();
    }
    let mut opts = DeviceOptions::from_connection_string(&hub.device_connection_string(id).await.unwrap()).unwrap();
    opts.retry = fast_retry();
    // These tests are about the protocol, not the disk: an in-memory outbox, asked for
    // explicitly (the durable default is tested in default_outbox.rs and the store tests).
    opts.outbox = OutboxOptions::in_memory();
    adjust(&mut opts);
    DeviceClient::connect(opts).await.unwrap()
}

/// Connects an iothubowner service client with fast retries.
pub async fn service(hub: &Hub) -> ServiceClient {
    service_with(hub, |_| ()).await
}

/// [`service`] with its options changed by `adjust` before it connects.
pub async fn service_with(hub: &Hub, adjust: impl FnOnce(&mut ServiceOptions)) -> ServiceClient {
    let mut opts = ServiceOptions::from_connection_string(&hub.service_connection_string()).unwrap();
    opts.retry = fast_retry();
    adjust(&mut opts);
    ServiceClient::connect(opts).await.unwrap()
}

/// Waits for the async `cond` up to `limit`, polling every 10 ms. Returns whether it became true.
pub async fn eventually_async<F: std::future::Future<Output = bool>>(limit: Duration, mut cond: impl FnMut() -> F) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond().await
}

/// Waits for `cond` up to `limit`, polling every 10 ms. Returns whether it became true.
pub async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}
