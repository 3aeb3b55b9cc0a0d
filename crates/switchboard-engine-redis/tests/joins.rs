//! Many subscribers joining one busy topic at once on a Redis node: every one gets its whole
//! replay and then every later entry once, and the node reads the log a few times for all of
//! them rather than once each (a thousand replays at once used to time out in Redis).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::time::Duration;

use switchboard_core::engine::{Append, Read, ReadFrom, Retention};
use switchboard_core::{Engine, Frame, peer_channel};
use switchboard_engine_redis::{RedisConfig, RedisEngine};
use switchboard_testkit::conformance::recv_frames;
use switchboard_testkit::redis::RedisServer;

const HISTORY: usize = 500;
const JOINERS: usize = 1000;

/// How many scripts Redis has run so far (every log read is one).
async fn scripts_run(redis: &RedisServer) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]).await;
    stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_joins_at_once_share_their_reads() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let engine: Engine = RedisEngine::engine(RedisConfig::new(redis.url(), "joins")).unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !engine.ready().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    let retention = Retention::trim(1000, 1 << 24);
    for i in 0..HISTORY {
        engine
            .append(
                "busy",
                Frame::text(format!("h{i}")),
                Append::publish(retention),
            )
            .await
            .unwrap();
    }
    let before = scripts_run(&redis).await;
    let joins: Vec<_> = (0..JOINERS)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let (peer, link) = peer_channel(([127, 0, 0, 1], 9).into(), 1 << 20);
                let joining = engine
                    .join("busy", &peer, ReadFrom::Latest(HISTORY), HISTORY)
                    .await
                    .unwrap();
                let replay: Vec<Frame> = match joining.read() {
                    Read::Entries { entries, .. } => {
                        entries.iter().map(|e| e.frame.clone()).collect()
                    }
                    Read::Gone { .. } => panic!("the log is there"),
                };
                assert_eq!(replay.len(), HISTORY);
                joining.go_live(replay);
                (peer, link)
            })
        })
        .collect();
    let mut links = Vec::new();
    for join in joins {
        links.push(join.await.unwrap());
    }
    let reads = scripts_run(&redis).await - before;
    assert!(
        reads < 100,
        "{JOINERS} joins made {reads} reads; they should share a few"
    );
    engine
        .append("busy", Frame::text("live"), Append::publish(retention))
        .await
        .unwrap();
    for (_, link) in &mut links {
        let frames = recv_frames(link, HISTORY + 1).await;
        assert_eq!(frames[0], "h0");
        assert_eq!(frames[HISTORY], "live");
    }
    eprintln!("{JOINERS} joins, {reads} log reads");
}
