//! collab on a cluster of real processes: three `switchboard serve --protocol collab` nodes on
//! one real redis-server serve every session together.
//!
//! - participants of one session on different nodes see each other's joins, cursors and edits;
//! - concurrent edits from three nodes converge to one text, the same through REST and
//!   `session-state` on every node, with no edit refused: an edit based on a version from
//!   before its node loaded the document is transformed;
//! - a late joiner on any node gets the current state, and REST on any node sees every session;
//! - when a participant's node is SIGKILLed, the others get `participant-left` within 15 s;
//! - a 3 s `CLIENT PAUSE` during edits: every edit is acknowledged or answered with an error,
//!   everything converges afterwards and nothing acknowledged is lost.
//!
//! The tests skip (loudly) where redis-server is not installed, unless
//! SWITCHBOARD_REQUIRE_REDIS=1.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::{Node, start_cluster};
use serde_json::Value;
use switchboard_collab::ClientDocument;
use switchboard_collab::ot::Operation;
use switchboard_testkit::redis::RedisServer;
use switchboard_testkit::{Client, ConnectOptions, http_request, json};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;

/// How long a client must stay quiet to show that nothing more is coming.
const QUIET: Duration = Duration::from_millis(300);
/// The bound on a whole editing run.
const RUN: Duration = Duration::from_secs(30);

/// Three ready collab nodes on `redis`.
async fn three_nodes(redis: &RedisServer) -> Vec<Node> {
    start_cluster(&redis.url(), "collab-test", "collab", &[], 3).await
}

/// Opens `/ws/<session>` on `node` and joins as `user`; the socket and its `session-state`.
async fn join(node: &Node, session: &str, user: &str, name: &str) -> (Client, Value) {
    let mut client = Client::connect(&node.url(&format!("/ws/{session}"))).await;
    client
        .send_json(&json!({"type": "join-session", "payload": {"userId": user, "username": name}}))
        .await;
    let state = client.recv_type("session-state").await;
    (client, state["payload"].clone())
}

/// `POST /api/sessions` on `node`; the new session's id.
async fn create(node: &Node, body: &Value) -> String {
    let reply = http_request(node.addr, "POST", "/api/sessions", Some(&body.to_string())).await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    reply.json()["sessionId"].as_str().unwrap().to_owned()
}

/// `GET /api/sessions/<session>` on `node`, which must answer 200.
async fn describe(node: &Node, session: &str) -> Value {
    let reply = http_request(node.addr, "GET", &format!("/api/sessions/{session}"), None).await;
    assert_eq!(reply.status, 200, "GET on {}: {}", node.addr, reply.body);
    reply.json()
}

async fn send_change(client: &mut Client, base_version: u64, op: &Operation) {
    client
        .send_json(&json!({"type": "code-change", "payload": {"changes": {"baseVersion": base_version, "ops": op}}}))
        .await;
}

/// What the REST API and a fresh joiner on every node say the document is: (code, version),
/// asserting that they all agree.
async fn state_everywhere(nodes: &[Node], session: &str) -> (String, u64) {
    let mut seen = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let described = describe(node, session).await;
        seen.push((format!("REST on node {n}"), described));
        let (client, state) = join(node, session, &format!("u-check-{n}"), "Check").await;
        client.close().await;
        seen.push((format!("session-state on node {n}"), state));
    }
    let (_, first) = &seen[0];
    for (what, other) in &seen {
        assert_eq!(
            (&other["code"], &other["version"]),
            (&first["code"], &first["version"]),
            "{what} disagrees with {}",
            seen[0].0
        );
    }
    (
        first["code"].as_str().unwrap().to_owned(),
        first["version"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_on_three_nodes_see_each_others_joins_cursors_and_edits() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = three_nodes(&redis).await;
    let id = create(&nodes[0], &json!({})).await;
    let (mut alice, _) = join(&nodes[0], &id, "u-alice", "Alice").await;
    let (mut bob, _) = join(&nodes[1], &id, "u-bob", "Bob").await;
    assert_eq!(
        alice.recv_type("participant-joined").await["payload"],
        json!({"userId": "u-bob", "username": "Bob"})
    );
    let (mut carol, state) = join(&nodes[2], &id, "u-carol", "Carol").await;
    assert_eq!(
        state["participants"],
        json!([
            {"userId": "u-alice", "username": "Alice"},
            {"userId": "u-bob", "username": "Bob"},
            {"userId": "u-carol", "username": "Carol"},
        ])
    );
    for client in [&mut alice, &mut bob] {
        assert_eq!(
            client.recv_type("participant-joined").await["payload"],
            json!({"userId": "u-carol", "username": "Carol"})
        );
    }

    // Cursors: each participant's reaches the two others (on the two other nodes), never itself.
    for (n, (user, line)) in [("u-alice", 1), ("u-bob", 2), ("u-carol", 3)]
        .into_iter()
        .enumerate()
    {
        let clients = [&mut alice, &mut bob, &mut carol];
        clients[n]
            .send_json(
                &json!({"type": "cursor-move", "payload": {"cursor": {"line": line, "column": 0}}}),
            )
            .await;
        for (m, client) in clients.into_iter().enumerate() {
            if m != n {
                assert_eq!(
                    client.recv_type("cursor-update").await["payload"],
                    json!({"userId": user, "cursor": {"line": line, "column": 0}})
                );
            }
        }
    }
    for client in [&mut alice, &mut bob, &mut carol] {
        client.expect_silence(QUIET).await;
    }

    // Edits: each author gets its ack, the two others the update, in version order.
    let edits = [
        ("u-alice", Operation::new().insert("let x = 1;")),
        (
            "u-bob",
            Operation::new()
                .retain(4)
                .insert("count")
                .delete(1)
                .retain(5),
        ),
        ("u-carol", Operation::new().retain(14).insert("\n")),
    ];
    let texts = ["let x = 1;", "let count = 1;", "let count = 1;\n"];
    for (n, ((user, op), text)) in edits.iter().zip(texts).enumerate() {
        let version = n as u64 + 1;
        let clients = [&mut alice, &mut bob, &mut carol];
        send_change(clients[n], version - 1, op).await;
        for (m, client) in clients.into_iter().enumerate() {
            if m == n {
                assert_eq!(
                    client.recv_type("code-ack").await["payload"],
                    json!({"version": version})
                );
            } else {
                let update = client.recv_type("code-update").await;
                assert_eq!(
                    (
                        &update["payload"]["userId"],
                        &update["payload"]["code"],
                        &update["payload"]["version"]
                    ),
                    (&json!(user), &json!(text), &json!(version))
                );
            }
        }
    }

    // Leaving on one node is announced on the two others.
    carol.close().await;
    for client in [&mut alice, &mut bob] {
        assert_eq!(
            client.recv_type("participant-left").await["payload"],
            json!({"userId": "u-carol"})
        );
    }
    for node in &nodes {
        let described = describe(node, &id).await;
        assert_eq!(described["code"], "let count = 1;\n");
        assert_eq!(described["version"], 3);
        assert_eq!(
            described["participants"],
            json!([{"userId": "u-alice", "username": "Alice"}, {"userId": "u-bob", "username": "Bob"}])
        );
    }
}

/// Bob, on a node through which nobody edited yet, types on the version he joined while Alice's
/// edits through another node land first: his edit is transformed as on one node (the node
/// takes the operations it missed from the shared log), not refused as too old.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_based_on_a_version_before_its_node_loaded_the_document_is_transformed() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = three_nodes(&redis).await;
    let (mut alice, _) = join(&nodes[0], "first", "u-alice", "Alice").await;
    let (mut bob, state) = join(&nodes[1], "first", "u-bob", "Bob").await;
    assert_eq!(state["version"], 0);
    alice.recv_type("participant-joined").await;
    for (base, op) in [
        (0, Operation::new().insert("hello")),
        (1, Operation::new().retain(5).insert(" world")),
    ] {
        send_change(&mut alice, base, &op).await;
        assert_eq!(
            alice.recv_type("code-ack").await["payload"]["version"],
            base + 1
        );
    }
    send_change(&mut bob, 0, &Operation::new().insert("> ")).await;
    let answer = bob
        .recv_until(|v| v["type"] == "code-ack" || v["type"] == "error")
        .await;
    assert_eq!(
        answer,
        json!({"type": "code-ack", "payload": {"version": 3}})
    );
    assert_eq!(
        alice.recv_type("code-update").await["payload"]["code"],
        "> hello world"
    );
    let (text, version) = state_everywhere(&nodes, "first").await;
    assert_eq!((text.as_str(), version), ("> hello world", 3));
}

/// One simulated editor: types keystrokes at positions derived from a seed without waiting for
/// acknowledgements, running the client half of OT on everything it receives.
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
    fn receive(&mut self, message: Message) -> Option<(u64, Operation)> {
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
            "code-ack" => self
                .doc
                .ack(payload["version"].as_u64().unwrap())
                .map(|edit| (edit.base_version, edit.op)),
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
                    send_change(&mut self.client, edit.base_version, &edit.op).await;
                }
            }
            let wait = if left > 0 {
                Duration::from_millis(5)
            } else {
                QUIET
            };
            match self.client.recv_within(wait).await {
                Some(message) => {
                    if let Some((base, op)) = self.receive(message) {
                        send_change(&mut self.client, base, &op).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_from_three_nodes_converge_everywhere() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = three_nodes(&redis).await;
    let id = create(&nodes[1], &json!({"code": "fn main() {}\n"})).await;
    let mut editors = Vec::new();
    // Letters the starting text does not contain, so each editor's keystrokes can be counted.
    for (n, letter) in ['x', 'y', 'z'].into_iter().enumerate() {
        let (client, state) = join(&nodes[n], &id, &format!("u-{letter}"), "E").await;
        assert_eq!(state["code"], "fn main() {}\n");
        editors.push((Editor::new(client, &state), letter, n));
    }
    // Everyone joined before anyone types: drain the announcements.
    for (editor, _, _) in &mut editors {
        while editor.client.recv_within(QUIET).await.is_some() {}
    }

    const KEYSTROKES: usize = 20;
    let runs: Vec<_> = editors
        .into_iter()
        .map(|(editor, letter, n)| tokio::spawn(editor.type_along(letter, n * 13 + 1, KEYSTROKES)))
        .collect();
    let mut editors = Vec::new();
    for run in runs {
        editors.push(
            timeout(RUN, run)
                .await
                .expect("editing ran too long")
                .unwrap(),
        );
    }

    let (text, version) = state_everywhere(&nodes, &id).await;
    for editor in &mut editors {
        editor.catch_up(version).await;
        assert_eq!(editor.doc.text(), text, "an editor diverged");
        assert_eq!(editor.doc.version(), version);
    }
    // Nothing was refused, so every keystroke is in the text, once.
    let resyncs: Vec<usize> = editors.iter().map(|editor| editor.resyncs).collect();
    assert_eq!(
        resyncs,
        [0, 0, 0],
        "edits were refused (resyncs per editor)"
    );
    for editor in &editors {
        let letter = editor.typed.chars().next().unwrap();
        assert_eq!(
            text.chars().filter(|c| *c == letter).count(),
            KEYSTROKES,
            "keystrokes of {letter:?}"
        );
    }
    assert_eq!(
        text.chars().count(),
        "fn main() {}\n".len() + 3 * KEYSTROKES
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiners_and_rest_on_any_node_see_every_session() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = three_nodes(&redis).await;
    // One session created on each node; REST on every node sees all three.
    let mut ids = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let body = json!({"language": "python", "code": format!("print({n})\n")});
        ids.push(create(node, &body).await);
    }
    for node in &nodes {
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(
                describe(node, id).await,
                json!({"sessionId": id, "code": format!("print({n})\n"), "language": "python",
                       "version": 0, "participants": []})
            );
        }
    }

    // Alice edits the first session on A and changes its language.
    let id = &ids[0];
    let (mut alice, _) = join(&nodes[0], id, "u-alice", "Alice").await;
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

    // Late joiners on B and C get the current state.
    let (mut bob, state) = join(&nodes[1], id, "u-bob", "Bob").await;
    assert_eq!(
        state,
        json!({"code": "abc", "language": "go", "version": 3,
               "participants": [{"userId": "u-alice", "username": "Alice"},
                                {"userId": "u-bob", "username": "Bob"}]})
    );
    let (_carol, state) = join(&nodes[2], id, "u-carol", "Carol").await;
    assert_eq!(
        (&state["code"], &state["language"], &state["version"]),
        (&json!("abc"), &json!("go"), &json!(3))
    );
    // Bob's edit, based on what he was given, lands on top of it, seen through REST everywhere.
    send_change(&mut bob, 3, &Operation::new().retain(3).insert("!")).await;
    // (Carol's join may come first.)
    let ack = bob.recv_until(|v| v["type"] == "code-ack").await;
    assert_eq!(ack["payload"]["version"], 4);
    for node in &nodes {
        let described = describe(node, id).await;
        assert_eq!(
            (&described["code"], &described["version"]),
            (&json!("abc!"), &json!(4))
        );
        assert_eq!(described["participants"].as_array().unwrap().len(), 3);
    }
    // An id nobody created is unknown everywhere.
    for node in &nodes {
        let reply = http_request(node.addr, "GET", "/api/sessions/nobody-made-this", None).await;
        assert_eq!(reply.status, 404);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_participants_node_makes_it_leave_everywhere_else_within_15_s() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let mut nodes = three_nodes(&redis).await;
    let id = create(&nodes[0], &json!({})).await;
    let (mut alice, _) = join(&nodes[0], &id, "u-alice", "Alice").await;
    let (mut bob, _) = join(&nodes[1], &id, "u-bob", "Bob").await;
    let (_carol, _) = join(&nodes[2], &id, "u-carol", "Carol").await;
    alice.recv_type("participant-joined").await;
    alice.recv_type("participant-joined").await;
    bob.recv_type("participant-joined").await;

    let killed_at = Instant::now();
    let c = nodes.pop().unwrap();
    tokio::task::spawn_blocking(move || c.kill()).await.unwrap();
    for (name, client) in [("alice", &mut alice), ("bob", &mut bob)] {
        let left = deadline_frame(
            client,
            killed_at + Duration::from_secs(15),
            "participant-left",
        )
        .await
        .unwrap_or_else(|| panic!("{name} got no participant-left within 15 s"));
        assert_eq!(left["payload"], json!({"userId": "u-carol"}));
        eprintln!(
            "{name} saw participant-left {:?} after the SIGKILL",
            killed_at.elapsed()
        );
    }
    for client in [&mut alice, &mut bob] {
        client.expect_silence(QUIET).await;
    }
    for node in &nodes {
        assert_eq!(
            describe(node, &id).await["participants"],
            json!([{"userId": "u-alice", "username": "Alice"}, {"userId": "u-bob", "username": "Bob"}])
        );
    }
}

/// The next frame of type `kind` before `deadline` (other frames are skipped), or `None`.
async fn deadline_frame(client: &mut Client, deadline: Instant, kind: &str) -> Option<Value> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Message::Text(text) = client.recv_within(left).await? else {
            continue;
        };
        let frame: Value = serde_json::from_str(&text).unwrap();
        if frame["type"] == kind {
            return Some(frame);
        }
    }
}

/// What became of one editor's edits in the pause test.
#[derive(Debug, Default)]
struct Outcomes {
    /// Tokens whose edit got a `code-ack`.
    acked: Vec<String>,
    /// Tokens whose edit got an error instead.
    refused: Vec<String>,
    /// Every error text received.
    errors: Vec<String>,
    /// How often the socket was closed and the editor reconnected and joined again.
    reconnects: usize,
    /// The editor's text at the end, every edit answered and every update applied.
    text: String,
    /// The longest an edit waited for its outcome.
    slowest: Duration,
}

/// One editor for the pause test: inserts a unique token at a time (`[<letter><n>]`), waiting
/// for each edit's outcome (`code-ack`, or an error), applying everyone else's updates, until
/// `until`; then waits until it has seen every version up to the end. A closed socket (the
/// server closes a socket whose resync failed) is reopened and joined again.
async fn pause_editor(node: String, session: String, letter: char, until: Instant) -> Outcomes {
    let mut out = Outcomes::default();
    let user = format!("u-{letter}");
    let (mut client, mut doc) = rejoin(&node, &session, &user, &mut out).await;
    let mut n = 0usize;
    let mut step = letter as usize;
    while Instant::now() < until {
        let token = format!("[{letter}{n}]");
        n += 1;
        step = step.wrapping_mul(31).wrapping_add(7);
        // Insert between tokens only, so tokens stay whole.
        let text = doc.text().to_owned();
        let bounds: Vec<usize> = std::iter::once(0)
            .chain(
                text.char_indices()
                    .filter(|(_, c)| *c == ']')
                    .map(|(i, _)| text[..=i].chars().count()),
            )
            .collect();
        let at = bounds[step % bounds.len()];
        let len = doc.len_chars();
        let op = Operation::new().retain(at).insert(&token).retain(len - at);
        let edit = doc.edit(op).unwrap().expect("one edit at a time");
        client
            .send_json(&json!({"type": "code-change", "payload": {"changes": {"baseVersion": edit.base_version, "ops": edit.op}}}))
            .await;
        // Its outcome, bounded: an ack, or an error (then a session-state or a close).
        let sent_at = Instant::now();
        let deadline = sent_at + RUN;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = client
                .recv_within(left)
                .await
                .unwrap_or_else(|| panic!("{token}: no outcome within {RUN:?}"));
            let Message::Text(text) = message else {
                if let Message::Close(_) = message {
                    // Closed without an outcome frame first would be silence: not allowed.
                    panic!("{token}: closed before an ack or an error: {message:?}");
                }
                continue;
            };
            let frame: Value = serde_json::from_str(&text).unwrap();
            let payload = &frame["payload"];
            match frame["type"].as_str().unwrap() {
                "code-ack" => {
                    assert!(doc.ack(payload["version"].as_u64().unwrap()).is_none());
                    out.acked.push(token.clone());
                    out.slowest = out.slowest.max(sent_at.elapsed());
                    break;
                }
                "code-update" => {
                    let op: Operation = serde_json::from_value(payload["ops"].clone()).unwrap();
                    doc.remote(payload["version"].as_u64().unwrap(), &op)
                        .unwrap();
                }
                "error" => {
                    out.errors
                        .push(payload["message"].as_str().unwrap().to_owned());
                    out.refused.push(token.clone());
                    out.slowest = out.slowest.max(sent_at.elapsed());
                    // A resync follows, or the socket is closed (its resync failed).
                    match await_resync(&mut client).await {
                        Some(state) => doc = state,
                        None => {
                            out.reconnects += 1;
                            (client, doc) = rejoin(&node, &session, &user, &mut out).await;
                        }
                    }
                    break;
                }
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Drain what others still send, so that the socket is idle when the test compares.
    while let Some(message) = client.recv_within(QUIET * 3).await {
        if let Message::Text(text) = message {
            let frame: Value = serde_json::from_str(&text).unwrap();
            let payload = &frame["payload"];
            match frame["type"].as_str().unwrap() {
                "code-update" => {
                    let op: Operation = serde_json::from_value(payload["ops"].clone()).unwrap();
                    doc.remote(payload["version"].as_u64().unwrap(), &op)
                        .unwrap();
                }
                "code-ack" => panic!("{letter}: an ack nobody waited for: {frame}"),
                _ => {}
            }
        }
    }
    assert!(doc.is_synchronized());
    out.text = doc.text().to_owned();
    client.close().await;
    out
}

/// After an error: the `session-state` that follows (as a fresh document), or `None` when the
/// server closed the socket instead.
async fn await_resync(client: &mut Client) -> Option<ClientDocument> {
    let deadline = Instant::now() + RUN;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = client
            .recv_within(left)
            .await
            .expect("neither a session-state nor a close after an error");
        match message {
            Message::Close(_) => return None,
            Message::Text(text) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "session-state" {
                    let p = &frame["payload"];
                    return Some(ClientDocument::new(
                        p["code"].as_str().unwrap(),
                        p["version"].as_u64().unwrap(),
                    ));
                }
            }
            _ => {}
        }
    }
}

/// Opens the session and joins, retrying (bounded) while the server refuses.
async fn rejoin(
    node: &str,
    session: &str,
    user: &str,
    out: &mut Outcomes,
) -> (Client, ClientDocument) {
    let deadline = Instant::now() + RUN;
    let url = format!("{node}/ws/{session}");
    loop {
        assert!(Instant::now() < deadline, "{user} could not join again");
        if let Ok(mut client) = Client::connect_with(&url, ConnectOptions::default()).await {
            client
                .send_json(
                    &json!({"type": "join-session", "payload": {"userId": user, "username": user}}),
                )
                .await;
            match await_resync(&mut client).await {
                Some(doc) => return (client, doc),
                None => out.errors.push("join refused (closed)".to_owned()),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pause_during_edits_loses_nothing_acknowledged() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let nodes = three_nodes(&redis).await;
    let id = create(&nodes[0], &json!({})).await;
    let started = Instant::now();
    let until = started + Duration::from_secs(6);
    let runs: Vec<_> = nodes
        .iter()
        .zip(['a', 'b', 'c'])
        .map(|(node, letter)| {
            let url = format!("ws://{}", node.addr);
            tokio::spawn(pause_editor(url, id.clone(), letter, until))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    redis.pause(Duration::from_secs(3)).await;
    let mut outcomes = Vec::new();
    for run in runs {
        outcomes.push(
            timeout(RUN * 2, run)
                .await
                .expect("editing ran too long")
                .unwrap(),
        );
    }
    for (letter, out) in ['a', 'b', 'c'].iter().zip(&outcomes) {
        eprintln!(
            "editor {letter}: {} acked, {} refused, {} reconnects, slowest outcome {:?}, \
             errors {:?}",
            out.acked.len(),
            out.refused.len(),
            out.reconnects,
            out.slowest,
            out.errors
        );
        // The pause caught an edit of every editor in flight.
        assert!(out.slowest >= Duration::from_secs(1), "editor {letter}");
    }

    let (text, _) = state_everywhere(&nodes, &id).await;
    for (letter, out) in ['a', 'b', 'c'].iter().zip(&outcomes) {
        assert_eq!(out.text, text, "editor {letter} diverged");
    }
    let present: Vec<String> = text.split_inclusive(']').map(str::to_owned).collect();
    let unique: BTreeSet<&String> = present.iter().collect();
    assert_eq!(unique.len(), present.len(), "a token twice: {text}");
    for out in &outcomes {
        assert!(!out.acked.is_empty(), "an editor got nothing acknowledged");
        for token in &out.acked {
            assert!(present.contains(token), "acknowledged {token} lost: {text}");
        }
        for token in &out.refused {
            assert!(
                !present.contains(token),
                "refused {token} was applied anyway: {text}"
            );
        }
    }
    let answered: usize = outcomes
        .iter()
        .map(|o| o.acked.len() + o.refused.len())
        .sum();
    let acked: usize = outcomes.iter().map(|o| o.acked.len()).sum();
    assert_eq!(
        present.len(),
        acked,
        "the text holds exactly the acknowledged edits"
    );
    eprintln!("{answered} edits answered, {acked} acknowledged");
}
