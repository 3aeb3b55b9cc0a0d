//! `switchboard serve --data-dir`: whatever a client was acknowledged survives SIGKILL.
//!
//! - reqack: a recipient's unacknowledged events come back after a restart with their ids,
//!   acknowledged ones do not, new ids continue above the old ones, and a retried request gets
//!   its original response.
//! - ip-chat, fastchat, collab: clients load the node, it is killed while they are still
//!   sending, and everything they were acknowledged before the kill (a broadcast, `MSG_ACK`,
//!   `code-ack` / `code-update`, `language-updated`) is there after the restart.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Node, TempDir, Ws, await_acks, http};
use serde_json::Value;
use switchboard_testkit::{Client, TIMEOUT, json};
use tokio_tungstenite::tungstenite::Message;

async fn connect(addr: std::net::SocketAddr, user: &str) -> Client {
    Client::connect(&format!("ws://{addr}/ws?userId={user}")).await
}

/// Sends a request and returns its whole response frame (which must not be an error).
async fn request_frame(client: &mut Client, id: &str, kind: &str, payload: Value) -> Value {
    client
        .send_json(&json!({
            "type": "request", "timestamp": 0, "id": id, "payloadType": kind, "payload": payload,
        }))
        .await;
    let response = client
        .recv_until(|v| v["type"] == "response" && v["id"] == id)
        .await;
    assert!(
        response["payload"].get("error").is_none(),
        "request {id} failed: {response}"
    );
    response
}

async fn request(client: &mut Client, id: &str, kind: &str, payload: Value) -> Value {
    request_frame(client, id, kind, payload).await["payload"].clone()
}

fn is_new(v: &Value) -> bool {
    v["type"] == "event" && v["eventType"] == "new"
}

/// The `new` events that arrive within `wait` (other frames are skipped).
async fn new_events_within(client: &mut Client, wait: Duration) -> Vec<Value> {
    let deadline = Instant::now() + wait;
    let mut events = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(message) = client.recv_within(left).await else {
            return events;
        };
        if let Message::Text(text) = message {
            let value: Value = serde_json::from_str(&text).unwrap();
            if is_new(&value) {
                events.push(value);
            }
        }
    }
}

#[tokio::test]
async fn unacked_events_survive_sigkill_with_their_ids() {
    let dir = TempDir::new("reqack");
    let server = Node::start(&dir.0, "reqack", &[]);
    let mut bob = connect(server.addr, "bob").await;
    let mut alice = connect(server.addr, "alice").await;
    let mut message_ids = Vec::new();
    let mut responses = Vec::new();
    for i in 0..5 {
        let response = request_frame(
            &mut alice,
            &format!("r{i}"),
            "new",
            json!({"chatId": "bob", "message": format!("m{i}")}),
        )
        .await;
        message_ids.push(response["payload"]["messageId"].as_u64().unwrap());
        responses.push(response);
    }
    let mut events = Vec::new();
    while events.len() < 5 {
        events.push(bob.recv_until(is_new).await);
    }
    for event in &events[..2] {
        bob.send_json(&json!({"type": "ack", "id": event["id"].as_u64().unwrap().to_string()}))
            .await;
    }
    // A read-only round trip: the acks before it on this socket have been handled.
    request(&mut bob, "sync", "history", json!({"chatId": "nobody"})).await;

    server.kill(); // SIGKILL: no shutdown, no flush.
    drop((alice, bob));

    let server = Node::start(&dir.0, "reqack", &[]);
    let mut bob = connect(server.addr, "bob").await;
    let mut replayed = Vec::new();
    while replayed.len() < 3 {
        replayed.push(bob.recv_until(is_new).await);
    }
    let strip = |v: &Value| (v["id"].clone(), v["payload"].clone());
    assert_eq!(
        replayed.iter().map(strip).collect::<Vec<_>>(),
        events[2..].iter().map(strip).collect::<Vec<_>>(),
        "the unacked events, with their ids and payloads"
    );
    let more = new_events_within(&mut bob, Duration::from_millis(500)).await;
    assert!(more.is_empty(), "acked events came back: {more:?}");

    let mut alice = connect(server.addr, "alice").await;
    // A retry (same request id) gets the response it got before the crash, identical to the
    // timestamp, and runs nothing again: bob's next event is the one for r5 below.
    for (i, before) in responses.iter().enumerate() {
        let payload = json!({"chatId": "bob", "message": format!("m{i}")});
        let again = request_frame(&mut alice, &format!("r{i}"), "new", payload).await;
        assert_eq!(&again, before, "the retried request r{i}");
    }
    let payload = request(
        &mut alice,
        "r5",
        "new",
        json!({"chatId": "bob", "message": "after the crash"}),
    )
    .await;
    let newest = payload["messageId"].as_u64().unwrap();
    assert!(
        newest > *message_ids.iter().max().unwrap(),
        "message ids continue: {newest} after {message_ids:?}"
    );
    let event = tokio::time::timeout(TIMEOUT, bob.recv_until(is_new))
        .await
        .unwrap();
    assert!(
        event["id"].as_u64().unwrap() > events[4]["id"].as_u64().unwrap(),
        "event ids continue: {event} after {}",
        events[4]
    );
    assert_eq!(
        event["payload"]["message"], "after the crash",
        "the retries delivered nothing: {event}"
    );
    server.kill();
}

/// What one ip-chat load client saw before the kill.
#[derive(Default)]
struct ChatSeen {
    /// Every `message` broadcast it received, in order (its own and the others').
    messages: Vec<Value>,
    /// Every reaction added that it saw broadcast: (message id, emoji, user id).
    reactions: Vec<(String, String, String)>,
    /// The `author_id` the node gave this client's address.
    author_id: Option<String>,
    /// Whether it sent everything it meant to (false: the kill cut it off).
    finished: bool,
}

/// Sends messages and reacts to each of its own, recording every broadcast, until the node
/// dies (or `count` messages).
fn ip_chat_load(url: &str, ip: &str, k: usize, count: usize, acks: &mpsc::Sender<()>) -> ChatSeen {
    let mut seen = ChatSeen::default();
    let Ok(mut ws) = Ws::connect(url, &[("x-forwarded-for", ip)]) else {
        return seen;
    };
    let record = |seen: &mut ChatSeen, v: &Value| {
        if v["type"] == "message" {
            seen.messages.push(v["data"].clone());
        } else if v["type"] == "reaction_updated" && v["data"]["action"] == "added" {
            let d = &v["data"];
            seen.reactions.push((
                d["message_id"].as_str().unwrap().to_owned(),
                d["emoji"].as_str().unwrap().to_owned(),
                d["user_id"].as_str().unwrap().to_owned(),
            ));
        }
    };
    for i in 0..count {
        let text = format!("client {k} message {i}");
        let sent =
            json!({"type": "send_message", "data": {"text": text, "author_name": format!("c{k}")}});
        let Ok(own) = ws.send(&sent).and_then(|()| {
            ws.recv_until(
                |v| record(&mut seen, v),
                |v| v["type"] == "message" && v["data"]["text"] == text,
            )
        }) else {
            return seen;
        };
        seen.author_id = own["data"]["author_id"].as_str().map(str::to_owned);
        let _ = acks.send(());
        let id = own["data"]["id"].clone();
        let react = json!({"type": "add_reaction", "data": {"message_id": id, "emoji": "👍"}});
        let reacted = ws.send(&react).and_then(|()| {
            ws.recv_until(
                |v| record(&mut seen, v),
                |v| v["type"] == "reaction_updated" && v["data"]["message_id"] == id,
            )
        });
        if reacted.is_err() {
            return seen;
        }
        let _ = acks.send(());
    }
    seen.finished = true;
    seen
}

/// ip-chat: every message and reaction broadcast before a SIGKILL that lands while clients are
/// sending replays after the restart, in the same order, with the same ids, and every address
/// keeps its `author_id`.
#[test]
fn ip_chat_history_survives_sigkill_under_load() {
    const CLIENTS: usize = 4;
    let dir = TempDir::new("ip-chat");
    let args = [
        "--trust-proxy",
        "--ip-chat-rate-limit",
        "0",
        "--ip-chat-reaction-rate-limit",
        "0",
    ];
    let node = Node::start(&dir.0, "ip-chat", &args);
    let url = node.url("/ws");
    let ip = |k: usize| format!("203.0.113.{}", k + 1);
    let (acks, progress) = mpsc::channel();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let (url, ip, acks) = (url.clone(), ip(k), acks.clone());
            // 4 × 150 messages stay inside the default history of 1000.
            std::thread::spawn(move || ip_chat_load(&url, &ip, k, 150, &acks))
        })
        .collect();
    await_acks(&progress, 200);
    node.kill();
    let seen: Vec<ChatSeen> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(
        seen.iter().any(|s| !s.finished),
        "the kill landed after the load had finished"
    );

    let node = Node::start(&dir.0, "ip-chat", &args);
    let url = node.url("/ws");
    // The replay comes before any live frame: everything before our own new message is the
    // stored history.
    let mut replay = Vec::new();
    for (k, before) in seen.iter().enumerate() {
        let mut ws = Ws::open(&url, &[("x-forwarded-for", &ip(k))]);
        let text = format!("client {k} after the restart");
        let own = ws.ask(
            &json!({"type": "send_message", "data": {"text": text}}),
            |v| {
                if k == 0 && v["type"] == "message" && v["data"]["text"] != text {
                    replay.push(v["data"].clone());
                }
                v["type"] == "message" && v["data"]["text"] == text
            },
        );
        if let Some(before) = &before.author_id {
            assert_eq!(
                own["data"]["author_id"],
                before.as_str(),
                "author_id of {}",
                ip(k)
            );
        }
    }
    let position: HashMap<&str, usize> = replay
        .iter()
        .enumerate()
        .map(|(i, m)| (m["id"].as_str().unwrap(), i))
        .collect();
    assert_eq!(position.len(), replay.len(), "a message replayed twice");
    let mut acknowledged = 0;
    for (k, client) in seen.iter().enumerate() {
        let mut last = None;
        for message in &client.messages {
            let id = message["id"].as_str().unwrap();
            let Some(&at) = position.get(id) else {
                panic!("client {k} received {message}, which is gone after the restart");
            };
            for field in ["text", "author_id", "author_name", "created_at"] {
                assert_eq!(replay[at][field], message[field], "{field} of {id}");
            }
            assert!(last < Some(at), "client {k}: {id} replays out of order");
            last = Some(at);
            acknowledged += 1;
        }
        for (message, emoji, user) in &client.reactions {
            let users = &replay[position[message.as_str()]]["reactions"][emoji];
            assert!(
                users
                    .as_array()
                    .is_some_and(|u| u.iter().any(|u| u == user.as_str())),
                "reaction {emoji} of {user} on {message} is gone: {users}"
            );
        }
    }
    assert!(
        acknowledged >= 100,
        "only {acknowledged} broadcasts checked"
    );
    node.kill();
}

fn uuid(seed: u32, n: usize) -> String {
    format!("{seed:08x}-0000-4000-8000-{n:012x}")
}

/// What one fastchat sender did before the kill.
#[derive(Default)]
struct Sent {
    /// (message_id, content) of every MSG sent, in order (the last may be unanswered).
    sent: Vec<(String, String)>,
    /// The message ids answered `MSG_ACK sent`.
    acked: HashSet<String>,
    finished: bool,
}

/// Says HELLO as `user` and returns the full PRESENCE list that follows.
fn hello(ws: &mut Ws, user: &str, name: &str) -> WsResultValue {
    ws.send(&json!({"type": "HELLO", "data": {"user_id": user, "display_name": name}}))?;
    ws.recv_until(|_| {}, |v| v["type"] == "HELLO_ACK")?;
    ws.recv_until(|_| {}, |v| v["type"] == "PRESENCE")
}

type WsResultValue = common::WsResult<Value>;

/// One sender: waits until its recipient is offline, opens a chat with it and sends MSGs with
/// its own message ids, one at a time, until the node dies (or `count` messages).
fn fastchat_load(url: &str, me: &str, to: &str, count: usize, acks: &mpsc::Sender<()>) -> Sent {
    let mut out = Sent::default();
    let Ok(mut ws) = Ws::connect(url, &[]) else {
        return out;
    };
    let offline = |v: &Value| {
        v["data"]["users"]
            .as_array()
            .is_some_and(|u| u.iter().any(|u| u["user_id"] == to && u["online"] == false))
    };
    let Ok(list) = hello(&mut ws, me, "a sender") else {
        return out;
    };
    // The recipient closed its socket; the node may not have processed that yet.
    if !offline(&list)
        && ws
            .recv_until(|_| {}, |v| v["type"] == "PRESENCE" && offline(v))
            .is_err()
    {
        return out;
    }
    let open = json!({"type": "OPEN_CHAT", "data": {"target_user_id": to}});
    if ws
        .send(&open)
        .and_then(|()| ws.recv_until(|_| {}, |v| v["type"] == "CHAT_OPENED"))
        .is_err()
    {
        return out;
    }
    for i in 0..count {
        let (id, content) = (format!("{me}/{i}"), format!("message {i} from {me}"));
        let msg = json!({"type": "MSG", "data": {"to": to, "content": content, "message_id": id}});
        out.sent.push((id.clone(), content));
        let answer = ws.send(&msg).and_then(|()| {
            ws.recv_until(
                |_| {},
                |v| {
                    (v["type"] == "MSG_ACK" && v["data"]["message_id"] == id)
                        || (v["type"] == "ERROR" && v["data"]["details"]["message_id"] == id)
                },
            )
        });
        match answer {
            Ok(ack) if ack["type"] == "MSG_ACK" => {
                assert_eq!(ack["data"]["status"], "sent", "{ack}");
                out.acked.insert(id);
                let _ = acks.send(());
            }
            Ok(error) => panic!("MSG {id} refused before the kill: {error}"),
            Err(_) => return out,
        }
    }
    out.finished = true;
    out
}

/// After the restart: the sender finds every user, retries every message id it sent and one
/// new message (each answered `MSG_ACK`), then the recipient's HELLO delivers each exactly once.
fn check_fastchat_pair(url: &str, users: &[String], me: &str, to: &str, out: &Sent) {
    let mut ws = Ws::open(url, &[]);
    let list = hello(&mut ws, me, "a sender").unwrap();
    for user in users {
        assert!(
            list["data"]["users"]
                .as_array()
                .unwrap()
                .iter()
                .any(|u| u["user_id"] == user.as_str()),
            "user {user} is gone: {list}"
        );
    }
    // A client that had no answer retries with the same id; one that had may retry too. The
    // new message needs the chat opened before the kill.
    let after = (format!("{me}/after"), "after the restart".to_owned());
    for (id, content) in out.sent.iter().chain([&after]) {
        let msg = json!({"type": "MSG", "data": {"to": to, "content": content, "message_id": id}});
        let ack = ws.ask(&msg, |v| {
            v["data"]["message_id"] == id.as_str() || v["type"] == "ERROR"
        });
        assert_eq!(ack["type"], "MSG_ACK", "MSG {id} after the restart: {ack}");
    }
    let mut ws = Ws::open(url, &[]);
    let mut queued = Vec::new();
    hello(&mut ws, to, "a recipient").unwrap();
    // Queued messages follow HELLO_ACK and PRESENCE; a PING's PONG comes after them.
    ws.ask(&json!({"type": "PING"}), |v| {
        if v["type"] == "MSG" {
            queued.push(v["data"].clone());
        }
        v["type"] == "PONG"
    });
    let got: Vec<(String, String)> = queued
        .iter()
        .map(|m| {
            assert_eq!(m["from"], me);
            let field = |f: &str| m[f].as_str().unwrap().to_owned();
            (field("message_id"), field("content"))
        })
        .collect();
    let expected: Vec<(String, String)> = out.sent.iter().cloned().chain([after]).collect();
    assert_eq!(
        got,
        expected,
        "recipient {to}: every message, once, in order ({} acknowledged before the kill)",
        out.acked.len()
    );
}

/// fastchat: users, open chats and the MSGs queued for offline recipients survive a SIGKILL
/// that lands while senders are sending; after the restart a retry of any message id (answered
/// before the kill or not) is answered `MSG_ACK` and de-duplicated, and each recipient's next
/// HELLO delivers every acknowledged message exactly once, in order.
#[test]
fn fastchat_queues_survive_sigkill_under_load() {
    const PAIRS: usize = 4;
    let dir = TempDir::new("fastchat");
    let args = [
        "--fastchat-msg-rate-limit",
        "0",
        "--fastchat-client-msg-per-minute",
        "0",
    ];
    let node = Node::start(&dir.0, "fastchat", &args);
    let url = node.url("/ws");
    let seed = std::process::id();
    let sender = |k: usize| uuid(seed, k);
    let recipient = |k: usize| uuid(seed, 100 + k);
    for k in 0..PAIRS {
        let mut ws = Ws::open(&url, &[]);
        hello(&mut ws, &recipient(k), "a recipient").unwrap();
    }
    let (acks, progress) = mpsc::channel();
    let senders: Vec<_> = (0..PAIRS)
        .map(|k| {
            let (url, me, to, acks) = (url.clone(), sender(k), recipient(k), acks.clone());
            // 60 each: a recipient's offline queue holds 100 by default.
            std::thread::spawn(move || fastchat_load(&url, &me, &to, 60, &acks))
        })
        .collect();
    await_acks(&progress, 40);
    node.kill();
    let sent: Vec<Sent> = senders.into_iter().map(|s| s.join().unwrap()).collect();
    assert!(
        sent.iter().any(|s| !s.finished),
        "the kill landed after the load had finished"
    );

    let node = Node::start(&dir.0, "fastchat", &args);
    let url = node.url("/ws");
    let users: Vec<String> = (0..PAIRS).flat_map(|k| [sender(k), recipient(k)]).collect();
    // The pairs are independent: checked side by side, the test takes a quarter of the time.
    std::thread::scope(|scope| {
        for (k, out) in sent.iter().enumerate() {
            let (url, users) = (&url, &users);
            scope.spawn(move || check_fastchat_pair(url, users, &sender(k), &recipient(k), out));
        }
    });
    node.kill();
}

/// What one collab editor saw before the kill.
#[derive(Default)]
struct Edits {
    /// (token, version) of each edit answered `code-ack`.
    acked: Vec<(String, u64)>,
    /// (version, code) of each `code-update` received.
    updates: Vec<(u64, String)>,
    /// The languages sent, in order, and how many of them were answered `language-updated`.
    languages: Vec<String>,
    languages_acked: usize,
    finished: bool,
}

/// One editor of session `s`: joins, then inserts a unique token at the start of the document,
/// one edit in flight at a time, and (editor 0) changes the language every fourth edit.
fn collab_load(url: &str, s: usize, e: usize, count: usize, acks: &mpsc::Sender<()>) -> Edits {
    let mut out = Edits::default();
    let Ok(mut ws) = Ws::connect(url, &[]) else {
        return out;
    };
    let join = json!({"type": "join-session", "payload": {"userId": format!("user-{s}-{e}")}});
    let Ok(state) = ws
        .send(&join)
        .and_then(|()| ws.recv_until(|_| {}, |v| v["type"] == "session-state"))
    else {
        return out;
    };
    let mut version = state["payload"]["version"].as_u64().unwrap();
    for i in 0..count {
        if e == 0 && i % 4 == 0 {
            let language = format!("lang-{s}-{i}");
            out.languages.push(language.clone());
            let change = json!({"type": "language-change", "payload": {"language": language}});
            let updated = ws.send(&change).and_then(|()| {
                ws.recv_until(
                    |_| {},
                    |v| v["type"] == "language-updated" && v["payload"]["language"] == language,
                )
            });
            if updated.is_err() {
                return out;
            }
            out.languages_acked += 1;
            let _ = acks.send(());
        }
        let token = format!("[s{s}e{e}i{i}]");
        let change = json!({"type": "code-change", "payload": {"changes": {"baseVersion": version, "ops": [token]}}});
        if ws.send(&change).is_err() {
            return out;
        }
        loop {
            let Ok(frame) = ws.recv() else { return out };
            let payload = &frame["payload"];
            match frame["type"].as_str() {
                Some("code-update") => {
                    version = payload["version"].as_u64().unwrap();
                    let code = payload["code"].as_str().unwrap().to_owned();
                    out.updates.push((version, code));
                }
                Some("code-ack") => {
                    version = payload["version"].as_u64().unwrap();
                    out.acked.push((token, version));
                    let _ = acks.send(());
                    break;
                }
                Some("error") => panic!("edit {token} refused before the kill: {frame}"),
                _ => {}
            }
        }
    }
    out.finished = true;
    out
}

/// collab: every session, and its code, language and version as last acknowledged
/// (`code-ack`, `code-update`, `language-updated`), survive a SIGKILL that lands while editors
/// are typing; REST and a new joiner's `session-state` agree on them.
#[test]
fn collab_sessions_survive_sigkill_under_load() {
    const SESSIONS: usize = 2;
    const EDITORS: usize = 2;
    let dir = TempDir::new("collab");
    let args = ["--collab-relay-burst", "0"];
    let node = Node::start(&dir.0, "collab", &args);
    let ids: Vec<String> = (0..SESSIONS)
        .map(|_| {
            let (status, body) = http(node.addr, "POST", "/api/sessions", "");
            assert_eq!(status, 201, "{body}");
            body["sessionId"].as_str().unwrap().to_owned()
        })
        .collect();
    let (acks, progress) = mpsc::channel();
    let editors: Vec<_> = (0..SESSIONS)
        .flat_map(|s| (0..EDITORS).map(move |e| (s, e)))
        .map(|(s, e)| {
            let (url, acks) = (node.url(&format!("/ws/{}", ids[s])), acks.clone());
            std::thread::spawn(move || ((s, e), collab_load(&url, s, e, 200, &acks)))
        })
        .collect();
    await_acks(&progress, 100);
    node.kill();
    let edits: Vec<((usize, usize), Edits)> =
        editors.into_iter().map(|e| e.join().unwrap()).collect();
    assert!(
        edits.iter().any(|(_, e)| !e.finished),
        "the kill landed after the load had finished"
    );

    let node = Node::start(&dir.0, "collab", &args);
    for (s, id) in ids.iter().enumerate() {
        let (status, rest) = http(node.addr, "GET", &format!("/api/sessions/{id}"), "");
        assert_eq!(status, 200, "session {id} after the restart: {rest}");
        let code = rest["code"].as_str().unwrap();
        let version = rest["version"].as_u64().unwrap();
        // Every accepted edit inserted one token and nothing was deleted.
        assert_eq!(
            code.matches('[').count(),
            usize::try_from(version).unwrap(),
            "version {version} of {code:?}"
        );
        for (_, out) in edits.iter().filter(|((session, _), _)| *session == s) {
            for (token, acked) in &out.acked {
                assert!(code.contains(token.as_str()), "acked edit {token} is gone");
                assert!(version >= *acked, "version {version} < acked {acked}");
            }
            for (seen, update) in &out.updates {
                assert!(version >= *seen, "version {version} < update {seen}");
                for token in update.split_inclusive(']') {
                    assert!(code.contains(token), "broadcast edit {token} is gone");
                }
            }
            if out.languages_acked > 0 {
                // The last acknowledged language, or one sent after it (stored, not yet
                // announced when the node died).
                let later = &out.languages[out.languages_acked - 1..];
                assert!(
                    later.iter().any(|l| rest["language"] == l.as_str()),
                    "language {} is older than the acknowledged {}",
                    rest["language"],
                    later[0]
                );
            }
        }
        let mut ws = Ws::open(&node.url(&format!("/ws/{id}")), &[]);
        let state = ws.ask(
            &json!({"type": "join-session", "payload": {"userId": "checker"}}),
            |v| v["type"] == "session-state",
        );
        for field in ["code", "language", "version"] {
            assert_eq!(
                state["payload"][field], rest[field],
                "session-state {field}"
            );
        }
    }
    node.kill();
}

#[test]
fn an_unusable_data_dir_fails_with_a_clear_error() {
    let dir = TempDir::new("unusable");
    std::fs::write(&dir.0, "a file, not a directory").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--protocol", "reqack"])
        .env("SWITCHBOARD_DATA_DIR", &dir.0)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&dir.0);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot open the state engine") && stderr.contains("data directory"),
        "{stderr}"
    );
}
