//! ip-chat fan-out: how fast one message reaches every subscriber.
//!
//! Sockets can be spread over several nodes of a cluster: every socket in turn (subscribers
//! first, then senders) goes to the next target. With senders 0 the run only listens: it holds
//! its subscribers until each has the expected messages of a known run id, sent by another
//! process (several such processes together measure one broadcast to more sockets than one
//! process can open).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::info;

use crate::{
    BenchError, Percentiles, ProcessSample, Target, connect_from, sample_process, source_address,
};

/// The source-address pool of the senders (subscribers use [`FanoutOptions::source_pool`]).
const SENDER_POOL: u8 = 2;

/// What to run.
#[derive(Debug, Clone)]
pub struct FanoutOptions {
    /// The ip-chat WebSocket URLs, e.g. `ws://127.0.0.1:8000/ws`: one server, or several nodes
    /// of one cluster. Socket `k` (subscribers are sockets `0..subscribers`, then the senders)
    /// connects to `targets[k % targets.len()]`, so with two targets one subscriber and one
    /// sender sit on different nodes.
    pub targets: Vec<Target>,
    /// Sockets that only listen.
    pub subscribers: usize,
    /// Sockets that send, each from its own loopback address (so per-IP rate limits hold).
    /// 0 runs listen-only: the subscribers wait for `messages` messages carrying `run_id`
    /// from elsewhere, and a socket that fails to connect is counted instead of ending the run.
    pub senders: usize,
    /// Messages in total, shared among the senders (listen-only: messages each subscriber
    /// waits for).
    pub messages: usize,
    /// Messages per second across all senders; `None` sends as fast as possible. The senders
    /// take turns, so the server sees a steady stream at this rate (see `senders_in_phase`).
    pub rate: Option<f64>,
    /// With `rate`: every sender sends at the same instants instead of taking turns, so the
    /// server gets a burst of one message per sender each `senders / rate` seconds (a
    /// micro-burst, where how a server batches its writes shows).
    pub senders_in_phase: bool,
    /// The server processes' pids (every node, and e.g. the Redis they share), to measure
    /// their CPU time per delivery, summed.
    pub server_pids: Vec<u32>,
    /// Bound on the delivery phase after the last message is sent (listen-only: after every
    /// socket is connected).
    pub timeout: Duration,
    /// Connection attempts in flight at once.
    pub connect_concurrency: usize,
    /// The run id written into every message (`bench <run_id> ...`); `None` picks one. Give
    /// the same id to a sending and to listen-only runs so they recognise each other's
    /// messages. Only ASCII letters, digits, `-` and `_`.
    pub run_id: Option<String>,
    /// The loopback pool of the subscribers' source addresses (`127.<pool>.x.y`, see
    /// [`source_address`]). Senders use pool 2; several load processes aimed at the same
    /// node need different pools.
    pub source_pool: u8,
    /// Written (JSON: subscribers connected, connect failures) once every socket is
    /// connected, so whoever sends to listen-only runs knows when they are ready.
    pub ready_file: Option<PathBuf>,
    /// Put every latency sample in the report (to merge several processes' percentiles).
    pub keep_latency_samples: bool,
    /// Listen-only: keep every socket open this long after the last one got its messages,
    /// so that closing them does not overlap a broadcast other processes are still getting.
    pub hold: Duration,
}

impl FanoutOptions {
    /// The defaults for one target: 100 subscribers, 5 senders, 500 messages as fast as
    /// possible, 60 s timeout.
    pub fn new(target: Target) -> Self {
        Self {
            targets: vec![target],
            subscribers: 100,
            senders: 5,
            messages: 500,
            rate: None,
            senders_in_phase: false,
            server_pids: Vec::new(),
            timeout: Duration::from_secs(60),
            connect_concurrency: 256,
            run_id: None,
            source_pool: 1,
            ready_file: None,
            keep_latency_samples: false,
            hold: Duration::ZERO,
        }
    }
}

/// What came out.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    /// Nodes the sockets were spread over.
    pub targets: usize,
    /// Listening sockets.
    pub subscribers: usize,
    /// Listening sockets that connected (listen-only runs go on without the others).
    pub connected: usize,
    /// Subscribers that could not connect (listen-only runs).
    pub connect_failures: u64,
    /// Why the first of them failed.
    pub first_connect_error: Option<String>,
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
    /// `messages × connected subscribers`.
    pub expected_deliveries: u64,
    /// Deliveries that arrived at subscribers.
    pub deliveries: u64,
    /// This run's broadcasts that arrived at the senders (a broadcast reaches its sender's room
    /// too): the server wrote `deliveries + sender_deliveries` message frames in all.
    pub sender_deliveries: u64,
    /// Whether every expected delivery arrived (and, listen-only, every subscriber connected).
    pub complete: bool,
    /// Seconds to open every socket.
    pub connect_secs: f64,
    /// From the first send to the last delivery (listen-only: from the earliest send
    /// timestamp read in a message to the last delivery).
    pub duration_secs: f64,
    /// `deliveries / duration`.
    pub deliveries_per_sec: f64,
    /// End-to-end latency (send to receipt) in microseconds.
    pub latency_us: Percentiles,
    /// The earliest send timestamp read in a delivered message, Unix nanoseconds.
    pub first_sent_unix_ns: Option<u64>,
    /// When the last delivery arrived, Unix nanoseconds.
    pub last_delivery_unix_ns: Option<u64>,
    /// Every latency sample, sorted, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_samples_us: Option<Vec<f64>>,
    /// Server CPU seconds during the run, summed over the given pids.
    pub server_cpu_secs: Option<f64>,
    /// The same in nanoseconds, when every sample came from the nanosecond schedstat counters
    /// (`cargo xtask bench` subtracts a short run's from a long run's).
    pub server_cpu_ns: Option<u64>,
    /// The same per pid, in the order given.
    pub server_cpu_ns_each: Option<Vec<u64>>,
    /// Server CPU microseconds per delivery.
    pub server_cpu_per_delivery_us: Option<f64>,
}

struct SubscriberResult {
    received: u64,
    latencies_us: Vec<f64>,
    last: Option<Instant>,
    /// Wall-clock nanoseconds of the last delivery, and the earliest send timestamp read.
    last_unix_ns: u128,
    first_sent_unix_ns: Option<u128>,
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

/// Whether `id` can go into a message text unescaped and be found again verbatim.
pub fn valid_run_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Samples every pid; `None` unless all of them could be read.
fn sample_all(pids: &[u32]) -> Option<Vec<ProcessSample>> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|pid| sample_process(*pid)).collect()
}

/// Atomically writes `body` to `path` (a temporary file renamed into place).
fn write_ready_file(path: &std::path::Path, body: &str) -> Result<(), BenchError> {
    let fail = |source| BenchError::ReadyFile {
        path: path.display().to_string(),
        source,
    };
    let partial = path.with_extension("partial");
    std::fs::write(&partial, body).map_err(fail)?;
    std::fs::rename(&partial, path).map_err(fail)
}

/// Runs the fan-out benchmark.
pub async fn run(options: FanoutOptions) -> Result<FanoutReport, BenchError> {
    if options.targets.is_empty() {
        return Err(BenchError::Target("no target given".to_owned()));
    }
    let run_id = match &options.run_id {
        Some(id) if valid_run_id(id) => id.clone(),
        Some(id) => return Err(BenchError::Target(format!("invalid run id {id:?}"))),
        None => (unix_nanos() % 1_000_000_007).to_string(),
    };
    let listen_only = options.senders == 0;
    let target_of = |socket: usize| options.targets[socket % options.targets.len()].clone();
    let marker = Arc::<str>::from(format!("bench {run_id} "));
    let expected_per_subscriber = options.messages as u64;
    let (stop_tx, stop_rx) = watch::channel(false);

    info!(
        subscribers = options.subscribers,
        senders = options.senders,
        targets = options.targets.len(),
        "connecting"
    );
    let connect_started = Instant::now();
    let pool = options.source_pool;
    let subscribers: Vec<_> = futures::stream::iter(0..options.subscribers)
        .map(|i| {
            let target = target_of(i);
            async move { connect_from(&target, source_address(pool, i), i).await }
        })
        .buffer_unordered(options.connect_concurrency.max(1))
        .collect()
        .await;
    let mut subscriber_tasks = Vec::with_capacity(subscribers.len());
    let mut connect_failures = 0u64;
    let mut first_connect_error = None;
    for socket in subscribers {
        let mut socket = match socket {
            Ok(socket) => socket,
            Err(error) if listen_only => {
                connect_failures += 1;
                first_connect_error.get_or_insert_with(|| error.to_string());
                continue;
            }
            Err(error) => return Err(error),
        };
        let marker = marker.clone();
        let mut stop = stop_rx.clone();
        subscriber_tasks.push(tokio::spawn(async move {
            let mut result = SubscriberResult {
                received: 0,
                latencies_us: Vec::new(),
                last: None,
                last_unix_ns: 0,
                first_sent_unix_ns: None,
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
                            let now = unix_nanos();
                            result.last_unix_ns = now;
                            result.first_sent_unix_ns =
                                Some(result.first_sent_unix_ns.map_or(sent, |s| s.min(sent)));
                            let latency = now.saturating_sub(sent) as f64 / 1000.0;
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
            if listen_only {
                // Held until every subscriber of this run is done, so closing sockets does not
                // compete with the broadcast still being delivered to the others.
                (result, Some(socket))
            } else {
                let _ = socket.close(None).await;
                (result, None)
            }
        }));
    }
    let connected = subscriber_tasks.len();

    let rejected = Arc::new(AtomicU64::new(0));
    let sender_deliveries = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::with_capacity(options.senders);
    let mut sender_readers = Vec::with_capacity(options.senders);
    for j in 0..options.senders {
        let socket = connect_from(
            &target_of(options.subscribers + j),
            source_address(SENDER_POOL, j),
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

    if let Some(path) = &options.ready_file {
        let ready = serde_json::json!({
            "connected": connected,
            "connect_failures": connect_failures,
            "first_connect_error": first_connect_error,
            "connect_secs": connect_secs,
        });
        write_ready_file(path, &ready.to_string())?;
    }

    let cpu_before = sample_all(&options.server_pids);
    let started = Instant::now();
    let per_sender_interval = options
        .rate
        .map(|rate| Duration::from_secs_f64(options.senders.max(1) as f64 / rate.max(0.001)));
    let mut send_tasks = Vec::with_capacity(senders.len());
    for (j, mut write) in senders.into_iter().enumerate() {
        let count = options.messages / options.senders
            + usize::from(j < options.messages % options.senders);
        let marker = marker.clone();
        let first_send = per_sender_interval.map(|every| {
            pacing_start(started, every, options.senders, j, options.senders_in_phase)
        });
        send_tasks.push(tokio::spawn(async move {
            let mut pacing = per_sender_interval
                .zip(first_send)
                .map(|(every, start)| tokio::time::interval_at(start, every));
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
    if listen_only {
        info!(connected, "connected; listening");
    } else {
        info!(sent = options.messages, "sent; waiting for deliveries");
    }

    let deadline = Instant::now() + options.timeout;
    let mut results = Vec::with_capacity(subscriber_tasks.len());
    let stopper = tokio::spawn(async move {
        tokio::time::sleep_until(deadline).await;
        let _ = stop_tx.send(true);
    });
    let mut held = Vec::new();
    for task in subscriber_tasks {
        let (result, socket) = task.await.map_err(|e| BenchError::Socket(e.to_string()))?;
        results.push(result);
        held.extend(socket);
    }
    for reader in sender_readers {
        let _ = reader.await;
    }
    stopper.abort();
    let cpu_after = sample_all(&options.server_pids);
    if !held.is_empty() {
        tokio::time::sleep(options.hold).await;
    }
    futures::stream::iter(held)
        .for_each_concurrent(
            options.connect_concurrency.max(1),
            |mut socket| async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), socket.close(None)).await;
            },
        )
        .await;
    for mut writer in writers {
        let _ = writer.close().await;
    }

    let deliveries: u64 = results.iter().map(|r| r.received).sum();
    let mut close_codes = BTreeMap::new();
    for code in results.iter().filter_map(|r| r.closed.clone()) {
        *close_codes.entry(code).or_insert(0u64) += 1;
    }
    let first_sent = results.iter().filter_map(|r| r.first_sent_unix_ns).min();
    let last_delivery = results
        .iter()
        .map(|r| r.last_unix_ns)
        .max()
        .filter(|ns| *ns > 0);
    let duration_secs = if listen_only {
        // Nothing was sent from here: the broadcast's own timestamps frame it.
        match (first_sent, last_delivery) {
            (Some(first), Some(last)) => last.saturating_sub(first) as f64 / 1e9,
            _ => 0.0,
        }
    } else {
        let last = results
            .iter()
            .filter_map(|r| r.last)
            .max()
            .unwrap_or(started);
        last.duration_since(started).as_secs_f64()
    }
    .max(1e-9);
    let mut latencies: Vec<f64> = results.into_iter().flat_map(|r| r.latencies_us).collect();
    let expected_deliveries = expected_per_subscriber * connected as u64;
    let server_cpu: Option<Vec<(ProcessSample, ProcessSample)>> = cpu_before
        .zip(cpu_after)
        .map(|(before, after)| before.into_iter().zip(after).collect());
    let server_cpu_secs = server_cpu.as_ref().map(|pairs| {
        pairs
            .iter()
            .map(|(b, a)| a.cpu.saturating_sub(b.cpu).as_secs_f64())
            .sum::<f64>()
    });
    let server_cpu_ns_each = server_cpu
        .as_ref()
        .filter(|pairs| {
            pairs
                .iter()
                .all(|(b, a)| b.cpu_from_schedstat && a.cpu_from_schedstat)
        })
        .map(|pairs| {
            pairs
                .iter()
                .map(|(b, a)| {
                    u64::try_from(a.cpu.saturating_sub(b.cpu).as_nanos()).unwrap_or(u64::MAX)
                })
                .collect::<Vec<u64>>()
        });
    let server_cpu_ns = server_cpu_ns_each
        .as_ref()
        .map(|each| each.iter().fold(0u64, |sum, ns| sum.saturating_add(*ns)));
    let latency_us = Percentiles::of(&mut latencies);
    Ok(FanoutReport {
        targets: options.targets.len(),
        subscribers: options.subscribers,
        connected,
        connect_failures,
        first_connect_error,
        senders: options.senders,
        messages: options.messages,
        rejected: rejected.load(Ordering::Relaxed),
        closed_by_server: close_codes.values().sum(),
        close_codes,
        expected_deliveries,
        deliveries,
        sender_deliveries: sender_deliveries.load(Ordering::Relaxed),
        complete: deliveries == expected_deliveries && connect_failures == 0,
        connect_secs,
        duration_secs,
        deliveries_per_sec: deliveries as f64 / duration_secs,
        latency_us,
        first_sent_unix_ns: first_sent.map(|ns| u64::try_from(ns).unwrap_or(u64::MAX)),
        last_delivery_unix_ns: last_delivery.map(|ns| u64::try_from(ns).unwrap_or(u64::MAX)),
        latency_samples_us: options.keep_latency_samples.then_some(latencies),
        server_cpu_secs,
        server_cpu_ns,
        server_cpu_ns_each,
        server_cpu_per_delivery_us: server_cpu_secs
            .filter(|_| deliveries > 0)
            .map(|cpu| cpu * 1e6 / deliveries as f64),
    })
}

/// When paced sender `sender` (of `senders`, each sending every `every`) sends first: the
/// senders take turns, sender j starting j/senders of an interval late, so a paced run is a
/// steady stream rather than a burst of one message per sender each interval; unless
/// `in_phase`, which asks for those bursts.
fn pacing_start(
    started: Instant,
    every: Duration,
    senders: usize,
    sender: usize,
    in_phase: bool,
) -> Instant {
    if in_phase {
        return started;
    }
    let senders = u32::try_from(senders.max(1)).unwrap_or(u32::MAX);
    let turn = u32::try_from(sender).unwrap_or(u32::MAX);
    started + (every / senders).saturating_mul(turn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    /// `nodes` listeners on 127.0.0.1:0 sharing one relay that sends every text frame to every
    /// socket on any of them (the sender too), like the nodes of a cluster; the first
    /// `close_first` sockets accepted (on any node) are closed with 1008 after the handshake.
    /// Also returns how many sockets each node accepted.
    async fn relays(nodes: usize, close_first: usize) -> (Vec<Target>, Arc<Vec<AtomicUsize>>) {
        let (relay, _) = tokio::sync::broadcast::channel::<String>(4096);
        let accepted_total = Arc::new(AtomicUsize::new(0));
        let per_node = Arc::new((0..nodes).map(|_| AtomicUsize::new(0)).collect::<Vec<_>>());
        let mut targets = Vec::new();
        for node in 0..nodes {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let relay = relay.clone();
            let accepted_total = accepted_total.clone();
            let per_node = per_node.clone();
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let accepted = accepted_total.fetch_add(1, Ordering::SeqCst) + 1;
                    per_node[node].fetch_add(1, Ordering::SeqCst);
                    let relay = relay.clone();
                    tokio::spawn(async move {
                        // Subscribed before the handshake answers: a client that sees its
                        // 101 may send at once, and every socket open by then must get it.
                        let mut inbox = relay.subscribe();
                        let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                        if accepted <= close_first {
                            let close = CloseFrame {
                                code: CloseCode::Policy,
                                reason: "slow".into(),
                            };
                            let _ = ws.close(Some(close)).await;
                            return;
                        }
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
            targets.push(Target::parse(&format!("ws://{addr}/ws")).unwrap());
        }
        (targets, per_node)
    }

    async fn relay(close_first: usize) -> Target {
        relays(1, close_first).await.0.remove(0)
    }

    #[test]
    fn paced_senders_take_turns_unless_in_phase() {
        let start = Instant::now();
        let every = Duration::from_millis(200);
        let starts: Vec<_> = (0..4)
            .map(|j| pacing_start(start, every, 4, j, false) - start)
            .collect();
        assert_eq!(
            starts,
            [0, 50, 100, 150].map(Duration::from_millis).to_vec()
        );
        assert!((0..4).all(|j| pacing_start(start, every, 4, j, true) == start));
        // No senders to share the interval with: no division by zero.
        assert_eq!(pacing_start(start, every, 0, 0, false), start);
    }

    fn options(target: Target, timeout: Duration) -> FanoutOptions {
        FanoutOptions {
            subscribers: 5,
            senders: 2,
            messages: 10,
            server_pids: vec![std::process::id()],
            timeout,
            connect_concurrency: 1,
            ..FanoutOptions::new(target)
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
        // Measured on this test process, whose other tests' threads come and go (a thread
        // that exits takes its CPU time out of the sum), so only its presence is certain.
        assert!(report.server_cpu_ns.is_some(), "{report:?}");
        assert!(report.latency_samples_us.is_none());
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spreads_sockets_over_every_target_and_sums_every_pid() {
        let (targets, per_node) = relays(3, 0).await;
        let pid = std::process::id();
        let report = run(FanoutOptions {
            targets,
            // Seven sockets in turn over three nodes: 3, 2, 2.
            subscribers: 5,
            senders: 2,
            messages: 4,
            server_pids: vec![pid, pid],
            connect_concurrency: 1,
            ..FanoutOptions::new(Target::parse("ws://127.0.0.1:1/ws").unwrap())
        })
        .await
        .unwrap();
        assert!(report.complete, "{report:?}");
        assert_eq!((report.targets, report.deliveries), (3, 20));
        let accepted: Vec<usize> = per_node.iter().map(|n| n.load(Ordering::SeqCst)).collect();
        assert_eq!(accepted, [3, 2, 2]);
        let each = report.server_cpu_ns_each.clone().unwrap();
        assert_eq!(each.len(), 2);
        assert_eq!(report.server_cpu_ns, Some(each[0] + each[1]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listen_only_runs_receive_what_another_run_sends() {
        let (targets, _) = relays(2, 0).await;
        let dir = std::env::temp_dir().join(format!("fanout-ready-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let listener = tokio::spawn(run(FanoutOptions {
            targets: targets.clone(),
            subscribers: 4,
            senders: 0,
            messages: 2,
            timeout: Duration::from_secs(10),
            run_id: Some("shared-1".into()),
            source_pool: 9,
            ready_file: Some(ready.clone()),
            keep_latency_samples: true,
            hold: Duration::from_millis(50),
            ..FanoutOptions::new(targets[0].clone())
        }));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            assert!(std::time::Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
        assert_eq!(written["connected"], 4);
        // A run that only sends, on the second node, with the same run id.
        let sender = run(FanoutOptions {
            targets: vec![targets[1].clone()],
            subscribers: 0,
            senders: 1,
            messages: 2,
            run_id: Some("shared-1".into()),
            ..FanoutOptions::new(targets[1].clone())
        })
        .await
        .unwrap();
        assert_eq!(sender.sender_deliveries, 2);
        let report = listener.await.unwrap().unwrap();
        assert!(report.complete, "{report:?}");
        assert_eq!((report.connected, report.deliveries), (4, 8));
        assert_eq!(report.latency_samples_us.as_ref().map(Vec::len), Some(8));
        assert!(report.duration_secs > 0.0 && report.duration_secs < 10.0);
        let (sent, last) = (report.first_sent_unix_ns, report.last_delivery_unix_ns);
        assert!(sent.zip(last).is_some_and(|(s, l)| s < l), "{report:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listen_only_runs_count_sockets_that_could_not_connect() {
        // Nothing listens on the second target.
        let (mut targets, _) = relays(1, 0).await;
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = closed.local_addr().unwrap();
        drop(closed);
        targets.push(Target::parse(&format!("ws://{dead}/ws")).unwrap());
        let report = run(FanoutOptions {
            targets: targets.clone(),
            subscribers: 4,
            senders: 0,
            messages: 1,
            timeout: Duration::from_millis(200),
            ..FanoutOptions::new(targets[0].clone())
        })
        .await
        .unwrap();
        assert_eq!((report.connected, report.connect_failures), (2, 2));
        assert!(report.first_connect_error.is_some());
        assert!(!report.complete);
    }

    #[test]
    fn run_ids_are_plain() {
        assert!(valid_run_id("scale-123_a"));
        assert!(!valid_run_id(""));
        assert!(!valid_run_id("a\"b"));
        assert!(!valid_run_id("a b"));
    }

    #[test]
    fn reads_the_timestamp_back() {
        let frame = r#"{"type":"message","data":{"text":"bench 7 3 11 12345","id":"x"}}"#;
        assert_eq!(sent_at_nanos(frame, "bench 7 "), Some(12345));
        assert_eq!(sent_at_nanos(frame, "bench 8 "), None);
    }
}
