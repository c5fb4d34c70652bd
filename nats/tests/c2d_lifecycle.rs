//! The C2D lifecycle suite of `core/tests/suite/c2d_lifecycle.rs`, unchanged, on the JetStream
//! backend: every test gets its own 3-node `nats-server` cluster on free loopback ports, and its
//! hubs keep all durable state there.

#[path = "../../core/tests/common.rs"]
mod common;
#[path = "../../core/tests/suite/c2d_lifecycle.rs"]
mod suite;

use std::sync::Arc;
use std::time::Duration;

use hubmsg_core::hub::HubConfig;
use hubmsg_nats::cluster::Cluster;
use hubmsg_nats::NatsConnector;

/// A 3-node cluster; hubs connect to all three nodes.
struct Nats {
    cluster: Cluster,
}

impl suite::Fixture for Nats {
    fn config(&self, dir: &std::path::Path) -> HubConfig {
        let mut cfg = HubConfig::new(dir);
        // Each partition stream reserves its retention in the cluster's 1 GB test store.
        cfg.retention_bytes = 64 << 20;
        let mut c = NatsConnector::new(self.cluster.urls());
        c.config.lease_ttl = Duration::from_secs(2);
        cfg.backend = Some(Arc::new(c));
        cfg
    }
}

async fn start() -> Nats {
    Nats { cluster: Cluster::start(3, Duration::from_secs(20)).await.expect("start a 3-node cluster (nats/install-server.sh)") }
}

async fn stop(n: Nats) {
    n.cluster.stop().await;
}

c2d_lifecycle_suite!(start(), stop);
