//! Per-client token buckets with a per-minute rate.
//!
//! The core's [`switchboard_core::TokenBuckets`] refills a whole number of tokens a second, which
//! cannot say "120 a minute" once the rate is under one a second; these refill `per_minute / 60`
//! a second exactly. Memory is constant per key and the key table is bounded: when it is full,
//! keys whose bucket has refilled completely are forgotten (they carry no information), and if
//! none has, the new key is refused (fail closed under a flood of distinct clients).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use switchboard_core::sync::lock;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets of `per_minute` tokens (the burst), refilled at `per_minute` a minute.
#[derive(Debug)]
pub struct PerMinuteBuckets<K> {
    burst: f64,
    per_second: f64,
    max_keys: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Eq + Hash + Clone> PerMinuteBuckets<K> {
    /// `per_minute` events a minute per key (0: unlimited), at most `max_keys` keys tracked.
    pub fn new(per_minute: u32, max_keys: usize) -> Self {
        Self {
            burst: f64::from(per_minute),
            per_second: f64::from(per_minute) / 60.0,
            max_keys: max_keys.max(1),
            buckets: Mutex::default(),
        }
    }

    /// Spends one token of `key` at `now` (an injected clock); `false` means over the rate.
    pub fn check_at(&self, key: &K, now: Instant) -> bool {
        if self.burst <= 0.0 {
            return true;
        }
        let mut buckets = lock(&self.buckets);
        if !buckets.contains_key(key) && buckets.len() >= self.max_keys {
            let full_after =
                Duration::try_from_secs_f64(self.burst / self.per_second).unwrap_or(Duration::MAX);
            buckets.retain(|_, b| now.saturating_duration_since(b.at) < full_after);
            if buckets.len() >= self.max_keys {
                return false;
            }
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// [`PerMinuteBuckets::check_at`] now.
    pub fn check(&self, key: &K) -> bool {
        self.check_at(key, Instant::now())
    }

    /// Keys tracked now.
    pub fn keys(&self) -> usize {
        lock(&self.buckets).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minutes_worth_at_once_then_the_rate() {
        let buckets = PerMinuteBuckets::new(6, 10);
        let t0 = Instant::now();
        assert!((0..6).all(|_| buckets.check_at(&1, t0)));
        assert!(!buckets.check_at(&1, t0));
        assert!(buckets.check_at(&2, t0), "keys are independent");
        // 6 a minute: one token every 10 s.
        assert!(!buckets.check_at(&1, t0 + Duration::from_secs(9)));
        assert!(buckets.check_at(&1, t0 + Duration::from_secs(19)));
        assert!(!buckets.check_at(&1, t0 + Duration::from_secs(19)));
        assert!(
            PerMinuteBuckets::new(0, 1).check_at(&1, t0),
            "0 is unlimited"
        );
    }

    #[test]
    fn the_key_table_is_bounded_and_forgets_refilled_keys() {
        let buckets = PerMinuteBuckets::new(60, 1);
        let t0 = Instant::now();
        assert!(buckets.check_at(&1, t0));
        assert!(!buckets.check_at(&2, t0), "table full of an active key");
        assert!(buckets.check_at(&2, t0 + Duration::from_secs(61)));
        assert_eq!(buckets.keys(), 1);
    }
}
