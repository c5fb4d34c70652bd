//! The C2D lifecycle suite (`suite/c2d_lifecycle.rs`) on the embedded backend; the same suite
//! runs on JetStream in `nats/tests/c2d_lifecycle.rs`.

mod common;
#[path = "suite/c2d_lifecycle.rs"]
mod suite;

use hubmsg_core::hub::HubConfig;

/// The embedded stores in the hub's data directory.
struct Embedded;

impl suite::Fixture for Embedded {
    fn config(&self, dir: &std::path::Path) -> HubConfig {
        HubConfig::new(dir)
    }
}

async fn stop(_: Embedded) {}

c2d_lifecycle_suite!(async { Embedded }, stop);
