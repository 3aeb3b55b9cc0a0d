//! Idle sockets: connect rate and the server's resident memory per connection.

use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::info;

use crate::{BenchError, Percentiles, Target, connect_from, sample_process, source_address};

/// What to run.
#[derive(Debug, Clone)]
pub struct IdleOptions {
    /// Any WebSocket URL of the server, e.g. `ws://127.0.0.1:8000/ws`.
    pub target: Target,
    /// Sockets to open and hold.
    pub connections: usize,
    /// The server's pid, to measure resident memory.
    pub server_pid: Option<u32>,
    /// How long to hold the sockets before measuring (lets the server settle).
    pub settle: Duration,
    /// Connection attempts in flight at once.
    pub connect_concurrency: usize,
}

/// What came out.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    /// Sockets held open.
    pub connections: usize,
    /// Seconds to open them all.
    pub connect_secs: f64,
    /// Connections per second.
    pub connects_per_sec: f64,
    /// Server RSS before connecting, bytes.
    pub rss_before_bytes: Option<u64>,
    /// Server RSS with every socket open, bytes.
    pub rss_after_bytes: Option<u64>,
    /// `(after - before) / connections`, bytes.
    pub rss_per_connection_bytes: Option<f64>,
    /// Time from starting a connect to the completed upgrade, milliseconds. A maximum near
    /// 1,000 ms or more means a SYN was dropped and retransmitted: a stall.
    pub connect_ms: Percentiles,
}

/// Opens `connections` sockets, measures, and closes them.
pub async fn run(options: IdleOptions) -> Result<IdleReport, BenchError> {
    let before = options.server_pid.and_then(sample_process);
    let (stop_tx, stop_rx) = watch::channel(false);
    info!(connections = options.connections, "connecting");
    let started = Instant::now();
    let mut sockets = futures::stream::iter(0..options.connections)
        .map(|i| {
            let target = options.target.clone();
            async move {
                let started = Instant::now();
                let socket = connect_from(&target, source_address(3, i), i).await?;
                Ok::<_, BenchError>((socket, started.elapsed()))
            }
        })
        .buffer_unordered(options.connect_concurrency.max(1));
    let mut holders = Vec::with_capacity(options.connections);
    let mut opened = 0usize;
    let mut connect_ms = Vec::with_capacity(options.connections);
    while let Some(socket) = sockets.next().await {
        let (mut socket, took) = socket?;
        connect_ms.push(took.as_secs_f64() * 1000.0);
        let mut stop = stop_rx.clone();
        // Reading keeps answering the server's pings (and drains any replay) while idle.
        holders.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    frame = socket.next() => if !matches!(frame, Some(Ok(_))) { break },
                    _ = stop.changed() => break,
                }
            }
            let _ = socket.close(None).await;
        }));
        opened += 1;
        if opened.is_multiple_of(1000) {
            info!(opened, "connecting");
        }
    }
    let connect_secs = started.elapsed().as_secs_f64().max(1e-9);
    info!(connect_secs, "all connected; settling");
    tokio::time::sleep(options.settle).await;
    let after = options.server_pid.and_then(sample_process);
    let _ = stop_tx.send(true);
    for holder in holders {
        let _ = holder.await;
    }
    let rss_per_connection_bytes = before.zip(after).map(|(b, a)| {
        a.rss_bytes.saturating_sub(b.rss_bytes) as f64 / options.connections.max(1) as f64
    });
    Ok(IdleReport {
        connections: options.connections,
        connect_secs,
        connects_per_sec: options.connections as f64 / connect_secs,
        rss_before_bytes: before.map(|s| s.rss_bytes),
        rss_after_bytes: after.map(|s| s.rss_bytes),
        rss_per_connection_bytes,
        connect_ms: Percentiles::of(&mut connect_ms),
    })
}
