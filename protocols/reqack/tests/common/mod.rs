//! Helpers shared by the reqack integration tests.
//!
//! [`User`] wraps a testkit [`Client`] with a backlog: frames that arrive while a test waits for
//! something else (a response, another event) are kept, not dropped, so waiting for a response
//! never swallows an event the test looks for next.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    unreachable_pub,
    reason = "test helpers: panicking fails the test; not every test file uses every helper"
)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use switchboard_core::Engine;
use switchboard_reqack::{Config, ReqAck};
use switchboard_server::ServerConfig;
use switchboard_testkit::{Client, TIMEOUT, TestServer, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Starts a server; the test keeps the protocol to look at its counters.
pub async fn start(config: Config) -> (Arc<ReqAck>, TestServer) {
    start_on(config, Engine::default()).await
}

/// Starts a server on `engine` (e.g. one node of a `MemoryCluster`).
pub async fn start_on(config: Config, engine: Engine) -> (Arc<ReqAck>, TestServer) {
    let protocol = Arc::new(ReqAck::new(config));
    let server_config = ServerConfig {
        engine,
        ..ServerConfig::default()
    };
    let server = TestServer::start_shared(protocol.clone(), server_config).await;
    (protocol, server)
}

/// Connects as `user`.
pub async fn connect(server: &TestServer, user: &str) -> User {
    User {
        client: server.connect(&format!("/ws?userId={user}")).await,
        backlog: VecDeque::new(),
    }
}

/// Connects as `user` from loopback address `source` (its own client key).
pub async fn connect_from(server: &TestServer, user: &str, source: [u8; 4]) -> User {
    User {
        client: server
            .connect_from(&format!("/ws?userId={user}"), source)
            .await,
        backlog: VecDeque::new(),
    }
}

/// Wraps a socket connected some other way (e.g. with a signed token) as a [`User`].
pub fn user(client: Client) -> User {
    User {
        client,
        backlog: VecDeque::new(),
    }
}

/// A config whose live-socket redelivery happens quickly.
pub fn fast_redelivery() -> Config {
    Config {
        redelivery_timeout: Duration::from_millis(200),
        ..Config::default()
    }
}

pub fn is_presence(v: &Value) -> bool {
    v["type"] == "event" && (v["eventType"] == "online" || v["eventType"] == "offline")
}

/// One connected socket with a backlog of frames not consumed yet.
#[derive(Debug)]
pub struct User {
    pub client: Client,
    backlog: VecDeque<Value>,
}

impl User {
    /// Sends `value` as JSON.
    pub async fn send_json(&mut self, value: &Value) {
        self.client.send_json(value).await;
    }

    /// Sends raw text.
    pub async fn send_text(&mut self, text: &str) {
        self.client.send_text(text).await;
    }

    /// Closes politely.
    pub async fn close(self) {
        self.client.close().await;
    }

    async fn read(&mut self, wait: Duration) -> Option<Value> {
        match self.client.recv_within(wait).await? {
            Message::Text(text) => Some(
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")),
            ),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next frame (backlog first), bounded.
    pub async fn next(&mut self) -> Value {
        if let Some(v) = self.backlog.pop_front() {
            return v;
        }
        self.read(TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("no frame within {TIMEOUT:?}"))
    }

    /// The first frame satisfying `accept`, from the backlog or the socket; other frames are kept
    /// in the backlog. Bounded by [`TIMEOUT`].
    pub async fn wait_for(&mut self, accept: impl Fn(&Value) -> bool) -> Value {
        if let Some(pos) = self.backlog.iter().position(&accept) {
            return self.backlog.remove(pos).unwrap();
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.read(left).await.unwrap_or_else(|| {
                panic!(
                    "no matching frame within {TIMEOUT:?}; backlog: {:?}",
                    self.backlog
                )
            });
            if accept(&v) {
                return v;
            }
            self.backlog.push_back(v);
        }
    }

    /// Sends request `id` and returns the response with the same id.
    pub async fn request(&mut self, id: &str, kind: &str, payload: Value) -> Value {
        self.send_json(&json!({
            "type": "request", "timestamp": 1_700_000_000_000_u64, "id": id,
            "payloadType": kind, "payload": payload,
        }))
        .await;
        self.wait_for(|v| v["type"] == "response" && v["id"] == id)
            .await
    }

    /// The payload of a successful response; panics on an error response.
    pub async fn ok(&mut self, id: &str, kind: &str, payload: Value) -> Value {
        let response = self.request(id, kind, payload).await;
        assert!(
            response["payload"].get("error").is_none(),
            "request {id} failed: {response}"
        );
        response["payload"].clone()
    }

    /// The error code of a failed response; panics on success.
    pub async fn fails(&mut self, id: &str, kind: &str, payload: Value) -> String {
        let response = self.request(id, kind, payload).await;
        response["payload"]["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("request {id} should have failed: {response}"))
            .to_owned()
    }

    /// The next server event of `event_type`.
    pub async fn event(&mut self, event_type: &str) -> Value {
        self.wait_for(|v| v["type"] == "event" && v["eventType"] == event_type)
            .await
    }

    /// Acknowledges `event`.
    pub async fn ack(&mut self, event: &Value) {
        let id = event["id"].as_u64().expect("numeric event id");
        self.send_json(&json!({"type": "ack", "id": id.to_string()}))
            .await;
    }

    /// The next event of `event_type`, acknowledged.
    pub async fn event_acked(&mut self, event_type: &str) -> Value {
        let frame = self.event(event_type).await;
        self.ack(&frame).await;
        frame
    }

    /// The next frame that is not a presence event.
    pub async fn next_non_presence(&mut self) -> Value {
        self.wait_for(|v| !is_presence(v)).await
    }

    /// Round-trips a read-only request, so everything sent before it on this socket (acks
    /// included) has been processed by the server when this returns.
    pub async fn sync(&mut self) {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let id = format!("sync-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.ok(&id, "history", json!({"chatId": "nobody"})).await;
    }

    /// Forgets copies of `event` received so far (redeliveries that were already on their way
    /// before the ack was processed; call after [`User::sync`]).
    pub fn discard_copies(&mut self, event: &Value) {
        self.backlog.retain(|v| v != event);
    }

    /// Asserts that nothing but presence events is pending or arrives within `wait`.
    pub async fn quiet(&mut self, wait: Duration) {
        if let Some(v) = self.backlog.iter().find(|v| !is_presence(v)) {
            panic!("expected silence, but {v} is pending");
        }
        self.backlog.clear();
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self.read(left).await {
                None => return,
                Some(v) => assert!(is_presence(&v), "expected silence, got {v}"),
            }
        }
    }
}
