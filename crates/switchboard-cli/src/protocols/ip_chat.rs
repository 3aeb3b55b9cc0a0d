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

impl Args {
    /// The protocol configuration these flags describe, with the runtime's state budget.
    fn config(&self, max_state_bytes: usize) -> Config {
        Config {
            history_limit: self.history_limit,
            max_history_bytes: self.history_bytes,
            rate_limit: self.rate_limit,
            reaction_rate_limit: self.reaction_rate_limit,
            max_rate_limit_keys: self.rate_limit_keys,
            max_message_bytes: self.max_message_bytes,
            max_distinct_reactions: self.max_distinct_reactions,
            max_reactions_per_emoji: self.max_reactions_per_emoji,
            max_state_bytes,
            ..Config::default()
        }
    }
}

pub(crate) async fn serve(args: &Args, server: Server) -> Result<(), CliError> {
    let config = args.config(server.max_state_bytes);
    server.run(IpChat::new(config)).await
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn the_defaults_match_the_protocol_defaults() {
        let cli = Cli::try_parse_from(["test"]).unwrap();
        let defaults = Config::default();
        let config = cli.args.config(defaults.max_state_bytes);
        assert_eq!(config.history_limit, defaults.history_limit);
        assert_eq!(config.max_history_bytes, defaults.max_history_bytes);
        assert_eq!(config.rate_limit, defaults.rate_limit);
        assert_eq!(config.reaction_rate_limit, defaults.reaction_rate_limit);
        assert_eq!(config.max_rate_limit_keys, defaults.max_rate_limit_keys);
        assert_eq!(config.max_message_bytes, defaults.max_message_bytes);
        assert_eq!(
            config.max_distinct_reactions,
            defaults.max_distinct_reactions
        );
        assert_eq!(
            config.max_reactions_per_emoji,
            defaults.max_reactions_per_emoji
        );
        assert_eq!(config.max_state_bytes, defaults.max_state_bytes);
    }

    #[test]
    fn flags_set_the_config() {
        let cli = Cli::try_parse_from([
            "test",
            "--history-bytes",
            "1000",
            "--max-message-bytes",
            "2048",
            "--max-distinct-reactions",
            "3",
            "--max-reactions-per-emoji",
            "4",
            "--rate-limit-keys",
            "5",
        ])
        .unwrap();
        let config = cli.args.config(1234);
        assert_eq!(config.max_history_bytes, 1000);
        assert_eq!(config.max_message_bytes, 2048);
        assert_eq!(config.max_distinct_reactions, 3);
        assert_eq!(config.max_reactions_per_emoji, 4);
        assert_eq!(config.max_rate_limit_keys, 5);
        assert_eq!(config.max_state_bytes, 1234);
    }
}
