//! fastchat's logic driven in process (no sockets): exact frame sequences, and the real
//! one-minute rate window on tokio's paused clock.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::time::Duration;

use serde_json::Value;
use switchboard_fastchat::{Config, FastChat};
use switchboard_testkit::metrics::counter;
use switchboard_testkit::{Driver, Session, json};
use uuid::Uuid;

fn new_id() -> String {
    Uuid::new_v4().to_string()
}

fn types(frames: &[Value]) -> Vec<&str> {
    frames
        .iter()
        .map(|frame| frame["type"].as_str().unwrap())
        .collect()
}

async fn hello(driver: &Driver<FastChat>, id: &str, name: &str) -> Session<FastChat> {
    let mut session = driver.open("/ws").await.unwrap();
    session
        .json(&json!({"type": "HELLO", "data": {"user_id": id, "display_name": name}}))
        .await;
    let frames = session.json_frames();
    assert_eq!(types(&frames), ["HELLO_ACK", "PRESENCE"], "{frames:?}");
    session
}

#[tokio::test]
async fn a_conversation_produces_exactly_these_frames_in_this_order() {
    let driver = Driver::new(FastChat::new(Config::default()));
    let (a, b) = (new_id(), new_id());
    let mut alice = hello(&driver, &a, "Alice").await;
    let mut bob = hello(&driver, &b, "Bob").await;
    // Alice hears Bob arrive as a delta; nothing else.
    let frames = alice.json_frames();
    assert_eq!(types(&frames), ["PRESENCE"]);
    assert_eq!(frames[0]["data"]["delta"], true);

    alice
        .json(&json!({"type": "OPEN_CHAT", "data": {"target_user_id": b, "target_display_name": "Bob"}}))
        .await;
    assert_eq!(types(&alice.json_frames()), ["CHAT_OPENED"]);
    assert!(bob.json_frames().iter().all(|f| f["type"] != "MSG"));

    alice
        .json(&json!({"type": "MSG", "data": {"to": b, "content": "hi", "message_id": "m-1"}}))
        .await;
    let sent = alice.json_frames();
    assert_eq!(types(&sent), ["MSG_ACK"]);
    assert_eq!(
        sent[0]["data"],
        json!({"message_id": "m-1", "status": "sent"})
    );
    let incoming = bob.json_frames();
    assert_eq!(types(&incoming), ["MSG"]);
    assert_eq!(incoming[0]["data"]["content"], "hi");

    bob.json(&json!({"type": "MSG_ACK", "data": {"message_id": "m-1"}}))
        .await;
    let delivered = alice.json_frames();
    assert_eq!(
        delivered.iter().map(|f| &f["data"]).collect::<Vec<_>>(),
        [&json!({"message_id": "m-1", "status": "delivered"})]
    );
    assert!(bob.frames().is_empty(), "the ack is not echoed");

    // A retry of the same message id is acknowledged again but not delivered again.
    alice
        .json(&json!({"type": "MSG", "data": {"to": b, "content": "hi", "message_id": "m-1"}}))
        .await;
    assert_eq!(types(&alice.json_frames()), ["MSG_ACK"]);
    assert!(bob.frames().is_empty());

    bob.close().await;
    let frames = alice.json_frames();
    assert_eq!(types(&frames), ["PRESENCE"]);
    assert_eq!(frames[0]["data"]["users"][0]["online"], false);
}

#[tokio::test(start_paused = true)]
async fn the_minute_long_message_window_slides_on_the_paused_clock() {
    let driver = Driver::new(FastChat::new(Config::default()));
    let (a, b) = (new_id(), new_id());
    let mut alice = hello(&driver, &a, "Alice").await;
    let mut bob = hello(&driver, &b, "Bob").await;
    alice
        .json(&json!({"type": "OPEN_CHAT", "data": {"target_user_id": b, "target_display_name": "Bob"}}))
        .await;
    alice.frames();
    bob.frames();
    let send = |n: usize| json!({"type": "MSG", "data": {"to": b, "content": format!("m{n}")}});
    for n in 0..60 {
        alice.json(&send(n)).await;
        assert_eq!(types(&alice.json_frames()), ["MSG_ACK"]);
        // Spread over the minute: the window slides per message, not per minute.
        tokio::time::advance(Duration::from_millis(500)).await;
    }
    alice.json(&send(60)).await;
    let refused = alice.json_frames();
    assert_eq!(refused[0]["data"]["code"], "RATE_LIMITED", "{refused:?}");
    // A minute after the first message (sent at 0 s; it is 30 s now) that one leaves the
    // window and exactly one more is allowed: the second (0.5 s) is still in it.
    tokio::time::advance(Duration::from_secs(30)).await;
    alice.json(&send(61)).await;
    assert_eq!(types(&alice.json_frames()), ["MSG_ACK"]);
    alice.json(&send(62)).await;
    assert_eq!(alice.json_frames()[0]["data"]["code"], "RATE_LIMITED");
    assert_eq!(
        bob.json_frames().len(),
        61,
        "every accepted message, none refused"
    );
}

// ---------------------------------------------------------------------------------------------
// Signed identity: the server verified a token for `sub` before `admit`.

fn signed(sub: &str) -> switchboard_core::Identity {
    switchboard_core::Identity::new(sub, None, serde_json::Map::new())
}

fn hello_frame(id: &str, name: &str) -> Value {
    json!({"type": "HELLO", "data": {"user_id": id, "display_name": name}})
}

#[tokio::test]
async fn a_signed_socket_says_hello_only_as_its_subject_and_may_try_again() {
    let driver = Driver::new(FastChat::new(Config::default()));
    let (me, other) = (new_id(), new_id());
    let mut session = driver.open_as("/ws", Some(&signed(&me))).await.unwrap();
    session.json(&hello_frame(&other, "Mallory")).await;
    let refused = session.json_frames();
    assert_eq!(types(&refused), ["ERROR"], "{refused:?}");
    assert_eq!(refused[0]["data"]["code"], "UNAUTHORIZED");
    assert_eq!(refused[0]["data"]["details"]["field"], "user_id");
    assert!(session.close_reason().is_none(), "the socket stays open");
    // Still unidentified: nothing but HELLO and PING.
    session
        .json(&json!({"type": "OPEN_CHAT", "data": {"target_user_id": other}}))
        .await;
    assert_eq!(session.json_frames()[0]["data"]["code"], "UNAUTHORIZED");

    // The same socket now says HELLO as its subject (upper case is the same UUID).
    session
        .json(&hello_frame(&me.to_uppercase(), "Alice"))
        .await;
    let frames = session.json_frames();
    assert_eq!(types(&frames), ["HELLO_ACK", "PRESENCE"], "{frames:?}");
    assert_eq!(frames[0]["data"]["user_id"], me.as_str());
    // A later HELLO as someone else is refused the same way; renaming itself is fine.
    session.json(&hello_frame(&other, "Mallory")).await;
    assert_eq!(session.json_frames()[0]["data"]["code"], "UNAUTHORIZED");
    session.json(&hello_frame(&me, "Alicia")).await;
    assert_eq!(types(&session.json_frames()), ["HELLO_ACK", "PRESENCE"]);
}

#[tokio::test]
async fn nobody_else_becomes_the_signed_user_and_messages_come_from_the_subject() {
    let driver = Driver::new(FastChat::new(Config::default()));
    let (a, b) = (new_id(), new_id());
    let mut alice = driver.open_as("/ws", Some(&signed(&a))).await.unwrap();
    alice.json(&hello_frame(&a, "Alice")).await;
    alice.frames();
    // Bob's token cannot say HELLO as Alice, so he never gets her messages or speaks for her.
    let mut bob = driver.open_as("/ws", Some(&signed(&b))).await.unwrap();
    bob.json(&hello_frame(&a, "Alice")).await;
    assert_eq!(bob.json_frames()[0]["data"]["code"], "UNAUTHORIZED");
    bob.json(&hello_frame(&b, "Bob")).await;
    bob.frames();
    alice.frames();
    bob.json(&json!({"type": "OPEN_CHAT", "data": {"target_user_id": a}}))
        .await;
    bob.json(&json!({"type": "MSG", "data": {"to": a, "content": "hi", "message_id": "m-1"}}))
        .await;
    let incoming: Vec<Value> = alice
        .json_frames()
        .into_iter()
        .filter(|frame| frame["type"] == "MSG")
        .collect();
    assert_eq!(incoming.len(), 1, "{incoming:?}");
    assert_eq!(incoming[0]["data"]["from"], b.as_str());
}

#[tokio::test]
async fn a_subject_that_is_not_a_user_id_is_refused_at_the_upgrade() {
    let driver = Driver::new(FastChat::new(Config::default()));
    for sub in [
        "alice",
        "not-a-uuid",
        "00000000-0000-1000-8000-000000000000",
    ] {
        let refused = driver.open_as("/ws", Some(&signed(sub))).await.unwrap_err();
        assert_eq!(refused.status(), 403, "{sub}: {refused:?}");
    }
    // Without signed identity HELLO is the identity, as before.
    let mut open = driver.open_as("/ws", None).await.unwrap();
    open.json(&hello_frame(&new_id(), "Anyone")).await;
    assert_eq!(types(&open.json_frames()), ["HELLO_ACK", "PRESENCE"]);
}

// ---------------------------------------------------------------------------------------------
// Metrics: the protocol's counters, seen by a recorder local to the test's thread.

/// The driver runs every hook on this task, so a recorder set for this thread sees each
/// event: HELLOs, a message sent, delivered, retried and queued, and refusals by code.
#[tokio::test]
async fn counters_follow_hellos_messages_and_refusals() {
    use switchboard_fastchat::telemetry::{
        ERRORS, HELLOS, MESSAGE_FAILURES, MESSAGES, RATE_LIMITED,
    };

    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _local = metrics::set_default_local_recorder(&recorder);

    let driver = Driver::new(FastChat::new(Config {
        msg_rate_limit: 3,
        ..Config::default()
    }));
    let (a, b) = (new_id(), new_id());
    let mut alice = hello(&driver, &a, "Alice").await;
    let mut bob = hello(&driver, &b, "Bob").await;
    let mut stranger = driver.open("/ws").await.unwrap();
    stranger
        .json(&json!({"type": "MSG", "data": {"to": b, "content": "hi"}}))
        .await;
    alice
        .json(&json!({"type": "OPEN_CHAT", "data": {"target_user_id": b}}))
        .await;
    let msg =
        |id: &str| json!({"type": "MSG", "data": {"to": b, "content": "hi", "message_id": id}});
    alice.json(&msg("m-1")).await;
    bob.json(&json!({"type": "MSG_ACK", "data": {"message_id": "m-1"}}))
        .await;
    alice.json(&msg("m-1")).await;
    alice
        .json(&json!({"type": "MSG", "data": {"to": new_id(), "content": "hi"}}))
        .await;
    bob.close().await;
    alice.json(&msg("m-2")).await;
    alice.json(&msg("m-3")).await;
    alice.json(&msg("m-4")).await;
    let codes: Vec<Value> = alice
        .json_frames()
        .into_iter()
        .filter(|f| f["type"] == "ERROR")
        .map(|f| f["data"]["code"].clone())
        .collect();
    assert_eq!(codes, ["USER_NOT_FOUND", "RATE_LIMITED"]);

    let snapshot = snapshotter.snapshot().into_vec();
    assert_eq!(counter(&snapshot, HELLOS, &[]), 2);
    assert_eq!(counter(&snapshot, MESSAGES, &[("outcome", "sent")]), 3);
    assert_eq!(counter(&snapshot, MESSAGES, &[("outcome", "queued")]), 2);
    assert_eq!(counter(&snapshot, MESSAGES, &[("outcome", "delivered")]), 1);
    assert_eq!(counter(&snapshot, MESSAGES, &[("outcome", "retried")]), 1);
    for (code, n) in [
        ("UNAUTHORIZED", 1),
        ("USER_NOT_FOUND", 1),
        ("RATE_LIMITED", 1),
    ] {
        assert_eq!(counter(&snapshot, MESSAGE_FAILURES, &[("code", code)]), n);
        assert_eq!(counter(&snapshot, ERRORS, &[("code", code)]), n);
    }
    assert_eq!(
        counter(
            &snapshot,
            RATE_LIMITED,
            &[("frame", "MSG"), ("scope", "user")]
        ),
        1
    );
}
