//! `switchboard serve --engine redis://...`: `/readyz` follows the Redis behind the node, and a
//! bad engine configuration stops the binary with exit 1 and a clear message. The Redis tests
//! skip (loudly) where redis-server is not installed, unless SWITCHBOARD_REQUIRE_REDIS=1.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::common::{Node, TempDir, WAIT};
use switchboard_testkit::redis::RedisServer;

/// `GET <path>` with `Connection: close`: (status, body), or why it failed.
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(WAIT))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {raw:?}"))?;
    Ok((status, body.to_owned()))
}

/// Polls `GET /readyz` until it answers `status` with `body`, for at most [`WAIT`].
async fn await_readyz(addr: SocketAddr, status: u16, body: &str, when: &str) {
    let deadline = Instant::now() + WAIT;
    let mut last = Err("not asked yet".to_owned());
    while Instant::now() < deadline {
        last = tokio::task::spawn_blocking(move || get(addr, "/readyz"))
            .await
            .unwrap();
        if last.as_ref().is_ok_and(|(s, b)| *s == status && b == body) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz {when}: wanted {status} {body:?} within {WAIT:?}, last answer {last:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_follows_the_redis_behind_the_node() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let url = redis.url();
    // Returns once /readyz says 200.
    let node =
        tokio::task::spawn_blocking(move || Node::cluster(&url, "readyz-test", "ip-chat", &[]))
            .await
            .unwrap();
    let addr = node.addr;

    await_readyz(addr, 200, "ready", "once Redis answers").await;
    redis.stop().await;
    await_readyz(addr, 503, "engine unavailable", "after Redis stopped").await;
    // Alive all along: only readiness follows the engine.
    let (status, _) = tokio::task::spawn_blocking(move || get(addr, "/healthz"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
    redis.restart().await;
    await_readyz(addr, 200, "ready", "after Redis restarted").await;
}

/// Runs `switchboard serve` with `args` on a free port, expecting it to refuse to start.
fn serve_output(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--protocol", "ip-chat"])
        .args(args)
        .env_remove("SWITCHBOARD_ENGINE")
        .env_remove("SWITCHBOARD_CLUSTER_NAME")
        .env_remove("SWITCHBOARD_DATA_DIR")
        .output()
        .unwrap()
}

/// Exit code 1 and `needles` in stderr.
fn assert_fails_with(output: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    }
}

#[test]
fn an_engine_url_of_an_unknown_kind_exits_1() {
    let output = serve_output(&["--engine", "bogus://x"]);
    assert_fails_with(
        &output,
        &["unsupported --engine URL \"bogus://x\"", "redis://"],
    );
}

#[test]
fn an_invalid_redis_url_or_cluster_name_exits_1() {
    let output = serve_output(&["--engine", "redis://127.0.0.1:notaport"]);
    assert_fails_with(&output, &["invalid engine URL"]);
    let output = serve_output(&[
        "--engine",
        "redis://127.0.0.1:6379",
        "--cluster-name",
        "no spaces",
    ]);
    assert_fails_with(&output, &["invalid cluster name \"no spaces\""]);
}

#[test]
fn engine_and_data_dir_together_exit_1() {
    let dir = TempDir::new("engine-and-data-dir");
    let dir_arg = dir.0.to_string_lossy().into_owned();
    let output = serve_output(&["--engine", "redis://127.0.0.1:6379", "--data-dir", &dir_arg]);
    assert_fails_with(
        &output,
        &["--engine and --data-dir cannot be used together"],
    );
    assert!(!dir.0.exists(), "the data dir was not created");
}
