//! Per-key sliding-window rate limiting.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;

/// Allows at most `limit` events per key in any sliding `window`.
///
/// Memory is bounded: each key keeps at most `limit` timestamps, and at most `max_keys` keys are
/// tracked. When the key table is full, keys idle for a whole window are forgotten; if it is still
/// full the new key is refused (fail closed), which only happens under a flood of distinct keys.
#[derive(Debug)]
pub struct RateLimiter {
    limit: usize,
    window: Duration,
    max_keys: usize,
    hits: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl RateLimiter {
    /// Default bound on tracked keys.
    pub const DEFAULT_MAX_KEYS: usize = 100_000;

    /// `limit` events per `window` and key; a `limit` of 0 disables limiting.
    pub fn new(limit: usize, window: Duration) -> Self {
        Self {
            limit,
            window,
            max_keys: Self::DEFAULT_MAX_KEYS,
            hits: Mutex::default(),
        }
    }

    /// Changes the bound on tracked keys.
    #[must_use]
    pub fn with_max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys.max(1);
        self
    }

    /// The configured limit per window (0: unlimited).
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Records an event for `key` now if allowed; `false` means the limit is reached.
    pub fn check(&self, key: &str) -> bool {
        self.check_at(key, Instant::now())
    }

    /// [`RateLimiter::check`] at a given instant (for tests and simulations).
    pub fn check_at(&self, key: &str, now: Instant) -> bool {
        if self.limit == 0 {
            return true;
        }
        let mut hits = lock(&self.hits);
        if !hits.contains_key(key) && hits.len() >= self.max_keys {
            let window = self.window;
            hits.retain(|_, times| {
                times
                    .back()
                    .is_some_and(|t| now.duration_since(*t) < window)
            });
            if hits.len() >= self.max_keys {
                return false;
            }
        }
        let times = hits.entry(key.to_owned()).or_default();
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            times.pop_front();
        }
        if times.len() >= self.limit {
            return false;
        }
        times.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_slides() {
        let limiter = RateLimiter::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(limiter.check_at("a", t0));
        assert!(limiter.check_at("a", t0 + Duration::from_secs(30)));
        assert!(!limiter.check_at("a", t0 + Duration::from_secs(59)));
        assert!(limiter.check_at("b", t0 + Duration::from_secs(59)));
        assert!(limiter.check_at("a", t0 + Duration::from_secs(60)));
        assert!(!limiter.check_at("a", t0 + Duration::from_secs(61)));
    }

    #[test]
    fn zero_means_unlimited() {
        let limiter = RateLimiter::new(0, Duration::from_secs(60));
        assert!((0..1000).all(|_| limiter.check("a")));
    }

    #[test]
    fn the_key_table_is_bounded() {
        let limiter = RateLimiter::new(1, Duration::from_secs(60)).with_max_keys(2);
        let t0 = Instant::now();
        assert!(limiter.check_at("a", t0));
        assert!(limiter.check_at("b", t0));
        assert!(!limiter.check_at("c", t0 + Duration::from_secs(1)));
        assert!(limiter.check_at("c", t0 + Duration::from_secs(61)));
    }
}
