//! Serving fastchat through the shared runtime: path, origin check, frame limit and the
//! protocol's own idle timeout, over real sockets.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::time::Duration;

use serde_json::Value;
use switchboard_core::{Keepalive, Protocol};
use switchboard_fastchat::{Config, FastChat};
use switchboard_server::ServerConfig;
use switchboard_testkit::{Client, ConnectOptions, TIMEOUT, TestServer, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use uuid::Uuid;

async fn hello(client: &mut Client, id: &str, name: &str) {
    client
        .send_json(&json!({"type": "HELLO", "data": {"user_id": id, "display_name": name}}))
        .await;
    client.recv_type("HELLO_ACK").await;
    client.recv_type("PRESENCE").await;
}

fn online(presence: &Value, id: &str) -> Option<bool> {
    presence["data"]["users"]
        .as_array()?
        .iter()
        .find(|u| u["user_id"] == id)
        .and_then(|u| u["online"].as_bool())
}

#[test]
fn keepalive_is_the_protocols_own_20_seconds_by_default() {
    let chat = FastChat::new(Config::default());
    assert_eq!(
        chat.keepalive(),
        Some(Keepalive {
            ping_interval: None,
            idle_timeout: Duration::from_secs(20),
        })
    );
    assert_eq!(chat.default_max_frame_bytes(), 64 * 1024);
    assert_eq!(chat.name(), "fastchat");
}

#[tokio::test]
async fn only_ws_is_served() {
    let server = TestServer::start(FastChat::new(Config::default()), ServerConfig::default()).await;
    for path in ["/", "/chat", "/ws/extra", "/wss"] {
        let status = Client::refused_status(&server.ws_url(path), ConnectOptions::default()).await;
        assert_eq!(status, 404, "{path}");
    }
    let mut client = server.connect("/ws?any=query").await;
    client.send_json(&json!({"type": "PING", "data": {}})).await;
    client.recv_type("PONG").await;
}

#[tokio::test]
async fn frames_over_64_kib_close_the_socket_with_1009() {
    let server = TestServer::start(FastChat::new(Config::default()), ServerConfig::default()).await;
    let mut client = server.connect("/ws").await;
    client.send_text(&"x".repeat(64 * 1024)).await;
    let error = client.recv_type("ERROR").await;
    assert_eq!(error["data"]["code"], "VALIDATION");
    client.send_text(&"x".repeat(64 * 1024 + 1)).await;
    assert_eq!(client.expect_close().await.code, CloseCode::Size);
}

#[tokio::test]
async fn a_silent_socket_is_dropped_and_presence_updated() {
    let config = Config {
        ping_interval: Duration::from_millis(500),
        pong_timeout: Duration::from_millis(250),
        ..Config::default()
    };
    let idle = config.idle_timeout();
    let server = TestServer::start(FastChat::new(config), ServerConfig::default()).await;
    let (a, b) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    let mut alice = server.connect("/ws").await;
    hello(&mut alice, &a, "Alice").await;
    let mut bob = server.connect("/ws").await;
    let bob_spoke = Instant::now();
    hello(&mut bob, &b, "Bob").await;

    // Alice keeps pinging (well within the timeout) while Bob stays silent.
    let alice_watches = async {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            assert!(Instant::now() < deadline, "no PRESENCE with Bob offline");
            alice.send_json(&json!({"type": "PING", "data": {}})).await;
            if let Some(tungstenite_message) = alice.recv_within(Duration::from_millis(60)).await
                && let Ok(text) = tungstenite_message.to_text()
                && let Ok(frame) = serde_json::from_str::<Value>(text)
                && frame["type"] == "PRESENCE"
                && online(&frame, &b) == Some(false)
            {
                return;
            }
        }
    };
    let bob_waits = async {
        let close = bob.expect_close().await;
        (close, bob_spoke.elapsed())
    };
    let ((), (close, silent_for)) = tokio::join!(alice_watches, bob_waits);
    assert_eq!(close.code, CloseCode::Away);
    assert_eq!(close.reason.as_str(), "idle timeout");
    assert!(
        silent_for >= idle,
        "closed after {silent_for:?}, timeout {idle:?}"
    );

    // Alice, who kept talking, is still connected.
    alice.send_json(&json!({"type": "PING", "data": {}})).await;
    alice.recv_until(|v| v["type"] == "PONG").await;
}
