//! fastchat behaviour over real sockets: identity, presence, chats, messages and acks, offline
//! queueing, multi-socket users, typing, validation boundaries and rate limits.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use std::time::Duration;

use serde_json::Value;
use switchboard_fastchat::{Config, FastChat};
use switchboard_server::ServerConfig;
use switchboard_testkit::{Client, TestServer, json};
use uuid::Uuid;

use common::*;

async fn start(config: Config) -> TestServer {
    TestServer::start(FastChat::new(config), ServerConfig::default()).await
}

/// Alice and Bob online with a chat open between them; every setup frame consumed.
async fn pair(server: &TestServer) -> (Client, String, Client, String) {
    let (a, b) = (new_id(), new_id());
    let (mut alice, _) = join(server, &a, "Alice").await;
    let (mut bob, _) = join(server, &b, "Bob").await;
    next(&mut alice, "PRESENCE").await; // Bob's arrival
    open(&mut alice, &b).await;
    next(&mut bob, "CHAT_OPENED").await;
    (alice, a, bob, b)
}

#[tokio::test]
async fn hello_is_acked_and_presence_goes_to_everyone() {
    let server = start(Config::default()).await;
    let (a, b) = (new_id(), new_id());
    let (mut alice, presence) = join(&server, &a, "  <b>Alice</b> ").await;
    assert_eq!(
        presence["data"],
        json!({"users": [{"user_id": a, "display_name": "Alice", "online": true}]})
    );

    let (_bob, presence) = join(&server, &b, "Bob").await;
    let expected = json!({"users": [
        {"user_id": a, "display_name": "Alice", "online": true},
        {"user_id": b, "display_name": "Bob", "online": true},
    ]});
    assert_eq!(presence["data"], expected);
    // Everyone else hears only what changed (a delta), not the whole list again.
    assert_eq!(
        alice.recv_type("PRESENCE").await["data"],
        json!({"users": [{"user_id": b, "display_name": "Bob", "online": true}], "delta": true})
    );
}

#[tokio::test]
async fn upper_case_user_ids_are_the_same_user_in_canonical_form() {
    let server = start(Config::default()).await;
    let id = new_id();
    let mut client = server.connect("/ws").await;
    send(
        &mut client,
        "HELLO",
        json!({"user_id": id.to_uppercase(), "display_name": "Ann"}),
    )
    .await;
    assert_eq!(client.recv_type("HELLO_ACK").await["data"]["user_id"], id);
}

#[tokio::test]
async fn anything_but_hello_or_ping_before_hello_is_unauthorized() {
    let server = start(Config::default()).await;
    let mut client = server.connect("/ws").await;
    let other = new_id();
    for (kind, data) in [
        ("OPEN_CHAT", json!({"target_user_id": other})),
        ("MSG", json!({"to": other, "content": "hi"})),
        ("MSG", json!({})),
        ("MSG_ACK", json!({"message_id": "m"})),
        ("TYPING", json!({"is_typing": true})),
    ] {
        send(&mut client, kind, data).await;
        expect_error(&mut client, "UNAUTHORIZED").await;
    }
    send(&mut client, "PING", json!({})).await;
    client.recv_type("PONG").await;
    // An invalid HELLO does not identify the socket.
    send(
        &mut client,
        "HELLO",
        json!({"user_id": "nope", "display_name": "Ann"}),
    )
    .await;
    expect_error(&mut client, "VALIDATION").await;
    send(&mut client, "TYPING", json!({"is_typing": true})).await;
    expect_error(&mut client, "UNAUTHORIZED").await;
    // The socket is still open and HELLO works.
    send(
        &mut client,
        "HELLO",
        json!({"user_id": new_id(), "display_name": "Ann"}),
    )
    .await;
    client.recv_type("HELLO_ACK").await;
}

#[tokio::test]
async fn user_id_must_be_a_uuid_v4() {
    let server = start(Config::default()).await;
    let mut client = server.connect("/ws").await;
    for user_id in [
        json!("test-123"),
        json!("6ba7b810-9dad-11d1-80b4-00c04fd430c8"), // v1
        json!("886313e1-3b8a-5372-9b90-0c9aee199e5d"), // v5
        json!(""),
        json!(42),
        Value::Null,
    ] {
        send(
            &mut client,
            "HELLO",
            json!({"user_id": user_id, "display_name": "Ann"}),
        )
        .await;
        let error = expect_error(&mut client, "VALIDATION").await;
        assert_eq!(error["details"]["field"], "user_id", "{error}");
        assert!(
            error["message"].as_str().unwrap().contains("user_id"),
            "{error}"
        );
    }
}

#[tokio::test]
async fn display_name_boundaries_count_characters_after_trim_and_strip() {
    let server = start(Config::default()).await;
    let mut client = server.connect("/ws").await;
    for name in [
        "ab".to_owned(),
        "éé".to_owned(),
        "   ab   ".to_owned(),
        "<b>ab</b>".to_owned(),
        "<script>alert(1)</script>ab".to_owned(),
        "ü".repeat(51),
        "a".repeat(51),
    ] {
        send(
            &mut client,
            "HELLO",
            json!({"user_id": new_id(), "display_name": name}),
        )
        .await;
        let error = expect_error(&mut client, "VALIDATION").await;
        assert_eq!(error["details"]["field"], "display_name", "{name}: {error}");
    }
    send(&mut client, "HELLO", json!({"user_id": new_id()})).await;
    assert_eq!(
        expect_error(&mut client, "VALIDATION").await["details"]["field"],
        "display_name"
    );

    for name in [
        "abc".to_owned(),
        "éèà".to_owned(),
        "ü".repeat(50),
        format!("  {}  ", "🦀".repeat(50)),
    ] {
        let id = new_id();
        let (_client, presence) = join(&server, &id, &name).await;
        let users = presence["data"]["users"].as_array().unwrap();
        let me = users.iter().find(|u| u["user_id"] == id.as_str()).unwrap();
        assert_eq!(me["display_name"], name.trim());
    }
}

#[tokio::test]
async fn content_boundaries_count_characters_not_bytes() {
    let server = start(Config::default()).await;
    let (mut alice, _a, mut bob, b) = pair(&server).await;

    let exactly = "é".repeat(1000);
    msg(&mut alice, &b, &exactly, Some("max")).await;
    assert_eq!(alice.recv_type("MSG_ACK").await["data"]["status"], "sent");
    assert_eq!(
        bob.recv_type("MSG").await["data"]["content"],
        exactly.as_str()
    );

    let four_byte = "🦀".repeat(1000);
    msg(&mut alice, &b, &four_byte, None).await;
    alice.recv_type("MSG_ACK").await;
    assert_eq!(
        bob.recv_type("MSG").await["data"]["content"],
        four_byte.as_str()
    );

    for content in [
        "é".repeat(1001),
        "a".repeat(1001),
        String::new(),
        "   ".into(),
        "<b></b>".into(),
    ] {
        msg(&mut alice, &b, &content, Some("too-long")).await;
        let error = expect_error(&mut alice, "VALIDATION").await;
        assert_eq!(error["details"]["field"], "content");
        assert_eq!(error["details"]["message_id"], "too-long");
    }
    msg(&mut alice, &b, "x", None).await;
    alice.recv_type("MSG_ACK").await;
    assert_eq!(bob.recv_type("MSG").await["data"]["content"], "x");
}

#[tokio::test]
async fn tags_are_stripped_from_content() {
    let server = start(Config::default()).await;
    let (mut alice, _a, mut bob, b) = pair(&server).await;
    msg(
        &mut alice,
        &b,
        "<script>alert('x')</script>hi <b>there</b> & 1 < 2",
        None,
    )
    .await;
    alice.recv_type("MSG_ACK").await;
    assert_eq!(
        bob.recv_type("MSG").await["data"]["content"],
        "hi there & 1 < 2"
    );
    // 1000 characters of text wrapped in tags is within the limit.
    msg(
        &mut alice,
        &b,
        &format!("<i>{}</i>", "a".repeat(1000)),
        None,
    )
    .await;
    alice.recv_type("MSG_ACK").await;
    bob.recv_type("MSG").await;
}

#[tokio::test]
async fn other_fields_are_validated_and_the_socket_stays_open() {
    let server = start(Config::default()).await;
    let (mut alice, _a, _bob, b) = pair(&server).await;
    let cases = [
        ("OPEN_CHAT", json!({}), "target_user_id"),
        (
            "OPEN_CHAT",
            json!({"target_user_id": "abc"}),
            "target_user_id",
        ),
        ("MSG", json!({"content": "hi"}), "to"),
        ("MSG", json!({"to": "abc", "content": "hi"}), "to"),
        ("MSG", json!({"to": b, "content": 5}), "content"),
        (
            "MSG",
            json!({"to": b, "content": "hi", "message_id": 5}),
            "message_id",
        ),
        (
            "MSG",
            json!({"to": b, "content": "hi", "message_id": ""}),
            "message_id",
        ),
        (
            "MSG",
            json!({"to": b, "content": "hi", "message_id": "x".repeat(129)}),
            "message_id",
        ),
        ("MSG_ACK", json!({}), "message_id"),
        ("TYPING", json!({}), "is_typing"),
        ("TYPING", json!({"is_typing": "yes"}), "is_typing"),
    ];
    for (kind, data, field) in cases {
        send(&mut alice, kind, data.clone()).await;
        let error = expect_error(&mut alice, "VALIDATION").await;
        assert_eq!(error["details"]["field"], field, "{kind} {data}: {error}");
        assert!(
            error["message"].as_str().unwrap().contains(field),
            "{error}"
        );
    }
    send(&mut alice, "PING", json!({})).await;
    alice.recv_type("PONG").await;
}

#[tokio::test]
async fn unknown_types_and_malformed_json_are_validation_errors() {
    let server = start(Config::default()).await;
    let mut client = server.connect("/ws").await;
    for text in [
        "not json",
        "{\"type\":",
        "[1,2]",
        "42",
        r#"{"data":{}}"#,
        r#"{"type":7}"#,
        r#"{"type":"SHOUT","data":{}}"#,
        r#"{"type":"hello","data":{}}"#,
        r#"{"type":"PING","data":"x"}"#,
    ] {
        client.send_text(text).await;
        expect_error(&mut client, "VALIDATION").await;
    }
    client.send_text(r#"{"type":"SHOUT"}"#).await;
    let error = expect_error(&mut client, "VALIDATION").await;
    assert_eq!(error["details"]["field"], "type");
    assert!(error["message"].as_str().unwrap().contains("SHOUT"));
    // Still open, still served.
    send(
        &mut client,
        "HELLO",
        json!({"user_id": new_id(), "display_name": "Ann"}),
    )
    .await;
    client.recv_type("HELLO_ACK").await;
}

#[tokio::test]
async fn ping_gets_pong_with_a_utc_timestamp() {
    let server = start(Config::default()).await;
    let mut client = server.connect("/ws").await;
    client.send_text(r#"{"type":"PING"}"#).await;
    let pong = client.recv_type("PONG").await;
    let timestamp = pong["data"]["timestamp"].as_str().unwrap();
    assert!(timestamp.ends_with('Z'), "{timestamp}");
    chrono::DateTime::parse_from_rfc3339(timestamp).unwrap();
}

#[tokio::test]
async fn open_chat_needs_a_known_target_and_the_chat_id_is_shared() {
    let server = start(Config::default()).await;
    let (a, b) = (new_id(), new_id());
    let (mut alice, _) = join(&server, &a, "Alice").await;

    send(&mut alice, "OPEN_CHAT", json!({"target_user_id": b})).await;
    let error = expect_error(&mut alice, "USER_NOT_FOUND").await;
    assert_eq!(error["details"]["target_user_id"], b);
    send(&mut alice, "OPEN_CHAT", json!({"target_user_id": a})).await;
    assert_eq!(
        expect_error(&mut alice, "VALIDATION").await["details"]["field"],
        "target_user_id"
    );

    let (mut bob, _) = join(&server, &b, "Bob").await;
    next(&mut alice, "PRESENCE").await;
    let mut sorted = [a.clone(), b.clone()];
    sorted.sort();

    let for_alice = open(&mut alice, &b).await["data"].clone();
    let for_bob = bob.recv_type("CHAT_OPENED").await["data"].clone();
    assert_eq!(for_alice["participants"], json!(sorted));
    assert_eq!(for_alice["target_user_id"], b);
    assert_eq!(for_alice["target_display_name"], "Bob");
    assert_eq!(for_bob["chat_id"], for_alice["chat_id"]);
    assert_eq!(for_bob["participants"], json!(sorted));
    assert_eq!(for_bob["target_user_id"], a);
    assert_eq!(for_bob["target_display_name"], "Alice");

    // Opening from the other side (or again) gives the same id.
    let again = open(&mut bob, &a).await;
    assert_eq!(again["data"]["chat_id"], for_alice["chat_id"]);
    assert_eq!(again["data"]["target_user_id"], a);
    // The chat was already open: Alice is not notified again.
    alice.expect_silence(QUIET).await;
}

#[tokio::test]
async fn a_chat_with_an_offline_known_user_can_be_opened() {
    let server = start(Config::default()).await;
    let (a, b) = (new_id(), new_id());
    let (bob, _) = join(&server, &b, "Bob").await;
    bob.close().await;
    let (mut alice, _) = join(&server, &a, "Alice").await;
    let opened = open(&mut alice, &b).await;
    assert_eq!(opened["data"]["target_display_name"], "Bob");
}

#[tokio::test]
async fn msg_needs_an_open_chat_but_either_side_may_open_it() {
    let server = start(Config::default()).await;
    let (a, b, c) = (new_id(), new_id(), new_id());
    let (mut alice, _) = join(&server, &a, "Alice").await;
    let (mut bob, _) = join(&server, &b, "Bob").await;
    next(&mut alice, "PRESENCE").await;

    msg(&mut alice, &b, "too early", Some("early")).await;
    let error = expect_error(&mut alice, "CHAT_NOT_OPENED").await;
    assert_eq!(error["details"]["message_id"], "early");
    msg(&mut alice, &c, "nobody", None).await;
    expect_error(&mut alice, "USER_NOT_FOUND").await;
    msg(&mut alice, &a, "myself", None).await;
    expect_error(&mut alice, "CHAT_NOT_OPENED").await;

    open(&mut alice, &b).await;
    next(&mut bob, "CHAT_OPENED").await;
    // Bob never sent OPEN_CHAT, yet may write.
    msg(&mut bob, &a, "hi Alice", None).await;
    assert_eq!(bob.recv_type("MSG_ACK").await["data"]["status"], "sent");
    let received = next(&mut alice, "MSG").await;
    assert_eq!(received["data"]["content"], "hi Alice");
    // The retried early message is accepted now (it was never recorded).
    msg(&mut alice, &b, "now", Some("early")).await;
    alice.recv_type("MSG_ACK").await;
    assert_eq!(bob.recv_type("MSG").await["data"]["content"], "now");
}

#[tokio::test]
async fn messages_are_acked_sent_then_delivered() {
    let server = start(Config::default()).await;
    let (mut alice, a, mut bob, b) = pair(&server).await;

    msg(&mut alice, &b, "hello", Some("m-1")).await;
    let sent = alice.recv_type("MSG_ACK").await;
    assert_eq!(sent["data"], json!({"message_id": "m-1", "status": "sent"}));
    let incoming = bob.recv_type("MSG").await["data"].clone();
    assert_eq!(incoming["from"], a);
    assert_eq!(incoming["to"], b);
    assert_eq!(incoming["content"], "hello");
    assert_eq!(incoming["message_id"], "m-1");
    let timestamp = incoming["timestamp"].as_str().unwrap();
    assert!(timestamp.ends_with('Z'));
    chrono::DateTime::parse_from_rfc3339(timestamp).unwrap();
    alice.expect_silence(QUIET).await;

    send(&mut bob, "MSG_ACK", json!({"message_id": "m-1"})).await;
    let delivered = alice.recv_type("MSG_ACK").await;
    assert_eq!(
        delivered["data"],
        json!({"message_id": "m-1", "status": "delivered"})
    );
    // A repeated ack, or an ack by someone else, changes nothing.
    send(&mut bob, "MSG_ACK", json!({"message_id": "m-1"})).await;
    send(&mut alice, "MSG_ACK", json!({"message_id": "m-1"})).await;
    send(&mut bob, "MSG_ACK", json!({"message_id": "unknown"})).await;
    alice.expect_silence(QUIET).await;
    bob.expect_silence(Duration::ZERO).await;

    // Without a client id the server makes a UUID.
    msg(&mut alice, &b, "no id", None).await;
    let sent = alice.recv_type("MSG_ACK").await;
    let id = sent["data"]["message_id"].as_str().unwrap().to_owned();
    assert_eq!(Uuid::parse_str(&id).unwrap().get_version_num(), 4);
    assert_eq!(
        bob.recv_type("MSG").await["data"]["message_id"],
        id.as_str()
    );
    send(&mut bob, "MSG_ACK", json!({"message_id": id})).await;
    assert_eq!(
        alice.recv_type("MSG_ACK").await["data"]["status"],
        "delivered"
    );
}

#[tokio::test]
async fn a_retried_message_id_is_delivered_once() {
    let server = start(Config::default()).await;
    let (mut alice, _a, mut bob, b) = pair(&server).await;

    msg(&mut alice, &b, "once", Some("retry-me")).await;
    msg(&mut alice, &b, "once", Some("retry-me")).await;
    for _ in 0..2 {
        let ack = alice.recv_type("MSG_ACK").await;
        assert_eq!(
            ack["data"],
            json!({"message_id": "retry-me", "status": "sent"})
        );
    }
    bob.recv_type("MSG").await;
    bob.expect_silence(QUIET).await;

    send(&mut bob, "MSG_ACK", json!({"message_id": "retry-me"})).await;
    assert_eq!(
        alice.recv_type("MSG_ACK").await["data"]["status"],
        "delivered"
    );
    // A retry after delivery reports the current status and still delivers nothing.
    msg(&mut alice, &b, "once", Some("retry-me")).await;
    assert_eq!(
        alice.recv_type("MSG_ACK").await["data"],
        json!({"message_id": "retry-me", "status": "delivered"})
    );
    bob.expect_silence(QUIET).await;

    // Another sender may not reuse the id.
    msg(&mut bob, &_a, "mine", Some("retry-me")).await;
    assert_eq!(
        expect_error(&mut bob, "VALIDATION").await["details"]["field"],
        "message_id"
    );
}

#[tokio::test]
async fn messages_to_an_offline_user_wait_for_the_next_hello() {
    let server = start(Config::default()).await;
    let (mut alice, a, bob, b) = pair(&server).await;
    bob.close().await;
    let presence = next(&mut alice, "PRESENCE").await;
    assert_eq!(online(&presence, &b), Some(false));

    for i in 0..3 {
        msg(
            &mut alice,
            &b,
            &format!("queued {i}"),
            Some(&format!("q{i}")),
        )
        .await;
        assert_eq!(alice.recv_type("MSG_ACK").await["data"]["status"], "sent");
    }

    let (mut bob, presence) = join(&server, &b, "Bob").await;
    assert_eq!(online(&presence, &b), Some(true));
    for i in 0..3 {
        let queued = bob.recv_type("MSG").await["data"].clone();
        assert_eq!(queued["content"], format!("queued {i}"));
        assert_eq!(queued["from"], a);
        send(
            &mut bob,
            "MSG_ACK",
            json!({"message_id": queued["message_id"]}),
        )
        .await;
    }
    bob.expect_silence(QUIET).await;
    assert_eq!(online(&next(&mut alice, "PRESENCE").await, &b), Some(true));
    for i in 0..3 {
        let ack = next(&mut alice, "MSG_ACK").await;
        assert_eq!(
            ack["data"],
            json!({"message_id": format!("q{i}"), "status": "delivered"})
        );
    }

    // Delivered once: a second socket of Bob gets nothing old.
    let (mut bob2, _) = join(&server, &b, "Bob").await;
    bob2.expect_silence(QUIET).await;
}

#[tokio::test]
async fn the_offline_queue_is_bounded_and_refuses_rather_than_drops() {
    let config = Config {
        max_queued_per_user: 2,
        ..Config::default()
    };
    let server = start(config).await;
    let (mut alice, _a, bob, b) = pair(&server).await;
    bob.close().await;
    next(&mut alice, "PRESENCE").await;

    for id in ["k1", "k2"] {
        msg(&mut alice, &b, id, Some(id)).await;
        assert_eq!(alice.recv_type("MSG_ACK").await["data"]["status"], "sent");
    }
    msg(&mut alice, &b, "k3", Some("k3")).await;
    let error = expect_error(&mut alice, "MESSAGE_FAILED").await;
    assert_eq!(error["details"]["message_id"], "k3");

    let (mut bob, _) = join(&server, &b, "Bob").await;
    assert_eq!(bob.recv_type("MSG").await["data"]["content"], "k1");
    assert_eq!(bob.recv_type("MSG").await["data"]["content"], "k2");
    // The refused message can be retried once there is room, and is delivered live.
    next(&mut alice, "PRESENCE").await;
    msg(&mut alice, &b, "k3", Some("k3")).await;
    alice.recv_type("MSG_ACK").await;
    assert_eq!(bob.recv_type("MSG").await["data"]["content"], "k3");
}

#[tokio::test]
async fn every_socket_of_a_user_gets_their_events() {
    let server = start(Config::default()).await;
    let (a, b) = (new_id(), new_id());
    let (mut alice1, _) = join(&server, &a, "Alice").await;
    let (mut alice2, _) = join(&server, &a, "Alice").await;
    let (mut bob1, _) = join(&server, &b, "Bob").await;
    let (mut bob2, _) = join(&server, &b, "Bob").await;

    open(&mut alice1, &b).await;
    next(&mut alice2, "CHAT_OPENED").await;
    next(&mut bob1, "CHAT_OPENED").await;
    next(&mut bob2, "CHAT_OPENED").await;

    msg(&mut alice1, &b, "to both", Some("both")).await;
    alice1.recv_type("MSG_ACK").await;
    assert_eq!(bob1.recv_type("MSG").await["data"]["content"], "to both");
    assert_eq!(bob2.recv_type("MSG").await["data"]["content"], "to both");

    // Both of Bob's sockets ack; Alice's sockets each hear "delivered" exactly once.
    send(&mut bob1, "MSG_ACK", json!({"message_id": "both"})).await;
    send(&mut bob2, "MSG_ACK", json!({"message_id": "both"})).await;
    for alice in [&mut alice1, &mut alice2] {
        let ack = next(alice, "MSG_ACK").await;
        assert_eq!(ack["data"]["status"], "delivered");
        alice.expect_silence(QUIET).await;
    }

    // One of Bob's sockets leaving does not make him offline; the last one does.
    bob1.close().await;
    alice1.expect_silence(QUIET).await;
    bob2.close().await;
    let presence = next(&mut alice1, "PRESENCE").await;
    assert_eq!(online(&presence, &b), Some(false));
    assert_eq!(
        online(&next(&mut alice2, "PRESENCE").await, &b),
        Some(false)
    );
}

#[tokio::test]
async fn disconnecting_updates_presence_for_everyone_else() {
    let server = start(Config::default()).await;
    let (a, b, c) = (new_id(), new_id(), new_id());
    let (mut alice, _) = join(&server, &a, "Alice").await;
    let (bob, _) = join(&server, &b, "Bob").await;
    let (mut carol, _) = join(&server, &c, "Carol").await;
    next(&mut alice, "PRESENCE").await;
    next(&mut alice, "PRESENCE").await;

    drop(bob); // no close handshake: the server notices the TCP close
    for client in [&mut alice, &mut carol] {
        let presence = client.recv_type("PRESENCE").await;
        assert_eq!(
            presence["data"],
            json!({"users": [{"user_id": b, "display_name": "Bob", "online": false}], "delta": true})
        );
    }
}

#[tokio::test]
async fn a_second_hello_may_rename_but_not_switch_user() {
    let server = start(Config::default()).await;
    let (a, b) = (new_id(), new_id());
    let (mut alice, _) = join(&server, &a, "Alice").await;
    let (mut bob, _) = join(&server, &b, "Bob").await;
    next(&mut alice, "PRESENCE").await;

    send(
        &mut alice,
        "HELLO",
        json!({"user_id": b, "display_name": "Bob"}),
    )
    .await;
    assert_eq!(
        expect_error(&mut alice, "VALIDATION").await["details"]["field"],
        "user_id"
    );

    // Same user, new name: everyone hears the new list.
    send(
        &mut alice,
        "HELLO",
        json!({"user_id": a, "display_name": "Alicia"}),
    )
    .await;
    alice.recv_type("HELLO_ACK").await;
    let presence = alice.recv_type("PRESENCE").await;
    assert_eq!(presence["data"]["users"][0]["display_name"], "Alicia");
    assert_eq!(bob.recv_type("PRESENCE").await, presence);

    // Same user, same name: only this socket gets the (unchanged) list.
    send(
        &mut alice,
        "HELLO",
        json!({"user_id": a, "display_name": "Alicia"}),
    )
    .await;
    alice.recv_type("HELLO_ACK").await;
    alice.recv_type("PRESENCE").await;
    bob.expect_silence(QUIET).await;
}

#[tokio::test]
async fn typing_goes_to_open_chat_partners_only() {
    let server = start(Config::default()).await;
    let (mut alice, a, mut bob, _b) = pair(&server).await;
    let c = new_id();
    let (mut carol, _) = join(&server, &c, "Carol").await;
    next(&mut alice, "PRESENCE").await;
    next(&mut bob, "PRESENCE").await;

    send(&mut alice, "TYPING", json!({"is_typing": true})).await;
    assert_eq!(
        bob.recv_type("TYPING").await["data"],
        json!({"user_id": a, "is_typing": true})
    );
    send(&mut alice, "TYPING", json!({"is_typing": false})).await;
    assert_eq!(
        bob.recv_type("TYPING").await["data"],
        json!({"user_id": a, "is_typing": false})
    );
    carol.expect_silence(QUIET).await;
    alice.expect_silence(Duration::ZERO).await;

    // Carol has no open chats: her typing goes nowhere and is not an error.
    send(&mut carol, "TYPING", json!({"is_typing": true})).await;
    carol.expect_silence(QUIET).await;
    alice.expect_silence(Duration::ZERO).await;
    bob.expect_silence(Duration::ZERO).await;
}

#[tokio::test]
async fn more_than_60_messages_a_minute_are_rate_limited_per_user() {
    let server = start(Config::default()).await;
    let (mut alice, a, mut bob, b) = pair(&server).await;
    let (mut alice2, _) = join(&server, &a, "Alice").await;

    for i in 0..60 {
        msg(&mut alice, &b, &format!("m{i}"), None).await;
        alice.recv_type("MSG_ACK").await;
    }
    for i in 0..60 {
        assert_eq!(
            bob.recv_type("MSG").await["data"]["content"],
            format!("m{i}")
        );
    }
    msg(&mut alice, &b, "61st", Some("over")).await;
    let error = expect_error(&mut alice, "RATE_LIMITED").await;
    assert_eq!(error["details"]["limit"], 60);
    assert_eq!(error["details"]["message_id"], "over");
    // The limit is per user, not per socket.
    msg(&mut alice2, &b, "other socket", None).await;
    expect_error(&mut alice2, "RATE_LIMITED").await;
    bob.expect_silence(QUIET).await;
    // Bob has his own budget.
    msg(&mut bob, &a, "reply", None).await;
    bob.recv_type("MSG_ACK").await;
}

#[tokio::test]
async fn more_than_10_typing_indicators_a_minute_are_rate_limited() {
    let server = start(Config::default()).await;
    let (mut alice, _a, mut bob, _b) = pair(&server).await;
    for _ in 0..10 {
        send(&mut alice, "TYPING", json!({"is_typing": true})).await;
        bob.recv_type("TYPING").await;
    }
    send(&mut alice, "TYPING", json!({"is_typing": true})).await;
    let error = expect_error(&mut alice, "RATE_LIMITED").await;
    assert_eq!(error["details"]["limit"], 10);
    bob.expect_silence(QUIET).await;
    // Messages have their own budget.
    msg(&mut alice, &_b, "still fine", None).await;
    alice.recv_type("MSG_ACK").await;
}

#[tokio::test]
async fn the_rate_window_slides() {
    let window = Duration::from_secs(1);
    let config = Config {
        msg_rate_limit: 2,
        typing_rate_limit: 1,
        rate_window: window,
        ..Config::default()
    };
    let server = start(config).await;
    let (mut alice, _a, mut bob, b) = pair(&server).await;
    for _ in 0..2 {
        msg(&mut alice, &b, "x", None).await;
        alice.recv_type("MSG_ACK").await;
    }
    send(&mut alice, "TYPING", json!({"is_typing": true})).await;
    bob.recv_type("MSG").await;
    bob.recv_type("MSG").await;
    bob.recv_type("TYPING").await;
    msg(&mut alice, &b, "x", None).await;
    expect_error(&mut alice, "RATE_LIMITED").await;
    send(&mut alice, "TYPING", json!({"is_typing": true})).await;
    expect_error(&mut alice, "RATE_LIMITED").await;

    // Nothing to await here: the window has to pass.
    tokio::time::sleep(window + Duration::from_millis(50)).await;
    msg(&mut alice, &b, "again", None).await;
    alice.recv_type("MSG_ACK").await;
    send(&mut alice, "TYPING", json!({"is_typing": true})).await;
    assert_eq!(bob.recv_type("MSG").await["data"]["content"], "again");
    bob.recv_type("TYPING").await;
}

#[tokio::test]
async fn open_chats_per_user_are_bounded() {
    let config = Config {
        max_chats_per_user: 1,
        ..Config::default()
    };
    let server = start(config).await;
    let (mut alice, _a, _bob, _b) = pair(&server).await;
    let c = new_id();
    let (_carol, _) = join(&server, &c, "Carol").await;
    send(&mut alice, "OPEN_CHAT", json!({"target_user_id": c})).await;
    let error = next(&mut alice, "ERROR").await;
    assert_eq!(error["data"]["code"], "RATE_LIMITED");
    assert_eq!(error["data"]["details"]["limit"], 1);
}

#[tokio::test]
async fn a_full_user_table_forgets_the_longest_offline_user() {
    let config = Config {
        max_users: 2,
        ..Config::default()
    };
    let server = start(config).await;
    let (a, b, c, d) = (new_id(), new_id(), new_id(), new_id());
    let (alice, _) = join(&server, &a, "Alice").await;
    alice.close().await;
    let (mut bob, _) = join(&server, &b, "Bob").await;
    // Alice is offline and the table is full: Carol takes her place.
    let (mut carol, presence) = join(&server, &c, "Carol").await;
    let ids: Vec<&str> = presence["data"]["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [b.as_str(), c.as_str()]);
    next(&mut bob, "PRESENCE").await; // Carol's arrival
    send(&mut bob, "OPEN_CHAT", json!({"target_user_id": a})).await;
    expect_error(&mut bob, "USER_NOT_FOUND").await;

    // Everyone known is online: a new user is refused.
    let mut dave = server.connect("/ws").await;
    send(
        &mut dave,
        "HELLO",
        json!({"user_id": d, "display_name": "Dave"}),
    )
    .await;
    expect_error(&mut dave, "UNAUTHORIZED").await;
    carol.expect_silence(Duration::ZERO).await;
}

// ---------------------------------------------------------------------------------------------
// Signed identity over real sockets: the server verifies HS256 / RS256 tokens

mod signed_over_sockets {

    use switchboard_fastchat::{Config, FastChat};
    use switchboard_server::ServerConfig;
    use switchboard_testkit::jwt::{Keys, claims, refused_tokens};
    use switchboard_testkit::{Client, ConnectOptions, TestServer, json};

    use super::common::*;

    async fn start_signed(keys: &Keys) -> TestServer {
        let config = ServerConfig {
            auth: Some(keys.verifier()),
            ..ServerConfig::default()
        };
        TestServer::start(FastChat::new(Config::default()), config).await
    }

    async fn connect_as(server: &TestServer, keys: &Keys, sub: &str) -> Client {
        let token = keys.token(&claims(sub, 60));
        server.connect(&format!("/ws?token={token}")).await
    }

    async fn hello(client: &mut Client, id: &str, name: &str) {
        send(
            client,
            "HELLO",
            json!({"user_id": id, "display_name": name}),
        )
        .await;
    }

    #[tokio::test]
    async fn signed_tokens_let_a_socket_say_hello_only_as_the_subject() {
        for keys in [Keys::hs256(), Keys::rs256_shared()] {
            let server = start_signed(&keys).await;
            let (a, b) = (new_id(), new_id());
            // No token: the server's 401. A subject that is no user id: 403.
            let refused =
                Client::refused_status(&server.ws_url("/ws"), ConnectOptions::default()).await;
            assert_eq!(refused, 401);
            for (what, token) in refused_tokens(&keys, &a) {
                let url = server.ws_url(&format!("/ws?token={token}"));
                let refused = Client::refused_status(&url, ConnectOptions::default()).await;
                assert_eq!(refused, 401, "{what}");
            }
            let token = keys.token(&claims("alice", 60));
            let url = server.ws_url(&format!("/ws?token={token}"));
            assert_eq!(
                Client::refused_status(&url, ConnectOptions::default()).await,
                403
            );

            // Bob's token says HELLO as alice: UNAUTHORIZED, the socket stays open, and the
            // HELLO as bob that follows works.
            let mut bob = connect_as(&server, &keys, &b).await;
            hello(&mut bob, &a, "Alice").await;
            let refused = expect_error(&mut bob, "UNAUTHORIZED").await;
            assert_eq!(refused["details"]["field"], "user_id");
            hello(&mut bob, &b, "Bob").await;
            let ack = next(&mut bob, "HELLO_ACK").await;
            assert_eq!(ack["data"]["user_id"], b.as_str(), "{:?}", keys.algorithm());
            next(&mut bob, "PRESENCE").await;

            // Alice, with her own token, is herself; bob's message comes from bob.
            let mut alice = connect_as(&server, &keys, &a).await;
            hello(&mut alice, &a, "Alice").await;
            next(&mut alice, "HELLO_ACK").await;
            next(&mut alice, "PRESENCE").await;
            open(&mut bob, &a).await;
            msg(&mut bob, &a, "hi", Some("m-1")).await;
            let incoming = next(&mut alice, "MSG").await;
            assert_eq!(incoming["data"]["from"], b.as_str());
            assert_eq!(incoming["data"]["content"], "hi");
        }
    }
}
