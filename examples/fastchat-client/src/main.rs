//! A terminal fastchat client: says HELLO, opens chats, sends what you type, prints everything
//! that arrives, acknowledges incoming messages (two-phase ticks) and PINGs every 10 s.
//!
//! ```text
//! cargo run -p fastchat-client -- ws://127.0.0.1:8000/ws Alice [user-id]
//! cargo run -p fastchat-client -- wss://localhost:8443/ws Alice --ca-file ca.pem
//! ```
//!
//! Without a user id a fresh UUID v4 is made (and printed, so you can reuse it). Commands:
//! `/open <user_id>` opens a chat and makes that user the recipient, `/to <user_id>` switches the
//! recipient, `/typing` sends a typing indicator, `/quit` leaves; any other line is sent as a
//! message to the current recipient.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a terminal program"
)]

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard_teambot::client::tls::{self, ClientTls};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

/// Comfortably below the server's default 15 s ping interval.
const PING_EVERY: Duration = Duration::from_secs(10);

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
    let url = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:8000/ws".to_owned());
    let name = args.next().unwrap_or_else(|| "Guest".to_owned());
    let user_id = args
        .next()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());

    let (socket, _) = match tls::connect(&url, &tls, None).await {
        Ok(connected) => connected,
        Err(error) => {
            eprintln!("could not connect to {url}: {error}");
            std::process::exit(1);
        }
    };
    eprintln!("connected to {url} as {name} ({user_id})");
    eprintln!("commands: /open <user_id>, /to <user_id>, /typing, /quit; other lines are sent");
    let (mut write, mut read) = socket.split();
    let mut outbox = vec![frame(
        "HELLO",
        json!({"user_id": user_id, "display_name": name}),
    )];
    let mut recipient: Option<String> = None;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;

    loop {
        for text in outbox.drain(..) {
            if write.send(Message::text(text)).await.is_err() {
                eprintln!("connection lost");
                return;
            }
        }
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => match command(&line, &mut recipient) {
                    Input::Send(text) => outbox.push(text),
                    Input::Nothing => {}
                    Input::Quit => break,
                },
                _ => break,
            },
            _ = ping.tick() => outbox.push(frame("PING", json!({}))),
            incoming = read.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    if let Some(reply) = show(&text, &mut recipient) {
                        outbox.push(reply);
                    }
                }
                Some(Ok(Message::Close(close))) => {
                    eprintln!("server closed the connection: {close:?}");
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => {
                    eprintln!("connection error: {error}");
                    break;
                }
                None => break,
            },
        }
    }
    let _ = write.close().await;
}

fn frame(kind: &str, data: Value) -> String {
    json!({"type": kind, "data": data}).to_string()
}

enum Input {
    Send(String),
    Nothing,
    Quit,
}

fn command(line: &str, recipient: &mut Option<String>) -> Input {
    let line = line.trim_end();
    let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
    match verb {
        "/quit" => Input::Quit,
        "/open" if !rest.trim().is_empty() => {
            *recipient = Some(rest.trim().to_owned());
            Input::Send(frame("OPEN_CHAT", json!({"target_user_id": rest.trim()})))
        }
        "/to" if !rest.trim().is_empty() => {
            *recipient = Some(rest.trim().to_owned());
            eprintln!("now writing to {}", rest.trim());
            Input::Nothing
        }
        "/typing" => Input::Send(frame("TYPING", json!({"is_typing": true}))),
        _ if line.starts_with('/') => {
            eprintln!("commands: /open <user_id>, /to <user_id>, /typing, /quit");
            Input::Nothing
        }
        "" => Input::Nothing,
        _ => match recipient {
            Some(to) => Input::Send(frame("MSG", json!({"to": to, "content": line}))),
            None => {
                eprintln!("no recipient yet: /open <user_id> first");
                Input::Nothing
            }
        },
    }
}

/// Prints one server frame; returns a reply to send (the MSG_ACK for an incoming message).
fn show(text: &str, recipient: &mut Option<String>) -> Option<String> {
    let Ok(frame_value) = serde_json::from_str::<Value>(text) else {
        println!("?? {text}");
        return None;
    };
    let data = &frame_value["data"];
    let s = |key: &str| data[key].as_str().unwrap_or("?").to_owned();
    match frame_value["type"].as_str() {
        Some("HELLO_ACK") => println!("** connected as {}", s("user_id")),
        Some("PRESENCE") => {
            let users = data["users"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            println!("** users:");
            for user in users {
                let dot = if user["online"] == true { "●" } else { "○" };
                println!(
                    "   {dot} {} ({})",
                    user["display_name"].as_str().unwrap_or("?"),
                    user["user_id"].as_str().unwrap_or("?")
                );
            }
        }
        Some("CHAT_OPENED") => {
            println!(
                "** chat {} with {} ({})",
                s("chat_id"),
                s("target_display_name"),
                s("target_user_id")
            );
            if recipient.is_none() {
                *recipient = data["target_user_id"].as_str().map(str::to_owned);
            }
        }
        Some("MSG") => {
            println!("[{} {}] {}", s("timestamp"), s("from"), s("content"));
            return Some(frame("MSG_ACK", json!({"message_id": data["message_id"]})));
        }
        Some("MSG_ACK") => {
            let tick = if data["status"] == "delivered" {
                "✓✓"
            } else {
                "✓"
            };
            println!("   {tick} {}", s("message_id"));
        }
        Some("TYPING") => {
            let state = if data["is_typing"] == true {
                "is typing…"
            } else {
                "stopped typing"
            };
            println!("   {} {state}", s("user_id"));
        }
        Some("PONG") => {}
        Some("ERROR") => println!("!! {}: {}", s("code"), s("message")),
        _ => println!("{text}"),
    }
    None
}
