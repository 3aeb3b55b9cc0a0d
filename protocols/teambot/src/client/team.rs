//! One team's task: get a `ws_url`, hold the socket, ping it, count, and re-establish it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use switchboard_core::Backoff;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};

use super::global::{leave, truncate, write};
use super::registry::{Team, UrlReply};
use super::{ServerError, Shared, Socket, TeamContext, TeamHandler, close_socket, open};
use crate::messages::{ServerEvent, is_props, ping, websocket_url};

/// Ping ids are unique across the whole process.
static NEXT_PING: AtomicU64 = AtomicU64::new(1);

/// Pings awaiting their pong at most; the oldest is the one that times out anyway.
const MAX_OUTSTANDING_PINGS: usize = 64;

/// How one connection attempt went.
enum Attempt {
    /// The socket never opened.
    Failed(String),
    /// The socket opened, and later ended like this.
    Ended(End),
}

/// How one team socket ended.
enum End {
    /// `team.left`: never reconnect.
    Left,
    /// The run is over (goodbye or shutdown).
    Stopped,
    /// Dropped or dead: re-establish with backoff.
    Lost(String),
}

pub(super) async fn run<H: TeamHandler>(
    shared: Arc<Shared<H>>,
    team: Arc<Team>,
    mut url_rx: mpsc::Receiver<UrlReply>,
) {
    let config = &shared.config;
    let (tx, mut outbound) = mpsc::channel(config.team_send_queue.max(1));
    let context = TeamContext {
        id: team.id.clone(),
        tx,
        team: team.clone(),
    };
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    // The global task already sent the first team.connect when the team joined.
    let mut first = true;
    loop {
        if team.left.is_cancelled() || shared.stop.is_cancelled() {
            break;
        }
        if !first {
            while url_rx.try_recv().is_ok() {}
            team.ask_again();
            if shared.requests.try_send(team.id.clone()).is_err() {
                // The request queue is full: the global task will see `wants_url` after its next
                // reconnect, or this task asks again after `url_timeout`.
                debug!(team = %team.id, "team.connect request queue full");
            }
        }
        first = false;
        let reply = tokio::select! {
            () = team.left.cancelled() => break,
            () = shared.stop.cancelled() => break,
            reply = timeout(config.url_timeout, url_rx.recv()) => reply,
        };
        let failure = match reply {
            Ok(Some(UrlReply::Url(url))) => {
                match connect_and_hold(&shared, &team, &context, &mut outbound, &url, &mut backoff)
                    .await
                {
                    Attempt::Ended(End::Left | End::Stopped) => break,
                    Attempt::Ended(End::Lost(reason)) => reason,
                    Attempt::Failed(reason) => {
                        shared.handler.on_connect_failed(&team.id, &reason);
                        reason
                    }
                }
            }
            Ok(Some(UrlReply::Refused(message))) => {
                let reason = format!("team.connect refused: {message}");
                shared.handler.on_connect_failed(&team.id, &reason);
                reason
            }
            Ok(None) => break,
            Err(_) => {
                let reason = format!("no ws_url within {:?}", config.url_timeout);
                shared.handler.on_connect_failed(&team.id, &reason);
                reason
            }
        };
        team.set_wants_url(false);
        let delay = backoff.next_delay();
        warn!(
            team = %team.id,
            reason = %failure,
            attempt = backoff.attempts(),
            ?delay,
            "team connection lost; backing off before team.connect"
        );
        tokio::select! {
            () = team.left.cancelled() => break,
            () = shared.stop.cancelled() => break,
            () = sleep(delay) => {}
        }
    }
    team.set_wants_url(false);
    debug!(team = %team.id, "team task finished");
}

async fn connect_and_hold<H: TeamHandler>(
    shared: &Arc<Shared<H>>,
    team: &Arc<Team>,
    context: &TeamContext,
    outbound: &mut mpsc::Receiver<String>,
    ws_url: &str,
    backoff: &mut Backoff,
) -> Attempt {
    let url = match websocket_url(ws_url) {
        Ok(url) => url,
        Err(error) => return Attempt::Failed(format!("unusable ws_url {ws_url:?}: {error}")),
    };
    info!(team = %team.id, %url, "connecting team socket");
    let opened = tokio::select! {
        () = team.left.cancelled() => return Attempt::Ended(End::Left),
        () = shared.stop.cancelled() => return Attempt::Ended(End::Stopped),
        opened = open(&shared.config, &url) => opened,
    };
    let mut socket = match opened {
        Ok(socket) => socket,
        Err(error) => return Attempt::Failed(format!("connect to {url} failed: {error}")),
    };
    team.set_connected(true);
    info!(team = %team.id, connection = team.stats().connections, "team socket connected");
    shared.handler.on_team_connected(context);
    let end = hold(shared, team, context, outbound, &mut socket, backoff).await;
    team.set_connected(false);
    while outbound.try_recv().is_ok() {}
    match &end {
        End::Lost(reason) => {
            warn!(team = %team.id, %reason, "team socket dropped");
            shared.handler.on_team_dropped(&team.id, reason);
        }
        End::Left => info!(team = %team.id, "team socket closed after team.left"),
        End::Stopped => info!(team = %team.id, "team socket closed"),
    }
    Attempt::Ended(end)
}

/// Reads, pings and counts until the socket ends; closes it cleanly unless the server did.
async fn hold<H: TeamHandler>(
    shared: &Arc<Shared<H>>,
    team: &Arc<Team>,
    context: &TeamContext,
    outbound: &mut mpsc::Receiver<String>,
    socket: &mut Socket,
    backoff: &mut Backoff,
) -> End {
    let config = &shared.config;
    let mut pinger = interval_at(Instant::now() + config.ping_interval, config.ping_interval);
    pinger.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut pings: VecDeque<(u64, Instant)> = VecDeque::new();
    let end = loop {
        let pong_deadline = pings.front().map(|(_, deadline)| *deadline);
        tokio::select! {
            biased;
            () = shared.stop.cancelled() => break End::Stopped,
            () = team.left.cancelled() => break End::Left,
            incoming = socket.next() => {
                let text = match incoming {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(frame))) => {
                        let reason = frame.map_or_else(
                            || "server closed the team socket".to_owned(),
                            |f| format!("server closed the team socket ({} {})", f.code, f.reason),
                        );
                        // Flush tungstenite's close reply; frames cannot follow a close frame.
                        close_socket(socket, config.io_timeout, |frame| count_late(shared, team, context, frame)).await;
                        return End::Lost(reason);
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => return End::Lost(error.to_string()),
                    None => return End::Lost("connection ended".to_owned()),
                };
                if let Some(end) = on_event(shared, team, context, text.as_str(), &mut pings, backoff) {
                    break end;
                }
            }
            () = sleep_until(pong_deadline.unwrap_or_else(Instant::now)), if pong_deadline.is_some() => {
                break End::Lost(format!("no pong within {:?}", config.pong_timeout));
            }
            _ = pinger.tick() => {
                let id = NEXT_PING.fetch_add(1, Ordering::Relaxed);
                if pings.len() >= MAX_OUTSTANDING_PINGS {
                    pings.pop_back();
                }
                pings.push_back((id, Instant::now() + config.pong_timeout));
                if let Err(reason) = write(socket, Message::text(ping(id)), config.io_timeout).await {
                    return End::Lost(reason);
                }
            }
            Some(text) = outbound.recv() => {
                if let Err(reason) = write(socket, Message::text(text), config.io_timeout).await {
                    return End::Lost(reason);
                }
            }
        }
    };
    // We close: stopped, left, or a missing pong. Messages that arrive during the close
    // handshake were received, so they count.
    close_socket(socket, config.io_timeout, |frame| {
        count_late(shared, team, context, frame);
    })
    .await;
    end
}

fn on_event<H: TeamHandler>(
    shared: &Shared<H>,
    team: &Team,
    context: &TeamContext,
    text: &str,
    pings: &mut VecDeque<(u64, Instant)>,
    backoff: &mut Backoff,
) -> Option<End> {
    let event = match ServerEvent::parse(text) {
        Ok(event) => event,
        Err(error) => {
            warn!(team = %team.id, %error, frame = %truncate(text), "ignoring an unreadable team frame");
            return None;
        }
    };
    match event {
        ServerEvent::Hello => debug!(team = %team.id, "team hello"),
        ServerEvent::Message { text } => {
            team.count_message(is_props(&text));
            shared.handler.on_message(context, &text);
        }
        ServerEvent::Pong(unique_id) => {
            let id = unique_id.as_ref().and_then(serde_json::Value::as_u64);
            match id.and_then(|id| pings.iter().position(|(sent, _)| *sent == id)) {
                Some(index) => {
                    // Pongs come back in order: this one answers every older ping too.
                    pings.drain(..=index);
                    // A round trip worked: the connection is healthy, so the next drop starts
                    // the backoff over.
                    backoff.reset();
                }
                None => debug!(team = %team.id, ?unique_id, "pong for no outstanding ping"),
            }
        }
        ServerEvent::TeamLeft(other) => {
            if other.as_ref().is_some_and(|id| *id != team.id) {
                // A team.left about another team on this socket: honour it for that team.
                if let Some(id) = other {
                    leave(shared, &id, "another team's socket");
                }
                return None;
            }
            leave(shared, &team.id, "team socket");
            return Some(End::Left);
        }
        ServerEvent::Error {
            message,
            received_message,
            team_id,
        } => {
            warn!(
                team = %team.id,
                message = message.as_deref().unwrap_or("(none)"),
                received = ?received_message,
                "server error event on a team socket"
            );
            shared.handler.on_error(&ServerError {
                message,
                received_message,
                team_id: team_id.or_else(|| Some(team.id.clone())),
                on_team_socket: true,
            });
        }
        ServerEvent::Goodbye
        | ServerEvent::TeamJoin(_)
        | ServerEvent::TeamConnect { .. }
        | ServerEvent::Healthcheck
        | ServerEvent::Unknown(_) => {
            debug!(team = %team.id, frame = %truncate(text), "ignoring an unexpected team event");
        }
    }
    None
}

/// Counts a `message` frame that arrived while the socket was closing.
fn count_late<H: TeamHandler>(shared: &Shared<H>, team: &Team, context: &TeamContext, frame: &str) {
    if let Ok(ServerEvent::Message { text }) = ServerEvent::parse(frame) {
        team.count_message(is_props(&text));
        shared.handler.on_message(context, &text);
    }
}
