//! Byte accounting against the server-wide [`MemoryBudget`], and a per-connection rate bucket.

use std::sync::Arc;
use std::time::Instant;

use switchboard_core::MemoryBudget;

/// Which budget refused a charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The server-wide budget (its limit).
    Server(usize),
    /// The share of the client that created the session (its limit).
    Client(usize),
}

/// The budgets one owner charges: the server-wide one and, for session state, the share of the
/// client that created the session.
#[derive(Debug, Clone)]
pub(crate) struct Budgets {
    server: Arc<MemoryBudget>,
    client: Option<Arc<MemoryBudget>>,
}

impl Budgets {
    /// Only the server-wide budget.
    pub(crate) fn server(server: &Arc<MemoryBudget>) -> Self {
        Self {
            server: server.clone(),
            client: None,
        }
    }

    /// The server-wide budget and a client's share of it.
    pub(crate) fn with_client(server: &Arc<MemoryBudget>, client: Arc<MemoryBudget>) -> Self {
        Self {
            server: server.clone(),
            client: Some(client),
        }
    }

    fn try_reserve(&self, bytes: usize) -> Result<(), Refused> {
        if let Some(client) = &self.client {
            client
                .try_reserve(bytes)
                .map_err(|e| Refused::Client(e.limit))?;
        }
        self.server.try_reserve(bytes).map_err(|e| {
            if let Some(client) = &self.client {
                client.release(bytes);
            }
            Refused::Server(e.limit)
        })
    }

    fn force_reserve(&self, bytes: usize) {
        if let Some(client) = &self.client {
            client.force_reserve(bytes);
        }
        self.server.force_reserve(bytes);
    }

    fn release(&self, bytes: usize) {
        if let Some(client) = &self.client {
            client.release(bytes);
        }
        self.server.release(bytes);
    }
}

/// Bytes charged to [`Budgets`] on behalf of one owner (a session, a document), given back when
/// the owner is dropped. Tying the release to `Drop` means a session removed by any path
/// (expiry, sweep, replacement) returns exactly what it held.
#[derive(Debug)]
pub(crate) struct Charge {
    budgets: Budgets,
    bytes: usize,
}

impl Charge {
    /// Charges `bytes` if they fit in every budget.
    pub(crate) fn try_new(budgets: &Budgets, bytes: usize) -> Result<Self, Refused> {
        budgets.try_reserve(bytes)?;
        Ok(Self {
            budgets: budgets.clone(),
            bytes,
        })
    }

    /// Charges `bytes` whether or not they fit (for a budget that never refuses).
    pub(crate) fn forced(budgets: &Budgets, bytes: usize) -> Self {
        budgets.force_reserve(bytes);
        Self {
            budgets: budgets.clone(),
            bytes,
        }
    }

    /// Bytes held now.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Changes the charge to `bytes`; growth is refused (nothing changes) when it does not fit.
    pub(crate) fn try_resize(&mut self, bytes: usize) -> Result<(), Refused> {
        if bytes <= self.bytes {
            self.budgets.release(self.bytes.saturating_sub(bytes));
        } else {
            self.budgets.try_reserve(bytes.saturating_sub(self.bytes))?;
        }
        self.bytes = bytes;
        Ok(())
    }

    /// Adds `bytes` to the charge if they fit.
    pub(crate) fn try_grow(&mut self, bytes: usize) -> Result<(), Refused> {
        self.try_resize(self.bytes.saturating_add(bytes))
    }

    /// Takes `bytes` off the charge.
    pub(crate) fn shrink(&mut self, bytes: usize) {
        let _ = self.try_resize(self.bytes.saturating_sub(bytes));
    }

    /// A separate charge of `bytes` on the same budgets (a reservation for growth that is not
    /// applied yet), or the budget that refused it. Zero bytes always fit.
    pub(crate) fn reserve(&self, bytes: usize) -> Result<Self, Refused> {
        if bytes == 0 {
            return Ok(Self {
                budgets: self.budgets.clone(),
                bytes: 0,
            });
        }
        Self::try_new(&self.budgets, bytes)
    }

    /// Takes over a reservation made with [`Charge::reserve`] on this charge's budgets.
    pub(crate) fn absorb(&mut self, mut reserved: Self) {
        self.bytes = self.bytes.saturating_add(reserved.bytes);
        // The bytes now belong to `self`; the emptied reservation releases nothing on drop.
        reserved.bytes = 0;
    }

    /// Changes the charge to `bytes` whether or not growth fits (for state already in memory).
    pub(crate) fn resize_forced(&mut self, bytes: usize) {
        if bytes <= self.bytes {
            self.budgets.release(self.bytes.saturating_sub(bytes));
        } else {
            self.budgets.force_reserve(bytes.saturating_sub(self.bytes));
        }
        self.bytes = bytes;
    }
}

impl Clone for Charge {
    /// A copy of the owner holds the same bytes again, so the copy is charged too (forced: the
    /// copy already exists in memory by then).
    fn clone(&self) -> Self {
        Self::forced(&self.budgets, self.bytes)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budgets.release(self.bytes);
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
        let server = Arc::new(MemoryBudget::new(100));
        let budget = Budgets::server(&server);
        let mut a = Charge::try_new(&budget, 40).unwrap();
        assert!(Charge::try_new(&budget, 61).is_err());
        assert!(a.try_resize(100).is_ok());
        assert!(a.try_grow(1).is_err());
        assert_eq!(a.bytes(), 100);
        a.shrink(30);
        assert_eq!(server.used(), 70);
        let b = a.clone();
        assert_eq!(server.used(), 140);
        drop(a);
        drop(b);
        assert_eq!(server.used(), 0);
    }

    #[test]
    fn a_client_share_refuses_before_the_server_budget_and_both_are_released() {
        let server = Arc::new(MemoryBudget::new(100));
        let share = Arc::new(MemoryBudget::new(30));
        let budgets = Budgets::with_client(&server, share.clone());
        let mut a = Charge::try_new(&budgets, 20).unwrap();
        assert_eq!(a.try_grow(11), Err(Refused::Client(30)));
        assert_eq!((server.used(), share.used()), (20, 20));
        // The server budget refusing rolls the client's reservation back.
        let other = Charge::try_new(&Budgets::server(&server), 75).unwrap();
        assert_eq!(a.try_grow(6), Err(Refused::Server(100)));
        assert_eq!((server.used(), share.used()), (95, 20));
        drop(other);
        drop(a);
        assert_eq!((server.used(), share.used()), (0, 0));
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
