//! The in-memory engine passes the engine-conformance suite, as a cluster of in-process nodes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use switchboard_core::Engine;
use switchboard_core::engine::{MemoryCluster, MemoryLimits, NodeId};
use switchboard_testkit::conformance::EngineHarness;

/// Nodes of one [`MemoryCluster`].
struct Memory(MemoryCluster);

impl EngineHarness for Memory {
    async fn node(&self) -> Engine {
        self.0.node()
    }

    async fn kill(&self, node: NodeId) {
        self.0.kill(node);
    }
}

switchboard_testkit::engine_conformance!(Memory(MemoryCluster::new(MemoryLimits::default())));
