//! What the Redis engine does when Redis fails under it: stopped and started again with its
//! data, paused (`CLIENT PAUSE`), or its subscriber connections killed. Every case runs nodes
//! on a real `redis-server` (a missing one skips, loudly).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::time::Duration;

use switchboard_core::engine::{Append, EngineError, Read, ReadFrom, Retention};
use switchboard_core::{Engine, Frame, peer_channel};
use switchboard_engine_redis::{RedisConfig, RedisEngine};
use switchboard_testkit::conformance::recv_frames;
use switchboard_testkit::redis::RedisServer;
use tokio::time::{Instant, timeout};

const RETENTION: Retention = Retention::trim(10_000, 1 << 24);

fn node(redis: &RedisServer) -> Engine {
    let mut config = RedisConfig::new(redis.url(), "failures");
    config.heartbeat = Duration::from_millis(100);
    config.stale_after = Duration::from_millis(1000);
    config.command_timeout = Duration::from_millis(500);
    RedisEngine::engine(config).unwrap()
}

/// Waits until `engine.ready()` is `want`, bounded by `within`; returns how long it took.
async fn until_ready(engine: &Engine, want: bool, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if engine.ready().await == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "ready() did not become {want} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn append(engine: &Engine, topic: &str, text: &str) -> Result<u64, EngineError> {
    match engine
        .append(topic, Frame::text(text), Append::publish(RETENTION))
        .await?
    {
        switchboard_core::engine::Appended::Done(position) => Ok(position.offset),
        other => panic!("unexpected {other:?}"),
    }
}

/// Redis stops and starts again with its data: while it is down, operations fail as
/// unavailable (never hang) and the node is not ready; afterwards nodes reconnect by themselves,
/// subscribers receive what was appended after the restart (including entries appended before a
/// node's subscriber connection came back, filled from the log), and nothing acknowledged is
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_is_rejoined_without_losing_acknowledged_entries() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let writer = node(&redis);
    let reader = node(&redis);
    until_ready(&writer, true, Duration::from_secs(5)).await;
    until_ready(&reader, true, Duration::from_secs(5)).await;
    let (peer, mut link) = peer_channel(([127, 0, 0, 1], 9).into(), 1 << 16);
    reader.subscribe("room", &peer).await.unwrap();
    for i in 0..10 {
        append(&writer, "room", &format!("before-{i}"))
            .await
            .unwrap();
    }
    let seen = recv_frames(&mut link, 10).await;
    assert_eq!(seen.last().map(String::as_str), Some("before-9"));

    redis.stop().await;
    until_ready(&writer, false, Duration::from_secs(5)).await;
    let started = Instant::now();
    let refused = timeout(Duration::from_secs(3), append(&writer, "room", "lost"))
        .await
        .expect("an append while Redis is down fails fast instead of hanging");
    assert!(
        matches!(refused, Err(EngineError::Unavailable(_))),
        "{refused:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    redis.restart().await;
    let took = until_ready(&writer, true, Duration::from_secs(10)).await;
    until_ready(&reader, true, Duration::from_secs(10)).await;
    eprintln!("nodes ready again {took:?} after Redis answered");
    for i in 0..10 {
        append(&writer, "room", &format!("after-{i}"))
            .await
            .unwrap();
    }
    let seen = recv_frames(&mut link, 10).await;
    let expected: Vec<String> = (0..10).map(|i| format!("after-{i}")).collect();
    assert_eq!(
        seen, expected,
        "after the restart, in order, without doubles"
    );
    match reader
        .read("room", ReadFrom::Latest(100), 100)
        .await
        .unwrap()
    {
        Read::Entries { entries, .. } => {
            assert_eq!(entries.len(), 20, "every acknowledged entry survived");
            assert_eq!(entries[0].frame.as_str(), "before-0");
        }
        Read::Gone { .. } => panic!("the log is there"),
    }
}

/// The subscriber connections are killed while entries keep coming: each node reconnects and
/// fills the gap from the log, so subscribers see every entry once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_subscriber_connections_lose_nothing() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let writer = node(&redis);
    let reader = node(&redis);
    until_ready(&writer, true, Duration::from_secs(5)).await;
    until_ready(&reader, true, Duration::from_secs(5)).await;
    let (peer, mut link) = peer_channel(([127, 0, 0, 1], 9).into(), 1 << 16);
    reader.subscribe("gaps", &peer).await.unwrap();
    const TOTAL: usize = 300;
    let appender = {
        let writer = writer.clone();
        tokio::spawn(async move {
            let mut done = 0;
            while done < TOTAL {
                if append(&writer, "gaps", &done.to_string()).await.is_ok() {
                    done += 1;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut killed = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        killed += redis.kill_pubsub().await;
    }
    assert!(
        killed >= 3,
        "the subscriber connections were killed ({killed})"
    );
    appender.await.unwrap();
    let seen = recv_frames(&mut link, TOTAL).await;
    let expected: Vec<String> = (0..TOTAL).map(|i| i.to_string()).collect();
    assert_eq!(seen, expected);
    let more = timeout(Duration::from_millis(300), link.recv()).await;
    assert!(more.is_err(), "a frame arrived twice: {more:?}");
}

/// `CLIENT PAUSE`: operations wait at most the command timeout and fail as unavailable, then
/// work again once the pause ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_times_operations_out_then_serves_again() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let engine = node(&redis);
    until_ready(&engine, true, Duration::from_secs(5)).await;
    append(&engine, "paused", "first").await.unwrap();
    redis.pause(Duration::from_secs(2)).await;
    let started = Instant::now();
    let during = append(&engine, "paused", "during").await;
    assert!(
        matches!(during, Err(EngineError::Unavailable(_))),
        "{during:?}"
    );
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert!(!engine.ready().await);
    until_ready(&engine, true, Duration::from_secs(10)).await;
    // The timed-out append may or may not have been applied once the pause ended; what was
    // acknowledged is there, and new appends work.
    append(&engine, "paused", "after").await.unwrap();
    match engine
        .read("paused", ReadFrom::Latest(10), 10)
        .await
        .unwrap()
    {
        Read::Entries { entries, .. } => {
            let texts: Vec<&str> = entries.iter().map(|e| e.frame.as_str()).collect();
            assert_eq!(texts.first(), Some(&"first"));
            assert_eq!(texts.last(), Some(&"after"));
        }
        Read::Gone { .. } => panic!("the log is there"),
    }
}

/// A connection that leaves presence while Redis is down is not left counted present for good:
/// the leave is done once Redis answers, and the member is announced gone then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_leave_during_an_outage_lands_when_redis_is_back() {
    use switchboard_core::ConnId;
    use switchboard_core::engine::EngineEvent;
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let engine = node(&redis);
    until_ready(&engine, true, Duration::from_secs(5)).await;
    let alice = engine.conn_ref(ConnId::next());
    let bob = engine.conn_ref(ConnId::next());
    assert!(
        engine
            .presence_join("online", "alice", alice)
            .await
            .unwrap()
    );
    assert!(engine.presence_join("online", "bob", bob).await.unwrap());
    redis.stop().await;
    let left = engine.presence_leave("online", "alice", alice).await;
    assert!(matches!(left, Err(EngineError::Unavailable(_))), "{left:?}");
    redis.restart().await;
    let event = timeout(Duration::from_secs(10), engine.next_event())
        .await
        .expect("the deferred leave is announced");
    assert_eq!(
        event,
        Some(EngineEvent::MemberExpired {
            room: "online".into(),
            member: "alice".into()
        })
    );
    assert_eq!(
        engine.presence_members("online").await.unwrap(),
        vec!["bob"]
    );
}

/// Prefix scans see every key written while the key-index janitor runs. The race this guards:
/// an index entry whose key does not exist (yet) is the janitor's to drop; when the index write
/// and the store were two commands, a janitor pass that saw the key absent could drop the entry
/// after a write's index command (a no-op, the entry being there) and before its store, and the
/// key stayed out of every scan after. Now a write indexes its key in the script that stores
/// it, and the janitor re-checks each key in the script that drops its entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scans_see_every_key_written_while_the_janitor_runs() {
    const KEYS: usize = 1_500;
    const GHOSTS: usize = 300;
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let mut config = RedisConfig::new(redis.url(), "janitor");
    // The janitor checks a page of the index on every heartbeat: keep it sweeping.
    config.heartbeat = Duration::from_millis(5);
    let engine = RedisEngine::engine(config).unwrap();
    let key = |i: usize| format!("scan:k{i:05}");
    // Index entries ahead of their keys (the state a write leaves between its two commands,
    // and the janitor's candidates), and entries of keys that never come (its real work).
    let mut seed = vec!["ZADD".to_owned(), "janitor:kv-index".to_owned()];
    for i in 0..KEYS {
        seed.extend(["0".to_owned(), key(i)]);
    }
    for i in 0..GHOSTS {
        seed.extend(["0".to_owned(), format!("scan:ghost{i:05}")]);
    }
    let seed: Vec<&str> = seed.iter().map(String::as_str).collect();
    assert_eq!(redis.cli(&seed).await, (KEYS + GHOSTS).to_string());

    let mut writers = tokio::task::JoinSet::new();
    for lane in 0..16 {
        let engine = engine.clone();
        writers.spawn(async move {
            for i in (lane..KEYS).step_by(16) {
                engine
                    .put(
                        &key(i),
                        bytes::Bytes::from_static(b"v"),
                        switchboard_core::engine::Expect::Any,
                        None,
                    )
                    .await
                    .unwrap();
            }
        });
    }
    timeout(Duration::from_secs(30), async {
        while let Some(done) = writers.join_next().await {
            done.unwrap();
        }
    })
    .await
    .expect("the writes finished within 30 s");

    // The janitor drops the ghosts' entries (bounded wait)...
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = redis
            .cli(&[
                "ZLEXCOUNT",
                "janitor:kv-index",
                "[scan:ghost",
                "[scan:ghost\u{ff}",
            ])
            .await;
        if left == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} ghost entries left after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ...and never the entry of a key that was written.
    let scanned = engine.scan("scan:", None, KEYS + GHOSTS).await.unwrap();
    let found: std::collections::BTreeSet<String> = scanned.into_iter().map(|(k, _)| k).collect();
    let missing: Vec<String> = (0..KEYS).map(key).filter(|k| !found.contains(k)).collect();
    assert!(
        missing.is_empty(),
        "{} of {KEYS} written keys missing from the scan, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
}
