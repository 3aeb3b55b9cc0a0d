//! `switchboard serve`: one module per protocol with its flags and how to build it.

mod collab;
mod echo;
mod fastchat;
mod ip_chat;
mod reqack;
mod teambot_sim;

use std::net::SocketAddr;

use clap::ValueEnum;

use crate::CliError;
use crate::runtime::{RuntimeArgs, Server};

/// Protocols the binary can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ProtocolName {
    /// Broadcast chat, users identified by IP.
    IpChat,
    /// Direct one-to-one chat with HELLO identity, presence and delivery acks.
    Fastchat,
    /// Collaborative code editing with operational transformation.
    Collab,
    /// Request/response messaging with acknowledged, redelivered events.
    Reqack,
    /// Simulator of the teambot server: seeded scenario, chaos, healthcheck scorecard.
    TeambotSim,
    /// Diagnostics: echoes every message on /ws unchanged (runtime conformance testing).
    Echo,
}

/// `switchboard serve` flags: the protocol, where to listen, runtime limits, protocol options.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// The protocol to serve.
    #[arg(
        long,
        value_enum,
        env = "SWITCHBOARD_PROTOCOL",
        default_value = "ip-chat"
    )]
    protocol: ProtocolName,
    /// Address to listen on.
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    ip_chat: ip_chat::Args,
    #[command(flatten)]
    fastchat: fastchat::Args,
    #[command(flatten)]
    collab: collab::Args,
    #[command(flatten)]
    reqack: reqack::Args,
    #[command(flatten)]
    teambot_sim: teambot_sim::Args,
}

pub(crate) async fn serve(args: ServeArgs) -> Result<(), CliError> {
    let server = Server {
        listen: args.listen,
        config: args.runtime.config(),
        max_state_bytes: args.runtime.max_state_bytes,
    };
    match args.protocol {
        ProtocolName::IpChat => ip_chat::serve(&args.ip_chat, server).await,
        ProtocolName::Fastchat => fastchat::serve(&args.fastchat, server).await,
        ProtocolName::Collab => collab::serve(&args.collab, server).await,
        ProtocolName::Reqack => reqack::serve(&args.reqack, server).await,
        ProtocolName::TeambotSim => teambot_sim::serve(&args.teambot_sim, server).await,
        ProtocolName::Echo => echo::serve(server).await,
    }
}
