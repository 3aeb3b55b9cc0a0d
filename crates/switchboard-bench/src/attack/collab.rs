//! The collab rows (1, 2, 4, 6, 7).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use super::probe::{Kind, Probe};
use super::raw::{self, PING, RawWs, TEXT};
use super::rows::{BYSTANDER, LEGIT, LEGIT_2, attacker, err};
use super::{Ctx, MIB, PENDING_BYTES, SLACK_BYTES, SOCKET_BYTES, mib};
use crate::source_address;

/// collab defaults (docs/protocols/collab.md, Limits).
const DOCUMENT_BYTES: u64 = 1024 * 1024;
const FRAME_BYTES: u64 = 6 * DOCUMENT_BYTES + 64 * 1024;
/// `Config::worst_case_session_bytes` with the defaults: this node's copy 2048 + P × 4096 + D +
/// 4096 + L, the record's snapshot 6 × D and the engine's log 12 × D + 64 KiB + 64 × 128.
const SESSION_BYTES: u64 = 22_304_768;
/// The state of the sessions one client created, together (`--collab-max-state-bytes-per-client`).
const SHARE_BYTES: u64 = 32 * MIB;
/// The runtime's outbound byte bound per socket (`--outbound-queue-bytes`), besides one frame `F`.
const QUEUE_BYTES: u64 = 4 * MIB;
/// The largest collab outbound frame: 12 × document limit + 64 KiB.
const OUT_FRAME_BYTES: u64 = 12 * DOCUMENT_BYTES + 64 * 1024;
const WAIT: Duration = Duration::from_secs(10);

/// Joins `session` as `user` from `source`; waits for its `session-state`.
pub(crate) async fn join(
    ctx: &Ctx,
    session: &str,
    user: &str,
    source: Ipv4Addr,
) -> Result<(RawWs, Value), String> {
    join_at(ctx.addr, session, user, source).await
}

/// The collab bystander: alone in its own session.
pub(crate) async fn bystander(ctx: &Ctx) -> Result<Probe, String> {
    let (ws, _) = join(ctx, &format!("calm-{}", ctx.run), "u-calm", BYSTANDER).await?;
    Ok(Probe::ws(ws, Kind::Collab))
}

async fn create(ctx: &Ctx, source: Ipv4Addr, code: Option<&str>) -> Result<String, String> {
    let body = code.map_or(String::new(), |code| json!({ "code": code }).to_string());
    let reply = raw::http(ctx.addr, source, "POST", "/api/sessions", &body)
        .await
        .map_err(err("POST /api/sessions"))?;
    if reply.status != 201 {
        return Err(format!(
            "POST /api/sessions: {} {}",
            reply.status, reply.body
        ));
    }
    let value: Value = serde_json::from_str(&reply.body).map_err(err("POST body"))?;
    value["sessionId"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no sessionId in {}", reply.body))
}

fn frame_type(payload: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_owned))
}

/// Row 1: a participant stops reading; another sends `execute-code {}` 400 times in a session
/// whose document is the largest the server accepts.
pub(crate) async fn row1(ctx: &mut Ctx) -> Result<(), String> {
    ctx.describe(
        "collab session with a 1 MiB document (the default maximum); one participant stops \
         reading, another sends `execute-code {}` 400 times; a third reads everything",
    );
    let mut probe = bystander(ctx).await?;
    ctx.baseline(&mut probe).await;
    let document = "a".repeat(DOCUMENT_BYTES as usize);
    let id = create(ctx, LEGIT, Some(&document)).await?;
    drop(document);
    let me = attacker(1);
    // The stalled participant joins and never reads again.
    let mut stalled = RawWs::connect(ctx.addr, me, &format!("/ws/{id}"))
        .await
        .map_err(err("stalled upgrade"))?;
    stalled
        .send_text(r#"{"type":"join-session","payload":{"userId":"u-stalled"}}"#)
        .await
        .map_err(err("stalled join"))?;
    let (reader, _) = join(ctx, &id, "u-reader", LEGIT_2).await?;
    let (mut sender, _) = join(ctx, &id, "u-attacker", me).await?;
    // The reader counts what reaches it until told to stop.
    let (stop_tx, stop_rx) = watch::channel(false);
    let reader_task = tokio::spawn(read_counting(reader, stop_rx));

    let started = Instant::now();
    let (probe, sent) = ctx
        .under_attack(probe, Duration::from_millis(50), async {
            for _ in 0..400 {
                if sender
                    .send_text(r#"{"type":"execute-code","payload":{}}"#)
                    .await
                    .is_err()
                {
                    return Err("the attacker's socket failed".to_owned());
                }
            }
            // Its refusals: read until quiet.
            let mut refused = 0u64;
            while let Ok(Some(frame)) = sender.next_frame(Duration::from_millis(500)).await {
                if frame_type(&frame.payload).as_deref() == Some("error") {
                    refused += 1;
                }
            }
            Ok(refused)
        })
        .await;
    let refused = sent?;
    let elapsed = started.elapsed();
    let _ = stop_tx.send(true);
    let counts = reader_task.await.map_err(err("reader task"))?;
    drop(probe);
    drop(stalled);

    let relays = counts.execute_code;
    let allowed = 100 + 50 * (elapsed.as_secs() + 1);
    ctx.check(
        "relays are not amplified",
        counts.largest_relay < 1024,
        format!(
            "largest execute-code relay {} bytes (the document is {} bytes)",
            counts.largest_relay, DOCUMENT_BYTES
        ),
    );
    ctx.check(
        "relays are rate-limited per connection (burst 100, then 50/s)",
        relays <= allowed && relays + refused == 400,
        format!(
            "{relays} relayed, {refused} refused in {:.1} s (allowed {allowed})",
            elapsed.as_secs_f64()
        ),
    );
    ctx.check(
        "the reading participant keeps up and stays connected",
        counts.closed.is_none() && counts.execute_code == relays,
        format!("closed: {:?}", counts.closed),
    );
    let bound =
        2 * SESSION_BYTES + QUEUE_BYTES + 2 * OUT_FRAME_BYTES + 4 * SOCKET_BYTES + SLACK_BYTES;
    ctx.bound(
        bound,
        format!(
            "2 sessions × 21.3 MiB (collab per-session worst case) + the stalled socket's queue \
             (Q 4 MiB + F 12.06 MiB) and a frame being written (F) + 4 sockets × 29 KiB + 16 MiB \
             slack = {}",
            mib(bound)
        ),
    );
    Ok(())
}

#[derive(Debug, Default)]
struct Counts {
    execute_code: u64,
    largest_relay: usize,
    closed: Option<(u16, String)>,
}

async fn read_counting(mut ws: RawWs, mut stop: watch::Receiver<bool>) -> Counts {
    let mut counts = Counts::default();
    loop {
        tokio::select! {
            frame = ws.next_frame(Duration::from_secs(60)) => match frame {
                Ok(Some(frame)) => {
                    if let Some(close) = frame.close_code() {
                        counts.closed = Some(close);
                        break;
                    }
                    if frame_type(&frame.payload).as_deref() == Some("execute-code") {
                        counts.execute_code += 1;
                        counts.largest_relay = counts.largest_relay.max(frame.payload.len());
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    counts.closed = Some((1006, e.to_string()));
                    break;
                }
            },
            _ = stop.changed() => break,
        }
    }
    counts
}

/// Row 2: one operation with ~2.5 million components, and abandoned sessions filled to every
/// limit.
pub(crate) async fn row2(ctx: &mut Ctx) -> Result<(), String> {
    ctx.describe(
        "collab: a code-change whose op has 2.5 million components (a 6 MiB frame, sent 3 times), \
         then one address creates sessions as fast as it can (each: 1 MiB document, log filled \
         by three 1 MiB edits) and abandons them; then a client on another address creates one",
    );
    let mut probe = bystander(ctx).await?;
    ctx.baseline(&mut probe).await;
    let me = attacker(2);
    let run = ctx.run.clone();
    let addr = ctx.addr;
    let (probe, outcome) = ctx
        .under_attack(probe, Duration::from_millis(50), async move {
            // The huge operation: "1,-1," repeated, within the 6 MiB + 64 KiB frame limit.
            let (mut ws, _) = join_at(addr, &format!("ops-{run}"), "u-ops", me).await?;
            let mut frame = String::with_capacity(FRAME_BYTES as usize);
            frame.push_str(r#"{"type":"code-change","payload":{"changes":{"baseVersion":0,"ops":["#);
            let mut components = 0u64;
            while (frame.len() as u64) < FRAME_BYTES - 64 * 1024 {
                frame.push_str("1,-1,");
                components += 2;
            }
            frame.push_str("1]}}}");
            components += 1;
            let mut refusals = Vec::new();
            for _ in 0..3 {
                ws.send_text(&frame).await.map_err(err("huge op"))?;
                let error = ws
                    .until_json(WAIT, |v| v["type"] == "error")
                    .await
                    .map_err(err("huge op refusal"))?;
                let state = ws
                    .until_json(WAIT, |v| v["type"] == "session-state")
                    .await
                    .map_err(err("resync"))?;
                refusals.push((
                    error["payload"]["message"].as_str().unwrap_or_default().to_owned(),
                    state["payload"]["version"].clone(),
                ));
            }
            drop(frame);
            drop(ws);
            // Abandoned sessions from one address, as fast as it is allowed.
            let mut created = 0u64;
            let mut edits = 0u64;
            let mut edit_refusals = std::collections::BTreeMap::<String, u64>::new();
            let mut refused = Vec::new();
            let fill = ["a", "b", "a"].map(|c| {
                json!({"type": "code-change", "payload": {"changes": c.repeat(DOCUMENT_BYTES as usize)}})
                    .to_string()
            });
            let started = Instant::now();
            for k in 0..40 {
                let session = format!("abandoned-{run}-{k}");
                match join_at(addr, &session, "u-author", me).await {
                    Ok((mut ws, _)) => {
                        created += 1;
                        for edit in &fill {
                            ws.send_text(edit).await.map_err(err("fill"))?;
                            let reply = ws
                                .until_json(WAIT, |v| v["type"] == "code-ack" || v["type"] == "error")
                                .await
                                .map_err(err("fill ack"))?;
                            if reply["type"] == "error" {
                                let message = reply["payload"]["message"].as_str().unwrap_or_default();
                                *edit_refusals.entry(message.chars().take(120).collect()).or_default() += 1;
                                break;
                            }
                            edits += 1;
                        }
                    }
                    Err(e) => refused.push(e),
                }
            }
            Ok::<_, String>((components, refusals, created, refused, started.elapsed(), edits, edit_refusals))
        })
        .await;
    drop(probe);
    let (components, refusals, created, refused, elapsed, edits, edit_refusals) = outcome?;
    let all_refused = refusals
        .iter()
        .all(|(m, v)| m.contains("at most 10000 components") && *v == json!(0));
    ctx.check(
        "the op is refused while parsing and changes nothing",
        all_refused,
        format!("{components} components: {refusals:?}"),
    );
    let allowed = 20 + elapsed.as_secs() + 1;
    let refused_429 = refused.iter().filter(|e| e.contains("429")).count();
    ctx.check(
        "session creation is limited per client (burst 20, then 1/s; share 100)",
        created <= allowed && refused_429 as u64 + created == 40,
        format!(
            "{created} created, {refused_429} refused with 429 in {:.1} s; other: {:?}",
            elapsed.as_secs_f64(),
            refused
                .iter()
                .filter(|e| !e.contains("429"))
                .collect::<Vec<_>>()
        ),
    );
    let legit = create(ctx, LEGIT, None).await;
    ctx.check(
        "a client on another address still creates a session",
        legit.is_ok(),
        format!("{legit:?}"),
    );
    ctx.check(
        "the creator's memory share (32 MiB) refuses growing edits; the sessions stay",
        !edit_refusals.is_empty() && edit_refusals.keys().all(|m| m.contains("share of memory")),
        format!("{edits} 1 MiB edits applied, refused: {edit_refusals:?}"),
    );
    // Everything the attacker's sessions hold is charged to its share; the bystander's session
    // is someone else's.
    // Each socket may hold the frames it is sending and keeps the capacity of the largest
    // message it received (the runtime's `2(Q + F) + M` per socket, docs/ARCHITECTURE.md): here
    // session-states and edits of the 1 MiB document.
    let bound = SHARE_BYTES
        + SESSION_BYTES
        + 2 * FRAME_BYTES
        + 4 * (SOCKET_BYTES + 3 * DOCUMENT_BYTES)
        + SLACK_BYTES;
    ctx.bound(
        bound,
        format!(
            "the creator's share 32 MiB (all its {created} abandoned sessions and the op session) + \
             the bystander's session 21.3 MiB + 2 × the 6.06 MiB frame (the frame and its parse) + \
             4 sockets × (29 KiB + 3 × 1 MiB of frames in flight and the input buffer) + 16 MiB \
             slack = {}",
            mib(bound)
        ),
    );
    Ok(())
}

/// [`join`] for tasks that do not hold the row's context.
async fn join_at(
    addr: std::net::SocketAddr,
    session: &str,
    user: &str,
    source: Ipv4Addr,
) -> Result<(RawWs, Value), String> {
    let mut ws = RawWs::connect(addr, source, &format!("/ws/{session}"))
        .await
        .map_err(err("collab upgrade"))?;
    ws.send_text(&json!({"type": "join-session", "payload": {"userId": user}}).to_string())
        .await
        .map_err(err("join"))?;
    let state = ws
        .until_json(WAIT, |v| v["type"] == "session-state")
        .await
        .map_err(err("session-state"))?;
    Ok((ws, state))
}

/// Row 4: 150 sockets each start a 6 MB fragmented message and never finish it, pinging
/// between fragments.
pub(crate) async fn row4(ctx: &mut Ctx) -> Result<(), String> {
    const SOCKETS: usize = 150;
    const FRAGMENT: usize = 6_000_000;
    ctx.describe(
        "collab (6 MiB frame limit): 150 sockets from 150 addresses each send the first 6 MB \
         fragment of a text message and never finish it, sending a ping every 250 ms",
    );
    let mut probe = bystander(ctx).await?;
    ctx.baseline(&mut probe).await;
    let session = format!("frag-{}", ctx.run);
    // The session exists before the crowd arrives, so only the first upgrade creates it.
    let (first, _) = join(ctx, &session, "u-first", LEGIT).await?;
    let payload = Arc::new(vec![b'a'; FRAGMENT]);
    let addr = ctx.addr;
    let started = Instant::now();
    let (probe, endings) = ctx
        .under_attack(probe, Duration::from_millis(100), async {
            let tasks: Vec<_> = (0..SOCKETS)
                .map(|i| {
                    let payload = payload.clone();
                    let path = format!("/ws/{session}");
                    tokio::spawn(async move {
                        let mut ws = match RawWs::connect(addr, source_address(104, i), &path).await
                        {
                            Ok(ws) => ws,
                            Err(e) => return Ending::Refused(e.to_string()),
                        };
                        if ws.send_frame(TEXT, false, &payload).await.is_err() {
                            return match ws.close_code(Duration::from_secs(2)).await {
                                Some((code, _)) => Ending::Closed(code, started.elapsed()),
                                None => Ending::Refused("write failed".into()),
                            };
                        }
                        // Pings between fragments; the message never ends.
                        let deadline = Instant::now() + Duration::from_secs(12);
                        while Instant::now() < deadline {
                            if let Some((code, _)) = ws.close_code(Duration::from_millis(250)).await
                            {
                                return Ending::Closed(code, started.elapsed());
                            }
                            let _ = ws.send_frame(PING, true, b"keep").await;
                        }
                        Ending::Open
                    })
                })
                .collect();
            let mut endings = Vec::new();
            for task in tasks {
                endings.push(task.await.unwrap_or(Ending::Refused("task failed".into())));
            }
            endings
        })
        .await;
    drop(probe);
    drop(first);
    let count = |f: &dyn Fn(&Ending) -> bool| endings.iter().filter(|e| f(e)).count();
    let busy = count(&|e| matches!(e, Ending::Closed(1013, _)));
    let timed_out = count(&|e| matches!(e, Ending::Closed(1008, _)));
    // A close frame can be lost when the server resets a connection we are still writing to.
    let reset = count(&|e| matches!(e, Ending::Closed(1006, _)));
    let open = count(&|e| matches!(e, Ending::Open));
    let other: Vec<String> = endings
        .iter()
        .filter_map(|e| match e {
            Ending::Refused(why) => Some(why.clone()),
            Ending::Closed(1013 | 1008 | 1006, _) | Ending::Open => None,
            Ending::Closed(code, _) => Some(format!("closed {code}")),
        })
        .collect();
    let latest = endings
        .iter()
        .filter_map(|e| match e {
            Ending::Closed(_, at) => Some(*at),
            _ => None,
        })
        .max()
        .unwrap_or_default();
    ctx.check(
        "every unfinished message is ended: over the reassembly budget (1013) or by the message timeout (1008, pings do not extend it)",
        open == 0 && other.is_empty() && busy + timed_out + reset == SOCKETS,
        format!(
            "{busy} closed 1013, {timed_out} closed 1008, {reset} reset while writing, {open} still open, other {other:?}; last close after {:.1} s",
            latest.as_secs_f64()
        ),
    );
    ctx.check(
        "messages held at once fit the reassembly budget (128 MiB, charged at 2x the bytes received)",
        2 * timed_out as u64 * FRAGMENT as u64 <= 128 * MIB,
        format!("{timed_out} messages of {FRAGMENT} bytes held until the timeout"),
    );
    let bound = 128 * MIB + (SOCKETS as u64 + 2) * SOCKET_BYTES + 2 * SESSION_BYTES + SLACK_BYTES;
    ctx.bound(
        bound,
        format!(
            "reassembly budget 128 MiB + 152 sockets × 29 KiB + 2 sessions × 21.3 MiB + 16 MiB slack = {}",
            mib(bound)
        ),
    );
    Ok(())
}

#[derive(Debug)]
enum Ending {
    Refused(String),
    Closed(u16, Duration),
    Open,
}

/// Row 6: 10,000 empty `POST /api/sessions` from one address.
pub(crate) async fn row6(ctx: &mut Ctx) -> Result<(), String> {
    const POSTS: usize = 10_000;
    ctx.describe(
        "collab: 10,000 empty `POST /api/sessions` from one address (64 in flight), then a client \
         on another address creates and joins a session",
    );
    let mut probe = bystander(ctx).await?;
    ctx.baseline(&mut probe).await;
    let me = attacker(6);
    let addr = ctx.addr;
    let started = Instant::now();
    let (probe, statuses) = ctx
        .under_attack(probe, Duration::from_millis(50), async {
            let statuses = Arc::new([(); 6].map(|()| AtomicU64::new(0)));
            futures::stream::iter(0..POSTS)
                .for_each_concurrent(64, |_| {
                    let statuses = statuses.clone();
                    async move {
                        let slot = match raw::http(addr, me, "POST", "/api/sessions", "").await {
                            Ok(r) if r.status == 201 => 0,
                            Ok(r) if r.status == 429 => 1,
                            Ok(r) if r.status == 503 => 2,
                            Ok(_) => 3,
                            Err(_) => 4,
                        };
                        statuses[slot].fetch_add(1, Ordering::Relaxed);
                    }
                })
                .await;
            std::array::from_fn::<u64, 6, _>(|i| statuses[i].load(Ordering::Relaxed))
        })
        .await;
    drop(probe);
    let elapsed = started.elapsed();
    let [created, too_many, full, other, failed, _] = statuses;
    ctx.check(
        "one address creates at most its share (burst 20, then 1/s)",
        created <= 20 + elapsed.as_secs() + 1,
        format!(
            "{created} created, {too_many} × 429, {full} × 503, {other} other, {failed} failed, in {:.1} s",
            elapsed.as_secs_f64()
        ),
    );
    let legit = match create(ctx, LEGIT_2, None).await {
        Ok(id) => join(ctx, &id, "u-legit", LEGIT_2).await.map(|_| id),
        Err(e) => Err(e),
    };
    ctx.check(
        "a client on another address creates and joins a session",
        legit.is_ok(),
        format!("{legit:?}"),
    );
    ctx.check(
        "the server never ran out of sessions (no 503)",
        full == 0,
        format!("{full} × 503"),
    );
    // An empty session is charged 2048 bytes (an over-estimate of its node and engine
    // bookkeeping, docs/protocols/collab.md) and may keep 4 KiB of text slack; the bystander's
    // and the legitimate client's sessions are counted at the full per-session worst case.
    let bound = created * (2048 + 4096) + 2 * SESSION_BYTES + 256 * PENDING_BYTES + SLACK_BYTES;
    ctx.bound(
        bound,
        format!(
            "{created} empty sessions × 6 KiB (2,048 B charged + 4 KiB text slack) + 2 sessions × \
             21.3 MiB + 256 pending connections × 18 KiB (the per-address share) + 16 MiB slack = {}",
            mib(bound)
        ),
    );
    Ok(())
}

/// Row 7: an operation whose counts overflow.
pub(crate) async fn row7(ctx: &mut Ctx) -> Result<(), String> {
    ctx.describe(
        "collab: ops [-2^63, 2^63+11] (and three other overflowing forms) on an 11-character \
         document",
    );
    let mut probe = bystander(ctx).await?;
    ctx.baseline(&mut probe).await;
    let id = create(ctx, LEGIT, Some("hello world")).await?;
    let (mut alice, _) = join(ctx, &id, "u-alice", attacker(7)).await?;
    let variants = [
        format!("[{}, {}]", i64::MIN, (1u64 << 63) + 11),
        format!("[{}, {}]", u64::MAX, u64::MAX),
        format!("[{}, {}, \"x\"]", i64::MIN, i64::MIN),
        format!("[5, {}, 6]", i64::MIN + 1),
    ];
    let (probe, results) = ctx
        .under_attack(probe, Duration::from_millis(50), async {
            let mut results = Vec::new();
            for ops in &variants {
                let frame = format!(
                    r#"{{"type":"code-change","payload":{{"changes":{{"baseVersion":0,"ops":{ops}}}}}}}"#
                );
                if alice.send_text(&frame).await.is_err() {
                    results.push(Err(format!("{ops}: socket failed")));
                    continue;
                }
                let error = alice.until_json(WAIT, |v| v["type"] == "error").await;
                let state = alice.until_json(WAIT, |v| v["type"] == "session-state").await;
                results.push(match (error, state) {
                    (Ok(error), Ok(state)) => {
                        let message = error["payload"]["message"].as_str().unwrap_or_default();
                        let unchanged = state["payload"]["code"] == "hello world"
                            && state["payload"]["version"] == 0;
                        if message.starts_with("code-change refused") && unchanged {
                            Ok(())
                        } else {
                            Err(format!("{ops}: {message}; {}", state["payload"]))
                        }
                    }
                    (e, s) => Err(format!("{ops}: {e:?} {s:?}")),
                });
            }
            results
        })
        .await;
    drop(probe);
    let failures: Vec<_> = results.iter().filter_map(|r| r.clone().err()).collect();
    ctx.check(
        "each overflowing op is refused with the protocol's error and a resync of the unchanged document",
        failures.is_empty() && results.len() == variants.len(),
        format!("{} refused as expected; {failures:?}", results.len() - failures.len()),
    );
    let described = raw::http(ctx.addr, LEGIT, "GET", &format!("/api/sessions/{id}"), "")
        .await
        .map_err(err("GET session"))?;
    let value: Value = serde_json::from_str(&described.body).unwrap_or_default();
    ctx.check(
        "the stored document is unchanged",
        value["code"] == "hello world" && value["version"] == 0,
        format!("code {} version {}", value["code"], value["version"]),
    );
    let bound = 2 * SESSION_BYTES + 3 * SOCKET_BYTES + SLACK_BYTES;
    ctx.bound(
        bound,
        format!(
            "2 sessions × 21.3 MiB + 3 sockets × 29 KiB + 16 MiB slack = {}",
            mib(bound)
        ),
    );
    Ok(())
}
