//! Helpers shared by the ip-chat integration tests: the two client frames.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "test helpers: not every test file uses every helper"
)]

use serde_json::Value;
use switchboard_testkit::{Client, json};

/// Sends a `send_message` with `text`.
pub async fn send(client: &mut Client, text: &str) {
    client
        .send_json(&json!({"type": "send_message", "data": {"text": text}}))
        .await;
}

/// Sends an `add_reaction` (a toggle) of `emoji` on `message_id`.
pub async fn react(client: &mut Client, message_id: &Value, emoji: &str) {
    client
        .send_json(
            &json!({"type": "add_reaction", "data": {"message_id": message_id, "emoji": emoji}}),
        )
        .await;
}
