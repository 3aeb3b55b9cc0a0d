//! A per-client rate limit with constant memory per client.
//!
//! `limit` events per `window` with a burst of `limit` (GCRA: each client keeps one "theoretical
//! arrival time"). Unlike a sliding window of timestamps (16 bytes per event and key), a client
//! costs one table entry whatever the limit, and the table holds at most `max_keys` clients.
//! [`switchboard_core::TokenBuckets`] has the same shape but refills in whole tokens per second,
//! which cannot express the spec's "60 per minute" family for limits under 60.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use switchboard_core::ClientKey;
use switchboard_core::sync::lock;

/// Bytes of one table slot: the entry plus hashbrown's control byte.
pub const SLOT_BYTES: usize = std::mem::size_of::<(ClientKey, Instant)>() + 1;

/// Bytes one tracked client may cost: three slots, because the table keeps 1/8 of its slots
/// free and at most doubles when it grows (so at most 16/7 < 3 slots per client), for tables of
/// at least 4 clients (the smallest table has 4 slots).
pub const BYTES_PER_KEY: usize = 3 * SLOT_BYTES;

/// `limit` events per `window` per [`ClientKey`], at most `max_keys` clients tracked.
#[derive(Debug)]
pub(crate) struct RateLimit {
    /// 0 disables the limit.
    limit: usize,
    /// Time one event "costs": `window / limit`.
    interval: Duration,
    /// How far ahead of now a client's arrival time may run: `window - interval`.
    tolerance: Duration,
    max_keys: usize,
    /// Each client's theoretical arrival time; a client whose time has passed is fully refilled.
    clients: Mutex<HashMap<ClientKey, Instant>>,
}

impl RateLimit {
    pub(crate) fn new(limit: usize, window: Duration, max_keys: usize) -> Self {
        let per = u32::try_from(limit.max(1)).unwrap_or(u32::MAX);
        let interval = window.checked_div(per).unwrap_or(window);
        Self {
            limit,
            interval,
            tolerance: window.saturating_sub(interval),
            max_keys: max_keys.max(1),
            clients: Mutex::default(),
        }
    }

    /// Spends one event of `key` at `now` (an injected clock); `false` means over the limit.
    /// When the table is full, refilled clients are forgotten first; if none is, the new client
    /// is refused (fail closed under a flood of addresses).
    pub(crate) fn check_at(&self, key: ClientKey, now: Instant) -> bool {
        if self.limit == 0 {
            return true;
        }
        let mut clients = lock(&self.clients);
        if !clients.contains_key(&key) && clients.len() >= self.max_keys {
            clients.retain(|_, at| *at > now);
            if clients.len() >= self.max_keys {
                return false;
            }
        }
        let at = clients.get(&key).copied().unwrap_or(now).max(now);
        if at.saturating_duration_since(now) > self.tolerance {
            return false;
        }
        let next = at.checked_add(self.interval).unwrap_or(at);
        clients.insert(key, next);
        true
    }

    /// Clients tracked now.
    pub(crate) fn keys(&self) -> usize {
        lock(&self.clients).len()
    }

    /// Bytes the table holds now: its slots (capacity plus the 1/8 kept free) at
    /// [`SLOT_BYTES`].
    pub(crate) fn bytes(&self) -> usize {
        let capacity = lock(&self.clients).capacity();
        if capacity == 0 {
            return 0;
        }
        capacity
            .saturating_add(capacity / 7)
            .saturating_add(1)
            .saturating_mul(SLOT_BYTES)
    }

    /// The most bytes the table may hold: `max(max_keys, 4)` × [`BYTES_PER_KEY`].
    pub(crate) fn max_bytes(&self) -> usize {
        if self.limit == 0 {
            return 0;
        }
        self.max_keys.max(4).saturating_mul(BYTES_PER_KEY)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn key(n: u8) -> ClientKey {
        ClientKey::from_ip(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)))
    }

    #[test]
    fn a_burst_of_the_limit_then_one_per_interval() {
        let limit = RateLimit::new(60, Duration::from_secs(60), 10);
        let t0 = Instant::now();
        assert!((0..60).all(|_| limit.check_at(key(1), t0)));
        assert!(!limit.check_at(key(1), t0));
        assert!(limit.check_at(key(2), t0));
        assert!(!limit.check_at(key(1), t0 + Duration::from_millis(500)));
        assert!(limit.check_at(key(1), t0 + Duration::from_secs(1)));
        assert!(!limit.check_at(key(1), t0 + Duration::from_secs(1)));
        // A full window later the whole burst is back.
        let later = t0 + Duration::from_secs(62);
        assert!((0..60).all(|_| limit.check_at(key(1), later)));
        assert!(!limit.check_at(key(1), later));
    }

    #[test]
    fn limits_under_one_per_second_work() {
        let limit = RateLimit::new(2, Duration::from_secs(60), 10);
        let t0 = Instant::now();
        assert!(limit.check_at(key(1), t0));
        assert!(limit.check_at(key(1), t0));
        assert!(!limit.check_at(key(1), t0 + Duration::from_secs(29)));
        assert!(limit.check_at(key(1), t0 + Duration::from_secs(30)));
    }

    #[test]
    fn the_table_is_bounded_and_forgets_refilled_clients() {
        let limit = RateLimit::new(1, Duration::from_secs(60), 2);
        let t0 = Instant::now();
        assert!(limit.check_at(key(1), t0));
        assert!(limit.check_at(key(2), t0));
        assert!(!limit.check_at(key(3), t0 + Duration::from_secs(1)));
        assert_eq!(limit.keys(), 2);
        assert!(limit.check_at(key(3), t0 + Duration::from_secs(61)));
        assert!(limit.keys() <= 2);
        assert!(limit.bytes() <= limit.max_bytes());
    }

    #[test]
    fn a_full_table_stays_within_its_byte_bound() {
        for max_keys in [1, 3, 7, 50, 1000] {
            let limit = RateLimit::new(5, Duration::from_secs(60), max_keys);
            let t0 = Instant::now();
            for n in 0..2000u32 {
                let ip = IpAddr::V4(Ipv4Addr::from(0x7f00_0000 + n));
                limit.check_at(ClientKey::from_ip(ip), t0);
            }
            assert_eq!(limit.keys(), max_keys.min(2000));
            assert!(limit.bytes() <= limit.max_bytes(), "{max_keys}");
        }
    }

    #[test]
    fn zero_means_unlimited() {
        let limit = RateLimit::new(0, Duration::from_secs(60), 1);
        let t0 = Instant::now();
        assert!((0..1000).all(|n| limit.check_at(key((n % 200) as u8), t0)));
        assert_eq!(limit.keys(), 0);
    }
}
