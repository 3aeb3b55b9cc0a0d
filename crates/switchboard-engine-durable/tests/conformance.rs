//! The durable engine passes the engine-conformance suite as a single node over a fresh data
//! directory per case. It is one node, so the harness says so (`multi_node` is false): the
//! suite then runs its cross-node cases with both "nodes" being the one engine, and skips the
//! one case that needs a node to die while others live (presence expiry of a lost node).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use common::TempDir;
use switchboard_core::Engine;
use switchboard_core::engine::NodeId;
use switchboard_engine_durable::{DurableEngine, DurableLimits};
use switchboard_testkit::conformance::EngineHarness;

/// One durable node over its own temporary data directory (the engine is declared first, so
/// it is closed before the directory is removed).
struct Durable {
    engine: Engine,
    _dir: TempDir,
}

impl Durable {
    fn start() -> Self {
        let dir = TempDir::new("conformance");
        let engine = DurableEngine::engine(dir.path(), DurableLimits::default()).unwrap();
        Self { engine, _dir: dir }
    }
}

impl EngineHarness for Durable {
    async fn node(&self) -> Engine {
        self.engine.clone()
    }

    async fn kill(&self, _node: NodeId) {
        // Never called for a single-node harness: the only case that kills a node is skipped.
    }

    fn multi_node(&self) -> bool {
        false
    }
}

switchboard_testkit::engine_conformance!(Durable::start());
