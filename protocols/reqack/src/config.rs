//! Limits and timings of the reqack protocol, each with its default and its policy when reached.

use std::time::Duration;

/// How a [`crate::ReqAck`] server behaves. Every table it keeps is bounded here.
///
/// | field | default | when reached |
/// |---|---|---|
/// | `redelivery_timeout` | 10 s | an event unacked this long on a live socket is sent again |
/// | `outbox_limit` | 1,000 events per user | the request that would add an event fails with `OUTBOX_FULL` |
/// | `max_pending_events` | 100,000 events in all outboxes | same, `OUTBOX_FULL` |
/// | `max_users` | 100,000 | idle users (offline, empty outbox) are forgotten; if none, `LIMIT_REACHED` / HTTP 503 |
/// | `max_sockets_per_user` | 16 | further upgrades for that user get HTTP 503 |
/// | `max_messages` | 50,000 | the oldest stored message is forgotten |
/// | `max_open_calls` | 10,000 | the oldest open call is forgotten |
/// | `max_call_participants` | 32 | `newCall` fails with `BAD_REQUEST` |
/// | `idempotency_cache` | 50,000 responses | the oldest cached response is forgotten |
/// | `max_message_bytes` | 4,096 | the request fails with `BAD_REQUEST` |
/// | `max_id_bytes` | 128 | user ids, request ids, `clientMessageId`s longer than this are refused |
/// | `history_page_limit` | 200 (default page 50) | `history` pages are clamped |
/// | `rate_limit` / `rate_window` | 100 per 10 s per user | `RATE_LIMITED`; 0 disables |
/// | `max_state_bytes` | 256 MiB | everything stored is charged to one budget; new work that does not fit is refused |
/// | `outbox_limit_bytes` | 1 MiB per user | `OUTBOX_FULL` |
/// | `max_pending_bytes` | 64 MiB in all outboxes | `OUTBOX_FULL` |
/// | `unclaimed_outbox_limit` / `_bytes` | 100 events / 64 KiB for a user that never connected | `OUTBOX_FULL` |
/// | `unclaimed_ttl` | 1 h | events for a user that never connected are dropped after this |
/// | `max_unclaimed_users_per_client` | 1,000 | `LIMIT_REACHED` |
/// | `max_pending_per_client` / `_bytes` | 10,000 events / 8 MiB sent by one client and unacked | `OUTBOX_FULL` |
/// | `client_rate_limit` | 1,000 per 10 s per client key | `RATE_LIMITED`; 0 disables |
/// | `connect_rate_limit` | 60 per 10 s per client key | HTTP 429; 0 disables |
/// | `max_clients` | 100,000 client keys in the rate table | refilled keys are forgotten; if none, new clients are refused |
/// | `max_presence_fanout` | 10,000 | presence goes to at most this many users; the roster lists at most this many |
/// | `max_message_store_bytes` | 64 MiB | the oldest stored message is forgotten |
/// | `max_open_calls_bytes` | 16 MiB | the oldest open call is forgotten |
/// | `idempotency_cache_bytes` | 16 MiB | the oldest cached response is forgotten |
/// | `idempotency_cache_per_client` / `_bytes_per_client` | 5,000 / 2 MiB | the client's own oldest cached response is forgotten |
/// | `max_messages_per_client` / `max_message_store_bytes_per_client` | 10,000 / 16 MiB | the client's own oldest stored message is forgotten |
/// | `max_open_calls_per_client` / `max_open_calls_bytes_per_client` | 1,000 / 4 MiB | the client's own oldest open call is forgotten |
///
/// With the `cli` feature this is also the `clap::Args` of `switchboard serve --protocol
/// reqack`: each field's doc is its flag's help and [`Config::default`] its default.
/// `--redelivery-timeout` was renamed `--reqack-redelivery-timeout`; the old name stays as a
/// hidden alias and the environment twin keeps its name (`SWITCHBOARD_REDELIVERY_TIMEOUT`).
///
/// A *client* is a [`switchboard_core::ClientKey`]: the IPv4 address (or IPv6 /64) the socket
/// comes from, never a `userId`, which clients pick freely.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[cfg_attr(feature = "cli", group(id = "reqack"))]
#[cfg_attr(feature = "cli", command(next_help_heading = "reqack"))]
pub struct Config {
    /// An event not acknowledged this long after it was (re)sent to a live socket is sent again,
    /// e.g. 10s.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-redelivery-timeout", long, alias = "redelivery-timeout",
        env = "SWITCHBOARD_REDELIVERY_TIMEOUT", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value = switchboard_core::duration::format(Config::default().redelivery_timeout),
    ))]
    pub redelivery_timeout: Duration,
    /// Unacknowledged events one user may have waiting. A request that would add one more event
    /// to a full outbox fails with `OUTBOX_FULL`; nothing is dropped.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-outbox-limit", long,
        env = "SWITCHBOARD_REQACK_OUTBOX_LIMIT", value_name = "N",
        default_value_t = Config::default().outbox_limit,
    ))]
    pub outbox_limit: usize,
    /// Unacknowledged events across every outbox (bounds memory when many users are offline).
    /// Reaching it fails requests with `OUTBOX_FULL` like a full outbox.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-pending", long,
        env = "SWITCHBOARD_REQACK_MAX_PENDING", value_name = "N",
        default_value_t = Config::default().max_pending_events,
    ))]
    pub max_pending_events: usize,
    /// Users tracked (a user is an event counter, an outbox and open sockets). When full, users
    /// that are offline with an empty outbox are forgotten (their counter is kept monotonic by a
    /// server-wide floor); if none can be forgotten the request fails with `LIMIT_REACHED` and an
    /// upgrade gets HTTP 503.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-users", long,
        env = "SWITCHBOARD_REQACK_MAX_USERS", value_name = "N",
        default_value_t = Config::default().max_users,
    ))]
    pub max_users: usize,
    /// Open sockets per user; more upgrades for the same user get HTTP 503.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-sockets-per-user", long,
        env = "SWITCHBOARD_REQACK_MAX_SOCKETS_PER_USER", value_name = "N",
        default_value_t = Config::default().max_sockets_per_user,
    ))]
    pub max_sockets_per_user: usize,
    /// Stored messages (for edits, deletes, receipts and `history`). When full the oldest is
    /// forgotten: `history` no longer returns it and requests naming it get `NOT_FOUND`. Events
    /// already queued for it are still delivered.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-messages", long,
        env = "SWITCHBOARD_REQACK_MAX_MESSAGES", value_name = "N",
        default_value_t = Config::default().max_messages,
    ))]
    pub max_messages: usize,
    /// Calls opened by `newCall` and not closed yet. When full the oldest open call is forgotten
    /// (closing it later gets `NOT_FOUND`).
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-open-calls", long,
        env = "SWITCHBOARD_REQACK_MAX_OPEN_CALLS", value_name = "N",
        default_value_t = Config::default().max_open_calls,
    ))]
    pub max_open_calls: usize,
    /// Participants in one `newCall` (the caller not counted).
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-call-participants", long,
        env = "SWITCHBOARD_REQACK_MAX_CALL_PARTICIPANTS", value_name = "N",
        default_value_t = Config::default().max_call_participants,
    ))]
    pub max_call_participants: usize,
    /// Successful responses remembered for idempotent retries, keyed by (user, request id). When
    /// full the oldest is forgotten; a retry after that runs the request again.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-idempotency-cache", long,
        env = "SWITCHBOARD_REQACK_IDEMPOTENCY_CACHE", value_name = "N",
        default_value_t = Config::default().idempotency_cache,
    ))]
    pub idempotency_cache: usize,
    /// Largest `message` text, in bytes.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-message-bytes", long,
        env = "SWITCHBOARD_REQACK_MAX_MESSAGE_BYTES", value_name = "BYTES",
        default_value_t = Config::default().max_message_bytes,
    ))]
    pub max_message_bytes: usize,
    /// Largest user id, request id, call id or `clientMessageId`, in bytes.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-id-bytes", long,
        env = "SWITCHBOARD_REQACK_MAX_ID_BYTES", value_name = "BYTES",
        default_value_t = Config::default().max_id_bytes,
    ))]
    pub max_id_bytes: usize,
    /// `history` page size when the request gives no `limit`.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-history-default-limit", long,
        env = "SWITCHBOARD_REQACK_HISTORY_DEFAULT_LIMIT", value_name = "N",
        default_value_t = Config::default().history_default_limit,
    ))]
    pub history_default_limit: usize,
    /// Largest `history` page; larger `limit`s are clamped to it.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-history-page-limit", long,
        env = "SWITCHBOARD_REQACK_HISTORY_PAGE_LIMIT", value_name = "N",
        default_value_t = Config::default().history_page_limit,
    ))]
    pub history_page_limit: usize,
    /// Requests and client events per user per `rate_window`; 0 disables rate limiting. Acks are
    /// never limited, nor are retries answered from the idempotency cache.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-rate-limit", long,
        env = "SWITCHBOARD_REQACK_RATE_LIMIT", value_name = "N",
        default_value_t = Config::default().rate_limit,
    ))]
    pub rate_limit: usize,
    /// The window of the rate limit, the client rate limit and the connect rate limit, e.g. 10s:
    /// each is a token bucket of that many tokens refilled evenly over this window.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-rate-window", long,
        env = "SWITCHBOARD_REQACK_RATE_WINDOW", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value = switchboard_core::duration::format(Config::default().rate_window),
    ))]
    pub rate_window: Duration,
    /// Bytes of protocol state (users, outboxes, messages, calls, cached responses, rate buckets)
    /// charged to one [`switchboard_core::MemoryBudget`]. New work that does not fit is refused
    /// (`LIMIT_REACHED`, or HTTP 503 at upgrade); nothing stored is evicted for it. The binary sets
    /// it from the runtime's `--max-state-bytes`.
    #[cfg_attr(feature = "cli", arg(skip = Config::default().max_state_bytes))]
    pub max_state_bytes: usize,
    /// Bytes of unacknowledged event frames one user may have waiting (`OUTBOX_FULL` beyond).
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-outbox-limit-bytes", long,
        env = "SWITCHBOARD_REQACK_OUTBOX_LIMIT_BYTES", value_name = "BYTES",
        default_value_t = Config::default().outbox_limit_bytes,
    ))]
    pub outbox_limit_bytes: usize,
    /// Bytes of unacknowledged event frames across every outbox (`OUTBOX_FULL` beyond).
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-pending-bytes", long,
        env = "SWITCHBOARD_REQACK_MAX_PENDING_BYTES", value_name = "BYTES",
        default_value_t = Config::default().max_pending_bytes,
    ))]
    pub max_pending_bytes: usize,
    /// Events a user that never connected may have waiting (`OUTBOX_FULL` beyond): anybody can
    /// write to any `userId`, so outboxes nobody claimed stay small.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-unclaimed-outbox-limit", long,
        env = "SWITCHBOARD_REQACK_UNCLAIMED_OUTBOX_LIMIT", value_name = "N",
        default_value_t = Config::default().unclaimed_outbox_limit,
    ))]
    pub unclaimed_outbox_limit: usize,
    /// Bytes of event frames a user that never connected may have waiting.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-unclaimed-outbox-bytes", long,
        env = "SWITCHBOARD_REQACK_UNCLAIMED_OUTBOX_BYTES", value_name = "BYTES",
        default_value_t = Config::default().unclaimed_outbox_bytes,
    ))]
    pub unclaimed_outbox_bytes: usize,
    /// An event waiting for a user that never connected is dropped this long after it was created,
    /// e.g. 1h; a user left with nothing is forgotten. Once the user connects, its events are kept
    /// until acked like everybody's.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-unclaimed-ttl", long,
        env = "SWITCHBOARD_REQACK_UNCLAIMED_TTL", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value = switchboard_core::duration::format(Config::default().unclaimed_ttl),
    ))]
    pub unclaimed_ttl: Duration,
    /// Users that never connected which one client (the sender's client key) may have created by
    /// writing to them; more fail with `LIMIT_REACHED`.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-unclaimed-users-per-client", long,
        env = "SWITCHBOARD_REQACK_MAX_UNCLAIMED_USERS_PER_CLIENT", value_name = "N",
        default_value_t = Config::default().max_unclaimed_users_per_client,
    ))]
    pub max_unclaimed_users_per_client: usize,
    /// Unacknowledged events one client (the sender's client key) may have caused across every
    /// outbox; more fail with `OUTBOX_FULL`.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-pending-per-client", long,
        env = "SWITCHBOARD_REQACK_MAX_PENDING_PER_CLIENT", value_name = "N",
        default_value_t = Config::default().max_pending_per_client,
    ))]
    pub max_pending_per_client: usize,
    /// Bytes of unacknowledged event frames one client may have caused.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-pending-bytes-per-client", long,
        env = "SWITCHBOARD_REQACK_MAX_PENDING_BYTES_PER_CLIENT", value_name = "BYTES",
        default_value_t = Config::default().max_pending_bytes_per_client,
    ))]
    pub max_pending_bytes_per_client: usize,
    /// Requests and client events per client key per `rate_window`, whatever `userId`s the
    /// client uses; 0 disables.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-client-rate-limit", long,
        env = "SWITCHBOARD_REQACK_CLIENT_RATE_LIMIT", value_name = "N",
        default_value_t = Config::default().client_rate_limit,
    ))]
    pub client_rate_limit: usize,
    /// Upgrades (connects, and so identity changes) per client key per `rate_window`; more get
    /// HTTP 429. 0 disables.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-connect-rate-limit", long,
        env = "SWITCHBOARD_REQACK_CONNECT_RATE_LIMIT", value_name = "N",
        default_value_t = Config::default().connect_rate_limit,
    ))]
    pub connect_rate_limit: usize,
    /// Client keys tracked by the rate buckets; when full, keys whose buckets refilled are
    /// forgotten, and if none has, new clients are refused (`RATE_LIMITED`, HTTP 429).
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-clients", long,
        env = "SWITCHBOARD_REQACK_MAX_CLIENTS", value_name = "N",
        default_value_t = Config::default().max_clients,
    ))]
    pub max_clients: usize,
    /// Presence events one connect or disconnect fans out (and roster entries a newcomer gets).
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-presence-fanout", long,
        env = "SWITCHBOARD_REQACK_MAX_PRESENCE_FANOUT", value_name = "N",
        default_value_t = Config::default().max_presence_fanout,
    ))]
    pub max_presence_fanout: usize,
    /// Bytes of stored messages; beyond it the oldest is forgotten, as beyond the message count.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-message-store-bytes", long,
        env = "SWITCHBOARD_REQACK_MAX_MESSAGE_STORE_BYTES", value_name = "BYTES",
        default_value_t = Config::default().max_message_store_bytes,
    ))]
    pub max_message_store_bytes: usize,
    /// Bytes of open calls; beyond it the oldest is forgotten, as beyond the open call count.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-open-calls-bytes", long,
        env = "SWITCHBOARD_REQACK_MAX_OPEN_CALLS_BYTES", value_name = "BYTES",
        default_value_t = Config::default().max_open_calls_bytes,
    ))]
    pub max_open_calls_bytes: usize,
    /// Bytes of remembered responses; beyond it the oldest is forgotten.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-idempotency-cache-bytes", long,
        env = "SWITCHBOARD_REQACK_IDEMPOTENCY_CACHE_BYTES", value_name = "BYTES",
        default_value_t = Config::default().idempotency_cache_bytes,
    ))]
    pub idempotency_cache_bytes: usize,
    /// Responses remembered for one client (by address); beyond it that client's own oldest
    /// response is forgotten, so one client's flood cannot push out everybody else's.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-idempotency-cache-per-client", long,
        env = "SWITCHBOARD_REQACK_IDEMPOTENCY_CACHE_PER_CLIENT", value_name = "N",
        default_value_t = Config::default().idempotency_cache_per_client,
    ))]
    pub idempotency_cache_per_client: usize,
    /// Bytes of responses remembered for one client; beyond it as above.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-idempotency-cache-bytes-per-client", long,
        env = "SWITCHBOARD_REQACK_IDEMPOTENCY_CACHE_BYTES_PER_CLIENT", value_name = "BYTES",
        default_value_t = Config::default().idempotency_cache_bytes_per_client,
    ))]
    pub idempotency_cache_bytes_per_client: usize,
    /// Stored messages sent by one client (by address); beyond it that client's own oldest
    /// message is forgotten, so one client cannot push everybody's history out of the store.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-messages-per-client", long,
        env = "SWITCHBOARD_REQACK_MAX_MESSAGES_PER_CLIENT", value_name = "N",
        default_value_t = Config::default().max_messages_per_client,
    ))]
    pub max_messages_per_client: usize,
    /// Bytes of stored messages sent by one client; beyond it as above.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-message-store-bytes-per-client", long,
        env = "SWITCHBOARD_REQACK_MAX_MESSAGE_STORE_BYTES_PER_CLIENT", value_name = "BYTES",
        default_value_t = Config::default().max_message_store_bytes_per_client,
    ))]
    pub max_message_store_bytes_per_client: usize,
    /// Open calls opened by one client; beyond it that client's own oldest open call is
    /// forgotten.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-open-calls-per-client", long,
        env = "SWITCHBOARD_REQACK_MAX_OPEN_CALLS_PER_CLIENT", value_name = "N",
        default_value_t = Config::default().max_open_calls_per_client,
    ))]
    pub max_open_calls_per_client: usize,
    /// Bytes of open calls opened by one client; beyond it as above.
    #[cfg_attr(feature = "cli", arg(
        id = "reqack-max-open-calls-bytes-per-client", long,
        env = "SWITCHBOARD_REQACK_MAX_OPEN_CALLS_BYTES_PER_CLIENT", value_name = "BYTES",
        default_value_t = Config::default().max_open_calls_bytes_per_client,
    ))]
    pub max_open_calls_bytes_per_client: usize,
}

impl Default for Config {
    /// The defaults, written only here: the `cli` flags take theirs from this.
    fn default() -> Self {
        Self {
            redelivery_timeout: Duration::from_secs(10),
            outbox_limit: 1_000,
            max_pending_events: 100_000,
            max_users: 100_000,
            max_sockets_per_user: 16,
            max_messages: 50_000,
            max_open_calls: 10_000,
            max_call_participants: 32,
            idempotency_cache: 50_000,
            max_message_bytes: 4_096,
            max_id_bytes: 128,
            history_default_limit: 50,
            history_page_limit: 200,
            rate_limit: 100,
            rate_window: Duration::from_secs(10),
            max_state_bytes: 256 * 1024 * 1024,
            outbox_limit_bytes: 1024 * 1024,
            max_pending_bytes: 64 * 1024 * 1024,
            unclaimed_outbox_limit: 100,
            unclaimed_outbox_bytes: 64 * 1024,
            unclaimed_ttl: Duration::from_secs(3600),
            max_unclaimed_users_per_client: 1_000,
            max_pending_per_client: 10_000,
            max_pending_bytes_per_client: 8 * 1024 * 1024,
            client_rate_limit: 1_000,
            connect_rate_limit: 60,
            max_clients: 100_000,
            max_presence_fanout: 10_000,
            max_message_store_bytes: 64 * 1024 * 1024,
            max_open_calls_bytes: 16 * 1024 * 1024,
            idempotency_cache_bytes: 16 * 1024 * 1024,
            idempotency_cache_per_client: 5_000,
            idempotency_cache_bytes_per_client: 2 * 1024 * 1024,
            max_messages_per_client: 10_000,
            max_message_store_bytes_per_client: 16 * 1024 * 1024,
            max_open_calls_per_client: 1_000,
            max_open_calls_bytes_per_client: 4 * 1024 * 1024,
        }
    }
}

impl Config {
    /// How often each connection checks for events to redeliver: a quarter of the redelivery
    /// timeout, between 20 ms and 1 s.
    pub fn tick_interval(&self) -> Duration {
        (self.redelivery_timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(1))
    }

    /// How often expired events of users that never connected are swept: a quarter of
    /// `unclaimed_ttl`, between 10 ms and 1 s.
    pub fn expiry_interval(&self) -> Duration {
        (self.unclaimed_ttl / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_follows_the_redelivery_timeout_within_bounds() {
        let mut config = Config::default();
        assert_eq!(config.tick_interval(), Duration::from_secs(1));
        config.redelivery_timeout = Duration::from_millis(200);
        assert_eq!(config.tick_interval(), Duration::from_millis(50));
        config.redelivery_timeout = Duration::ZERO;
        assert_eq!(config.tick_interval(), Duration::from_millis(20));
    }
}
