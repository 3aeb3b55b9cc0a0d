//! collab across nodes: two servers sharing one in-memory cluster engine. What a participant does
//! on node A reaches participants on node B (joins, cursors, edits, language), concurrent edits
//! made on both nodes converge, every author gets its acks and the others' updates in version
//! order, late joiners and REST on either node see the current document, and a node that
//! disappears takes its participants with it.
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
use switchboard_collab::{ClientDocument, Collab, Config, OutgoingEdit};
use switchboard_core::Engine;
use switchboard_core::engine::{MemoryCluster, MemoryLimits};
use switchboard_server::ServerConfig;
use switchboard_testkit::{Client, TestServer, json};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

use common::join;

const QUIET: Duration = Duration::from_millis(150);
/// The bound on a whole concurrent-editing run.
const RUN: Duration = Duration::from_secs(30);

struct Node {
    server: TestServer,
    engine: Engine,
}

async fn node(cluster: &MemoryCluster, config: Config) -> Node {
    let engine = cluster.node();
    let server_config = ServerConfig {
        engine: engine.clone(),
        ..ServerConfig::default()
    };
    Node {
        server: TestServer::start(Collab::new(config), server_config).await,
        engine,
    }
}

/// A cluster of two nodes, A and B.
async fn two_nodes() -> (MemoryCluster, Node, Node) {
    let cluster = MemoryCluster::new(MemoryLimits::default());
    let a = node(&cluster, Config::default()).await;
    let b = node(&cluster, Config::default()).await;
    (cluster, a, b)
}

async fn send_edit(client: &mut Client, edit: &OutgoingEdit) {
    client
        .send_json(&json!({"type": "code-change", "payload": {"changes": {"baseVersion": edit.base_version, "ops": edit.op}}}))
        .await;
}

async fn describe(server: &TestServer, session: &str) -> Value {
    let reply = server
        .http("GET", &format!("/api/sessions/{session}"), None)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

#[tokio::test]
async fn participants_on_two_nodes_see_each_others_joins_cursors_and_edits() {
    let (_cluster, a, b) = two_nodes().await;
    let (mut alice, _) = join(&a.server, "s", "u-alice", "Alice").await;
    let (mut bob, state) = join(&b.server, "s", "u-bob", "Bob").await;
    assert_eq!(
        state["participants"],
        json!([{"userId": "u-alice", "username": "Alice"}, {"userId": "u-bob", "username": "Bob"}])
    );
    let joined = alice.recv_type("participant-joined").await;
    assert_eq!(
        joined["payload"],
        json!({"userId": "u-bob", "username": "Bob"})
    );

    // Cursors both ways, never echoed to the sender.
    bob.send_json(&json!({"type": "cursor-move", "payload": {"cursor": {"line": 2, "column": 5}}}))
        .await;
    assert_eq!(
        alice.recv_type("cursor-update").await["payload"],
        json!({"userId": "u-bob", "cursor": {"line": 2, "column": 5}})
    );
    alice
        .send_json(&json!({"type": "cursor-move", "payload": {"cursor": {"line": 1, "column": 0}}}))
        .await;
    assert_eq!(
        bob.recv_type("cursor-update").await["payload"]["userId"],
        "u-alice"
    );
    bob.expect_silence(QUIET).await;
    alice.expect_silence(QUIET).await;

    // Edits: the author gets its ack, the other node's participant the update.
    alice
        .send_json(&json!({"type": "code-change", "payload": {"changes": "let x = 1;"}}))
        .await;
    assert_eq!(
        alice.recv_type("code-ack").await["payload"],
        json!({"version": 1})
    );
    let update = bob.recv_type("code-update").await;
    assert_eq!(
        update["payload"],
        json!({"userId": "u-alice", "code": "let x = 1;", "version": 1, "ops": ["let x = 1;"]})
    );
    let rename = Operation::new()
        .retain(4)
        .insert("count")
        .delete(1)
        .retain(5);
    bob.send_json(
        &json!({"type": "code-change", "payload": {"changes": {"baseVersion": 1, "ops": rename}}}),
    )
    .await;
    assert_eq!(bob.recv_type("code-ack").await["payload"]["version"], 2);
    let update = alice.recv_type("code-update").await;
    assert_eq!(update["payload"]["code"], "let count = 1;");
    assert_eq!(update["payload"]["userId"], "u-bob");

    // Language and execution relays cross nodes too.
    bob.send_json(&json!({"type": "language-change", "payload": {"language": "python"}}))
        .await;
    for client in [&mut alice, &mut bob] {
        assert_eq!(
            client.recv_type("language-updated").await["payload"],
            json!({"userId": "u-bob", "language": "python"})
        );
    }
    alice.send_json(&json!({"type": "execute-code"})).await;
    assert_eq!(
        bob.recv_type("execute-code").await["payload"],
        json!({"userId": "u-alice", "language": "python"})
    );

    // Leaving on one node is announced on the other.
    bob.close().await;
    assert_eq!(
        alice.recv_type("participant-left").await["payload"],
        json!({"userId": "u-bob"})
    );
    for node in [&a, &b] {
        let described = describe(&node.server, "s").await;
        assert_eq!(
            (
                described["code"].clone(),
                described["version"].clone(),
                described["language"].clone()
            ),
            (json!("let count = 1;"), json!(2), json!("python"))
        );
        assert_eq!(
            described["participants"],
            json!([{"userId": "u-alice", "username": "Alice"}])
        );
    }
}

#[tokio::test]
async fn a_user_with_tabs_on_both_nodes_is_one_participant() {
    let (_cluster, a, b) = two_nodes().await;
    let (mut alice, _) = join(&a.server, "s", "u-alice", "Alice").await;
    let (bob_a, _) = join(&a.server, "s", "u-bob", "Bob").await;
    alice.recv_type("participant-joined").await;
    // Bob's second tab, on the other node: no second announcement, the first name kept.
    let (bob_b, state) = join(&b.server, "s", "u-bob", "Robert").await;
    assert_eq!(
        state["participants"],
        json!([{"userId": "u-alice", "username": "Alice"}, {"userId": "u-bob", "username": "Bob"}])
    );
    alice.expect_silence(QUIET).await;
    bob_a.close().await;
    alice.expect_silence(QUIET).await;
    bob_b.close().await;
    assert_eq!(
        alice.recv_type("participant-left").await["payload"],
        json!({"userId": "u-bob"})
    );
}

/// One simulated editor: types `keystrokes` characters at positions derived from `seed`, without
/// waiting for acknowledgements, running the client half of OT on everything it receives.
struct Editor {
    client: Client,
    doc: ClientDocument,
    typed: String,
    resyncs: usize,
}

impl Editor {
    fn new(client: Client, state: &Value) -> Self {
        Self {
            client,
            doc: ClientDocument::new(
                state["code"].as_str().unwrap(),
                state["version"].as_u64().unwrap(),
            ),
            typed: String::new(),
            resyncs: 0,
        }
    }

    /// Applies one frame from the server; returns an edit to send, if any.
    fn receive(&mut self, message: Message) -> Option<OutgoingEdit> {
        assert!(
            !message.is_close(),
            "the server closed an editor: {message:?}"
        );
        let Ok(text) = message.into_text() else {
            return None;
        };
        let frame: Value = serde_json::from_str(&text).unwrap();
        let payload = &frame["payload"];
        match frame["type"].as_str().unwrap() {
            "code-ack" => self.doc.ack(payload["version"].as_u64().unwrap()),
            "code-update" => {
                let op: Operation = serde_json::from_value(payload["ops"].clone()).unwrap();
                self.doc
                    .remote(payload["version"].as_u64().unwrap(), &op)
                    .unwrap();
                None
            }
            "session-state" => {
                self.resyncs += 1;
                self.doc.reset(
                    payload["code"].as_str().unwrap(),
                    payload["version"].as_u64().unwrap(),
                );
                None
            }
            _ => None,
        }
    }

    async fn type_along(mut self, letter: char, seed: usize, keystrokes: usize) -> Self {
        let mut left = keystrokes;
        let mut step = seed;
        loop {
            if left > 0 {
                left -= 1;
                step = step.wrapping_mul(31).wrapping_add(7);
                let len = self.doc.len_chars();
                let at = step % (len + 1);
                let op = Operation::new()
                    .retain(at)
                    .insert(&letter.to_string())
                    .retain(len - at);
                self.typed.push(letter);
                if let Some(edit) = self.doc.edit(op).unwrap() {
                    send_edit(&mut self.client, &edit).await;
                }
            }
            let wait = if left > 0 {
                Duration::from_millis(3)
            } else {
                QUIET
            };
            match self.client.recv_within(wait).await {
                Some(message) => {
                    if let Some(edit) = self.receive(message) {
                        send_edit(&mut self.client, &edit).await;
                    }
                }
                None if left == 0 && self.doc.is_synchronized() => return self,
                None => {}
            }
        }
    }

    /// Reads updates until this editor has seen `version`.
    async fn catch_up(&mut self, version: u64) {
        let deadline = Instant::now() + RUN;
        while self.doc.version() < version {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = self
                .client
                .recv_within(left)
                .await
                .expect("the editor never caught up");
            assert!(self.receive(message).is_none());
        }
    }
}

#[tokio::test]
async fn concurrent_edits_from_both_nodes_converge() {
    let (_cluster, a, b) = two_nodes().await;
    let created = a
        .server
        .http(
            "POST",
            "/api/sessions",
            Some(&json!({"code": "fn main() {}\n"}).to_string()),
        )
        .await;
    let id = created.json()["sessionId"].as_str().unwrap().to_owned();
    let mut editors = Vec::new();
    // Letters the starting text does not contain, so each editor's keystrokes can be counted.
    for (n, (node, letter)) in [(&a, 'w'), (&b, 'x'), (&a, 'y'), (&b, 'z')]
        .into_iter()
        .enumerate()
    {
        let (client, state) = join(&node.server, &id, &format!("u-{letter}"), "E").await;
        assert_eq!(state["code"], "fn main() {}\n");
        editors.push((Editor::new(client, &state), letter, n));
    }
    // Everyone joined before anyone types: drain the announcements.
    for (editor, _, _) in &mut editors {
        while editor.client.recv_within(QUIET).await.is_some() {}
    }

    let runs = editors
        .into_iter()
        .map(|(editor, letter, n)| tokio::spawn(editor.type_along(letter, n * 13 + 1, 40)));
    let mut editors = Vec::new();
    for run in runs {
        editors.push(
            timeout(RUN, run)
                .await
                .expect("editing ran too long")
                .unwrap(),
        );
    }

    let on_a = describe(&a.server, &id).await;
    let on_b = describe(&b.server, &id).await;
    assert_eq!(on_a["code"], on_b["code"]);
    assert_eq!(on_a["version"], on_b["version"]);
    let version = on_a["version"].as_u64().unwrap();
    let text = on_a["code"].as_str().unwrap().to_owned();
    for editor in &mut editors {
        editor.catch_up(version).await;
        assert_eq!(editor.doc.text(), text, "an editor diverged");
        assert_eq!(editor.doc.version(), version);
    }
    // No edit was refused (a refusal resyncs and drops the editor's pending keystrokes; a node
    // loading its copy after the other node's edits still transforms edits based on older
    // versions), so every keystroke is in the text.
    let resyncs: Vec<usize> = editors.iter().map(|editor| editor.resyncs).collect();
    assert_eq!(resyncs, [0, 0, 0, 0], "refused edits (resyncs per editor)");
    for editor in &editors {
        let expected = editor.typed.len();
        let letter = editor.typed.chars().next().unwrap();
        assert_eq!(
            text.chars().filter(|c| *c == letter).count(),
            expected,
            "keystrokes of {letter:?} lost"
        );
    }
}

/// A client's edit based on a version from before its node first loaded the document (the
/// other node's edits landed first, and the client had not seen them yet) is transformed as it
/// would be on one node, not refused: the node takes the operations it missed from the shared
/// log.
#[tokio::test]
async fn an_edit_based_on_a_version_before_the_node_loaded_the_document_is_transformed() {
    let (_cluster, a, b) = two_nodes().await;
    let (mut alice, _) = join(&a.server, "first", "u-alice", "Alice").await;
    let (mut bob, state) = join(&b.server, "first", "u-bob", "Bob").await;
    assert_eq!(state["version"], 0);
    alice.recv_type("participant-joined").await;
    // Two edits through A; nothing has been edited through B yet.
    for (version, op) in [(0, json!(["hello"])), (1, json!([5, " world"]))] {
        alice
            .send_json(&json!({"type": "code-change", "payload": {"changes": {"baseVersion": version, "ops": op}}}))
            .await;
        assert_eq!(
            alice.recv_type("code-ack").await["payload"]["version"],
            version + 1
        );
    }
    // Bob typed "> " at the start of the empty document he joined (version 0).
    bob.send_json(
        &json!({"type": "code-change", "payload": {"changes": {"baseVersion": 0, "ops": ["> "]}}}),
    )
    .await;
    let answer = bob
        .recv_until(|v| v["type"] == "code-ack" || v["type"] == "error")
        .await;
    assert_eq!(
        answer,
        json!({"type": "code-ack", "payload": {"version": 3}})
    );
    let update = alice.recv_type("code-update").await;
    assert_eq!(update["payload"]["code"], "> hello world");
    assert_eq!(describe(&b.server, "first").await["code"], "> hello world");
}

#[tokio::test]
async fn a_late_joiner_on_b_gets_the_current_code_and_version() {
    let (_cluster, a, b) = two_nodes().await;
    let (mut alice, _) = join(&a.server, "late", "u-alice", "Alice").await;
    for (n, text) in ["a", "ab", "abc"].into_iter().enumerate() {
        alice
            .send_json(&json!({"type": "code-change", "payload": {"changes": text}}))
            .await;
        assert_eq!(
            alice.recv_type("code-ack").await["payload"]["version"],
            n + 1
        );
    }
    alice
        .send_json(&json!({"type": "language-change", "payload": {"language": "go"}}))
        .await;
    alice.recv_type("language-updated").await;
    let (mut carol, state) = join(&b.server, "late", "u-carol", "Carol").await;
    assert_eq!(
        (
            state["code"].clone(),
            state["version"].clone(),
            state["language"].clone()
        ),
        (json!("abc"), json!(3), json!("go"))
    );
    // Carol's edit, based on what she was given, lands on top of it.
    carol
        .send_json(&json!({"type": "code-change", "payload": {"changes": {"baseVersion": 3, "ops": [3, "!"]}}}))
        .await;
    assert_eq!(carol.recv_type("code-ack").await["payload"]["version"], 4);
    alice.recv_type("participant-joined").await;
    assert_eq!(
        alice.recv_type("code-update").await["payload"]["code"],
        "abc!"
    );
    assert_eq!(describe(&b.server, "late").await["code"], "abc!");
}

#[tokio::test]
async fn rest_on_b_sees_a_session_created_on_a() {
    let (_cluster, a, b) = two_nodes().await;
    let body = json!({"language": "python", "code": "print(1)\n"}).to_string();
    let created = a.server.http("POST", "/api/sessions", Some(&body)).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.json()["sessionId"].as_str().unwrap().to_owned();
    assert_eq!(
        describe(&b.server, &id).await,
        json!({"sessionId": id, "code": "print(1)\n", "language": "python", "version": 0, "participants": []})
    );
    let (_bob, state) = join(&b.server, &id, "u-bob", "Bob").await;
    assert_eq!(state["code"], "print(1)\n");
    assert_eq!(
        describe(&a.server, &id).await["participants"],
        json!([{"userId": "u-bob", "username": "Bob"}])
    );
    assert_eq!(
        b.server
            .http("GET", "/api/sessions/nobody-made-this", None)
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn killing_node_b_makes_its_participants_leave_on_a() {
    let (cluster, a, b) = two_nodes().await;
    let (mut alice, _) = join(&a.server, "k", "u-alice", "Alice").await;
    let (_bob, _) = join(&b.server, "k", "u-bob", "Bob").await;
    let (_bob_tab, _) = join(&b.server, "k", "u-bob", "Bob").await;
    let (_carol, _) = join(&b.server, "k", "u-carol", "Carol").await;
    for _ in 0..2 {
        alice.recv_type("participant-joined").await;
    }
    assert_ne!(a.engine.node(), b.engine.node());

    cluster.kill(b.engine.node());
    let mut left = Vec::new();
    for _ in 0..2 {
        let frame = alice.recv_type("participant-left").await;
        left.push(frame["payload"]["userId"].as_str().unwrap().to_owned());
    }
    left.sort();
    assert_eq!(left, ["u-bob", "u-carol"]);
    alice.expect_silence(QUIET).await;
    assert_eq!(
        describe(&a.server, "k").await["participants"],
        json!([{"userId": "u-alice", "username": "Alice"}])
    );
}

#[tokio::test]
async fn a_node_whose_copy_fell_behind_the_shared_log_catches_up() {
    let (_cluster, a, b) = two_nodes().await;
    let (mut alice, _) = join(&a.server, "behind", "u-alice", "Alice").await;
    let (mut bob, _) = join(&b.server, "behind", "u-bob", "Bob").await;
    alice.recv_type("participant-joined").await;
    bob.send_json(&json!({"type": "code-change", "payload": {"changes": "b"}}))
        .await;
    assert_eq!(bob.recv_type("code-ack").await["payload"]["version"], 1);
    alice.recv_type("code-update").await;
    // Far more edits on A than the shared log keeps: B's copy cannot follow entry by entry.
    let mut text = "b".to_owned();
    for version in 2..=100u64 {
        text.push('a');
        alice
            .send_json(&json!({"type": "code-change", "payload": {"changes": text}}))
            .await;
        assert_eq!(
            alice.recv_type("code-ack").await["payload"]["version"],
            version
        );
        assert_eq!(
            bob.recv_type("code-update").await["payload"]["version"],
            version
        );
    }
    bob.send_json(
        &json!({"type": "code-change", "payload": {"changes": {"baseVersion": 100, "ops": ["!"]}}}),
    )
    .await;
    assert_eq!(bob.recv_type("code-ack").await["payload"]["version"], 101);
    let update = alice.recv_type("code-update").await;
    assert_eq!(update["payload"]["code"], format!("!{text}"));
    assert_eq!(describe(&a.server, "behind").await["version"], 101);
}

/// Edits one author keeps in flight (sent, not yet answered) while it types.
const IN_FLIGHT: usize = 8;

/// One author sending `rounds` full-text edits as fast as the window allows, checking that the
/// versions on its socket (its own `code-ack`s and the others' `code-update`s) come one after
/// the other: each entry of the log exactly once, in log order, so no later update overtakes an
/// ack. Returns how many of its edits were refused (answered with an error and a resync).
async fn author(mut client: Client, letter: char, rounds: usize) -> usize {
    let deadline = Instant::now() + RUN;
    let (mut sent, mut answered, mut refused) = (0, 0, 0);
    let mut last: Option<(String, u64)> = None;
    while answered < rounds {
        while sent < rounds && sent - answered < IN_FLIGHT {
            client
                .send_json(&json!({"type": "code-change", "payload": {"changes": format!("{letter}{sent}")}}))
                .await;
            sent += 1;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let message = client
            .recv_within(left)
            .await
            .unwrap_or_else(|| panic!("author {letter} stalled at {answered} of {rounds}"));
        assert!(
            !message.is_close(),
            "author {letter} was closed: {message:?}"
        );
        let Ok(text) = message.into_text() else {
            continue;
        };
        let frame: Value = serde_json::from_str(&text).unwrap();
        let kind = frame["type"].as_str().unwrap().to_owned();
        let version = frame["payload"]["version"].as_u64();
        match (kind.as_str(), version) {
            ("code-ack" | "code-update", Some(version)) => {
                if let Some((before, previous)) = &last {
                    assert_eq!(
                        version,
                        previous + 1,
                        "author {letter}: {kind} {version} arrived right after {before} {previous}"
                    );
                }
                if kind == "code-ack" {
                    answered += 1;
                }
                last = Some((kind, version));
            }
            // A resync: the state is exact at its version, and every later entry follows it.
            ("session-state", Some(version)) => last = Some((kind, version)),
            ("error", _) => {
                answered += 1;
                refused += 1;
            }
            _ => {}
        }
    }
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_author_gets_its_acks_and_the_others_updates_in_version_order() {
    let cluster = MemoryCluster::new(MemoryLimits::default());
    // No relay rate limit: the authors type as fast as the server answers.
    let config = Config {
        relay_burst: 0,
        ..Config::default()
    };
    let a = node(&cluster, config.clone()).await;
    let b = node(&cluster, config).await;
    let mut authors = Vec::new();
    for (node, letter) in [
        (&a, 'a'),
        (&b, 'b'),
        (&a, 'c'),
        (&b, 'd'),
        (&a, 'e'),
        (&b, 'f'),
    ] {
        let (client, state) = join(&node.server, "order", &format!("u-{letter}"), "A").await;
        assert_eq!(state["version"], 0);
        authors.push((client, letter));
    }
    // Everyone joined before anyone types: drain the announcements.
    for (client, _) in &mut authors {
        while client.recv_within(QUIET).await.is_some() {}
    }
    let rounds = 300;
    let runs: Vec<_> = authors
        .into_iter()
        .map(|(client, letter)| tokio::spawn(author(client, letter, rounds)))
        .collect();
    let mut refused = 0;
    for run in runs {
        refused += timeout(RUN, run)
            .await
            .expect("editing ran too long")
            .unwrap();
    }
    let version = describe(&a.server, "order").await["version"]
        .as_u64()
        .unwrap();
    assert_eq!(version + refused as u64, 6 * rounds as u64);
}
