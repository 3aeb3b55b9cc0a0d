//! `--protocol reqack`.

use std::time::Duration;

use switchboard_reqack::{Config, ReqAck};

use crate::CliError;
use crate::runtime::{Server, parse_duration};

/// reqack options (every limit is documented in docs/protocols/reqack.md).
#[derive(Debug, Clone, clap::Args)]
// A distinct group id: clap names a flattened group after the struct, and `Args` is taken.
#[group(id = "reqack_args")]
#[command(next_help_heading = "reqack")]
pub(crate) struct Args {
    /// Resend an event unacknowledged this long on a live socket, e.g. 10s.
    #[arg(long, env = "SWITCHBOARD_REDELIVERY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    redelivery_timeout: Duration,
    /// Unacknowledged events per user; a request that would add one more fails with OUTBOX_FULL.
    #[arg(long, env = "SWITCHBOARD_REQACK_OUTBOX_LIMIT", default_value_t = 1_000)]
    reqack_outbox_limit: usize,
    /// Unacknowledged events across all users; more fail with OUTBOX_FULL.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_PENDING",
        default_value_t = 100_000
    )]
    reqack_max_pending: usize,
    /// Users tracked; when full, offline users with empty outboxes are forgotten.
    #[arg(long, env = "SWITCHBOARD_REQACK_MAX_USERS", default_value_t = 100_000)]
    reqack_max_users: usize,
    /// Open sockets per user; more upgrades get HTTP 503.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_SOCKETS_PER_USER",
        default_value_t = 16
    )]
    reqack_max_sockets_per_user: usize,
    /// Stored messages (history, edits, receipts); the oldest is forgotten first.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_MESSAGES",
        default_value_t = 50_000
    )]
    reqack_max_messages: usize,
    /// Open calls; the oldest is forgotten first.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_OPEN_CALLS",
        default_value_t = 10_000
    )]
    reqack_max_open_calls: usize,
    /// Participants per newCall besides the caller.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_CALL_PARTICIPANTS",
        default_value_t = 32
    )]
    reqack_max_call_participants: usize,
    /// Responses remembered for idempotent retries; the oldest is forgotten first.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_IDEMPOTENCY_CACHE",
        default_value_t = 50_000
    )]
    reqack_idempotency_cache: usize,
    /// Largest message text in bytes.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_MESSAGE_BYTES",
        default_value_t = 4_096
    )]
    reqack_max_message_bytes: usize,
    /// Largest user id, request id, call id or clientMessageId in bytes.
    #[arg(long, env = "SWITCHBOARD_REQACK_MAX_ID_BYTES", default_value_t = 128)]
    reqack_max_id_bytes: usize,
    /// history page size when the request gives no limit.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_HISTORY_DEFAULT_LIMIT",
        default_value_t = 50
    )]
    reqack_history_default_limit: usize,
    /// Largest history page; larger limits are clamped.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_HISTORY_PAGE_LIMIT",
        default_value_t = 200
    )]
    reqack_history_page_limit: usize,
    /// Requests and client events per user per rate window (0: unlimited).
    #[arg(long, env = "SWITCHBOARD_REQACK_RATE_LIMIT", default_value_t = 100)]
    reqack_rate_limit: usize,
    /// The rate-limit window, e.g. 10s: each limit is a bucket refilled evenly over it.
    #[arg(long, env = "SWITCHBOARD_REQACK_RATE_WINDOW", default_value = "10s", value_parser = parse_duration)]
    reqack_rate_window: Duration,
    /// Bytes of unacknowledged event frames per user; more fail with OUTBOX_FULL.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_OUTBOX_LIMIT_BYTES",
        default_value_t = 1024 * 1024
    )]
    reqack_outbox_limit_bytes: usize,
    /// Bytes of unacknowledged event frames across all users; more fail with OUTBOX_FULL.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_PENDING_BYTES",
        default_value_t = 64 * 1024 * 1024
    )]
    reqack_max_pending_bytes: usize,
    /// Events waiting for a user that never connected; more fail with OUTBOX_FULL.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_UNCLAIMED_OUTBOX_LIMIT",
        default_value_t = 100
    )]
    reqack_unclaimed_outbox_limit: usize,
    /// Bytes of events waiting for a user that never connected; more fail with OUTBOX_FULL.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_UNCLAIMED_OUTBOX_BYTES",
        default_value_t = 64 * 1024
    )]
    reqack_unclaimed_outbox_bytes: usize,
    /// Events for a user that never connected are dropped after this long, e.g. 1h.
    #[arg(long, env = "SWITCHBOARD_REQACK_UNCLAIMED_TTL", default_value = "1h", value_parser = parse_duration)]
    reqack_unclaimed_ttl: Duration,
    /// Never-connected users one client address may create by writing to them (LIMIT_REACHED).
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_UNCLAIMED_USERS_PER_CLIENT",
        default_value_t = 1_000
    )]
    reqack_max_unclaimed_users_per_client: usize,
    /// Unacknowledged events one client address may have caused (OUTBOX_FULL).
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_PENDING_PER_CLIENT",
        default_value_t = 10_000
    )]
    reqack_max_pending_per_client: usize,
    /// Bytes of unacknowledged events one client address may have caused (OUTBOX_FULL).
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_PENDING_BYTES_PER_CLIENT",
        default_value_t = 8 * 1024 * 1024
    )]
    reqack_max_pending_bytes_per_client: usize,
    /// Requests and client events per client address per rate window, whatever the userId
    /// (0: unlimited).
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_CLIENT_RATE_LIMIT",
        default_value_t = 1_000
    )]
    reqack_client_rate_limit: usize,
    /// Upgrades (identity changes) per client address per rate window; more get HTTP 429
    /// (0: unlimited).
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_CONNECT_RATE_LIMIT",
        default_value_t = 60
    )]
    reqack_connect_rate_limit: usize,
    /// Client addresses tracked by the rate limits.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_CLIENTS",
        default_value_t = 100_000
    )]
    reqack_max_clients: usize,
    /// Users told about one connect or disconnect (and roster entries a newcomer gets).
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_PRESENCE_FANOUT",
        default_value_t = 10_000
    )]
    reqack_max_presence_fanout: usize,
    /// Bytes of stored messages; the oldest is forgotten first.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_MESSAGE_STORE_BYTES",
        default_value_t = 64 * 1024 * 1024
    )]
    reqack_max_message_store_bytes: usize,
    /// Bytes of open calls; the oldest is forgotten first.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_OPEN_CALLS_BYTES",
        default_value_t = 16 * 1024 * 1024
    )]
    reqack_max_open_calls_bytes: usize,
    /// Bytes of responses remembered for idempotent retries; the oldest is forgotten first.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_IDEMPOTENCY_CACHE_BYTES",
        default_value_t = 16 * 1024 * 1024
    )]
    reqack_idempotency_cache_bytes: usize,
    /// Responses remembered for one client address; beyond it its own oldest is forgotten.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_IDEMPOTENCY_CACHE_PER_CLIENT",
        default_value_t = 5_000
    )]
    reqack_idempotency_cache_per_client: usize,
    /// Bytes of responses remembered for one client address.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_IDEMPOTENCY_CACHE_BYTES_PER_CLIENT",
        default_value_t = 2 * 1024 * 1024
    )]
    reqack_idempotency_cache_bytes_per_client: usize,
    /// Stored messages sent from one client address; beyond it its own oldest is forgotten.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_MESSAGES_PER_CLIENT",
        default_value_t = 10_000
    )]
    reqack_max_messages_per_client: usize,
    /// Bytes of stored messages sent from one client address.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_MESSAGE_STORE_BYTES_PER_CLIENT",
        default_value_t = 16 * 1024 * 1024
    )]
    reqack_max_message_store_bytes_per_client: usize,
    /// Open calls opened from one client address; beyond it its own oldest is forgotten.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_OPEN_CALLS_PER_CLIENT",
        default_value_t = 1_000
    )]
    reqack_max_open_calls_per_client: usize,
    /// Bytes of open calls opened from one client address.
    #[arg(
        long,
        env = "SWITCHBOARD_REQACK_MAX_OPEN_CALLS_BYTES_PER_CLIENT",
        default_value_t = 4 * 1024 * 1024
    )]
    reqack_max_open_calls_bytes_per_client: usize,
}

impl Args {
    fn config(&self, max_state_bytes: usize) -> Config {
        Config {
            redelivery_timeout: self.redelivery_timeout,
            outbox_limit: self.reqack_outbox_limit,
            max_pending_events: self.reqack_max_pending,
            max_users: self.reqack_max_users,
            max_sockets_per_user: self.reqack_max_sockets_per_user,
            max_messages: self.reqack_max_messages,
            max_open_calls: self.reqack_max_open_calls,
            max_call_participants: self.reqack_max_call_participants,
            idempotency_cache: self.reqack_idempotency_cache,
            max_message_bytes: self.reqack_max_message_bytes,
            max_id_bytes: self.reqack_max_id_bytes,
            history_default_limit: self.reqack_history_default_limit,
            history_page_limit: self.reqack_history_page_limit,
            rate_limit: self.reqack_rate_limit,
            rate_window: self.reqack_rate_window,
            max_state_bytes,
            outbox_limit_bytes: self.reqack_outbox_limit_bytes,
            max_pending_bytes: self.reqack_max_pending_bytes,
            unclaimed_outbox_limit: self.reqack_unclaimed_outbox_limit,
            unclaimed_outbox_bytes: self.reqack_unclaimed_outbox_bytes,
            unclaimed_ttl: self.reqack_unclaimed_ttl,
            max_unclaimed_users_per_client: self.reqack_max_unclaimed_users_per_client,
            max_pending_per_client: self.reqack_max_pending_per_client,
            max_pending_bytes_per_client: self.reqack_max_pending_bytes_per_client,
            client_rate_limit: self.reqack_client_rate_limit,
            connect_rate_limit: self.reqack_connect_rate_limit,
            max_clients: self.reqack_max_clients,
            max_presence_fanout: self.reqack_max_presence_fanout,
            max_message_store_bytes: self.reqack_max_message_store_bytes,
            max_open_calls_bytes: self.reqack_max_open_calls_bytes,
            idempotency_cache_bytes: self.reqack_idempotency_cache_bytes,
            idempotency_cache_per_client: self.reqack_idempotency_cache_per_client,
            idempotency_cache_bytes_per_client: self.reqack_idempotency_cache_bytes_per_client,
            max_messages_per_client: self.reqack_max_messages_per_client,
            max_message_store_bytes_per_client: self.reqack_max_message_store_bytes_per_client,
            max_open_calls_per_client: self.reqack_max_open_calls_per_client,
            max_open_calls_bytes_per_client: self.reqack_max_open_calls_bytes_per_client,
        }
    }
}

pub(crate) async fn serve(args: &Args, server: Server) -> Result<(), CliError> {
    let protocol = ReqAck::new(args.config(server.max_state_bytes));
    server.run(protocol).await
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
        assert_eq!(config.redelivery_timeout, defaults.redelivery_timeout);
        assert_eq!(config.outbox_limit, defaults.outbox_limit);
        assert_eq!(config.max_pending_events, defaults.max_pending_events);
        assert_eq!(config.max_users, defaults.max_users);
        assert_eq!(config.max_sockets_per_user, defaults.max_sockets_per_user);
        assert_eq!(config.max_messages, defaults.max_messages);
        assert_eq!(config.max_open_calls, defaults.max_open_calls);
        assert_eq!(config.max_call_participants, defaults.max_call_participants);
        assert_eq!(config.idempotency_cache, defaults.idempotency_cache);
        assert_eq!(config.max_message_bytes, defaults.max_message_bytes);
        assert_eq!(config.max_id_bytes, defaults.max_id_bytes);
        assert_eq!(config.history_default_limit, defaults.history_default_limit);
        assert_eq!(config.history_page_limit, defaults.history_page_limit);
        assert_eq!(config.rate_limit, defaults.rate_limit);
        assert_eq!(config.rate_window, defaults.rate_window);
        assert_eq!(config.max_state_bytes, defaults.max_state_bytes);
        assert_eq!(config.outbox_limit_bytes, defaults.outbox_limit_bytes);
        assert_eq!(config.max_pending_bytes, defaults.max_pending_bytes);
        assert_eq!(
            config.unclaimed_outbox_limit,
            defaults.unclaimed_outbox_limit
        );
        assert_eq!(
            config.unclaimed_outbox_bytes,
            defaults.unclaimed_outbox_bytes
        );
        assert_eq!(config.unclaimed_ttl, defaults.unclaimed_ttl);
        assert_eq!(
            config.max_unclaimed_users_per_client,
            defaults.max_unclaimed_users_per_client
        );
        assert_eq!(
            config.max_pending_per_client,
            defaults.max_pending_per_client
        );
        assert_eq!(
            config.max_pending_bytes_per_client,
            defaults.max_pending_bytes_per_client
        );
        assert_eq!(config.client_rate_limit, defaults.client_rate_limit);
        assert_eq!(config.connect_rate_limit, defaults.connect_rate_limit);
        assert_eq!(config.max_clients, defaults.max_clients);
        assert_eq!(config.max_presence_fanout, defaults.max_presence_fanout);
        assert_eq!(
            config.max_message_store_bytes,
            defaults.max_message_store_bytes
        );
        assert_eq!(config.max_open_calls_bytes, defaults.max_open_calls_bytes);
        assert_eq!(
            config.idempotency_cache_bytes,
            defaults.idempotency_cache_bytes
        );
        assert_eq!(
            config.idempotency_cache_per_client,
            defaults.idempotency_cache_per_client
        );
        assert_eq!(
            config.idempotency_cache_bytes_per_client,
            defaults.idempotency_cache_bytes_per_client
        );
        assert_eq!(
            config.max_messages_per_client,
            defaults.max_messages_per_client
        );
        assert_eq!(
            config.max_message_store_bytes_per_client,
            defaults.max_message_store_bytes_per_client
        );
        assert_eq!(
            config.max_open_calls_per_client,
            defaults.max_open_calls_per_client
        );
        assert_eq!(
            config.max_open_calls_bytes_per_client,
            defaults.max_open_calls_bytes_per_client
        );
    }

    #[test]
    fn flags_set_the_config() {
        let cli = Cli::try_parse_from([
            "test",
            "--redelivery-timeout",
            "250ms",
            "--reqack-outbox-limit",
            "7",
            "--reqack-unclaimed-ttl",
            "5m",
            "--reqack-connect-rate-limit",
            "3",
        ])
        .unwrap();
        let config = cli.args.config(1234);
        assert_eq!(config.redelivery_timeout, Duration::from_millis(250));
        assert_eq!(config.outbox_limit, 7);
        assert_eq!(config.unclaimed_ttl, Duration::from_secs(300));
        assert_eq!(config.connect_rate_limit, 3);
        assert_eq!(config.max_state_bytes, 1234);
    }
}
