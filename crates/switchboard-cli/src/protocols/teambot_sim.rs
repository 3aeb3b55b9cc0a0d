//! `--protocol teambot-sim`: the teambot server simulator (scenario, chaos, scorecard).
#![allow(
    clippy::print_stdout,
    reason = "the final scorecard is the command's output"
)]

use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use switchboard_teambot::sim::{SimConfig, TeambotSim, UrlScheme};

use crate::CliError;
use crate::runtime::{Server, parse_duration};

/// `ws_url` scheme handed out in `team.connect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scheme {
    /// `http://...` as in the spec (clients map it to `ws://`).
    Http,
    /// `ws://...`.
    Ws,
}

/// teambot-sim options (see docs/protocols/teambot.md).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "teambot-sim")]
#[group(id = "teambot_sim_args")]
pub(crate) struct Args {
    /// Seed of every random choice (team ids, timings, texts, chaos).
    #[arg(long, env = "SWITCHBOARD_SIM_SEED", default_value_t = 1)]
    sim_seed: u64,
    /// Teams that join.
    #[arg(long, env = "SWITCHBOARD_SIM_TEAMS", default_value_t = 10)]
    sim_teams: usize,
    /// Joins are spread over this window (capped at half the duration).
    #[arg(long, env = "SWITCHBOARD_SIM_JOIN_WINDOW", default_value = "2s", value_parser = parse_duration)]
    sim_join_window: Duration,
    /// How long traffic and chaos run before the final healthcheck and goodbye.
    #[arg(long, env = "SWITCHBOARD_SIM_DURATION", default_value = "30s", value_parser = parse_duration)]
    sim_duration: Duration,
    /// `message` events per second over all connected teams.
    #[arg(long, env = "SWITCHBOARD_SIM_MESSAGE_RATE", default_value_t = 50.0)]
    sim_message_rate: f64,
    /// Share of messages containing "props" (0..1).
    #[arg(long, env = "SWITCHBOARD_SIM_PROPS_SHARE", default_value_t = 0.2)]
    sim_props_share: f64,
    /// Teams that get team.left mid-run (alternately on the team and the global socket).
    #[arg(long, env = "SWITCHBOARD_SIM_LEAVING_TEAMS", default_value_t = 2)]
    sim_leaving_teams: usize,
    /// How often a healthcheck is requested during traffic.
    #[arg(long, env = "SWITCHBOARD_SIM_HEALTHCHECK_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    sim_healthcheck_interval: Duration,
    /// How long a healthcheck reply may take before it counts as a mismatch.
    #[arg(long, env = "SWITCHBOARD_SIM_HEALTHCHECK_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    sim_healthcheck_timeout: Duration,
    /// Chaos: team socket drops per second (average).
    #[arg(long, env = "SWITCHBOARD_SIM_TEAM_DROP_RATE", default_value_t = 0.0)]
    sim_team_drop_rate: f64,
    /// Chaos: global socket drops per second (average).
    #[arg(long, env = "SWITCHBOARD_SIM_GLOBAL_DROP_RATE", default_value_t = 0.0)]
    sim_global_drop_rate: f64,
    /// Chaos: delay each team.connect answer by up to this much.
    #[arg(long, env = "SWITCHBOARD_SIM_CONNECT_DELAY_MAX", default_value = "0s", value_parser = parse_duration)]
    sim_connect_delay_max: Duration,
    /// Chaos: share of team.connect requests answered with an error (0..1).
    #[arg(
        long,
        env = "SWITCHBOARD_SIM_REFUSE_CONNECT_SHARE",
        default_value_t = 0.0
    )]
    sim_refuse_connect_share: f64,
    /// Chaos: share of team socket upgrades refused with HTTP 503 (0..1).
    #[arg(
        long,
        env = "SWITCHBOARD_SIM_REFUSE_UPGRADE_SHARE",
        default_value_t = 0.0
    )]
    sim_refuse_upgrade_share: f64,
    /// Silence on a team's socket before its team.left goes out on the global socket.
    #[arg(long, env = "SWITCHBOARD_SIM_LEAVE_QUIET", default_value = "250ms", value_parser = parse_duration)]
    sim_leave_quiet: Duration,
    /// After traffic, how long to wait for every team to be connected before the final check.
    #[arg(long, env = "SWITCHBOARD_SIM_SETTLE_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    sim_settle_timeout: Duration,
    /// Silence before the final, exact healthcheck.
    #[arg(long, env = "SWITCHBOARD_SIM_QUIET_PERIOD", default_value = "500ms", value_parser = parse_duration)]
    sim_quiet_period: Duration,
    /// Scheme of the ws_urls handed out.
    #[arg(
        long,
        value_enum,
        env = "SWITCHBOARD_SIM_URL_SCHEME",
        default_value = "http"
    )]
    sim_url_scheme: Scheme,
    /// host:port for ws_urls instead of the request's Host header.
    #[arg(long, env = "SWITCHBOARD_SIM_PUBLIC_HOST")]
    sim_public_host: Option<String>,
    /// How long a handed-out ws_url stays valid (each is single-use).
    #[arg(long, env = "SWITCHBOARD_SIM_TOKEN_TTL", default_value = "30s", value_parser = parse_duration)]
    sim_token_ttl: Duration,
    /// Outstanding ws_url tokens at most.
    #[arg(long, env = "SWITCHBOARD_SIM_MAX_TOKENS", default_value_t = 10_000)]
    sim_max_tokens: usize,
    /// Scenario clock resolution.
    #[arg(long, env = "SWITCHBOARD_SIM_TICK", default_value = "10ms", value_parser = parse_duration)]
    sim_tick: Duration,
    /// Messages sent per tick at most.
    #[arg(
        long,
        env = "SWITCHBOARD_SIM_MAX_MESSAGES_PER_TICK",
        default_value_t = 1_000
    )]
    sim_max_messages_per_tick: u64,
    /// Mismatches listed in the scorecard at most (all are counted).
    #[arg(
        long,
        env = "SWITCHBOARD_SIM_MAX_LISTED_MISMATCHES",
        default_value_t = 100
    )]
    sim_max_listed_mismatches: usize,
}

impl Args {
    fn config(&self) -> SimConfig {
        SimConfig {
            seed: self.sim_seed,
            teams: self.sim_teams,
            join_window: self.sim_join_window,
            duration: self.sim_duration,
            message_rate: self.sim_message_rate,
            props_share: self.sim_props_share,
            leaving_teams: self.sim_leaving_teams,
            healthcheck_interval: self.sim_healthcheck_interval,
            healthcheck_timeout: self.sim_healthcheck_timeout,
            team_drop_rate: self.sim_team_drop_rate,
            global_drop_rate: self.sim_global_drop_rate,
            connect_delay_max: self.sim_connect_delay_max,
            refuse_connect_share: self.sim_refuse_connect_share,
            refuse_upgrade_share: self.sim_refuse_upgrade_share,
            leave_quiet: self.sim_leave_quiet,
            settle_timeout: self.sim_settle_timeout,
            quiet_period: self.sim_quiet_period,
            url_scheme: match self.sim_url_scheme {
                Scheme::Http => UrlScheme::Http,
                Scheme::Ws => UrlScheme::Ws,
            },
            public_host: self.sim_public_host.clone(),
            token_ttl: self.sim_token_ttl,
            max_tokens: self.sim_max_tokens,
            tick: self.sim_tick,
            max_messages_per_tick: self.sim_max_messages_per_tick,
            max_listed_mismatches: self.sim_max_listed_mismatches,
            ..SimConfig::default()
        }
    }
}

pub(crate) async fn serve(args: &Args, server: Server) -> Result<(), CliError> {
    let mut config = args.config();
    config.max_state_bytes = server.max_state_bytes;
    let sim = Arc::new(TeambotSim::new(config));
    let watcher = sim.clone();
    // The scenario starts with the first global connection; when it ends, print the scorecard.
    // The server keeps serving GET /scorecard until SIGINT/SIGTERM.
    tokio::spawn(async move {
        let card = watcher.finished().await;
        match serde_json::to_string_pretty(&card) {
            Ok(json) => println!("{json}"),
            Err(error) => tracing::warn!(%error, "could not encode the scorecard"),
        }
    });
    server.run_shared(sim).await
}
