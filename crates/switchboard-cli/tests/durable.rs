//! `switchboard serve --data-dir`: the node's state survives SIGKILL. A reqack recipient's
//! unacknowledged events come back after a restart with their ids, acknowledged ones do not,
//! and new ids continue above the old ones.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use switchboard_testkit::{Client, TIMEOUT, json};
use tokio_tungstenite::tungstenite::Message;

/// A fresh directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "switchboard-cli-{name}-{}-{nanos}",
            std::process::id()
        ));
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `switchboard serve --protocol reqack --data-dir <dir>` on port 0.
fn start(dir: &Path) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
        .args(["--protocol", "reqack", "--data-dir"])
        .arg(dir)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn switchboard");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if entry["fields"]["message"] == "listening" {
                let _ = tx.send(
                    entry["fields"]["local"]
                        .as_str()
                        .unwrap()
                        .parse::<SocketAddr>()
                        .unwrap(),
                );
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the server reported its address");
    (child, addr)
}

async fn connect(addr: SocketAddr, user: &str) -> Client {
    Client::connect(&format!("ws://{addr}/ws?userId={user}")).await
}

async fn request(client: &mut Client, id: &str, kind: &str, payload: Value) -> Value {
    client
        .send_json(&json!({
            "type": "request", "timestamp": 0, "id": id, "payloadType": kind, "payload": payload,
        }))
        .await;
    let response = client
        .recv_until(|v| v["type"] == "response" && v["id"] == id)
        .await;
    assert!(
        response["payload"].get("error").is_none(),
        "request {id} failed: {response}"
    );
    response["payload"].clone()
}

fn is_new(v: &Value) -> bool {
    v["type"] == "event" && v["eventType"] == "new"
}

/// The `new` events that arrive within `wait` (other frames are skipped).
async fn new_events_within(client: &mut Client, wait: Duration) -> Vec<Value> {
    let deadline = Instant::now() + wait;
    let mut events = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(message) = client.recv_within(left).await else {
            return events;
        };
        if let Message::Text(text) = message {
            let value: Value = serde_json::from_str(&text).unwrap();
            if is_new(&value) {
                events.push(value);
            }
        }
    }
}

#[tokio::test]
async fn unacked_events_survive_sigkill_with_their_ids() {
    let dir = TempDir::new("durable");
    let (mut server, addr) = start(&dir.0);
    let mut bob = connect(addr, "bob").await;
    let mut alice = connect(addr, "alice").await;
    let mut message_ids = Vec::new();
    for i in 0..5 {
        let payload = request(
            &mut alice,
            &format!("r{i}"),
            "new",
            json!({"chatId": "bob", "message": format!("m{i}")}),
        )
        .await;
        message_ids.push(payload["messageId"].as_u64().unwrap());
    }
    let mut events = Vec::new();
    while events.len() < 5 {
        events.push(bob.recv_until(is_new).await);
    }
    for event in &events[..2] {
        bob.send_json(&json!({"type": "ack", "id": event["id"].as_u64().unwrap().to_string()}))
            .await;
    }
    // A read-only round trip: the acks before it on this socket have been handled.
    request(&mut bob, "sync", "history", json!({"chatId": "nobody"})).await;

    server.kill().unwrap(); // SIGKILL: no shutdown, no flush.
    server.wait().unwrap();
    drop((alice, bob));

    let (mut server, addr) = start(&dir.0);
    let mut bob = connect(addr, "bob").await;
    let mut replayed = Vec::new();
    while replayed.len() < 3 {
        replayed.push(bob.recv_until(is_new).await);
    }
    let strip = |v: &Value| (v["id"].clone(), v["payload"].clone());
    assert_eq!(
        replayed.iter().map(strip).collect::<Vec<_>>(),
        events[2..].iter().map(strip).collect::<Vec<_>>(),
        "the unacked events, with their ids and payloads"
    );
    let more = new_events_within(&mut bob, Duration::from_millis(500)).await;
    assert!(more.is_empty(), "acked events came back: {more:?}");

    let mut alice = connect(addr, "alice").await;
    let payload = request(
        &mut alice,
        "r5",
        "new",
        json!({"chatId": "bob", "message": "after the crash"}),
    )
    .await;
    let newest = payload["messageId"].as_u64().unwrap();
    assert!(
        newest > *message_ids.iter().max().unwrap(),
        "message ids continue: {newest} after {message_ids:?}"
    );
    let event = tokio::time::timeout(TIMEOUT, bob.recv_until(is_new))
        .await
        .unwrap();
    assert!(
        event["id"].as_u64().unwrap() > events[4]["id"].as_u64().unwrap(),
        "event ids continue: {event} after {}",
        events[4]
    );
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn an_unusable_data_dir_fails_with_a_clear_error() {
    let dir = TempDir::new("unusable");
    std::fs::write(&dir.0, "a file, not a directory").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--protocol", "reqack"])
        .env("SWITCHBOARD_DATA_DIR", &dir.0)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&dir.0);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot open the state engine") && stderr.contains("data directory"),
        "{stderr}"
    );
}
