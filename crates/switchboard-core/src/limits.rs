//! Shared bounds: a byte budget for protocol state, the client key every per-client share is
//! counted under, per-key shares of a pool, and a per-key token bucket.
//!
//! "Bounded" in Switchboard means bounded in bytes as well as items, with a per-client share of
//! every pool that one client could otherwise exhaust. These are the building blocks: protocols
//! charge what they store to a [`MemoryBudget`], count what each client holds with [`Shares`]
//! under a [`ClientKey`] (an IP, never a name the client picks), and rate-limit with
//! [`TokenBuckets`], whose memory is constant per key.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sync::lock;

/// A server-wide (or pool-wide) limit on bytes held, shared by everything that charges it.
///
/// Callers charge an estimate of what they store ([`MemoryBudget::try_reserve`]) before storing
/// it and give it back ([`MemoryBudget::release`]) when they drop it. A refused reservation is the
/// signal to reject the new work with the protocol's own error; existing state is never evicted
/// to make room, so no client loses what it already has.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
}

/// A reservation did not fit in a [`MemoryBudget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("memory budget of {limit} bytes reached")]
pub struct BudgetExceeded {
    /// The budget's limit in bytes.
    pub limit: usize,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub const fn new(limit: usize) -> Self {
        Self {
            limit,
            used: AtomicUsize::new(0),
        }
    }

    /// A budget that never refuses (still counts, for reporting).
    pub const fn unlimited() -> Self {
        Self::new(usize::MAX)
    }

    /// Charges `bytes` if they fit; on error nothing is charged.
    pub fn try_reserve(&self, bytes: usize) -> Result<(), BudgetExceeded> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .map(|_| ())
            .map_err(|_| BudgetExceeded { limit: self.limit })
    }

    /// Charges `bytes` whether or not they fit (for state that must be kept, e.g. an update to
    /// something already stored); later reservations see the overshoot.
    pub fn force_reserve(&self, bytes: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_add(bytes))
            });
    }

    /// Gives `bytes` back. Releasing more than was charged clamps at zero.
    pub fn release(&self, bytes: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(bytes))
            });
    }

    /// Replaces a charge of `old` bytes by one of `new` bytes; refused (nothing changes) when the
    /// growth does not fit.
    pub fn try_resize(&self, old: usize, new: usize) -> Result<(), BudgetExceeded> {
        if new <= old {
            self.release(old - new);
            Ok(())
        } else {
            self.try_reserve(new - old)
        }
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl Default for MemoryBudget {
    fn default() -> Self {
        Self::unlimited()
    }
}

/// The key every per-client share is counted under: the client's IPv4 address, or the /64 prefix
/// of its IPv6 address (one subscriber usually holds a whole /64, so counting single IPv6
/// addresses would let one client dodge every limit by changing its address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    /// The key of a client at `ip` (IPv4-mapped IPv6 addresses count as their IPv4 address).
    pub fn from_ip(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Self(IpAddr::V6(Ipv6Addr::from(prefix)))
            }
        }
    }

    /// The address the key stands for (an IPv4 address or an IPv6 /64 prefix).
    pub fn ip(self) -> IpAddr {
        self.0
    }
}

impl From<IpAddr> for ClientKey {
    fn from(ip: IpAddr) -> Self {
        Self::from_ip(ip)
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// Why [`Shares::try_acquire`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShareRefused {
    /// This key already holds its whole share.
    #[error("per-client limit of {0} reached")]
    PerKey(usize),
    /// The table of keys is full (a flood of distinct keys).
    #[error("too many distinct clients ({0})")]
    TooManyKeys(usize),
}

/// Per-key counts of a pool, each key limited to `per_key` units and the table to `max_keys`
/// keys. A key disappears when its count returns to zero, so memory follows current holders.
#[derive(Debug)]
pub struct Shares<K> {
    per_key: usize,
    max_keys: usize,
    counts: Mutex<HashMap<K, usize>>,
}

impl<K: Eq + Hash + Clone> Shares<K> {
    /// At most `per_key` units per key (0: unlimited) and `max_keys` keys.
    pub fn new(per_key: usize, max_keys: usize) -> Self {
        Self {
            per_key,
            max_keys: max_keys.max(1),
            counts: Mutex::default(),
        }
    }

    /// The per-key limit (0: unlimited).
    pub fn per_key(&self) -> usize {
        self.per_key
    }

    /// Takes one unit for `key` if its share allows; pair with [`Shares::release`].
    pub fn try_acquire(&self, key: &K) -> Result<(), ShareRefused> {
        self.try_acquire_n(key, 1)
    }

    /// Takes `n` units (e.g. bytes) for `key` if its share allows; pair with
    /// [`Shares::release_n`]. On error nothing is taken.
    pub fn try_acquire_n(&self, key: &K, n: usize) -> Result<(), ShareRefused> {
        let mut counts = lock(&self.counts);
        let held = counts.get(key).copied().unwrap_or(0);
        if held == 0 && counts.len() >= self.max_keys {
            return Err(ShareRefused::TooManyKeys(self.max_keys));
        }
        let next = held.saturating_add(n);
        if self.per_key != 0 && next > self.per_key {
            return Err(ShareRefused::PerKey(self.per_key));
        }
        if next > 0 {
            counts.insert(key.clone(), next);
        }
        Ok(())
    }

    /// Gives one unit of `key` back.
    pub fn release(&self, key: &K) {
        self.release_n(key, 1);
    }

    /// Gives `n` units of `key` back (at most what it holds).
    pub fn release_n(&self, key: &K, n: usize) {
        let mut counts = lock(&self.counts);
        if let Some(held) = counts.get_mut(key) {
            *held = held.saturating_sub(n);
            if *held == 0 {
                counts.remove(key);
                // A table never shrinks by itself: after a burst of distinct keys it would keep
                // their slots forever. Halve it once it is mostly empty (amortized O(1)).
                if counts.capacity() > 64 && counts.len() < counts.capacity() / 4 {
                    let keep = counts.len().saturating_mul(2);
                    counts.shrink_to(keep);
                }
            }
        }
    }

    /// Takes one unit for `key` and returns a guard that gives it back when dropped, for a unit
    /// held as long as a value lives (a connection, a pending request).
    pub fn try_take(self: &Arc<Self>, key: K) -> Result<ShareGuard<K>, ShareRefused> {
        self.try_acquire(&key)?;
        Ok(ShareGuard {
            shares: self.clone(),
            key,
        })
    }

    /// Units `key` holds now.
    pub fn held(&self, key: &K) -> usize {
        lock(&self.counts).get(key).copied().unwrap_or(0)
    }

    /// Keys holding at least one unit.
    pub fn keys(&self) -> usize {
        lock(&self.counts).len()
    }
}

/// One unit of a [`Shares`] key, given back when dropped (from [`Shares::try_take`]).
#[derive(Debug)]
pub struct ShareGuard<K: Eq + Hash + Clone> {
    shares: Arc<Shares<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Drop for ShareGuard<K> {
    fn drop(&mut self) {
        self.shares.release(&self.key);
    }
}

/// A rate: `burst` events at once, then one more every `interval`. A burst of 0 is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    burst: u32,
    interval: Duration,
}

impl Rate {
    /// `limit` events in any `window`, all of which may come at once (the "60 per minute"
    /// family); a `limit` of 0 is unlimited.
    pub fn per_window(limit: u32, window: Duration) -> Self {
        Self {
            burst: limit,
            interval: window.checked_div(limit.max(1)).unwrap_or(window),
        }
    }

    /// `burst` events at once, then `per_second` a second; a `burst` of 0 is unlimited.
    pub fn burst_then_per_second(burst: u32, per_second: u32) -> Self {
        Self {
            burst,
            interval: Duration::from_secs(1)
                .checked_div(per_second)
                .unwrap_or(Duration::MAX),
        }
    }

    /// No limit at all.
    pub const fn unlimited() -> Self {
        Self {
            burst: 0,
            interval: Duration::ZERO,
        }
    }

    /// Whether this rate limits nothing.
    pub fn is_unlimited(&self) -> bool {
        self.burst == 0
    }

    /// The events allowed at once.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// How far ahead of now a key's theoretical arrival time may run.
    fn tolerance(&self) -> Duration {
        self.interval
            .checked_mul(self.burst.saturating_sub(1))
            .unwrap_or(Duration::MAX)
    }
}

/// One key's token bucket, stored as a single instant (the generic cell rate algorithm's
/// "theoretical arrival time"): constant memory whatever the rate, fractional refill, no floats.
/// Embed it in your own per-key entries, or use [`TokenBuckets`] for a keyed table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    /// When the bucket is full again; at or before now means full.
    full_at: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn full(now: Instant) -> Self {
        Self { full_at: now }
    }

    /// Spends one event at `now` (an injected clock) if `rate` allows; `false` changes nothing.
    pub fn try_take(&mut self, rate: Rate, now: Instant) -> bool {
        if rate.is_unlimited() {
            return true;
        }
        let from = self.full_at.max(now);
        if from.saturating_duration_since(now) > rate.tolerance() {
            return false;
        }
        self.full_at = from.checked_add(rate.interval).unwrap_or(from);
        true
    }

    /// Whether the bucket is full at `now` (a fresh one would be identical, so it can be
    /// forgotten).
    pub fn is_full(&self, now: Instant) -> bool {
        self.full_at <= now
    }
}

/// Per-key token buckets ([`TokenBucket`] at one [`Rate`]). The table holds at most `max_keys`
/// keys; when it is full, keys whose bucket has refilled are forgotten, and if none has, the new
/// key is refused (fail closed under a flood of keys).
#[derive(Debug)]
pub struct TokenBuckets<K> {
    rate: Rate,
    max_keys: usize,
    buckets: Mutex<HashMap<K, TokenBucket>>,
}

impl<K: Eq + Hash + Clone> TokenBuckets<K> {
    /// `burst` at once, refilled at `per_second`; a `burst` of 0 disables limiting.
    pub fn new(burst: u32, per_second: u32, max_keys: usize) -> Self {
        Self::with_rate(Rate::burst_then_per_second(burst, per_second), max_keys)
    }

    /// Buckets at `rate`, at most `max_keys` keys.
    pub fn with_rate(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys: max_keys.max(1),
            buckets: Mutex::default(),
        }
    }

    /// The rate in force.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Spends one token of `key` now; `false` means the key is over its rate.
    pub fn check(&self, key: &K) -> bool {
        self.check_at(key, Instant::now())
    }

    /// [`TokenBuckets::check`] at a given instant (an injected clock for tests).
    pub fn check_at(&self, key: &K, now: Instant) -> bool {
        if self.rate.is_unlimited() {
            return true;
        }
        let mut buckets = lock(&self.buckets);
        if !buckets.contains_key(key) {
            // A full bucket is the same as no entry: forget full ones before the table would
            // grow (amortized O(1)), so it holds the keys active within a refill time, not every
            // key ever seen.
            if buckets.len() >= self.max_keys || buckets.len() == buckets.capacity() {
                buckets.retain(|_, bucket| !bucket.is_full(now));
            }
            if buckets.len() >= self.max_keys {
                return false;
            }
        }
        buckets
            .entry(key.clone())
            .or_insert_with(|| TokenBucket::full(now))
            .try_take(self.rate, now)
    }

    /// Keys tracked now.
    pub fn keys(&self) -> usize {
        lock(&self.buckets).len()
    }

    /// Bytes of one table slot: the entry plus the hash table's control byte.
    pub fn slot_bytes() -> usize {
        std::mem::size_of::<(K, TokenBucket)>().saturating_add(1)
    }

    /// Bytes the table holds now: its slots (capacity plus the 1/8 kept free).
    pub fn bytes(&self) -> usize {
        let capacity = lock(&self.buckets).capacity();
        if capacity == 0 {
            return 0;
        }
        capacity
            .saturating_add(capacity / 7)
            .saturating_add(1)
            .saturating_mul(Self::slot_bytes())
    }

    /// The most bytes the table may hold: 3 slots per key (the table keeps 1/8 of its slots
    /// free and at most doubles when it grows, so under 16/7 slots per key) for at least 4 keys
    /// (the smallest table); 0 when unlimited (nothing is tracked).
    pub fn max_bytes(&self) -> usize {
        if self.rate.is_unlimited() {
            return 0;
        }
        self.max_keys
            .max(4)
            .saturating_mul(3)
            .saturating_mul(Self::slot_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_refuses_what_does_not_fit_and_takes_back_releases() {
        let budget = MemoryBudget::new(100);
        assert!(budget.try_reserve(60).is_ok());
        assert_eq!(budget.try_reserve(41), Err(BudgetExceeded { limit: 100 }));
        assert_eq!(budget.used(), 60);
        assert!(budget.try_resize(60, 100).is_ok());
        assert!(budget.try_reserve(1).is_err());
        budget.release(1000);
        assert_eq!(budget.used(), 0);
        assert!(budget.try_reserve(usize::MAX).is_err());
        budget.force_reserve(150);
        assert!(budget.try_reserve(1).is_err());
    }

    #[test]
    fn ipv6_clients_are_keyed_by_their_64_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ClientKey::from_ip(a), ClientKey::from_ip(b));
        assert_ne!(ClientKey::from_ip(a), ClientKey::from_ip(c));
        assert_eq!(ClientKey::from_ip(a).to_string(), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert_eq!(ClientKey::from_ip(mapped).to_string(), "127.0.0.2");
    }

    #[test]
    fn shares_limit_each_key_and_the_table() {
        let shares = Shares::new(2, 2);
        assert!(shares.try_acquire(&"a").is_ok());
        assert!(shares.try_acquire(&"a").is_ok());
        assert_eq!(shares.try_acquire(&"a"), Err(ShareRefused::PerKey(2)));
        assert!(shares.try_acquire(&"b").is_ok());
        assert_eq!(shares.try_acquire(&"c"), Err(ShareRefused::TooManyKeys(2)));
        shares.release(&"b");
        let shares = Arc::new(shares);
        let guard = shares.try_take("c");
        assert!(guard.is_ok());
        drop(guard);
        assert_eq!(shares.held(&"c"), 0);
        assert!(shares.try_acquire(&"c").is_ok());
        shares.release(&"a");
        assert_eq!(shares.held(&"a"), 1);

        // Weighted units (bytes): a share of 100 per key.
        let bytes = Shares::new(100, 10);
        assert!(bytes.try_acquire_n(&"a", 60).is_ok());
        assert_eq!(
            bytes.try_acquire_n(&"a", 41),
            Err(ShareRefused::PerKey(100))
        );
        assert_eq!(bytes.held(&"a"), 60);
        assert!(bytes.try_acquire_n(&"a", 40).is_ok());
        bytes.release_n(&"a", 1_000);
        assert_eq!(bytes.keys(), 0);
    }

    #[test]
    fn token_buckets_allow_a_burst_then_the_rate() {
        let buckets = TokenBuckets::new(3, 2, 10);
        let t0 = Instant::now();
        assert!((0..3).all(|_| buckets.check_at(&1, t0)));
        assert!(!buckets.check_at(&1, t0));
        assert!(buckets.check_at(&2, t0));
        assert!(buckets.check_at(&1, t0 + Duration::from_millis(500)));
        assert!(!buckets.check_at(&1, t0 + Duration::from_millis(500)));
    }

    #[test]
    fn a_rate_per_window_refills_fractionally() {
        // 3 per minute: one token every 20 s, all three at once.
        let rate = Rate::per_window(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let mut bucket = TokenBucket::full(t0);
        assert!((0..3).all(|_| bucket.try_take(rate, t0)));
        assert!(!bucket.try_take(rate, t0 + Duration::from_secs(19)));
        assert!(bucket.try_take(rate, t0 + Duration::from_secs(20)));
        assert!(!bucket.try_take(rate, t0 + Duration::from_secs(20)));
        assert!(!bucket.is_full(t0 + Duration::from_secs(59)));
        assert!(bucket.is_full(t0 + Duration::from_secs(80)));
        assert!(TokenBucket::full(t0).try_take(Rate::unlimited(), t0));
    }

    #[test]
    fn the_table_reports_its_bytes_within_its_bound() {
        let buckets = TokenBuckets::with_rate(Rate::per_window(1, Duration::from_secs(1)), 50);
        let t0 = Instant::now();
        for key in 0..50u32 {
            assert!(buckets.check_at(&key, t0));
        }
        assert!(buckets.bytes() <= buckets.max_bytes());
        assert!(buckets.bytes() > 0);
    }

    #[test]
    fn tables_forget_what_they_no_longer_need() {
        let buckets = TokenBuckets::with_rate(Rate::per_window(5, Duration::from_secs(1)), 10_000);
        let t0 = Instant::now();
        for key in 0..5_000u32 {
            // Each key's bucket is full again 200 ms after its one request.
            assert!(buckets.check_at(&key, t0 + Duration::from_millis(u64::from(key))));
        }
        assert!(buckets.keys() < 1_000, "{}", buckets.keys());

        let shares = Shares::new(1, 100_000);
        for key in 0..5_000u32 {
            assert!(shares.try_acquire(&key).is_ok());
        }
        for key in 0..5_000u32 {
            shares.release(&key);
        }
        assert!(lock(&shares.counts).capacity() <= 128);
    }

    #[test]
    fn a_full_bucket_table_forgets_refilled_keys() {
        let buckets = TokenBuckets::new(1, 1, 1);
        let t0 = Instant::now();
        assert!(buckets.check_at(&1, t0));
        assert!(!buckets.check_at(&2, t0));
        assert!(buckets.check_at(&2, t0 + Duration::from_secs(2)));
        assert_eq!(buckets.keys(), 1);
    }
}
