//! reqack over real sockets: every payload type, receipts, calls, typing, presence, history,
//! errors, and the delivery guarantees (outbox, acks, redelivery, idempotency, limits).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use std::time::Duration;

use common::*;
use switchboard_reqack::Config;
use switchboard_testkit::{Client, ConnectOptions, json};

const QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------------
// Connecting

#[tokio::test]
async fn a_missing_or_empty_user_id_is_refused_with_400() {
    let (_, server) = start(Config::default()).await;
    for path in ["/ws", "/ws?userId=", "/ws?other=1"] {
        let status = Client::refused_status(&server.ws_url(path), ConnectOptions::default()).await;
        assert_eq!(status, 400, "{path}");
    }
    let status = Client::refused_status(
        &server.ws_url("/elsewhere?userId=a"),
        ConnectOptions::default(),
    )
    .await;
    assert_eq!(status, 404);
    let long = "x".repeat(200);
    let status = Client::refused_status(
        &server.ws_url(&format!("/ws?userId={long}")),
        ConnectOptions::default(),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn too_many_sockets_for_one_user_get_503() {
    let (_, server) = start(Config {
        max_sockets_per_user: 2,
        ..Config::default()
    })
    .await;
    let _one = connect(&server, "alice").await;
    let mut two = connect(&server, "alice").await;
    two.sync().await;
    let status = Client::refused_status(
        &server.ws_url("/ws?userId=alice"),
        ConnectOptions::default(),
    )
    .await;
    assert_eq!(status, 503);
}

// ---------------------------------------------------------------------------------------------
// Messages

#[tokio::test]
async fn new_gets_a_message_id_and_the_partner_gets_an_event_with_a_numeric_id() {
    let (protocol, server) = start(Config::default()).await;
    let mut alice = connect(&server, "alice").await;
    let mut bob = connect(&server, "bob").await;

    let response = alice
        .request(
            "req001",
            "new",
            json!({"chatId": "bob", "message": "Hi from alice!", "clientMessageId": "c-1"}),
        )
        .await;
    assert_eq!(response["type"], "response");
    assert_eq!(response["id"], "req001");
    assert!(response["timestamp"].is_u64());
    let message_id = response["payload"]["messageId"].as_u64().unwrap();

    let frame = bob.event("new").await;
    assert!(frame["id"].is_u64(), "event ids are numbers: {frame}");
    assert!(frame["timestamp"].is_u64());
    let payload = &frame["payload"];
    assert_eq!(payload["messageId"], message_id);
    assert_eq!(payload["from"], "alice");
    assert_eq!(
        payload["chatId"], "alice",
        "chatId is the conversation as bob sees it"
    );
    assert_eq!(payload["message"], "Hi from alice!");
    assert_eq!(payload["clientMessageId"], "c-1");
    assert!(payload["timestamp"].is_u64());

    assert_eq!(protocol.pending_for("bob").await, 1);
    bob.ack(&frame).await;
    bob.sync().await;
    assert_eq!(protocol.pending_for("bob").await, 0);
}

#[tokio::test]
async fn delivered_and_read_receipts_reach_the_author() {
    let (_, server) = start(Config::default()).await;
    let mut alice = connect(&server, "alice").await;
    let mut bob = connect(&server, "bob").await;
    let sent = alice
        .ok("1", "new", json!({"chatId": "bob", "message": "hi"}))
        .await;
    let id = sent["messageId"].clone();
    bob.event_acked("new").await;

    let delivered = bob.ok("1", "dlvrd", json!({"messageId": id})).await;
    assert_eq!(delivered, "🫡");
    let receipt = alice.event_acked("dlvrd").await;
    assert_eq!(
        receipt["payload"],
        json!({"messageId": id, "chatId": "bob"})
    );

    let read = bob.ok("2", "read", json!({"messageId": id})).await;
    assert_eq!(read, "🫡");
    let receipt = alice.event_acked("read").await;
    assert_eq!(
        receipt["payload"],
        json!({"messageId": id, "chatId": "bob"})
    );

    // Receipts only advance: a repeated receipt is saluted but sends no event.
    assert_eq!(bob.ok("3", "dlvrd", json!({"messageId": id})).await, "🫡");
    alice.quiet(QUIET).await;

    // Only the recipient may send receipts, for messages that exist.
    assert_eq!(
        alice.fails("x", "read", json!({"messageId": id})).await,
        "FORBIDDEN"
    );
    assert_eq!(
        bob.fails("y", "read", json!({"messageId": 999})).await,
        "NOT_FOUND"
    );
}

#[tokio::test]
async fn the_author_edits_and_the_partner_gets_the_edit_payload() {
    let (_, server) = start(Config::default()).await;
    let mut alice = connect(&server, "alice").await;
    let mut bob = connect(&server, "bob").await;
    let sent = alice
        .ok(
            "1",
            "new",
            json!({"chatId": "bob", "message": "helo", "clientMessageId": "c-9"}),
        )
        .await;
    let id = sent["messageId"].as_u64().unwrap();
    bob.event_acked("new").await;

    let edited = alice
        .ok("2", "edit", json!({"messageId": id, "message": "hello"}))
        .await;
    assert_eq!(edited["messageId"], id);
    let frame = bob.event_acked("edit").await;
    let payload = &frame["payload"];
    assert_eq!(payload["message"], "hello");
    assert_eq!(payload["originalMessageId"], id);
    assert_eq!(payload["originalClientMessageId"], "c-9");
    assert_eq!(payload["from"], "alice");
    assert_eq!(payload["chatId"], "alice");

    // Not the author: refused, and no event.
    let code = bob
        .fails("3", "edit", json!({"messageId": id, "message": "mine"}))
        .await;
    assert_eq!(code, "FORBIDDEN");
    let code = alice
        .fails("4", "edit", json!({"messageId": 424242, "message": "x"}))
        .await;
    assert_eq!(code, "NOT_FOUND");
    let code = alice
        .fails("5", "edit", json!({"messageId": id, "message": "  "}))
        .await;
    assert_eq!(code, "BAD_REQUEST");
    bob.quiet(QUIET).await;

    let history = bob.ok("h", "history", json!({"chatId": "alice"})).await;
    assert_eq!(history["messages"][0]["message"], "hello");
    assert_eq!(history["messages"][0]["edited"], true);
}

#[tokio::test]
async fn the_author_deletes_and_the_partner_gets_the_deletion_payload() {
    let (_, server) = start(Config::default()).await;
    let mut alice = connect(&server, "alice").await;
    let mut bob = connect(&server, "bob").await;
    let sent = alice
        .ok(
            "1",
            "new",
            json!({"chatId": "bob", "message": "oops", "clientMessageId": "c-2"}),
        )
        .await;
    let id = sent["messageId"].as_u64().unwrap();
    bob.event_acked("new").await;

    assert_eq!(
        bob.fails("d", "delete", json!({"messageId": id})).await,
        "FORBIDDEN"
    );
    let deleted = alice.ok("2", "delete", json!({"messageId": id})).await;
    assert_eq!(deleted["messageId"], id);
    let frame = bob.event_acked("delete").await;
    assert_eq!(
        frame["payload"],
        json!({"messageId": id, "from": "alice", "chatId": "alice",
               "originalMessageId": id, "originalClientMessageId": "c-2"})
    );

    // Gone: not in history, cannot be edited, deleted again or receipted.
    let history = bob.ok("h", "history", json!({"chatId": "alice"})).await;
    assert_eq!(history["messages"], json!([]));
    let code = alice
        .fails("3", "edit", json!({"messageId": id, "message": "x"}))
        .await;
    assert_eq!(code, "NOT_FOUND");
    assert_eq!(
        alice.fails("4", "delete", json!({"messageId": id})).await,
        "NOT_FOUND"
    );
    assert_eq!(
        bob.fails("5", "read", json!({"messageId": id})).await,
        "NOT_FOUND"
    );
}

#[tokio::test]
async fn history_rebuilds_a_conversation_newest_last() {
    let (_, server) = start(Config::default()).await;
    let mut alice = connect(&server, "alice").await;
    let mut bob = connect(&server, "bob").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (client, to) = if i % 2 == 0 {
            (&mut alice, "bob")
        } else {
            (&mut bob, "alice")
        };
        let sent = client
            .ok(
                &format!("m{i}"),
                "new",
                json!({"chatId": to, "message": format!("{i}")}),
            )
            .await;
        ids.push(sent["messageId"].as_u64().unwrap());
    }
    alice
        .ok(
            "other",
            "new",
            json!({"chatId": "carol", "message": "elsewhere"}),
        )
        .await;

    let page = bob.ok("h1", "history", json!({"chatId": "alice"})).await;
    let got: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["messageId"].as_u64().unwrap())
        .collect();
    assert_eq!(got, ids);
    let first = &page["messages"][0];
    assert_eq!(first["from"], "alice");
    assert_eq!(first["to"], "bob");
    assert_eq!(first["kind"], "text");
    assert_eq!(first["receipt"], "sent");

    let page = bob
        .ok(
            "h2",
            "history",
            json!({"chatId": "alice", "before": ids[3], "limit": 2}),
        )
        .await;
    let got: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["messageId"].as_u64().unwrap())
        .collect();
    assert_eq!(got, ids[1..3]);
}

// ---------------------------------------------------------------------------------------------
// Calls and typing

#[tokio::test]
async fn a_call_message_reaches_the_partner_and_history() {
    let (_, server) = start(Config::default()).await;
    let mut alice = connect(&server, "alice").await;
    let mut bob = connect(&server, "bob").await;
    let sent = alice.ok("1",
        "call",
        json!({"chatId": "bob", "callType": "video", "direction": "outgoing", "status": "missed"}),
    )
    .await;
    let id = sent["messageId"].as_u64().unwrap();
    let frame = bob.event_acked("call").await;
    let payload = &frame["payload"];
    assert_eq!(payload["messageId"], id);
    assert_eq!(payload["from"], "alice");
    assert_eq!(payload["chatId"], "alice");
    assert_eq!(payload["callType"], "video");
    assert_eq!(payload["direction"], "outgoing");
    assert_eq!(payload["status"], "missed");

    let history = bob.ok("h", "history", json!({"chatId": "alice"})).await;
    assert_eq!(history["messages"][0]["kind"], "call");
    assert_eq!(history["messages"][0]["callType"], "video");

    let code = alice
        .fails(
            "2",
            "call",
            json!({"chatId": "bob", "callType": "hologram", "direction": "outgoing"}),
        )
        .await;
    assert_eq!(code, "BAD_REQUEST");
    let code = alice
        .fails("3", "edit", json!({"messageId": id, "message": "x"}))
        .await;
    assert_eq!(code, "BAD_REQUEST", "call messages cannot be edited");
}

#[tokio::test]
async fn new_call_and_close_call_reach_every_participant() {
    let (protocol, server) = start(Config::default()).await;
    let mut alice = connect(&server, "alice").await;
    let mut bob = connect(&server, "bob").await;
    let mut carol = connect(&server, "carol").await;
    let mut dave = connect(&server, "dave").await;

    let call = alice
        .ok(
            "1",
            "newCall",
            json!({"participants": ["bob", "carol", "bob", "alice"], "callType": "audio"}),
        )
        .await;
    let call_id = call["callId"].as_str().unwrap().to_owned();
    assert_eq!(call["caller"], "alice");
    assert_eq!(call["participants"], json!(["bob", "carol"]));
    assert_eq!(call["callType"], "audio");
    assert_eq!(call["callDuration"], 0);
    for client in [&mut bob, &mut carol] {
        let frame = client.event_acked("newCall").await;
        assert_eq!(frame["payload"], call);
    }
    assert_eq!(protocol.stats().await.open_calls, 1);

    let code = dave
        .fails("1", "closeCall", json!({"callId": call_id}))
        .await;
    assert_eq!(code, "FORBIDDEN");
    let closed = bob.ok("2", "closeCall", json!({"callId": call_id})).await;
    assert_eq!(closed["callId"], call_id.as_str());
    assert!(closed["callDuration"].is_u64());
    for client in [&mut alice, &mut carol] {
        let frame = client.event_acked("closeCall").await;
        assert_eq!(frame["payload"], closed);
    }
    assert_eq!(protocol.stats().await.open_calls, 0);
    let code = alice
        .fails("3", "closeCall", json!({"callId": call_id}))
        .await;
    assert_eq!(code, "NOT_FOUND");
    let code = alice
        .fails(
            "4",
            "newCall",
            json!({"participants": ["alice"], "callType": "video"}),
        )
        .await;
    assert_eq!(code, "BAD_REQUEST");
    dave.quiet(QUIET).await;
}

#[tokio::test]
async fn typing_reaches_connected_partners_only_and_is_never_redelivered() {
    let (protocol, server) = start(fast_redelivery()).await;
    let mut alice = connect(&server, "alice").await;
    let mut bob = connect(&server, "bob").await;
    alice
        .send_json(&json!({"type": "event", "eventType": "typing", "payload": {"chatId": "bob"}}))
        .await;
    let frame = bob.event("typing").await;
    assert!(frame["id"].is_u64());
    assert_eq!(frame["payload"], json!({"chatId": "alice"}));
    // Not acked, yet not redelivered: typing is ephemeral.
    bob.quiet(Duration::from_millis(600)).await;
    assert_eq!(protocol.pending_for("bob").await, 0);

    // Typing to someone offline is dropped, not queued.
    alice
        .send_json(&json!({"type": "event", "eventType": "typing", "payload": {"chatId": "carol"}}))
        .await;
    alice.sync().await;
    let mut carol = connect(&server, "carol").await;
    carol.quiet(QUIET).await;
}

// ---------------------------------------------------------------------------------------------
// Presence

#[tokio::test]
async fn online_and_offline_reach_the_other_connected_users() {
    let (_, server) = start(Config::default()).await;
    let mut alice = connect(&server, "alice").await;
    alice.sync().await;
    let mut bob = connect(&server, "bob").await;

    let online = alice.event_acked("online").await;
    assert_eq!(online["payload"], json!({"userId": "bob"}));
    assert!(online["id"].is_u64());
    // The newcomer learns who is online already.
    let snapshot = bob.event_acked("online").await;
    assert_eq!(snapshot["payload"], json!({"userId": "alice"}));

    // A second socket of bob announces nothing, and only the last socket's close is announced:
    // alice's very next frames are exactly one `offline` for bob, then carol's `online`.
    let bob2 = connect(&server, "bob").await;
    bob2.close().await;
    bob.close().await;
    let offline = alice.next().await;
    assert_eq!(offline["eventType"], "offline", "{offline}");
    assert_eq!(offline["payload"], json!({"userId": "bob"}));
    alice.ack(&offline).await;
    let _carol = connect(&server, "carol").await;
    let next = alice.next().await;
    assert_eq!(next["eventType"], "online", "{next}");
    assert_eq!(next["payload"], json!({"userId": "carol"}));
}

// ---------------------------------------------------------------------------------------------
// Delivery guarantees

#[tokio::test]
async fn offline_events_wait_and_arrive_in_order_on_connect() {
    let (protocol, server) = start(Config::default()).await;
    let mut alice = connect(&server, "alice").await;
    for i in 0..3 {
        alice
            .ok(
                &format!("r{i}"),
                "new",
                json!({"chatId": "bob", "message": format!("m{i}")}),
            )
            .await;
    }
    assert_eq!(
        protocol.pending_for("bob").await,
        3,
        "bob never connected, yet exists"
    );

    let mut bob = connect(&server, "bob").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let frame = bob.event("new").await;
        assert_eq!(frame["payload"]["message"], format!("m{i}"));
        ids.push(frame["id"].as_u64().unwrap());
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
}

#[tokio::test]
async fn unacked_events_come_back_after_reconnect_with_their_original_ids() {
    let (protocol, server) = start(Config::default()).await;
    let mut alice = connect(&server, "alice").await;
    for i in 0..3 {
        alice
            .ok(
                &format!("r{i}"),
                "new",
                json!({"chatId": "bob", "message": format!("m{i}")}),
            )
            .await;
    }

    let mut bob = connect(&server, "bob").await;
    let first: Vec<_> = [
        bob.event("new").await,
        bob.event("new").await,
        bob.event("new").await,
    ]
    .into();
    // Ack only the middle one, then drop the connection.
    bob.ack(&first[1]).await;
    bob.sync().await;
    bob.close().await;

    let mut bob = connect(&server, "bob").await;
    let again = [bob.event("new").await, bob.event("new").await];
    assert_eq!(again[0], first[0], "same frame, same id, same timestamp");
    assert_eq!(again[1], first[2]);
    bob.ack(&again[0]).await;
    bob.ack(&again[1]).await;
    bob.sync().await;
    assert_eq!(protocol.pending_for("bob").await, 0);
    bob.close().await;

    // Everything acked: a new connection gets nothing again, and new ids keep growing.
    let mut bob = connect(&server, "bob").await;
    bob.quiet(QUIET).await;
    alice
        .ok("r9", "new", json!({"chatId": "bob", "message": "later"}))
        .await;
    let later = bob.event("new").await;
    let max_before = first
        .iter()
        .map(|f| f["id"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(later["id"].as_u64().unwrap() > max_before);
}

#[tokio::test]
async fn an_unacked_event_is_resent_on_a_live_socket_after_the_timeout() {
    let (protocol, server) = start(fast_redelivery()).await;
    let mut alice = connect(&server, "alice").await;
    let mut bob = connect(&server, "bob").await;
    alice
        .ok("1", "new", json!({"chatId": "bob", "message": "hello?"}))
        .await;

    let first = bob.event("new").await;
    let second = bob.event("new").await;
    assert_eq!(first, second, "redelivered with the same id");
    let third = bob.event("new").await;
    assert_eq!(first, third, "and again until acked");
    bob.ack(&third).await;
    bob.sync().await;
    assert_eq!(protocol.pending_for("bob").await, 0);
    // Copies sent before the ack was processed arrived before the sync response; none after.
    bob.discard_copies(&third);
    bob.quiet(Duration::from_millis(700)).await;
}

#[tokio::test]
async fn an_acked_event_is_not_redelivered() {
    let (_, server) = start(fast_redelivery()).await;
    let mut alice = connect(&server, "alice").await;
    let mut bob = connect(&server, "bob").await;
    alice
        .ok("1", "new", json!({"chatId": "bob", "message": "hi"}))
        .await;
    let event = bob.event_acked("new").await;
    bob.sync().await;
    bob.discard_copies(&event);
    bob.quiet(Duration::from_millis(700)).await;
    bob.close().await;
    let mut bob = connect(&server, "bob").await;
    bob.quiet(QUIET).await;
}

#[tokio::test]
async fn a_user_with_several_sockets_gets_events_on_all_and_an_ack_from_any_counts() {
    let (protocol, server) = start(fast_redelivery()).await;
    let mut alice = connect(&server, "alice").await;
    let mut phone = connect(&server, "bob").await;
    let mut laptop = connect(&server, "bob").await;
    alice
        .ok("1", "new", json!({"chatId": "bob", "message": "hi"}))
        .await;
    let on_phone = phone.event("new").await;
    let on_laptop = laptop.event("new").await;
    assert_eq!(on_phone, on_laptop);
    laptop.ack(&on_laptop).await;
    laptop.sync().await;
    assert_eq!(protocol.pending_for("bob").await, 0);
    // The ack is processed: anything the phone gets after its own round trip is a redelivery.
    phone.sync().await;
    phone.discard_copies(&on_phone);
    phone.quiet(Duration::from_millis(600)).await;
}

#[tokio::test]
async fn a_retried_request_id_gets_the_same_response_and_no_second_message() {
    let (protocol, server) = start(Config::default()).await;
    let mut alice = connect(&server, "alice").await;
    let payload = json!({"chatId": "bob", "message": "once"});
    let first = alice.request("same", "new", payload.clone()).await;
    let again = alice.request("same", "new", payload.clone()).await;
    assert_eq!(first, again);
    // Also from another socket of the same user, after a reconnect.
    alice.close().await;
    let mut alice = connect(&server, "alice").await;
    let third = alice.request("same", "new", payload).await;
    assert_eq!(first, third);
    assert_eq!(protocol.pending_for("bob").await, 1);
    assert_eq!(protocol.stats().await.messages, 1);

    let mut bob = connect(&server, "bob").await;
    bob.event_acked("new").await;
    bob.quiet(QUIET).await;
    // The same request id from another user is another request.
    let other = bob
        .request("same", "new", json!({"chatId": "alice", "message": "x"}))
        .await;
    assert_ne!(other["payload"], first["payload"]);
}

#[tokio::test]
async fn a_full_outbox_fails_the_senders_request_and_drops_nothing() {
    let (protocol, server) = start(Config {
        outbox_limit: 2,
        ..Config::default()
    })
    .await;
    let mut alice = connect(&server, "alice").await;
    alice
        .ok("1", "new", json!({"chatId": "bob", "message": "1"}))
        .await;
    alice
        .ok("2", "new", json!({"chatId": "bob", "message": "2"}))
        .await;
    let response = alice
        .request("3", "new", json!({"chatId": "bob", "message": "3"}))
        .await;
    assert_eq!(response["payload"]["error"]["code"], "OUTBOX_FULL");
    assert!(
        response["payload"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("bob")
    );
    assert_eq!(protocol.pending_for("bob").await, 2);

    let mut bob = connect(&server, "bob").await;
    let one = bob.event_acked("new").await;
    assert_eq!(one["payload"]["message"], "1");
    bob.sync().await;
    // The failed request was not remembered: the same id can be retried now.
    alice
        .ok("3", "new", json!({"chatId": "bob", "message": "3"}))
        .await;
    let two = bob.event_acked("new").await;
    let three = bob.event_acked("new").await;
    assert_eq!(two["payload"]["message"], "2");
    assert_eq!(three["payload"]["message"], "3");
}

// ---------------------------------------------------------------------------------------------
// Errors

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_socket_stays_open() {
    let (_, server) = start(Config::default()).await;
    let mut alice = connect(&server, "alice").await;
    let cases = [
        ("this is not json", "INVALID_JSON"),
        ("[1, 2, 3]", "INVALID_JSON"),
        (r#"{"no": "type"}"#, "UNKNOWN_TYPE"),
        (r#"{"type": "subscribe"}"#, "UNKNOWN_TYPE"),
        (
            r#"{"type": "request", "payloadType": "new", "payload": {}}"#,
            "BAD_REQUEST",
        ),
        (r#"{"type": "ack", "id": "not-a-number"}"#, "BAD_REQUEST"),
        (
            r#"{"type": "event", "eventType": "dancing", "payload": {}}"#,
            "UNKNOWN_EVENT_TYPE",
        ),
        (
            r#"{"type": "event", "eventType": "typing", "payload": {}}"#,
            "BAD_REQUEST",
        ),
    ];
    for (text, code) in cases {
        alice.send_text(text).await;
        let frame = alice.next_non_presence().await;
        assert_eq!(frame["type"], "error", "{text}: {frame}");
        assert_eq!(frame["payload"]["code"], code, "{text}: {frame}");
        assert!(frame["payload"]["message"].is_string());
    }
    // Still open and working.
    alice
        .ok(
            "after",
            "new",
            json!({"chatId": "bob", "message": "still here"}),
        )
        .await;
}

#[tokio::test]
async fn bad_requests_get_error_responses_with_their_id_and_send_no_event() {
    let (protocol, server) = start(Config::default()).await;
    let mut alice = connect(&server, "alice").await;
    let mut bob = connect(&server, "bob").await;
    let cases = [
        ("teleport", json!({}), "UNKNOWN_PAYLOAD_TYPE"),
        ("new", json!({"chatId": "bob"}), "BAD_REQUEST"),
        ("new", json!({"chatId": "", "message": "x"}), "BAD_REQUEST"),
        (
            "new",
            json!({"chatId": "bob", "message": ""}),
            "BAD_REQUEST",
        ),
        (
            "new",
            json!({"chatId": "bob", "message": "x".repeat(5000)}),
            "BAD_REQUEST",
        ),
        ("new", json!("not an object"), "BAD_REQUEST"),
        (
            "edit",
            json!({"messageId": "one", "message": "x"}),
            "BAD_REQUEST",
        ),
        ("delete", json!({"messageId": 77}), "NOT_FOUND"),
        ("closeCall", json!({"callId": "nope"}), "NOT_FOUND"),
        ("history", json!({}), "BAD_REQUEST"),
    ];
    for (i, (kind, payload, code)) in cases.into_iter().enumerate() {
        let id = format!("bad-{i}");
        let response = alice.request(&id, kind, payload).await;
        assert_eq!(response["id"], id.as_str());
        assert_eq!(
            response["payload"]["error"]["code"], code,
            "{kind}: {response}"
        );
        assert!(response["payload"]["error"]["message"].is_string());
    }
    // A request without payloadType is answered with its id too.
    alice
        .send_json(&json!({"type": "request", "id": "no-kind", "payload": {}}))
        .await;
    let response = alice.wait_for(|v| v["id"] == "no-kind").await;
    assert_eq!(response["payload"]["error"]["code"], "BAD_REQUEST");

    bob.quiet(QUIET).await;
    assert_eq!(protocol.pending_for("bob").await, 0);
    assert_eq!(protocol.stats().await.messages, 0);
}

#[tokio::test]
async fn requests_over_the_rate_limit_are_refused() {
    let (_, server) = start(Config {
        rate_limit: 3,
        rate_window: Duration::from_secs(60),
        ..Config::default()
    })
    .await;
    let mut alice = connect(&server, "alice").await;
    for i in 0..3 {
        alice
            .ok(
                &format!("{i}"),
                "new",
                json!({"chatId": "bob", "message": "x"}),
            )
            .await;
    }
    let code = alice
        .fails("3", "new", json!({"chatId": "bob", "message": "x"}))
        .await;
    assert_eq!(code, "RATE_LIMITED");
    // A retry of an answered request is served from the cache, not rate limited.
    let again = alice
        .ok("0", "new", json!({"chatId": "bob", "message": "x"}))
        .await;
    assert!(again["messageId"].is_u64());
    alice
        .send_json(&json!({"type": "event", "eventType": "typing", "payload": {"chatId": "bob"}}))
        .await;
    let frame = alice.next_non_presence().await;
    assert_eq!(frame["payload"]["code"], "RATE_LIMITED");
}

#[tokio::test]
async fn event_ids_only_grow_across_durable_and_ephemeral_events_and_reconnects() {
    let (_, server) = start(Config::default()).await;
    let mut alice = connect(&server, "alice").await;
    let mut bob = connect(&server, "bob").await;
    let mut last = 0;
    for round in 0..3 {
        alice
            .ok(
                &format!("n{round}"),
                "new",
                json!({"chatId": "bob", "message": "x"}),
            )
            .await;
        alice
            .send_json(
                &json!({"type": "event", "eventType": "typing", "payload": {"chatId": "bob"}}),
            )
            .await;
        let new = bob.event_acked("new").await;
        let typing = bob.event("typing").await;
        for id in [new["id"].as_u64().unwrap(), typing["id"].as_u64().unwrap()] {
            assert!(id > last, "{id} after {last}");
            last = id;
        }
        bob.sync().await;
        bob.close().await;
        bob = connect(&server, "bob").await;
        // Make sure the server has bob's new socket registered before alice writes again.
        bob.sync().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Signed identity, in process (the server verified a token for `sub` before `admit`)

mod signed_in_process {
    use serde_json::{Map, Value};
    use switchboard_core::{Identity, Reject};
    use switchboard_reqack::{Config, ReqAck};
    use switchboard_testkit::{Driver, Session, json};

    fn identity(sub: &str) -> Identity {
        Identity::new(sub, None, Map::new())
    }

    fn request(id: &str, payload_type: &str, payload: Value) -> Value {
        json!({"type": "request", "timestamp": 0, "id": id, "payloadType": payload_type, "payload": payload})
    }

    fn events(session: &mut Session<ReqAck>, event_type: &str) -> Vec<Value> {
        session
            .json_frames()
            .into_iter()
            .filter(|frame| frame["type"] == "event" && frame["eventType"] == event_type)
            .collect()
    }

    #[tokio::test]
    async fn the_user_is_the_tokens_subject_with_or_without_a_matching_user_id() {
        let driver = Driver::new(ReqAck::new(Config::default()));
        let alice = identity("alice");
        for path in ["/ws", "/ws?userId=", "/ws?userId=alice"] {
            let session = driver.open_as(path, Some(&alice)).await;
            assert!(session.is_ok(), "{path}: {session:?}");
            session.unwrap().close().await;
        }
        let mut bob = driver.open_as("/ws", Some(&identity("bob"))).await.unwrap();
        let mut alice = driver.open_as("/ws", Some(&alice)).await.unwrap();
        alice
            .json(&request(
                "r1",
                "new",
                json!({"chatId": "bob", "message": "hi"}),
            ))
            .await;
        let new = events(&mut bob, "new");
        assert_eq!(new.len(), 1, "{new:?}");
        assert_eq!(new[0]["payload"]["from"], "alice");
        let responses: Vec<Value> = alice
            .json_frames()
            .into_iter()
            .filter(|frame| frame["type"] == "response")
            .collect();
        assert!(
            responses[0]["payload"]["messageId"].is_u64(),
            "{responses:?}"
        );
    }

    #[tokio::test]
    async fn another_users_user_id_is_forbidden() {
        let driver = Driver::new(ReqAck::new(Config::default()));
        let refused = driver
            .open_as("/ws?userId=bob", Some(&identity("alice")))
            .await
            .unwrap_err();
        assert!(matches!(refused, Reject::Forbidden(_)), "{refused:?}");
        assert_eq!(refused.status(), 403);
        // Without signed identity nothing changed: `userId` is the user, and it is required.
        let open = driver.open_as("/ws?userId=bob", None).await;
        assert!(open.is_ok());
        let missing = driver.open_as("/ws", None).await.unwrap_err();
        assert_eq!(missing.status(), 400);
    }

    #[tokio::test]
    async fn nobody_acks_or_receives_another_users_events() {
        let driver = Driver::new(ReqAck::new(Config::default()));
        let mut bob = driver.open_as("/ws", Some(&identity("bob"))).await.unwrap();
        let mut alice = driver
            .open_as("/ws", Some(&identity("alice")))
            .await
            .unwrap();
        alice
            .json(&request(
                "r1",
                "new",
                json!({"chatId": "bob", "message": "hi"}),
            ))
            .await;
        let new = events(&mut bob, "new");
        let id = new[0]["id"].as_u64().unwrap();
        assert_eq!(driver.protocol().pending_for("bob").await, 1);
        // Alice acks bob's event id: her ack is about her own outbox, bob's event stays.
        alice
            .json(&json!({"type": "ack", "id": id.to_string()}))
            .await;
        assert_eq!(driver.protocol().pending_for("bob").await, 1);
        // Alice asking for bob's name at connect is refused, so she never gets his events.
        let refused = driver
            .open_as("/ws?userId=bob", Some(&identity("alice")))
            .await
            .unwrap_err();
        assert_eq!(refused.status(), 403);
        bob.json(&json!({"type": "ack", "id": id.to_string()}))
            .await;
        assert_eq!(driver.protocol().pending_for("bob").await, 0);
    }
}

// ---------------------------------------------------------------------------------------------
// Signed identity over real sockets: the server verifies HS256 / RS256 tokens

mod signed_over_sockets {

    use switchboard_reqack::{Config, ReqAck};
    use switchboard_server::ServerConfig;
    use switchboard_testkit::jwt::{Keys, claims, refused_tokens};
    use switchboard_testkit::{Client, ConnectOptions, TestServer, json};

    use super::common::{User, user};

    async fn start_signed(keys: &Keys) -> TestServer {
        let config = ServerConfig {
            auth: Some(keys.verifier()),
            ..ServerConfig::default()
        };
        TestServer::start(ReqAck::new(Config::default()), config).await
    }

    async fn connect_as(server: &TestServer, keys: &Keys, sub: &str, query: &str) -> User {
        let token = keys.token(&claims(sub, 60));
        user(server.connect(&format!("/ws?token={token}{query}")).await)
    }

    async fn status(server: &TestServer, path: &str) -> u16 {
        Client::refused_status(&server.ws_url(path), ConnectOptions::default()).await
    }

    #[tokio::test]
    async fn signed_tokens_make_the_subject_the_user_and_refuse_other_user_ids() {
        for keys in [Keys::hs256(), Keys::rs256_shared()] {
            let server = start_signed(&keys).await;
            // No token: the server's 401, userId or not.
            assert_eq!(status(&server, "/ws?userId=alice").await, 401);
            assert_eq!(status(&server, "/ws").await, 401);
            for (what, token) in refused_tokens(&keys, "alice") {
                let path = format!("/ws?token={token}&userId=alice");
                assert_eq!(status(&server, &path).await, 401, "{what}");
            }
            // Bob's token naming alice: 403.
            let bobs = keys.token(&claims("bob", 60));
            assert_eq!(
                status(&server, &format!("/ws?token={bobs}&userId=alice")).await,
                403
            );
            // Good tokens, with the matching userId or none.
            let mut alice = connect_as(&server, &keys, "alice", "&userId=alice").await;
            let mut bob = connect_as(&server, &keys, "bob", "").await;
            alice
                .ok("r1", "new", json!({"chatId": "bob", "message": "hi"}))
                .await;
            let new = bob.event_acked("new").await;
            assert_eq!(new["payload"]["from"], "alice", "{:?}", keys.algorithm());
            assert_eq!(new["payload"]["message"], "hi");
            // Bob's answer reaches alice, who is the token's subject, not a query parameter.
            bob.ok("r2", "new", json!({"chatId": "alice", "message": "hello"}))
                .await;
            let reply = alice.event_acked("new").await;
            assert_eq!(reply["payload"]["from"], "bob");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics: the protocol's series, seen by a recorder local to the test's thread

mod metrics_in_process {
    use std::time::Duration;

    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use serde_json::Value;
    use switchboard_reqack::telemetry::{ACKS, EVENTS, PENDING_EVENTS, REDELIVERED, REQUESTS};
    use switchboard_reqack::{Config, ReqAck};
    use switchboard_testkit::metrics::{counter, value};
    use switchboard_testkit::{Driver, json};

    fn request(id: &str, payload_type: &str, payload: Value) -> Value {
        json!({"type": "request", "timestamp": 0, "id": id, "payloadType": payload_type, "payload": payload})
    }

    /// The driver runs every hook on this task, so a recorder set for this thread sees each
    /// event: requests by type and outcome, events, acks, both kinds of redelivery and the
    /// pending gauge.
    #[tokio::test]
    async fn series_follow_requests_events_acks_and_redelivery() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _local = metrics::set_default_local_recorder(&recorder);

        // A zero timeout: every tick resends what is unacked, so no time has to pass.
        let driver = Driver::new(ReqAck::new(Config {
            redelivery_timeout: Duration::ZERO,
            ..Config::default()
        }));
        let mut bob = driver.open("/ws?userId=bob").await.unwrap();
        let mut alice = driver.open("/ws?userId=alice").await.unwrap();
        let hi = json!({"chatId": "bob", "message": "hi"});
        alice.json(&request("r1", "new", hi.clone())).await;
        alice.json(&request("r1", "new", hi.clone())).await;
        alice.json(&request("r2", "bogus", json!({}))).await;
        alice
            .json(&request(
                "r3",
                "new",
                json!({"chatId": "bob", "message": " "}),
            ))
            .await;
        let new: Vec<Value> = bob
            .json_frames()
            .into_iter()
            .filter(|frame| frame["eventType"] == "new")
            .collect();
        assert_eq!(new.len(), 1, "{new:?}");
        bob.tick().await;
        bob.json(&json!({"type": "ack", "id": new[0]["id"].to_string()}))
            .await;
        alice.json(&request("r4", "new", hi)).await;
        // Bob's second socket gets the unacked event of r4 on connect.
        let _again = driver.open("/ws?userId=bob").await.unwrap();

        let snapshot = snapshotter.snapshot().into_vec();
        let requests = |payload_type: &str, outcome: &str| {
            counter(
                &snapshot,
                REQUESTS,
                &[("payload_type", payload_type), ("outcome", outcome)],
            )
        };
        assert_eq!(requests("new", "ok"), 2);
        assert_eq!(requests("new", "retry"), 1);
        assert_eq!(requests("new", "bad_request"), 1);
        assert_eq!(requests("other", "unknown_payload_type"), 1);
        assert_eq!(counter(&snapshot, EVENTS, &[("event_type", "new")]), 2);
        // Alice's arrival told bob, and alice learnt bob is online.
        assert_eq!(counter(&snapshot, EVENTS, &[("event_type", "online")]), 2);
        assert_eq!(counter(&snapshot, ACKS, &[]), 1);
        assert_eq!(
            counter(&snapshot, REDELIVERED, &[("trigger", "timeout")]),
            1
        );
        assert_eq!(
            counter(&snapshot, REDELIVERED, &[("trigger", "connect")]),
            1
        );
        match value(&snapshot, PENDING_EVENTS, &[]) {
            Some(DebugValue::Gauge(pending)) => assert_eq!(pending.into_inner(), 1.0),
            other => panic!("{PENDING_EVENTS}: {other:?}"),
        }
    }
}
