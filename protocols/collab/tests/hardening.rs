//! Adversarial tests over real sockets: each attack measured against the release binary is
//! replayed here, and each test asserts (a) the memory bound, through the protocol's own
//! accounting (`Collab::state_bytes`), and (b) that a bystander in another session keeps its
//! round-trip latency.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use serde_json::Value;
use switchboard_collab::ot::{Component, MAX_OP_COMPONENTS, Operation, transform};
use switchboard_collab::{
    Collab, Config, Document, DocumentLimits, PARTICIPANT_BYTES, SESSION_OVERHEAD_BYTES,
};
use switchboard_server::ServerConfig;
use switchboard_testkit::{Client, ConnectOptions, HttpReply, TestServer, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::time::timeout;

const QUIET: Duration = Duration::from_millis(300);
const WAIT: Duration = Duration::from_secs(10);

async fn start(config: Config) -> (Arc<Collab>, TestServer) {
    let collab = Arc::new(Collab::new(config));
    let server = TestServer::start_shared(collab.clone(), ServerConfig::default()).await;
    (collab, server)
}

/// Connects to `session` from `source` and joins as `user`.
async fn join_from(server: &TestServer, session: &str, user: &str, source: [u8; 4]) -> Client {
    let mut client = server.connect_from(&format!("/ws/{session}"), source).await;
    client
        .send_json(&json!({"type": "join-session", "payload": {"userId": user}}))
        .await;
    client.recv_type("session-state").await;
    client
}

async fn join(server: &TestServer, session: &str, user: &str) -> Client {
    join_from(server, session, user, [127, 0, 0, 1]).await
}

/// One round trip: `language-change` comes back to the sender as `language-updated`.
async fn round_trip(client: &mut Client) -> Duration {
    let start = Instant::now();
    client
        .send_json(&json!({"type": "language-change", "payload": {"language": "rust"}}))
        .await;
    client.recv_type("language-updated").await;
    start.elapsed()
}

/// A joined client in its own session, and its idle round-trip time (the slowest of three).
async fn bystander(server: &TestServer) -> (Client, Duration) {
    let mut client = join_from(server, "bystander", "u-calm", [127, 0, 0, 9]).await;
    let mut baseline = Duration::ZERO;
    for _ in 0..3 {
        baseline = baseline.max(round_trip(&mut client).await);
    }
    (client, baseline)
}

/// The bystander is still served promptly: generous for two busy cores and a debug build, but
/// an attack that denied it (seconds of delay, or no answer) fails.
async fn assert_still_served(client: &mut Client, baseline: Duration) {
    let bound = Duration::from_millis(250).max(baseline * 4);
    let rtt = timeout(WAIT, round_trip(client))
        .await
        .expect("bystander got no answer");
    assert!(
        rtt < bound,
        "bystander round trip took {rtt:?} (idle {baseline:?})"
    );
}

fn assert_within_bound(collab: &Collab, config: &Config) {
    let used = collab.state_bytes();
    assert!(
        used <= config.worst_case_state_bytes(),
        "{used} bytes charged, over the worst case of {}",
        config.worst_case_state_bytes()
    );
    assert!(used <= config.max_state_bytes);
}

/// A plain HTTP request from loopback address `source`.
async fn http_from(
    addr: SocketAddr,
    source: [u8; 4],
    method: &str,
    path: &str,
    body: &str,
) -> HttpReply {
    let exchange = async {
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::new(IpAddr::from(source), 0))
            .unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        String::from_utf8(raw).unwrap()
    };
    let raw = timeout(WAIT, exchange).await.expect("HTTP timed out");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    HttpReply {
        status,
        headers: head.to_owned(),
        body: body.to_owned(),
    }
}

/// Waits for this client's `code-ack` (skipping announcements) and returns its version.
async fn ack(client: &mut Client) -> u64 {
    client.recv_until(|v| v["type"] == "code-ack").await["payload"]["version"]
        .as_u64()
        .unwrap()
}

async fn create_with_code(server: &TestServer, code: &str) -> HttpReply {
    let body = json!({ "code": code }).to_string();
    server.http("POST", "/api/sessions", Some(&body)).await
}

/// Reads frames until `QUIET` passes without one.
async fn drain(client: &mut Client) -> Vec<String> {
    let mut frames = Vec::new();
    while let Some(message) = client.recv_within(QUIET).await {
        if let Ok(text) = message.into_text() {
            frames.push(text.to_string());
        }
    }
    frames
}

fn kind(frame: &str) -> String {
    serde_json::from_str::<Value>(frame).unwrap()["type"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// Attack 1: a stalled reader and 400 tiny execute-code frames in a session with a 1 MiB document.

#[tokio::test]
async fn tiny_relays_stay_tiny_and_are_rate_limited() {
    let config = Config::default();
    let (collab, server) = start(config.clone()).await;
    let (mut calm, baseline) = bystander(&server).await;

    let document = "a".repeat(config.max_document_bytes);
    let created = create_with_code(&server, &document).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.json()["sessionId"].as_str().unwrap().to_owned();

    // The stalled participant: joins, then never reads again.
    let options = ConnectOptions {
        recv_buffer: Some(4096),
        ..ConnectOptions::default()
    };
    let mut stalled = Client::connect_with(&server.ws_url(&format!("/ws/{id}")), options)
        .await
        .unwrap();
    stalled
        .send_json(&json!({"type": "join-session", "payload": {"userId": "u-stalled"}}))
        .await;
    let mut reader = join(&server, &id, "u-reader").await;
    let mut attacker = join(&server, &id, "u-attacker").await;
    drain(&mut reader).await;
    drain(&mut attacker).await;
    let before = collab.state_bytes();

    let started = Instant::now();
    for _ in 0..400 {
        attacker
            .send_text(r#"{"type":"execute-code","payload":{}}"#)
            .await;
    }
    let relayed = drain(&mut reader).await;
    let elapsed = started.elapsed();
    let refused = drain(&mut attacker).await;

    // No amplification: each relay is the 37-byte request plus the sender's id and language.
    assert!(relayed.iter().all(|f| kind(f) == "execute-code"));
    let largest = relayed.iter().map(String::len).max().unwrap_or(0);
    assert!(largest < 200, "a relayed execute-code took {largest} bytes");
    // Rate-limited per connection: the burst, plus what the elapsed time refilled.
    let allowed = u64::from(config.relay_burst)
        + u64::from(config.relay_per_second) * elapsed.as_secs().saturating_add(1);
    assert!(
        (relayed.len() as u64) <= allowed,
        "{} relays in {elapsed:?}",
        relayed.len()
    );
    assert_eq!(relayed.len() + refused.len(), 400);
    assert!(refused.iter().all(|f| f.contains("rate limit")));
    // Relays store nothing, and the state stays within the formula.
    assert_eq!(collab.state_bytes(), before);
    assert_within_bound(&collab, &config);
    assert_still_served(&mut calm, baseline).await;
}

#[tokio::test]
async fn relayed_payloads_carry_only_their_fields() {
    let config = Config::default();
    let (_collab, server) = start(config.clone()).await;
    let mut alice = join(&server, "s", "u-alice").await;
    let mut bob = join(&server, "s", "u-bob").await;
    alice.recv_type("participant-joined").await;
    bob.send_json(&json!({"type": "execution-result", "payload": {
        "output": "2\n", "error": null, "durationMs": 3, "language": "javascript",
        "junk": "x".repeat(10_000), "userId": "spoofed"}}))
        .await;
    let result = alice.recv_type("execution-result").await;
    assert_eq!(
        result["payload"],
        json!({"userId": "u-bob", "output": "2\n", "error": null, "durationMs": 3, "language": "javascript"})
    );
    // Output over the document limit is refused, not relayed.
    let huge = "o".repeat(config.max_document_bytes + 1);
    bob.send_json(&json!({"type": "execution-result", "payload": {"output": huge}}))
        .await;
    let error = bob.recv_type("error").await;
    assert!(
        error["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("over the limit"),
        "{error}"
    );
    alice.expect_silence(QUIET).await;
}

// ---------------------------------------------------------------------------------------------
// Attack 2: operations too large for the log, and abandoned sessions.

#[tokio::test]
async fn operations_that_cannot_fit_are_refused_and_the_log_is_a_hard_bound() {
    let config = Config {
        max_document_bytes: 64 * 1024,
        max_op_log_bytes: 16 * 1024,
        ..Config::default()
    };
    let (collab, server) = start(config.clone()).await;
    let (mut calm, baseline) = bystander(&server).await;

    let mut alice = join(&server, "big", "u-alice").await;
    alice
        .send_json(&json!({"type": "code-change", "payload": {"changes": "x".repeat(20_000)}}))
        .await;
    // The diff inserts 20,000 bytes: heavier than the whole log may be.
    let error = alice.recv_type("error").await;
    let message = error["payload"]["message"].as_str().unwrap();
    assert!(message.contains("operation log's limit"), "{message}");
    assert_eq!(
        alice.recv_type("session-state").await["payload"]["code"],
        ""
    );

    // Too many components: refused while parsing, before anything is built from it.
    alice
        .send_json(&json!({"type": "code-change", "payload": {"changes": "ab".repeat(4_000)}}))
        .await;
    ack(&mut alice).await;
    let ops: Vec<i64> = (0..=MAX_OP_COMPONENTS as i64)
        .map(|i| if i % 2 == 0 { 1 } else { -1 })
        .collect();
    alice
        .send_json(
            &json!({"type": "code-change", "payload": {"changes": {"baseVersion": 1, "ops": ops}}}),
        )
        .await;
    let error = alice.recv_type("error").await;
    let message = error["payload"]["message"].as_str().unwrap();
    assert!(message.contains("at most 10000 components"), "{message}");
    let state = alice.recv_type("session-state").await;
    assert_eq!(state["payload"]["version"], 1);

    // Abandoned sessions whose logs were filled to the brim: bounded by the formula.
    for n in 0..5 {
        let mut author = join(&server, &format!("abandoned-{n}"), "u-author").await;
        for round in 0..6 {
            let fill = if round % 2 == 0 { "a" } else { "b" };
            author
                .send_json(
                    &json!({"type": "code-change", "payload": {"changes": fill.repeat(7_000)}}),
                )
                .await;
            ack(&mut author).await;
        }
        author.close().await;
    }
    let used = collab.state_bytes();
    assert!(
        used >= 5 * 7_000,
        "the accounting missed the documents: {used}"
    );
    assert!(used <= 7 * config.worst_case_session_bytes(), "{used}");
    assert_within_bound(&collab, &config);
    assert_still_served(&mut calm, baseline).await;
}

#[tokio::test]
async fn a_full_state_budget_refuses_new_work_but_existing_sessions_keep_working() {
    let config = Config {
        max_document_bytes: 64 * 1024,
        max_op_log_bytes: 80 * 1024,
        max_state_bytes: 256 * 1024,
        session_create_burst: 0,
        ..Config::default()
    };
    let (collab, server) = start(config.clone()).await;
    let (mut calm, baseline) = bystander(&server).await;
    let mut editor = join(&server, "existing", "u-editor").await;
    editor
        .send_json(&json!({"type": "code-change", "payload": {"changes": "hello world"}}))
        .await;
    ack(&mut editor).await;

    let filler = "f".repeat(60 * 1024);
    let mut refused = None;
    for _ in 0..10 {
        let reply = create_with_code(&server, &filler).await;
        if reply.status != 201 {
            refused = Some(reply);
            break;
        }
    }
    let refused = refused.expect("the budget never filled");
    assert_eq!(refused.status, 503);
    let message = refused.json()["error"].as_str().unwrap().to_owned();
    assert!(message.contains("memory for sessions is full"), "{message}");
    assert_within_bound(&collab, &config);

    // New empty sessions over WebSocket fit the rest of the budget, then get 503 at upgrade.
    let mut status = 101;
    for n in 0..100 {
        let url = server.ws_url(&format!("/ws/one-more-{n}"));
        match Client::connect_with(&url, ConnectOptions::default()).await {
            Ok(client) => client.close().await,
            // An HTTP refusal displays as "HTTP error: <status> <reason>".
            Err(refusal) => {
                let text = refusal.to_string();
                assert!(text.contains("HTTP error"), "{text}");
                status = if text.contains("503") { 503 } else { 0 };
                break;
            }
        }
    }
    assert_eq!(status, 503);
    assert_within_bound(&collab, &config);

    // The existing session: growth is refused with the protocol's error and a resync...
    editor
        .send_json(&json!({"type": "code-change", "payload": {"changes": "g".repeat(60 * 1024)}}))
        .await;
    let error = editor.recv_type("error").await;
    assert!(
        error["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("memory for sessions is full"),
        "{error}"
    );
    editor.recv_type("session-state").await;
    // ...while edits that do not grow it still land (the session's own operation log is
    // dropped to make room if needed).
    editor
        .send_json(&json!({"type": "code-change", "payload": {"changes": "hello"}}))
        .await;
    ack(&mut editor).await;
    let described = server.http("GET", "/api/sessions/existing", None).await;
    assert_eq!(described.json()["code"], "hello");
    assert_within_bound(&collab, &config);
    assert_still_served(&mut calm, baseline).await;
}

// ---------------------------------------------------------------------------------------------
// Attack 3: a flood of empty POST /api/sessions from one address.

#[tokio::test]
async fn session_creation_is_a_per_client_share_and_unjoined_sessions_expire_soon() {
    let config = Config {
        max_sessions_per_client: 20,
        session_create_burst: 0,
        unjoined_ttl: Duration::from_millis(600),
        ..Config::default()
    };
    let (collab, server) = start(config.clone()).await;
    let (mut calm, baseline) = bystander(&server).await;
    let flooder = [127, 0, 0, 1];

    let mut created = 0;
    let mut too_many = 0;
    for _ in 0..60 {
        let reply = http_from(server.addr(), flooder, "POST", "/api/sessions", "").await;
        match reply.status {
            201 => created += 1,
            429 => {
                too_many += 1;
                assert!(
                    reply.json()["error"]
                        .as_str()
                        .unwrap()
                        .contains("too many sessions from your address"),
                    "{}",
                    reply.body
                );
            }
            other => panic!("unexpected {other}: {}", reply.body),
        }
    }
    assert_eq!((created, too_many), (20, 40));
    assert_eq!(collab.sessions_created_by(IpAddr::from(flooder)), 20);
    // The first connect to a new id is a creation too: 429 at upgrade.
    let url = server.ws_url("/ws/flooders-own");
    let options = ConnectOptions {
        source_ip: Some(IpAddr::from(flooder)),
        ..ConnectOptions::default()
    };
    assert_eq!(Client::refused_status(&url, options).await, 429);

    // Everybody else still creates sessions, over REST and by connecting.
    let other = [127, 0, 0, 2];
    let reply = http_from(server.addr(), other, "POST", "/api/sessions", "").await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    let _fresh = join_from(&server, "someone-elses", "u-other", other).await;
    assert_within_bound(&collab, &config);
    assert_still_served(&mut calm, baseline).await;

    // The abandoned sessions expire after the short TTL and the flooder's share comes back.
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = http_from(server.addr(), flooder, "POST", "/api/sessions", "").await;
        if reply.status == 201 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the unjoined sessions never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Expired sessions leave the share at the next sweep (sessions expire one by one, in the
    // order they were created), so the count only has to have dropped below the share.
    assert!(collab.sessions_created_by(IpAddr::from(flooder)) <= 20);
    assert_within_bound(&collab, &config);
}

// ---------------------------------------------------------------------------------------------
// Attack 4: counts that overflow.

#[tokio::test]
async fn an_operation_whose_counts_overflow_is_refused_and_changes_nothing() {
    let config = Config::default();
    let (collab, server) = start(config.clone()).await;
    let (mut calm, baseline) = bystander(&server).await;
    let created = create_with_code(&server, "hello world").await;
    let id = created.json()["sessionId"].as_str().unwrap().to_owned();
    let mut alice = join(&server, &id, "u-alice").await;
    let mut bob = join(&server, &id, "u-bob").await;
    alice.recv_type("participant-joined").await;

    for ops in [
        format!("[{}, {}]", i64::MIN, (1u64 << 63) + 11),
        format!("[{}, {}]", u64::MAX, u64::MAX),
        format!("[{}, {}, \"x\"]", i64::MIN, i64::MIN),
        format!("[5, {}, 6]", i64::MIN + 1),
    ] {
        alice
            .send_text(&format!(
                r#"{{"type":"code-change","payload":{{"changes":{{"baseVersion":0,"ops":{ops}}}}}}}"#
            ))
            .await;
        let error = alice.recv_type("error").await;
        let message = error["payload"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("code-change refused"),
            "{ops}: {message}"
        );
        let state = alice.recv_type("session-state").await;
        assert_eq!(
            (
                state["payload"]["code"].clone(),
                state["payload"]["version"].clone()
            ),
            (json!("hello world"), json!(0)),
            "{ops}"
        );
    }
    bob.expect_silence(QUIET).await;
    let described = server
        .http("GET", &format!("/api/sessions/{id}"), None)
        .await
        .json();
    assert_eq!(described["code"], "hello world");
    assert_eq!(described["version"], 0);
    assert_within_bound(&collab, &config);
    assert_still_served(&mut calm, baseline).await;
}

fn extreme_count() -> impl Strategy<Value = usize> {
    prop_oneof![
        0usize..20,
        Just(usize::MAX),
        Just(usize::MAX - 1),
        Just(1usize << 63),
        Just((1usize << 63) + 11),
        Just(usize::MAX / 2 + 1),
    ]
}

fn extreme_component() -> impl Strategy<Value = Component> {
    prop_oneof![
        extreme_count().prop_map(Component::Retain),
        extreme_count().prop_map(Component::Delete),
        "[a-zé🌍]{0,4}".prop_map(Component::Insert),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Whatever the counts, applying, transforming and composing never panics, and the
    /// server's document either applies an operation consistently or refuses it unchanged.
    #[test]
    fn extreme_counts_never_panic_or_corrupt(
        text in "[a-z🌍]{0,12}",
        a in prop::collection::vec(extreme_component(), 0..6),
        b in prop::collection::vec(extreme_component(), 0..6),
    ) {
        let a = Operation::from_components(a);
        let b = Operation::from_components(b);
        let chars = text.chars().count();
        if let Ok(applied) = a.apply(&text) {
            prop_assert_eq!(a.base_len(), chars);
            prop_assert_eq!(applied.chars().count(), a.target_len());
        }
        let _ = a.compose(&b);
        if let Ok((a2, b2)) = transform(&a, &b) {
            prop_assert!(a2.base_len() == b.target_len() || b.target_len() == usize::MAX);
            prop_assert!(b2.base_len() == a.target_len() || a.target_len() == usize::MAX);
        }
        let limits = DocumentLimits { max_bytes: 1000, max_log_ops: 10, max_log_bytes: 100_000 };
        let mut doc = Document::new(text.clone(), limits);
        match doc.apply_operation(0, a.clone()) {
            Ok(applied) => {
                prop_assert_eq!(doc.text().chars().count(), applied.op.target_len());
                prop_assert!(a.base_len() <= chars);
            }
            Err(_) => {
                prop_assert_eq!(doc.text(), text.as_str());
                prop_assert_eq!(doc.version(), 0);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The worst-case formula, held to the implementation.

#[tokio::test]
async fn filling_every_pool_stays_within_the_worst_case_formula() {
    let config = Config {
        max_sessions: 3,
        max_participants: 3,
        max_document_bytes: 2048,
        max_op_log: 50,
        max_op_log_bytes: 4096,
        max_sessions_per_client: 0,
        relay_burst: 0,
        ..Config::default()
    };
    let (collab, server) = start(config.clone()).await;
    let long = "é".repeat(128);
    let mut clients = Vec::new();
    for s in 0..3 {
        let session = format!("s{s}-{}", "x".repeat(60));
        let mut authors = Vec::new();
        for p in 0..3 {
            let mut client = server.connect(&format!("/ws/{session}")).await;
            let user = format!("{p}{}", &long[..long.len() - 2]);
            client
                .send_json(
                    &json!({"type": "join-session", "payload": {"userId": user, "username": long}}),
                )
                .await;
            client.recv_type("session-state").await;
            authors.push(client);
        }
        // The document at its limit, then the log filled by small edits at its end.
        let author = &mut authors[0];
        let full = "d".repeat(config.max_document_bytes - 1);
        author
            .send_json(&json!({"type": "code-change", "payload": {"changes": full}}))
            .await;
        let mut version = ack(author).await;
        let at = config.max_document_bytes - 1;
        for i in 0..60 {
            let op = if i % 2 == 0 {
                Operation::new().retain(at).insert("z")
            } else {
                Operation::new().retain(at).delete(1)
            };
            author
                .send_json(&json!({"type": "code-change", "payload": {"changes": {"baseVersion": version, "ops": op}}}))
                .await;
            version = ack(author).await;
        }
        clients.push(authors);
    }
    // Every pool is full: a fourth session and a fourth participant are refused.
    assert_eq!(server.http("POST", "/api/sessions", None).await.status, 503);
    let mut fourth = server.connect(&format!("/ws/s0-{}", "x".repeat(60))).await;
    fourth
        .send_json(&json!({"type": "join-session", "payload": {"userId": "u-fourth"}}))
        .await;
    assert_eq!(
        fourth.recv_type("error").await["payload"]["message"],
        "Session is full: at most 3 participants"
    );

    let used = collab.state_bytes();
    // Each session holds its document three times: this node's copy, the snapshot it makes in
    // the engine's record and the newest entry of the engine's log.
    let floor =
        3 * (SESSION_OVERHEAD_BYTES + 3 * (config.max_document_bytes - 1) + 3 * PARTICIPANT_BYTES);
    assert!(
        used >= floor,
        "{used} bytes charged, expected at least {floor}"
    );
    assert!(
        used <= config.worst_case_state_bytes(),
        "{used} bytes charged, over the formula's {}",
        config.worst_case_state_bytes()
    );
    assert_eq!(
        config.worst_case_state_bytes(),
        3 * (SESSION_OVERHEAD_BYTES
            + 2048
            + switchboard_collab::TEXT_SLACK_BYTES
            + 4096
            + 3 * PARTICIPANT_BYTES
            // The engine: the record's snapshot (escaped) and the shared log (one maximal
            // code-update frame, 50 entries' bookkeeping).
            + 6 * 2048
            + (12 * 2048 + 64 * 1024)
            + 50 * switchboard_collab::ENGINE_ENTRY_BYTES)
    );
    // Everything is given back when the sessions go.
    drop(clients);
    drop(fourth);
}

// ---------------------------------------------------------------------------------------------
// Tiny frames that each earn a whole-document session-state.

#[tokio::test]
async fn refused_edits_earn_a_bounded_number_of_resyncs() {
    let config = Config::default();
    let (collab, server) = start(config.clone()).await;
    let (mut calm, baseline) = bystander(&server).await;
    let created = create_with_code(&server, &"r".repeat(256 * 1024)).await;
    let id = created.json()["sessionId"].as_str().unwrap().to_owned();
    let mut attacker = join(&server, &id, "u-attacker").await;

    // Each of these is refused (a version from the future) and used to answer with the whole
    // document.
    for _ in 0..200 {
        attacker
            .send_text(
                r#"{"type":"code-change","payload":{"changes":{"baseVersion":99,"ops":[]}}}"#,
            )
            .await;
    }
    let mut states = 0;
    let close = loop {
        match timeout(WAIT, attacker.recv()).await.expect("no close") {
            message if message.is_close() => break message,
            message => {
                if message.into_text().unwrap().contains("\"session-state\"") {
                    states += 1;
                }
            }
        }
    };
    // The join took one; the rest of the burst (plus a refill or two) went to refusals.
    assert!(
        states <= switchboard_collab::STATE_FRAME_BURST as usize + 2,
        "{states}"
    );
    assert!(
        format!("{close:?}").contains("too many resyncs"),
        "{close:?}"
    );
    assert_within_bound(&collab, &config);
    assert_still_served(&mut calm, baseline).await;
}

#[tokio::test]
async fn one_address_cannot_take_the_whole_state_budget() {
    let config = Config {
        max_document_bytes: 64 * 1024,
        max_state_bytes: 1024 * 1024,
        max_state_bytes_per_client: 256 * 1024,
        session_create_burst: 0,
        ..Config::default()
    };
    let (collab, server) = start(config.clone()).await;
    let (mut calm, baseline) = bystander(&server).await;
    let hog = [127, 0, 0, 1];
    let body = json!({ "code": "h".repeat(60 * 1024) }).to_string();
    let mut refusal = None;
    for _ in 0..10 {
        let reply = http_from(server.addr(), hog, "POST", "/api/sessions", &body).await;
        if reply.status != 201 {
            refusal = Some(reply);
            break;
        }
    }
    let refusal = refusal.expect("the share never filled");
    assert_eq!(refusal.status, 429, "{}", refusal.body);
    assert!(
        refusal.body.contains("whole share of memory"),
        "{}",
        refusal.body
    );
    assert!(collab.state_bytes_of(IpAddr::from(hog)) <= config.max_state_bytes_per_client);
    // Another address still gets its own share.
    let reply = http_from(
        server.addr(),
        [127, 0, 0, 2],
        "POST",
        "/api/sessions",
        &body,
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_within_bound(&collab, &config);
    assert_still_served(&mut calm, baseline).await;
}

#[tokio::test]
async fn what_a_session_keeps_in_the_engine_counts_against_its_creators_share() {
    let config = Config {
        max_document_bytes: 64 * 1024,
        max_op_log_bytes: 128 * 1024,
        max_state_bytes_per_client: 1024 * 1024,
        session_create_burst: 0,
        ..Config::default()
    };
    let (collab, server) = start(config.clone()).await;
    let (mut calm, baseline) = bystander(&server).await;
    let hog = [127, 0, 0, 1];
    let fill = 60 * 1024;
    let edit =
        |letter: &str| json!({"type": "code-change", "payload": {"changes": letter.repeat(fill)}});

    // One session, three full-text edits of the whole document: each entry of the engine's
    // log carries the document and the inserted text, and the record's snapshot is a copy too.
    let mut author = join_from(&server, "first", "u-author", hog).await;
    for letter in ["a", "b", "a"] {
        author.send_json(&edit(letter)).await;
        ack(&mut author).await;
    }
    let held = collab.state_bytes_of(IpAddr::from(hog));
    let copies = fill + fill + 3 * 2 * fill;
    assert!(
        held >= copies,
        "{held} bytes charged; this node's copy, the snapshot and the log hold {copies}"
    );
    author.close().await;

    // Abandoned sessions filled the same way: the creator's share refuses growing edits once
    // everything (this node's copies and the engine's) reaches it.
    let mut refusals = 0;
    for n in 0..10 {
        let mut author = join_from(&server, &format!("abandoned-{n}"), "u-author", hog).await;
        for letter in ["a", "b", "a"] {
            author.send_json(&edit(letter)).await;
            let reply = author
                .recv_until(|v| v["type"] == "code-ack" || v["type"] == "error")
                .await;
            if reply["type"] == "error" {
                let message = reply["payload"]["message"].as_str().unwrap();
                assert!(message.contains("whole share of memory"), "{message}");
                author.recv_type("session-state").await;
                refusals += 1;
                break;
            }
        }
        author.close().await;
        if refusals > 0 {
            // Full: a further session would be refused at the upgrade (429).
            break;
        }
    }
    assert!(refusals > 0, "the share never filled");
    assert!(collab.state_bytes_of(IpAddr::from(hog)) <= config.max_state_bytes_per_client);
    assert_within_bound(&collab, &config);
    assert_still_served(&mut calm, baseline).await;
}
