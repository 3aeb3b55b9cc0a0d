//! collab behaviour over real sockets: REST, joining, identity, editing with OT, cursors,
//! language, execution relay, errors and limits.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use std::time::Duration;

use serde_json::Value;
use switchboard_collab::ot::Operation;
use switchboard_collab::{ClientDocument, Collab, Config};
use switchboard_server::ServerConfig;
use switchboard_testkit::{Client, ConnectOptions, TestServer, json};

use common::join;

const QUIET: Duration = Duration::from_millis(150);

async fn start(config: Config) -> TestServer {
    TestServer::start(Collab::new(config), ServerConfig::default()).await
}

async fn expect_error(client: &mut Client) -> String {
    let frame = client.recv_type("error").await;
    frame["payload"]["message"]
        .as_str()
        .expect("error message")
        .to_owned()
}

async fn send_op(client: &mut Client, base: u64, op: &Operation) {
    client
        .send_json(&json!({"type": "code-change", "payload": {"changes": {"baseVersion": base, "ops": op}}}))
        .await;
}

async fn send_text(client: &mut Client, text: &str) {
    client
        .send_json(&json!({"type": "code-change", "payload": {"changes": text}}))
        .await;
}

fn op_of(value: &Value) -> Operation {
    serde_json::from_value(value.clone()).expect("ops")
}

// ---------------------------------------------------------------------------------------------
// REST

#[tokio::test]
async fn rest_creates_and_describes_sessions() {
    let server = start(Config::default()).await;

    let created = server.http("POST", "/api/sessions", None).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.json()["sessionId"].as_str().unwrap().to_owned();
    let described = server
        .http("GET", &format!("/api/sessions/{id}"), None)
        .await;
    assert_eq!(described.status, 200);
    assert_eq!(
        described.json(),
        json!({"sessionId": id, "code": "", "language": "javascript", "version": 0, "participants": []})
    );

    let body = json!({"language": "python", "code": "print(1 + 1)\n"}).to_string();
    let created = server.http("POST", "/api/sessions", Some(&body)).await;
    assert_eq!(created.status, 201);
    let id = created.json()["sessionId"].as_str().unwrap().to_owned();
    let described = server
        .http("GET", &format!("/api/sessions/{id}"), None)
        .await
        .json();
    assert_eq!(described["language"], "python");
    assert_eq!(described["code"], "print(1 + 1)\n");

    // Joiners are listed.
    let (_alice, state) = join(&server, &id, "u-alice", "Alice").await;
    assert_eq!(state["code"], "print(1 + 1)\n");
    let described = server
        .http("GET", &format!("/api/sessions/{id}"), None)
        .await
        .json();
    assert_eq!(
        described["participants"],
        json!([{"userId": "u-alice", "username": "Alice"}])
    );
}

#[tokio::test]
async fn rest_errors_are_json() {
    let server = start(Config {
        max_document_bytes: 10,
        ..Config::default()
    })
    .await;
    let missing = server.http("GET", "/api/sessions/nope", None).await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"], "session not found");

    let bad = server.http("POST", "/api/sessions", Some("{oops")).await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"]
            .as_str()
            .unwrap()
            .contains("invalid body")
    );

    let wrong_type = server
        .http("POST", "/api/sessions", Some(r#"{"language": 3}"#))
        .await;
    assert_eq!(wrong_type.status, 400);

    let too_big = json!({"code": "x".repeat(11)}).to_string();
    let too_big = server.http("POST", "/api/sessions", Some(&too_big)).await;
    assert_eq!(too_big.status, 413);
    assert!(
        too_big.json()["error"]
            .as_str()
            .unwrap()
            .contains("limit of 10 bytes")
    );

    let method = server.http("DELETE", "/api/sessions", None).await;
    assert_eq!(method.status, 405);
    assert!(method.json()["error"].is_string());
}

// ---------------------------------------------------------------------------------------------
// Connecting and joining

#[tokio::test]
async fn connecting_creates_the_session_and_other_paths_are_refused() {
    let server = start(Config::default()).await;
    assert_eq!(
        server
            .http("GET", "/api/sessions/abc123", None)
            .await
            .status,
        404
    );
    let _client = server.connect("/ws/abc123").await;
    let described = server.http("GET", "/api/sessions/abc123", None).await;
    assert_eq!(described.status, 200);
    assert_eq!(described.json()["sessionId"], "abc123");

    let url = |path: &str| server.ws_url(path);
    assert_eq!(
        Client::refused_status(&url("/ws"), ConnectOptions::default()).await,
        404
    );
    assert_eq!(
        Client::refused_status(&url("/elsewhere/x"), ConnectOptions::default()).await,
        404
    );
    assert_eq!(
        Client::refused_status(&url("/ws/bad%20id"), ConnectOptions::default()).await,
        400
    );
}

#[tokio::test]
async fn joining_sends_state_to_the_joiner_and_announces_to_the_others() {
    let server = start(Config::default()).await;
    let (mut alice, state) = join(&server, "room1", "u-alice", "Alice").await;
    assert_eq!(
        state,
        json!({"code": "", "language": "javascript", "version": 0,
               "participants": [{"userId": "u-alice", "username": "Alice"}]})
    );
    let (_bob, state) = join(&server, "room1", "u-bob", "Bob").await;
    assert_eq!(
        state["participants"],
        json!([{"userId": "u-alice", "username": "Alice"}, {"userId": "u-bob", "username": "Bob"}])
    );
    let joined = alice.recv_type("participant-joined").await;
    assert_eq!(
        joined["payload"],
        json!({"userId": "u-bob", "username": "Bob"})
    );
}

#[tokio::test]
async fn a_username_defaults_to_the_user_id() {
    let server = start(Config::default()).await;
    let mut client = server.connect("/ws/s").await;
    client
        .send_json(&json!({"type": "join-session", "payload": {"userId": "u1"}}))
        .await;
    let state = client.recv_type("session-state").await;
    assert_eq!(
        state["payload"]["participants"],
        json!([{"userId": "u1", "username": "u1"}])
    );
}

#[tokio::test]
async fn frames_before_join_are_refused_and_the_socket_stays_open() {
    let server = start(Config::default()).await;
    let mut client = server.connect("/ws/s").await;
    for frame in [
        json!({"type": "code-change", "payload": {"changes": "x"}}),
        json!({"type": "cursor-move", "payload": {"cursor": {"line": 1, "column": 1}}}),
        json!({"type": "language-change", "payload": {"language": "go"}}),
        json!({"type": "execute-code", "payload": {}}),
        json!({"type": "execution-result", "payload": {"output": ""}}),
        json!({"type": "leave-session", "payload": {"userId": "u1"}}),
    ] {
        client.send_json(&frame).await;
        let message = expect_error(&mut client).await;
        assert!(
            message.starts_with("Not joined: send join-session before"),
            "{message}"
        );
    }
    client
        .send_json(&json!({"type": "join-session", "payload": {"userId": "u1"}}))
        .await;
    client.recv_type("session-state").await;
    let described = server.http("GET", "/api/sessions/s", None).await.json();
    assert_eq!(described["code"], "");
}

#[tokio::test]
async fn unknown_and_malformed_frames_get_errors_and_the_socket_stays_open() {
    let server = start(Config::default()).await;
    let (mut alice, _) = join(&server, "s", "u-alice", "Alice").await;

    alice
        .send_json(&json!({"type": "dance", "payload": {}}))
        .await;
    assert_eq!(
        alice.recv_type("error").await,
        json!({"type": "error", "payload": {"message": "Invalid message type"}})
    );
    alice.send_text("not json").await;
    assert!(
        expect_error(&mut alice)
            .await
            .starts_with("Malformed message: not valid JSON")
    );
    alice.send_text("[1,2]").await;
    assert!(
        expect_error(&mut alice)
            .await
            .contains("expected a JSON object")
    );
    alice.send_json(&json!({"payload": {}})).await;
    assert!(expect_error(&mut alice).await.contains("missing \"type\""));
    alice
        .send_json(&json!({"type": "cursor-move", "payload": {"cursor": "top"}}))
        .await;
    assert!(
        expect_error(&mut alice)
            .await
            .contains("\"cursor\" must be an object")
    );
    alice
        .send_json(&json!({"type": "language-change", "payload": {}}))
        .await;
    assert!(
        expect_error(&mut alice)
            .await
            .contains("missing field `language`")
    );
    alice
        .send_json(&json!({"type": "join-session", "payload": {"userId": "again"}}))
        .await;
    assert!(expect_error(&mut alice).await.starts_with("Already joined"));

    // A malformed code-change is refused and followed by a session-state to resync from.
    alice
        .send_json(&json!({"type": "code-change", "payload": {"changes": {"baseVersion": 0, "ops": [1.5]}}}))
        .await;
    assert!(expect_error(&mut alice).await.contains("whole numbers"));
    alice.recv_type("session-state").await;
    alice
        .send_json(&json!({"type": "code-change", "payload": {"changes": 42}}))
        .await;
    assert!(
        expect_error(&mut alice)
            .await
            .contains("\"changes\" must be")
    );
    alice.recv_type("session-state").await;

    // Still open and working.
    send_text(&mut alice, "ok").await;
    assert_eq!(
        alice.recv_type("code-ack").await["payload"],
        json!({"version": 1})
    );
}

#[tokio::test]
async fn identity_is_fixed_at_join_and_stamped_on_relays() {
    let server = start(Config::default()).await;
    let (mut alice, _) = join(&server, "s", "u-alice", "Alice").await;
    let (mut bob, _) = join(&server, "s", "u-bob", "Bob").await;
    alice.recv_type("participant-joined").await;

    bob.send_json(&json!({"type": "cursor-move", "payload": {"userId": "u-alice", "cursor": {"line": 1, "column": 2}}}))
        .await;
    let update = alice.recv_type("cursor-update").await;
    assert_eq!(
        update["payload"],
        json!({"userId": "u-bob", "cursor": {"line": 1, "column": 2}})
    );

    bob.send_json(
        &json!({"type": "code-change", "payload": {"userId": "u-alice", "changes": "hi"}}),
    )
    .await;
    assert_eq!(
        alice.recv_type("code-update").await["payload"]["userId"],
        "u-bob"
    );

    bob.send_json(&json!({"type": "execution-result", "payload": {"userId": "u-alice", "output": "2\n", "error": null}}))
        .await;
    assert_eq!(
        alice.recv_type("execution-result").await["payload"]["userId"],
        "u-bob"
    );
}

#[tokio::test]
async fn a_user_with_several_sockets_is_one_participant() {
    let server = start(Config::default()).await;
    let (mut alice, _) = join(&server, "s", "u-alice", "Alice").await;
    let (bob1, state) = join(&server, "s", "u-bob", "Bob").await;
    assert_eq!(state["participants"].as_array().unwrap().len(), 2);
    alice.recv_type("participant-joined").await;
    // A second tab: no second announcement, still two participants (first username kept).
    let (bob2, state) = join(&server, "s", "u-bob", "Robert").await;
    assert_eq!(
        state["participants"],
        json!([{"userId": "u-alice", "username": "Alice"}, {"userId": "u-bob", "username": "Bob"}])
    );
    alice.expect_silence(QUIET).await;

    // Closing one tab announces nothing; closing the last one does.
    bob1.close().await;
    alice.expect_silence(QUIET).await;
    let described = server.http("GET", "/api/sessions/s", None).await.json();
    assert_eq!(described["participants"].as_array().unwrap().len(), 2);
    bob2.close().await;
    let left = alice.recv_type("participant-left").await;
    assert_eq!(left["payload"], json!({"userId": "u-bob"}));
    let described = server.http("GET", "/api/sessions/s", None).await.json();
    assert_eq!(
        described["participants"],
        json!([{"userId": "u-alice", "username": "Alice"}])
    );
}

#[tokio::test]
async fn leave_session_announces_and_unjoins_the_socket() {
    let server = start(Config::default()).await;
    let (mut alice, _) = join(&server, "s", "u-alice", "Alice").await;
    let (mut bob, _) = join(&server, "s", "u-bob", "Bob").await;
    alice.recv_type("participant-joined").await;

    bob.send_json(&json!({"type": "leave-session", "payload": {"userId": "u-bob"}}))
        .await;
    let left = alice.recv_type("participant-left").await;
    assert_eq!(left["payload"], json!({"userId": "u-bob"}));
    // Bob no longer receives the session's events, and must join again to act.
    send_text(&mut alice, "after").await;
    alice.recv_type("code-ack").await;
    bob.send_json(&json!({"type": "cursor-move", "payload": {"cursor": {"line": 0, "column": 0}}}))
        .await;
    assert!(expect_error(&mut bob).await.starts_with("Not joined"));
    bob.send_json(
        &json!({"type": "join-session", "payload": {"userId": "u-bob2", "username": "Bob"}}),
    )
    .await;
    let state = bob.recv_type("session-state").await;
    assert_eq!(state["payload"]["code"], "after");
}

#[tokio::test]
async fn a_disconnect_announces_participant_left() {
    let server = start(Config::default()).await;
    let (mut alice, _) = join(&server, "s", "u-alice", "Alice").await;
    let (bob, _) = join(&server, "s", "u-bob", "Bob").await;
    alice.recv_type("participant-joined").await;
    drop(bob);
    let left = alice.recv_type("participant-left").await;
    assert_eq!(left["payload"], json!({"userId": "u-bob"}));
}

// ---------------------------------------------------------------------------------------------
// Editing

#[tokio::test]
async fn a_full_text_change_updates_the_others_and_acks_the_author() {
    let server = start(Config::default()).await;
    let (mut alice, _) = join(&server, "s", "u-alice", "Alice").await;
    let (mut bob, _) = join(&server, "s", "u-bob", "Bob").await;
    alice.recv_type("participant-joined").await;

    send_text(&mut alice, "let x = 1;").await;
    assert_eq!(
        alice.recv_type("code-ack").await["payload"],
        json!({"version": 1})
    );
    let update = bob.recv_type("code-update").await;
    assert_eq!(
        update["payload"],
        json!({"userId": "u-alice", "code": "let x = 1;", "version": 1, "ops": ["let x = 1;"]})
    );
    // The ops of a full-text change are the minimal edit.
    send_text(&mut alice, "let y = 1;").await;
    alice.recv_type("code-ack").await;
    let update = bob.recv_type("code-update").await;
    assert_eq!(update["payload"]["ops"], json!([4, "y", -1, 5]));
    assert_eq!(update["payload"]["version"], 2);
    alice.expect_silence(QUIET).await;
    let described = server.http("GET", "/api/sessions/s", None).await.json();
    assert_eq!(
        (described["code"].clone(), described["version"].clone()),
        (json!("let y = 1;"), json!(2))
    );
}

/// Two clients edit concurrently from the same version; both end with the same text containing
/// both edits. Each runs the client algorithm ([`ClientDocument`]) on what it receives.
#[tokio::test]
async fn concurrent_operations_from_the_same_version_merge() {
    let server = start(Config::default()).await;
    let body = json!({"code": "fn main() {}\n"}).to_string();
    let id = server
        .http("POST", "/api/sessions", Some(&body))
        .await
        .json()["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let (mut alice, a_state) = join(&server, &id, "u-alice", "Alice").await;
    let (mut bob, b_state) = join(&server, &id, "u-bob", "Bob").await;
    alice.recv_type("participant-joined").await;
    let mut a_doc = ClientDocument::new(a_state["code"].as_str().unwrap(), 0);
    let mut b_doc = ClientDocument::new(b_state["code"].as_str().unwrap(), 0);

    // Both edit version 0 before seeing each other's edit.
    let a_out = a_doc
        .edit(
            Operation::new()
                .retain(11)
                .insert(" println!(\"a\"); ")
                .retain(2),
        )
        .unwrap()
        .unwrap();
    let b_out = b_doc
        .edit(Operation::new().insert("// bob\n").retain(13))
        .unwrap()
        .unwrap();
    assert_eq!((a_out.base_version, b_out.base_version), (0, 0));
    send_op(&mut alice, a_out.base_version, &a_out.op).await;
    send_op(&mut bob, b_out.base_version, &b_out.op).await;

    for (client, doc) in [(&mut alice, &mut a_doc), (&mut bob, &mut b_doc)] {
        // Each receives its ack and the other's update, in server order.
        for _ in 0..2 {
            let frame = client
                .recv_until(|v| v["type"] == "code-ack" || v["type"] == "code-update")
                .await;
            let version = frame["payload"]["version"].as_u64().unwrap();
            if frame["type"] == "code-ack" {
                assert!(doc.ack(version).is_none());
            } else {
                doc.remote(version, &op_of(&frame["payload"]["ops"]))
                    .unwrap();
            }
        }
    }
    let expected = "// bob\nfn main() { println!(\"a\"); }\n";
    assert_eq!(a_doc.text(), expected);
    assert_eq!(b_doc.text(), expected);
    let described = server
        .http("GET", &format!("/api/sessions/{id}"), None)
        .await
        .json();
    assert_eq!(described["code"], expected);
    assert_eq!(described["version"], 2);
}

#[tokio::test]
async fn an_operation_is_transformed_against_edits_it_did_not_see() {
    let server = start(Config::default()).await;
    let (mut alice, _) = join(&server, "s", "u-alice", "Alice").await;
    let (mut bob, _) = join(&server, "s", "u-bob", "Bob").await;
    alice.recv_type("participant-joined").await;
    send_text(&mut alice, "abc").await;
    alice.recv_type("code-ack").await;
    bob.recv_type("code-update").await;
    // Alice types twice more; Bob, still at version 1, deletes "b".
    send_op(&mut alice, 1, &Operation::new().insert("1").retain(3)).await;
    alice.recv_type("code-ack").await;
    send_op(&mut alice, 2, &Operation::new().insert("2").retain(4)).await;
    alice.recv_type("code-ack").await;
    send_op(&mut bob, 1, &Operation::new().retain(1).delete(1).retain(1)).await;
    bob.recv_type("code-update").await;
    bob.recv_type("code-update").await;
    assert_eq!(bob.recv_type("code-ack").await["payload"]["version"], 4);
    let update = alice.recv_type("code-update").await;
    assert_eq!(update["payload"]["ops"], json!([3, -1, 1]));
    assert_eq!(update["payload"]["code"], "21ac");
}

#[tokio::test]
async fn positions_count_unicode_characters() {
    let server = start(Config::default()).await;
    let (mut alice, _) = join(&server, "s", "u-alice", "Alice").await;
    send_text(&mut alice, "héllo 🌍").await;
    alice.recv_type("code-ack").await;
    // 7 characters (not 11 bytes, not 8 UTF-16 units): insert after the globe.
    send_op(&mut alice, 1, &Operation::new().retain(7).insert("!")).await;
    alice.recv_type("code-ack").await;
    send_op(
        &mut alice,
        2,
        &Operation::new().retain(1).delete(1).insert("e").retain(6),
    )
    .await;
    alice.recv_type("code-ack").await;
    let described = server.http("GET", "/api/sessions/s", None).await.json();
    assert_eq!(described["code"], "hello 🌍!");
    // An operation longer than the document is refused.
    send_op(&mut alice, 3, &Operation::new().retain(9)).await;
    let message = expect_error(&mut alice).await;
    assert!(
        message.contains("spans 9 characters but the document at version 3 has 8"),
        "{message}"
    );
    alice.recv_type("session-state").await;
}

#[tokio::test]
async fn a_base_version_outside_the_log_asks_the_client_to_resync() {
    let server = start(Config {
        max_op_log: 2,
        ..Config::default()
    })
    .await;
    let (mut alice, _) = join(&server, "s", "u-alice", "Alice").await;
    for text in ["a", "ab", "abc", "abcd"] {
        send_text(&mut alice, text).await;
        alice.recv_type("code-ack").await;
    }
    send_op(&mut alice, 1, &Operation::new().retain(1).insert("x")).await;
    let message = expect_error(&mut alice).await;
    assert!(message.contains("baseVersion 1 is too old"), "{message}");
    assert!(message.contains("resync"), "{message}");
    let state = alice.recv_type("session-state").await;
    assert_eq!(
        (
            state["payload"]["code"].clone(),
            state["payload"]["version"].clone()
        ),
        (json!("abcd"), json!(4))
    );

    send_op(&mut alice, 9, &Operation::new().retain(4)).await;
    assert!(
        expect_error(&mut alice)
            .await
            .contains("baseVersion 9 is ahead")
    );
    alice.recv_type("session-state").await;

    // Version 2 is still in the log.
    send_op(&mut alice, 2, &Operation::new().retain(2).insert("!")).await;
    assert_eq!(alice.recv_type("code-ack").await["payload"]["version"], 5);
    let described = server.http("GET", "/api/sessions/s", None).await.json();
    assert_eq!(described["code"], "ab!cd");
}

// ---------------------------------------------------------------------------------------------
// Cursors, language, execution

#[tokio::test]
async fn cursor_moves_reach_the_others_only() {
    let server = start(Config::default()).await;
    let (mut alice, _) = join(&server, "s", "u-alice", "Alice").await;
    let (mut bob, _) = join(&server, "s", "u-bob", "Bob").await;
    alice.recv_type("participant-joined").await;
    alice
        .send_json(
            &json!({"type": "cursor-move", "payload": {"cursor": {"line": 4, "column": 10}}}),
        )
        .await;
    let update = bob.recv_type("cursor-update").await;
    assert_eq!(
        update["payload"],
        json!({"userId": "u-alice", "cursor": {"line": 4, "column": 10}})
    );
    alice.expect_silence(QUIET).await;
}

#[tokio::test]
async fn a_language_change_reaches_everyone_and_sticks() {
    let server = start(Config::default()).await;
    let (mut alice, _) = join(&server, "s", "u-alice", "Alice").await;
    let (mut bob, _) = join(&server, "s", "u-bob", "Bob").await;
    alice.recv_type("participant-joined").await;
    bob.send_json(&json!({"type": "language-change", "payload": {"language": "python"}}))
        .await;
    for client in [&mut alice, &mut bob] {
        let updated = client.recv_type("language-updated").await;
        assert_eq!(
            updated["payload"],
            json!({"userId": "u-bob", "language": "python"})
        );
    }
    assert_eq!(
        server.http("GET", "/api/sessions/s", None).await.json()["language"],
        "python"
    );
    let (_carol, state) = join(&server, "s", "u-carol", "Carol").await;
    assert_eq!(state["language"], "python");
}

#[tokio::test]
async fn execution_requests_and_results_are_relayed_to_the_others() {
    let server = start(Config::default()).await;
    let (mut alice, _) = join(&server, "s", "u-alice", "Alice").await;
    let (mut bob, _) = join(&server, "s", "u-bob", "Bob").await;
    let (mut carol, _) = join(&server, "s", "u-carol", "Carol").await;
    alice.recv_type("participant-joined").await;
    alice.recv_type("participant-joined").await;
    bob.recv_type("participant-joined").await;

    alice
        .send_json(&json!({"type": "execute-code", "payload": {"language": "python", "code": "print(1 + 1)"}}))
        .await;
    for client in [&mut bob, &mut carol] {
        let relayed = client.recv_type("execute-code").await;
        assert_eq!(
            relayed["payload"],
            json!({"userId": "u-alice", "language": "python", "code": "print(1 + 1)"})
        );
    }
    alice.expect_silence(QUIET).await;

    // Without language, the session's is used; without code, none is relayed (the others hold
    // the document already, and filling it in would turn a tiny frame into a huge one).
    send_text(&mut alice, "console.log(2)").await;
    alice.recv_type("code-ack").await;
    alice.send_json(&json!({"type": "execute-code"})).await;
    let relayed = bob.recv_until(|v| v["type"] == "execute-code").await;
    assert_eq!(
        relayed["payload"],
        json!({"userId": "u-alice", "language": "javascript"})
    );

    bob.send_json(
        &json!({"type": "execution-result", "payload": {"output": "2\n", "error": null}}),
    )
    .await;
    for client in [&mut alice, &mut carol] {
        let result = client.recv_until(|v| v["type"] == "execution-result").await;
        assert_eq!(
            result["payload"],
            json!({"userId": "u-bob", "output": "2\n", "error": null})
        );
    }
    bob.expect_silence(QUIET).await;
}

// ---------------------------------------------------------------------------------------------
// Limits and isolation

#[tokio::test]
async fn sessions_are_isolated() {
    let server = start(Config::default()).await;
    let (mut a1, _) = join(&server, "one", "u1", "A").await;
    let (mut b1, _) = join(&server, "two", "u2", "B").await;
    send_text(&mut a1, "only in one").await;
    a1.recv_type("code-ack").await;
    a1.send_json(&json!({"type": "language-change", "payload": {"language": "go"}}))
        .await;
    a1.recv_type("language-updated").await;
    b1.expect_silence(QUIET).await;
    let two = server.http("GET", "/api/sessions/two", None).await.json();
    assert_eq!(
        (two["code"].clone(), two["language"].clone()),
        (json!(""), json!("javascript"))
    );
}

#[tokio::test]
async fn a_maximal_document_fits_the_default_frame_limit_and_one_byte_more_is_refused() {
    // A refused edit answers with an error followed by a session-state of up to 6 MiB here: the
    // runtime's default byte bound (backlog + one largest frame) holds both.
    let server = TestServer::start(Collab::new(Config::default()), ServerConfig::default()).await;
    let max = Config::default().max_document_bytes;
    let (mut alice, _) = join(&server, "s", "u-alice", "Alice").await;
    // Worst case for JSON: every character escaped as \u0001 (six bytes on the wire).
    let worst = "\u{1}".repeat(max);
    send_text(&mut alice, &worst).await;
    assert_eq!(alice.recv_type("code-ack").await["payload"]["version"], 1);
    let (_bob, state) = join(&server, "s", "u-bob", "Bob").await;
    assert_eq!(state["code"].as_str().unwrap().len(), max);
    alice.recv_type("participant-joined").await;

    send_op(&mut alice, 1, &Operation::new().retain(max).insert("x")).await;
    let message = expect_error(&mut alice).await;
    assert!(
        message.contains(&format!(
            "would be {} bytes, over the limit of {max} bytes",
            max + 1
        )),
        "{message}"
    );
    alice.recv_type("session-state").await;
    send_text(&mut alice, &"y".repeat(max + 1)).await;
    assert!(expect_error(&mut alice).await.contains("over the limit"));
}

/// The worst case outbound: a code-update with a maximal, fully escaped document and an operation
/// inserting all of it. The runtime sizes the write buffer from `max_outbound_frame_bytes` even
/// with a default `ServerConfig`.
#[tokio::test]
async fn a_worst_case_update_reaches_the_others_with_the_default_server_config() {
    let config = Config::default();
    let server_config = ServerConfig::default();
    let max = config.max_document_bytes;
    let server = TestServer::start(Collab::new(config), server_config).await;
    let (mut alice, _) = join(&server, "s", "u-alice", "Alice").await;
    let (mut bob, _) = join(&server, "s", "u-bob", "Bob").await;
    alice.recv_type("participant-joined").await;
    send_text(&mut alice, &"\u{1}".repeat(max)).await;
    alice.recv_type("code-ack").await;
    let update = bob.recv_type("code-update").await;
    assert_eq!(update["payload"]["code"].as_str().unwrap().len(), max);
}

#[tokio::test]
async fn a_maximal_document_reaches_the_other_participants() {
    let server = start(Config::default()).await;
    let max = Config::default().max_document_bytes;
    let (mut alice, _) = join(&server, "s", "u-alice", "Alice").await;
    let (mut bob, _) = join(&server, "s", "u-bob", "Bob").await;
    alice.recv_type("participant-joined").await;
    let text: String = "fn f() { \"quoted\" }\n"
        .chars()
        .cycle()
        .take(max)
        .collect();
    send_text(&mut alice, &text).await;
    alice.recv_type("code-ack").await;
    let update = bob.recv_type("code-update").await;
    assert_eq!(update["payload"]["code"].as_str().unwrap(), text);
}

#[tokio::test]
async fn the_participant_limit_counts_users_not_sockets() {
    let server = start(Config {
        max_participants: 2,
        ..Config::default()
    })
    .await;
    let (_alice, _) = join(&server, "s", "u-alice", "Alice").await;
    let (_bob, _) = join(&server, "s", "u-bob", "Bob").await;
    let mut carol = server.connect("/ws/s").await;
    carol
        .send_json(&json!({"type": "join-session", "payload": {"userId": "u-carol"}}))
        .await;
    assert_eq!(
        expect_error(&mut carol).await,
        "Session is full: at most 2 participants"
    );
    // Another tab of a present user still fits; Carol's socket is open and may retry.
    let (_bob2, state) = join(&server, "s", "u-bob", "Bob").await;
    assert_eq!(state["participants"].as_array().unwrap().len(), 2);
    carol
        .send_json(&json!({"type": "cursor-move", "payload": {"cursor": {}}}))
        .await;
    assert!(expect_error(&mut carol).await.starts_with("Not joined"));
}

#[tokio::test]
async fn the_session_limit_refuses_new_sessions_only() {
    let server = start(Config {
        max_sessions: 2,
        ..Config::default()
    })
    .await;
    assert_eq!(server.http("POST", "/api/sessions", None).await.status, 201);
    let _a = server.connect("/ws/second").await;
    let full = server.http("POST", "/api/sessions", None).await;
    assert_eq!(full.status, 503);
    assert!(
        full.json()["error"]
            .as_str()
            .unwrap()
            .contains("session limit reached (2 sessions)")
    );
    let url = server.ws_url("/ws/third");
    assert_eq!(
        Client::refused_status(&url, ConnectOptions::default()).await,
        503
    );
    // Existing sessions stay reachable.
    let (_b, _) = join(&server, "second", "u1", "A").await;
}

#[tokio::test]
async fn empty_sessions_expire_after_the_idle_ttl() {
    let ttl = Duration::from_millis(300);
    let server = start(Config {
        idle_ttl: ttl,
        ..Config::default()
    })
    .await;
    let created = server.http("POST", "/api/sessions", None).await.json();
    let unused = created["sessionId"].as_str().unwrap().to_owned();
    let (mut alice, _) = join(&server, "busy", "u-alice", "Alice").await;
    send_text(&mut alice, "kept while connected").await;
    alice.recv_type("code-ack").await;

    // Idle TTL is a duration, not an event: waiting past it is the observable behaviour.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert_eq!(
        server
            .http("GET", &format!("/api/sessions/{unused}"), None)
            .await
            .status,
        404
    );
    let busy = server.http("GET", "/api/sessions/busy", None).await;
    assert_eq!(busy.json()["code"], "kept while connected");

    alice.close().await;
    // Still there right after the last socket left...
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while server.http("GET", "/api/sessions/busy", None).await.status == 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "session never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...and a new connection to the same id starts a fresh session.
    let (_bob, state) = join(&server, "busy", "u-bob", "Bob").await;
    assert_eq!(
        (state["code"].clone(), state["version"].clone()),
        (json!(""), json!(0))
    );
}

// ---------------------------------------------------------------------------------------------
// Signed identity, in process (the server verified a token before `admit` / `http`)

mod signed_in_process {
    use std::net::{IpAddr, Ipv4Addr};

    use serde_json::{Map, Value};
    use switchboard_collab::{Collab, Config};
    use switchboard_core::{Caller, HttpRequest, Identity, Protocol, Reject};
    use switchboard_testkit::{Driver, Session, json};

    fn identity(sub: &str, sessions: Option<Value>) -> Identity {
        let mut claims = Map::new();
        if let Some(sessions) = sessions {
            claims.insert("sessions".to_owned(), sessions);
        }
        Identity::new(sub, None, claims)
    }

    fn join(user: &str) -> Value {
        json!({"type": "join-session", "payload": {"userId": user, "username": user}})
    }

    fn types(session: &mut Session<Collab>) -> Vec<(String, Value)> {
        session
            .json_frames()
            .into_iter()
            .map(|frame| {
                (
                    frame["type"].as_str().unwrap().to_owned(),
                    frame["payload"].clone(),
                )
            })
            .collect()
    }

    fn request(method: &str, path: &str, caller: Caller) -> HttpRequest {
        HttpRequest {
            method: method.to_owned(),
            path: path.to_owned(),
            query: None,
            body: bytes::Bytes::new(),
            host: Some("127.0.0.1".to_owned()),
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            caller,
        }
    }

    #[tokio::test]
    async fn a_signed_socket_joins_only_as_its_subject() {
        let driver = Driver::new(Collab::new(Config::default()));
        let alice = identity("alice", None);
        let mut session = driver.open_as("/ws/room", Some(&alice)).await.unwrap();
        session.json(&join("mallory")).await;
        let frames = types(&mut session);
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0].0, "error");
        assert!(
            frames[0].1["message"]
                .as_str()
                .unwrap()
                .contains("signed-in user"),
            "{frames:?}"
        );
        // Not joined: edits are refused as before a join.
        session
            .json(&json!({"type": "code-change", "payload": {"changes": "x"}}))
            .await;
        assert!(
            types(&mut session)[0].1["message"]
                .as_str()
                .unwrap()
                .starts_with("Not joined")
        );
        // The right userId joins; the participant list names the subject.
        session.json(&join("alice")).await;
        let frames = types(&mut session);
        assert_eq!(frames[0].0, "session-state", "{frames:?}");
        assert_eq!(frames[0].1["participants"][0]["userId"], "alice");
        // After leaving, a join is still only as the subject.
        session.json(&json!({"type": "leave-session"})).await;
        session.json(&join("mallory")).await;
        let frames = types(&mut session);
        assert_eq!(frames.last().unwrap().0, "error", "{frames:?}");
    }

    #[tokio::test]
    async fn the_sessions_claim_limits_which_sessions_a_token_may_open() {
        let driver = Driver::new(Collab::new(Config::default()));
        let listed = identity("alice", Some(json!(["room-1", "room-2"])));
        assert!(driver.open_as("/ws/room-1", Some(&listed)).await.is_ok());
        assert!(driver.open_as("/ws/room-2/", Some(&listed)).await.is_ok());
        let refused = driver
            .open_as("/ws/room-3", Some(&listed))
            .await
            .unwrap_err();
        assert!(matches!(refused, Reject::Forbidden(_)), "{refused:?}");
        for any in [None, Some(json!("*"))] {
            let token = identity("alice", any);
            assert!(driver.open_as("/ws/room-3", Some(&token)).await.is_ok());
        }
        for malformed in [json!("room-3"), json!(7), json!(["room-3", 7])] {
            let token = identity("alice", Some(malformed.clone()));
            let refused = driver
                .open_as("/ws/room-3", Some(&token))
                .await
                .unwrap_err();
            assert_eq!(refused.status(), 403, "{malformed}");
        }
        // Bad paths keep their own answers.
        assert_eq!(
            driver.open_as("/ws", Some(&listed)).await.unwrap_err(),
            Reject::NotFound
        );
        // Without signed identity any session opens, as before.
        assert!(driver.open_as("/ws/room-4", None).await.is_ok());
    }

    #[tokio::test]
    async fn rest_needs_a_token_and_the_claim_when_auth_is_on() {
        let driver = Driver::new(Collab::new(Config::default()));
        let protocol = driver.protocol();
        let engine = driver.engine();
        let http = |method: &str, path: &str, caller: Caller| {
            protocol.http(engine, request(method, path, caller))
        };
        // Open (no auth configured): as before.
        let created = http("POST", "/api/sessions", Caller::Open).await.unwrap();
        assert_eq!(created.status, 201);
        let id: Value = serde_json::from_slice(&created.body).unwrap();
        let id = id["sessionId"].as_str().unwrap().to_owned();
        let path = format!("/api/sessions/{id}");
        assert_eq!(http("GET", &path, Caller::Open).await.unwrap().status, 200);
        // Anonymous: the API answers 401, the demo page still loads.
        assert_eq!(
            http("POST", "/api/sessions", Caller::Anonymous)
                .await
                .unwrap()
                .status,
            401
        );
        assert_eq!(
            http("GET", &path, Caller::Anonymous).await.unwrap().status,
            401
        );
        assert_eq!(
            http("GET", "/", Caller::Anonymous).await.unwrap().status,
            200
        );
        assert_eq!(
            http("GET", "/app.js", Caller::Anonymous)
                .await
                .unwrap()
                .status,
            200
        );
        // Verified: the claim decides.
        let any = Caller::Verified(identity("alice", None));
        assert_eq!(
            http("POST", "/api/sessions", any.clone())
                .await
                .unwrap()
                .status,
            201
        );
        assert_eq!(http("GET", &path, any).await.unwrap().status, 200);
        let this_one = Caller::Verified(identity("alice", Some(json!([id.clone()]))));
        assert_eq!(
            http("GET", &path, this_one.clone()).await.unwrap().status,
            200
        );
        assert_eq!(
            http("POST", "/api/sessions", this_one)
                .await
                .unwrap()
                .status,
            403,
            "a new session's id is the server's: only a token allowed any session creates one"
        );
        let other = Caller::Verified(identity("alice", Some(json!(["elsewhere"]))));
        assert_eq!(http("GET", &path, other).await.unwrap().status, 403);
    }
}

// ---------------------------------------------------------------------------------------------
// Signed identity over real sockets: the server verifies HS256 / RS256 tokens

mod signed_over_sockets {

    use serde_json::Value;
    use switchboard_collab::{Collab, Config};
    use switchboard_server::ServerConfig;
    use switchboard_testkit::jwt::{Keys, claims, now, refused_tokens};
    use switchboard_testkit::{Client, ConnectOptions, TestServer, json};

    async fn start_signed(keys: &Keys) -> TestServer {
        let config = ServerConfig {
            auth: Some(keys.verifier()),
            ..ServerConfig::default()
        };
        TestServer::start(Collab::new(Config::default()), config).await
    }

    /// A token for `sub`, limited to `sessions` when given.
    fn token(keys: &Keys, sub: &str, sessions: Option<Value>) -> String {
        let mut claims = claims(sub, 60);
        if let Some(sessions) = sessions {
            claims["sessions"] = sessions;
        }
        keys.token(&claims)
    }

    async fn status(server: &TestServer, path: &str) -> u16 {
        Client::refused_status(&server.ws_url(path), ConnectOptions::default()).await
    }

    async fn join(client: &mut Client, user: &str) {
        client
            .send_json(&json!({"type": "join-session", "payload": {"userId": user}}))
            .await;
    }

    #[tokio::test]
    async fn signed_tokens_join_as_the_subject_within_the_sessions_claim() {
        for keys in [Keys::hs256(), Keys::rs256_shared()] {
            let server = start_signed(&keys).await;
            assert_eq!(status(&server, "/ws/room").await, 401, "no token");
            for (what, token) in refused_tokens(&keys, "alice") {
                let path = format!("/ws/room?token={token}");
                assert_eq!(status(&server, &path).await, 401, "{what}");
            }
            let alice = token(&keys, "alice", Some(json!(["room"])));
            assert_eq!(
                status(&server, &format!("/ws/elsewhere?token={alice}")).await,
                403,
                "a session outside the claim"
            );

            // Bob's token (any session) tries to join as alice: refused, then joins as bob.
            let bob = token(&keys, "bob", None);
            let mut bobs = server.connect(&format!("/ws/room?token={bob}")).await;
            join(&mut bobs, "alice").await;
            let refused = bobs.recv_type("error").await;
            let message = refused["payload"]["message"].as_str().unwrap();
            assert!(message.contains("signed-in user"), "{message}");
            join(&mut bobs, "bob").await;
            let state = bobs.recv_type("session-state").await;
            assert_eq!(state["payload"]["participants"][0]["userId"], "bob");

            let mut alices = server.connect(&format!("/ws/room?token={alice}")).await;
            join(&mut alices, "alice").await;
            alices.recv_type("session-state").await;
            let joined = bobs.recv_type("participant-joined").await;
            assert_eq!(
                joined["payload"]["userId"],
                "alice",
                "{:?}",
                keys.algorithm()
            );
            alices
                .send_json(
                    &json!({"type": "code-change", "payload": {"userId": "bob", "changes": "hi"}}),
                )
                .await;
            let update = bobs.recv_type("code-update").await;
            assert_eq!(
                update["payload"]["userId"], "alice",
                "stamped, not taken from the payload"
            );
        }
    }

    #[tokio::test]
    async fn signed_rest_needs_a_token_and_the_sessions_claim() {
        for keys in [Keys::hs256(), Keys::rs256_shared()] {
            let server = start_signed(&keys).await;
            // The demo page stays public; the API needs a token.
            assert_eq!(server.http("GET", "/", None).await.status, 200);
            let anonymous = server.http("POST", "/api/sessions", None).await;
            assert_eq!(anonymous.status, 401, "{}", anonymous.body);
            assert_eq!(
                server.http("GET", "/api/sessions/x", None).await.status,
                401
            );

            let any = token(&keys, "alice", Some(json!("*")));
            let created = server
                .http("POST", &format!("/api/sessions?token={any}"), None)
                .await;
            assert_eq!(created.status, 201, "{}", created.body);
            let id = created.json()["sessionId"].as_str().unwrap().to_owned();
            let read = |token: String| {
                let server = &server;
                let path = format!("/api/sessions/{id}?token={token}");
                async move { server.http("GET", &path, None).await.status }
            };
            assert_eq!(read(any).await, 200);
            assert_eq!(read(token(&keys, "bob", Some(json!([id])))).await, 200);
            assert_eq!(read(token(&keys, "bob", Some(json!(["other"])))).await, 403);
            let listed = token(&keys, "bob", Some(json!([id])));
            let create = server
                .http("POST", &format!("/api/sessions?token={listed}"), None)
                .await;
            assert_eq!(create.status, 403, "{}", create.body);
            // An expired token is the server's 401, before collab sees the request.
            let expired = keys.token(&json!({"sub": "alice", "exp": now() - 120}));
            let path = format!("/api/sessions/{id}?token={expired}");
            assert_eq!(server.http("GET", &path, None).await.status, 401);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics: the protocol's counters, seen by a recorder local to the test's thread

mod metrics_in_process {
    use std::net::{IpAddr, Ipv4Addr};

    use metrics_util::debugging::DebuggingRecorder;
    use serde_json::Value;
    use switchboard_collab::ot::Operation;
    use switchboard_collab::telemetry::{
        ERRORS, JOINS, OPERATIONS, RESYNCS, SESSIONS_CREATED, TRANSFORMED,
    };
    use switchboard_collab::{Collab, Config};
    use switchboard_core::{Caller, HttpRequest, Protocol};
    use switchboard_testkit::metrics::counter;
    use switchboard_testkit::{Driver, json};

    fn op(base: u64, op: &Operation) -> Value {
        json!({"type": "code-change", "payload": {"changes": {"baseVersion": base, "ops": op}}})
    }

    /// The driver runs every hook (and the REST handler) on this task, so a recorder set for
    /// this thread sees each event: a session created, joins, edits applied and transformed,
    /// a refused edit's resync and errors by frame.
    #[tokio::test]
    async fn counters_follow_sessions_joins_edits_resyncs_and_errors() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _local = metrics::set_default_local_recorder(&recorder);

        let driver = Driver::new(Collab::new(Config::default()));
        let created = driver
            .protocol()
            .http(
                driver.engine(),
                HttpRequest {
                    method: "POST".to_owned(),
                    path: "/api/sessions".to_owned(),
                    query: None,
                    body: bytes::Bytes::new(),
                    host: Some("127.0.0.1".to_owned()),
                    client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    caller: Caller::Open,
                },
            )
            .await
            .unwrap();
        assert_eq!(created.status, 201);
        let id: Value = serde_json::from_slice(&created.body).unwrap();
        let path = format!("/ws/{}", id["sessionId"].as_str().unwrap());
        let mut alice = driver.open(&path).await.unwrap();
        let mut bob = driver.open(&path).await.unwrap();
        for (session, user) in [(&mut alice, "alice"), (&mut bob, "bob")] {
            session
                .json(&json!({"type": "join-session", "payload": {"userId": user}}))
                .await;
        }
        alice
            .json(&json!({"type": "code-change", "payload": {"changes": "abc"}}))
            .await;
        alice
            .json(&op(1, &Operation::new().insert("1").retain(3)))
            .await;
        // Bob, still at version 1, deletes "b": transformed against alice's operation.
        bob.json(&op(1, &Operation::new().retain(1).delete(1).retain(1)))
            .await;
        // A version the server never had: refused, and bob gets a fresh session-state.
        bob.json(&op(99, &Operation::new().retain(3))).await;
        alice.json(&json!({"type": "nope"})).await;
        let frames = bob.json_frames();
        let last = frames.last().unwrap();
        assert_eq!(last["type"], "session-state", "{frames:?}");

        let snapshot = snapshotter.snapshot().into_vec();
        assert_eq!(counter(&snapshot, SESSIONS_CREATED, &[]), 1);
        assert_eq!(counter(&snapshot, JOINS, &[]), 2);
        assert_eq!(counter(&snapshot, OPERATIONS, &[("kind", "full_text")]), 1);
        assert_eq!(counter(&snapshot, OPERATIONS, &[("kind", "operation")]), 2);
        assert_eq!(counter(&snapshot, TRANSFORMED, &[]), 1);
        assert_eq!(counter(&snapshot, RESYNCS, &[]), 1);
        assert_eq!(counter(&snapshot, ERRORS, &[("frame", "code-change")]), 1);
        assert_eq!(counter(&snapshot, ERRORS, &[("frame", "invalid")]), 1);
    }
}
