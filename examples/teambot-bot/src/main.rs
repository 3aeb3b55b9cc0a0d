//! A small bot built on the teambot library.
//!
//! It keeps every team connected (the library's job), logs each message that gives props, answers
//! messages that start with `ping` with a `message` of its own on the same team socket, and prints
//! a props leaderboard when the run ends (server `goodbye`, or Ctrl-C).
//!
//! ```text
//! switchboard serve --protocol teambot-sim --sim-duration 20s --sim-team-drop-rate 1 &
//! cargo run -p teambot-bot -- ws://127.0.0.1:8000/global
//! ```
//!
//! Over TLS (`switchboard serve ... --tls-cert cert.pem --tls-key key.pem --sim-url-scheme https`),
//! trusting the CA of a self-signed certificate:
//!
//! ```text
//! cargo run -p teambot-bot -- wss://localhost:8443/global --ca-file ca.pem
//! ```
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a terminal program"
)]

use std::process::ExitCode;

use serde_json::json;
use switchboard_teambot::client::tls::ClientTls;
use switchboard_teambot::client::{TeamBot, TeamBotConfig, TeamContext, TeamHandler};
use switchboard_teambot::messages::{TeamId, is_props};
use tracing_subscriber::EnvFilter;

/// Reacts to team traffic. Handler methods run on the team's socket task, so they only log and
/// queue frames; nothing here blocks.
struct PropsBot;

impl TeamHandler for PropsBot {
    fn on_message(&self, team: &TeamContext, text: &str) {
        if is_props(text) {
            // The library has already counted this message.
            let props = team.stats().props_count;
            tracing::info!(team = %team.id(), props, "props: {text}");
        }
        if text.starts_with("ping") {
            let reply = json!({"type": "message", "text": format!("pong! ({text})")});
            if let Err(error) = team.send_json(&reply) {
                tracing::warn!(team = %team.id(), %error, "could not answer");
            }
        }
    }

    fn on_team_connected(&self, team: &TeamContext) {
        tracing::info!(team = %team.id(), "hello, team");
    }

    fn on_team_left(&self, team_id: &TeamId) {
        tracing::info!(team = %team_id, "bye, team");
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // `--ca-file FILE`: trust a self-signed deployment's CA for wss:// (default: system roots).
    let tls = match ClientTls::from_args(&mut args) {
        Ok(tls) => tls,
        Err(error) => {
            eprintln!("teambot-bot: {error}");
            return ExitCode::from(2);
        }
    };
    let url = args
        .into_iter()
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:8000/global".to_owned());
    let mut config = TeamBotConfig::new(url);
    config.tls = tls;
    let bot = TeamBot::new(config, PropsBot);
    let handle = bot.handle();
    let stopper = handle.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stopper.shutdown();
        }
    });
    if let Err(error) = bot.run().await {
        eprintln!("teambot-bot: {error}");
        return ExitCode::FAILURE;
    }
    let mut board = handle.stats();
    board.sort_by_key(|team| std::cmp::Reverse(team.props_count));
    println!("props leaderboard:");
    for team in board {
        println!(
            "  team {:>8}: {:>4} props in {:>5} messages ({} reconnects{})",
            team.id.to_string(),
            team.props_count,
            team.message_count,
            team.connections.saturating_sub(1),
            if team.left { ", left" } else { "" }
        );
    }
    ExitCode::SUCCESS
}
