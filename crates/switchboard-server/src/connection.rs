//! The per-socket task: reads frames into the protocol, writes the peer's queue to the socket,
//! keeps the peer alive, and closes it for exactly one reason.

use std::future::{Future, pending};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use switchboard_core::{
    CloseReason, Context, Engine, Identity, Keepalive, LinkEvent, Outgoing, Peer, PeerLink,
    Protocol,
};
use tokio::io::AsyncReadExt;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tracing::{Instrument, debug, info, trace};

use crate::metered::{Metered, Watch};
use crate::wire::{self, Pending};
use crate::{ACCESS_TARGET, Counters};

pub(crate) type Socket = WebSocketStream<Metered<TokioIo<Upgraded>>>;

/// Queue items taken per write; bounds the time one connection spends writing before it looks
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
    pub(crate) engine: Engine,
    /// When the connection's signed token expires (it is then closed with 4401).
    pub(crate) expires_at: Option<Instant>,
    /// What the access log says about the session.
    pub(crate) access: Access,
}

/// A session's facts for its access-log line.
pub(crate) struct Access {
    /// The upgrade's path, without the query string (which may hold a token).
    pub(crate) path: Box<str>,
    pub(crate) client_ip: IpAddr,
    /// The verified signed identity, when signed identity is on.
    pub(crate) identity: Option<Identity>,
    pub(crate) opened: Instant,
}

impl ConnectionContext {
    /// Adds the socket's traffic to the shared counters if a flush is due (about once a
    /// second while it is busy): one relaxed load when it is not.
    fn flush_if_due(&self, socket: &mut Socket) {
        let epoch = self.counters.epoch.load(Ordering::Relaxed);
        let traffic = &mut socket.get_mut().traffic;
        if traffic.due(epoch) {
            traffic.flush(&self.counters.metrics, epoch);
        }
    }
}

/// The `reason` label of a close (a small fixed set) and whether the client chose its code.
fn close_label(end: &End) -> (&'static str, bool) {
    let End::Close(reason) = end else {
        return match end {
            End::PeerClosed(_) => ("client", true),
            _ => ("gone", false),
        };
    };
    let label = match reason.code {
        _ if *reason == CloseReason::slow_consumer() => "slow_consumer",
        _ if *reason == CloseReason::write_timeout() => "write_timeout",
        _ if *reason == CloseReason::message_timeout() => "message_timeout",
        _ if *reason == CloseReason::idle_timeout() => "idle_timeout",
        _ if *reason == CloseReason::shutdown() => "shutdown",
        CloseReason::TOKEN_EXPIRED => "token_expired",
        CloseReason::TRY_AGAIN_LATER => "reassembly_budget",
        CloseReason::INVALID_PAYLOAD => "invalid_utf8",
        CloseReason::TOO_BIG => "oversized",
        CloseReason::PROTOCOL_ERROR => "protocol_error",
        // The protocol closed it, for a reason of its own.
        _ => "protocol",
    };
    (label, false)
}

/// The span a protocol hook runs in, so every line the protocol logs for this session carries
/// its connection id, as the runtime's own lines do. Made per hook run rather than kept per
/// connection: hooks run per inbound message, never per delivery, and an idle socket then holds
/// no span (nor the subscriber's record of one); with `info` disabled it costs nothing.
fn session_span(peer: &Peer) -> tracing::Span {
    tracing::info_span!("session", conn = %peer.id())
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
    Failed(std::io::Error),
}

/// Frames taken from the queue whose write was interrupted part-way (by a close request or the
/// write timeout). They are finished before the close frame, which must start on a frame
/// boundary.
type Unfinished = Option<Pending>;

/// Runs one connection until it is closed.
///
/// A plain function returning an `async move` block rather than an `async fn`: an `async fn`
/// moves each argument into a second slot of its state machine, so the socket and context
/// would be stored twice in every connection's task for its whole life (measured: 640 bytes
/// per idle socket).
#[allow(clippy::manual_async_fn)]
pub(crate) fn run<P: Protocol>(
    protocol: Arc<P>,
    mut conn: P::Conn,
    mut socket: Socket,
    peer: Peer,
    mut link: PeerLink,
    ctx: ConnectionContext,
) -> impl Future<Output = ()> + Send {
    async move {
        // Futures that are live only for a moment are boxed, here and in `drive`: a task is as large
        // as its largest state, so an idle socket would otherwise pay for the biggest protocol
        // future all the time (measured: the task was 9.6 KB before, 480 bytes after).
        let cx = Context::new(&peer, &ctx.engine);
        // Not `hook()`: a close requested while opening is seen by `drive` at once, and nothing is
        // queued yet that would need writing while the open hook waits.
        Box::pin(
            protocol
                .on_open(&mut conn, &cx)
                .instrument(session_span(&peer)),
        )
        .await;

        let mut unfinished: Unfinished = None;
        let end = drive(
            &*protocol,
            &mut conn,
            &mut socket,
            &peer,
            &mut link,
            &mut unfinished,
            &ctx,
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
        let (label, by_client) = close_label(&end);
        // Mark the peer closed first so broadcasts stop queueing to it while it shuts down.
        peer.close(reason.clone());
        debug!(conn = %peer.id(), remote = %peer.remote(), code = reason.code, reason = %reason.reason, "connection closing");
        Box::pin(protocol.on_close(conn, &cx).instrument(session_span(&peer))).await;

        if let End::Close(reason) = &end {
            let counter = match reason.code {
                _ if *reason == CloseReason::slow_consumer() => Some(&ctx.counters.slow_consumers),
                _ if *reason == CloseReason::idle_timeout() => Some(&ctx.counters.idle_timeouts),
                _ if *reason == CloseReason::write_timeout() => Some(&ctx.counters.write_timeouts),
                _ if *reason == CloseReason::message_timeout() => {
                    Some(&ctx.counters.message_timeouts)
                }
                CloseReason::TOKEN_EXPIRED => Some(&ctx.counters.token_expiries),
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
                Box::pin(close_from_our_side(
                    &mut socket,
                    &mut link,
                    unfinished,
                    &reason,
                    &ctx,
                ))
                .await
            }
            End::PeerClosed(_) => {
                // tungstenite queued the close reply; polling moves it to the control buffer and
                // ends the stream, and the reply is then written.
                let _ = timeout(ctx.close_timeout, async {
                    while read_next(&mut socket).await.is_some() {}
                    send_control(&mut socket).await
                })
                .await;
            }
            End::Gone(_) => {}
        }
        let metrics = &ctx.counters.metrics;
        let traffic = &mut socket.get_mut().traffic;
        traffic.flush(metrics, 0);
        metrics.closed(reason.code, by_client, label);
        info!(
            target: ACCESS_TARGET,
            conn = %peer.id(),
            protocol = metrics.protocol,
            path = &*ctx.access.path,
            client_ip = %ctx.access.client_ip,
            user = ctx.access.identity.as_ref().map(Identity::subject),
            duration_seconds = ctx.access.opened.elapsed().as_secs_f64(),
            frames_in = traffic.frames_in,
            frames_out = traffic.frames_out,
            bytes_in = traffic.bytes_in,
            bytes_out = traffic.bytes_out,
            close_code = reason.code,
            close_reason = %reason.reason,
            closed_by = if by_client { "client" } else { label },
            "session closed"
        );
    }
}

async fn drive<P: Protocol>(
    protocol: &P,
    conn: &mut P::Conn,
    socket: &mut Socket,
    peer: &Peer,
    link: &mut PeerLink,
    unfinished: &mut Unfinished,
    ctx: &ConnectionContext,
) -> End {
    let tick_every = protocol.tick_interval();
    // The read side and the timer wake the task through the watch, which records it: a pass
    // woken only for the queue polls neither (see `read_side`).
    let side_waker = std::task::Waker::from(ctx.watch.clone());
    let keepalive = ctx.keepalive;
    let cx = Context::new(peer, &ctx.engine);
    // One timer for every inbound deadline: the idle timeout, and the message timeout of a
    // message being received. The wrapper under tungstenite notices a message start while the
    // read side is polled, and the timer is looked at right after it in the same pass.
    let mut deadlines = Deadlines {
        last_heard: Instant::now(),
        // The keepalive ping shares that timer: a second one would cost every wake-up too.
        next_ping: keepalive.ping_interval.map(|every| Instant::now() + every),
    };
    let timer = sleep_until(deadlines.last_heard + keepalive.idle_timeout);
    tokio::pin!(timer);
    // Set by the read branch when the watch says the read side or the timer woke the task,
    // for the timer branch right after it in the same pass (atomic only because the task
    // must be `Send`; one task touches it).
    let timer_due = std::sync::atomic::AtomicBool::new(false);
    let mut ticker = tick_every.map(|every| {
        let mut timer = interval_at(Instant::now() + every, every);
        timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        timer
    });

    loop {
        tokio::select! {
            biased;
            // A shutdown arrives here too, as a close request (see `OpenPeers`).
            // Local work before remote work: drain what we owe the peer before reading more.
            event = link.next_event() => match event {
                LinkEvent::Close(reason) => return End::Close(reason),
                LinkEvent::Send(item) => {
                    match write_batch(socket, link, unfinished, peer, item, ctx).await {
                        WriteOutcome::Written => {}
                        WriteOutcome::Interrupted(reason) => return End::Close(reason),
                        WriteOutcome::Failed(error) => return End::Gone(error.to_string()),
                    }
                }
            },
            incoming = read_side(socket, &ctx.watch, &side_waker, &timer_due) => {
                deadlines.last_heard = Instant::now();
                if let Some(Ok(Message::Text(_) | Message::Binary(_))) = &incoming {
                    let traffic = &mut socket.get_mut().traffic;
                    traffic.frames_in = traffic.frames_in.saturating_add(1);
                    ctx.flush_if_due(socket);
                }
                match incoming {
                    Some(Ok(Message::Text(text))) => {
                        let work = protocol
                            .on_text(conn, &cx, text.as_str())
                            .instrument(session_span(peer));
                        if let Some(end) = Box::pin(hook(work, socket, link, unfinished, peer, ctx)).await {
                            return end;
                        }
                    }
                    Some(Ok(Message::Binary(data))) => {
                        let work = protocol
                            .on_binary(conn, &cx, &data)
                            .instrument(session_span(peer));
                        if let Some(end) = Box::pin(hook(work, socket, link, unfinished, peer, ctx)).await {
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
            due = timer_side(timer.as_mut(), ctx, &deadlines, &side_waker, &timer_due) => {
                if let Due::Close(expired) = due {
                    return End::Close(expired);
                }
                // The next one an interval after this one was sent (no catching up).
                deadlines.next_ping = keepalive.ping_interval.map(|every| Instant::now() + every);
                // The timer fired: it must be moved to the new deadline on the next pass.
                ctx.watch.look_again();
                trace!(conn = %peer.id(), "ping");
                // A socket gone quiet still reports its last traffic within a ping interval.
                ctx.flush_if_due(socket);
                socket.get_mut().queue_control(&wire::encode(wire::Opcode::Ping, &[]), false);
                match Box::pin(guarded(send_control(socket), peer, ctx)).await {
                    WriteOutcome::Written => {}
                    WriteOutcome::Interrupted(reason) => return End::Close(reason),
                    WriteOutcome::Failed(error) => return End::Gone(error.to_string()),
                }
            }
            _ = tick_opt(&mut ticker) => {
                let work = protocol.on_tick(conn, &cx).instrument(session_span(peer));
                if let Some(end) = Box::pin(hook(work, socket, link, unfinished, peer, ctx)).await {
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
    unfinished: &mut Unfinished,
    peer: &Peer,
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
            event = link.next_event() => match event {
                LinkEvent::Close(reason) => {
                    let _ = timeout(grace, work.as_mut()).await;
                    return Some(End::Close(reason));
                }
                LinkEvent::Send(item) => {
                    match write_batch(socket, link, unfinished, peer, item, ctx).await {
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

/// What the connection's one timer found due.
enum Due {
    /// A deadline passed: close for this reason.
    Close(CloseReason),
    /// Time to send a keepalive ping.
    Ping,
}

/// The inputs of the connection's one timer that change (the others are in the
/// [`ConnectionContext`]).
struct Deadlines {
    /// When the peer last sent anything.
    last_heard: Instant,
    /// When the next keepalive ping is due.
    next_ping: Option<Instant>,
}

/// Resolves with what the socket's read side gives.
///
/// The connection task wakes for its queue far more often than for its socket or its timer (a
/// subscriber mostly receives), and `select!` polls every branch on every wake-up. Polling
/// tungstenite for input that has not arrived is not free (its waker proxies, a 1 KiB buffer
/// cleared for the read, a `recv` readiness check: measured at a steady fan-out, once the
/// largest user-space cost of a delivery), nor is polling the timer (its waker registration,
/// on memory nothing else in the wake-up touches). So both are polled with the watch's
/// waker, which records that one of them woke the task, and both are skipped while neither
/// did: this branch takes the record and passes it on to [`timer_side`] in `timer_due`. Every
/// change of a deadline happens in a pass that polls them (after a read, or asking for one
/// with [`Watch::look_again`]), so the timer is never left at an old deadline.
fn read_side<'a>(
    socket: &'a mut Socket,
    watch: &'a Watch,
    side_waker: &'a std::task::Waker,
    timer_due: &'a std::sync::atomic::AtomicBool,
) -> impl Future<Output = Option<Result<Message, WsError>>> + 'a {
    std::future::poll_fn(move |cx| {
        // Control replies waiting to be sent are sent either way.
        if socket.get_ref().has_control()
            && let std::task::Poll::Ready(Err(error)) = socket.get_mut().poll_send_control(cx)
        {
            return std::task::Poll::Ready(Some(Err(WsError::Io(error))));
        }
        if !watch.take_woken(cx.waker()) {
            return std::task::Poll::Pending;
        }
        let mut side_cx = std::task::Context::from_waker(side_waker);
        let read = poll_read(socket, &mut side_cx, cx);
        if read.is_ready() {
            // tungstenite may hold more frames already read, or a reply to send on its next
            // read; and the deadlines move: look again on the next pass.
            watch.look_again();
        } else {
            timer_due.store(true, Ordering::Relaxed);
        }
        read
    })
}

/// Resolves with what the timer finds due, looked at only in a pass where [`read_side`] found
/// the watch's record set (it then sets `timer_due`).
fn timer_side<'a>(
    mut timer: Pin<&'a mut tokio::time::Sleep>,
    ctx: &'a ConnectionContext,
    deadlines: &'a Deadlines,
    side_waker: &'a std::task::Waker,
    timer_due: &'a std::sync::atomic::AtomicBool,
) -> impl Future<Output = Due> + 'a {
    std::future::poll_fn(move |_| {
        if !timer_due.swap(false, Ordering::Relaxed) {
            return std::task::Poll::Pending;
        }
        let mut side_cx = std::task::Context::from_waker(side_waker);
        poll_due(timer.as_mut(), ctx, deadlines, &mut side_cx)
    })
}

/// Whether something timed is due: a close when the reassembly budget refused this socket, a
/// message is unfinished after `message_timeout`, nothing was heard for `idle_timeout`, or the
/// connection's signed token expired; else a ping at `next_ping`. Moves the timer to the
/// earliest deadline when that changed; its firing says the deadline passed, so no clock is
/// read.
fn poll_due(
    mut timer: Pin<&mut tokio::time::Sleep>,
    ctx: &ConnectionContext,
    deadlines: &Deadlines,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<Due> {
    let watch = &ctx.watch;
    if watch.over_budget() {
        return std::task::Poll::Ready(Due::Close(CloseReason::try_again_later()));
    }
    let idle_at = deadlines.last_heard + ctx.keepalive.idle_timeout;
    let message_at = watch
        .message_started()
        .map(|started| started + ctx.message_timeout);
    let (at, reason) = match message_at {
        Some(message_at) if message_at < idle_at => (message_at, CloseReason::message_timeout()),
        _ => (idle_at, CloseReason::idle_timeout()),
    };
    let (at, reason) = match ctx.expires_at {
        Some(expires_at) if expires_at <= at => (expires_at, CloseReason::token_expired()),
        _ => (at, reason),
    };
    // A close due at the same time as a ping wins.
    let (at, due) = match deadlines.next_ping {
        Some(ping_at) if ping_at < at => (ping_at, Due::Ping),
        _ => (at, Due::Close(reason)),
    };
    if timer.deadline() != at {
        timer.as_mut().reset(at);
    }
    timer.as_mut().poll(cx).map(|()| due)
}

async fn tick_opt(timer: &mut Option<tokio::time::Interval>) -> Instant {
    match timer {
        Some(timer) => timer.tick().await,
        None => pending().await,
    }
}

/// Writes `first` and up to `MAX_BATCH - 1` more ready items straight to the socket: each
/// frame's shared payload behind a header of a few bytes, in vectored writes. A write that is
/// interrupted leaves its frames in `unfinished`.
async fn write_batch(
    socket: &mut Socket,
    link: &mut PeerLink,
    unfinished: &mut Unfinished,
    peer: &Peer,
    first: Outgoing,
    ctx: &ConnectionContext,
) -> WriteOutcome {
    let mut pending = take_batch(link, first);
    let frames = pending.frame_total();
    let traffic = &mut socket.get_mut().traffic;
    traffic.frames_out = traffic.frames_out.saturating_add(frames);
    let epoch = ctx.counters.epoch.load(Ordering::Relaxed);
    if traffic.due(epoch) {
        // Sampled with the flush, about once a second per busy socket: the queue lock and the
        // histogram records stay off the per-batch path.
        let metrics = &ctx.counters.metrics;
        let queued = pending.cost().saturating_add(peer.queued_bytes());
        metrics.queue_bytes.record(queued as f64);
        metrics.batch_frames.record(frames as f64);
        traffic.flush(metrics, epoch);
    }
    // Most writes complete at once: try inline before paying for the guarded wait, which is
    // boxed to keep idle tasks small and would cost an allocation per batch.
    let now = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(socket.get_mut().poll_write_pending(cx, &mut pending))
    })
    .await;
    match now {
        std::task::Poll::Ready(Ok(())) => WriteOutcome::Written,
        std::task::Poll::Ready(Err(error)) => WriteOutcome::Failed(error),
        std::task::Poll::Pending => {
            Box::pin(finish_write(socket, pending, unfinished, peer, ctx)).await
        }
    }
}

/// The rest of a write the socket could not take at once, under the write timeout and close
/// requests. An interrupted write leaves its frames in `unfinished`.
async fn finish_write(
    socket: &mut Socket,
    mut pending: Pending,
    unfinished: &mut Unfinished,
    peer: &Peer,
    ctx: &ConnectionContext,
) -> WriteOutcome {
    let outcome = guarded(write_pending(socket, &mut pending), peer, ctx).await;
    if matches!(outcome, WriteOutcome::Interrupted(_)) && !pending.is_done() {
        *unfinished = Some(pending);
    }
    outcome
}

/// Polls the socket for the next message with `read_cx` (whose waker hears the read side),
/// then sends any control reply tungstenite wrote meanwhile (a pong, the reply to a close)
/// with the task's `cx`, without waiting for it: a reply the socket cannot take now is retried
/// on the next poll or before the next data write, whichever comes first.
fn poll_read(
    socket: &mut Socket,
    read_cx: &mut std::task::Context<'_>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<Option<Result<Message, WsError>>> {
    let read = socket.poll_next_unpin(read_cx);
    if socket.get_ref().has_control()
        && let std::task::Poll::Ready(Err(error)) = socket.get_mut().poll_send_control(cx)
        && read.is_pending()
    {
        return std::task::Poll::Ready(Some(Err(WsError::Io(error))));
    }
    read
}

/// [`poll_read`] with the task's own waker for both sides.
fn read_next(socket: &mut Socket) -> impl Future<Output = Option<Result<Message, WsError>>> + '_ {
    std::future::poll_fn(move |cx| {
        let mut read_cx = std::task::Context::from_waker(cx.waker());
        poll_read(socket, &mut read_cx, cx)
    })
}

/// `first` and up to `MAX_BATCH - 1` more items ready in the queue, as one write.
fn take_batch(link: &mut PeerLink, first: Outgoing) -> Pending {
    let mut rest = wire::spare_items();
    link.take_into(&mut rest, MAX_BATCH - 1);
    Pending::new(first, rest)
}

/// Writes all of `pending`, waiting for the socket as long as it takes (callers bound it).
fn write_pending<'a>(
    socket: &'a mut Socket,
    pending: &'a mut Pending,
) -> impl Future<Output = std::io::Result<()>> + 'a {
    std::future::poll_fn(move |cx| socket.get_mut().poll_write_pending(cx, pending))
}

/// Sends the queued control bytes, waiting for the socket as long as it takes (callers bound
/// it).
fn send_control(socket: &mut Socket) -> impl Future<Output = std::io::Result<()>> + '_ {
    std::future::poll_fn(move |cx| socket.get_mut().poll_send_control(cx))
}

/// Runs a socket write unless a close request (a shutdown is one) or the write timeout
/// interrupts it (a peer that stopped reading would otherwise hold the write, and its memory,
/// forever). The write is polled first, so a write that completes at once never registers a
/// waiter or timer.
async fn guarded(
    write: impl Future<Output = std::io::Result<()>>,
    peer: &Peer,
    ctx: &ConnectionContext,
) -> WriteOutcome {
    let outcome = tokio::select! {
        biased;
        result = write => match result {
            Ok(()) => WriteOutcome::Written,
            Err(error) => WriteOutcome::Failed(error),
        },
        reason = peer.closing() => WriteOutcome::Interrupted(reason),
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

/// Our side closes: finish an interrupted write, flush what the peer is still owed (unless it
/// is a slow consumer), send the close frame, and give the peer `close_timeout` to answer
/// before the TCP connection is dropped.
async fn close_from_our_side(
    socket: &mut Socket,
    link: &mut PeerLink,
    unfinished: Unfinished,
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
    let close_frame = wire::close_frame(reason.code, reason.wire_reason());
    let handshake = async {
        // A frame cut in the middle must be completed: the close frame has to start on a
        // frame boundary to be a close frame at all.
        if let Some(mut pending) = unfinished {
            write_pending(socket, &mut pending).await?;
        }
        if slow {
            link.discard_queued();
        } else {
            while let Some(first) = link.try_recv() {
                write_pending(socket, &mut take_batch(link, first)).await?;
            }
        }
        socket.get_mut().queue_control(&close_frame, true);
        send_control(socket).await?;
        if mid_message {
            // The rest of the oversized message is still arriving; read and discard it so the
            // kernel does not answer our close with a reset that could destroy the close frame.
            drain_raw(socket.get_mut()).await;
        } else {
            while let Some(Ok(_)) = socket.next().await {}
        }
        Ok::<(), std::io::Error>(())
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
