//! `RedisServer` drives a real `redis-server`: commands, restart with the data kept, stop,
//! kill, pause. Skipped (loudly) where Redis is not installed, unless SWITCHBOARD_REQUIRE_REDIS=1.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::time::{Duration, Instant};

use switchboard_testkit::TIMEOUT;
use switchboard_testkit::redis::{RedisServer, Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

#[tokio::test]
async fn commands_round_trip_and_restart_keeps_the_data() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
    assert_eq!(redis.cli(&["PING"]).await, "PONG");
    assert_eq!(redis.cli(&["SET", "greeting", "hello world"]).await, "OK");
    assert_eq!(redis.cli(&["GET", "greeting"]).await, "hello world");
    assert_eq!(redis.cli(&["GET", "missing"]).await, "(nil)");
    assert_eq!(redis.cli(&["RPUSH", "list", "a", "b"]).await, "2");
    assert_eq!(redis.cli(&["LRANGE", "list", "0", "-1"]).await, "a\nb");
    assert!(
        redis
            .cli(&["NOSUCHCOMMAND"])
            .await
            .starts_with("(error) ERR")
    );

    redis.restart().await;
    assert_eq!(redis.port(), port, "a restart keeps the port");
    assert_eq!(redis.cli(&["GET", "greeting"]).await, "hello world");

    // SIGKILL too: every write was fsynced before it was acknowledged.
    assert_eq!(redis.cli(&["SET", "after", "restart"]).await, "OK");
    redis.kill().await;
    redis.restart().await;
    assert_eq!(redis.cli(&["GET", "after"]).await, "restart");
    assert_eq!(redis.cli(&["GET", "greeting"]).await, "hello world");
}

#[tokio::test]
async fn a_stopped_server_refuses_connections() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    redis.stop().await;
    let error = redis.command(&["PING"]).await.unwrap_err();
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{error}"
    );
    redis.stop().await; // stopping twice is harmless
}

#[tokio::test]
async fn pause_holds_commands_back() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let pause = Duration::from_millis(500);
    let started = Instant::now();
    redis.pause(pause).await;
    assert_eq!(redis.cli(&["SET", "k", "v"]).await, "OK");
    let waited = started.elapsed();
    // Redis's pause timer has millisecond resolution: allow a little slack below.
    assert!(
        waited >= pause - Duration::from_millis(50),
        "the write waited only {waited:?}"
    );
    assert_eq!(redis.cli(&["GET", "k"]).await, "v");
}

#[tokio::test]
async fn kill_pubsub_drops_subscribers() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    assert_eq!(redis.kill_pubsub().await, 0);
    let mut subscriber = TcpStream::connect(("127.0.0.1", redis.port()))
        .await
        .unwrap();
    subscriber
        .write_all(b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nch\r\n")
        .await
        .unwrap();
    let mut buf = [0_u8; 256];
    let n = timeout(TIMEOUT, subscriber.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        buf[..n].starts_with(b"*3\r\n$9\r\nsubscribe"),
        "{:?}",
        &buf[..n]
    );
    assert_eq!(redis.kill_pubsub().await, 1);
    let n = timeout(TIMEOUT, subscriber.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "the subscriber's connection is closed");
    assert!(matches!(
        redis.command(&["CLIENT", "ID"]).await.unwrap(),
        Reply::Integer(_)
    ));
}

#[tokio::test]
async fn require_redis_macro_yields_a_server() {
    let redis = switchboard_testkit::require_redis!();
    assert_eq!(redis.cli(&["PING"]).await, "PONG");
}

#[tokio::test]
async fn servers_get_their_own_ports_and_data() {
    let (Some(a), Some(b)) = (RedisServer::start().await, RedisServer::start().await) else {
        return;
    };
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());
    a.cli(&["SET", "only", "a"]).await;
    assert_eq!(b.cli(&["GET", "only"]).await, "(nil)");
    let dir = a.data_dir().to_owned();
    drop(a);
    assert!(!dir.exists(), "the data dir is removed on drop");
}
