//! The per-socket task: reads frames into the protocol, writes the peer's queue to the socket,
//! keeps the peer alive, and closes it for exactly one reason.

use std::future::{Future, pending};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use switchboard_core::{
    CloseReason, Context, Engine, Keepalive, LinkEvent, Outgoing, Peer, PeerLink, Protocol,
};
use tokio::io::AsyncReadExt;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tracing::{debug, trace};

use crate::Counters;
use crate::metered::{Metered, Watch};

pub(crate) type Socket = WebSocketStream<Metered<TokioIo<Upgraded>>>;

/// Queue items written per flush; bounds the time one connection spends writing before it looks
/// at its socket again.
const MAX_BATCH: usize = 64;

/// Everything the loop needs besides the protocol and the socket.
pub(crate) struct ConnectionContext {
    pub(crate) counters: Arc<Counters>,
    pub(crate) keepalive: Keepalive,
    pub(crate) close_timeout: Duration,
    pub(crate) write_timeout: Duration,
    pub(crate) message_timeout: Duration,
    pub(crate) watch: Arc<Watch>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) engine: Engine,
}

/// How the read/write loop ended.
enum End {
    /// We close: protocol request, slow consumer, idle, shutdown, oversized frame.
    Close(CloseReason),
    /// The peer sent a close frame.
    PeerClosed(Option<CloseFrame>),
    /// The socket failed or ended without a close handshake.
    Gone(String),
}

/// Outcome of a write that can be interrupted by a close request.
enum WriteOutcome {
    Written,
    Interrupted(CloseReason),
    Failed(WsError),
}

pub(crate) async fn run<P: Protocol>(
    protocol: Arc<P>,
    mut conn: P::Conn,
    mut socket: Socket,
    peer: Peer,
    mut link: PeerLink,
    ctx: ConnectionContext,
) {
    let tick_every = protocol.tick_interval();
    // Futures that are live only for a moment are boxed, here and in `drive`: a task is as large
    // as its largest state, so an idle socket would otherwise pay for the biggest protocol
    // future all the time (measured: the task was 9.6 KB before, 480 bytes after).
    let cx = Context::new(&peer, &ctx.engine);
    // Not `hook()`: a close requested while opening is seen by `drive` at once, and nothing is
    // queued yet that would need writing while the open hook waits.
    Box::pin(protocol.on_open(&mut conn, &cx)).await;

    let end = drive(
        &*protocol,
        &mut conn,
        &mut socket,
        &peer,
        &mut link,
        &ctx,
        tick_every,
    )
    .await;

    let reason = match &end {
        End::Close(reason) => reason.clone(),
        End::PeerClosed(frame) => frame.as_ref().map_or_else(
            || CloseReason::new(1005, "peer closed"),
            |f| CloseReason::new(u16::from(f.code), f.reason.to_string()),
        ),
        End::Gone(why) => CloseReason::new(1006, why.clone()),
    };
    // Mark the peer closed first so broadcasts stop queueing to it while it shuts down.
    peer.close(reason.clone());
    debug!(conn = %peer.id(), remote = %peer.remote(), code = reason.code, reason = %reason.reason, "connection closing");
    Box::pin(protocol.on_close(conn, &cx)).await;

    if let End::Close(reason) = &end {
        let counter = match reason.code {
            _ if *reason == CloseReason::slow_consumer() => Some(&ctx.counters.slow_consumers),
            _ if *reason == CloseReason::idle_timeout() => Some(&ctx.counters.idle_timeouts),
            _ if *reason == CloseReason::write_timeout() => Some(&ctx.counters.write_timeouts),
            _ if *reason == CloseReason::message_timeout() => Some(&ctx.counters.message_timeouts),
            CloseReason::TRY_AGAIN_LATER => Some(&ctx.counters.reassembly_refusals),
            CloseReason::INVALID_PAYLOAD => Some(&ctx.counters.invalid_utf8),
            CloseReason::TOO_BIG => Some(&ctx.counters.oversized),
            _ => None,
        };
        if let Some(counter) = counter {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
    match end {
        End::Close(reason) => {
            Box::pin(close_from_our_side(&mut socket, &mut link, &reason, &ctx)).await
        }
        End::PeerClosed(_) => {
            // tungstenite queued the close reply; polling flushes it and ends the stream.
            let _ = timeout(ctx.close_timeout, async {
                while socket.next().await.is_some() {}
            })
            .await;
        }
        End::Gone(_) => {}
    }
}

async fn drive<P: Protocol>(
    protocol: &P,
    conn: &mut P::Conn,
    socket: &mut Socket,
    peer: &Peer,
    link: &mut PeerLink,
    ctx: &ConnectionContext,
    tick_every: Option<Duration>,
) -> End {
    let keepalive = ctx.keepalive;
    let cx = Context::new(peer, &ctx.engine);
    let mut last_heard = Instant::now();
    // One timer for every inbound deadline: the idle timeout, and the message timeout of a
    // message being received. The wrapper under tungstenite notices a message start while the
    // read future is pending, in this same task poll, so the deadline arm (polled after the
    // read arm) sees it without a wake-up of its own.
    let deadline = sleep_until(last_heard + keepalive.idle_timeout);
    tokio::pin!(deadline);
    // Created once: re-creating a cancellation future every iteration would register and
    // deregister a waiter on each wake-up, the hottest path of a broadcast.
    let shutdown = ctx.shutdown.cancelled();
    tokio::pin!(shutdown);
    let mut pinger = keepalive.ping_interval.map(|every| {
        let mut timer = interval_at(Instant::now() + every, every);
        timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        timer
    });
    let mut ticker = tick_every.map(|every| {
        let mut timer = interval_at(Instant::now() + every, every);
        timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        timer
    });

    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => return End::Close(CloseReason::shutdown()),
            // Local work before remote work: drain what we owe the peer before reading more.
            event = link.next_event() => match event {
                LinkEvent::Close(reason) => return End::Close(reason),
                LinkEvent::Send(item) => {
                    match Box::pin(write_batch(socket, link, peer, item, shutdown.as_mut(), ctx)).await {
                        WriteOutcome::Written => {}
                        WriteOutcome::Interrupted(reason) => return End::Close(reason),
                        WriteOutcome::Failed(error) => return End::Gone(error.to_string()),
                    }
                }
            },
            incoming = socket.next() => {
                last_heard = Instant::now();
                match incoming {
                    Some(Ok(Message::Text(text))) => {
                        let work = protocol.on_text(conn, &cx, text.as_str());
                        if let Some(end) = Box::pin(hook(work, socket, link, peer, shutdown.as_mut(), ctx)).await {
                            return end;
                        }
                    }
                    Some(Ok(Message::Binary(data))) => {
                        let work = protocol.on_binary(conn, &cx, &data);
                        if let Some(end) = Box::pin(hook(work, socket, link, peer, shutdown.as_mut(), ctx)).await {
                            return end;
                        }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Close(frame))) => return End::PeerClosed(frame),
                    Some(Err(WsError::Capacity(
                        CapacityError::MessageTooLong { .. } | CapacityError::TooManyHeaders,
                    ))) => return End::Close(CloseReason::too_big()),
                    Some(Err(WsError::Utf8(_))) => return End::Close(CloseReason::invalid_utf8()),
                    Some(Err(WsError::Protocol(error))) => {
                        return End::Close(CloseReason::new(
                            CloseReason::PROTOCOL_ERROR,
                            error.to_string(),
                        ));
                    }
                    Some(Err(error)) => return End::Gone(error.to_string()),
                    None => return End::Gone("connection ended".into()),
                }
            }
            expired = inbound_deadline(deadline.as_mut(), &ctx.watch, last_heard, keepalive.idle_timeout, ctx.message_timeout) => {
                return End::Close(expired);
            }
            _ = tick_opt(&mut pinger) => {
                trace!(conn = %peer.id(), "ping");
                let ping = socket.send(Message::Ping(Default::default()));
                match Box::pin(guarded(ping, peer, shutdown.as_mut(), ctx)).await {
                    WriteOutcome::Written => {}
                    WriteOutcome::Interrupted(reason) => return End::Close(reason),
                    WriteOutcome::Failed(error) => return End::Gone(error.to_string()),
                }
            }
            _ = tick_opt(&mut ticker) => {
                let work = protocol.on_tick(conn, &cx);
                if let Some(end) = Box::pin(hook(work, socket, link, peer, shutdown.as_mut(), ctx)).await {
                    return end;
                }
            }
        }
    }
}

/// Runs one protocol hook to completion while the socket's writer keeps draining the peer's
/// queue: a hook waiting on the state engine (a remote store, a disk) never holds up frames
/// already queued for this socket, so the wait cannot make it look like a slow consumer.
/// Inbound reading pauses meanwhile (backpressure on this one client). Returns how the
/// connection ends if it ends during the hook; the hook itself is then dropped, which is safe
/// because engine operations are atomic (done or not done).
async fn hook(
    work: impl Future<Output = ()>,
    socket: &mut Socket,
    link: &mut PeerLink,
    peer: &Peer,
    mut shutdown: Pin<&mut WaitForCancellationFuture<'_>>,
    ctx: &ConnectionContext,
) -> Option<End> {
    tokio::pin!(work);
    // Once the connection is ending, the hook gets a short grace to finish (so `on_close` sees
    // the state it left); a hook stuck on an unreachable engine is dropped after it.
    let grace = ctx.close_timeout;
    loop {
        tokio::select! {
            biased;
            () = &mut work => return None,
            () = shutdown.as_mut() => {
                let _ = timeout(grace, work.as_mut()).await;
                return Some(End::Close(CloseReason::shutdown()));
            }
            event = link.next_event() => match event {
                LinkEvent::Close(reason) => {
                    let _ = timeout(grace, work.as_mut()).await;
                    return Some(End::Close(reason));
                }
                LinkEvent::Send(item) => {
                    match Box::pin(write_batch(socket, link, peer, item, shutdown.as_mut(), ctx)).await {
                        WriteOutcome::Written => {}
                        WriteOutcome::Interrupted(reason) => {
                            let _ = timeout(grace, work.as_mut()).await;
                            return Some(End::Close(reason));
                        }
                        WriteOutcome::Failed(error) => {
                            let _ = timeout(grace, work.as_mut()).await;
                            return Some(End::Gone(error.to_string()));
                        }
                    }
                }
            },
        }
    }
}

/// Resolves with the close reason when an inbound deadline passes: the reassembly budget refused
/// this socket, a message is unfinished after `message_timeout`, or nothing was heard for
/// `idle_timeout`. Re-evaluated on every poll of the connection's task.
fn inbound_deadline<'a>(
    mut timer: Pin<&'a mut tokio::time::Sleep>,
    watch: &'a Watch,
    last_heard: Instant,
    idle_timeout: Duration,
    message_timeout: Duration,
) -> impl Future<Output = CloseReason> + 'a {
    // Polled on every pass of the connection loop, so it reads no clock: the timer is moved to
    // the earliest deadline when that changes, and its firing says the deadline passed.
    std::future::poll_fn(move |cx| {
        if watch.over_budget() {
            return std::task::Poll::Ready(CloseReason::try_again_later());
        }
        let idle_at = last_heard + idle_timeout;
        let message_at = watch
            .message_started()
            .map(|started| started + message_timeout);
        let (at, reason) = match message_at {
            Some(message_at) if message_at < idle_at => {
                (message_at, CloseReason::message_timeout())
            }
            _ => (idle_at, CloseReason::idle_timeout()),
        };
        if timer.deadline() != at {
            timer.as_mut().reset(at);
        }
        timer.as_mut().poll(cx).map(|()| reason)
    })
}

async fn tick_opt(timer: &mut Option<tokio::time::Interval>) -> Instant {
    match timer {
        Some(timer) => timer.tick().await,
        None => pending().await,
    }
}

/// Writes `first` and up to `MAX_BATCH - 1` more ready items, then flushes once.
async fn write_batch(
    socket: &mut Socket,
    link: &mut PeerLink,
    peer: &Peer,
    first: Outgoing,
    shutdown: Pin<&mut WaitForCancellationFuture<'_>>,
    ctx: &ConnectionContext,
) -> WriteOutcome {
    let mut batch = Vec::new();
    link.take_into(&mut batch, MAX_BATCH - 1);
    let write = async {
        for item in std::iter::once(first).chain(batch) {
            match item {
                Outgoing::Frame(frame) => {
                    socket.feed(Message::Text(frame.into_utf8_bytes())).await?;
                }
                Outgoing::Batch(frames) => {
                    for frame in frames {
                        socket.feed(Message::Text(frame.into_utf8_bytes())).await?;
                    }
                }
                Outgoing::Binary(data) => socket.feed(Message::Binary(data)).await?,
            }
        }
        socket.flush().await
    };
    guarded(write, peer, shutdown, ctx).await
}

/// Runs a socket write unless a close request, shutdown or the write timeout interrupts it (a
/// peer that stopped reading would otherwise hold the write, and its memory, forever). The
/// write is polled first, so a write that completes at once never registers a waiter or timer.
async fn guarded(
    write: impl Future<Output = Result<(), WsError>>,
    peer: &Peer,
    shutdown: Pin<&mut WaitForCancellationFuture<'_>>,
    ctx: &ConnectionContext,
) -> WriteOutcome {
    let outcome = tokio::select! {
        biased;
        result = write => match result {
            Ok(()) => WriteOutcome::Written,
            Err(error) => WriteOutcome::Failed(error),
        },
        reason = peer.closing() => WriteOutcome::Interrupted(reason),
        () = shutdown => WriteOutcome::Interrupted(CloseReason::shutdown()),
        () = stalled(&ctx.watch, ctx.write_timeout) => WriteOutcome::Interrupted(CloseReason::write_timeout()),
    };
    ctx.watch.end_write();
    outcome
}

/// Resolves once the write under way has made no progress for `limit`. First polled only when
/// the write did not complete at once, so the fast path reads no clock.
async fn stalled(watch: &Watch, limit: Duration) {
    watch.start_write();
    loop {
        let at = watch.write_progress() + limit;
        if Instant::now() >= at {
            return;
        }
        tokio::time::sleep_until(at).await;
    }
}

/// Our side closes: flush what the peer is still owed (unless it is a slow consumer), send the
/// close frame, and give the peer `close_timeout` to answer before the TCP connection is dropped.
async fn close_from_our_side(
    socket: &mut Socket,
    link: &mut PeerLink,
    reason: &CloseReason,
    ctx: &ConnectionContext,
) {
    // A peer that cannot take our frames gets none of the backlog, only the close frame.
    let slow = *reason == CloseReason::slow_consumer() || *reason == CloseReason::write_timeout();
    // The rest of an inbound message we refused may still be arriving.
    let mid_message = reason.code == CloseReason::TOO_BIG
        || *reason == CloseReason::message_timeout()
        || reason.code == CloseReason::TRY_AGAIN_LATER;
    if mid_message {
        // What still arrives is discarded unread, so it must not count as buffered.
        socket.get_mut().stop_counting();
    }
    let close_frame = CloseFrame {
        code: CloseCode::from(reason.code),
        reason: Utf8Bytes::from(reason.wire_reason()),
    };
    let handshake = async {
        if slow {
            link.discard_queued();
        } else {
            while let Some(item) = link.try_recv() {
                let frames = match item {
                    Outgoing::Frame(frame) => vec![frame],
                    Outgoing::Batch(frames) => frames,
                    Outgoing::Binary(data) => {
                        socket.feed(Message::Binary(data)).await?;
                        continue;
                    }
                };
                for frame in frames {
                    socket.feed(Message::Text(frame.into_utf8_bytes())).await?;
                }
            }
        }
        socket.send(Message::Close(Some(close_frame))).await?;
        if mid_message {
            // The rest of the oversized message is still arriving; read and discard it so the
            // kernel does not answer our close with a reset that could destroy the close frame.
            drain_raw(socket.get_mut()).await;
        } else {
            while let Some(Ok(_)) = socket.next().await {}
        }
        Ok::<(), WsError>(())
    };
    let _ = timeout(ctx.close_timeout, handshake).await;
}

async fn drain_raw(io: &mut Metered<TokioIo<Upgraded>>) {
    let mut buf = [0u8; 8192];
    while let Ok(n) = io.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}
