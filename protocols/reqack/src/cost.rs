//! What each node-local entry is charged in bytes, and the rate of the token buckets behind the
//! node-local rate limits.
//!
//! Shared state (outboxes, messages, calls, responses, presence) lives in the state engine,
//! bounded by the engine's own limit. What this node keeps about it (the books of what it
//! queued and stored, for the per-client shares) and its own tables are charged here. The
//! charges are estimates of heap use: the bytes of the strings an entry holds, plus a fixed
//! overhead per entry that covers the map node, the struct and the string headers (rounded up);
//! entries that account for a record in the engine are also charged that record's size, so each
//! pool's bound also bounds what this node can make the engine keep. Every pool is bounded in
//! items and in these bytes, and every charge also goes to the protocol's
//! [`switchboard_core::MemoryBudget`], so `docs/protocols/reqack.md` can state the worst case as a
//! formula of the limits (see [`worst_case_bytes`]).

use std::time::Duration;

use switchboard_core::Rate;

use crate::Config;

/// Fixed overhead of one entry of the node's user table (sockets open here, the cached newest
/// outbox offset, whether the user ever connected) and its map slot.
pub(crate) const USER_OVERHEAD: usize = 320;
/// A user's name is charged three times in the user table (the key, and room for the copies a
/// lookup may make).
pub(crate) const USER_NAME_COPIES: usize = 3;
/// Fixed overhead of one event on the node's books: the B-tree slot, its time, its sender's
/// client key and the per-client counters it may keep alive.
pub(crate) const EVENT_OVERHEAD: usize = 128;
/// Fixed overhead of one stored message: the B-tree slot, the struct, and its id in the
/// conversation index (whose key holds both names once more).
pub(crate) const MESSAGE_OVERHEAD: usize = 256;
/// Fixed overhead of one open call: its map slot, the struct and its place in the opening order.
pub(crate) const CALL_OVERHEAD: usize = 192;
/// Per participant id in an open call (the `String` header).
pub(crate) const STRING_OVERHEAD: usize = 24;
/// Fixed overhead of one remembered response: map slot, FIFO slot, key and frame headers.
pub(crate) const CACHE_OVERHEAD: usize = 160;
/// One client key's rate buckets (requests and connects, two core `TokenBucket`s) and their
/// table slot (57 bytes on 64-bit, checked by a test in `state.rs`).
pub(crate) const RATE_ENTRY: usize = 96;

/// One client's share of a pool, in items and bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Share {
    /// Entries one client may hold.
    pub(crate) items: usize,
    /// Bytes one client may hold.
    pub(crate) bytes: usize,
}

impl Share {
    /// No per-client limit.
    #[cfg(test)]
    pub(crate) const UNLIMITED: Self = Self {
        items: usize::MAX,
        bytes: usize::MAX,
    };
}

/// Bytes charged for a user named `name`.
pub(crate) fn user_bytes(name: &str) -> usize {
    USER_OVERHEAD.saturating_add(name.len().saturating_mul(USER_NAME_COPIES))
}

/// Bytes charged for a pending event to `recipient` whose frame is `frame_len` bytes: the
/// frame (kept in the engine's outbox log), the overhead, and the recipient's name, which the
/// books hold once per recipient and per sending client.
pub(crate) fn event_bytes(frame_len: usize, recipient: &str) -> usize {
    EVENT_OVERHEAD
        .saturating_add(frame_len)
        .saturating_add(recipient.len().saturating_mul(2))
}

/// The worst-case bytes of the whole protocol state under `config`: the sum of every pool's
/// bound, capped by `max_state_bytes` (every charge goes through that budget). This is the
/// formula documented in `docs/protocols/reqack.md` ("Limits and worst-case memory").
pub fn worst_case_bytes(config: &Config) -> usize {
    let id = config.max_id_bytes;
    // The node's user table never holds more than `max_users`, each with a name of at most `id`.
    let users = config
        .max_users
        .saturating_mul(USER_OVERHEAD.saturating_add(id.saturating_mul(USER_NAME_COPIES)));
    // Pending events on the node's books: their charges are bounded by `max_pending_bytes`.
    let pending = config.max_pending_bytes;
    // The node's indexes of stored messages, open calls and remembered responses: each bounded
    // in bytes, overhead included in their charge.
    let stores = config
        .max_message_store_bytes
        .saturating_add(config.max_open_calls_bytes)
        .saturating_add(config.idempotency_cache_bytes);
    // Rate buckets: one entry per client key, at most `max_clients`.
    let rates = config.max_clients.saturating_mul(RATE_ENTRY);
    users
        .saturating_add(pending)
        .saturating_add(stores)
        .saturating_add(rates)
        .min(config.max_state_bytes)
}

/// The rate of a token bucket of `limit` tokens refilled evenly over `window` (core's GCRA
/// [`switchboard_core::TokenBucket`]: one instant per bucket, fractional refill); a `limit` of 0,
/// or a zero `window`, limits nothing.
pub(crate) fn rate(limit: usize, window: Duration) -> Rate {
    // A limit past u32::MAX per window is unlimited in all but name.
    let limit = u32::try_from(limit).unwrap_or(u32::MAX);
    Rate::per_window(limit, window)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use switchboard_core::TokenBucket;

    use super::*;

    #[test]
    fn a_bucket_allows_the_burst_then_refills_over_the_window() {
        let t0 = Instant::now();
        let window = Duration::from_secs(10);
        let five = rate(5, window);
        let mut bucket = TokenBucket::full(t0);
        assert!((0..5).all(|_| bucket.try_take(five, t0)));
        assert!(!bucket.try_take(five, t0));
        assert!(!bucket.is_full(t0));
        // 5 per 10 s: one token every 2 s.
        assert!(bucket.try_take(five, t0 + Duration::from_secs(2)));
        assert!(!bucket.try_take(five, t0 + Duration::from_secs(2)));
        assert!(bucket.is_full(t0 + Duration::from_secs(60)));
        assert!(bucket.try_take(rate(0, window), t0), "0 disables the limit");
        let mut instant = TokenBucket::full(t0);
        assert!(
            (0..100).all(|_| instant.try_take(rate(5, Duration::ZERO), t0)),
            "a zero window refills at once"
        );
    }

    #[test]
    fn the_default_worst_case_is_the_documented_number() {
        // docs/protocols/reqack.md, "Limits and worst-case memory".
        assert_eq!(worst_case_bytes(&Config::default()), 247_772_160);
    }

    #[test]
    fn the_worst_case_is_capped_by_the_state_budget() {
        let config = Config::default();
        assert!(worst_case_bytes(&config) <= config.max_state_bytes);
        let small = Config {
            max_state_bytes: 1_000,
            ..Config::default()
        };
        assert_eq!(worst_case_bytes(&small), 1_000);
    }
}
