//! A terminal ip-chat client: prints every message and reaction, sends each line you type.
//!
//! ```text
//! cargo run -p ip-chat-client -- ws://127.0.0.1:8000/ws Alice
//! cargo run -p ip-chat-client -- wss://localhost:8443/ws Alice --ca-file ca.pem
//! ```
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a terminal program"
)]

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard_teambot::client::tls::{self, ClientTls};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

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
    let name = args.next();
    let (socket, _) = match tls::connect(&url, &tls, None).await {
        Ok(connected) => connected,
        Err(error) => {
            eprintln!("could not connect to {url}: {error}");
            std::process::exit(1);
        }
    };
    eprintln!("connected to {url}; type a message and press enter (Ctrl-D quits)");
    let (mut write, mut read) = socket.split();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(text)) => {
                    let frame = json!({"type": "send_message", "data": {"text": text, "author_name": name}});
                    if write.send(Message::text(frame.to_string())).await.is_err() {
                        break;
                    }
                }
                _ => break,
            },
            incoming = read.next() => match incoming {
                Some(Ok(Message::Text(text))) => show(&text),
                Some(Ok(Message::Close(frame))) => {
                    eprintln!("server closed the connection: {frame:?}");
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

fn show(text: &str) {
    let Ok(frame) = serde_json::from_str::<Value>(text) else {
        println!("?? {text}");
        return;
    };
    let data = &frame["data"];
    match frame["type"].as_str() {
        Some("message") => println!(
            "[{}] {}",
            data["author_name"].as_str().unwrap_or("?"),
            data["text"].as_str().unwrap_or("")
        ),
        Some("reaction_updated") => println!(
            "  {} {} on \"{}\" -> {}",
            data["action"].as_str().unwrap_or("?"),
            data["emoji"].as_str().unwrap_or("?"),
            data["message"]["text"].as_str().unwrap_or(""),
            data["message"]["reactions"]
        ),
        Some("error") => println!("!! {}", data["error"].as_str().unwrap_or("?")),
        _ => println!("{text}"),
    }
}
