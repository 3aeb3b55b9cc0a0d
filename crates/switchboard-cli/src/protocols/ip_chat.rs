//! `--protocol ip-chat`.

use switchboard_ip_chat::{Config, IpChat};

use crate::CliError;
use crate::runtime::Server;

/// ip-chat options.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "ip-chat")]
#[group(id = "ip_chat_args")]
pub(crate) struct Args {
    /// Messages kept and replayed to new clients; the oldest is dropped first.
    #[arg(long, env = "SWITCHBOARD_HISTORY_LIMIT", default_value_t = 1000)]
    history_limit: usize,
    /// Messages per user per sliding minute (0: unlimited).
    #[arg(long, env = "SWITCHBOARD_RATE_LIMIT", default_value_t = 60)]
    rate_limit: usize,
    /// Reactions per user per sliding minute (0: unlimited).
    #[arg(long, env = "SWITCHBOARD_REACTION_RATE_LIMIT", default_value_t = 60)]
    reaction_rate_limit: usize,
}

pub(crate) async fn serve(args: &Args, server: Server) -> Result<(), CliError> {
    let config = Config {
        history_limit: args.history_limit,
        rate_limit: args.rate_limit,
        reaction_rate_limit: args.reaction_rate_limit,
        ..Config::default()
    };
    server.run(IpChat::new(config)).await
}
