//! The bystander: one client on its own address measuring round trips.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use super::raw::{self, RawWs};

/// How long one probe may take before it counts as not answered.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The bystander latency rule: the median under attack within twice the idle median or 50 ms,
/// whichever is larger.
#[derive(Debug, Clone, Copy)]
pub struct LatencyRule {
    /// The bound, milliseconds.
    pub bound_ms: f64,
}

impl LatencyRule {
    /// The rule for an idle median of `idle_p50_ms`.
    pub fn from_idle(idle_p50_ms: f64) -> Self {
        Self {
            bound_ms: (2.0 * idle_p50_ms).max(50.0),
        }
    }

    /// Whether a median under attack holds.
    pub fn holds(&self, p50_ms: f64) -> bool {
        p50_ms <= self.bound_ms
    }
}

/// What the bystander does for one round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// collab: `language-change` comes back as `language-updated`.
    Collab,
    /// reqack: a `history` request gets its `response`.
    Reqack,
    /// fastchat: `PING` gets `PONG`.
    Fastchat,
    /// ip-chat: `send_message` comes back as `message` (the sender's rate limit allows 60 a
    /// minute: probe at most every 250 ms for a few seconds).
    IpChat,
    /// echo: a text comes back.
    Echo,
}

/// A bystander.
#[derive(Debug)]
pub(crate) enum Probe {
    /// Over a WebSocket it keeps.
    Ws {
        ws: RawWs,
        kind: Kind,
        sent: u64,
        /// The largest frame it had to skip while waiting for its answers (fan-out it received).
        largest_other: usize,
    },
    /// `GET /healthz` on a fresh connection each time.
    Healthz { addr: SocketAddr, source: Ipv4Addr },
}

impl Probe {
    /// A WebSocket bystander.
    pub(crate) fn ws(ws: RawWs, kind: Kind) -> Self {
        Self::Ws {
            ws,
            kind,
            sent: 0,
            largest_other: 0,
        }
    }

    /// The largest frame skipped so far.
    pub(crate) fn largest_other_frame(&self) -> usize {
        match self {
            Self::Ws { largest_other, .. } => *largest_other,
            Self::Healthz { .. } => 0,
        }
    }

    /// Reads what the server sent a WebSocket bystander until it has seen `want` distinct
    /// values of `key` (from the frames `key` picks one out of) or `wait` has passed; returns
    /// how many it saw. A `/healthz` bystander reads nothing and returns 0.
    pub(crate) async fn read_until_seen(
        &mut self,
        want: usize,
        wait: Duration,
        key: impl Fn(&Value) -> Option<String>,
    ) -> usize {
        let Self::Ws {
            ws, largest_other, ..
        } = self
        else {
            return 0;
        };
        let deadline = Instant::now() + wait;
        let mut seen = std::collections::HashSet::new();
        while seen.len() < want {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some(frame)) = ws.next_frame(left).await else {
                break;
            };
            *largest_other = (*largest_other).max(frame.payload.len());
            if let Some(k) = frame.json().as_ref().and_then(&key) {
                seen.insert(k);
            }
        }
        seen.len()
    }

    /// One round trip.
    pub(crate) async fn round_trip(&mut self) -> Result<Duration, String> {
        let started = Instant::now();
        match self {
            Self::Healthz { addr, source } => {
                let reply = raw::http(*addr, *source, "GET", "/healthz", "")
                    .await
                    .map_err(|e| format!("/healthz: {e}"))?;
                if reply.status != 200 {
                    return Err(format!("/healthz answered {}", reply.status));
                }
            }
            Self::Ws {
                ws,
                kind,
                sent,
                largest_other,
            } => {
                *sent += 1;
                let n = *sent;
                let (request, token) = match kind {
                    Kind::Collab => (
                        json!({"type": "language-change", "payload": {"language": format!("probe{n}")}}).to_string(),
                        format!("probe{n}"),
                    ),
                    Kind::Reqack => (
                        json!({"type": "request", "timestamp": 0, "id": format!("probe{n}"),
                               "payloadType": "history", "payload": {"chatId": "nobody"}})
                        .to_string(),
                        format!("probe{n}"),
                    ),
                    Kind::Fastchat => (json!({"type": "PING", "data": {}}).to_string(), String::new()),
                    Kind::IpChat => (
                        json!({"type": "send_message", "data": {"text": format!("probe {n}")}}).to_string(),
                        format!("probe {n}"),
                    ),
                    Kind::Echo => (format!("probe {n}"), format!("probe {n}")),
                };
                ws.send_text(&request).await.map_err(|e| e.to_string())?;
                let deadline = started + PROBE_TIMEOUT;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let frame = ws
                        .next_frame(left)
                        .await
                        .map_err(|e| e.to_string())?
                        .ok_or_else(|| format!("no answer within {PROBE_TIMEOUT:?}"))?;
                    if let Some((code, reason)) = frame.close_code() {
                        return Err(format!("bystander closed with {code} {reason}"));
                    }
                    if *kind == Kind::Echo {
                        if frame.payload == token.as_bytes() {
                            break;
                        }
                        continue;
                    }
                    let matched = frame.json().and_then(|v| answer(*kind, &v, &token));
                    match matched {
                        Some(Ok(())) => break,
                        Some(Err(e)) => return Err(e),
                        None => *largest_other = (*largest_other).max(frame.payload.len()),
                    }
                }
            }
        }
        Ok(started.elapsed())
    }
}

/// Whether `v` answers the probe carrying `token`: `Some(Ok)` yes, `Some(Err)` an error answer.
fn answer(kind: Kind, v: &Value, token: &str) -> Option<Result<(), String>> {
    match kind {
        Kind::Collab => match v["type"].as_str() {
            Some("language-updated") if v["payload"]["language"] == token => Some(Ok(())),
            Some("error") => Some(Err(format!("collab error: {}", v["payload"]))),
            _ => None,
        },
        Kind::Reqack => (v["type"] == "response" && v["id"] == token).then(|| {
            if v["payload"]["error"].is_null() {
                Ok(())
            } else {
                Err(format!("reqack error: {}", v["payload"]["error"]))
            }
        }),
        Kind::Fastchat => match v["type"].as_str() {
            Some("PONG") => Some(Ok(())),
            _ => None,
        },
        Kind::IpChat => match v["type"].as_str() {
            Some("message") if v["data"]["text"] == token => Some(Ok(())),
            Some("error") => Some(Err(format!("ip-chat error: {}", v["data"]))),
            _ => None,
        },
        Kind::Echo => None,
    }
}

/// A probe measuring in the background until stopped.
pub(crate) struct ProbeLoop {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<(Probe, Vec<Duration>, Vec<String>)>,
}

impl ProbeLoop {
    /// Starts measuring every `every`.
    pub(crate) fn start(mut probe: Probe, every: Duration) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut failures = Vec::new();
            loop {
                match probe.round_trip().await {
                    Ok(rtt) => samples.push(rtt),
                    Err(e) => failures.push(format!("under attack: {e}")),
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopped.changed() => break,
                }
            }
            (probe, samples, failures)
        });
        Self { stop, task }
    }

    /// Stops and returns the probe with its samples and failures.
    pub(crate) async fn stop(self) -> (Probe, Vec<Duration>, Vec<String>) {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(result) => result,
            Err(e) => (
                Probe::Healthz {
                    addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                    source: Ipv4Addr::LOCALHOST,
                },
                Vec::new(),
                vec![format!("the probe task failed: {e}")],
            ),
        }
    }
}
