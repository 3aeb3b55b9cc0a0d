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

/// Bookkeeping the state engine keeps per log entry besides its frame (offset, frame handle,
/// queue slot): an over-estimate, charged for every entry a session keeps in the engine.
pub const ENGINE_ENTRY_BYTES: usize = 128;

/// What one session keeps in the state engine, as this node knows it, charged to the session's
/// budgets like this node's own copy: the entries of its shared log (each a whole
/// `code-update` frame) and the document in its record's snapshot.
///
/// The log is mirrored by entry sizes only (offset and length), trimmed by the same retention
/// the engine applies, so the charge follows what the engine holds. Entries another node
/// appended are learned when this node reads them (to follow them); until then that node
/// charges them.
#[derive(Debug)]
pub(crate) struct EngineBytes {
    /// The log's epoch the entries belong to (a log created again starts over).
    epoch: u64,
    /// Offset and frame length of each entry, oldest first.
    entries: std::collections::VecDeque<(u64, usize)>,
    /// Sum of the entries' frame lengths (what the retention counts).
    log_bytes: usize,
    /// The snapshot's document (JSON-escaped) as this node last wrote or read the record.
    snapshot_written: usize,
    /// The newest document this node knows (JSON-escaped): what the next snapshot will hold.
    snapshot_newest: usize,
    charge: Charge,
}

/// The bounds of one append, as [`EngineBytes`] mirrors them: the engine's `Retention`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogBounds {
    /// Entries kept at most.
    pub(crate) max_entries: usize,
    /// Frame bytes kept at most.
    pub(crate) max_bytes: usize,
}

/// An append planned by [`EngineBytes::reserve_append`]: the bounds to append with and the
/// budget the engine's growth needs, reserved until [`EngineBytes::appended`] or dropped.
#[derive(Debug)]
pub(crate) struct PlannedAppend {
    /// The bounds the entry must be appended with.
    pub(crate) bounds: LogBounds,
    reserved: Charge,
    snapshot: usize,
}

impl EngineBytes {
    /// Nothing known yet, charged to `budgets`.
    pub(crate) fn new(budgets: &Budgets) -> Self {
        Self {
            epoch: 0,
            entries: std::collections::VecDeque::new(),
            log_bytes: 0,
            snapshot_written: 0,
            snapshot_newest: 0,
            charge: Charge::forced(budgets, 0),
        }
    }

    /// Bytes charged now.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.charge.bytes()
    }

    fn target(&self) -> usize {
        Self::total(
            self.log_bytes,
            self.entries.len(),
            self.snapshot_written.max(self.snapshot_newest),
        )
    }

    fn total(log_bytes: usize, entries: usize, snapshot: usize) -> usize {
        log_bytes
            .saturating_add(entries.saturating_mul(ENGINE_ENTRY_BYTES))
            .saturating_add(snapshot)
    }

    /// The log's entries and bytes after appending `size` bytes at `offset` under `bounds`, as
    /// the engine trims it (oldest first, until the new entry fits both bounds).
    fn after_append(&self, offset: u64, size: usize, bounds: LogBounds) -> (usize, usize) {
        let mut bytes = self.log_bytes;
        let mut dropped = 0usize;
        for &(at, len) in &self.entries {
            let beyond_count =
                offset.saturating_sub(at) >= u64::try_from(bounds.max_entries).unwrap_or(u64::MAX);
            let beyond_bytes = bytes.saturating_add(size) > bounds.max_bytes;
            if !(beyond_count || beyond_bytes) {
                break;
            }
            bytes = bytes.saturating_sub(len);
            dropped = dropped.saturating_add(1);
        }
        (
            self.entries.len().saturating_sub(dropped).saturating_add(1),
            bytes.saturating_add(size),
        )
    }

    /// Reserves what appending an entry of `size` bytes right after `top` (the log's newest
    /// position when the edit was prepared) makes the engine hold, with `snapshot` bytes as
    /// the next snapshot: under `normal` bounds if that fits the budgets, else under `tight`
    /// ones (fewer older entries kept), else refused. Nothing changes until
    /// [`EngineBytes::appended`].
    pub(crate) fn reserve_append(
        &self,
        top: switchboard_core::engine::Position,
        size: usize,
        snapshot: usize,
        normal: LogBounds,
        tight: LogBounds,
    ) -> Result<PlannedAppend, Refused> {
        // A log this node knows nothing about (another epoch, or none) keeps nothing older.
        let fresh = Self {
            epoch: top.epoch,
            entries: std::collections::VecDeque::new(),
            log_bytes: 0,
            snapshot_written: self.snapshot_written,
            snapshot_newest: self.snapshot_newest,
            charge: Charge::forced(&self.charge.budgets, 0),
        };
        let known = if top.offset == 0 || top.epoch != self.epoch {
            &fresh
        } else {
            self
        };
        let offset = top.offset.saturating_add(1);
        let snapshot_after = self.snapshot_written.max(snapshot);
        let mut refusal = None;
        for bounds in [normal, tight] {
            let (entries, bytes) = known.after_append(offset, size, bounds);
            let target = Self::total(bytes, entries, snapshot_after);
            match self
                .charge
                .reserve(target.saturating_sub(self.charge.bytes()))
            {
                Ok(reserved) => {
                    return Ok(PlannedAppend {
                        bounds,
                        reserved,
                        snapshot,
                    });
                }
                Err(refused) => refusal = Some(refused),
            }
        }
        Err(refusal.unwrap_or(Refused::Server(0)))
    }

    /// Records an entry of `size` bytes the engine stored at `at` under `bounds`.
    fn push(&mut self, at: switchboard_core::engine::Position, size: usize, bounds: LogBounds) {
        if at.epoch != self.epoch {
            self.entries.clear();
            self.log_bytes = 0;
            self.epoch = at.epoch;
        }
        if self
            .entries
            .back()
            .is_some_and(|&(last, _)| last >= at.offset)
        {
            // Known already (this node appended it, or read it before).
            return;
        }
        let (entries, bytes) = self.after_append(at.offset, size, bounds);
        let dropped = self.entries.len().saturating_add(1).saturating_sub(entries);
        self.entries.drain(..dropped.min(self.entries.len()));
        self.entries.push_back((at.offset, size));
        self.log_bytes = bytes;
    }

    /// Records this node's append planned with [`EngineBytes::reserve_append`], stored at `at`.
    pub(crate) fn appended(
        &mut self,
        planned: PlannedAppend,
        at: switchboard_core::engine::Position,
        size: usize,
    ) {
        let PlannedAppend {
            bounds,
            reserved,
            snapshot,
        } = planned;
        self.charge.absorb(reserved);
        self.push(at, size, bounds);
        self.snapshot_newest = snapshot;
        let target = self.target();
        self.charge.resize_forced(target);
    }

    /// Records an entry of `size` bytes read from the log at `at` (appended by another node or
    /// socket, already stored: charged whether or not it fits).
    pub(crate) fn seen(
        &mut self,
        at: switchboard_core::engine::Position,
        size: usize,
        bounds: LogBounds,
    ) {
        self.push(at, size, bounds);
        let target = self.target();
        self.charge.resize_forced(target);
    }

    /// The log is gone (expired, or created again): nothing of it is held any more.
    pub(crate) fn log_gone(&mut self) {
        self.entries.clear();
        self.log_bytes = 0;
        let target = self.target();
        self.charge.resize_forced(target);
    }

    /// The newest document this node knows is `bytes` long, JSON-escaped (already stored, so
    /// charged whether or not it fits).
    pub(crate) fn set_newest_snapshot(&mut self, bytes: usize) {
        self.snapshot_newest = bytes;
        let target = self.target();
        self.charge.resize_forced(target);
    }

    /// Charges a snapshot of `bytes` that is about to be written, if it fits (a new session's
    /// record).
    pub(crate) fn try_snapshot(&mut self, bytes: usize) -> Result<(), Refused> {
        let target = Self::total(self.log_bytes, self.entries.len(), bytes);
        self.charge.try_resize(target)?;
        self.snapshot_written = bytes;
        self.snapshot_newest = bytes;
        Ok(())
    }

    /// The record now holds a snapshot of `bytes` (this node wrote it).
    pub(crate) fn set_written_snapshot(&mut self, bytes: usize) {
        self.snapshot_written = bytes;
        let target = self.target();
        self.charge.resize_forced(target);
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

    fn at(offset: u64) -> switchboard_core::engine::Position {
        switchboard_core::engine::Position { offset, epoch: 1 }
    }

    const NORMAL: LogBounds = LogBounds {
        max_entries: 3,
        max_bytes: 1000,
    };
    const TIGHT: LogBounds = LogBounds {
        max_entries: 1,
        max_bytes: 1000,
    };

    #[test]
    fn engine_bytes_follow_the_logs_retention_and_the_snapshot() {
        let server = Arc::new(MemoryBudget::new(100_000));
        let mut engine = EngineBytes::new(&Budgets::server(&server));
        let entry = |n: usize| n * ENGINE_ENTRY_BYTES;
        // Four entries of 100 bytes: the count bound keeps three.
        for offset in 1..=4 {
            let planned = engine
                .reserve_append(at(offset - 1), 100, 50, NORMAL, TIGHT)
                .unwrap();
            assert_eq!(planned.bounds, NORMAL);
            engine.appended(planned, at(offset), 100);
        }
        assert_eq!(engine.bytes(), 300 + entry(3) + 50);
        assert_eq!(server.used(), engine.bytes());
        // A large entry: the byte bound trims the older ones.
        let planned = engine
            .reserve_append(at(4), 901, 50, NORMAL, TIGHT)
            .unwrap();
        engine.appended(planned, at(5), 901);
        assert_eq!(engine.bytes(), 901 + entry(1) + 50);
        // Entries read from the log count the same; one known already is not counted twice.
        engine.seen(at(6), 50, NORMAL);
        engine.seen(at(6), 50, NORMAL);
        assert_eq!(engine.bytes(), 951 + entry(2) + 50);
        // A snapshot that shrank stays charged at the size written until written again.
        engine.set_written_snapshot(400);
        engine.set_newest_snapshot(10);
        assert_eq!(engine.bytes(), 951 + entry(2) + 400);
        engine.set_written_snapshot(10);
        assert_eq!(engine.bytes(), 951 + entry(2) + 10);
        // A log created again (another epoch) starts over.
        let planned = engine
            .reserve_append(at(0), 100, 10, NORMAL, TIGHT)
            .unwrap();
        let fresh = switchboard_core::engine::Position {
            offset: 1,
            epoch: 2,
        };
        engine.appended(planned, fresh, 100);
        assert_eq!(engine.bytes(), 100 + entry(1) + 10);
        engine.log_gone();
        assert_eq!(engine.bytes(), 10);
        drop(engine);
        assert_eq!(server.used(), 0);
    }

    #[test]
    fn a_full_share_keeps_only_the_newest_entry_then_refuses() {
        let server = Arc::new(MemoryBudget::new(100_000));
        let share = Arc::new(MemoryBudget::new(1000));
        let budgets = Budgets::with_client(&server, share.clone());
        let mut engine = EngineBytes::new(&budgets);
        let planned = engine.reserve_append(at(0), 300, 0, NORMAL, TIGHT).unwrap();
        engine.appended(planned, at(1), 300);
        // Two entries do not fit the share; the new one alone does.
        let planned = engine.reserve_append(at(1), 500, 0, NORMAL, TIGHT).unwrap();
        assert_eq!(planned.bounds, TIGHT);
        engine.appended(planned, at(2), 500);
        assert_eq!(share.used(), 500 + ENGINE_ENTRY_BYTES);
        // Not even alone: refused, nothing charged.
        assert_eq!(
            engine
                .reserve_append(at(2), 950, 0, NORMAL, TIGHT)
                .unwrap_err(),
            Refused::Client(1000)
        );
        assert_eq!(share.used(), 500 + ENGINE_ENTRY_BYTES);
        assert!(engine.try_snapshot(600).is_err());
        assert!(engine.try_snapshot(100).is_ok());
        assert_eq!(share.used(), 600 + ENGINE_ENTRY_BYTES);
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
