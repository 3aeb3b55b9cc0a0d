//! The benchmark baseline: the least code that does ip-chat's broadcast wire work with
//! tokio-tungstenite, so `cargo xtask bench` can show Switchboard's overhead as a ratio.
//!
//! Same work per message as ip-chat (parse, build the `message` JSON once, fan the shared bytes
//! out to every socket's bounded queue, batch writes per socket); none of the platform around it
//! (no origin check, rate limit, history, keepalive, shutdown). Usage: `baseline-server ADDR`.
#![allow(clippy::print_stderr, reason = "a benchmark helper")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use futures::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

type Clients = Arc<Mutex<HashMap<u64, mpsc::Sender<Utf8Bytes>>>>;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".to_owned());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("baseline listening on {addr}");
    let clients: Clients = Arc::default();
    let mut next_id = 0u64;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let clients = clients.clone();
        tokio::spawn(async move {
            let config = WebSocketConfig::default()
                .read_buffer_size(1024)
                .write_buffer_size(16 * 1024);
            let Ok(mut ws) =
                tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
            else {
                return;
            };
            let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(1024);
            clients
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, tx);
            loop {
                tokio::select! {
                    Some(frame) = rx.recv() => {
                        let mut batch = vec![frame];
                        while batch.len() < 64 {
                            match rx.try_recv() { Ok(f) => batch.push(f), Err(_) => break }
                        }
                        let mut ok = true;
                        for frame in batch {
                            ok &= ws.feed(Message::Text(frame)).await.is_ok();
                        }
                        if !ok || ws.flush().await.is_err() { break }
                    }
                    incoming = ws.next() => match incoming {
                        Some(Ok(Message::Text(text))) => broadcast(&clients, &text),
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                }
            }
            clients
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        });
    }
}

fn broadcast(clients: &Clients, text: &str) {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    let Some(body) = value["data"]["text"].as_str() else {
        return;
    };
    let message = serde_json::json!({"type": "message", "data": {
        "id": uuid::Uuid::new_v4(), "text": body, "author_id": "baseline", "author_name": "Anonymous",
        "created_at": chrono::Utc::now().timestamp(), "reactions": {}}});
    let frame = Utf8Bytes::from(message.to_string());
    for tx in clients
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
    {
        let _ = tx.try_send(frame.clone());
    }
}
