//! reqack across nodes: two servers on one `MemoryCluster` (each its own node of one shared
//! in-memory engine), over real sockets. A user's sockets on both nodes get its events, acks and
//! retries count wherever they arrive, ids only grow across nodes, presence spans nodes, and a
//! node that disappears takes its users offline for everybody else.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;
use switchboard_core::Engine;
use switchboard_core::engine::{MemoryCluster, MemoryLimits};
use switchboard_reqack::{Config, ReqAck};
use switchboard_testkit::{TestServer, json};

const QUIET: Duration = Duration::from_millis(300);

/// One node: its protocol, its server and its engine handle.
struct Node {
    protocol: Arc<ReqAck>,
    server: TestServer,
    engine: Engine,
}

/// Two nodes of one fresh cluster.
async fn two_nodes(config: Config) -> (MemoryCluster, Node, Node) {
    let cluster = MemoryCluster::new(MemoryLimits::default());
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let engine = cluster.node();
        let (protocol, server) = start_on(config.clone(), engine.clone()).await;
        nodes.push(Node {
            protocol,
            server,
            engine,
        });
    }
    let b = nodes.pop().unwrap();
    let a = nodes.pop().unwrap();
    (cluster, a, b)
}

fn id(frame: &Value) -> u64 {
    frame["id"].as_u64().expect("numeric event id")
}

#[tokio::test]
async fn a_user_on_both_nodes_gets_each_event_on_both_and_an_ack_on_one_stops_redelivery() {
    let (_cluster, a, b) = two_nodes(fast_redelivery()).await;
    let mut alice = connect(&a.server, "alice").await;
    let mut bob_on_a = connect(&a.server, "bob").await;
    let mut bob_on_b = connect(&b.server, "bob").await;
    bob_on_a.sync().await;
    bob_on_b.sync().await;

    for i in 0..3 {
        alice
            .ok(
                &format!("m{i}"),
                "new",
                json!({"chatId": "bob", "message": format!("hi {i}")}),
            )
            .await;
    }
    let mut seen = Vec::new();
    for i in 0..3 {
        let on_a = bob_on_a.event("new").await;
        let on_b = bob_on_b.event("new").await;
        assert_eq!(
            on_a, on_b,
            "the same frame, with the same id, on both nodes"
        );
        assert_eq!(on_a["payload"]["message"], format!("hi {i}"));
        seen.push(on_b);
    }
    // Acked through node B: node A stops redelivering them.
    for frame in &seen {
        bob_on_b.ack(frame).await;
    }
    bob_on_b.sync().await;
    assert_eq!(a.protocol.pending_for("bob").await, 0);
    assert_eq!(b.protocol.pending_for("bob").await, 0);
    // Copies node A sent before the acks were processed arrived before this round trip.
    bob_on_a.sync().await;
    for frame in &seen {
        bob_on_a.discard_copies(frame);
        bob_on_b.discard_copies(frame);
    }
    bob_on_a.quiet(Duration::from_millis(700)).await;
    bob_on_b.quiet(QUIET).await;
}

#[tokio::test]
async fn a_user_who_reconnects_to_the_other_node_gets_its_unacked_events_with_the_same_ids() {
    let (_cluster, a, b) = two_nodes(Config::default()).await;
    let mut alice = connect(&a.server, "alice").await;
    for i in 0..3 {
        alice
            .ok(
                &format!("r{i}"),
                "new",
                json!({"chatId": "bob", "message": format!("m{i}")}),
            )
            .await;
    }
    let mut bob = connect(&a.server, "bob").await;
    let first = [
        bob.event("new").await,
        bob.event("new").await,
        bob.event("new").await,
    ];
    bob.ack(&first[1]).await;
    bob.sync().await;
    bob.close().await;

    let mut bob = connect(&b.server, "bob").await;
    let again = [bob.event("new").await, bob.event("new").await];
    assert_eq!(again[0], first[0], "same frame, same id, same timestamp");
    assert_eq!(again[1], first[2]);
    bob.ack(&again[0]).await;
    bob.ack(&again[1]).await;
    bob.sync().await;
    assert_eq!(a.protocol.pending_for("bob").await, 0);
    bob.close().await;
    // Everything acked: back on node A nothing comes again.
    let mut bob = connect(&a.server, "bob").await;
    bob.quiet(QUIET).await;
}

#[tokio::test]
async fn event_ids_only_grow_across_nodes() {
    let (_cluster, a, b) = two_nodes(Config::default()).await;
    let mut alice = connect(&a.server, "alice").await;
    let mut carol = connect(&b.server, "carol").await;
    let mut bob_on_a = connect(&a.server, "bob").await;
    let mut bob_on_b = connect(&b.server, "bob").await;
    bob_on_a.sync().await;
    bob_on_b.sync().await;
    let typing = json!({"type": "event", "eventType": "typing", "payload": {"chatId": "bob"}});
    for round in 0..4 {
        // Durable and ephemeral events for bob, caused on both nodes, interleaved.
        alice
            .ok(
                &format!("a{round}"),
                "new",
                json!({"chatId": "bob", "message": "from a"}),
            )
            .await;
        carol.send_json(&typing).await;
        carol
            .ok(
                &format!("c{round}"),
                "new",
                json!({"chatId": "bob", "message": "from b"}),
            )
            .await;
        alice.send_json(&typing).await;
        alice.sync().await;
        carol.sync().await;
    }
    let is_event = |v: &Value| v["type"] == "event" && v["eventType"] != "online";
    let mut ids_a = Vec::new();
    let mut ids_b = Vec::new();
    for _ in 0..16 {
        ids_a.push(id(&bob_on_a.wait_for(is_event).await));
        ids_b.push(id(&bob_on_b.wait_for(is_event).await));
    }
    assert!(ids_a.windows(2).all(|w| w[0] < w[1]), "{ids_a:?}");
    assert_eq!(
        ids_a, ids_b,
        "both nodes deliver the same ids in the same order"
    );
}

#[tokio::test]
async fn a_retried_request_on_the_other_node_gets_the_same_response() {
    let (_cluster, a, b) = two_nodes(Config::default()).await;
    let mut alice_a = connect(&a.server, "alice").await;
    let payload = json!({"chatId": "bob", "message": "once"});
    let first = alice_a.request("same", "new", payload.clone()).await;
    alice_a.close().await;
    let mut alice_b = connect(&b.server, "alice").await;
    let again = alice_b.request("same", "new", payload).await;
    assert_eq!(first, again, "identical frame, timestamp included");
    assert_eq!(b.protocol.pending_for("bob").await, 1);
    assert_eq!(a.protocol.stats().await.messages, 1);
    assert_eq!(b.protocol.stats().await.messages, 1);
}

#[tokio::test]
async fn messages_receipts_edits_and_calls_cross_nodes() {
    let (_cluster, a, b) = two_nodes(Config::default()).await;
    let mut alice = connect(&a.server, "alice").await;
    let mut bob = connect(&b.server, "bob").await;
    let mut carol = connect(&b.server, "carol").await;
    let sent = alice
        .ok("1", "new", json!({"chatId": "bob", "message": "helo"}))
        .await;
    let message_id = sent["messageId"].clone();
    bob.event_acked("new").await;
    // A receipt on B reaches the author on A; an edit on A reaches the recipient on B.
    bob.ok("1", "read", json!({"messageId": message_id})).await;
    let receipt = alice.event_acked("read").await;
    assert_eq!(receipt["payload"]["chatId"], "bob");
    alice
        .ok(
            "2",
            "edit",
            json!({"messageId": message_id, "message": "hello"}),
        )
        .await;
    let edit = bob.event_acked("edit").await;
    assert_eq!(edit["payload"]["message"], "hello");
    let page = bob.ok("h", "history", json!({"chatId": "alice"})).await;
    assert_eq!(page["messages"][0]["message"], "hello");
    assert_eq!(page["messages"][0]["receipt"], "read");

    // A call opened on A is closed on B; the caller on A hears of it.
    let call = alice
        .ok(
            "3",
            "newCall",
            json!({"participants": ["bob", "carol"], "callType": "video"}),
        )
        .await;
    assert_eq!(bob.event_acked("newCall").await["payload"], call);
    assert_eq!(carol.event_acked("newCall").await["payload"], call);
    assert_eq!(a.protocol.stats().await.open_calls, 1);
    let closed = carol
        .ok("1", "closeCall", json!({"callId": call["callId"]}))
        .await;
    assert_eq!(alice.event_acked("closeCall").await["payload"], closed);
    assert_eq!(bob.event_acked("closeCall").await["payload"], closed);
    assert_eq!(a.protocol.stats().await.open_calls, 0);
    let code = bob
        .fails("2", "closeCall", json!({"callId": call["callId"]}))
        .await;
    assert_eq!(code, "NOT_FOUND");
}

#[tokio::test]
async fn presence_spans_nodes() {
    let (_cluster, a, b) = two_nodes(Config::default()).await;
    let mut alice = connect(&a.server, "alice").await;
    alice.sync().await;
    let mut bob = connect(&b.server, "bob").await;
    let online = alice.event_acked("online").await;
    assert_eq!(online["payload"], json!({"userId": "bob"}));
    let roster = bob.event_acked("online").await;
    assert_eq!(roster["payload"], json!({"userId": "alice"}));
    assert_eq!(a.protocol.stats().await.online_users, 2);

    // A second socket of bob, on the other node, announces nothing; only the last close does.
    let bob_on_a = connect(&a.server, "bob").await;
    bob_on_a.close().await;
    bob.close().await;
    let offline = alice.next().await;
    assert_eq!(offline["eventType"], "offline", "{offline}");
    assert_eq!(offline["payload"], json!({"userId": "bob"}));
    alice.ack(&offline).await;
    let _carol = connect(&b.server, "carol").await;
    let next = alice.next().await;
    assert_eq!(next["eventType"], "online", "{next}");
    assert_eq!(next["payload"], json!({"userId": "carol"}));
}

#[tokio::test]
async fn killing_a_node_takes_its_users_offline_for_the_other_nodes() {
    let (cluster, a, b) = two_nodes(Config::default()).await;
    let mut alice = connect(&a.server, "alice").await;
    alice.sync().await;
    let mut bob = connect(&b.server, "bob").await;
    bob.sync().await;
    // dave has sockets on both nodes: losing one node does not make him offline.
    let mut dave_on_a = connect(&a.server, "dave").await;
    dave_on_a.sync().await;
    let mut dave_on_b = connect(&b.server, "dave").await;
    dave_on_b.sync().await;
    for user in ["bob", "dave"] {
        let online = alice
            .wait_for(|v| v["eventType"] == "online" && v["payload"]["userId"] == user)
            .await;
        alice.ack(&online).await;
    }

    cluster.kill(b.engine.node());
    let offline = alice.wait_for(|v| v["eventType"] == "offline").await;
    assert_eq!(offline["payload"], json!({"userId": "bob"}));
    assert_eq!(a.protocol.stats().await.online_users, 2, "alice and dave");
    alice.quiet(QUIET).await;
    // Node A keeps serving: alice still reaches dave.
    alice
        .ok(
            "1",
            "new",
            json!({"chatId": "dave", "message": "still here"}),
        )
        .await;
    assert_eq!(
        dave_on_a.event_acked("new").await["payload"]["message"],
        "still here"
    );
}
