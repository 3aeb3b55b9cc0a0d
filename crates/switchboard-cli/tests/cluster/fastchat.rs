//! fastchat as a cluster of real processes: three `switchboard serve --protocol fastchat` nodes
//! sharing one real `redis-server` (`--engine redis://... --cluster-name ...`).
//!
//! - presence spans the nodes, and chats, messages, both acks and typing cross them;
//! - a user offline while messages are sent to them on one node gets each exactly once, in
//!   order, when they say HELLO on another;
//! - the per-user MSG limit and `message_id` de-duplication hold across nodes;
//! - a SIGKILLed node's users go offline for the others within 15 s, and the rest keeps serving;
//! - with Redis stopped, work that needs it is answered with `ERROR` (never dropped), `/readyz`
//!   is 503; once Redis is back every node is ready within 10 s, messages flow again, and what
//!   was acknowledged before the outage is still delivered.
//!
//! The tests skip (loudly) where redis-server is not installed, unless
//! SWITCHBOARD_REQUIRE_REDIS=1.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::{Node, Ws, WsResult, readyz};
use serde_json::{Value, json};
use switchboard_testkit::redis::RedisServer;
use tokio::runtime::Runtime;

/// The contract's bound on a killed node's users leaving presence.
const NODE_LOSS_BOUND: Duration = Duration::from_secs(15);

/// The contract's bound on every node being ready again once Redis is back.
const RECOVERY_BOUND: Duration = Duration::from_secs(10);

/// A runtime for the [`RedisServer`] calls; the nodes and clients here are blocking.
fn runtime() -> Runtime {
    Runtime::new().expect("tokio runtime")
}

/// A UUID v4 (canonical form), distinct per `n` within one test.
fn user_id(n: usize) -> String {
    format!("{:08x}-0000-4000-8000-{n:012x}", std::process::id())
}

/// `count` fastchat nodes of one cluster on `redis`, started side by side (each returns once
/// its `/readyz` says 200).
fn cluster(redis: &RedisServer, count: usize, extra: &[&str]) -> Vec<Node> {
    let url = redis.url();
    let name = format!("fastchat-{}", std::process::id());
    std::thread::scope(|scope| {
        let starting: Vec<_> = (0..count)
            .map(|_| scope.spawn(|| Node::cluster(&url, &name, "fastchat", extra)))
            .collect();
        starting.into_iter().map(|s| s.join().unwrap()).collect()
    })
}

/// One fastchat socket of one user, with the presence it has been told so far (the full list
/// merged with every delta read, whoever read it).
struct Peer {
    ws: Ws,
    id: String,
    presence: BTreeMap<String, bool>,
}

impl Peer {
    /// Connects to `node` and says HELLO as `id`; returns once the `HELLO_ACK` and the full
    /// `PRESENCE` list have been read.
    fn hello(node: &Node, id: &str, name: &str) -> Self {
        let mut peer = Self::connect(node, id);
        let ack = peer.ask(
            &json!({"type": "HELLO", "data": {"user_id": id, "display_name": name}}),
            |v| v["type"] == "HELLO_ACK" || v["type"] == "ERROR",
        );
        assert_eq!(ack["type"], "HELLO_ACK", "HELLO of {id}: {ack}");
        peer.recv(|v| v["type"] == "PRESENCE");
        peer
    }

    /// Connects to `node` without saying HELLO.
    fn connect(node: &Node, id: &str) -> Self {
        Self {
            ws: Ws::open(&node.url("/ws"), &[]),
            id: id.to_owned(),
            presence: BTreeMap::new(),
        }
    }

    /// Reads until a frame satisfies `accept` (bounded by `crate::common::WAIT`), noting presence.
    fn try_recv(&mut self, mut accept: impl FnMut(&Value) -> bool) -> WsResult<Value> {
        let presence = &mut self.presence;
        self.ws
            .recv_until(|v| note_presence(presence, v), &mut accept)
    }

    /// [`Peer::try_recv`], panicking when nothing matching arrives.
    fn recv(&mut self, accept: impl FnMut(&Value) -> bool) -> Value {
        let id = self.id.clone();
        self.try_recv(accept)
            .unwrap_or_else(|e| panic!("{id}: no expected frame: {e}"))
    }

    fn send(&mut self, frame: &Value) {
        self.ws
            .send(frame)
            .unwrap_or_else(|e| panic!("{}: send {frame}: {e}", self.id));
    }

    /// Sends `frame`, then reads until a frame satisfies `accept`.
    fn ask(&mut self, frame: &Value, accept: impl FnMut(&Value) -> bool) -> Value {
        self.send(frame);
        self.recv(accept)
    }

    /// Every frame that arrives before the answer to a `PING` (so everything already sent to
    /// this socket by the time the node reads the `PING`, for frames the node itself sends).
    fn drain(&mut self) -> Vec<Value> {
        let mut frames = Vec::new();
        self.ask(&json!({"type": "PING"}), |v| {
            frames.push(v.clone());
            v["type"] == "PONG"
        });
        frames.pop();
        frames
    }

    /// Reads until the presence this socket has been told satisfies `holds`, for at most
    /// `within` (longer than one read's bound: a `PING` each round means a quiet socket still
    /// answers, so no read waits long); whether it did.
    fn await_presence(
        &mut self,
        within: Duration,
        holds: impl Fn(&BTreeMap<String, bool>) -> bool,
    ) -> bool {
        if holds(&self.presence) {
            return true;
        }
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            // Reading notes every PRESENCE frame.
            self.drain();
            if holds(&self.presence) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn open_chat(&mut self, target: &str) -> Value {
        let answer = self.ask(
            &json!({"type": "OPEN_CHAT", "data": {"target_user_id": target}}),
            |v| v["type"] == "CHAT_OPENED" || v["type"] == "ERROR",
        );
        assert_eq!(
            answer["type"], "CHAT_OPENED",
            "OPEN_CHAT to {target}: {answer}"
        );
        answer
    }

    /// Sends `MSG` with `message_id` and returns the answer about it (`MSG_ACK` or `ERROR`).
    fn msg(&mut self, to: &str, content: &str, message_id: &str) -> Value {
        let frame = json!({"type": "MSG", "data": {"to": to, "content": content, "message_id": message_id}});
        self.ask(&frame, |v| about(v, message_id))
    }

    /// [`Peer::msg`], expecting `MSG_ACK sent`.
    fn msg_sent(&mut self, to: &str, content: &str, message_id: &str) {
        let answer = self.msg(to, content, message_id);
        assert_eq!(
            answer,
            json!({"type": "MSG_ACK", "data": {"message_id": message_id, "status": "sent"}}),
            "{} MSG {message_id} to {to}",
            self.id
        );
    }
}

/// Whether `frame` is the answer to (or the delivered tick of) `message_id`: a `MSG_ACK` or an
/// `ERROR` naming it.
fn about(frame: &Value, message_id: &str) -> bool {
    (frame["type"] == "MSG_ACK" && frame["data"]["message_id"] == message_id)
        || (frame["type"] == "ERROR" && frame["data"]["details"]["message_id"] == message_id)
}

/// Merges a `PRESENCE` frame (full list or delta) into `presence`.
fn note_presence(presence: &mut BTreeMap<String, bool>, frame: &Value) {
    if frame["type"] != "PRESENCE" {
        return;
    }
    if frame["data"]["delta"] != true {
        presence.clear();
    }
    for user in frame["data"]["users"].as_array().into_iter().flatten() {
        let id = user["user_id"].as_str().unwrap_or_default().to_owned();
        if user["removed"] == true {
            presence.remove(&id);
        } else {
            presence.insert(id, user["online"] == true);
        }
    }
}

/// Waits (bounded) until `/readyz` of every node answers `status`, panicking otherwise.
fn await_readyz(nodes: &[Node], status: u16, within: Duration, when: &str) {
    let deadline = Instant::now() + within;
    for node in nodes {
        loop {
            let got = readyz(node.addr);
            if got == Some(status) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz of {} {when}: wanted {status} within {within:?}, got {got:?}",
                node.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Users say HELLO on nodes A, B and C: each socket's presence holds all three online, and a
/// fresh socket on any node gets the full list with all three. Then a chat opened on A with a
/// user on B (and one from B to C) carries `CHAT_OPENED`, `MSG`, `MSG_ACK sent` and
/// `delivered`, and `TYPING` across the nodes.
#[test]
fn presence_chats_messages_acks_and_typing_cross_three_nodes() {
    let rt = runtime();
    let Some(redis) = rt.block_on(RedisServer::start()) else {
        return;
    };
    let nodes = cluster(&redis, 3, &[]);
    let ids: Vec<String> = (1..=3).map(user_id).collect();
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    let names = ["Alice", "Bob", "Carol"];
    let mut peers: Vec<Peer> = (0..3)
        .map(|i| Peer::hello(&nodes[i], &ids[i], names[i]))
        .collect();

    // The earlier sockets learn of the later users from deltas published by the other nodes.
    for peer in &mut peers {
        let told = peer.await_presence(crate::common::WAIT, |p| {
            all.iter().all(|id| p.get(*id).copied() == Some(true))
        });
        assert!(told, "{} sees {:?}", peer.id, peer.presence);
    }
    for (i, node) in nodes.iter().enumerate() {
        let id = user_id(10 + i);
        let fresh = Peer::hello(node, &id, "Watcher");
        for user in &all {
            assert_eq!(
                fresh.presence.get(*user),
                Some(&true),
                "a socket on node {i} gets {user} in the full list: {:?}",
                fresh.presence
            );
        }
    }

    let (alice, rest) = peers.split_at_mut(1);
    let (alice, (bob, carol)) = (&mut alice[0], rest.split_at_mut(1));
    let (bob, carol) = (&mut bob[0], &mut carol[0]);

    // Alice (A) opens a chat with Bob (B): both sides hear of it, the same chat.
    let for_alice = alice.open_chat(&bob.id);
    let for_bob = bob.recv(|v| v["type"] == "CHAT_OPENED");
    assert_eq!(for_alice["data"]["chat_id"], for_bob["data"]["chat_id"]);
    assert_eq!(for_alice["data"]["target_display_name"], "Bob");
    assert_eq!(for_bob["data"]["target_user_id"], alice.id.as_str());
    assert_eq!(for_bob["data"]["target_display_name"], "Alice");

    // A message from A to B, its `sent` tick, B's ack and the `delivered` tick back on A.
    alice.msg_sent(&bob.id, "hello from node A", "a-to-b-1");
    let incoming = bob.recv(|v| v["type"] == "MSG");
    assert_eq!(incoming["data"]["from"], alice.id.as_str());
    assert_eq!(incoming["data"]["to"], bob.id.as_str());
    assert_eq!(incoming["data"]["content"], "hello from node A");
    assert_eq!(incoming["data"]["message_id"], "a-to-b-1");
    bob.send(&json!({"type": "MSG_ACK", "data": {"message_id": "a-to-b-1"}}));
    assert_eq!(
        alice.recv(|v| about(v, "a-to-b-1"))["data"],
        json!({"message_id": "a-to-b-1", "status": "delivered"})
    );

    // The target may answer without opening the chat itself.
    bob.msg_sent(&alice.id, "hello back from node B", "b-to-a-1");
    let reply = alice.recv(|v| v["type"] == "MSG");
    assert_eq!(reply["data"]["content"], "hello back from node B");

    // Typing crosses nodes both ways, to the chat's partner only.
    bob.send(&json!({"type": "TYPING", "data": {"is_typing": true}}));
    assert_eq!(
        alice.recv(|v| v["type"] == "TYPING")["data"],
        json!({"user_id": bob.id, "is_typing": true})
    );
    alice.send(&json!({"type": "TYPING", "data": {"is_typing": false}}));
    assert_eq!(
        bob.recv(|v| v["type"] == "TYPING")["data"],
        json!({"user_id": alice.id, "is_typing": false})
    );
    assert!(
        !carol
            .drain()
            .iter()
            .any(|v| v["type"] == "TYPING" || v["type"] == "MSG"),
        "Carol is in no chat"
    );

    // B to C: the third node too.
    bob.open_chat(&carol.id);
    carol.recv(|v| v["type"] == "CHAT_OPENED");
    bob.msg_sent(&carol.id, "hello from node B to C", "b-to-c-1");
    let incoming = carol.recv(|v| v["type"] == "MSG");
    assert_eq!(incoming["data"]["content"], "hello from node B to C");
    carol.send(&json!({"type": "MSG_ACK", "data": {"message_id": "b-to-c-1"}}));
    assert_eq!(
        bob.recv(|v| about(v, "b-to-c-1"))["data"]["status"],
        "delivered"
    );
}

/// Messages sent on node A to a user who is offline are queued; when the user says HELLO on
/// node C they arrive right after `HELLO_ACK` and `PRESENCE`, each once and in order, and their
/// acks reach the sender on A as `delivered`. A later HELLO on node B gets none of them again.
#[test]
fn offline_queue_is_delivered_once_in_order_on_another_node() {
    let rt = runtime();
    let Some(redis) = rt.block_on(RedisServer::start()) else {
        return;
    };
    let nodes = cluster(&redis, 3, &[]);
    let (sender_id, recipient_id) = (user_id(1), user_id(2));
    let mut sender = Peer::hello(&nodes[0], &sender_id, "Sender");
    // The recipient becomes known on node B, then goes away.
    drop(Peer::hello(&nodes[1], &recipient_id, "Recipient"));
    let offline = sender.await_presence(crate::common::WAIT, |p| {
        p.get(recipient_id.as_str()).copied() == Some(false)
    });
    assert!(
        offline,
        "the recipient never went offline: {:?}",
        sender.presence
    );

    sender.open_chat(&recipient_id);
    let sent: Vec<(String, String)> = (0..5)
        .map(|i| (format!("queued-{i}"), format!("queued message {i}")))
        .collect();
    for (id, content) in &sent {
        sender.msg_sent(&recipient_id, content, id);
    }

    let mut recipient = Peer::connect(&nodes[2], &recipient_id);
    recipient.send(
        &json!({"type": "HELLO", "data": {"user_id": recipient_id, "display_name": "Recipient"}}),
    );
    // HELLO_ACK, PRESENCE, then the queue (a PONG comes after all of them).
    let frames = recipient.drain();
    let kinds: Vec<&str> = frames
        .iter()
        .map(|v| v["type"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        kinds,
        ["HELLO_ACK", "PRESENCE", "MSG", "MSG", "MSG", "MSG", "MSG"],
        "{frames:?}"
    );
    let got: Vec<(String, String)> = frames[2..]
        .iter()
        .map(|m| {
            assert_eq!(m["data"]["from"], sender_id.as_str());
            assert_eq!(m["data"]["to"], recipient_id.as_str());
            let field = |f: &str| m["data"][f].as_str().unwrap().to_owned();
            (field("message_id"), field("content"))
        })
        .collect();
    assert_eq!(got, sent, "every queued message, once, in order");
    for (id, _) in &sent {
        recipient.send(&json!({"type": "MSG_ACK", "data": {"message_id": id}}));
        assert_eq!(
            sender.recv(|v| about(v, id))["data"],
            json!({"message_id": id, "status": "delivered"})
        );
    }

    // Delivered means gone from the queue: the next HELLO, on yet another node, gets none.
    drop(recipient);
    let offline = sender.await_presence(crate::common::WAIT, |p| {
        p.get(recipient_id.as_str()).copied() == Some(false)
    });
    assert!(offline, "the recipient never went offline again");
    let mut again = Peer::connect(&nodes[1], &recipient_id);
    again.send(
        &json!({"type": "HELLO", "data": {"user_id": recipient_id, "display_name": "Recipient"}}),
    );
    let frames = again.drain();
    assert!(
        !frames.iter().any(|v| v["type"] == "MSG"),
        "a queued message was delivered twice: {frames:?}"
    );
}

/// The per-user MSG limit is one budget across the cluster: one user's sockets on three nodes,
/// used in turn, are refused at the same count as one socket on one node. A `message_id`
/// retried on another node is answered as the retry it is (`MSG_ACK` with the current status)
/// and not delivered again; the same id from another sender, on a third node, is `VALIDATION`.
#[test]
fn rate_limits_and_message_ids_are_cluster_wide() {
    const LIMIT: usize = 6;
    let rt = runtime();
    let Some(redis) = rt.block_on(RedisServer::start()) else {
        return;
    };
    let limit = LIMIT.to_string();
    let nodes = cluster(&redis, 3, &["--fastchat-msg-rate-limit", &limit]);
    let (spread_id, single_id, recipient_id) = (user_id(1), user_id(2), user_id(3));
    let mut recipient = Peer::hello(&nodes[0], &recipient_id, "Recipient");
    let mut spread: Vec<Peer> = nodes
        .iter()
        .map(|node| Peer::hello(node, &spread_id, "Spread"))
        .collect();
    let mut single = Peer::hello(&nodes[1], &single_id, "Single");
    spread[0].open_chat(&recipient_id);
    single.open_chat(&recipient_id);

    // Sends until refused; returns how many were accepted, and the refusal.
    let until_refused = |send: &mut dyn FnMut(usize) -> Value| {
        for i in 0..LIMIT * 3 {
            let answer = send(i);
            if answer["type"] == "ERROR" {
                return (i, answer);
            }
            assert_eq!(answer["data"]["status"], "sent", "{answer}");
        }
        panic!("never refused")
    };
    let (on_one, refusal) =
        until_refused(&mut |i| single.msg(&recipient_id, "one node", &format!("single-{i}")));
    assert_eq!(on_one, LIMIT, "one node: {refusal}");
    assert_eq!(refusal["data"]["code"], "RATE_LIMITED", "{refusal}");
    let (spread_over, refusal) = until_refused(&mut |i| {
        spread[i % 3].msg(&recipient_id, "three nodes", &format!("spread-{i}"))
    });
    assert_eq!(spread_over, on_one, "three nodes: {refusal}");
    assert_eq!(refusal["data"]["code"], "RATE_LIMITED", "{refusal}");
    assert_eq!(refusal["data"]["details"]["limit"], LIMIT, "{refusal}");
    // Only what was accepted is delivered: everything, then nothing more before a message
    // sent after it all (one recipient's messages arrive in the order they were queued).
    let mut delivered = Vec::new();
    while delivered.len() < 2 * LIMIT {
        let incoming = recipient.recv(|v| v["type"] == "MSG");
        delivered.push(incoming["data"]["message_id"].as_str().unwrap().to_owned());
    }
    let mut expected: Vec<String> = (0..LIMIT).map(|i| format!("single-{i}")).collect();
    expected.extend((0..LIMIT).map(|i| format!("spread-{i}")));
    assert_eq!(delivered, expected);

    // De-duplication across nodes, on a fresh budget: a second cluster user pair.
    let (sender_id, other_id) = (user_id(4), user_id(5));
    let mut on_a = Peer::hello(&nodes[0], &sender_id, "Sender");
    let mut on_b = Peer::hello(&nodes[1], &sender_id, "Sender");
    let mut other = Peer::hello(&nodes[2], &other_id, "Other");
    on_a.open_chat(&recipient_id);
    other.open_chat(&recipient_id);
    on_a.msg_sent(&recipient_id, "once only", "dup-1");
    let first = recipient.recv(|v| v["type"] == "MSG");
    assert_eq!(first["data"]["message_id"], "dup-1");
    // The retry on node B: the same answer the protocol gives a duplicate on one node.
    on_b.msg_sent(&recipient_id, "once only", "dup-1");
    // Acked by the recipient: the retry now answers `delivered`, on yet another node.
    recipient.send(&json!({"type": "MSG_ACK", "data": {"message_id": "dup-1"}}));
    on_a.recv(|v| about(v, "dup-1") && v["data"]["status"] == "delivered");
    let mut on_c = Peer::hello(&nodes[2], &sender_id, "Sender");
    assert_eq!(
        on_c.msg(&recipient_id, "once only", "dup-1"),
        json!({"type": "MSG_ACK", "data": {"message_id": "dup-1", "status": "delivered"}})
    );
    // Another sender may not take the id, whichever node it is on.
    let taken = other.msg(&recipient_id, "not mine", "dup-1");
    assert_eq!(taken["data"]["code"], "VALIDATION", "{taken}");
    assert_eq!(taken["data"]["details"]["field"], "message_id", "{taken}");
    other.msg_sent(&recipient_id, "after the retries", "sentinel");
    let next = recipient.recv(|v| v["type"] == "MSG");
    assert_eq!(
        next["data"]["message_id"], "sentinel",
        "dup-1 was delivered again"
    );
}

/// SIGKILL of the node holding user X: the users on the other two nodes are told X went
/// offline (a `PRESENCE` delta) within 15 s, a fresh socket's full list says so too, messages
/// to X are queued for X's next HELLO (on a surviving node), and the survivors keep chatting.
#[test]
fn a_killed_nodes_users_leave_presence_and_the_rest_keeps_serving() {
    let rt = runtime();
    let Some(redis) = rt.block_on(RedisServer::start()) else {
        return;
    };
    let mut nodes = cluster(&redis, 3, &[]);
    let (alice_id, bob_id, x_id) = (user_id(1), user_id(2), user_id(3));
    let mut alice = Peer::hello(&nodes[0], &alice_id, "Alice");
    let mut bob = Peer::hello(&nodes[1], &bob_id, "Bob");
    let x = Peer::hello(&nodes[2], &x_id, "Xavier");
    for peer in [&mut alice, &mut bob] {
        let told = peer.await_presence(crate::common::WAIT, |p| {
            [&alice_id, &bob_id, &x_id]
                .iter()
                .all(|id| p.get(id.as_str()).copied() == Some(true))
        });
        assert!(told, "{} sees {:?}", peer.id, peer.presence);
    }
    alice.open_chat(&x_id);
    alice.open_chat(&bob_id);

    let doomed = nodes.pop().unwrap();
    let killed = Instant::now();
    doomed.kill();
    for peer in [&mut alice, &mut bob] {
        let left = killed.elapsed();
        let told = peer.await_presence(NODE_LOSS_BOUND.saturating_sub(left), |p| {
            p.get(x_id.as_str()).copied() == Some(false)
        });
        assert!(
            told,
            "{} was not told within {NODE_LOSS_BOUND:?} that X left: {:?}",
            peer.id, peer.presence
        );
    }
    let noticed = killed.elapsed();
    drop(x);
    for node in &nodes {
        let fresh = Peer::hello(node, &user_id(10), "Watcher");
        assert_eq!(
            fresh.presence.get(x_id.as_str()),
            Some(&false),
            "{:?}",
            fresh.presence
        );
        assert_eq!(fresh.presence.get(alice_id.as_str()), Some(&true));
        assert_eq!(fresh.presence.get(bob_id.as_str()), Some(&true));
    }

    // The survivors keep serving: a message between them, both ticks.
    alice.msg_sent(&bob_id, "still here", "survivor-1");
    assert_eq!(
        bob.recv(|v| v["type"] == "MSG")["data"]["content"],
        "still here"
    );
    bob.send(&json!({"type": "MSG_ACK", "data": {"message_id": "survivor-1"}}));
    alice.recv(|v| about(v, "survivor-1") && v["data"]["status"] == "delivered");

    // X is offline for real, not just in the deltas: a message to X waits for X's next HELLO.
    alice.msg_sent(&x_id, "for when you are back", "to-x-1");
    let mut back = Peer::connect(&nodes[1], &x_id);
    back.send(&json!({"type": "HELLO", "data": {"user_id": x_id, "display_name": "Xavier"}}));
    let queued: Vec<Value> = back
        .drain()
        .into_iter()
        .filter(|v| v["type"] == "MSG")
        .collect();
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert_eq!(queued[0]["data"]["message_id"], "to-x-1");
    eprintln!("X left presence {noticed:?} after the kill");
}

/// Redis stops while users are connected: every request that needs it is answered with
/// `ERROR` (each with its documented code), `PING` still answers and `/readyz` is 503 on every
/// node. Once Redis is back (same data) every node is ready within 10 s, the refused `MSG`
/// retried with its `message_id` goes through, an ack refused during the outage counts when
/// repeated, and the messages acknowledged `sent` before the stop reach their offline
/// recipient, each once and in order.
#[test]
fn an_engine_outage_is_answered_and_recovered_from() {
    let rt = runtime();
    let Some(mut redis) = rt.block_on(RedisServer::start()) else {
        return;
    };
    let nodes = cluster(&redis, 3, &[]);
    let (alice_id, bob_id, rita_id) = (user_id(1), user_id(2), user_id(3));
    let mut alice = Peer::hello(&nodes[0], &alice_id, "Alice");
    let mut bob = Peer::hello(&nodes[1], &bob_id, "Bob");
    drop(Peer::hello(&nodes[2], &rita_id, "Rita"));
    let offline = alice.await_presence(crate::common::WAIT, |p| {
        p.get(rita_id.as_str()).copied() == Some(false)
    });
    assert!(offline, "Rita never went offline: {:?}", alice.presence);
    alice.open_chat(&bob_id);
    alice.open_chat(&rita_id);
    let queued: Vec<(String, String)> = (0..3)
        .map(|i| (format!("before-{i}"), format!("sent before the outage {i}")))
        .collect();
    for (id, content) in &queued {
        alice.msg_sent(&rita_id, content, id);
    }
    // Bob gets one message and holds his ack until Redis is gone.
    alice.msg_sent(&bob_id, "ack me later", "to-bob-1");
    assert_eq!(
        bob.recv(|v| v["type"] == "MSG")["data"]["message_id"],
        "to-bob-1"
    );

    rt.block_on(redis.stop());
    await_readyz(&nodes, 503, crate::common::WAIT, "with Redis stopped");

    // Every request that needs the engine is answered, on each node, with its failure code.
    let refused = alice.msg(&bob_id, "during the outage", "during-1");
    assert_eq!(refused["type"], "ERROR", "{refused}");
    assert_eq!(refused["data"]["code"], "MESSAGE_FAILED", "{refused}");
    assert_eq!(
        refused["data"]["details"]["to"],
        bob_id.as_str(),
        "{refused}"
    );
    bob.send(&json!({"type": "MSG_ACK", "data": {"message_id": "to-bob-1"}}));
    let refused = bob.recv(|v| v["type"] == "ERROR");
    assert_eq!(refused["data"]["code"], "MESSAGE_FAILED", "{refused}");
    assert_eq!(
        refused["data"]["details"]["message_id"], "to-bob-1",
        "{refused}"
    );
    let typing = bob.ask(
        &json!({"type": "TYPING", "data": {"is_typing": true}}),
        |v| v["type"] == "ERROR",
    );
    assert_eq!(typing["data"]["code"], "RATE_LIMITED", "{typing}");
    let open = bob.ask(
        &json!({"type": "OPEN_CHAT", "data": {"target_user_id": rita_id}}),
        |v| v["type"] == "ERROR" || v["type"] == "CHAT_OPENED",
    );
    assert_eq!(open["data"]["code"], "RATE_LIMITED", "{open}");
    let mut newcomer = Peer::connect(&nodes[2], &user_id(4));
    let hello = newcomer.ask(
        &json!({"type": "HELLO", "data": {"user_id": user_id(4), "display_name": "Newcomer"}}),
        |v| v["type"] == "ERROR" || v["type"] == "HELLO_ACK",
    );
    assert_eq!(hello["data"]["code"], "UNAUTHORIZED", "{hello}");
    // Nothing engine-free stops: the sockets stay open and PING answers on every node.
    for peer in [&mut alice, &mut bob, &mut newcomer] {
        peer.ask(&json!({"type": "PING"}), |v| v["type"] == "PONG");
    }
    assert!(
        !alice.drain().iter().any(|v| about(v, "to-bob-1")),
        "an ack refused for want of the engine still ticked"
    );

    let restarted = Instant::now();
    rt.block_on(redis.restart());
    await_readyz(&nodes, 200, RECOVERY_BOUND, "after Redis restarted");
    let ready = restarted.elapsed();

    // The refused message, retried with its id, goes through now, once.
    alice.msg_sent(&bob_id, "during the outage", "during-1");
    let incoming = bob.recv(|v| v["type"] == "MSG");
    assert_eq!(incoming["data"]["message_id"], "during-1");
    // The refused ack, repeated, ticks now.
    bob.send(&json!({"type": "MSG_ACK", "data": {"message_id": "to-bob-1"}}));
    alice.recv(|v| about(v, "to-bob-1") && v["data"]["status"] == "delivered");
    bob.msg_sent(&alice_id, "and back", "after-1");
    assert_eq!(
        alice.recv(|v| v["type"] == "MSG")["data"]["message_id"],
        "after-1"
    );
    // The newcomer refused during the outage may say HELLO now.
    let hello = newcomer.ask(
        &json!({"type": "HELLO", "data": {"user_id": user_id(4), "display_name": "Newcomer"}}),
        |v| v["type"] == "ERROR" || v["type"] == "HELLO_ACK",
    );
    assert_eq!(hello["type"], "HELLO_ACK", "{hello}");

    // What was acknowledged before the stop reaches Rita, on any node, once and in order.
    let mut rita = Peer::connect(&nodes[1], &rita_id);
    rita.send(&json!({"type": "HELLO", "data": {"user_id": rita_id, "display_name": "Rita"}}));
    let got: Vec<(String, String)> = rita
        .drain()
        .into_iter()
        .filter(|v| v["type"] == "MSG")
        .map(|m| {
            let field = |f: &str| m["data"][f].as_str().unwrap().to_owned();
            (field("message_id"), field("content"))
        })
        .collect();
    assert_eq!(got, queued, "Rita's queue after the outage");
    eprintln!("every node ready {ready:?} after Redis restarted");
}

/// A socket that closes while Redis is stopped cannot leave presence then; once Redis is back
/// its user goes offline for everyone (a `PRESENCE` delta, and the full list of a fresh socket)
/// without anything else happening on that node, so a message sent to them afterwards is
/// queued and delivered on their next HELLO instead of being acknowledged and lost.
#[test]
fn a_socket_closed_during_an_outage_leaves_presence_once_redis_is_back() {
    /// How long Redis stays stopped after the socket closed: longer than the engine's command
    /// timeout (2 s), so the node's attempt to leave presence surely falls into the outage.
    const HOLD: Duration = Duration::from_secs(3);
    let rt = runtime();
    let Some(mut redis) = rt.block_on(RedisServer::start()) else {
        return;
    };
    let nodes = cluster(&redis, 2, &[]);
    let (alice_id, carol_id) = (user_id(1), user_id(2));
    let mut alice = Peer::hello(&nodes[0], &alice_id, "Alice");
    let carol = Peer::hello(&nodes[1], &carol_id, "Carol");
    let online = alice.await_presence(crate::common::WAIT, |p| {
        p.get(carol_id.as_str()).copied() == Some(true)
    });
    assert!(online, "Carol never came online: {:?}", alice.presence);
    alice.open_chat(&carol_id);

    rt.block_on(redis.stop());
    await_readyz(&nodes, 503, crate::common::WAIT, "with Redis stopped");
    drop(carol);
    std::thread::sleep(HOLD);
    rt.block_on(redis.restart());
    await_readyz(&nodes, 200, RECOVERY_BOUND, "after Redis restarted");

    let offline = alice.await_presence(RECOVERY_BOUND, |p| {
        p.get(carol_id.as_str()).copied() == Some(false)
    });
    assert!(
        offline,
        "Carol, gone during the outage, is still online {RECOVERY_BOUND:?} after it: {:?}",
        alice.presence
    );
    let fresh = Peer::hello(&nodes[0], &user_id(3), "Watcher");
    assert_eq!(fresh.presence.get(carol_id.as_str()), Some(&false));

    alice.msg_sent(&carol_id, "while you were away", "to-carol-1");
    let mut back = Peer::connect(&nodes[0], &carol_id);
    back.send(&json!({"type": "HELLO", "data": {"user_id": carol_id, "display_name": "Carol"}}));
    let queued: Vec<Value> = back
        .drain()
        .into_iter()
        .filter(|v| v["type"] == "MSG")
        .collect();
    assert_eq!(
        queued.len(),
        1,
        "the message acknowledged `sent` was lost: {queued:?}"
    );
    assert_eq!(queued[0]["data"]["message_id"], "to-carol-1");
}
