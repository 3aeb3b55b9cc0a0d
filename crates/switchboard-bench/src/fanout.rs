//! ip-chat fan-out: how fast one message reaches every subscriber.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::info;

use crate::{BenchError, Percentiles, Target, connect_from, sample_process, source_address};

/// What to run.
#[derive(Debug, Clone)]
pub struct FanoutOptions {
    /// The ip-chat WebSocket URL, e.g. `ws://127.0.0.1:8000/ws`.
    pub target: Target,
    /// Sockets that only listen.
    pub subscribers: usize,
    /// Sockets that send, each from its own loopback address (so per-IP rate limits hold).
    pub senders: usize,
    /// Messages in total, shared among the senders.
    pub messages: usize,
    /// Messages per second across all senders; `None` sends as fast as possible.
    pub rate: Option<f64>,
    /// The server's pid, to measure its CPU time per delivery.
    pub server_pid: Option<u32>,
    /// Bound on the delivery phase after the last message is sent.
    pub timeout: Duration,
    /// Connection attempts in flight at once.
    pub connect_concurrency: usize,
}

/// What came out.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    /// Listening sockets.
    pub subscribers: usize,
    /// Sending sockets.
    pub senders: usize,
    /// Messages sent.
    pub messages: usize,
    /// Messages the server refused (e.g. rate limited).
    pub rejected: u64,
    /// Subscribers the server disconnected before they had every message (e.g. closed as slow
    /// consumers); the bench's own deadline does not count.
    pub closed_by_server: u64,
    /// Those disconnects by close code (`"none"`: the socket ended without a close frame).
    pub close_codes: BTreeMap<String, u64>,
    /// `messages × subscribers`.
    pub expected_deliveries: u64,
    /// Deliveries that arrived at subscribers.
    pub deliveries: u64,
    /// This run's broadcasts that arrived at the senders (a broadcast reaches its sender's room
    /// too): the server wrote `deliveries + sender_deliveries` message frames in all.
    pub sender_deliveries: u64,
    /// Whether every expected delivery arrived.
    pub complete: bool,
    /// Seconds to open every socket.
    pub connect_secs: f64,
    /// From the first send to the last delivery.
    pub duration_secs: f64,
    /// `deliveries / duration`.
    pub deliveries_per_sec: f64,
    /// End-to-end latency (send to receipt) in microseconds.
    pub latency_us: Percentiles,
    /// Server CPU seconds during the run, when its pid was given.
    pub server_cpu_secs: Option<f64>,
    /// The same in nanoseconds, when both samples came from the nanosecond schedstat counters
    /// (`cargo xtask bench` subtracts a short run's from a long run's).
    pub server_cpu_ns: Option<u64>,
    /// Server CPU microseconds per delivery.
    pub server_cpu_per_delivery_us: Option<f64>,
}

struct SubscriberResult {
    received: u64,
    latencies_us: Vec<f64>,
    last: Option<Instant>,
    /// Set when the server ended the socket early: its close code, or `"none"`.
    closed: Option<String>,
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Extracts the send timestamp from a `message` frame carrying `marker` (`"bench <run> "`).
fn sent_at_nanos(frame: &str, marker: &str) -> Option<u128> {
    let start = frame.find(marker)? + marker.len();
    let rest = &frame[start..];
    let end = rest.find('"')?;
    rest[..end].rsplit(' ').next()?.parse().ok()
}

/// Runs the fan-out benchmark.
pub async fn run(options: FanoutOptions) -> Result<FanoutReport, BenchError> {
    let run_id = unix_nanos() % 1_000_000_007;
    let marker = Arc::<str>::from(format!("bench {run_id} "));
    let expected_per_subscriber = options.messages as u64;
    let (stop_tx, stop_rx) = watch::channel(false);

    info!(
        subscribers = options.subscribers,
        senders = options.senders,
        "connecting"
    );
    let connect_started = Instant::now();
    let subscribers: Vec<_> = futures::stream::iter(0..options.subscribers)
        .map(|i| {
            let target = options.target.clone();
            async move { connect_from(&target, source_address(1, i), i).await }
        })
        .buffer_unordered(options.connect_concurrency.max(1))
        .collect()
        .await;
    let mut subscriber_tasks = Vec::with_capacity(subscribers.len());
    for socket in subscribers {
        let mut socket = socket?;
        let marker = marker.clone();
        let mut stop = stop_rx.clone();
        subscriber_tasks.push(tokio::spawn(async move {
            let mut result = SubscriberResult {
                received: 0,
                latencies_us: Vec::new(),
                last: None,
                closed: None,
            };
            while result.received < expected_per_subscriber {
                let frame = tokio::select! {
                    frame = socket.next() => frame,
                    _ = stop.changed() => break,
                };
                match frame {
                    Some(Ok(Message::Close(close))) => {
                        result.closed =
                            Some(close.map_or_else(
                                || "none".to_owned(),
                                |c| u16::from(c.code).to_string(),
                            ));
                        break;
                    }
                    Some(Ok(Message::Text(text))) => {
                        if let Some(sent) = sent_at_nanos(&text, &marker) {
                            result.received += 1;
                            result.last = Some(Instant::now());
                            let latency = unix_nanos().saturating_sub(sent) as f64 / 1000.0;
                            result.latencies_us.push(latency);
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        result.closed = Some("none".to_owned());
                        break;
                    }
                }
            }
            let _ = socket.close(None).await;
            result
        }));
    }

    let rejected = Arc::new(AtomicU64::new(0));
    let sender_deliveries = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::with_capacity(options.senders);
    let mut sender_readers = Vec::with_capacity(options.senders);
    for j in 0..options.senders {
        let socket = connect_from(
            &options.target,
            source_address(2, j),
            options.subscribers + j,
        )
        .await?;
        let (write, mut read) = socket.split();
        // Senders receive the broadcast too; drain it so they never become slow consumers, and
        // count it until every message is in, so the CPU sample after the run covers every
        // frame the server writes for this run.
        let rejected = rejected.clone();
        let sender_deliveries = sender_deliveries.clone();
        let marker = marker.clone();
        let mut stop = stop_rx.clone();
        sender_readers.push(tokio::spawn(async move {
            let mut received = 0u64;
            while received < expected_per_subscriber {
                let frame = tokio::select! {
                    frame = read.next() => frame,
                    _ = stop.changed() => break,
                };
                match frame {
                    Some(Ok(Message::Text(text))) if text.contains(r#""type":"error""#) => {
                        rejected.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(Message::Text(text))) if text.contains(&*marker) => {
                        received += 1;
                        sender_deliveries.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break,
                }
            }
        }));
        senders.push(write);
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    info!(connect_secs, "connected; sending");

    let cpu_before = options.server_pid.and_then(sample_process);
    let started = Instant::now();
    let per_sender_interval = options
        .rate
        .map(|rate| Duration::from_secs_f64(options.senders as f64 / rate.max(0.001)));
    let mut send_tasks = Vec::with_capacity(senders.len());
    for (j, mut write) in senders.into_iter().enumerate() {
        let count = options.messages / options.senders
            + usize::from(j < options.messages % options.senders);
        let marker = marker.clone();
        send_tasks.push(tokio::spawn(async move {
            let mut pacing = per_sender_interval.map(tokio::time::interval);
            for seq in 0..count {
                if let Some(timer) = pacing.as_mut() {
                    timer.tick().await;
                }
                let text = format!("{marker}{j} {seq} {}", unix_nanos());
                let frame = serde_json::json!({"type": "send_message", "data": {"text": text}});
                if write.send(Message::text(frame.to_string())).await.is_err() {
                    return Err(BenchError::Socket(format!(
                        "sender {j} lost its connection"
                    )));
                }
            }
            Ok(write)
        }));
    }
    let mut writers = Vec::new();
    for task in send_tasks {
        writers.push(
            task.await
                .map_err(|e| BenchError::Socket(e.to_string()))??,
        );
    }
    info!(sent = options.messages, "sent; waiting for deliveries");

    let deadline = Instant::now() + options.timeout;
    let mut results = Vec::with_capacity(subscriber_tasks.len());
    let stopper = tokio::spawn(async move {
        tokio::time::sleep_until(deadline).await;
        let _ = stop_tx.send(true);
    });
    for task in subscriber_tasks {
        results.push(task.await.map_err(|e| BenchError::Socket(e.to_string()))?);
    }
    for reader in sender_readers {
        let _ = reader.await;
    }
    stopper.abort();
    let cpu_after = options.server_pid.and_then(sample_process);
    for mut writer in writers {
        let _ = writer.close().await;
    }

    let deliveries: u64 = results.iter().map(|r| r.received).sum();
    let mut close_codes = BTreeMap::new();
    for code in results.iter().filter_map(|r| r.closed.clone()) {
        *close_codes.entry(code).or_insert(0u64) += 1;
    }
    let last = results
        .iter()
        .filter_map(|r| r.last)
        .max()
        .unwrap_or(started);
    let duration_secs = last.duration_since(started).as_secs_f64().max(1e-9);
    let mut latencies: Vec<f64> = results.into_iter().flat_map(|r| r.latencies_us).collect();
    let expected_deliveries = expected_per_subscriber * options.subscribers as u64;
    let server_cpu = cpu_before.zip(cpu_after);
    let server_cpu_secs = server_cpu.map(|(b, a)| a.cpu.saturating_sub(b.cpu).as_secs_f64());
    let server_cpu_ns = server_cpu
        .filter(|(b, a)| b.cpu_from_schedstat && a.cpu_from_schedstat)
        .map(|(b, a)| u64::try_from(a.cpu.saturating_sub(b.cpu).as_nanos()).unwrap_or(u64::MAX));
    Ok(FanoutReport {
        subscribers: options.subscribers,
        senders: options.senders,
        messages: options.messages,
        rejected: rejected.load(Ordering::Relaxed),
        closed_by_server: close_codes.values().sum(),
        close_codes,
        expected_deliveries,
        deliveries,
        sender_deliveries: sender_deliveries.load(Ordering::Relaxed),
        complete: deliveries == expected_deliveries,
        connect_secs,
        duration_secs,
        deliveries_per_sec: deliveries as f64 / duration_secs,
        latency_us: Percentiles::of(&mut latencies),
        server_cpu_secs,
        server_cpu_ns,
        server_cpu_per_delivery_us: server_cpu_secs
            .filter(|_| deliveries > 0)
            .map(|cpu| cpu * 1e6 / deliveries as f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    /// A relay on 127.0.0.1:0 that sends every text frame to every socket (the sender too),
    /// and closes the first `close_first` sockets with 1008 right after the handshake.
    async fn relay(close_first: usize) -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (relay, _) = tokio::sync::broadcast::channel::<String>(4096);
        tokio::spawn(async move {
            for accepted in 1.. {
                let (stream, _) = listener.accept().await.unwrap();
                let relay = relay.clone();
                tokio::spawn(async move {
                    let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                    if accepted <= close_first {
                        let close = CloseFrame {
                            code: CloseCode::Policy,
                            reason: "slow".into(),
                        };
                        let _ = ws.close(Some(close)).await;
                        return;
                    }
                    let mut inbox = relay.subscribe();
                    loop {
                        tokio::select! {
                            Ok(text) = inbox.recv() => {
                                if ws.send(Message::text(text)).await.is_err() { break }
                            }
                            frame = ws.next() => match frame {
                                Some(Ok(Message::Text(text))) => { let _ = relay.send(text.to_string()); }
                                Some(Ok(_)) => {}
                                _ => break,
                            },
                        }
                    }
                });
            }
        });
        Target::parse(&format!("ws://{addr}/ws")).unwrap()
    }

    fn options(target: Target, timeout: Duration) -> FanoutOptions {
        FanoutOptions {
            target,
            subscribers: 5,
            senders: 2,
            messages: 10,
            rate: None,
            server_pid: Some(std::process::id()),
            timeout,
            connect_concurrency: 1,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_deliveries_to_subscribers_and_senders() {
        let target = relay(0).await;
        let report = run(options(target, Duration::from_secs(10))).await.unwrap();
        assert!(report.complete, "{report:?}");
        assert_eq!(report.deliveries, 50);
        // Each sender gets every message, its own included.
        assert_eq!(report.sender_deliveries, 20);
        assert_eq!(report.closed_by_server, 0);
        assert!(report.server_cpu_ns.is_some_and(|ns| ns > 0), "{report:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_subscribers_the_server_closed() {
        // Subscribers connect one at a time before any sender, so the first three are theirs.
        let target = relay(3).await;
        let report = run(options(target, Duration::from_secs(1))).await.unwrap();
        assert!(!report.complete);
        assert_eq!(report.deliveries, 20);
        assert_eq!(report.closed_by_server, 3);
        assert_eq!(report.close_codes.get("1008"), Some(&3), "{report:?}");
    }

    #[test]
    fn reads_the_timestamp_back() {
        let frame = r#"{"type":"message","data":{"text":"bench 7 3 11 12345","id":"x"}}"#;
        assert_eq!(sent_at_nanos(frame, "bench 7 "), Some(12345));
        assert_eq!(sent_at_nanos(frame, "bench 8 "), None);
    }
}
