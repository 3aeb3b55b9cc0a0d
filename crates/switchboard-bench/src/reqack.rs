//! reqack round trips: request→response latency and event→ack throughput, exactly once.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::info;

use crate::{BenchError, Percentiles, Target, connect_from, source_address};

/// What to run.
#[derive(Debug, Clone)]
pub struct ReqackOptions {
    /// The reqack base URLs, e.g. `ws://127.0.0.1:8000/ws` (`?userId=` is added per user):
    /// one server, or several nodes of one cluster. User `i` connects to
    /// `targets[i % targets.len()]`, so with several targets a user's partner (user `i + 1`)
    /// is on another node and every event crosses nodes (all but the last user's, when the
    /// users are not a multiple of the targets).
    pub targets: Vec<Target>,
    /// Users, each on its own socket and loopback address; user `i` writes to user `i + 1`.
    pub users: usize,
    /// Messages each user sends.
    pub messages: usize,
    /// Bound on the whole run.
    pub timeout: Duration,
}

/// What came out.
#[derive(Debug, Clone, Serialize)]
pub struct ReqackReport {
    /// Users.
    pub users: usize,
    /// Nodes the users were spread over.
    pub targets: usize,
    /// Users whose partner is connected to another node than theirs.
    pub cross_node_pairs: usize,
    /// Requests sent.
    pub requests: u64,
    /// Responses carrying a message id.
    pub responses: u64,
    /// Responses carrying an error.
    pub errors: u64,
    /// Request→response latency, microseconds.
    pub request_latency_us: Percentiles,
    /// `new` events that arrived (each acked).
    pub events: u64,
    /// `new` events seen more than once (redeliveries of the same event id).
    pub duplicates: u64,
    /// `new` events expected but never seen.
    pub missing: u64,
    /// Events per second from first request to last event.
    pub events_per_sec: f64,
    /// Every event arrived exactly once to the application.
    pub exactly_once: bool,
}

struct UserResult {
    responses: u64,
    errors: u64,
    latencies_us: Vec<f64>,
    events: HashSet<String>,
    duplicates: u64,
    last_event: Option<Instant>,
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Runs the reqack benchmark.
pub async fn run(options: ReqackOptions) -> Result<ReqackReport, BenchError> {
    if options.targets.is_empty() {
        return Err(BenchError::Target("no target given".to_owned()));
    }
    let run_id = now_ms() % 1_000_000_007;
    let user = |i: usize| format!("bench-{run_id}-{i}");
    let node_of = |i: usize| i % options.targets.len();
    let cross_node_pairs = (0..options.users)
        .filter(|&i| node_of(i) != node_of((i + 1) % options.users.max(1)))
        .count();
    let mut sockets = Vec::with_capacity(options.users);
    for i in 0..options.users {
        let base = &options.targets[node_of(i)];
        let target = base.with_path(&format!("{}?userId={}", path_of(base), user(i)));
        sockets.push(connect_from(&target, source_address(4, i), i).await?);
    }
    info!(users = options.users, "connected");
    let started = Instant::now();
    let deadline = started + options.timeout;
    let mut tasks = Vec::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let partner = user((i + 1) % options.users);
        let messages = options.messages;
        let expected_events = options.messages;
        tasks.push(tokio::spawn(async move {
            drive_user(socket, i, partner, messages, expected_events, deadline).await
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(
            task.await
                .map_err(|e| BenchError::Socket(e.to_string()))??,
        );
    }
    let expected_per_user = options.messages as u64;
    let events: u64 = results.iter().map(|r| r.events.len() as u64).sum();
    let missing: u64 = results
        .iter()
        .map(|r| expected_per_user.saturating_sub(r.events.len() as u64))
        .sum();
    let duplicates: u64 = results.iter().map(|r| r.duplicates).sum();
    let last = results
        .iter()
        .filter_map(|r| r.last_event)
        .max()
        .unwrap_or(started);
    let mut latencies: Vec<f64> = results
        .iter()
        .flat_map(|r| r.latencies_us.iter().copied())
        .collect();
    Ok(ReqackReport {
        users: options.users,
        targets: options.targets.len(),
        cross_node_pairs,
        requests: (options.users * options.messages) as u64,
        responses: results.iter().map(|r| r.responses).sum(),
        errors: results.iter().map(|r| r.errors).sum(),
        request_latency_us: Percentiles::of(&mut latencies),
        events,
        duplicates,
        missing,
        events_per_sec: events as f64 / last.duration_since(started).as_secs_f64().max(1e-9),
        exactly_once: missing == 0,
    })
}

fn path_of(target: &Target) -> String {
    let url = target.url();
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = after_scheme
        .find('/')
        .map_or("/ws", |at| &after_scheme[at..]);
    path.split('?').next().unwrap_or("/ws").to_owned()
}

async fn drive_user(
    socket: crate::ClientSocket,
    index: usize,
    partner: String,
    messages: usize,
    expected_events: usize,
    deadline: Instant,
) -> Result<UserResult, BenchError> {
    let (mut write, mut read) = socket.split();
    let mut result = UserResult {
        responses: 0,
        errors: 0,
        latencies_us: Vec::new(),
        events: HashSet::new(),
        duplicates: 0,
        last_event: None,
    };
    let mut pending: std::collections::HashMap<String, Instant> = std::collections::HashMap::new();
    let mut next = 0usize;
    // Keep a small window of requests in flight, like an app that does not wait for each reply.
    const WINDOW: usize = 8;
    let send_error = |_| BenchError::Socket(format!("user {index} lost its connection"));
    loop {
        while next < messages && pending.len() < WINDOW {
            let id = format!("r{index}-{next}");
            let request = json!({
                "type": "request", "timestamp": now_ms() as u64, "id": id, "payloadType": "new",
                "payload": {"chatId": partner, "message": format!("m{next}"), "clientMessageId": id}
            });
            pending.insert(id, Instant::now());
            write
                .send(Message::text(request.to_string()))
                .await
                .map_err(send_error)?;
            next += 1;
        }
        let done = next == messages && pending.is_empty() && result.events.len() >= expected_events;
        if done {
            break;
        }
        let frame = match tokio::time::timeout_at(deadline, read.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(BenchError::Socket(e.to_string())),
            Ok(None) => return Err(BenchError::Socket(format!("user {index}: server closed"))),
            Err(_) => break,
        };
        let Ok(value) = serde_json::from_str::<Value>(&frame) else {
            continue;
        };
        match value["type"].as_str() {
            Some("response") => {
                let id = value["id"].as_str().unwrap_or_default();
                if let Some(sent) = pending.remove(id) {
                    result.latencies_us.push(sent.elapsed().as_secs_f64() * 1e6);
                    if value["payload"]["error"].is_null() {
                        result.responses += 1
                    } else {
                        result.errors += 1
                    }
                }
            }
            Some("event") => {
                let id = value["id"].to_string();
                let ack = json!({"type": "ack", "id": id.trim_matches('"')});
                write
                    .send(Message::text(ack.to_string()))
                    .await
                    .map_err(send_error)?;
                if value["eventType"] == "new" {
                    let key = format!(
                        "{}:{}",
                        value["payload"]["from"], value["payload"]["messageId"]
                    );
                    if result.events.insert(key) {
                        result.last_event = Some(Instant::now());
                    } else {
                        result.duplicates += 1;
                    }
                }
            }
            _ => {}
        }
    }
    let _ = write.close().await;
    Ok(result)
}
