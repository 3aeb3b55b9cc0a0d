//! The global socket: team membership, `team.connect` brokering, `healthcheck`, `goodbye`.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use switchboard_core::Backoff;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::registry::{Joined, UrlReply};
use super::{RunEnd, ServerError, Shared, Socket, TeamBotError, TeamHandler, close_socket, open};
use crate::messages::{ServerEvent, TeamId, healthcheck_reply, team_connect_request};

/// How one global session ended.
enum End {
    Goodbye,
    Shutdown,
    Dropped(String),
}

/// Connects (and reconnects, with backoff) the global socket until goodbye or shutdown.
pub(super) async fn run<H: TeamHandler>(
    shared: Arc<Shared<H>>,
    url: String,
    mut requests: mpsc::Receiver<TeamId>,
    shutdown: CancellationToken,
) -> Result<RunEnd, TeamBotError> {
    let config = &shared.config;
    let mut backoff = Backoff::new(config.backoff_initial, config.backoff_max);
    let mut failures = 0u32;
    loop {
        if shutdown.is_cancelled() {
            return Ok(RunEnd::Shutdown);
        }
        info!(%url, attempt = backoff.attempts() + 1, "connecting the global socket");
        let opened = tokio::select! {
            () = shutdown.cancelled() => return Ok(RunEnd::Shutdown),
            opened = open(config, &url) => opened,
        };
        match opened {
            Ok(socket) => {
                failures = 0;
                shared.registry.set_global_connected(true);
                info!(%url, "global socket connected");
                let end = session(&shared, socket, &mut requests, &shutdown, &mut backoff).await;
                shared.registry.set_global_connected(false);
                match end {
                    End::Goodbye => return Ok(RunEnd::Goodbye),
                    End::Shutdown => return Ok(RunEnd::Shutdown),
                    End::Dropped(reason) => {
                        warn!(%reason, "global socket dropped; live team sockets are kept");
                    }
                }
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                warn!(%url, %error, failures, "global connect failed");
                if let Some(limit) = config.global_retry_limit
                    && failures >= limit
                {
                    return Err(TeamBotError::GaveUp {
                        attempts: failures,
                        last_error: error,
                    });
                }
            }
        }
        let delay = backoff.next_delay();
        info!(
            ?delay,
            attempt = backoff.attempts(),
            "global socket: backing off before reconnecting"
        );
        tokio::select! {
            () = shutdown.cancelled() => return Ok(RunEnd::Shutdown),
            () = sleep(delay) => {}
        }
    }
}

async fn session<H: TeamHandler>(
    shared: &Arc<Shared<H>>,
    mut socket: Socket,
    requests: &mut mpsc::Receiver<TeamId>,
    shutdown: &CancellationToken,
    backoff: &mut Backoff,
) -> End {
    let config = &shared.config;
    // Teams that were waiting for a ws_url when the previous global socket dropped ask again
    // (this is a new generation, so each request goes out once more).
    for team in shared.registry.teams() {
        if team.wants_url()
            && let Err(reason) = send_connect(shared, &mut socket, &team.id).await
        {
            return End::Dropped(reason);
        }
    }
    let mut last_heard = Instant::now();
    let mut pinger = interval_at(Instant::now() + config.ping_interval, config.ping_interval);
    pinger.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let silence_limit = config.ping_interval + config.pong_timeout;
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                info!("shutdown requested: closing every socket");
                shared.stop.cancel();
                close_socket(&mut socket, config.io_timeout, |_| {}).await;
                return End::Shutdown;
            }
            Some(team_id) = requests.recv() => {
                let wanted = shared.registry.get(&team_id).is_some_and(|team| team.wants_url());
                if wanted && let Err(reason) = send_connect(shared, &mut socket, &team_id).await {
                    return End::Dropped(reason);
                }
            }
            incoming = socket.next() => {
                last_heard = Instant::now();
                let text = match incoming {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(frame))) => {
                        let reason = frame.map_or_else(
                            || "server closed the global socket".to_owned(),
                            |f| format!("server closed the global socket ({} {})", f.code, f.reason),
                        );
                        // Let tungstenite flush its close reply.
                        close_socket(&mut socket, config.io_timeout, |_| {}).await;
                        return End::Dropped(reason);
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => return End::Dropped(error.to_string()),
                    None => return End::Dropped("connection ended".to_owned()),
                };
                match on_event(shared, &mut socket, text.as_str(), backoff).await {
                    Ok(None) => {}
                    Ok(Some(End::Goodbye)) => {
                        info!("goodbye received: closing every socket");
                        shared.stop.cancel();
                        close_socket(&mut socket, config.io_timeout, |_| {}).await;
                        return End::Goodbye;
                    }
                    Ok(Some(end)) => return end,
                    Err(reason) => return End::Dropped(reason),
                }
            }
            _ = pinger.tick() => {
                if last_heard.elapsed() > silence_limit {
                    close_socket(&mut socket, config.io_timeout, |_| {}).await;
                    return End::Dropped(format!("nothing heard for {silence_limit:?}"));
                }
                if let Err(reason) = write(&mut socket, Message::Ping(Default::default()), config.io_timeout).await {
                    return End::Dropped(reason);
                }
            }
        }
    }
}

/// Handles one global event. `Ok(Some(end))` ends the session; `Err` means the socket failed.
async fn on_event<H: TeamHandler>(
    shared: &Arc<Shared<H>>,
    socket: &mut Socket,
    text: &str,
    backoff: &mut Backoff,
) -> Result<Option<End>, String> {
    let event = match ServerEvent::parse(text) {
        Ok(event) => event,
        Err(error) => {
            warn!(%error, frame = %truncate(text), "ignoring an unreadable global frame");
            return Ok(None);
        }
    };
    match event {
        ServerEvent::Hello => {
            info!("global hello");
            backoff.reset();
        }
        ServerEvent::Goodbye => return Ok(Some(End::Goodbye)),
        ServerEvent::TeamJoin(team_id) => {
            if join(shared, &team_id) {
                send_connect(shared, socket, &team_id).await?;
            }
        }
        ServerEvent::TeamConnect { team_id, ws_url } => {
            let team = match shared.registry.get(&team_id) {
                Some(team) => Some(team),
                // An unannounced team.connect: adopt the team rather than drop a usable URL.
                None if join(shared, &team_id) => shared.registry.get(&team_id),
                None => None,
            };
            match team {
                Some(team) if team.left.is_cancelled() => {
                    debug!(team = %team_id, "ignoring team.connect for a team that left");
                }
                Some(team) => {
                    debug!(team = %team_id, %ws_url, "team.connect received");
                    team.set_wants_url(false);
                    if !team.deliver(UrlReply::Url(ws_url)) {
                        debug!(team = %team_id, "dropping a surplus ws_url");
                    }
                }
                None => {}
            }
        }
        ServerEvent::TeamLeft(Some(team_id)) => leave(shared, &team_id, "global"),
        ServerEvent::TeamLeft(None) => warn!("team.left without a team_id on the global socket"),
        ServerEvent::Error {
            message,
            received_message,
            team_id,
        } => {
            warn!(
                message = message.as_deref().unwrap_or("(none)"),
                received = ?received_message,
                team = ?team_id.as_ref().map(ToString::to_string),
                "server error event on the global socket"
            );
            if let Some(team) = team_id.as_ref().and_then(|id| shared.registry.get(id))
                && team.wants_url()
            {
                team.set_wants_url(false);
                let _ = team.deliver(UrlReply::Refused(
                    message.clone().unwrap_or_else(|| "error".to_owned()),
                ));
            }
            shared.handler.on_error(&ServerError {
                message,
                received_message,
                team_id,
                on_team_socket: false,
            });
        }
        ServerEvent::Healthcheck => {
            let stats = shared.registry.healthcheck();
            debug!(teams = stats.len(), "answering healthcheck");
            let reply = healthcheck_reply(&stats);
            write(socket, Message::text(reply), shared.config.io_timeout).await?;
        }
        ServerEvent::Message { .. } | ServerEvent::Pong(_) => {
            debug!(frame = %truncate(text), "ignoring a team event on the global socket");
        }
        ServerEvent::Unknown(kind) => debug!(%kind, "ignoring an unknown global event"),
    }
    Ok(None)
}

/// Registers a team and spawns its task; `true` if it is new.
fn join<H: TeamHandler>(shared: &Arc<Shared<H>>, team_id: &TeamId) -> bool {
    match shared.registry.join(team_id) {
        Joined::New(team, url_rx) => {
            info!(team = %team_id, "team joined");
            shared.handler.on_team_joined(team_id);
            // The caller sends the first team.connect right away.
            team.ask_again();
            let task = super::team::run(shared.clone(), team, url_rx);
            shared.tasks.spawn(task);
            true
        }
        Joined::Known(team) if team.left.is_cancelled() => {
            warn!(team = %team_id, "ignoring team.join for a team that already left");
            false
        }
        Joined::Known(_) => {
            debug!(team = %team_id, "duplicate team.join ignored");
            false
        }
        Joined::Full => {
            warn!(team = %team_id, max = shared.config.max_teams, "team limit reached; ignoring team.join");
            false
        }
    }
}

/// Marks a team as left (once); its task closes the socket and never reconnects.
pub(super) fn leave<H: TeamHandler>(shared: &Shared<H>, team_id: &TeamId, via: &'static str) {
    match shared.registry.get(team_id) {
        Some(team) if !team.left.is_cancelled() => {
            info!(team = %team_id, via, "team left: closing its socket for good");
            team.set_wants_url(false);
            team.left.cancel();
            shared.handler.on_team_left(team_id);
        }
        Some(_) => debug!(team = %team_id, "duplicate team.left ignored"),
        None => warn!(team = %team_id, via, "team.left for an unknown team"),
    }
}

async fn send_connect<H>(
    shared: &Shared<H>,
    socket: &mut Socket,
    team_id: &TeamId,
) -> Result<(), String> {
    let generation = shared.registry.global_connections();
    match shared.registry.get(team_id) {
        Some(team) if team.mark_requested(generation) => {}
        _ => return Ok(()),
    }
    info!(team = %team_id, "sending team.connect");
    write(
        socket,
        Message::text(team_connect_request(team_id)),
        shared.config.io_timeout,
    )
    .await
}

/// One bounded write.
pub(super) async fn write(
    socket: &mut Socket,
    message: Message,
    io_timeout: Duration,
) -> Result<(), String> {
    match timeout(io_timeout, socket.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("write timed out after {io_timeout:?}")),
    }
}

/// At most 200 characters of a frame, for logs.
pub(super) fn truncate(text: &str) -> &str {
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
