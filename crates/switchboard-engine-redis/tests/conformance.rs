//! The Redis engine passes the engine-conformance suite, with several nodes on one real
//! `redis-server` (each case its own server; a missing `redis-server` skips, loudly).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use switchboard_core::Engine;
use switchboard_core::engine::NodeId;
use switchboard_engine_redis::{Killer, RedisConfig, RedisEngine};
use switchboard_testkit::conformance::EngineHarness;
use switchboard_testkit::redis::RedisServer;

/// Nodes of one cluster on one Redis, with short heartbeats so a lost node expires fast.
struct Redis {
    server: RedisServer,
    killers: Mutex<HashMap<NodeId, Killer>>,
}

impl Redis {
    async fn start() -> Option<Self> {
        Some(Self {
            server: RedisServer::start().await?,
            killers: Mutex::new(HashMap::new()),
        })
    }
}

impl EngineHarness for Redis {
    async fn node(&self) -> Engine {
        let mut config = RedisConfig::new(self.server.url(), "conformance");
        config.heartbeat = Duration::from_millis(100);
        config.stale_after = Duration::from_millis(1000);
        let (engine, hub) = RedisEngine::start(config).unwrap();
        self.killers
            .lock()
            .unwrap()
            .insert(hub.node(), engine.killer());
        let engine = Engine::new(engine, hub);
        // A node is usable once its subscriber connection is up.
        tokio::time::timeout(Duration::from_secs(5), async {
            while !engine.ready().await {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the node became ready");
        engine
    }

    async fn kill(&self, node: NodeId) {
        if let Some(killer) = self.killers.lock().unwrap().get(&node) {
            killer.kill();
        }
    }

    fn expiry_bound(&self) -> Duration {
        // Stale after 1 s, and the reaper waits a stale period of its own health first.
        Duration::from_secs(5)
    }
}

switchboard_testkit::engine_conformance!(match Redis::start().await {
    Some(harness) => harness,
    None => return,
});
