//! Serving ip-chat through the shared runtime: origin check, frame limit, slow consumers,
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]
//! connection limit, keepalive and graceful shutdown, over real sockets.

use std::time::Duration;

use switchboard_core::Keepalive;
use switchboard_ip_chat::{Config, IpChat};
use switchboard_server::ServerConfig;
use switchboard_testkit::{Client, ConnectOptions, TIMEOUT, TestServer, json};
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

fn unlimited() -> Config {
    Config {
        rate_limit: 0,
        ..Config::default()
    }
}

#[tokio::test]
async fn upgrades_from_unlisted_origins_are_refused_with_403() {
    let config = ServerConfig {
        allowed_origins: Some(vec!["http://good.example".into()]),
        ..ServerConfig::default()
    };
    let server = TestServer::start(IpChat::new(Config::default()), config).await;
    let url = server.ws_url("/ws");

    let evil = ConnectOptions {
        origin: Some("http://evil.example".into()),
        ..ConnectOptions::default()
    };
    assert_eq!(Client::refused_status(&url, evil).await, 403);

    let good = ConnectOptions {
        origin: Some("http://good.example".into()),
        ..ConnectOptions::default()
    };
    let mut client = Client::connect_with(&url, good)
        .await
        .expect("listed origin is accepted");
    client
        .send_json(&json!({"type": "send_message", "data": {"text": "hi"}}))
        .await;
    client.recv_type("message").await;

    // Non-browser clients send no Origin at all and are accepted.
    Client::connect(&url).await;
}

#[tokio::test]
async fn an_oversized_frame_closes_that_connection_with_1009() {
    let config = ServerConfig {
        max_frame_bytes: Some(1024),
        ..ServerConfig::default()
    };
    let server = TestServer::start(IpChat::new(Config::default()), config).await;
    let mut bystander = server.connect("/ws").await;
    let mut client = server.connect("/ws").await;

    // Exactly at the limit is fine (and answered with the format error: it is not valid JSON).
    client.send_text(&"x".repeat(1024)).await;
    assert_eq!(
        client.recv_type("error").await["data"]["error"],
        "Invalid message format"
    );

    client.send_text(&"x".repeat(1025)).await;
    let close = client.expect_close().await;
    assert_eq!(close.code, CloseCode::Size);
    assert_eq!(server.handle().stats().oversized_total, 1);

    bystander
        .send_json(&json!({"type": "send_message", "data": {"text": "still serving"}}))
        .await;
    assert_eq!(
        bystander.recv_type("message").await["data"]["text"],
        "still serving"
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_as_a_slow_consumer_and_nobody_else_waits() {
    let config = ServerConfig {
        outbound_queue: 16,
        close_timeout: TIMEOUT * 2,
        ..ServerConfig::default()
    };
    let server = TestServer::start(IpChat::new(unlimited()), config).await;
    let url = server.ws_url("/ws");
    let small = ConnectOptions {
        recv_buffer: Some(4096),
        ..ConnectOptions::default()
    };
    let mut slow = Client::connect_with(&url, small)
        .await
        .expect("slow client connects");
    let mut fast = server.connect("/ws").await;

    let text = "y".repeat(500);
    let started = Instant::now();
    let mut sent = 0usize;
    while server.handle().stats().slow_consumers_total == 0 {
        assert!(sent < 20_000, "the slow client was never disconnected");
        assert!(started.elapsed() < TIMEOUT * 4, "flooding took too long");
        fast.send_json(&json!({"type": "send_message", "data": {"text": text}}))
            .await;
        fast.recv_type("message").await;
        sent += 1;
    }
    // The fast client kept receiving every message of its own while the slow one was stuck.
    fast.send_json(&json!({"type": "send_message", "data": {"text": "after"}}))
        .await;
    assert_eq!(fast.recv_type("message").await["data"]["text"], "after");

    // Once the slow client reads again it finds the close frame behind what was already sent.
    let close = slow.expect_close().await;
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(close.reason.as_str(), "slow consumer");
}

#[tokio::test]
async fn past_max_connections_upgrades_get_503() {
    let config = ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    };
    let server = TestServer::start(IpChat::new(Config::default()), config).await;
    let url = server.ws_url("/ws");
    let first = Client::connect(&url).await;
    let _second = Client::connect(&url).await;
    assert_eq!(
        Client::refused_status(&url, ConnectOptions::default()).await,
        503
    );

    first.close().await;
    let deadline = Instant::now() + TIMEOUT;
    while server.handle().connections() >= 2 {
        assert!(
            Instant::now() < deadline,
            "the closed connection was never released"
        );
        tokio::task::yield_now().await;
        sleep(Duration::from_millis(10)).await;
    }
    Client::connect(&url).await;
}

#[tokio::test]
async fn a_silent_peer_is_dropped_after_the_idle_timeout() {
    let keepalive = Keepalive {
        ping_interval: None,
        idle_timeout: Duration::from_millis(300),
    };
    let config = ServerConfig {
        keepalive,
        ..ServerConfig::default()
    };
    let server = TestServer::start(IpChat::new(Config::default()), config).await;
    let mut client = server.connect("/ws").await;
    let close = client.expect_close().await;
    assert_eq!(close.code, CloseCode::Away);
    assert_eq!(close.reason.as_str(), "idle timeout");
}

#[tokio::test]
async fn pings_keep_a_responsive_peer_alive() {
    let keepalive = Keepalive {
        ping_interval: Some(Duration::from_millis(50)),
        idle_timeout: Duration::from_millis(300),
    };
    let config = ServerConfig {
        keepalive,
        ..ServerConfig::default()
    };
    let server = TestServer::start(IpChat::new(Config::default()), config).await;
    let mut client = server.connect("/ws").await;
    // Reading answers the server's pings; a second of that outlives the idle timeout threefold.
    client.expect_silence(Duration::from_secs(1)).await;
    assert_eq!(server.handle().stats().idle_timeouts_total, 0);
}

#[tokio::test]
async fn shutdown_closes_every_socket_with_1001_and_returns() {
    let server = TestServer::start(IpChat::new(Config::default()), ServerConfig::default()).await;
    let mut alice = server.connect("/ws").await;
    let mut bob = server.connect("/ws").await;
    let addr = server.addr();

    let stopping = tokio::spawn(server.shutdown());
    for client in [&mut alice, &mut bob] {
        let close = client.expect_close().await;
        assert_eq!(close.code, CloseCode::Away);
        assert_eq!(close.reason.as_str(), "server shutting down");
    }
    timeout(TIMEOUT, stopping)
        .await
        .expect("shutdown finished")
        .expect("join")
        .expect("serve returned Ok");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}
