//! Byte accounting against the server-wide [`MemoryBudget`], and a per-connection rate bucket.

use std::sync::Arc;
use std::time::Instant;

use switchboard_core::{BudgetExceeded, MemoryBudget};

/// Bytes charged to a shared [`MemoryBudget`] on behalf of one owner (a session, a document),
/// given back when the owner is dropped. Tying the release to `Drop` means a session removed
/// by any path (expiry, sweep, replacement) returns exactly what it held.
#[derive(Debug)]
pub(crate) struct Charge {
    budget: Arc<MemoryBudget>,
    bytes: usize,
}

impl Charge {
    /// Charges `bytes` if they fit in `budget`.
    pub(crate) fn try_new(
        budget: &Arc<MemoryBudget>,
        bytes: usize,
    ) -> Result<Self, BudgetExceeded> {
        budget.try_reserve(bytes)?;
        Ok(Self {
            budget: budget.clone(),
            bytes,
        })
    }

    /// Charges `bytes` whether or not they fit (for a budget that never refuses).
    pub(crate) fn forced(budget: &Arc<MemoryBudget>, bytes: usize) -> Self {
        budget.force_reserve(bytes);
        Self {
            budget: budget.clone(),
            bytes,
        }
    }

    /// Bytes held now.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Changes the charge to `bytes`; growth is refused (nothing changes) when it does not fit.
    pub(crate) fn try_resize(&mut self, bytes: usize) -> Result<(), BudgetExceeded> {
        self.budget.try_resize(self.bytes, bytes)?;
        self.bytes = bytes;
        Ok(())
    }

    /// Adds `bytes` to the charge if they fit.
    pub(crate) fn try_grow(&mut self, bytes: usize) -> Result<(), BudgetExceeded> {
        self.try_resize(self.bytes.saturating_add(bytes))
    }

    /// Takes `bytes` off the charge.
    pub(crate) fn shrink(&mut self, bytes: usize) {
        let _ = self.try_resize(self.bytes.saturating_sub(bytes));
    }
}

impl Clone for Charge {
    /// A copy of the owner holds the same bytes again, so the copy is charged too (forced: the
    /// copy already exists in memory by then).
    fn clone(&self) -> Self {
        self.budget.force_reserve(self.bytes);
        Self {
            budget: self.budget.clone(),
            bytes: self.bytes,
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// A token bucket of one connection: `burst` frames at once, `per_second` more each second.
/// Constant memory, kept in the connection's own state; time is passed in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateBucket {
    tokens: f64,
    at: Instant,
}

impl RateBucket {
    /// A full bucket.
    pub(crate) fn new(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            at: now,
        }
    }

    /// Spends a token at `now` if one is left; a `burst` of 0 disables the limit.
    pub(crate) fn check_at(&mut self, burst: u32, per_second: u32, now: Instant) -> bool {
        if burst == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(per_second)).min(f64::from(burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn charges_follow_their_owner() {
        let budget = Arc::new(MemoryBudget::new(100));
        let mut a = Charge::try_new(&budget, 40).unwrap();
        assert!(Charge::try_new(&budget, 61).is_err());
        assert!(a.try_resize(100).is_ok());
        assert!(a.try_grow(1).is_err());
        assert_eq!(a.bytes(), 100);
        a.shrink(30);
        assert_eq!(budget.used(), 70);
        let b = a.clone();
        assert_eq!(budget.used(), 140);
        drop(a);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut bucket = RateBucket::new(3, t0);
        assert!((0..3).all(|_| bucket.check_at(3, 2, t0)));
        assert!(!bucket.check_at(3, 2, t0));
        assert!(bucket.check_at(3, 2, t0 + Duration::from_millis(500)));
        assert!(!bucket.check_at(3, 2, t0 + Duration::from_millis(500)));
        assert!(RateBucket::new(0, t0).check_at(0, 0, t0));
    }
}
