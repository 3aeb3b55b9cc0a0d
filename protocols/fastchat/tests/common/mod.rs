//! Helpers shared by the fastchat integration tests: frames by type, HELLO, presence lookups,
//! chats and messages.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    unreachable_pub,
    reason = "test helpers: panicking fails the test; not every test file uses every helper"
)]

use std::time::Duration;

use serde_json::Value;
use switchboard_testkit::{Client, TestServer, json};
use uuid::Uuid;

/// Long enough for a frame that would come to arrive on loopback; used to assert absence.
pub const QUIET: Duration = Duration::from_millis(200);

pub fn new_id() -> String {
    Uuid::new_v4().to_string()
}

/// Skips frames until one of type `kind` arrives (bounded).
pub async fn next(client: &mut Client, kind: &str) -> Value {
    client.recv_until(|v| v["type"] == kind).await
}

pub async fn send(client: &mut Client, kind: &str, data: Value) {
    client.send_json(&json!({"type": kind, "data": data})).await;
}

pub async fn expect_error(client: &mut Client, code: &str) -> Value {
    let frame = client.recv_type("ERROR").await;
    assert_eq!(frame["data"]["code"], code, "{frame}");
    assert!(frame["data"]["message"].is_string(), "{frame}");
    assert!(frame["data"]["details"].is_object(), "{frame}");
    frame["data"].clone()
}

/// Connects and says HELLO; returns once HELLO_ACK and the PRESENCE after it have arrived.
pub async fn join(server: &TestServer, id: &str, name: &str) -> (Client, Value) {
    let mut client = server.connect("/ws").await;
    send(
        &mut client,
        "HELLO",
        json!({"user_id": id, "display_name": name}),
    )
    .await;
    let ack = client.recv_type("HELLO_ACK").await;
    assert_eq!(ack["data"], json!({"user_id": id, "status": "connected"}));
    let presence = client.recv_type("PRESENCE").await;
    (client, presence)
}

pub fn online(presence: &Value, id: &str) -> Option<bool> {
    presence["data"]["users"]
        .as_array()?
        .iter()
        .find(|u| u["user_id"] == id)
        .and_then(|u| u["online"].as_bool())
}

pub async fn open(client: &mut Client, target: &str) -> Value {
    send(
        client,
        "OPEN_CHAT",
        json!({"target_user_id": target, "target_display_name": "x"}),
    )
    .await;
    next(client, "CHAT_OPENED").await
}

pub async fn msg(client: &mut Client, to: &str, content: &str, message_id: Option<&str>) {
    let mut data = json!({"to": to, "content": content});
    if let Some(id) = message_id {
        data["message_id"] = json!(id);
    }
    send(client, "MSG", data).await;
}
