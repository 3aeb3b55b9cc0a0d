//! `--protocol ip-chat`.

use switchboard_ip_chat::{Config, IpChat};

use crate::CliError;
use crate::runtime::Server;

/// ip-chat options (limits and policies: docs/protocols/ip-chat.md).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "ip-chat")]
#[group(id = "ip_chat_args")]
pub(crate) struct Args {
    /// Messages kept and replayed to new clients; the oldest is dropped first.
    #[arg(long, env = "SWITCHBOARD_HISTORY_LIMIT", default_value_t = 1000)]
    history_limit: usize,
    /// Bytes the history may hold (as accounted); the oldest messages are dropped first.
    #[arg(long, env = "SWITCHBOARD_HISTORY_BYTES", default_value_t = 2 * 1024 * 1024)]
    history_bytes: usize,
    /// Messages per client per minute (0: unlimited).
    #[arg(long, env = "SWITCHBOARD_RATE_LIMIT", default_value_t = 60)]
    rate_limit: usize,
    /// Reactions per client per minute (0: unlimited).
    #[arg(long, env = "SWITCHBOARD_REACTION_RATE_LIMIT", default_value_t = 60)]
    reaction_rate_limit: usize,
    /// Clients each rate limiter tracks at most (new clients are refused past it).
    #[arg(long, env = "SWITCHBOARD_RATE_LIMIT_KEYS", default_value_t = 100_000)]
    rate_limit_keys: usize,
    /// Largest encoded message, reactions included (also bounds each reaction broadcast).
    #[arg(long, env = "SWITCHBOARD_MAX_MESSAGE_BYTES", default_value_t = 8 * 1024)]
    max_message_bytes: usize,
    /// Distinct emoji one message may carry.
    #[arg(long, env = "SWITCHBOARD_MAX_DISTINCT_REACTIONS", default_value_t = 16)]
    max_distinct_reactions: usize,
    /// Users one emoji may carry on one message.
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_REACTIONS_PER_EMOJI",
        default_value_t = 100
    )]
    max_reactions_per_emoji: usize,
}

pub(crate) async fn serve(args: &Args, server: Server) -> Result<(), CliError> {
    let config = Config {
        history_limit: args.history_limit,
        max_history_bytes: args.history_bytes,
        rate_limit: args.rate_limit,
        reaction_rate_limit: args.reaction_rate_limit,
        max_rate_limit_keys: args.rate_limit_keys,
        max_message_bytes: args.max_message_bytes,
        max_distinct_reactions: args.max_distinct_reactions,
        max_reactions_per_emoji: args.max_reactions_per_emoji,
        max_state_bytes: server.max_state_bytes,
        ..Config::default()
    };
    server.run(IpChat::new(config)).await
}
