//! Competing feedback readers on two hub nodes over one 3-node JetStream cluster: the waiting
//! client is connected to node a, the device and the feedback reader to node b. The outcome of a
//! waited-for message is settled on node b, published on `hubmsg.outcomes`, and notified to the
//! waiter by node a; the reader's records stay in the shared feedback stream for it. The same
//! body as `core/tests/feedback_readers.rs` (`core/tests/suite/outcomes.rs`).

#[path = "../../core/tests/common.rs"]
mod common;
#[path = "../../core/tests/suite/outcomes.rs"]
mod suite;

use std::sync::Arc;
use std::time::Duration;

use hubmsg_core::hub::{Hub, HubConfig};
use hubmsg_nats::cluster::Cluster;
use hubmsg_nats::NatsConnector;

const T: Duration = Duration::from_secs(20);

async fn node(c: &Cluster, dir: &std::path::Path) -> Hub {
    let mut cfg = HubConfig::new(dir);
    cfg.retention_bytes = 64 << 20;
    cfg.feedback_interval = Duration::from_millis(20);
    let mut n = NatsConnector::new(c.urls());
    n.config.lease_ttl = Duration::from_secs(2);
    cfg.backend = Some(Arc::new(n));
    Hub::start(cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_on_one_node_never_takes_feedback_read_on_another() {
    let c = Cluster::start(3, T).await.expect("start a 3-node cluster (nats/install-server.sh)");
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node(&c, da.path()).await;
    let b = node(&c, db.path()).await;
    suite::readers_keep_their_feedback_and_waiters_get_their_outcomes(&b, &a, &b).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    c.stop().await;
}
