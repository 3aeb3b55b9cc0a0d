//! ip-chat on a cluster of real processes: three `switchboard serve --protocol ip-chat` nodes
//! on one real redis-server form one room.
//!
//! - a message sent on any node reaches every client on every node with one `id`, and every
//!   client sees every message in one order (six senders on three nodes at once);
//! - a fresh client on any node replays the history in that order with current reactions, and
//!   reactions toggle cluster-wide;
//! - an address has one `author_id` on every node, also after every node was replaced;
//! - the 60-a-minute limit counts one address's messages on every node together;
//! - while Redis is down every node says 503 on `/readyz`, a send gets the protocol's error and
//!   a new socket that error and close 1013; after Redis comes back, every node is ready within
//!   10 s, the connected clients (their sockets stay open) keep chatting and the history
//!   acknowledged before is all there;
//! - when Redis drops the nodes' subscriber connections, messages sent right after still reach
//!   every node, in order, once; and when the nodes cannot subscribe again for a while (Redis
//!   refuses new connections), the messages sent meanwhile reach nobody on the other nodes live,
//!   every node says 503, and once they are subscribed again every client gets them from the
//!   log, in order, once.
//!
//! Clients connect from distinct loopback addresses (127.0.x.y), since ip-chat identifies users
//! by IP. The tests skip (loudly) where redis-server is not installed, unless
//! SWITCHBOARD_REQUIRE_REDIS=1.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use crate::common::{Node, WAIT, await_readyz_all, start_cluster};
use serde_json::Value;
use switchboard_testkit::redis::RedisServer;
use switchboard_testkit::{Client, ConnectOptions, json};
use tokio_tungstenite::tungstenite::Message;

/// How long a client must stay quiet to show that nothing more (a duplicate) is coming.
const QUIET: Duration = Duration::from_millis(500);

const UNAVAILABLE: &str = "server storage is unavailable, try again later";
const RATE_LIMITED: &str = "Rate limit exceeded. Maximum 60 messages per minute.";

/// Three ready ip-chat nodes on `redis`.
async fn three_nodes(redis: &RedisServer) -> Vec<Node> {
    start_cluster(&redis.url(), "ip-chat-test", "ip-chat", &[], 3).await
}

/// A WebSocket to `node`'s `/ws` from the loopback address `ip`.
async fn connect(node: &Node, ip: [u8; 4]) -> Client {
    let options = ConnectOptions {
        source_ip: Some(IpAddr::from(ip)),
        ..ConnectOptions::default()
    };
    Client::connect_with(&node.url("/ws"), options)
        .await
        .unwrap_or_else(|e| panic!("connect to {} from {ip:?}: {e}", node.addr))
}

async fn send(client: &mut Client, text: &str) {
    client
        .send_json(&json!({"type": "send_message", "data": {"text": text}}))
        .await;
}

async fn react(client: &mut Client, message_id: &Value, emoji: &str) {
    client
        .send_json(
            &json!({"type": "add_reaction", "data": {"message_id": message_id, "emoji": emoji}}),
        )
        .await;
}

/// The next frame, which must be a JSON text frame (each wait bounded by the testkit).
async fn next_frame(client: &mut Client) -> Value {
    client.recv_json().await
}

/// The `data` of the next `n` frames, each of which must be a `message`.
async fn messages(client: &mut Client, n: usize) -> Vec<Value> {
    let mut seen = Vec::with_capacity(n);
    while seen.len() < n {
        let frame = next_frame(client).await;
        assert_eq!(
            frame["type"],
            "message",
            "after {} messages: {frame}",
            seen.len()
        );
        seen.push(frame["data"].clone());
    }
    seen
}

fn ids(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Sends `text` and waits for its own broadcast (skipping others'), failing on an error frame.
async fn send_and_see(client: &mut Client, text: &str) -> Value {
    send(client, text).await;
    let frame = client
        .recv_until(|v| {
            v["type"] == "error" || (v["type"] == "message" && v["data"]["text"] == text)
        })
        .await;
    assert_eq!(frame["type"], "message", "{text:?} was refused: {frame}");
    frame["data"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_from_every_node_reach_every_client_in_one_order_with_one_id() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = three_nodes(&redis).await;
    const SENDERS_PER_NODE: usize = 2;
    const EACH: usize = 30;
    const TOTAL: usize = 3 * SENDERS_PER_NODE * EACH;

    // A watcher on every node, and two senders per node; all connected before anyone sends.
    let mut watchers = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        watchers.push(connect(node, [127, 0, 0, 10 + n as u8]).await);
    }
    let mut senders = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for s in 0..SENDERS_PER_NODE {
            let k = n * SENDERS_PER_NODE + s;
            senders.push((k, connect(node, [127, 0, 1, k as u8 + 1]).await));
        }
    }
    let runs: Vec<_> = senders
        .into_iter()
        .map(|(k, mut client)| {
            tokio::spawn(async move {
                for i in 0..EACH {
                    send(&mut client, &format!("s{k} m{i}")).await;
                }
                messages(&mut client, TOTAL).await
            })
        })
        .collect();
    let mut seen = Vec::new();
    for watcher in &mut watchers {
        seen.push(messages(watcher, TOTAL).await);
    }
    for run in runs {
        seen.push(run.await.unwrap());
    }

    // Every receiver (3 watchers, 6 senders, on 3 nodes) has the same messages, ids included,
    // in the same order.
    let order = seen[0].clone();
    for (r, other) in seen.iter().enumerate() {
        assert_eq!(ids(other), ids(&order), "receiver {r} saw another order");
        assert_eq!(other, &order, "receiver {r} saw other contents");
    }
    let unique: HashSet<String> = ids(&order).into_iter().collect();
    assert_eq!(unique.len(), TOTAL, "every message has its own id");
    // Each sender's messages keep their send order, under one author id of their own.
    let mut authors = HashSet::new();
    for k in 0..3 * SENDERS_PER_NODE {
        let mine: Vec<&Value> = order
            .iter()
            .filter(|m| m["text"].as_str().unwrap().starts_with(&format!("s{k} ")))
            .collect();
        let texts: Vec<&str> = mine.iter().map(|m| m["text"].as_str().unwrap()).collect();
        let expected: Vec<String> = (0..EACH).map(|i| format!("s{k} m{i}")).collect();
        assert_eq!(texts, expected, "sender {k}'s order");
        let author: HashSet<&str> = mine
            .iter()
            .map(|m| m["author_id"].as_str().unwrap())
            .collect();
        assert_eq!(author.len(), 1, "sender {k} has one author id");
        authors.extend(author);
    }
    assert_eq!(
        authors.len(),
        3 * SENDERS_PER_NODE,
        "one author id per address"
    );

    // A fresh client on any node replays the same history, then nothing more.
    for (n, node) in nodes.iter().enumerate() {
        let mut late = connect(node, [127, 0, 2, n as u8 + 1]).await;
        assert_eq!(
            messages(&mut late, TOTAL).await,
            order,
            "replay on node {n}"
        );
        late.expect_silence(QUIET).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reactions_toggle_cluster_wide_and_replays_carry_the_current_ones() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = three_nodes(&redis).await;
    const ALICE: [u8; 4] = [127, 0, 0, 1];
    let mut alice = connect(&nodes[0], ALICE).await;
    let mut bob = connect(&nodes[1], [127, 0, 0, 2]).await;
    let mut carol = connect(&nodes[2], [127, 0, 0, 3]).await;
    send(&mut alice, "react to me").await;
    let message = messages(&mut alice, 1).await.remove(0);
    for client in [&mut bob, &mut carol] {
        assert_eq!(messages(client, 1).await[0], message);
    }
    let id = message["id"].clone();
    let alice_id = message["author_id"].clone();

    // Alice reacts on A: B and C see it.
    react(&mut alice, &id, "👍").await;
    let update = next_frame(&mut alice).await;
    assert_eq!(update["type"], "reaction_updated", "{update}");
    assert_eq!(
        update["data"],
        json!({
            "message_id": id, "emoji": "👍", "user_id": alice_id, "action": "added",
            "message": {
                "id": id, "text": "react to me", "author_id": alice_id,
                "author_name": "Anonymous", "created_at": message["created_at"],
                "reactions": {"👍": [alice_id]},
            },
        })
    );
    for client in [&mut bob, &mut carol] {
        assert_eq!(next_frame(client).await, update);
    }

    // Bob adds another on B.
    react(&mut bob, &id, "🎉").await;
    let update = next_frame(&mut bob).await;
    let bob_id = update["data"]["user_id"].clone();
    assert_ne!(bob_id, alice_id);
    assert_eq!(
        update["data"]["message"]["reactions"],
        json!({"👍": [alice_id], "🎉": [bob_id]})
    );
    for client in [&mut alice, &mut carol] {
        assert_eq!(next_frame(client).await, update);
    }

    // Alice toggles hers off from a second socket on C (same address, same user).
    let mut alice_on_c = connect(&nodes[2], ALICE).await;
    let replayed = messages(&mut alice_on_c, 1).await.remove(0);
    assert_eq!(
        replayed["reactions"],
        json!({"👍": [alice_id], "🎉": [bob_id]})
    );
    react(&mut alice_on_c, &id, "👍").await;
    let update = next_frame(&mut alice_on_c).await;
    assert_eq!(update["data"]["action"], "removed", "{update}");
    assert_eq!(update["data"]["user_id"], alice_id);
    assert_eq!(
        update["data"]["message"]["reactions"],
        json!({"🎉": [bob_id]})
    );
    for client in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(next_frame(client).await, update);
    }

    // A fresh client on every node replays the message with the current reactions.
    for (n, node) in nodes.iter().enumerate() {
        let mut late = connect(node, [127, 0, 2, n as u8 + 1]).await;
        let replayed = messages(&mut late, 1).await.remove(0);
        assert_eq!(replayed["id"], id);
        assert_eq!(replayed["reactions"], json!({"🎉": [bob_id]}), "node {n}");
        late.expect_silence(QUIET).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_has_one_author_id_on_every_node_and_after_every_node_restarts() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    const X: [u8; 4] = [127, 0, 3, 1];
    const Y: [u8; 4] = [127, 0, 3, 2];
    let nodes = three_nodes(&redis).await;
    let mut before = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let mut x = connect(node, X).await;
        // Each new socket first replays what was sent before.
        messages(&mut x, before.len()).await;
        before.push(send_and_see(&mut x, &format!("x on node {n}")).await);
    }
    let mut y = connect(&nodes[1], Y).await;
    messages(&mut y, before.len()).await;
    before.push(send_and_see(&mut y, "y").await);
    let x_id = before[0]["author_id"].clone();
    for m in &before[..3] {
        assert_eq!(m["author_id"], x_id, "X's author id differs between nodes");
    }
    assert_ne!(before[3]["author_id"], x_id, "X and Y share an author id");

    // Every node dies; three new ones start on the same Redis.
    for node in nodes {
        node.kill();
    }
    let nodes = three_nodes(&redis).await;
    for (n, node) in nodes.iter().enumerate() {
        let mut x = connect(node, X).await;
        let replayed = messages(&mut x, before.len()).await;
        assert_eq!(
            &replayed[..4],
            &before[..4],
            "history after the restart, on new node {n}"
        );
        before.push(send_and_see(&mut x, &format!("x on new node {n}")).await);
        assert_eq!(
            before.last().unwrap()["author_id"],
            x_id,
            "X's author id on new node {n}"
        );
    }
    let mut y = connect(&nodes[2], Y).await;
    messages(&mut y, before.len()).await;
    assert_eq!(
        send_and_see(&mut y, "y again").await["author_id"],
        before[3]["author_id"],
        "Y's author id after the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_counts_one_address_on_every_node_together() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = three_nodes(&redis).await;
    const Z: [u8; 4] = [127, 0, 4, 1];
    let mut watcher = connect(&nodes[1], [127, 0, 4, 9]).await;
    let mut z = Vec::new();
    for node in &nodes {
        z.push(connect(node, Z).await);
    }
    // 60 messages spread over the three nodes (20 each, far inside each node's own allowance):
    // all accepted.
    for i in 0..60 {
        send_and_see(&mut z[i % 3], &format!("z {i}")).await;
    }
    // The 61st, on whichever node, is refused with the protocol's error, to the sender only.
    let last = &mut z[60 % 3];
    send(last, "z 60").await;
    let answer = last
        .recv_until(|v| v["type"] == "error" || v["data"]["text"] == "z 60")
        .await;
    assert_eq!(
        answer,
        json!({"type": "error", "data": {"error": RATE_LIMITED}})
    );
    // The limit is per address: another address on the same node still sends.
    let mut w = connect(&nodes[0], [127, 0, 4, 2]).await;
    messages(&mut w, 60).await;
    send_and_see(&mut w, "w").await;
    // The watcher saw Z's 60 and then W's: the refused one was never broadcast.
    let seen = messages(&mut watcher, 61).await;
    let texts: Vec<&str> = seen.iter().map(|m| m["text"].as_str().unwrap()).collect();
    let mut expected: Vec<String> = (0..60).map(|i| format!("z {i}")).collect();
    expected.push("w".into());
    assert_eq!(texts, expected);
    watcher.expect_silence(QUIET).await;
}

/// Reads the next frame within `wait`: `Ok(json)`, or `Err` describing a close or nothing.
async fn frame_within(client: &mut Client, wait: Duration) -> Result<Value, String> {
    match client.recv_within(wait).await {
        Some(Message::Text(text)) => Ok(serde_json::from_str(&text).unwrap()),
        Some(other) => Err(format!("not a text frame: {other:?}")),
        None => Err(format!("nothing within {wait:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_makes_nodes_unready_then_ready_and_keeps_the_history() {
    let Some(mut redis) = RedisServer::start().await else {
        return;
    };
    let nodes = three_nodes(&redis).await;
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
    let mut clients = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        clients.push(connect(node, [127, 0, 5, n as u8 + 1]).await);
    }
    // Five messages, acknowledged (broadcast back) to every client before Redis stops.
    for i in 0..5 {
        send(&mut clients[i % 3], &format!("before {i}")).await;
    }
    let acked = messages(&mut clients[0], 5).await;
    for client in &mut clients[1..] {
        assert_eq!(messages(client, 5).await, acked);
    }

    redis.stop().await;
    let took = await_readyz_all(&addrs, 503, WAIT).await;
    eprintln!("every node said 503 {took:?} after Redis stopped");
    // A send while Redis is down is answered with the protocol's error, never silence.
    for (n, client) in clients.iter_mut().enumerate() {
        send(client, &format!("during {n}")).await;
        let answer = frame_within(client, WAIT).await;
        assert_eq!(
            answer,
            Ok(json!({"type": "error", "data": {"error": UNAVAILABLE}})),
            "a send on node {n} while Redis is down"
        );
    }

    // A new socket cannot subscribe now: it is told so and closed with 1013 (try again later).
    let mut newcomer = connect(&nodes[1], [127, 0, 5, 9]).await;
    assert_eq!(
        frame_within(&mut newcomer, WAIT).await,
        Ok(json!({"type": "error", "data": {"error": UNAVAILABLE}}))
    );
    assert_eq!(u16::from(newcomer.expect_close().await.code), 1013);

    redis.restart().await;
    let took = await_readyz_all(&addrs, 200, Duration::from_secs(10)).await;
    eprintln!("every node said 200 {took:?} after Redis restarted");
    // The sockets stayed open through the outage: each client sends again, and every client
    // on every node gets each message.
    let mut after = Vec::new();
    for n in 0..3 {
        send(&mut clients[n], &format!("after {n}")).await;
        let mut seen = Vec::new();
        for client in &mut clients {
            seen.push(messages(client, 1).await.remove(0));
        }
        assert!(seen.iter().all(|m| m == &seen[0]), "{seen:?}");
        assert_eq!(seen[0]["text"], format!("after {n}"));
        after.push(seen.remove(0));
    }
    // History on every node: what was acknowledged before the stop, then the new messages;
    // nothing refused during the outage.
    let mut expected = acked.clone();
    expected.extend(after);
    for (n, node) in nodes.iter().enumerate() {
        let mut late = connect(node, [127, 0, 6, n as u8 + 1]).await;
        assert_eq!(
            messages(&mut late, 8).await,
            expected,
            "history on node {n}"
        );
        late.expect_silence(QUIET).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_right_after_the_subscribers_are_dropped_still_reach_every_node() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let redis = std::sync::Arc::new(redis);
    let nodes = three_nodes(&redis).await;
    let mut sender = connect(&nodes[0], [127, 0, 7, 1]).await;
    let mut watchers = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        watchers.push(connect(node, [127, 0, 7, 10 + n as u8]).await);
    }
    send_and_see(&mut sender, "baseline").await;
    for watcher in &mut watchers {
        messages(watcher, 1).await;
    }

    const ROUNDS: usize = 3;
    const BURST: usize = 15;
    for round in 0..ROUNDS {
        // The last round's kills leave the nodes reconnecting with backoff (up to a second),
        // and its messages can all arrive through the log before they are back: wait until
        // every node is subscribed again, so this round's first kill cuts all three.
        await_pubsub_clients(&redis, 3, round).await;
        let killed = redis.kill_pubsub().await;
        assert!(
            killed >= 3,
            "round {round}: {killed} subscriber connections"
        );
        // Dropped again (the nodes reconnect at once) while the burst is being sent.
        let again = {
            let redis = redis.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    redis.kill_pubsub().await;
                }
            })
        };
        // Straight away: some of these are published while a node is not subscribed.
        for i in 0..BURST {
            send(&mut sender, &format!("r{round} m{i}")).await;
            if i % 3 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        again.await.unwrap();
        let own = messages(&mut sender, BURST).await;
        let texts: Vec<String> = own
            .iter()
            .map(|m| m["text"].as_str().unwrap().to_owned())
            .collect();
        let expected: Vec<String> = (0..BURST).map(|i| format!("r{round} m{i}")).collect();
        assert_eq!(texts, expected, "round {round}: the sender's own view");
        for (n, watcher) in watchers.iter_mut().enumerate() {
            assert_eq!(
                messages(watcher, BURST).await,
                own,
                "round {round}: watcher on node {n}"
            );
        }
    }
    // No duplicates trailing behind, and the history holds each message once.
    for watcher in &mut watchers {
        watcher.expect_silence(QUIET).await;
    }
    let mut late = connect(&nodes[1], [127, 0, 7, 20]).await;
    let history = messages(&mut late, 1 + ROUNDS * BURST).await;
    assert_eq!(history[0]["text"], "baseline");
    late.expect_silence(QUIET).await;
}

/// Waits (bounded by [`WAIT`]) until Redis has at least `want` subscriber connections.
async fn await_pubsub_clients(redis: &RedisServer, want: usize, round: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let list = redis.cli(&["CLIENT", "LIST", "TYPE", "pubsub"]).await;
        let have = list.lines().filter(|line| !line.trim().is_empty()).count();
        if have >= want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "round {round}: {have} subscriber connections after {WAIT:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One connection to Redis kept open for the whole test, for commands that must get through
/// while Redis refuses new connections (the testkit's `cli` opens one per command).
struct Admin(std::net::TcpStream);

impl Admin {
    fn connect(port: u16) -> Self {
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        Self(stream)
    }

    /// Runs one command whose reply is a single line (`+OK`, `:n`, `-ERR ...`); returns it.
    fn run(&mut self, args: &[&str]) -> String {
        use std::io::{BufRead, Write};
        let mut command = format!("*{}\r\n", args.len());
        for arg in args {
            command.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        self.0.write_all(command.as_bytes()).unwrap();
        let mut reader = std::io::BufReader::new(&self.0);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        line.trim_end().to_owned()
    }
}

/// The nodes cannot resubscribe for a while (Redis refuses new connections) while messages are
/// sent through node A: nobody receives them live, every node says 503, and once the nodes are
/// subscribed again every client on every node gets them from the log, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_gap_is_filled_from_the_log_when_the_nodes_resubscribe() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = three_nodes(&redis).await;
    let addrs: Vec<_> = nodes.iter().map(|n| n.addr).collect();
    let mut sender = connect(&nodes[0], [127, 0, 8, 1]).await;
    let mut watchers = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        watchers.push(connect(node, [127, 0, 8, 10 + n as u8]).await);
    }
    let baseline = send_and_see(&mut sender, "baseline").await;
    for watcher in &mut watchers {
        assert_eq!(messages(watcher, 1).await[0], baseline);
    }

    let maxclients = redis.cli(&["CONFIG", "GET", "maxclients"]).await;
    let maxclients = maxclients.lines().nth(1).unwrap().to_owned();
    let mut admin = Admin::connect(redis.port());
    // Everyone connected now but the subscribers (and this listing's own connection) stays;
    // nobody new gets in.
    let list = redis.cli(&["CLIENT", "LIST"]).await;
    let connected = list.lines().count() - 1;
    let subscribers = list.lines().filter(|l| l.contains("flags=P")).count();
    assert!(subscribers >= 3, "{list}");
    let room = (connected - subscribers).to_string();
    assert_eq!(admin.run(&["CONFIG", "SET", "maxclients", &room]), "+OK");
    let killed = admin.run(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert_eq!(killed, format!(":{subscribers}"));

    const BURST: usize = 20;
    for i in 0..BURST {
        send(&mut sender, &format!("gap m{i}")).await;
    }
    // Stored, and published to no subscriber: no node says it is ready, and only node A (which
    // hands its own appends to its sockets itself) delivers them; B and C get nothing live.
    await_readyz_all(&addrs, 503, WAIT).await;
    let own = messages(&mut sender, BURST).await;
    assert_eq!(messages(&mut watchers[0], BURST).await, own);
    for watcher in &mut watchers[1..] {
        watcher.expect_silence(QUIET).await;
    }

    assert_eq!(
        admin.run(&["CONFIG", "SET", "maxclients", &maxclients]),
        "+OK"
    );
    let took = await_readyz_all(&addrs, 200, Duration::from_secs(10)).await;
    eprintln!("every node resubscribed and said 200 {took:?} after Redis let them in");
    let texts: Vec<String> = own
        .iter()
        .map(|m| m["text"].as_str().unwrap().to_owned())
        .collect();
    let expected: Vec<String> = (0..BURST).map(|i| format!("gap m{i}")).collect();
    assert_eq!(texts, expected);
    for (n, watcher) in watchers.iter_mut().enumerate().skip(1) {
        assert_eq!(messages(watcher, BURST).await, own, "watcher on node {n}");
    }
    // Nobody, node A's sockets included, gets any of them twice.
    sender.expect_silence(QUIET).await;
    for watcher in &mut watchers {
        watcher.expect_silence(QUIET).await;
    }
    // Live delivery works again.
    let after = send_and_see(&mut sender, "after").await;
    for watcher in &mut watchers {
        assert_eq!(messages(watcher, 1).await[0], after);
    }
}
