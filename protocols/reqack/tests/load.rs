//! Load test over real sockets: 50 users exchange 2,000 messages while connections drop at
//! random, acks get lost and requests are retried. The application view of every user (events
//! deduplicated by event id) must contain every message addressed to it exactly once, and at the
//! end no event may be left unacknowledged.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "tests fail by panicking and report what they measured"
)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use switchboard_reqack::Config;
use switchboard_testkit::{Client, json};
use tokio::sync::Barrier;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

const USERS: usize = 50;
const PER_USER: usize = 40;
/// Chance that a connection is dropped right after a request is sent (before its response).
const DROP_AFTER_SEND: f64 = 0.04;
/// Chance that a connection is dropped after receiving a frame (before acking it).
const DROP_ON_RECEIVE: f64 = 0.01;
/// Chance that the client "loses" an ack (never sends it).
const LOSE_ACK: f64 = 0.05;
/// Chance that a request answered already is sent again on purpose.
const EXPLICIT_RETRY: f64 = 0.05;
/// The whole run must finish within this.
const DEADLINE: Duration = Duration::from_secs(25);
/// Bound on a single read; reading again after it is how the loops stay bounded and responsive.
const READ_SLICE: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
struct Counters {
    connects: AtomicUsize,
    drops: AtomicUsize,
    server_closes: AtomicUsize,
    resent_requests: AtomicUsize,
    explicit_retries: AtomicUsize,
    lost_acks: AtomicUsize,
    lost_message_acks: AtomicUsize,
    redelivered_frames: AtomicUsize,
    events: AtomicUsize,
}

#[derive(Debug, Default)]
struct Shared {
    /// Message ids each user must end up with, recorded by senders when the response arrives.
    expected: Mutex<HashMap<String, HashSet<u64>>>,
    senders_done: AtomicUsize,
    counters: Counters,
}

/// One simulated user: a socket that comes and goes, and its application view.
struct Sim {
    me: String,
    url: String,
    client: Option<Client>,
    rng: SmallRng,
    shared: Arc<Shared>,
    /// Event id -> message id, for every `new` event seen (the dedupe key is the event id).
    seen: HashMap<u64, u64>,
    /// Message id -> event id: what the application was handed, once each.
    delivered: HashMap<u64, u64>,
}

fn count(counter: &AtomicUsize) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Sim {
    async fn connected(&mut self) -> &mut Client {
        if self.client.is_none() {
            count(&self.shared.counters.connects);
            self.client = Some(Client::connect(&self.url).await);
        }
        self.client.as_mut().unwrap()
    }

    /// Drops the connection: half the time politely, half the time by just closing TCP.
    async fn drop_connection(&mut self) {
        count(&self.shared.counters.drops);
        if let Some(client) = self.client.take()
            && self.rng.random_bool(0.5)
        {
            client.close().await;
        }
    }

    async fn send(&mut self, value: &Value) -> bool {
        let client = self.connected().await;
        let sent = timeout(
            Duration::from_secs(5),
            client.inner().send(Message::text(value.to_string())),
        )
        .await;
        if matches!(sent, Ok(Ok(()))) {
            return true;
        }
        self.client = None;
        false
    }

    /// The next JSON frame within `wait`; `None` on timeout or when the socket ended (then the
    /// next call reconnects).
    async fn recv(&mut self, wait: Duration) -> Option<Value> {
        let client = self.client.as_mut()?;
        match timeout(wait, client.inner().next()).await {
            Err(_) => None,
            Ok(Some(Ok(Message::Text(text)))) => Some(serde_json::from_str(&text).unwrap()),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => None,
            Ok(_) => {
                count(&self.shared.counters.server_closes);
                self.client = None;
                None
            }
        }
    }

    /// Feeds one frame to the application: events are deduplicated by id and acked (unless the
    /// ack is "lost"). Returns the frame for the caller to inspect.
    async fn handle(&mut self, frame: Value) -> Value {
        if frame["type"] != "event" {
            return frame;
        }
        count(&self.shared.counters.events);
        let event_id = frame["id"].as_u64().expect("numeric event id");
        if frame["eventType"] == "new" {
            let payload = &frame["payload"];
            let message_id = payload["messageId"].as_u64().unwrap();
            assert_eq!(payload["chatId"], payload["from"]);
            assert_eq!(
                payload["message"], payload["clientMessageId"],
                "the test sends the request id as text"
            );
            match self.seen.get(&event_id) {
                Some(known) => {
                    assert_eq!(*known, message_id, "event {event_id} changed its content");
                    count(&self.shared.counters.redelivered_frames);
                }
                None => {
                    self.seen.insert(event_id, message_id);
                    if let Some(first) = self.delivered.insert(message_id, event_id) {
                        panic!(
                            "{}: message {message_id} delivered twice (events {first} and {event_id})",
                            self.me
                        );
                    }
                }
            }
        }
        if self.rng.random_bool(LOSE_ACK) {
            count(&self.shared.counters.lost_acks);
            if frame["eventType"] == "new" {
                count(&self.shared.counters.lost_message_acks);
            }
        } else {
            self.send(&json!({"type": "ack", "id": event_id.to_string()}))
                .await;
        }
        frame
    }

    /// Sends request `id` until a response arrives (reconnecting and resending the same id when
    /// the connection drops) and returns its payload.
    async fn request(&mut self, id: &str, kind: &str, payload: &Value, deadline: Instant) -> Value {
        let request = json!({"type": "request", "timestamp": 0, "id": id,
                             "payloadType": kind, "payload": payload});
        let mut attempt = 0;
        loop {
            assert!(
                Instant::now() < deadline,
                "{}: request {id} never answered",
                self.me
            );
            if attempt > 0 {
                count(&self.shared.counters.resent_requests);
            }
            attempt += 1;
            if !self.send(&request).await {
                continue;
            }
            if self.rng.random_bool(DROP_AFTER_SEND) {
                self.drop_connection().await;
                continue;
            }
            while self.client.is_some() && Instant::now() < deadline {
                let Some(frame) = self.recv(READ_SLICE).await else {
                    continue;
                };
                let frame = self.handle(frame).await;
                if frame["type"] == "response" && frame["id"] == id {
                    return frame["payload"].clone();
                }
            }
        }
    }

    fn expected(&self) -> HashSet<u64> {
        self.shared
            .expected
            .lock()
            .unwrap()
            .get(&self.me)
            .cloned()
            .unwrap_or_default()
    }

    async fn run(mut self, index: usize, barrier: Arc<Barrier>, deadline: Instant) -> Self {
        // Phase 1: send PER_USER messages to random other users.
        for k in 0..PER_USER {
            let mut to = self.rng.random_range(0..USERS - 1);
            if to >= index {
                to += 1;
            }
            let to = format!("u{to}");
            let id = format!("{}-{k}", self.me);
            let payload = json!({"chatId": to, "message": id, "clientMessageId": id});
            let answer = self.request(&id, "new", &payload, deadline).await;
            let message_id = answer["messageId"]
                .as_u64()
                .unwrap_or_else(|| panic!("{id} failed: {answer}"));
            if self.rng.random_bool(EXPLICIT_RETRY) {
                count(&self.shared.counters.explicit_retries);
                let again = self.request(&id, "new", &payload, deadline).await;
                assert_eq!(
                    again["messageId"], message_id,
                    "a retry must not make a new message"
                );
            }
            self.shared
                .expected
                .lock()
                .unwrap()
                .entry(to)
                .or_default()
                .insert(message_id);
        }
        self.shared.senders_done.fetch_add(1, Ordering::AcqRel);

        // Phase 2: receive until every message addressed to me has reached the application.
        loop {
            if self.shared.senders_done.load(Ordering::Acquire) == USERS {
                let expected = self.expected();
                let delivered: HashSet<u64> = self.delivered.keys().copied().collect();
                assert!(
                    delivered.is_subset(&expected),
                    "{}: delivered messages nobody sent to me",
                    self.me
                );
                if delivered == expected {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{}: {} of {} messages delivered before the deadline",
                self.me,
                self.delivered.len(),
                self.expected().len()
            );
            self.connected().await;
            if let Some(frame) = self.recv(READ_SLICE).await {
                if self.rng.random_bool(DROP_ON_RECEIVE) {
                    // Gone before the application saw it, let alone acked it.
                    self.drop_connection().await;
                    continue;
                }
                self.handle(frame).await;
            }
        }

        // Phase 3: once everyone is done, reconnect, take whatever is still unacked (lost acks),
        // ack it all, and round-trip twice so the acks are processed.
        barrier.wait().await;
        self.client = None;
        self.connected().await;
        self.sync_lossless("final-1", deadline).await;
        self.sync_lossless("final-2", deadline).await;
        if let Some(client) = self.client.take() {
            client.close().await;
        }
        self
    }

    /// A history round trip whose events are all acked (no lost acks, no drops).
    async fn sync_lossless(&mut self, id: &str, deadline: Instant) {
        let id = format!("{}-{id}", self.me);
        assert!(
            self.send(
                &json!({"type": "request", "id": id, "payloadType": "history",
                                  "payload": {"chatId": "nobody"}})
            )
            .await
        );
        loop {
            assert!(
                Instant::now() < deadline,
                "{}: final sync timed out",
                self.me
            );
            let Some(frame) = self.recv(READ_SLICE).await else {
                assert!(
                    self.client.is_some(),
                    "{}: dropped during the final sync",
                    self.me
                );
                continue;
            };
            if frame["type"] == "response" && frame["id"] == id.as_str() {
                return;
            }
            if frame["type"] == "event" {
                let event_id = frame["id"].as_u64().unwrap();
                if frame["eventType"] == "new" {
                    let message_id = frame["payload"]["messageId"].as_u64().unwrap();
                    assert_eq!(
                        self.seen.get(&event_id),
                        Some(&message_id),
                        "{}: a new event showed up after the application had everything",
                        self.me
                    );
                }
                assert!(
                    self.send(&json!({"type": "ack", "id": event_id.to_string()}))
                        .await
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_users_two_thousand_messages_random_disconnects_exactly_once() {
    let seed: u64 = std::env::var("REQACK_LOAD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026);
    let (protocol, server) = common::start(Config {
        redelivery_timeout: Duration::from_millis(300),
        // 50 users share one loopback address here, where real users would have 50: the
        // per-user and per-address rate limits are off, as is the connect rate (reconnects are
        // the point of this test).
        rate_limit: 0,
        client_rate_limit: 0,
        connect_rate_limit: 0,
        outbox_limit: 10_000,
        ..Config::default()
    })
    .await;
    let shared = Arc::new(Shared::default());
    let barrier = Arc::new(Barrier::new(USERS));
    let started = Instant::now();
    let deadline = started + DEADLINE;

    let tasks: Vec<_> = (0..USERS)
        .map(|i| {
            let sim = Sim {
                me: format!("u{i}"),
                url: server.ws_url(&format!("/ws?userId=u{i}")),
                client: None,
                rng: SmallRng::seed_from_u64(seed.wrapping_add(i as u64)),
                shared: shared.clone(),
                seen: HashMap::new(),
                delivered: HashMap::new(),
            };
            tokio::spawn(sim.run(i, barrier.clone(), deadline))
        })
        .collect();
    let mut sims = Vec::new();
    for task in tasks {
        sims.push(task.await.expect("a simulated user failed"));
    }
    let elapsed = started.elapsed();

    // Every message reached its recipient's application exactly once, none lost.
    let expected = shared.expected.lock().unwrap().clone();
    let total_expected: usize = expected.values().map(HashSet::len).sum();
    assert_eq!(total_expected, USERS * PER_USER);
    for sim in &sims {
        let delivered: HashSet<u64> = sim.delivered.keys().copied().collect();
        assert_eq!(
            delivered,
            expected.get(&sim.me).cloned().unwrap_or_default(),
            "{}",
            sim.me
        );
    }
    let stats = protocol.stats().await;
    assert_eq!(
        stats.messages,
        USERS * PER_USER,
        "retries stored no extra message"
    );
    assert_eq!(stats.pending_events, 0, "every event was acked in the end");

    let c = &shared.counters;
    let load = |a: &AtomicUsize| a.load(Ordering::Relaxed);
    println!(
        "reqack load (seed {seed}): {USERS} users, {} messages delivered exactly once in {elapsed:?}; \
         connects {}, client drops {}, server closes {}, resent requests {}, explicit retries {}, \
         lost acks {} ({} of `new` events), duplicate frames filtered {}, events received {}",
        USERS * PER_USER,
        load(&c.connects),
        load(&c.drops),
        load(&c.server_closes),
        load(&c.resent_requests),
        load(&c.explicit_retries),
        load(&c.lost_acks),
        load(&c.lost_message_acks),
        load(&c.redelivered_frames),
        load(&c.events),
    );
    assert!(
        load(&c.drops) > 0 && load(&c.lost_acks) > 0,
        "the chaos actually happened"
    );
}
