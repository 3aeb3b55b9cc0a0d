//! `--protocol collab`.

use std::time::Duration;

use switchboard_collab::{Collab, Config};

use crate::CliError;
use crate::runtime::{Server, parse_duration};

/// collab options. The WebSocket frame limit defaults to what a full-text change of a maximal
/// document needs (6 × `--collab-max-document-bytes` + 64 KiB); `--max-frame-bytes` overrides it.
#[derive(Debug, Clone, clap::Args)]
// A distinct group id: clap names a flattened group after the struct, and `Args` is taken.
#[group(id = "collab_args")]
#[command(next_help_heading = "collab")]
pub(crate) struct Args {
    /// Largest document in UTF-8 bytes; edits that would exceed it are refused.
    #[arg(
        long,
        env = "SWITCHBOARD_COLLAB_MAX_DOCUMENT_BYTES",
        default_value_t = 1024 * 1024
    )]
    collab_max_document_bytes: usize,
    /// Distinct users per session; a further user's join-session is refused.
    #[arg(
        long,
        env = "SWITCHBOARD_COLLAB_MAX_PARTICIPANTS",
        default_value_t = 50
    )]
    collab_max_participants: usize,
    /// Sessions in total; more (REST or first connect) get HTTP 503.
    #[arg(
        long,
        env = "SWITCHBOARD_COLLAB_MAX_SESSIONS",
        default_value_t = 10_000
    )]
    collab_max_sessions: usize,
    /// Live sessions one client (IPv4 address or IPv6 /64) may have created; more get HTTP 429
    /// (0: unlimited).
    #[arg(
        long,
        env = "SWITCHBOARD_COLLAB_MAX_SESSIONS_PER_CLIENT",
        default_value_t = 100
    )]
    collab_max_sessions_per_client: usize,
    /// Sessions one client may create at once (token bucket burst; 0 disables the rate limit).
    #[arg(
        long,
        env = "SWITCHBOARD_COLLAB_SESSION_CREATE_BURST",
        default_value_t = 20
    )]
    collab_session_create_burst: u32,
    /// Session creations a client regains per second.
    #[arg(
        long,
        env = "SWITCHBOARD_COLLAB_SESSION_CREATE_PER_SECOND",
        default_value_t = 1
    )]
    collab_session_create_per_second: u32,
    /// A session someone joined is removed after having no open socket for this long, e.g. 1h.
    #[arg(long, env = "SWITCHBOARD_COLLAB_IDLE_TTL", default_value = "1h", value_parser = parse_duration)]
    collab_idle_ttl: Duration,
    /// A session nobody ever joined is removed after having no open socket for this long.
    #[arg(long, env = "SWITCHBOARD_COLLAB_UNJOINED_TTL", default_value = "5m", value_parser = parse_duration)]
    collab_unjoined_ttl: Duration,
    /// Recent operations kept per session to transform late edits; older bases must resync.
    #[arg(long, env = "SWITCHBOARD_COLLAB_MAX_OP_LOG", default_value_t = 1000)]
    collab_max_op_log: usize,
    /// Bytes of the per-session operation log; an operation heavier than this is refused.
    #[arg(
        long,
        env = "SWITCHBOARD_COLLAB_MAX_OP_LOG_BYTES",
        default_value_t = 2 * 1024 * 1024
    )]
    collab_max_op_log_bytes: usize,
    /// Frames that fan out (code-change, cursor-move, language-change, execute-code,
    /// execution-result) one connection may send at once (0: unlimited).
    #[arg(long, env = "SWITCHBOARD_COLLAB_RELAY_BURST", default_value_t = 100)]
    collab_relay_burst: u32,
    /// Such frames a connection regains per second.
    #[arg(
        long,
        env = "SWITCHBOARD_COLLAB_RELAY_PER_SECOND",
        default_value_t = 50
    )]
    collab_relay_per_second: u32,
    /// Bytes of session state the sessions created by one client (IPv4 address or IPv6 /64) may
    /// hold together, a share of --max-state-bytes; over it that client's new sessions get 429
    /// and its sessions cannot grow (0: no share).
    #[arg(
        long,
        env = "SWITCHBOARD_COLLAB_MAX_STATE_BYTES_PER_CLIENT",
        default_value_t = 32 * 1024 * 1024
    )]
    collab_max_state_bytes_per_client: usize,
    /// Language of a session created without one.
    #[arg(
        long,
        env = "SWITCHBOARD_COLLAB_DEFAULT_LANGUAGE",
        default_value = "javascript"
    )]
    collab_default_language: String,
}

pub(crate) async fn serve(args: &Args, server: Server) -> Result<(), CliError> {
    let config = Config {
        max_document_bytes: args.collab_max_document_bytes,
        max_participants: args.collab_max_participants,
        max_sessions: args.collab_max_sessions,
        max_sessions_per_client: args.collab_max_sessions_per_client,
        session_create_burst: args.collab_session_create_burst,
        session_create_per_second: args.collab_session_create_per_second,
        idle_ttl: args.collab_idle_ttl,
        unjoined_ttl: args.collab_unjoined_ttl,
        max_op_log: args.collab_max_op_log,
        max_op_log_bytes: args.collab_max_op_log_bytes,
        relay_burst: args.collab_relay_burst,
        relay_per_second: args.collab_relay_per_second,
        max_state_bytes: server.max_state_bytes,
        max_state_bytes_per_client: args.collab_max_state_bytes_per_client,
        default_language: args.collab_default_language.clone(),
    };
    server.run(Collab::new(config)).await
}
