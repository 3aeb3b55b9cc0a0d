//! The teambot client: one global socket, one socket per team, and the resilience around them.
//!
//! [`TeamBot::run`] drives everything until the server says `goodbye` or [`BotHandle::shutdown`]
//! is called; both end with every socket closed cleanly and `Ok`. A bot reacts to team traffic
//! through a [`TeamHandler`], and anyone holding a [`BotHandle`] can read a [`TeamStats`] snapshot
//! at any time (the same numbers the client reports to `healthcheck`).
//!
//! Structure: the global task owns the global socket and the team registry's write side; every
//! team has its own task that asks the global task for a `ws_url` (`team.connect`), opens the
//! team socket, pings it, counts its messages, and re-establishes it with exponential backoff and
//! jitter when it drops. Counts live in the registry, so they survive reconnects.
//!
//! `wss://` (and `https://`) URLs, global or team, are opened over TLS and verified with
//! [`TeamBotConfig::tls`]: the system's roots by default, or a given CA file ([`tls`]).

mod global;
mod registry;
mod team;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::messages::{TeamId, UrlError, websocket_url};
use registry::Registry;

pub use registry::TeamStats;

type Socket = tls::ClientSocket;

/// Client settings. Defaults follow `docs/protocols/teambot.md`.
#[derive(Debug, Clone)]
pub struct TeamBotConfig {
    /// The global socket, e.g. `ws://127.0.0.1:8080/global` (`http://` is accepted as `ws://`).
    pub url: String,
    /// How often each team socket sends `ping {unique_id}`.
    pub ping_interval: Duration,
    /// How long a `ping` may wait for its `pong` before the team socket is considered dead and
    /// re-established. The global socket uses WebSocket pings with the same two timings.
    pub pong_timeout: Duration,
    /// First reconnect delay (nominal; jitter picks between half and all of it).
    pub backoff_initial: Duration,
    /// Cap of the doubling reconnect delay.
    pub backoff_max: Duration,
    /// TCP connect plus WebSocket handshake, per attempt.
    pub connect_timeout: Duration,
    /// How long a team waits for the server's `team.connect {ws_url}` before asking again.
    pub url_timeout: Duration,
    /// Bound on one socket write, and on each close handshake.
    pub io_timeout: Duration,
    /// Teams tracked at most; further `team.join`s are logged and ignored.
    pub max_teams: usize,
    /// Largest inbound WebSocket message accepted.
    pub max_message_bytes: usize,
    /// Frames a handler may queue on one team socket ([`TeamContext::send`]); full means refused.
    pub team_send_queue: usize,
    /// Consecutive failed global connects before [`TeamBot::run`] gives up; `None` never does.
    pub global_retry_limit: Option<u32>,
    /// Which servers `wss://` sockets trust: the system's roots by default
    /// ([`tls::ClientTls::from_ca_file`] for a self-signed deployment).
    pub tls: tls::ClientTls,
}

impl TeamBotConfig {
    /// Defaults for the global socket at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ping_interval: Duration::from_secs(3),
            pong_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(4),
            connect_timeout: Duration::from_secs(5),
            url_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(2),
            max_teams: 10_000,
            max_message_bytes: 1024 * 1024,
            team_send_queue: 64,
            global_retry_limit: None,
            tls: tls::ClientTls::system_roots(),
        }
    }

    fn ws_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .max_message_size(Some(self.max_message_bytes))
            .max_frame_size(Some(self.max_message_bytes))
    }
}

/// How a run ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// The server sent `goodbye`.
    Goodbye,
    /// [`BotHandle::shutdown`] was called (the CLI does on SIGINT/SIGTERM).
    Shutdown,
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum TeamBotError {
    /// The global URL cannot be used.
    #[error("invalid global URL {url:?}: {source}")]
    Url {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        source: UrlError,
    },
    /// [`TeamBotConfig::global_retry_limit`] consecutive connects failed.
    #[error("gave up on the global socket after {attempts} failed connects: {last_error}")]
    GaveUp {
        /// Consecutive failures.
        attempts: u32,
        /// The last failure.
        last_error: String,
    },
}

/// An `error` event from the server, as handed to [`TeamHandler::on_error`].
#[derive(Debug, Clone, PartialEq)]
pub struct ServerError {
    /// `message`, if given.
    pub message: Option<String>,
    /// `received_message`, if given.
    pub received_message: Option<Value>,
    /// `team_id`, if given.
    pub team_id: Option<TeamId>,
    /// Whether it arrived on a team socket (else the global one).
    pub on_team_socket: bool,
}

/// Reacts to what happens to teams. Every method has a no-op default.
///
/// Methods run on the task of the socket concerned, in order, so they must not block: hand slow
/// work to your own task. Counting happens before `on_message` is called, and cannot be affected
/// by the handler.
pub trait TeamHandler: Send + Sync + 'static {
    /// A `message` event arrived on a team socket.
    fn on_message(&self, _team: &TeamContext, _text: &str) {}
    /// A `team.join` was received: the client starts managing the team.
    fn on_team_joined(&self, _team_id: &TeamId) {}
    /// A team socket is open (first time or after a reconnect).
    fn on_team_connected(&self, _team: &TeamContext) {}
    /// A team socket closed without `team.left`; the client will re-establish it.
    fn on_team_dropped(&self, _team_id: &TeamId, _reason: &str) {}
    /// An attempt to (re-)establish a team socket failed: the `ws_url` was refused with an
    /// `error`, never came, was unusable, or the connect, TLS or upgrade failed. The
    /// client backs off and asks again.
    fn on_connect_failed(&self, _team_id: &TeamId, _reason: &str) {}
    /// `team.left` arrived: the team's socket is closed for good.
    fn on_team_left(&self, _team_id: &TeamId) {}
    /// An `error` event arrived (it is already logged).
    fn on_error(&self, _error: &ServerError) {}
}

/// A handler that does nothing: the client only keeps connections and counts.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopHandler;

impl TeamHandler for NoopHandler {}

/// One team as a handler sees it: its id and a way to send frames on its socket.
#[derive(Debug, Clone)]
pub struct TeamContext {
    id: TeamId,
    tx: mpsc::Sender<String>,
    team: Arc<registry::Team>,
}

/// Why [`TeamContext::send`] refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The team socket is not connected right now.
    #[error("the team socket is not connected")]
    NotConnected,
    /// The team's send queue is full ([`TeamBotConfig::team_send_queue`]).
    #[error("the team's send queue is full")]
    Full,
}

impl TeamContext {
    /// The team id as the server sent it.
    pub fn id(&self) -> &TeamId {
        &self.id
    }

    /// This team's current stats.
    pub fn stats(&self) -> TeamStats {
        self.team.stats()
    }

    /// Queues a text frame for the team socket without waiting. Frames still queued when the
    /// socket drops are discarded.
    pub fn send(&self, text: impl Into<String>) -> Result<(), SendError> {
        if !self.team.is_connected() {
            return Err(SendError::NotConnected);
        }
        self.tx.try_send(text.into()).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::NotConnected,
        })
    }

    /// Queues `value` as a JSON text frame.
    pub fn send_json(&self, value: &Value) -> Result<(), SendError> {
        self.send(value.to_string())
    }
}

/// Reads stats and stops a running [`TeamBot`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BotHandle {
    registry: Arc<Registry>,
    shutdown: CancellationToken,
}

impl BotHandle {
    /// A snapshot of every known team, in the order they joined.
    pub fn stats(&self) -> Vec<TeamStats> {
        self.registry.snapshot()
    }

    /// One team's stats.
    pub fn team(&self, id: &TeamId) -> Option<TeamStats> {
        self.registry.get(id).map(|team| team.stats())
    }

    /// Whether the global socket is connected right now.
    pub fn global_connected(&self) -> bool {
        self.registry.global_connected()
    }

    /// Global socket connections made so far (1 + reconnects).
    pub fn global_connections(&self) -> u64 {
        self.registry.global_connections()
    }

    /// Asks the bot to close every socket cleanly and return [`RunEnd::Shutdown`].
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }
}

/// State shared by the global task and every team task.
struct Shared<H> {
    config: TeamBotConfig,
    handler: H,
    registry: Arc<Registry>,
    /// Team tasks ask the global task to send `team.connect` through this bounded queue.
    requests: mpsc::Sender<TeamId>,
    /// Cancelled when the run ends (goodbye or shutdown): every team closes its socket.
    stop: CancellationToken,
    tasks: TaskTracker,
}

/// The teambot client. Build it with a config and a handler, keep a [`BotHandle`], then
/// [`run`](TeamBot::run) it.
///
/// ```no_run
/// # async fn demo() -> Result<(), switchboard_teambot::client::TeamBotError> {
/// use switchboard_teambot::client::{NoopHandler, TeamBot, TeamBotConfig};
/// let bot = TeamBot::new(TeamBotConfig::new("ws://127.0.0.1:8080/global"), NoopHandler);
/// let handle = bot.handle();
/// tokio::spawn(async move {
///     tokio::signal::ctrl_c().await.ok();
///     handle.shutdown();
/// });
/// bot.run().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TeamBot<H> {
    config: TeamBotConfig,
    handler: H,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
}

impl<H: TeamHandler> TeamBot<H> {
    /// A bot for `config`, reacting through `handler`.
    pub fn new(config: TeamBotConfig, handler: H) -> Self {
        let registry = Arc::new(Registry::new(config.max_teams));
        Self {
            config,
            handler,
            registry,
            shutdown: CancellationToken::new(),
        }
    }

    /// A handle for stats and shutdown; valid before, during and after the run.
    pub fn handle(&self) -> BotHandle {
        BotHandle {
            registry: self.registry.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Runs until `goodbye` or [`BotHandle::shutdown`]; both close every socket cleanly and
    /// return `Ok`. Errors only for an unusable global URL or an exhausted retry limit.
    pub async fn run(self) -> Result<RunEnd, TeamBotError> {
        let url = global_url(&self.config.url)?;
        let (requests, request_rx) = mpsc::channel(self.config.max_teams.clamp(16, 4096));
        let io_timeout = self.config.io_timeout;
        let shared = Arc::new(Shared {
            config: self.config,
            handler: self.handler,
            registry: self.registry,
            requests,
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let result = global::run(shared.clone(), url, request_rx, self.shutdown).await;
        // Whatever ended the run, every team closes its socket (team tasks bound their own close
        // handshakes by `io_timeout`).
        shared.stop.cancel();
        shared.tasks.close();
        if tokio::time::timeout(io_timeout * 2, shared.tasks.wait())
            .await
            .is_err()
        {
            warn!("some team sockets did not close in time");
        }
        match &result {
            Ok(end) => info!(?end, teams = shared.registry.len(), "teambot finished"),
            Err(error) => warn!(%error, "teambot failed"),
        }
        result
    }
}

fn global_url(url: &str) -> Result<String, TeamBotError> {
    websocket_url(url).map_err(|source| TeamBotError::Url {
        url: url.to_owned(),
        source,
    })
}

/// Opens a WebSocket (over TLS for `wss://`) within `config.connect_timeout`.
async fn open(config: &TeamBotConfig, url: &str) -> Result<Socket, String> {
    let connect = tls::connect(url, &config.tls, Some(config.ws_config()));
    match tokio::time::timeout(config.connect_timeout, connect).await {
        Ok(Ok((socket, _response))) => Ok(socket),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("timed out after {:?}", config.connect_timeout)),
    }
}

/// Sends a close frame and waits (bounded by `io_timeout`) for the server's reply, handing each
/// text frame that arrives meanwhile to `late` so the caller can still count it.
async fn close_socket(socket: &mut Socket, io_timeout: Duration, mut late: impl FnMut(&str)) {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let handshake = async {
        let _ = socket.close(None).await;
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Text(text) = message {
                late(text.as_str());
            }
        }
    };
    let _ = tokio::time::timeout(io_timeout, handshake).await;
}
