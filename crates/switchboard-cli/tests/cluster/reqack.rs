//! reqack on a cluster: three real `switchboard serve --protocol reqack` processes sharing one
//! real `redis-server` (`--engine redis://...`), driven over real sockets.
//!
//! - A user's events, event ids and outbox are cluster-wide: every socket of the user, on any
//!   node, gets each event; an ack on any node removes it everywhere; what is unacked comes back
//!   with the same id (and the same bytes) on whichever node the user reconnects to; ids only
//!   grow.
//! - A retried request (same user, same request id) gets the same response, byte for byte, on
//!   any node, and runs once, even when the retries race on two nodes.
//! - Presence spans nodes, and a SIGKILLed node's users go `offline` for the others in < 15 s.
//! - The load test: users reconnecting to a different node every time, producers sending through
//!   random nodes, one node SIGKILLed mid-run; every event a producer was answered for reaches
//!   its user, once acknowledged it never comes again, ids are never reused and only grow.
//! - Engine outage: with Redis stopped, requests get the protocol's `UNAVAILABLE` response and
//!   `/readyz` says 503; once Redis is back (same data), 200 within 10 s and everything
//!   acknowledged before is still there.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    reason = "tests fail by panicking and report what they measured"
)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{Node, WAIT, readyz};
use serde_json::{Value, json};
use switchboard_testkit::redis::RedisServer;
use tokio_tungstenite::tungstenite::{self, Message, WebSocket};

/// reqack's flags on every node here: redelivery on a live socket after 500 ms (so a lost ack
/// shows within a test), and no rate limits (every test user shares one loopback address, and
/// reconnecting is the point of the load test).
const REQACK_ARGS: &[&str] = &[
    "--reqack-redelivery-timeout",
    "500ms",
    "--reqack-rate-limit",
    "0",
    "--reqack-client-rate-limit",
    "0",
    "--reqack-connect-rate-limit",
    "0",
];

/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(800);

/// A small runtime for the async [`RedisServer`]; the nodes and clients here are blocking.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// One real Redis and three nodes of one cluster on it.
struct Cluster {
    rt: tokio::runtime::Runtime,
    redis: RedisServer,
    nodes: Vec<Option<Node>>,
}

impl Cluster {
    /// `None` when redis-server is not installed (the testkit printed a loud SKIPPED line).
    fn start(name: &str) -> Option<Self> {
        let rt = runtime();
        let redis = rt.block_on(RedisServer::start())?;
        let cluster = format!("reqack-{name}-{}", std::process::id());
        let nodes = (0..3)
            .map(|_| Some(Node::cluster(&redis.url(), &cluster, "reqack", REQACK_ARGS)))
            .collect();
        Some(Self { rt, redis, nodes })
    }

    fn addr(&self, node: usize) -> SocketAddr {
        self.nodes[node].as_ref().expect("a live node").addr
    }

    fn kill(&mut self, node: usize) {
        self.nodes[node].take().expect("a live node").kill();
    }
}

/// A frame as received: its exact text and its JSON.
#[derive(Debug, Clone)]
struct Frame {
    raw: String,
    json: Value,
}

impl Frame {
    fn is_event(&self, kind: &str) -> bool {
        self.json["type"] == "event" && self.json["eventType"] == kind
    }

    fn id(&self) -> u64 {
        self.json["id"].as_u64().expect("a numeric event id")
    }
}

/// A blocking reqack client. Frames read while looking for another one are kept, in order, for
/// the next look, so a test can wait for a response and then for the events that came first.
struct Sock {
    ws: WebSocket<TcpStream>,
    kept: VecDeque<Frame>,
}

impl Sock {
    fn connect(addr: SocketAddr, user: &str) -> Result<Self, String> {
        let stream = TcpStream::connect_timeout(&addr, WAIT).map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        stream
            .set_write_timeout(Some(WAIT))
            .map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(WAIT))
            .map_err(|e| e.to_string())?;
        let url = format!("ws://{addr}/ws?userId={user}");
        let (ws, _) = tungstenite::client(url, stream).map_err(|e| e.to_string())?;
        Ok(Self {
            ws,
            kept: VecDeque::new(),
        })
    }

    fn open(addr: SocketAddr, user: &str) -> Self {
        Self::connect(addr, user).unwrap_or_else(|e| panic!("{user} on {addr}: {e}"))
    }

    fn send(&mut self, value: &Value) -> Result<(), String> {
        self.ws
            .send(Message::text(value.to_string()))
            .map_err(|e| e.to_string())
    }

    /// The next frame off the socket within `wait`; `Ok(None)` if none came, `Err` if the
    /// socket ended.
    fn read_within(&mut self, wait: Duration) -> Result<Option<Frame>, String> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.ws
                .get_mut()
                .set_read_timeout(Some(left))
                .map_err(|e| e.to_string())?;
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    let json = serde_json::from_str(text.as_str())
                        .map_err(|e| format!("{e}: {}", text.as_str()))?;
                    return Ok(Some(Frame {
                        raw: text.as_str().to_owned(),
                        json,
                    }));
                }
                Ok(Message::Close(frame)) => return Err(format!("closed: {frame:?}")),
                Ok(_) => {}
                // A read timeout; tungstenite keeps a partly read frame for the next read.
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// The first frame (kept or new) that `accept`s, within `wait`; the others are kept.
    fn find_within(
        &mut self,
        wait: Duration,
        mut accept: impl FnMut(&Frame) -> bool,
    ) -> Result<Option<Frame>, String> {
        if let Some(at) = self.kept.iter().position(&mut accept) {
            return Ok(self.kept.remove(at));
        }
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(frame) = self.read_within(left)? else {
                return Ok(None);
            };
            if accept(&frame) {
                return Ok(Some(frame));
            }
            self.kept.push_back(frame);
        }
    }

    /// [`Sock::find_within`] [`WAIT`], panicking if nothing matches.
    fn find(&mut self, what: &str, accept: impl FnMut(&Frame) -> bool) -> Frame {
        match self.find_within(WAIT, accept) {
            Ok(Some(frame)) => frame,
            Ok(None) => panic!("no {what} within {WAIT:?}; kept: {:?}", self.kept),
            Err(e) => panic!("no {what}: {e}"),
        }
    }

    fn event(&mut self, kind: &str) -> Frame {
        self.find(&format!("`{kind}` event"), |f| f.is_event(kind))
    }

    /// Sends request `id` and returns its response frame (whatever its payload).
    fn request(&mut self, id: &str, kind: &str, payload: &Value) -> Frame {
        let request = json!({"type": "request", "timestamp": 0, "id": id,
                             "payloadType": kind, "payload": payload});
        self.send(&request).unwrap();
        self.response(id)
    }

    fn response(&mut self, id: &str) -> Frame {
        self.find(&format!("response {id}"), |f| {
            f.json["type"] == "response" && f.json["id"] == id
        })
    }

    /// A request that must succeed; returns its response frame.
    fn ok(&mut self, id: &str, kind: &str, payload: &Value) -> Frame {
        let response = self.request(id, kind, payload);
        assert!(
            response.json["payload"].get("error").is_none(),
            "request {id} failed: {}",
            response.raw
        );
        response
    }

    fn ack(&mut self, id: u64) {
        self.send(&json!({"type": "ack", "id": id.to_string()}))
            .unwrap();
    }

    /// A read-only round trip: the frames this socket sent before it (acks) have been handled.
    fn sync(&mut self) {
        self.ok("sync", "history", &json!({"chatId": "nobody"}));
    }

    /// Asserts that no kept or arriving frame `matches` within [`QUIET`].
    fn quiet(&mut self, what: &str, matches: impl FnMut(&Frame) -> bool) {
        if let Some(frame) = self.find_within(QUIET, matches).unwrap() {
            panic!("unexpected {what}: {}", frame.raw);
        }
    }

    fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }
}

fn new_message(to: &str, text: &str) -> Value {
    json!({"chatId": to, "message": text, "clientMessageId": text})
}

#[test]
fn events_ids_and_outboxes_are_cluster_wide() {
    let Some(cluster) = Cluster::start("outbox") else {
        return;
    };
    let (a, b, c) = (cluster.addr(0), cluster.addr(1), cluster.addr(2));
    let mut bob_on_a = Sock::open(a, "bob");
    let mut bob_on_b = Sock::open(b, "bob");
    bob_on_a.sync();
    bob_on_b.sync();
    let mut alice = Sock::open(c, "alice");

    // Sent on C: both of bob's sockets (A and B) get each event, the very same frame.
    let mut first = Vec::new();
    for i in 0..3 {
        alice.ok(
            &format!("m{i}"),
            "new",
            &new_message("bob", &format!("hi {i}")),
        );
    }
    for i in 0..3 {
        let on_a = bob_on_a.event("new");
        let on_b = bob_on_b.event("new");
        assert_eq!(on_a.raw, on_b.raw, "the same frame on both nodes");
        assert_eq!(on_a.json["payload"]["message"], format!("hi {i}"));
        first.push(on_a);
    }
    assert!(first.windows(2).all(|w| w[0].id() < w[1].id()), "{first:?}");

    // Acked on B: removed everywhere, so A (which redelivers after 500 ms) never sends them again.
    for event in &first {
        bob_on_b.ack(event.id());
    }
    bob_on_b.sync();
    let acked: HashSet<u64> = first.iter().map(Frame::id).collect();
    // A copy A queued before the acks were applied may still come; none after this round trip.
    bob_on_a.sync();
    bob_on_a.kept.retain(|f| !acked.contains(&f.id()));
    bob_on_a.quiet("redelivery of an acked event", |f| {
        f.json["type"] == "event" && acked.contains(&f.id())
    });

    // Unacked events come back with the same id and bytes on a node the user never used.
    let mut second = Vec::new();
    for i in 3..6 {
        alice.ok(
            &format!("m{i}"),
            "new",
            &new_message("bob", &format!("hi {i}")),
        );
    }
    for _ in 3..6 {
        bob_on_b.event("new");
        second.push(bob_on_a.event("new"));
    }
    bob_on_a.ack(second[1].id());
    bob_on_a.sync();
    bob_on_a.close();
    bob_on_b.close();
    let mut bob_on_c = Sock::open(c, "bob");
    let again = [bob_on_c.event("new"), bob_on_c.event("new")];
    assert_eq!(again[0].raw, second[0].raw, "same id, same bytes");
    assert_eq!(again[1].raw, second[2].raw, "same id, same bytes");
    // (The live socket redelivers those two after 500 ms unacked; nothing else comes.)
    let unacked = [again[0].id(), again[1].id()];
    bob_on_c.quiet("another `new` event", |f| {
        f.is_event("new") && !unacked.contains(&f.id())
    });
    bob_on_c.kept.clear();

    // Ids only grow: the next event, caused on A, comes after everything bob had.
    let mut carol = Sock::open(a, "carol");
    carol.ok("c1", "new", &new_message("bob", "later"));
    // The two unacked events keep being redelivered every 500 ms meanwhile: skip those.
    let later = bob_on_c.find("the event caused on A", |f| {
        f.is_event("new") && !unacked.contains(&f.id())
    });
    assert_eq!(later.json["payload"]["message"], "later");
    assert!(
        later.id() > second[2].id(),
        "ids only grow: {} after {}",
        later.id(),
        second[2].id()
    );
    for event in [&again[0], &again[1], &later] {
        bob_on_c.ack(event.id());
    }
    bob_on_c.sync();
    bob_on_c.close();
    // Everything acked: nothing comes back on any node.
    for addr in [a, b, c] {
        let mut bob = Sock::open(addr, "bob");
        bob.quiet("an acked event", |f| f.is_event("new"));
        bob.close();
    }
}

#[test]
fn a_retried_request_gets_the_same_response_byte_for_byte_on_any_node() {
    let Some(cluster) = Cluster::start("retry") else {
        return;
    };
    let addrs = [cluster.addr(0), cluster.addr(1), cluster.addr(2)];
    let mut bob = Sock::open(addrs[2], "bob");
    bob.sync();

    let mut alice = Sock::open(addrs[0], "alice");
    let sent = alice.ok("r1", "new", &new_message("bob", "once"));
    let message_id = sent.json["payload"]["messageId"].clone();
    alice.close();
    // A retry with another payload is still the first request's answer: the id is the key.
    for (i, addr) in addrs.iter().enumerate() {
        let mut alice = Sock::open(*addr, "alice");
        let again = alice.ok("r1", "new", &new_message("bob", &format!("again {i}")));
        assert_eq!(again.raw, sent.raw, "the retry on node {i}");
        alice.close();
    }
    let event = bob.event("new");
    assert_eq!(event.json["payload"]["messageId"], message_id);
    bob.ack(event.id());
    bob.quiet("a second `new` event", |f| f.is_event("new"));

    // Other kinds of request, each retried on the other nodes.
    let mut alice = Sock::open(addrs[1], "alice");
    let cases = [
        (
            "e1",
            "edit",
            json!({"messageId": message_id, "message": "edited"}),
        ),
        (
            "c1",
            "newCall",
            json!({"participants": ["bob"], "callType": "audio"}),
        ),
        ("d1", "delete", json!({"messageId": message_id})),
    ];
    for (id, kind, payload) in &cases {
        let first = alice.ok(id, kind, payload);
        for addr in addrs {
            let mut retry = Sock::open(addr, "alice");
            assert_eq!(retry.ok(id, kind, payload).raw, first.raw, "{kind} retried");
            retry.close();
        }
    }
    for kind in ["edit", "newCall", "delete"] {
        let event = bob.event(kind);
        bob.ack(event.id());
    }
    bob.sync();
    bob.quiet("an event of a retried request", |f| {
        f.json["type"] == "event"
            && f.json["eventType"] != "online"
            && f.json["eventType"] != "offline"
    });

    // The same request id sent on two nodes at once: one runs, both get its response.
    for round in 0..5 {
        let id = format!("race{round}");
        let payload = new_message("bob", &id);
        let (left, right) = std::thread::scope(|s| {
            let one = s.spawn(|| Sock::open(addrs[0], "alice").ok(&id, "new", &payload));
            let two = s.spawn(|| Sock::open(addrs[1], "alice").ok(&id, "new", &payload));
            (one.join().unwrap(), two.join().unwrap())
        });
        assert_eq!(left.raw, right.raw, "{id}: both nodes answer alike");
        let event = bob.event("new");
        assert_eq!(event.json["payload"]["message"], id.as_str());
        bob.ack(event.id());
    }
    bob.sync();
    bob.quiet("a duplicate of a raced request", |f| f.is_event("new"));
}

#[test]
fn presence_spans_nodes() {
    let Some(cluster) = Cluster::start("presence") else {
        return;
    };
    let (a, b, c) = (cluster.addr(0), cluster.addr(1), cluster.addr(2));
    let mut alice = Sock::open(a, "alice");
    alice.sync();
    let bob = Sock::open(b, "bob");
    let online = alice.event("online");
    assert_eq!(online.json["payload"], json!({"userId": "bob"}));

    // bob's second socket, on C, announces nothing; closing one of two neither.
    let mut bob_on_c = Sock::open(c, "bob");
    bob_on_c.sync();
    bob.close();
    alice.quiet("presence of bob while a socket is open", |f| {
        f.is_event("online") || f.is_event("offline")
    });
    bob_on_c.close();
    let offline = alice.event("offline");
    assert_eq!(offline.json["payload"], json!({"userId": "bob"}));

    // A newcomer on C learns who is online on the other nodes.
    let mut carol = Sock::open(c, "carol");
    let roster = carol.event("online");
    assert_eq!(roster.json["payload"], json!({"userId": "alice"}));
    assert_eq!(
        alice.event("online").json["payload"],
        json!({"userId": "carol"})
    );
}

#[test]
fn a_killed_nodes_only_socket_goes_offline_for_watchers_on_other_nodes() {
    let Some(mut cluster) = Cluster::start("nodeloss") else {
        return;
    };
    let mut watchers = [
        Sock::open(cluster.addr(0), "alice"),
        Sock::open(cluster.addr(2), "carol"),
    ];
    for watcher in &mut watchers {
        watcher.sync();
    }
    let _x = Sock::open(cluster.addr(1), "x");
    for watcher in &mut watchers {
        let online = watcher.find("x online", |f| {
            f.is_event("online") && f.json["payload"]["userId"] == "x"
        });
        assert_eq!(online.json["payload"], json!({"userId": "x"}));
    }

    let killed = Instant::now();
    cluster.kill(1);
    let limit = Duration::from_secs(15);
    for watcher in &mut watchers {
        let left = limit.saturating_sub(killed.elapsed());
        let offline = watcher
            .find_within(left, |f| {
                f.is_event("offline") && f.json["payload"]["userId"] == "x"
            })
            .unwrap();
        assert!(offline.is_some(), "x not offline within {limit:?}");
    }
    let took = killed.elapsed();
    println!("x offline for watchers on both other nodes {took:?} after the SIGKILL");
    // The surviving nodes keep serving: alice reaches carol across them.
    watchers[0].ok("1", "new", &new_message("carol", "still here"));
    let event = watchers[1].event("new");
    assert_eq!(event.json["payload"]["message"], "still here");
}

#[test]
fn an_engine_outage_answers_unavailable_and_loses_nothing_acknowledged() {
    let Some(mut cluster) = Cluster::start("outage") else {
        return;
    };
    let (a, b, c) = (cluster.addr(0), cluster.addr(1), cluster.addr(2));
    let mut bob = Sock::open(a, "bob");
    bob.sync();
    let mut alice = Sock::open(b, "alice");
    alice.sync();
    let sent: Vec<Frame> = (0..3)
        .map(|i| {
            alice.ok(
                &format!("r{i}"),
                "new",
                &new_message("bob", &format!("m{i}")),
            )
        })
        .collect();
    let events: Vec<Frame> = (0..3).map(|_| bob.event("new")).collect();
    bob.ack(events[0].id());
    bob.sync();
    // carol, online on C, will close during the outage.
    let mut carol = Sock::open(c, "carol");
    carol.sync();
    alice.find("carol online", |f| {
        f.is_event("online") && f.json["payload"]["userId"] == "carol"
    });

    cluster.rt.block_on(cluster.redis.stop());
    let stopped = Instant::now();
    for node in cluster.nodes.iter().flatten() {
        node.wait_ready(false);
    }
    let not_ready = stopped.elapsed();
    // Every request that needs the engine is answered, with UNAVAILABLE: a new one, a retry of
    // one answered before the outage, a read.
    let asked = Instant::now();
    for (id, kind, payload) in [
        ("r3", "new", new_message("bob", "m3")),
        ("r0", "new", new_message("bob", "m0")),
        ("h", "history", json!({"chatId": "bob"})),
    ] {
        let response = alice.request(id, kind, &payload);
        assert_eq!(
            response.json["payload"]["error"]["code"], "UNAVAILABLE",
            "{kind} {id} during the outage: {}",
            response.raw
        );
    }
    let answered_in = asked.elapsed();
    // An ack cannot be applied now: the event stays and comes again (checked below).
    bob.ack(events[1].id());
    let refused = bob.request("h", "history", &json!({"chatId": "alice"}));
    assert_eq!(refused.json["payload"]["error"]["code"], "UNAVAILABLE");
    // A socket that closes now cannot leave presence yet.
    carol.close();
    // A new socket cannot be registered: refused, or closed with 1013.
    match Sock::connect(c, "dave") {
        Err(e) => println!("a connect during the outage was refused: {e}"),
        Ok(mut dave) => match dave.read_within(WAIT) {
            Err(e) => assert!(e.contains("1013") || e.contains("Again"), "{e}"),
            Ok(frame) => panic!("a socket opened during the outage: {frame:?}"),
        },
    }

    cluster.rt.block_on(cluster.redis.restart());
    let restarted = Instant::now();
    for node in cluster.nodes.iter().flatten() {
        let deadline = restarted + Duration::from_secs(10);
        while readyz(node.addr) != Some(200) {
            assert!(
                Instant::now() < deadline,
                "{} not ready 10 s after Redis came back",
                node.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let ready_again = restarted.elapsed();
    println!(
        "engine outage: /readyz 503 on all nodes {not_ready:?} after the stop; 3 requests \
         answered UNAVAILABLE in {answered_in:?}; 200 on all nodes {ready_again:?} after the restart"
    );

    // The sockets that lived through the outage work again. The refused request runs now,
    // once, and reaches bob live; a retry of one answered before gets its original bytes.
    let r3 = alice.ok("r3", "new", &new_message("bob", "m3"));
    let live = bob.find("the `new` event of r3", |f| {
        f.is_event("new") && f.json["payload"]["message"] == "m3"
    });
    assert_eq!(
        live.json["payload"]["messageId"],
        r3.json["payload"]["messageId"]
    );
    assert!(
        live.id() > events[2].id(),
        "ids only grow across the outage"
    );
    assert_eq!(
        alice.ok("r0", "new", &new_message("bob", "m0")).raw,
        sent[0].raw
    );

    // On another node bob gets what is unacked, with the same ids and bytes, and not the event
    // he acked before the outage.
    bob.close();
    let mut bob = Sock::open(c, "bob");
    let replay: Vec<Frame> = (0..3).map(|_| bob.event("new")).collect();
    let raws: Vec<&str> = replay.iter().map(|f| f.raw.as_str()).collect();
    assert_eq!(
        raws,
        [
            events[1].raw.as_str(),
            events[2].raw.as_str(),
            live.raw.as_str()
        ]
    );
    for event in &replay {
        bob.ack(event.id());
    }
    bob.sync();
    bob.close();
    let mut bob = Sock::open(a, "bob");
    bob.quiet("an acked event", |f| f.is_event("new"));
    // carol's leave, refused during the outage, is done once Redis is back: she goes offline
    // for the others (and is not online again).
    let offline = alice.find("carol offline", |f| {
        f.is_event("offline") && f.json["payload"]["userId"] == "carol"
    });
    assert_eq!(offline.json["payload"], json!({"userId": "carol"}));
    alice.quiet("carol online again", |f| {
        f.is_event("online") && f.json["payload"]["userId"] == "carol"
    });
}

// ---------------------------------------------------------------------------------------------
// The load test

/// Users that receive, each reconnecting to the next node every session.
const RECEIVERS: usize = 12;
/// Users that send, each request through a random node.
const PRODUCERS: usize = 2;
/// Messages each producer sends at most...
const PER_PRODUCER: usize = 200;
/// ...within this much time (the machine may be shared and slow).
const PRODUCE_FOR: Duration = Duration::from_secs(10);
/// Pause between a producer's messages, so the run spans many reconnects and the kill.
const PACE: Duration = Duration::from_millis(10);
/// The node SIGKILLed mid-run: a third into the production time, once some messages were
/// answered.
const VICTIM: usize = 1;
/// Chance per mille that a receiver does not send an ack (the event must come again).
const LOSE_ACK: u32 = 100;
/// Chance per mille that a session ends with a round trip that confirms its acks were applied.
const CONFIRM: u32 = 700;
/// A producer gives a request up (its outcome unknown) after this long unanswered.
const REQUEST_BUDGET: Duration = Duration::from_secs(8);
/// The whole run, startup excluded, must end within this.
const RUN_LIMIT: Duration = Duration::from_secs(40);

/// xorshift64*: a seeded generator, enough for picking nodes, users and chances.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, per_mille: u32) -> bool {
        self.next() % 1000 < u64::from(per_mille)
    }
}

#[derive(Default)]
struct Counters {
    connects: AtomicUsize,
    connect_failures: AtomicUsize,
    sessions_cut: AtomicUsize,
    lost_acks: AtomicUsize,
    confirmed_sessions: AtomicUsize,
    duplicates: AtomicUsize,
    answered: AtomicUsize,
    unavailable: AtomicUsize,
    /// UNAVAILABLE because the request id was still claimed (by a node that died answering it).
    still_claimed: AtomicUsize,
    other_errors: AtomicUsize,
    resent: AtomicUsize,
    explicit_retries: AtomicUsize,
    abandoned: AtomicUsize,
}

struct Shared {
    addrs: Vec<SocketAddr>,
    dead: Vec<AtomicBool>,
    producers_done: AtomicUsize,
    /// Message ids a producer was answered for, by recipient.
    expected: Mutex<HashMap<String, HashSet<u64>>>,
    /// Texts of requests given up with their outcome unknown (they may or may not arrive).
    unknown: Mutex<HashSet<String>>,
    /// How long each answered request took to be answered (retries included).
    latencies: Mutex<Vec<Duration>>,
    /// Every broken promise, reported together at the end.
    violations: Mutex<Vec<String>>,
    counters: Counters,
    deadline: Instant,
}

impl Shared {
    fn violation(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }

    /// The next node after `node` that is not dead.
    fn next_live(&self, node: usize) -> usize {
        (1..=self.addrs.len())
            .map(|step| (node + step) % self.addrs.len())
            .find(|n| !self.dead[*n].load(Ordering::Acquire))
            .unwrap()
    }

    fn expected_for(&self, user: &str) -> HashSet<u64> {
        self.expected
            .lock()
            .unwrap()
            .get(user)
            .cloned()
            .unwrap_or_default()
    }
}

fn bump(counter: &AtomicUsize) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// What one receiver saw over all its sessions.
struct Receiver {
    me: String,
    rng: Rng,
    node: usize,
    /// Every `new` event's exact frame, by event id.
    frames: HashMap<u64, String>,
    /// Event id of each message id.
    by_message: HashMap<u64, u64>,
    /// The newest event id seen for the first time.
    newest: u64,
    /// Events whose ack was confirmed applied (a round trip after it): never again. The value
    /// says where (session, node), for the report.
    confirmed: HashMap<u64, (usize, usize)>,
    sessions: usize,
    /// Ids of the events of the current session so far, and when it started (for reports).
    here: Vec<u64>,
    since: Instant,
}

impl Receiver {
    /// One `new` event: checked against everything seen before, then recorded.
    fn record(&mut self, shared: &Shared, frame: &Frame) {
        let id = frame.id();
        if let Some((session, node)) = self.confirmed.get(&id) {
            shared.violation(format!(
                "{}: event {id}, acked in session {session} on node {node}, came again in \
                 session {} on node {} {:?} after it started, after {:?}: {}",
                self.me,
                self.sessions,
                self.node,
                self.since.elapsed(),
                self.here,
                frame.raw
            ));
        }
        if let Some(before) = self.frames.get(&id) {
            bump(&shared.counters.duplicates);
            if *before != frame.raw {
                shared.violation(format!(
                    "{}: event id {id} reused: {before} then {}",
                    self.me, frame.raw
                ));
            }
            return;
        }
        if id <= self.newest {
            shared.violation(format!(
                "{}: new event {id} after event {} (ids must only grow)",
                self.me, self.newest
            ));
        }
        self.newest = self.newest.max(id);
        self.frames.insert(id, frame.raw.clone());
        let payload = &frame.json["payload"];
        let message_id = payload["messageId"].as_u64().unwrap_or(0);
        if let Some(other) = self.by_message.insert(message_id, id) {
            shared.violation(format!(
                "{}: message {message_id} delivered as events {other} and {id}",
                self.me
            ));
        }
    }

    /// One connection to the next live node for about `length`, acking what arrives; returns
    /// how many `new` events it got (`None` if it could not connect).
    fn session(&mut self, shared: &Shared, length: Duration, careful: bool) -> Option<usize> {
        self.node = shared.next_live(self.node);
        let Ok(mut sock) = Sock::connect(shared.addrs[self.node], &self.me) else {
            bump(&shared.counters.connect_failures);
            return None;
        };
        bump(&shared.counters.connects);
        self.sessions += 1;
        self.here.clear();
        self.since = Instant::now();
        let mut on_this = HashSet::new();
        let mut newest_here = 0;
        let mut acked: Vec<u64> = Vec::new();
        let mut got = 0;
        // Handles one frame; returns the id of the event it acked, if any.
        let mut handle =
            |this: &mut Self, sock: &mut Sock, frame: Frame| -> Result<Option<u64>, String> {
                if frame.json["type"] != "event" {
                    return Ok(None);
                }
                let id = frame.id();
                this.here.push(id);
                // On one socket every event not seen on it before comes in id order (redeliveries
                // of earlier ones aside).
                if on_this.insert(id) {
                    if id <= newest_here {
                        shared.violation(format!(
                            "{}: event {id} after {newest_here} on one socket",
                            this.me
                        ));
                    }
                    newest_here = newest_here.max(id);
                }
                if !frame.is_event("new") {
                    return Ok(None);
                }
                got += 1;
                this.record(shared, &frame);
                if !careful && this.rng.chance(LOSE_ACK) {
                    bump(&shared.counters.lost_acks);
                    return Ok(None);
                }
                sock.send(&json!({"type": "ack", "id": id.to_string()}))?;
                Ok(Some(id))
            };
        let end = Instant::now() + length;
        let mut cut = false;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match sock.read_within(left) {
                Ok(Some(frame)) => match handle(self, &mut sock, frame) {
                    Ok(ack) => acked.extend(ack),
                    Err(_) => {
                        cut = true;
                        break;
                    }
                },
                Ok(None) => break,
                Err(_) => {
                    cut = true;
                    break;
                }
            }
        }
        if !cut && (careful || self.rng.chance(CONFIRM)) {
            // A round trip: the acks sent before it are applied once its response is here (not
            // those sent while waiting for it).
            let before = acked.len();
            let id = format!("sync-{}", self.sessions);
            let request = json!({"type": "request", "id": id, "payloadType": "history",
                                 "payload": {"chatId": "nobody"}});
            let mut confirmed = false;
            if sock.send(&request).is_ok() {
                let deadline = Instant::now() + WAIT;
                while let Ok(Some(frame)) =
                    sock.read_within(deadline.saturating_duration_since(Instant::now()))
                {
                    if frame.json["type"] == "response" && frame.json["id"] == id.as_str() {
                        confirmed = frame.json["payload"].get("error").is_none();
                        break;
                    }
                    match handle(self, &mut sock, frame) {
                        Ok(ack) => acked.extend(ack),
                        Err(_) => break,
                    }
                }
            }
            if confirmed {
                bump(&shared.counters.confirmed_sessions);
                let at = (self.sessions, self.node);
                acked.truncate(before);
                self.confirmed.extend(acked.into_iter().map(|id| (id, at)));
            } else {
                cut = true;
            }
        }
        if cut {
            bump(&shared.counters.sessions_cut);
        }
        if self.rng.chance(500) {
            sock.close();
        } // else dropped: the TCP connection just ends.
        Some(got)
    }

    fn run(mut self, shared: &Shared) -> Self {
        // While the producers send: short sessions, a different node each time, acks lost.
        while shared.producers_done.load(Ordering::Acquire) < PRODUCERS {
            if Instant::now() > shared.deadline {
                shared.violation(format!("{}: the producers never finished", self.me));
                return self;
            }
            let length = Duration::from_millis(150 + self.rng.below(450) as u64);
            self.session(shared, length, false);
        }
        // Then: until everything answered to a producer is here and nothing is left unacked.
        loop {
            if Instant::now() > shared.deadline {
                let expected = shared.expected_for(&self.me);
                let missing: Vec<_> = expected
                    .iter()
                    .filter(|m| !self.by_message.contains_key(m))
                    .collect();
                shared.violation(format!(
                    "{}: never received {} answered messages: {missing:?}",
                    self.me,
                    missing.len()
                ));
                return self;
            }
            let got = self.session(shared, Duration::from_millis(300), true);
            let expected = shared.expected_for(&self.me);
            if got == Some(0) && expected.iter().all(|m| self.by_message.contains_key(m)) {
                return self;
            }
        }
    }
}

/// Sends `PER_PRODUCER` messages to random receivers, each request through a random live
/// node, resending the same request id elsewhere when its node dies or answers UNAVAILABLE.
fn produce(p: usize, shared: &Shared, receivers: &[String]) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (p as u64 + 1));
    let me = format!("p{p}");
    let mut socks: Vec<Option<Sock>> = shared.addrs.iter().map(|_| None).collect();
    let mut ask = |rng: &mut Rng, request: &Value, id: &str| -> Result<Frame, String> {
        let mut node = rng.below(shared.addrs.len());
        if shared.dead[node].load(Ordering::Acquire) {
            node = shared.next_live(node);
        }
        if socks[node].is_none() {
            socks[node] = Some(Sock::connect(shared.addrs[node], &me)?);
        }
        let sock = socks[node].as_mut().unwrap();
        let answer = sock.send(request).and_then(|()| {
            sock.find_within(WAIT, |f| f.json["type"] == "response" && f.json["id"] == id)
        });
        // Presence events and the like: a producer has no use for them.
        sock.kept.clear();
        match answer {
            Ok(Some(frame)) => Ok(frame),
            Ok(None) => Err(format!("no response to {id} within {WAIT:?}")),
            Err(e) => {
                socks[node] = None;
                Err(e)
            }
        }
    };
    let until = Instant::now() + PRODUCE_FOR;
    for k in 0..PER_PRODUCER {
        if Instant::now() > until {
            break;
        }
        let to = &receivers[rng.below(receivers.len())];
        let text = format!("{me}-{k}");
        let request = json!({"type": "request", "timestamp": 0, "id": text,
                             "payloadType": "new", "payload": new_message(to, &text)});
        let started = Instant::now();
        let mut attempts = 0;
        let answer = loop {
            if started.elapsed() > REQUEST_BUDGET {
                break None;
            }
            if attempts > 0 {
                bump(&shared.counters.resent);
                std::thread::sleep(Duration::from_millis(20));
            }
            attempts += 1;
            let Ok(frame) = ask(&mut rng, &request, &text) else {
                continue;
            };
            match frame.json["payload"]["error"]["code"].as_str() {
                None => break Some(frame),
                Some("UNAVAILABLE") => {
                    bump(&shared.counters.unavailable);
                    let why = frame.json["payload"]["error"]["message"]
                        .as_str()
                        .unwrap_or_default();
                    if why.contains("still being answered") {
                        bump(&shared.counters.still_claimed);
                        // Claimed by a node that died while answering it: the claim outlives
                        // it by up to 30 s. Its outcome is unknown; the producer moves on.
                        break None;
                    }
                }
                Some(_) => {
                    bump(&shared.counters.other_errors);
                    shared.violation(format!("{text}: unexpected answer {}", frame.raw));
                }
            }
        };
        let Some(frame) = answer else {
            bump(&shared.counters.abandoned);
            shared.unknown.lock().unwrap().insert(text);
            continue;
        };
        let Some(message_id) = frame.json["payload"]["messageId"].as_u64() else {
            shared.violation(format!("{text}: no messageId in {}", frame.raw));
            continue;
        };
        shared
            .expected
            .lock()
            .unwrap()
            .entry(to.clone())
            .or_default()
            .insert(message_id);
        bump(&shared.counters.answered);
        shared.latencies.lock().unwrap().push(started.elapsed());
        if rng.chance(100) {
            // A retry through another node gets the same bytes.
            bump(&shared.counters.explicit_retries);
            if let Ok(again) = ask(&mut rng, &request, &text)
                && again.raw != frame.raw
            {
                shared.violation(format!("{text}: retried {} then {}", frame.raw, again.raw));
            }
        }
        std::thread::sleep(PACE);
    }
    shared.producers_done.fetch_add(1, Ordering::AcqRel);
}

#[test]
fn exactly_once_after_ack_across_three_nodes_with_reconnects_and_a_sigkill() {
    let Some(mut cluster) = Cluster::start("load") else {
        return;
    };
    let started = Instant::now();
    let shared = Arc::new(Shared {
        addrs: (0..3).map(|n| cluster.addr(n)).collect(),
        dead: (0..3).map(|_| AtomicBool::new(false)).collect(),
        producers_done: AtomicUsize::new(0),
        expected: Mutex::default(),
        unknown: Mutex::default(),
        latencies: Mutex::default(),
        violations: Mutex::default(),
        counters: Counters::default(),
        deadline: started + RUN_LIMIT,
    });
    let receivers: Vec<String> = (0..RECEIVERS).map(|i| format!("u{i}")).collect();

    let (sims, killed_at) = std::thread::scope(|s| {
        let handles: Vec<_> = receivers
            .iter()
            .enumerate()
            .map(|(i, me)| {
                let shared = &shared;
                let receiver = Receiver {
                    me: me.clone(),
                    rng: Rng(0x5eed_2026 + i as u64),
                    node: i % 3,
                    frames: HashMap::new(),
                    by_message: HashMap::new(),
                    newest: 0,
                    confirmed: HashMap::new(),
                    sessions: 0,
                    here: Vec::new(),
                    since: Instant::now(),
                };
                s.spawn(move || receiver.run(shared))
            })
            .collect();
        for p in 0..PRODUCERS {
            let (shared, receivers) = (&shared, &receivers);
            s.spawn(move || produce(p, shared, receivers));
        }
        // The kill: a third into the production time, once some messages were answered
        // before it (bounded wait).
        let some = 2 * RECEIVERS;
        while started.elapsed() < PRODUCE_FOR / 3
            || shared.counters.answered.load(Ordering::Relaxed) < some
        {
            assert!(
                started.elapsed() < RUN_LIMIT,
                "fewer than {some} messages answered"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        shared.dead[VICTIM].store(true, Ordering::Release);
        let killed_at = started.elapsed();
        cluster.kill(VICTIM);
        let sims: Vec<Receiver> = handles
            .into_iter()
            .map(|h| h.join().expect("a receiver thread"))
            .collect();
        (sims, killed_at)
    });
    let elapsed = started.elapsed();

    let expected = shared.expected.lock().unwrap().clone();
    let unknown = shared.unknown.lock().unwrap().clone();
    let mut violations = shared.violations.lock().unwrap().clone();
    for sim in &sims {
        let want = expected.get(&sim.me).cloned().unwrap_or_default();
        let missing: Vec<_> = want
            .iter()
            .filter(|m| !sim.by_message.contains_key(m))
            .collect();
        if !missing.is_empty() {
            violations.push(format!(
                "{}: answered but never received: {missing:?}",
                sim.me
            ));
        }
        // Anything received beyond the answered messages must be a request given up on.
        for (message, event) in &sim.by_message {
            if want.contains(message) {
                continue;
            }
            let frame: Value = serde_json::from_str(&sim.frames[event]).unwrap();
            let text = frame["payload"]["message"].as_str().unwrap_or_default();
            if !unknown.contains(text) {
                violations.push(format!(
                    "{}: received a message never sent: {frame}",
                    sim.me
                ));
            }
        }
    }
    let c = &shared.counters;
    let load = |a: &AtomicUsize| a.load(Ordering::Relaxed);
    let answered = load(&c.answered);
    let mut latencies = shared.latencies.lock().unwrap().clone();
    latencies.sort();
    let median = latencies
        .get(latencies.len() / 2)
        .copied()
        .unwrap_or_default();
    let slowest = latencies.last().copied().unwrap_or_default();
    println!(
        "reqack cluster load: {RECEIVERS} receivers, {PRODUCERS} producers, {answered} messages (at most {}) \
         answered and received in {elapsed:?} (node {VICTIM} SIGKILLed at {killed_at:?}); \
         connects {}, connect failures {}, sessions cut {}, confirmed sessions {}, lost acks {}, \
         duplicate frames {}, UNAVAILABLE answers {} ({} of them \
         \"still being answered\"), other error answers {}, resent requests {}, \
         explicit retries {}, requests given up (outcome unknown) {}, of which received {}; \
         answer time median {median:?}, slowest {slowest:?}",
        PRODUCERS * PER_PRODUCER,
        load(&c.connects),
        load(&c.connect_failures),
        load(&c.sessions_cut),
        load(&c.confirmed_sessions),
        load(&c.lost_acks),
        load(&c.duplicates),
        load(&c.unavailable),
        load(&c.still_claimed),
        load(&c.other_errors),
        load(&c.resent),
        load(&c.explicit_retries),
        load(&c.abandoned),
        sims.iter()
            .map(|s| s.by_message.len())
            .sum::<usize>()
            .saturating_sub(answered),
    );
    assert!(
        violations.is_empty(),
        "{} violations:\n{}",
        violations.len(),
        violations.join("\n")
    );
    assert!(answered > 0 && load(&c.lost_acks) > 0, "the load happened");
    let sessions: usize = sims.iter().map(|s| s.sessions).sum();
    assert!(
        sessions >= 3 * RECEIVERS,
        "users switched nodes: {sessions} sessions"
    );
}
