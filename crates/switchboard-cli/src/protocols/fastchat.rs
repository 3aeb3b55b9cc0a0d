//! `--protocol fastchat`.

use std::time::Duration;

use switchboard_fastchat::{Config, FastChat};

use crate::CliError;
use crate::runtime::{Server, parse_duration};

/// fastchat options. fastchat brings its own keepalive: the runtime's `--ping-interval` and
/// `--idle-timeout` do not apply; a socket silent for ping interval + pong timeout is dropped.
#[derive(Debug, Clone, clap::Args)]
// A distinct group id: clap names a flattened group after the struct, and `Args` is taken.
#[group(id = "fastchat_args")]
#[command(next_help_heading = "fastchat")]
pub(crate) struct Args {
    /// How often clients are expected to PING, e.g. 15s.
    #[arg(long, env = "SWITCHBOARD_FASTCHAT_PING_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    fastchat_ping_interval: Duration,
    /// Grace after the ping interval before a silent socket is dropped, e.g. 5s.
    #[arg(long, env = "SWITCHBOARD_FASTCHAT_PONG_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    fastchat_pong_timeout: Duration,
    /// MSG frames per user per rate window (0: unlimited).
    #[arg(
        long,
        env = "SWITCHBOARD_FASTCHAT_MSG_RATE_LIMIT",
        default_value_t = 60
    )]
    fastchat_msg_rate_limit: usize,
    /// TYPING frames per user per rate window (0: unlimited).
    #[arg(
        long,
        env = "SWITCHBOARD_FASTCHAT_TYPING_RATE_LIMIT",
        default_value_t = 10
    )]
    fastchat_typing_rate_limit: usize,
    /// The sliding rate-limit window, e.g. 60s.
    #[arg(long, env = "SWITCHBOARD_FASTCHAT_RATE_WINDOW", default_value = "60s", value_parser = parse_duration)]
    fastchat_rate_window: Duration,
    /// Users remembered; when full the longest-offline user is forgotten.
    #[arg(long, env = "SWITCHBOARD_FASTCHAT_MAX_USERS", default_value_t = 10_000)]
    fastchat_max_users: usize,
    /// Open chats per user; more OPEN_CHATs get RATE_LIMITED.
    #[arg(
        long,
        env = "SWITCHBOARD_FASTCHAT_MAX_CHATS_PER_USER",
        default_value_t = 200
    )]
    fastchat_max_chats_per_user: usize,
    /// Messages queued for one offline user; more get MESSAGE_FAILED.
    #[arg(
        long,
        env = "SWITCHBOARD_FASTCHAT_MAX_QUEUED_PER_USER",
        default_value_t = 100
    )]
    fastchat_max_queued_per_user: usize,
    /// Messages queued for all offline users together; more get MESSAGE_FAILED.
    #[arg(
        long,
        env = "SWITCHBOARD_FASTCHAT_MAX_QUEUED_TOTAL",
        default_value_t = 10_000
    )]
    fastchat_max_queued_total: usize,
    /// Accepted messages remembered for idempotent retries and delivery acks (oldest forgotten).
    #[arg(
        long,
        env = "SWITCHBOARD_FASTCHAT_MAX_TRACKED_MESSAGES",
        default_value_t = 100_000
    )]
    fastchat_max_tracked_messages: usize,
    /// Valid HELLOs per known user per rate window (0: unlimited); more get RATE_LIMITED.
    #[arg(
        long,
        env = "SWITCHBOARD_FASTCHAT_HELLO_RATE_LIMIT",
        default_value_t = 10
    )]
    fastchat_hello_rate_limit: usize,
    /// Users one client (IPv4 address or IPv6 /64) may create (0: unlimited); at the limit its
    /// own longest-offline user is forgotten, or RATE_LIMITED if all are online.
    #[arg(
        long,
        env = "SWITCHBOARD_FASTCHAT_MAX_USERS_PER_CLIENT",
        default_value_t = 100
    )]
    fastchat_max_users_per_client: usize,
    /// Messages one sending client may have waiting in offline queues (0: unlimited); more get
    /// MESSAGE_FAILED.
    #[arg(
        long,
        env = "SWITCHBOARD_FASTCHAT_MAX_QUEUED_PER_CLIENT",
        default_value_t = 1_000
    )]
    fastchat_max_queued_per_client: usize,
    /// MSG frames per client per minute, whatever user_id it uses (0: unlimited).
    #[arg(
        long,
        env = "SWITCHBOARD_FASTCHAT_CLIENT_MSG_PER_MINUTE",
        default_value_t = 600
    )]
    fastchat_client_msg_per_minute: u32,
    /// TYPING frames per client per minute, whatever user_id it uses (0: unlimited).
    #[arg(
        long,
        env = "SWITCHBOARD_FASTCHAT_CLIENT_TYPING_PER_MINUTE",
        default_value_t = 120
    )]
    fastchat_client_typing_per_minute: u32,
    /// Valid HELLOs per client per minute, whatever user_id it uses (0: unlimited).
    #[arg(
        long,
        env = "SWITCHBOARD_FASTCHAT_CLIENT_HELLO_PER_MINUTE",
        default_value_t = 60
    )]
    fastchat_client_hello_per_minute: u32,
    /// Clients tracked by the per-client rate limits (new clients beyond it are refused while
    /// every tracked one is active).
    #[arg(
        long,
        env = "SWITCHBOARD_FASTCHAT_MAX_CLIENTS",
        default_value_t = 10_000
    )]
    fastchat_max_clients: usize,
}

pub(crate) async fn serve(args: &Args, server: Server) -> Result<(), CliError> {
    let config = Config {
        ping_interval: args.fastchat_ping_interval,
        pong_timeout: args.fastchat_pong_timeout,
        msg_rate_limit: args.fastchat_msg_rate_limit,
        typing_rate_limit: args.fastchat_typing_rate_limit,
        rate_window: args.fastchat_rate_window,
        max_users: args.fastchat_max_users,
        max_chats_per_user: args.fastchat_max_chats_per_user,
        max_queued_per_user: args.fastchat_max_queued_per_user,
        max_queued_total: args.fastchat_max_queued_total,
        max_tracked_messages: args.fastchat_max_tracked_messages,
        hello_rate_limit: args.fastchat_hello_rate_limit,
        max_users_per_client: args.fastchat_max_users_per_client,
        max_queued_per_client: args.fastchat_max_queued_per_client,
        client_msg_per_minute: args.fastchat_client_msg_per_minute,
        client_typing_per_minute: args.fastchat_client_typing_per_minute,
        client_hello_per_minute: args.fastchat_client_hello_per_minute,
        max_clients: args.fastchat_max_clients,
        max_state_bytes: server.max_state_bytes,
        ..Config::default()
    };
    if config.idle_timeout().is_zero() {
        return Err(CliError::Failed(
            "--fastchat-ping-interval + --fastchat-pong-timeout must be more than 0".into(),
        ));
    }
    // The rate-limit tables are charged up front; a budget they fill would refuse every user.
    let fixed = config.fixed_state_bytes();
    if fixed >= config.max_state_bytes {
        return Err(CliError::Failed(format!(
            "--max-state-bytes ({}) must be more than fastchat's rate-limit tables ({fixed} bytes); \
             raise it or lower --fastchat-max-users / --fastchat-max-clients",
            config.max_state_bytes
        )));
    }
    server.run(FastChat::new(config)).await
}
