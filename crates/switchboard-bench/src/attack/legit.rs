//! Row 0: the legitimate loads the per-client defaults must let through. Every per-address limit
//! of the hardening work is useless if it also refuses the conformance and benchmark loads, so
//! these run against the same default flags as the attacks.

use std::time::Duration;

use futures::future::join_all;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::probe::Probe;
use super::rows::BYSTANDER;
use super::{Ctx, SLACK_BYTES, SOCKET_BYTES, mib};
use crate::{Target, connect_from, source_address};

/// Sockets opened at once in phase one, and the addresses they come from.
const BURST: usize = 2_000;
const BURST_ADDRESSES: usize = 20;
/// Idle sockets held in phase two, and their addresses.
const IDLE: usize = 10_000;
const IDLE_ADDRESSES: usize = 50;
/// Sockets of phase two that read a broadcast (from all 50 addresses).
const SUBSCRIBERS: usize = 1_000;
/// Connects in flight at once in phase two.
const IN_FLIGHT: usize = 1_000;

pub(crate) async fn row0(ctx: &mut Ctx) -> Result<(), String> {
    ctx.describe(format!(
        "ip-chat, legitimate load on default flags: {BURST} connects at once from \
         {BURST_ADDRESSES} addresses; {IDLE} idle sockets from {IDLE_ADDRESSES} addresses; \
         {SUBSCRIBERS} of them (from all {IDLE_ADDRESSES} addresses) receive one broadcast"
    ));
    let target = Target::parse(&format!("ws://{}/ws", ctx.addr)).map_err(|e| e.to_string())?;
    let mut probe = Probe::Healthz {
        addr: ctx.addr,
        source: BYSTANDER,
    };
    ctx.baseline(&mut probe).await;
    let (probe, outcome) = ctx
        .under_attack(probe, Duration::from_millis(100), load(&target))
        .await;
    drop(probe);
    let outcome = outcome?;
    ctx.check(
        "2,000 connects at once from 20 addresses all succeed",
        outcome.burst_ok == BURST,
        format!(
            "{} of {BURST} accepted; refusals: {:?}",
            outcome.burst_ok, outcome.burst_errors
        ),
    );
    ctx.check(
        "10,000 idle sockets from 50 addresses all succeed",
        outcome.idle_ok == IDLE,
        format!(
            "{} of {IDLE} accepted; refusals: {:?}",
            outcome.idle_ok, outcome.idle_errors
        ),
    );
    ctx.check(
        "1,000 subscribers from 50 addresses each receive the broadcast",
        outcome.delivered == SUBSCRIBERS,
        format!("{} of {SUBSCRIBERS} received it", outcome.delivered),
    );
    let sockets = u64::try_from(IDLE + 1).unwrap_or(u64::MAX);
    let bound = sockets
        .saturating_mul(SOCKET_BYTES)
        .saturating_add(SLACK_BYTES);
    ctx.bound(
        bound,
        format!(
            "{} sockets × 29 KiB (idle socket, partial-message allowance, small frames) + 16 MiB \
             slack = {}",
            IDLE + 1,
            mib(bound)
        ),
    );
    Ok(())
}

#[derive(Debug, Default)]
struct Outcome {
    burst_ok: usize,
    burst_errors: Vec<String>,
    idle_ok: usize,
    idle_errors: Vec<String>,
    delivered: usize,
}

/// At most five distinct refusal messages are kept for the report.
fn note(errors: &mut Vec<String>, error: String) {
    if errors.len() < 5 && !errors.contains(&error) {
        errors.push(error);
    }
}

async fn load(target: &Target) -> Result<Outcome, String> {
    let mut outcome = Outcome::default();

    // Phase one: a connect burst, everything in flight at once.
    let burst = join_all(
        (0..BURST).map(|i| connect_from(target, source_address(60, i % BURST_ADDRESSES), i)),
    )
    .await;
    for result in burst {
        match result {
            Ok(_) => outcome.burst_ok += 1,
            Err(e) => note(&mut outcome.burst_errors, e.to_string()),
        }
    }

    // Phase two: many idle sockets, a bounded number connecting at a time.
    let mut idle = Vec::with_capacity(IDLE);
    for chunk in (0..IDLE).collect::<Vec<_>>().chunks(IN_FLIGHT) {
        let connected = join_all(
            chunk
                .iter()
                .map(|&i| connect_from(target, source_address(61, i % IDLE_ADDRESSES), i)),
        )
        .await;
        for result in connected {
            match result {
                Ok(ws) => idle.push(ws),
                Err(e) => note(&mut outcome.idle_errors, e.to_string()),
            }
        }
    }
    outcome.idle_ok = idle.len();

    // Phase three: one broadcast reaches the first 1,000 sockets (indexes cycle through all 50
    // addresses). The sender is the last idle socket: 10,000 is also the default connection
    // limit, so an extra socket would be refused with 503.
    let text = format!("legit-{}", std::process::id());
    let frame = serde_json::json!({"type": "send_message", "data": {"text": text}});
    let sender = idle.last_mut().ok_or("no idle socket to send from")?;
    sender
        .send(Message::text(frame.to_string()))
        .await
        .map_err(|e| format!("send: {e}"))?;
    let reads = idle.iter_mut().take(SUBSCRIBERS).map(|ws| {
        let text = text.as_str();
        async move {
            let wait = async {
                while let Some(Ok(message)) = ws.next().await {
                    if let Message::Text(body) = message
                        && body.as_str().contains(text)
                    {
                        return true;
                    }
                }
                false
            };
            tokio::time::timeout(Duration::from_secs(10), wait)
                .await
                .unwrap_or(false)
        }
    });
    outcome.delivered = join_all(reads).await.into_iter().filter(|ok| *ok).count();
    Ok(outcome)
}
