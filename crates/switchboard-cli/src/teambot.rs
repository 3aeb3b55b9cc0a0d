//! `switchboard teambot`: the teambot client, a thin wrapper around `switchboard_teambot::client`.
#![allow(
    clippy::print_stdout,
    reason = "the final stats are the command's output"
)]

use std::path::PathBuf;
use std::time::Duration;

use switchboard_teambot::client::tls::ClientTls;
use switchboard_teambot::client::{TeamBot, TeamBotConfig, TeamContext, TeamHandler};
use switchboard_teambot::messages::{TeamId, is_props};

use crate::CliError;
use crate::runtime::parse_duration;

/// `switchboard teambot` flags.
#[derive(Debug, clap::Args)]
pub(crate) struct TeambotArgs {
    /// The global socket (http:// is accepted as ws://, https:// as wss://).
    #[arg(
        long,
        env = "SWITCHBOARD_TEAMBOT_URL",
        default_value = "ws://127.0.0.1:8000/global"
    )]
    url: String,
    /// How often each team socket sends ping {unique_id}.
    #[arg(long, env = "SWITCHBOARD_TEAMBOT_PING_INTERVAL", default_value = "3s", value_parser = parse_duration)]
    ping_interval: Duration,
    /// How long a ping may wait for its pong before the team socket is re-established.
    #[arg(long, env = "SWITCHBOARD_TEAMBOT_PONG_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pong_timeout: Duration,
    /// First reconnect delay (jitter picks between half and all of it).
    #[arg(long, env = "SWITCHBOARD_TEAMBOT_BACKOFF_INITIAL", default_value = "500ms", value_parser = parse_duration)]
    backoff_initial: Duration,
    /// Cap of the doubling reconnect delay.
    #[arg(long, env = "SWITCHBOARD_TEAMBOT_BACKOFF_MAX", default_value = "4s", value_parser = parse_duration)]
    backoff_max: Duration,
    /// TCP connect plus WebSocket handshake, per attempt.
    #[arg(long, env = "SWITCHBOARD_TEAMBOT_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// How long a team waits for its ws_url before asking again.
    #[arg(long, env = "SWITCHBOARD_TEAMBOT_URL_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    url_timeout: Duration,
    /// Bound on each socket write and close handshake.
    #[arg(long, env = "SWITCHBOARD_TEAMBOT_IO_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    io_timeout: Duration,
    /// Teams tracked at most; further team.joins are ignored.
    #[arg(long, env = "SWITCHBOARD_TEAMBOT_MAX_TEAMS", default_value_t = 10_000)]
    max_teams: usize,
    /// Largest inbound WebSocket message, in bytes.
    #[arg(long, env = "SWITCHBOARD_TEAMBOT_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024)]
    max_message_bytes: usize,
    /// Give up after this many consecutive failed global connects (default: never).
    #[arg(long, env = "SWITCHBOARD_TEAMBOT_GLOBAL_RETRY_LIMIT")]
    global_retry_limit: Option<u32>,
    /// Verify wss:// servers (global and team sockets) with the CA certificates in this PEM file
    /// instead of the system's roots, e.g. for a self-signed test deployment.
    #[arg(long, env = "SWITCHBOARD_TEAMBOT_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,
}

/// Logs what teams say: props at info, everything else at debug.
struct LogHandler;

impl TeamHandler for LogHandler {
    fn on_message(&self, team: &TeamContext, text: &str) {
        if is_props(text) {
            tracing::info!(team = %team.id(), text, "props!");
        } else {
            tracing::debug!(team = %team.id(), text, "message");
        }
    }

    fn on_team_left(&self, team_id: &TeamId) {
        tracing::debug!(team = %team_id, "handler: team left");
    }
}

pub(crate) async fn run(args: TeambotArgs) -> Result<(), CliError> {
    let mut config = TeamBotConfig::new(args.url);
    config.ping_interval = args.ping_interval;
    config.pong_timeout = args.pong_timeout;
    config.backoff_initial = args.backoff_initial;
    config.backoff_max = args.backoff_max;
    config.connect_timeout = args.connect_timeout;
    config.url_timeout = args.url_timeout;
    config.io_timeout = args.io_timeout;
    config.max_teams = args.max_teams;
    config.max_message_bytes = args.max_message_bytes;
    config.global_retry_limit = args.global_retry_limit;
    config.tls = ClientTls::from_optional_ca_file(args.ca_file.as_deref())
        .map_err(|error| CliError::Failed(error.to_string()))?;
    let bot = TeamBot::new(config, LogHandler);
    let handle = bot.handle();
    let stopper = handle.clone();
    // SIGINT/SIGTERM close every socket cleanly, like goodbye; both exit 0.
    let signal = wait_for_signal();
    tokio::spawn(async move {
        signal.await;
        stopper.shutdown();
    });
    let end = bot
        .run()
        .await
        .map_err(|error| CliError::Failed(error.to_string()))?;
    tracing::info!(?end, "teambot done");
    match serde_json::to_string_pretty(&handle.stats()) {
        Ok(json) => println!("{json}"),
        Err(error) => tracing::warn!(%error, "could not encode the final stats"),
    }
    Ok(())
}

/// Installs the handlers now (see [`switchboard_server::stop_signal`]) and logs the signal.
fn wait_for_signal() -> impl Future<Output = ()> {
    let signal = switchboard_server::stop_signal();
    async move {
        match signal.await {
            switchboard_server::StopSignal::Interrupt => {
                tracing::info!("SIGINT received: closing every socket");
            }
            switchboard_server::StopSignal::Terminate => {
                tracing::info!("SIGTERM received: closing every socket");
            }
        }
    }
}
