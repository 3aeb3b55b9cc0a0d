//! fastchat across nodes: two servers sharing one in-process `MemoryCluster`, over real sockets.
//! Presence spans both nodes, chats, messages, acks and typing cross between them, queued
//! messages reach a user who comes back on the other node, a retried `message_id` is recognised
//! on either node, and a node that disappears takes its users offline on the other.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use std::time::Duration;

use common::*;
use switchboard_core::Engine;
use switchboard_core::engine::{MemoryCluster, MemoryLimits};
use switchboard_fastchat::{Config, FastChat};
use switchboard_server::ServerConfig;
use switchboard_testkit::{TestServer, json};

/// Two fastchat servers, nodes of one cluster; the engines are kept to name the nodes.
async fn two_nodes() -> (MemoryCluster, [(TestServer, Engine); 2]) {
    let cluster = MemoryCluster::new(MemoryLimits::default());
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let engine = cluster.node();
        let config = ServerConfig {
            engine: engine.clone(),
            ..ServerConfig::default()
        };
        let server = TestServer::start(FastChat::new(Config::default()), config).await;
        nodes.push((server, engine));
    }
    let [a, b]: [(TestServer, Engine); 2] = nodes.try_into().expect("two nodes");
    (cluster, [a, b])
}

#[tokio::test]
async fn presence_chats_messages_acks_and_typing_cross_nodes() {
    let (_cluster, [(a, _), (b, _)]) = two_nodes().await;
    let (alice_id, bob_id) = (new_id(), new_id());
    let (mut alice, _) = join(&a, &alice_id, "Alice").await;
    let (mut bob, presence) = join(&b, &bob_id, "Bob").await;

    // Bob, on node B, sees Alice of node A online; Alice hears of Bob as a delta.
    assert_eq!(
        presence["data"],
        json!({"users": [
            {"user_id": alice_id, "display_name": "Alice", "online": true},
            {"user_id": bob_id, "display_name": "Bob", "online": true},
        ]})
    );
    assert_eq!(
        alice.recv_type("PRESENCE").await["data"],
        json!({"users": [{"user_id": bob_id, "display_name": "Bob", "online": true}], "delta": true})
    );

    send(&mut alice, "OPEN_CHAT", json!({"target_user_id": bob_id})).await;
    let for_alice = alice.recv_type("CHAT_OPENED").await["data"].clone();
    let for_bob = bob.recv_type("CHAT_OPENED").await["data"].clone();
    assert_eq!(for_alice["chat_id"], for_bob["chat_id"]);
    assert_eq!(for_alice["target_display_name"], "Bob");
    assert_eq!(for_bob["target_display_name"], "Alice");

    msg(&mut alice, &bob_id, "hello from A", Some("x-1")).await;
    assert_eq!(
        alice.recv_type("MSG_ACK").await["data"],
        json!({"message_id": "x-1", "status": "sent"})
    );
    let incoming = bob.recv_type("MSG").await["data"].clone();
    assert_eq!(incoming["from"], alice_id.as_str());
    assert_eq!(incoming["content"], "hello from A");
    send(&mut bob, "MSG_ACK", json!({"message_id": "x-1"})).await;
    assert_eq!(
        alice.recv_type("MSG_ACK").await["data"],
        json!({"message_id": "x-1", "status": "delivered"})
    );

    // And back, with typing.
    send(&mut bob, "TYPING", json!({"is_typing": true})).await;
    assert_eq!(
        alice.recv_type("TYPING").await["data"],
        json!({"user_id": bob_id, "is_typing": true})
    );
    msg(&mut bob, &alice_id, "hello from B", Some("y-1")).await;
    bob.recv_type("MSG_ACK").await;
    assert_eq!(
        alice.recv_type("MSG").await["data"]["content"],
        "hello from B"
    );
    bob.expect_silence(QUIET).await;
    alice.expect_silence(Duration::ZERO).await;
}

#[tokio::test]
async fn queued_messages_reach_a_user_who_comes_back_on_the_other_node() {
    let (_cluster, [(a, _), (b, _)]) = two_nodes().await;
    let (alice_id, bob_id) = (new_id(), new_id());
    let (mut alice, _) = join(&a, &alice_id, "Alice").await;
    let (bob, _) = join(&a, &bob_id, "Bob").await;
    next(&mut alice, "PRESENCE").await;
    send(&mut alice, "OPEN_CHAT", json!({"target_user_id": bob_id})).await;
    next(&mut alice, "CHAT_OPENED").await;
    bob.close().await;
    assert_eq!(
        online(&next(&mut alice, "PRESENCE").await, &bob_id),
        Some(false)
    );

    for i in 0..3 {
        msg(
            &mut alice,
            &bob_id,
            &format!("queued {i}"),
            Some(&format!("q{i}")),
        )
        .await;
        assert_eq!(alice.recv_type("MSG_ACK").await["data"]["status"], "sent");
    }

    // Bob comes back on node B: the queue is his, wherever he connects.
    let (mut bob, presence) = join(&b, &bob_id, "Bob").await;
    assert_eq!(online(&presence, &bob_id), Some(true));
    for i in 0..3 {
        let queued = bob.recv_type("MSG").await["data"].clone();
        assert_eq!(queued["content"], format!("queued {i}"));
        send(
            &mut bob,
            "MSG_ACK",
            json!({"message_id": queued["message_id"]}),
        )
        .await;
    }
    bob.expect_silence(QUIET).await;
    assert_eq!(
        online(&next(&mut alice, "PRESENCE").await, &bob_id),
        Some(true)
    );
    for i in 0..3 {
        assert_eq!(
            next(&mut alice, "MSG_ACK").await["data"],
            json!({"message_id": format!("q{i}"), "status": "delivered"})
        );
    }
    // Delivered once: another socket of Bob, on either node, gets nothing old.
    for server in [&a, &b] {
        let (mut again, _) = join(server, &bob_id, "Bob").await;
        again.expect_silence(QUIET).await;
    }
}

#[tokio::test]
async fn a_message_id_retried_on_the_other_node_is_delivered_once() {
    let (_cluster, [(a, _), (b, _)]) = two_nodes().await;
    let (alice_id, bob_id) = (new_id(), new_id());
    let (mut alice_a, _) = join(&a, &alice_id, "Alice").await;
    let (mut alice_b, _) = join(&b, &alice_id, "Alice").await;
    let (mut bob, _) = join(&b, &bob_id, "Bob").await;
    send(&mut bob, "OPEN_CHAT", json!({"target_user_id": alice_id})).await;
    next(&mut bob, "CHAT_OPENED").await;
    next(&mut alice_a, "CHAT_OPENED").await;
    next(&mut alice_b, "CHAT_OPENED").await;

    msg(&mut alice_a, &bob_id, "once", Some("retry-me")).await;
    assert_eq!(
        next(&mut alice_a, "MSG_ACK").await["data"],
        json!({"message_id": "retry-me", "status": "sent"})
    );
    assert_eq!(bob.recv_type("MSG").await["data"]["content"], "once");

    // The same id from Alice's socket on node B: the current status, nothing delivered again.
    msg(&mut alice_b, &bob_id, "once", Some("retry-me")).await;
    assert_eq!(
        next(&mut alice_b, "MSG_ACK").await["data"],
        json!({"message_id": "retry-me", "status": "sent"})
    );
    bob.expect_silence(QUIET).await;

    send(&mut bob, "MSG_ACK", json!({"message_id": "retry-me"})).await;
    for alice in [&mut alice_a, &mut alice_b] {
        assert_eq!(next(alice, "MSG_ACK").await["data"]["status"], "delivered");
    }
    msg(&mut alice_b, &bob_id, "once", Some("retry-me")).await;
    assert_eq!(
        next(&mut alice_b, "MSG_ACK").await["data"],
        json!({"message_id": "retry-me", "status": "delivered"})
    );
    // Another sender may not reuse the id, on any node.
    msg(&mut bob, &alice_id, "mine", Some("retry-me")).await;
    let error = next(&mut bob, "ERROR").await;
    assert_eq!(error["data"]["code"], "VALIDATION");
    assert_eq!(error["data"]["details"]["field"], "message_id");
    bob.expect_silence(QUIET).await;
}

#[tokio::test]
async fn a_killed_node_takes_its_users_offline_on_the_other() {
    let (cluster, [(a, _), (b, engine_b)]) = two_nodes().await;
    let (alice_id, bob_id, carol_id) = (new_id(), new_id(), new_id());
    let (mut alice, _) = join(&a, &alice_id, "Alice").await;
    let (_bob, _) = join(&b, &bob_id, "Bob").await;
    let (_bob2, _) = join(&b, &bob_id, "Bob").await;
    assert_eq!(
        online(&next(&mut alice, "PRESENCE").await, &bob_id),
        Some(true)
    );
    // Carol has a socket on each node: she stays online through B's loss.
    let (_carol_a, _) = join(&a, &carol_id, "Carol").await;
    assert_eq!(
        online(&next(&mut alice, "PRESENCE").await, &carol_id),
        Some(true)
    );
    let (_carol_b, _) = join(&b, &carol_id, "Carol").await;

    cluster.kill(engine_b.node());
    // Announced exactly as if Bob's last socket had closed: one delta, Bob offline.
    assert_eq!(
        alice.recv_type("PRESENCE").await["data"],
        json!({"users": [{"user_id": bob_id, "display_name": "Bob", "online": false}], "delta": true})
    );
    alice.expect_silence(QUIET).await;

    // A socket joining node A now sees Bob offline and Carol online.
    let (_dave, presence) = join(&a, &new_id(), "Dave").await;
    assert_eq!(online(&presence, &bob_id), Some(false));
    assert_eq!(online(&presence, &carol_id), Some(true));
    assert_eq!(online(&presence, &alice_id), Some(true));
}
