//! A terminal reqack client: acks and prints every event (once, deduplicated by event id),
//! confirms delivery of incoming messages, and sends what you type.
//!
//! ```text
//! cargo run -p reqack-client -- ws://127.0.0.1:8000/ws alice
//! cargo run -p reqack-client -- wss://localhost:8443/ws alice --ca-file ca.pem
//! ```
//!
//! Type `/to bob` to pick a conversation, then plain lines to send messages. Other commands:
//! `/read <messageId>`, `/edit <messageId> <text>`, `/delete <messageId>`, `/typing`,
//! `/call video|audio`, `/newcall <user,user,...> video|audio`, `/close <callId>`,
//! `/history [limit]`, `/help`. Ctrl-D quits.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a terminal program"
)]

use std::collections::{HashSet, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard_teambot::client::tls::{self, ClientTls};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

/// Event ids remembered for deduplication (a redelivered event is acked again, shown once).
const SEEN_LIMIT: usize = 10_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Remembers the last [`SEEN_LIMIT`] event ids.
#[derive(Default)]
struct Seen {
    ids: HashSet<u64>,
    order: VecDeque<u64>,
}

impl Seen {
    /// `true` the first time `id` is seen.
    fn first_time(&mut self, id: u64) -> bool {
        if !self.ids.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > SEEN_LIMIT
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
        true
    }
}

struct Session {
    me: String,
    chat: Option<String>,
    /// Request ids are unique per run (the server remembers answered ids for idempotency).
    prefix: String,
    next_request: u64,
    seen: Seen,
}

impl Session {
    fn request(&mut self, kind: &str, payload: Value) -> Value {
        self.next_request += 1;
        json!({
            "type": "request", "timestamp": now_ms(),
            "id": format!("{}-{}", self.prefix, self.next_request),
            "payloadType": kind, "payload": payload,
        })
    }

    /// Turns a typed line into frames to send (none for local commands).
    fn command(&mut self, line: &str) -> Vec<Value> {
        let line = line.trim();
        if line.is_empty() {
            return Vec::new();
        }
        let (head, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        let id_arg = |text: &str| {
            text.split_whitespace()
                .next()
                .and_then(|s| s.parse::<u64>().ok())
        };
        match head {
            "/help" => {
                println!(
                    "/to <user> | <text> | /read <id> | /edit <id> <text> | /delete <id> | /typing | \
                     /call video|audio | /newcall <u1,u2> video|audio | /close <callId> | /history [n]"
                );
                Vec::new()
            }
            "/to" if !rest.is_empty() => {
                self.chat = Some(rest.to_owned());
                println!("-- talking to {rest}");
                Vec::new()
            }
            "/read" => match id_arg(rest) {
                Some(id) => vec![self.request("read", json!({"messageId": id}))],
                None => usage("/read <messageId>"),
            },
            "/delete" => match id_arg(rest) {
                Some(id) => vec![self.request("delete", json!({"messageId": id}))],
                None => usage("/delete <messageId>"),
            },
            "/edit" => match rest.split_once(' ') {
                Some((id, text)) if id.parse::<u64>().is_ok() => {
                    let id = id.parse::<u64>().unwrap_or_default();
                    vec![self.request("edit", json!({"messageId": id, "message": text}))]
                }
                _ => usage("/edit <messageId> <text>"),
            },
            "/newcall" => match rest.split_once(' ') {
                Some((users, kind)) => {
                    let participants: Vec<&str> = users.split(',').map(str::trim).collect();
                    vec![self.request(
                        "newCall",
                        json!({"participants": participants, "callType": kind.trim()}),
                    )]
                }
                None => usage("/newcall <user,user> video|audio"),
            },
            "/close" if !rest.is_empty() => {
                vec![self.request("closeCall", json!({"callId": rest}))]
            }
            _ if head.starts_with('/') && !matches!(head, "/typing" | "/call" | "/history") => {
                usage("/help")
            }
            _ => {
                let Some(chat) = self.chat.clone() else {
                    println!("-- pick a conversation first: /to <user>");
                    return Vec::new();
                };
                match head {
                    "/typing" => vec![json!({
                        "type": "event", "timestamp": now_ms(), "eventType": "typing",
                        "payload": {"chatId": chat},
                    })],
                    "/call" => vec![self.request(
                        "call",
                        json!({"chatId": chat, "callType": if rest.is_empty() { "audio" } else { rest },
                               "direction": "outgoing"}),
                    )],
                    "/history" => {
                        let limit = rest.parse::<u64>().unwrap_or(20);
                        vec![self.request("history", json!({"chatId": chat, "limit": limit}))]
                    }
                    _ => {
                        let client_id = format!("{}-c{}", self.prefix, self.next_request + 1);
                        vec![self.request(
                            "new",
                            json!({"chatId": chat, "message": line, "clientMessageId": client_id}),
                        )]
                    }
                }
            }
        }
    }

    /// Prints a server frame and returns the frames to answer it with (ack, delivery receipt).
    fn incoming(&mut self, text: &str) -> Vec<Value> {
        let Ok(frame) = serde_json::from_str::<Value>(text) else {
            println!("?? {text}");
            return Vec::new();
        };
        let payload = &frame["payload"];
        match frame["type"].as_str() {
            Some("response") => {
                if let Some(error) = payload.get("error") {
                    println!(
                        "!! {} failed: {} {}",
                        frame["id"], error["code"], error["message"]
                    );
                } else if let Some(messages) = payload["messages"].as_array() {
                    for m in messages {
                        println!(
                            "   #{} {} -> {}: {}",
                            m["messageId"],
                            m["from"].as_str().unwrap_or("?"),
                            m["to"].as_str().unwrap_or("?"),
                            m["message"].as_str().unwrap_or("(call)")
                        );
                    }
                } else {
                    println!("ok {} {payload}", frame["id"]);
                }
                Vec::new()
            }
            Some("event") => {
                let Some(id) = frame["id"].as_u64() else {
                    println!("?? event without id: {text}");
                    return Vec::new();
                };
                // Ack every copy: the server keeps an event until some socket acks it.
                let mut out = vec![json!({"type": "ack", "id": id.to_string()})];
                if !self.seen.first_time(id) {
                    return out;
                }
                let kind = frame["eventType"].as_str().unwrap_or("?");
                match kind {
                    "new" => {
                        println!(
                            "[{}] #{}: {}",
                            payload["from"].as_str().unwrap_or("?"),
                            payload["messageId"],
                            payload["message"].as_str().unwrap_or("")
                        );
                        out.push(self.request("dlvrd", json!({"messageId": payload["messageId"]})));
                    }
                    "edit" => println!(
                        "[{}] edited #{}: {}",
                        payload["from"].as_str().unwrap_or("?"),
                        payload["originalMessageId"],
                        payload["message"].as_str().unwrap_or("")
                    ),
                    "delete" => println!(
                        "[{}] deleted #{}",
                        payload["from"].as_str().unwrap_or("?"),
                        payload["originalMessageId"]
                    ),
                    "dlvrd" | "read" => println!(
                        "   #{} {kind} by {}",
                        payload["messageId"],
                        payload["chatId"].as_str().unwrap_or("?")
                    ),
                    "typing" => println!(
                        "   {} is typing...",
                        payload["chatId"].as_str().unwrap_or("?")
                    ),
                    "online" | "offline" => {
                        println!("   {} is {kind}", payload["userId"].as_str().unwrap_or("?"));
                    }
                    _ => println!("   {kind}: {payload}"),
                }
                out
            }
            Some("error") => {
                println!("!! {} {}", payload["code"], payload["message"]);
                Vec::new()
            }
            _ => {
                println!("{text}");
                Vec::new()
            }
        }
    }
}

fn usage(text: &str) -> Vec<Value> {
    println!("-- usage: {text}");
    Vec::new()
}

#[tokio::main]
async fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // `--ca-file FILE`: trust a self-signed deployment's CA for wss:// (default: system roots).
    let tls = match ClientTls::from_args(&mut args) {
        Ok(tls) => tls,
        Err(error) => {
            eprintln!("{error}");
            std::process::exit(2);
        }
    };
    let mut args = args.into_iter();
    let base = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:8000/ws".to_owned());
    let Some(me) = args.next() else {
        eprintln!("usage: reqack-client <ws[s]://host:port/ws> <userId> [--ca-file FILE]");
        std::process::exit(2);
    };
    let url = format!("{base}?userId={me}");
    let (socket, _) = match tls::connect(&url, &tls, None).await {
        Ok(connected) => connected,
        Err(error) => {
            eprintln!("could not connect to {url}: {error}");
            std::process::exit(1);
        }
    };
    eprintln!("connected as {me}; /to <user> picks a conversation, /help lists commands");
    let mut session = Session {
        prefix: format!("{me}-{}", now_ms()),
        me,
        chat: None,
        next_request: 0,
        seen: Seen::default(),
    };
    let (mut write, mut read) = socket.split();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    'session: loop {
        let outgoing = tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => session.command(&line),
                _ => break,
            },
            incoming = read.next() => match incoming {
                Some(Ok(Message::Text(text))) => session.incoming(&text),
                Some(Ok(Message::Close(frame))) => {
                    eprintln!("server closed the connection: {frame:?}");
                    break;
                }
                Some(Ok(_)) => Vec::new(),
                Some(Err(error)) => {
                    eprintln!("connection error: {error}");
                    break;
                }
                None => break,
            },
        };
        for frame in outgoing {
            if write.send(Message::text(frame.to_string())).await.is_err() {
                break 'session;
            }
        }
    }
    eprintln!("bye, {}", session.me);
    let _ = write.close().await;
}
