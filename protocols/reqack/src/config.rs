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
#[derive(Debug, Clone)]
pub struct Config {
    /// An event not acknowledged this long after it was (re)sent to a live socket is sent again.
    pub redelivery_timeout: Duration,
    /// Unacknowledged events one user may have waiting. A request that would add one more event
    /// to a full outbox fails with `OUTBOX_FULL`; nothing is dropped.
    pub outbox_limit: usize,
    /// Unacknowledged events across every outbox (bounds memory when many users are offline).
    /// Reaching it fails requests with `OUTBOX_FULL` like a full outbox.
    pub max_pending_events: usize,
    /// Users tracked (a user is an event counter, an outbox and open sockets). When full, users
    /// that are offline with an empty outbox are forgotten (their counter is kept monotonic by a
    /// server-wide floor); if none can be forgotten the request fails with `LIMIT_REACHED` and an
    /// upgrade gets HTTP 503.
    pub max_users: usize,
    /// Open sockets per user; more upgrades for the same user get HTTP 503.
    pub max_sockets_per_user: usize,
    /// Stored messages (for edits, deletes, receipts and `history`). When full the oldest is
    /// forgotten: `history` no longer returns it and requests naming it get `NOT_FOUND`. Events
    /// already queued for it are still delivered.
    pub max_messages: usize,
    /// Calls opened by `newCall` and not closed yet. When full the oldest open call is forgotten
    /// (closing it later gets `NOT_FOUND`).
    pub max_open_calls: usize,
    /// Participants in one `newCall` (the caller not counted).
    pub max_call_participants: usize,
    /// Successful responses remembered for idempotent retries, keyed by (user, request id). When
    /// full the oldest is forgotten; a retry after that runs the request again.
    pub idempotency_cache: usize,
    /// Largest `message` text, in bytes.
    pub max_message_bytes: usize,
    /// Largest user id, request id, call id or `clientMessageId`, in bytes.
    pub max_id_bytes: usize,
    /// `history` page size when the request gives no `limit`.
    pub history_default_limit: usize,
    /// Largest `history` page; larger `limit`s are clamped to it.
    pub history_page_limit: usize,
    /// Requests and client events per user per `rate_window`; 0 disables rate limiting. Acks are
    /// never limited, nor are retries answered from the idempotency cache.
    pub rate_limit: usize,
    /// The sliding window of `rate_limit`.
    pub rate_window: Duration,
}

impl Default for Config {
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
        }
    }
}

impl Config {
    /// How often each connection checks for events to redeliver: a quarter of the redelivery
    /// timeout, between 20 ms and 1 s.
    pub fn tick_interval(&self) -> Duration {
        (self.redelivery_timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(1))
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
