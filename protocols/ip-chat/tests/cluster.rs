//! ip-chat across nodes: two servers sharing one in-process cluster engine form one room. One
//! order of messages everywhere, reactions and replays across nodes, one author id per address
//! and one rate limit per client, whichever node it talks to.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use std::time::Duration;

use serde_json::Value;
use switchboard_core::engine::{MemoryCluster, MemoryLimits, NodeId};
use switchboard_ip_chat::{Config, IpChat};
use switchboard_server::ServerConfig;
use switchboard_testkit::{Client, TestServer, json};

use common::{react, send};

/// Two nodes of one cluster, each serving its own `IpChat` value (as two processes would).
async fn two_nodes(config: Config) -> (MemoryCluster, TestServer, TestServer) {
    let (cluster, a, b, _) = two_nodes_with_b(config).await;
    (cluster, a, b)
}

/// [`two_nodes`], and node B's id.
async fn two_nodes_with_b(config: Config) -> (MemoryCluster, TestServer, TestServer, NodeId) {
    let cluster = MemoryCluster::new(MemoryLimits::default());
    let mut servers = Vec::new();
    let mut node = None;
    for _ in 0..2 {
        let engine = cluster.node();
        node = Some(engine.node());
        let server_config = ServerConfig {
            engine,
            ..ServerConfig::default()
        };
        servers.push(TestServer::start(IpChat::new(config.clone()), server_config).await);
    }
    let b = servers.pop().unwrap();
    let a = servers.pop().unwrap();
    (cluster, a, b, node.unwrap())
}

/// The next `n` `message` frames a client receives, as (id, text).
async fn messages(client: &mut Client, n: usize) -> Vec<(String, String)> {
    let mut seen = Vec::with_capacity(n);
    while seen.len() < n {
        let frame = client.recv_type("message").await;
        seen.push((
            frame["data"]["id"].as_str().unwrap().to_owned(),
            frame["data"]["text"].as_str().unwrap().to_owned(),
        ));
    }
    seen
}

#[tokio::test]
async fn messages_sent_on_both_nodes_reach_everyone_in_one_order_with_one_id() {
    let (_cluster, a, b) = two_nodes(Config {
        rate_limit: 0,
        ..Config::default()
    })
    .await;
    let mut watch_a = a.connect_from("/ws", [127, 0, 0, 1]).await;
    let mut watch_b = b.connect_from("/ws", [127, 0, 0, 2]).await;

    // Four senders, two per node, all at once.
    const EACH: usize = 25;
    let mut senders = Vec::new();
    for (n, server) in [&a, &b, &a, &b].into_iter().enumerate() {
        let mut client = server.connect_from("/ws", [127, 0, 1, n as u8 + 1]).await;
        senders.push(tokio::spawn(async move {
            for i in 0..EACH {
                send(&mut client, &format!("s{n} m{i}")).await;
            }
            // Every sender sees the whole room too, in the same order.
            messages(&mut client, 4 * EACH).await
        }));
    }
    let on_a = messages(&mut watch_a, 4 * EACH).await;
    let on_b = messages(&mut watch_b, 4 * EACH).await;
    assert_eq!(on_a, on_b, "one order, one id per message, on both nodes");
    for sender in senders {
        assert_eq!(sender.await.unwrap(), on_a);
    }
    // Each sender's messages keep their own order within the room's order.
    for n in 0..4 {
        let mine: Vec<&str> = on_a
            .iter()
            .map(|(_, text)| text.as_str())
            .filter(|text| text.starts_with(&format!("s{n} ")))
            .collect();
        let expected: Vec<String> = (0..EACH).map(|i| format!("s{n} m{i}")).collect();
        assert_eq!(mine, expected);
    }
    let mut ids: Vec<&str> = on_a.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 4 * EACH, "every message has its own id");

    // A client joining either node later replays the same history.
    let mut late_a = a.connect("/ws").await;
    let mut late_b = b.connect("/ws").await;
    assert_eq!(messages(&mut late_a, 4 * EACH).await, on_a);
    assert_eq!(messages(&mut late_b, 4 * EACH).await, on_a);
    late_b.expect_silence(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn a_reaction_on_one_node_reaches_the_other_and_late_joiners_replay_it() {
    let (_cluster, a, b) = two_nodes(Config::default()).await;
    let mut alice = a.connect_from("/ws", [127, 0, 0, 1]).await;
    let mut bob = b.connect_from("/ws", [127, 0, 0, 2]).await;
    send(&mut alice, "react to me").await;
    let message = alice.recv_type("message").await;
    assert_eq!(bob.recv_type("message").await, message);
    let id = message["data"]["id"].clone();

    react(&mut bob, &id, "👍").await;
    let update = alice.recv_type("reaction_updated").await;
    assert_eq!(bob.recv_type("reaction_updated").await, update);
    let bob_id = update["data"]["user_id"].clone();
    assert_eq!(update["data"]["action"], "added");
    assert_eq!(update["data"]["message_id"], id);
    assert_eq!(
        update["data"]["message"]["reactions"],
        json!({"👍": [bob_id]})
    );

    // Alice (on A) adds hers: the update carries both, everywhere.
    react(&mut alice, &id, "👍").await;
    let update = bob.recv_type("reaction_updated").await;
    assert_eq!(alice.recv_type("reaction_updated").await, update);
    let alice_id = message["data"]["author_id"].clone();
    assert_eq!(
        update["data"]["message"]["reactions"],
        json!({"👍": [bob_id, alice_id]})
    );

    // Late joiners on either node replay the message with its current reactions.
    for server in [&a, &b] {
        let mut late = server.connect_from("/ws", [127, 0, 0, 9]).await;
        let replayed = late.recv_type("message").await;
        assert_eq!(replayed["data"]["id"], id);
        assert_eq!(
            replayed["data"]["reactions"],
            json!({"👍": [bob_id, alice_id]})
        );
    }

    // Bob takes his back on B; A hears it, and so does a later replay.
    react(&mut bob, &id, "👍").await;
    let update = alice.recv_type("reaction_updated").await;
    assert_eq!(update["data"]["action"], "removed");
    assert_eq!(
        update["data"]["message"]["reactions"],
        json!({"👍": [alice_id]})
    );
    let mut late = a.connect("/ws").await;
    assert_eq!(
        late.recv_type("message").await["data"]["reactions"],
        json!({"👍": [alice_id]})
    );
}

/// Reactions toggled concurrently on both nodes leave every client, on both nodes, with the
/// final reactions (the last broadcast each client sees carries them), the same ones a replay
/// shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reactions_on_both_nodes_converge_everywhere() {
    let (_cluster, a, b) = two_nodes(Config::default()).await;
    let mut watch_a = a.connect_from("/ws", [127, 0, 0, 1]).await;
    let mut watch_b = b.connect_from("/ws", [127, 0, 0, 2]).await;
    send(&mut watch_a, "many hands").await;
    let id = watch_a.recv_type("message").await["data"]["id"].clone();
    watch_b.recv_type("message").await;

    // Eight users, four per node, each toggling three emoji on (and the first one off again).
    const USERS: u8 = 8;
    const TOGGLES: usize = 4;
    let total = usize::from(USERS) * TOGGLES;
    // Everyone is connected (and has the message) before anyone reacts.
    let mut clients = Vec::new();
    for n in 0..USERS {
        let server = if n % 2 == 0 { &a } else { &b };
        let mut client = server.connect_from("/ws", [127, 0, 2, n + 1]).await;
        client.recv_type("message").await;
        clients.push(client);
    }
    let mut reactors = Vec::new();
    for mut client in clients {
        let id = id.clone();
        reactors.push(tokio::spawn(async move {
            for emoji in ["👍", "🎉", "🔥", "👍"] {
                react(&mut client, &id, emoji).await;
            }
            // Every toggle succeeded: each reactor sees all of them broadcast, and no error.
            for _ in 0..total {
                let frame = client
                    .recv_until(|f| f["type"] == "reaction_updated" || f["type"] == "error")
                    .await;
                assert_eq!(frame["type"], "reaction_updated", "{frame}");
            }
        }));
    }
    for reactor in reactors {
        reactor.await.unwrap();
    }
    let mut last = Vec::new();
    for watcher in [&mut watch_a, &mut watch_b] {
        let mut final_reactions = Value::Null;
        for _ in 0..total {
            let update = watcher.recv_type("reaction_updated").await;
            final_reactions = update["data"]["message"]["reactions"].clone();
        }
        last.push(final_reactions);
    }
    assert_eq!(last[0], last[1], "both nodes end with the same reactions");
    let reactions = last[0].as_object().unwrap();
    assert!(!reactions.contains_key("👍"), "every 👍 was taken back");
    assert_eq!(
        reactions["🎉"].as_array().unwrap().len(),
        usize::from(USERS)
    );
    assert_eq!(
        reactions["🔥"].as_array().unwrap().len(),
        usize::from(USERS)
    );
    let mut late = b.connect("/ws").await;
    assert_eq!(
        late.recv_type("message").await["data"]["reactions"],
        last[0]
    );
}

#[tokio::test]
async fn one_address_has_one_author_id_on_every_node() {
    let (_cluster, a, b) = two_nodes(Config::default()).await;
    let mut ids = Vec::new();
    for (server, source, text) in [
        (&a, [127, 0, 0, 1], "from A"),
        (&b, [127, 0, 0, 1], "from B"),
        (&b, [127, 0, 0, 3], "other address"),
    ] {
        let mut client = server.connect_from("/ws", source).await;
        send(&mut client, text).await;
        let own = client.recv_until(|f| f["data"]["text"] == text).await;
        ids.push(own["data"]["author_id"].clone());
    }
    assert_eq!(ids[0], ids[1], "the same address on both nodes");
    assert_ne!(ids[0], ids[2]);
}

#[tokio::test]
async fn the_rate_limit_counts_a_clients_messages_on_every_node() {
    let (_cluster, a, b) = two_nodes(Config {
        rate_limit: 60,
        ..Config::default()
    })
    .await;
    let mut on_a = a.connect_from("/ws", [127, 0, 0, 1]).await;
    let mut on_b = b.connect_from("/ws", [127, 0, 0, 1]).await;
    let mut other = b.connect_from("/ws", [127, 0, 0, 2]).await;
    // 30 through each node: 60 in all, each delivered.
    for i in 0..30 {
        for (client, node) in [(&mut on_a, "a"), (&mut on_b, "b")] {
            let text = format!("{node}{i}");
            send(client, &text).await;
            client
                .recv_until(|f| f["type"] == "message" && f["data"]["text"] == text.as_str())
                .await;
        }
    }
    // The 61st is refused, whichever node it goes to.
    for client in [&mut on_a, &mut on_b] {
        send(client, "one too many").await;
        let error = client.recv_until(|f| f["type"] == "error").await;
        assert_eq!(
            error["data"]["error"],
            "Rate limit exceeded. Maximum 60 messages per minute."
        );
    }
    // Another address is not limited, and nobody saw the refused messages.
    send(&mut other, "not limited").await;
    let seen = other
        .recv_until(|f| f["type"] == "message" && f["data"]["text"] == "not limited")
        .await;
    assert_eq!(seen["data"]["text"], "not limited");
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(
            client.recv_type("message").await["data"]["text"],
            "not limited",
            "the refused messages were never broadcast"
        );
    }
}

/// ip-chat keeps no presence, so a node's death only ends its own sockets: the other node's
/// clients keep the room, its history and its reactions.
#[tokio::test]
async fn the_room_survives_a_node_dying() {
    let (cluster, a, b, node_b) = two_nodes_with_b(Config::default()).await;
    let mut alice = a.connect_from("/ws", [127, 0, 0, 1]).await;
    let mut bob = b.connect_from("/ws", [127, 0, 0, 2]).await;
    send(&mut bob, "from B").await;
    let id = alice.recv_type("message").await["data"]["id"].clone();
    bob.recv_type("message").await;
    cluster.kill(node_b);
    react(&mut alice, &id, "👍").await;
    assert_eq!(
        alice.recv_type("reaction_updated").await["data"]["message"]["text"],
        "from B"
    );
    send(&mut alice, "still here").await;
    assert_eq!(
        alice.recv_type("message").await["data"]["text"],
        "still here"
    );
    let mut late = a.connect("/ws").await;
    assert_eq!(late.recv_type("message").await["data"]["text"], "from B");
    assert_eq!(
        late.recv_type("message").await["data"]["text"],
        "still here"
    );
}
