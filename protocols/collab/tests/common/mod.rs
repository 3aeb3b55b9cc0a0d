//! Helpers shared by the collab integration tests.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "test helpers: not every test file uses every helper"
)]

use serde_json::Value;
use switchboard_testkit::{Client, TestServer, json};

/// Opens `/ws/<session>` and joins as `user` named `name`; returns the socket and the
/// `session-state` payload it was sent.
pub async fn join(server: &TestServer, session: &str, user: &str, name: &str) -> (Client, Value) {
    let mut client = server.connect(&format!("/ws/{session}")).await;
    client
        .send_json(&json!({"type": "join-session", "payload": {"userId": user, "username": name}}))
        .await;
    let state = client.recv_type("session-state").await;
    (client, state["payload"].clone())
}
