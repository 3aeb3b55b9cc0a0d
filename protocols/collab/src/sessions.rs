//! This node's session registry: a bounded map of the sessions this node serves (created here, or
//! with sockets here), each with this node's copy of the document (a cache of the engine's log,
//! used to transform edits), its connected users and sockets, and the byte charges that protect
//! this node's memory. Sessions here are removed once this node has had no socket on them for
//! the idle TTL; the session itself (its record, log and presence, in the state engine) lives as
//! long as some node keeps it alive.
//!
//! Expiry is lazy: a lookup treats an expired session as gone (and removes it), and the whole map
//! is swept at most once per sweep interval and whenever it is full. Time is passed in, so the
//! policy is tested without waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchboard_core::engine::Position;
use switchboard_core::sync::lock;
use switchboard_core::{ClientKey, MemoryBudget, ShareRefused, Shares, TokenBuckets};

use crate::budget::{Budgets, Charge, EngineBytes, LogBounds, PlannedAppend, Refused};
use crate::document::{Document, DocumentLimits, Prepared};
use crate::store::LoggedEdit;

/// Longest session id, in bytes.
pub const MAX_SESSION_ID_LEN: usize = 64;

/// Bytes charged for a session besides its documents: on this node the registry entry, the id
/// and generation strings, the session and state structs and the per-client table entries
/// (about 600 bytes); in the state engine the record's fields other than the document (the
/// generation, a language of up to 64 characters escaped, the version), its key and the log's
/// bookkeeping (about 900 bytes). A deliberate over-estimate.
pub const SESSION_OVERHEAD_BYTES: usize = 2048;

/// Bytes charged per participant (distinct user) joined through this node: on this node the
/// user id (at most 128 characters, so at most 512 bytes in UTF-8), its map entry and the
/// connections' copies of it; in the state engine the display-name record (its key, with the
/// user id, and a name of at most 512 bytes). An over-estimate, like [`SESSION_OVERHEAD_BYTES`].
pub const PARTICIPANT_BYTES: usize = 4096;

/// Whether `id` is a well-formed session id: 1 to 64 ASCII letters, digits, `-` or `_`.
pub fn is_valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SESSION_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One collaborative session, as this node holds it.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) id: String,
    /// Who made this node hold it: the session counts against this client's share until it is
    /// removed here.
    creator: ClientKey,
    /// The budgets this session's state is charged to (the node's and the creator's share).
    budgets: Budgets,
    limits: DocumentLimits,
    pub(crate) state: Mutex<SessionState>,
    /// Taken by each edit from its first read of the log to its append, so this node's editors
    /// of one session take turns (first come, first served) instead of racing each other's
    /// compare-and-set: a writer that kept losing the race to a faster one was refused as busy.
    /// Only other nodes' edits can still land in between. Each connection applies one message
    /// at a time, so at most one waiter per participant.
    pub(crate) edit_turn: tokio::sync::Mutex<()>,
}

/// This node's copy of a session's document, and the log position it reflects.
#[derive(Debug)]
pub(crate) struct Replica {
    /// The document at the version of the log entry at `pos`, with the operations of the log
    /// entries read when it was loaded and those this node saw since (to transform late edits
    /// against).
    pub(crate) doc: Document,
    /// The engine log's position `doc` is at (offset 0: the log held nothing newer than the
    /// record's snapshot when the copy was made).
    pub(crate) pos: Position,
}

/// The mutable part of a session on this node, behind its lock (never held across an engine
/// call).
#[derive(Debug)]
pub(crate) struct SessionState {
    /// The incarnation of the session in the engine this state belongs to (see
    /// [`crate::store`]); `None` until this node read or wrote the session's record.
    pub(crate) generation: Option<Arc<str>>,
    /// This node's copy of the document; `None` until an edit needs it (or after the engine's
    /// log moved on in a way the copy cannot follow).
    pub(crate) replica: Option<Replica>,
    /// The session's fixed overhead plus [`PARTICIPANT_BYTES`] per entry of `users`.
    pub(crate) charge: Charge,
    /// What the session keeps in the state engine (its log's entries, its record's snapshot),
    /// charged to the same budgets.
    pub(crate) engine: EngineBytes,
    /// Users joined through this node, with how many of this node's sockets each has.
    pub(crate) users: HashMap<String, usize>,
    /// Whether anyone ever joined: a session nobody joined expires after the shorter TTL.
    pub(crate) joined_once: bool,
    /// Open sockets on this session on this node, joined or not.
    sockets: usize,
    /// When the last socket left (or the session was created).
    empty_since: Instant,
    /// When this node last wrote the session's record to keep it alive.
    pub(crate) refreshed_at: Option<Instant>,
    /// Whether a keep-alive write is under way (so concurrent ticks do not repeat it).
    pub(crate) refreshing: bool,
}

impl Session {
    /// The incarnation this node's state belongs to.
    pub(crate) fn generation(&self) -> Option<Arc<str>> {
        lock(&self.state).generation.clone()
    }

    /// Adopts incarnation `generation` of the session, read from the engine or, when `written_here`,
    /// just written by this node from this node's copy of the document. Any other incarnation
    /// than the one known means the copy here may not match what the engine holds: it goes, and
    /// is loaded again when an edit needs it.
    pub(crate) fn adopt(&self, generation: &str, written_here: bool) -> Arc<str> {
        let mut state = lock(&self.state);
        if let Some(known) = &state.generation
            && **known == *generation
        {
            return known.clone();
        }
        let keep = written_here && state.generation.is_none();
        if !keep {
            state.replica = None;
        }
        let generation: Arc<str> = generation.into();
        state.generation = Some(generation.clone());
        generation
    }

    /// Drops the copy of the document unless it moved past `pos` (the caller found that the
    /// engine's log cannot continue from there).
    pub(crate) fn forget_replica_at(&self, pos: Position) {
        let mut state = lock(&self.state);
        if state.replica.as_ref().is_some_and(|r| r.pos == pos) {
            state.replica = None;
        }
    }

    /// The session's log is gone from the engine (expired, or created again): its entries no
    /// longer count.
    pub(crate) fn log_gone(&self) {
        lock(&self.state).engine.log_gone();
    }

    /// Records an entry of `size` bytes read from the session's log at `at`.
    pub(crate) fn saw_entry(&self, at: Position, size: usize, bounds: LogBounds) {
        lock(&self.state).engine.seen(at, size, bounds);
    }

    /// Reserves what appending an entry of `size` bytes after `top` makes the engine hold (see
    /// [`EngineBytes::reserve_append`]), `snapshot` being the escaped length of the document
    /// it leaves.
    pub(crate) fn reserve_append(
        &self,
        top: Position,
        size: usize,
        snapshot: usize,
        normal: LogBounds,
        tight: LogBounds,
    ) -> Result<PlannedAppend, Refused> {
        lock(&self.state)
            .engine
            .reserve_append(top, size, snapshot, normal, tight)
    }

    /// Charges the snapshot of a record about to be written from this node (a new session's
    /// document, `bytes` escaped), if it fits.
    pub(crate) fn try_snapshot(&self, bytes: usize) -> Result<(), Refused> {
        lock(&self.state).engine.try_snapshot(bytes)
    }

    /// This node wrote the record with a snapshot of `bytes` (escaped).
    pub(crate) fn wrote_snapshot(&self, bytes: usize) {
        lock(&self.state).engine.set_written_snapshot(bytes);
    }

    /// Applies edits read from the log after `pos` (in `epoch`) to this node's copy, if it is
    /// still at `pos`; returns the copy's new position. An entry that does not continue the copy
    /// (a gap, a version out of sequence, a document that no longer fits this node's budget)
    /// drops the copy, to be loaded afresh. Each entry (`offset`, frame `size`, edit) is
    /// charged as part of what the engine holds, under `bounds`, either way.
    pub(crate) fn follow(
        &self,
        pos: Position,
        epoch: u64,
        edits: Vec<(u64, usize, LoggedEdit)>,
        bounds: LogBounds,
    ) -> Option<Position> {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        for &(offset, size, _) in &edits {
            state.engine.seen(Position { offset, epoch }, size, bounds);
        }
        let replica = state.replica.as_mut()?;
        if replica.pos != pos {
            return None;
        }
        for (offset, _, edit) in edits {
            let continues = Some(offset) == replica.pos.offset.checked_add(1)
                && replica.doc.follow(edit.version, edit.op).is_ok();
            if !continues {
                state.replica = None;
                return None;
            }
            replica.pos = Position { offset, epoch };
        }
        state
            .engine
            .set_newest_snapshot(crate::store::escaped_len(replica.doc.text()));
        Some(replica.pos)
    }

    /// Applies an edit this node appended at `at` (an entry of `size` bytes, planned as
    /// `planned`), if the copy is still where the edit was prepared (`pos`); otherwise the copy
    /// already followed the log past it, or went. The entry is charged either way.
    pub(crate) fn commit(
        &self,
        prepared: Prepared,
        pos: Position,
        at: Position,
        planned: PlannedAppend,
        size: usize,
    ) {
        let mut state = lock(&self.state);
        state.engine.appended(planned, at, size);
        if let Some(replica) = state.replica.as_mut()
            && replica.pos == pos
            && replica.doc.version() == prepared.prepared_on()
        {
            replica.doc.commit(prepared);
            replica.pos = at;
        }
    }

    /// A fresh copy of the document at `version`, charged to this session's budgets (the
    /// snapshot it will make in the engine too), with `ops`, the operations that led to
    /// `version` (oldest first), in its operation log as far as they fit (see
    /// [`Document::seed_log`]).
    pub(crate) fn load_replica(
        &self,
        code: String,
        version: u64,
        ops: Vec<crate::ot::Operation>,
        pos: Position,
    ) -> Result<Replica, crate::document::EditError> {
        let snapshot = crate::store::escaped_len(&code);
        let mut doc = Document::loaded(code, version, self.limits, &self.budgets)?;
        doc.seed_log(ops);
        lock(&self.state).engine.set_newest_snapshot(snapshot);
        Ok(Replica { doc, pos })
    }

    /// Counts one more socket of `user` on this node; a user new here is charged
    /// [`PARTICIPANT_BYTES`] first.
    pub(crate) fn add_user(&self, user: &str) -> Result<(), Refused> {
        let mut state = lock(&self.state);
        if let Some(count) = state.users.get_mut(user) {
            *count = count.saturating_add(1);
            return Ok(());
        }
        state.charge.try_grow(PARTICIPANT_BYTES)?;
        state.users.insert(user.to_owned(), 1);
        Ok(())
    }

    /// Counts one socket of `user` fewer; the user's charge goes with its last socket here.
    pub(crate) fn remove_user(&self, user: &str) {
        let mut state = lock(&self.state);
        let last = match state.users.get_mut(user) {
            Some(count) => {
                *count = count.saturating_sub(1);
                *count == 0
            }
            None => false,
        };
        if last {
            state.users.remove(user);
            state.charge.shrink(PARTICIPANT_BYTES);
        }
    }

    /// The users joined through this node.
    pub(crate) fn local_users(&self) -> Vec<String> {
        lock(&self.state).users.keys().cloned().collect()
    }

    /// Whether anyone joined, as far as this node knows.
    pub(crate) fn joined_once(&self) -> bool {
        lock(&self.state).joined_once
    }

    /// Starts a keep-alive write if none is under way and the last one is older than `every`
    /// (or `force`); returns whether the caller should write.
    pub(crate) fn begin_refresh(&self, now: Instant, every: Duration, force: bool) -> bool {
        let mut state = lock(&self.state);
        if state.refreshing {
            return false;
        }
        let due = force
            || state
                .refreshed_at
                .is_none_or(|at| now.saturating_duration_since(at) >= every);
        if due {
            state.refreshing = true;
        }
        due
    }

    /// Ends a keep-alive write started with [`Session::begin_refresh`].
    pub(crate) fn end_refresh(&self, now: Instant, written: bool) {
        let mut state = lock(&self.state);
        state.refreshing = false;
        if written {
            state.refreshed_at = Some(now);
        }
    }
}

/// The two idle TTLs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ttls {
    /// For a session someone joined.
    pub(crate) idle: Duration,
    /// For a session nobody ever joined.
    pub(crate) unjoined: Duration,
}

impl SessionState {
    fn expired(&self, now: Instant, ttls: Ttls) -> bool {
        let ttl = if self.joined_once {
            ttls.idle
        } else {
            ttls.unjoined
        };
        self.sockets == 0 && now.saturating_duration_since(self.empty_since) >= ttl
    }
}

/// Why a session could not be created.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CreateError {
    /// The session limit was reached.
    #[error("session limit reached ({0} sessions); try again later")]
    Full(usize),
    /// This client already holds its share of live sessions.
    #[error(
        "too many sessions from your address (at most {0} live sessions per client); join an existing one or try again later"
    )]
    TooMany(usize),
    /// This client creates sessions too fast.
    #[error(
        "creating sessions too fast (at most {burst} at once, then {per_second} a second per client); try again later"
    )]
    TooFast {
        /// Creations allowed at once.
        burst: u32,
        /// Creations regained per second.
        per_second: u32,
    },
    /// The server's memory budget for session state is used up.
    #[error("the server's memory for sessions is full ({0} bytes); try again later")]
    OutOfMemory(usize),
    /// The sessions this client created use its whole share of the memory budget.
    #[error(
        "the sessions created from your address use their whole share of memory ({0} bytes); join an existing one or try again later"
    )]
    ShareFull(usize),
}

impl CreateError {
    /// Whether this refusal is the client's own share (429) rather than the server's (503).
    pub(crate) fn is_per_client(&self) -> bool {
        matches!(
            self,
            Self::TooMany(_) | Self::TooFast { .. } | Self::ShareFull(_)
        )
    }
}

/// How fast, and how many, sessions each client may create.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CreationLimits {
    /// Live sessions per client key (0: unlimited).
    pub(crate) per_client: usize,
    /// Creations at once per client key (0: no rate limit).
    pub(crate) burst: u32,
    /// Creations regained per second per client key.
    pub(crate) per_second: u32,
    /// Bytes of session state the sessions of one client key may hold together (0: no share
    /// besides the server-wide budget).
    pub(crate) bytes_per_client: usize,
}

#[derive(Debug)]
struct Map {
    sessions: HashMap<String, Arc<Session>>,
    last_sweep: Instant,
}

/// All sessions of one protocol instance.
#[derive(Debug)]
pub(crate) struct Registry {
    map: Mutex<Map>,
    max_sessions: usize,
    ttls: Ttls,
    sweep_every: Duration,
    limits: DocumentLimits,
    budget: Arc<MemoryBudget>,
    creation: CreationLimits,
    /// Live sessions per creator.
    creators: Shares<ClientKey>,
    /// Creation rate per creator.
    creation_rate: TokenBuckets<ClientKey>,
    /// Each creator's share of `budget`; a key is removed with its last session, so the table
    /// holds at most one entry per live session.
    client_budgets: Mutex<HashMap<ClientKey, Arc<MemoryBudget>>>,
}

impl Registry {
    pub(crate) fn new(
        max_sessions: usize,
        ttls: Ttls,
        limits: DocumentLimits,
        budget: Arc<MemoryBudget>,
        creation: CreationLimits,
        now: Instant,
    ) -> Self {
        // Each key in either table holds (or recently created) at least one session, so the
        // session limit bounds both tables.
        let max_keys = max_sessions.max(1);
        Self {
            map: Mutex::new(Map {
                sessions: HashMap::new(),
                last_sweep: now,
            }),
            max_sessions,
            ttls,
            sweep_every: ttls.idle.min(ttls.unjoined).min(Duration::from_secs(60)),
            limits,
            budget,
            creation,
            creators: Shares::new(creation.per_client, max_keys),
            creation_rate: TokenBuckets::new(creation.burst, creation.per_second, max_keys),
            client_budgets: Mutex::default(),
        }
    }

    /// Sessions currently held (expired ones not yet swept included).
    pub(crate) fn len(&self) -> usize {
        lock(&self.map).sessions.len()
    }

    /// The shared byte budget every session is charged to.
    pub(crate) fn budget(&self) -> &Arc<MemoryBudget> {
        &self.budget
    }

    /// Live sessions `key` created.
    pub(crate) fn created_by(&self, key: ClientKey) -> usize {
        self.creators.held(&key)
    }

    /// Bytes the sessions `key` created hold (0 when the share is off).
    pub(crate) fn state_bytes_of(&self, key: ClientKey) -> usize {
        lock(&self.client_budgets)
            .get(&key)
            .map_or(0, |budget| budget.used())
    }

    /// The budgets a new session of `creator` charges.
    fn budgets_for(&self, creator: ClientKey) -> Budgets {
        if self.creation.bytes_per_client == 0 {
            return Budgets::server(&self.budget);
        }
        let share = lock(&self.client_budgets)
            .entry(creator)
            .or_insert_with(|| Arc::new(MemoryBudget::new(self.creation.bytes_per_client)))
            .clone();
        Budgets::with_client(&self.budget, share)
    }

    /// Gives back one session of `creator`'s share; forgets the creator with its last session.
    fn release_creator(&self, creator: &ClientKey) {
        self.creators.release(creator);
        if self.creators.held(creator) == 0 {
            lock(&self.client_budgets).remove(creator);
        }
    }

    /// The live session `id`, if any.
    pub(crate) fn get(&self, id: &str, now: Instant) -> Option<Arc<Session>> {
        let mut map = lock(&self.map);
        self.maybe_sweep(&mut map, now);
        self.live(&mut map, id, now)
    }

    /// Creates a session with a fresh id for `creator`.
    pub(crate) fn create(
        &self,
        code: String,
        creator: ClientKey,
        now: Instant,
    ) -> Result<Arc<Session>, CreateError> {
        let mut map = lock(&self.map);
        self.maybe_sweep(&mut map, now);
        let id = loop {
            let id = uuid::Uuid::new_v4().to_string();
            if !map.sessions.contains_key(&id) {
                break id;
            }
        };
        self.insert(&mut map, id, code, creator, now)
    }

    /// The live session `id`, created empty for `creator` if this node does not hold it.
    pub(crate) fn get_or_create(
        &self,
        id: &str,
        creator: ClientKey,
        now: Instant,
    ) -> Result<Arc<Session>, CreateError> {
        let mut map = lock(&self.map);
        self.maybe_sweep(&mut map, now);
        match self.live(&mut map, id, now) {
            Some(session) => Ok(session),
            None => self.insert(&mut map, id.to_owned(), String::new(), creator, now),
        }
    }

    /// Counts one more open socket on session `id` (creating it if it expired meanwhile).
    pub(crate) fn attach(
        &self,
        id: &str,
        creator: ClientKey,
        now: Instant,
    ) -> Result<Arc<Session>, CreateError> {
        // Holding the map lock while counting the socket means a sweep cannot remove the session
        // between the lookup and the increment.
        let mut map = lock(&self.map);
        let session = match self.live(&mut map, id, now) {
            Some(session) => session,
            None => self.insert(&mut map, id.to_owned(), String::new(), creator, now)?,
        };
        let mut state = lock(&session.state);
        state.sockets = state.sockets.saturating_add(1);
        drop(state);
        Ok(session)
    }

    /// Counts one socket fewer on `session`; the idle clock starts when none are left. Returns
    /// whether that was this node's last socket on it.
    pub(crate) fn detach(&self, session: &Session, now: Instant) -> bool {
        let mut state = lock(&session.state);
        state.sockets = state.sockets.saturating_sub(1);
        if state.sockets == 0 {
            state.empty_since = now;
        }
        state.sockets == 0
    }

    /// Forgets session `id` at once (its creation could not be completed in the engine).
    pub(crate) fn remove(&self, id: &str) {
        let removed = lock(&self.map).sessions.remove(id);
        if let Some(session) = removed {
            self.release_creator(&session.creator);
        }
    }

    fn live(&self, map: &mut Map, id: &str, now: Instant) -> Option<Arc<Session>> {
        let session = map.sessions.get(id)?.clone();
        if lock(&session.state).expired(now, self.ttls) {
            map.sessions.remove(id);
            self.release_creator(&session.creator);
            tracing::debug!(session = id, "idle session removed");
            return None;
        }
        Some(session)
    }

    fn insert(
        &self,
        map: &mut Map,
        id: String,
        code: String,
        creator: ClientKey,
        now: Instant,
    ) -> Result<Arc<Session>, CreateError> {
        if map.sessions.len() >= self.max_sessions {
            self.sweep(map, now);
            if map.sessions.len() >= self.max_sessions {
                return Err(CreateError::Full(self.max_sessions));
            }
        }
        self.creators
            .try_acquire(&creator)
            .map_err(|refused| match refused {
                ShareRefused::PerKey(n) => CreateError::TooMany(n),
                ShareRefused::TooManyKeys(_) => CreateError::Full(self.max_sessions),
            })?;
        match self.build(&id, code, creator, now) {
            Ok(session) => {
                map.sessions.insert(id, session.clone());
                Ok(session)
            }
            Err(error) => {
                self.release_creator(&creator);
                Err(error)
            }
        }
    }

    fn build(
        &self,
        id: &str,
        code: String,
        creator: ClientKey,
        now: Instant,
    ) -> Result<Arc<Session>, CreateError> {
        if !self.creation_rate.check_at(&creator, now) {
            return Err(CreateError::TooFast {
                burst: self.creation.burst,
                per_second: self.creation.per_second,
            });
        }
        let budgets = self.budgets_for(creator);
        let charge =
            Charge::try_new(&budgets, SESSION_OVERHEAD_BYTES).map_err(|refused| match refused {
                Refused::Server(limit) => CreateError::OutOfMemory(limit),
                Refused::Client(limit) => CreateError::ShareFull(limit),
            })?;
        let doc = Document::charged(code, self.limits, &budgets).map_err(|error| match error {
            crate::document::EditError::ShareFull { limit } => CreateError::ShareFull(limit),
            _ => CreateError::OutOfMemory(self.budget.limit()),
        })?;
        let engine = EngineBytes::new(&budgets);
        Ok(Arc::new(Session {
            id: id.to_owned(),
            creator,
            budgets,
            limits: self.limits,
            edit_turn: tokio::sync::Mutex::new(()),
            state: Mutex::new(SessionState {
                generation: None,
                // The copy matches the session only once its record is written from it (see
                // `Session::adopt`); until then it is at version 0 with an empty log position.
                replica: Some(Replica {
                    doc,
                    pos: Position {
                        offset: 0,
                        epoch: 0,
                    },
                }),
                engine,
                charge,
                users: HashMap::new(),
                joined_once: false,
                sockets: 0,
                empty_since: now,
                refreshed_at: None,
                refreshing: false,
            }),
        }))
    }

    fn maybe_sweep(&self, map: &mut Map, now: Instant) {
        if now.saturating_duration_since(map.last_sweep) >= self.sweep_every {
            self.sweep(map, now);
        }
    }

    fn sweep(&self, map: &mut Map, now: Instant) {
        map.last_sweep = now;
        let ttls = self.ttls;
        let before = map.sessions.len();
        map.sessions.retain(|_, session| {
            let expired = lock(&session.state).expired(now, ttls);
            if expired {
                self.release_creator(&session.creator);
            }
            !expired
        });
        let removed = before.saturating_sub(map.sessions.len());
        if removed > 0 {
            tracing::debug!(removed, "idle sessions swept");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [127, 0, 0, 1];

    fn key(ip: [u8; 4]) -> ClientKey {
        ClientKey::from_ip(ip.into())
    }

    fn registry_with(
        max: usize,
        budget: usize,
        creation: CreationLimits,
        now: Instant,
    ) -> Registry {
        Registry::new(
            max,
            Ttls {
                idle: Duration::from_secs(60),
                unjoined: Duration::from_secs(60),
            },
            DocumentLimits {
                max_bytes: 100,
                max_log_ops: 10,
                max_log_bytes: 1000,
            },
            Arc::new(MemoryBudget::new(budget)),
            creation,
            now,
        )
    }

    fn registry(max: usize, now: Instant) -> Registry {
        registry_with(
            max,
            usize::MAX,
            CreationLimits {
                per_client: 0,
                burst: 0,
                per_second: 0,
                bytes_per_client: 0,
            },
            now,
        )
    }

    #[test]
    fn session_ids_are_checked() {
        assert!(is_valid_session_id("abc123"));
        assert!(is_valid_session_id("0b8c-4a_Z"));
        assert!(!is_valid_session_id(""));
        assert!(!is_valid_session_id("a/b"));
        assert!(!is_valid_session_id("é"));
        assert!(!is_valid_session_id(&"a".repeat(65)));
    }

    #[test]
    fn an_empty_session_expires_after_the_ttl_but_not_while_someone_is_connected() {
        let t0 = Instant::now();
        let registry = registry(10, t0);
        let created = registry.create("x".into(), key(KEY), t0).unwrap();
        let id = created.id.clone();
        let session = registry.attach(&id, key(KEY), t0).unwrap();
        assert!(Arc::ptr_eq(&created, &session));
        // Connected for two hours: still there.
        let later = t0 + Duration::from_secs(7200);
        assert!(registry.get(&id, later).is_some());
        assert!(registry.detach(&session, later));
        assert!(registry.get(&id, later + Duration::from_secs(59)).is_some());
        assert!(registry.get(&id, later + Duration::from_secs(60)).is_none());
        assert_eq!(registry.len(), 0);
    }

    #[test]
    fn the_session_limit_counts_only_live_sessions() {
        let t0 = Instant::now();
        let registry = registry(2, t0);
        registry.get_or_create("a", key(KEY), t0).unwrap();
        registry.get_or_create("b", key(KEY), t0).unwrap();
        assert_eq!(
            registry.get_or_create("c", key(KEY), t0).unwrap_err(),
            CreateError::Full(2)
        );
        // Existing sessions are still reachable at the limit.
        assert!(registry.get_or_create("a", key(KEY), t0).is_ok());
        // Once they have idled out, new ones fit again.
        let later = t0 + Duration::from_secs(61);
        assert!(registry.create(String::new(), key(KEY), later).is_ok());
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn each_client_has_a_share_of_live_sessions_and_a_creation_rate() {
        let t0 = Instant::now();
        let registry = registry_with(
            100,
            usize::MAX,
            CreationLimits {
                per_client: 3,
                burst: 4,
                per_second: 1,
                bytes_per_client: 0,
            },
            t0,
        );
        let a = key([10, 0, 0, 1]);
        let b = key([10, 0, 0, 2]);
        for id in ["a1", "a2", "a3"] {
            registry.get_or_create(id, a, t0).unwrap();
        }
        assert_eq!(
            registry.get_or_create("a4", a, t0).unwrap_err(),
            CreateError::TooMany(3)
        );
        // Joining an existing session is not creating one.
        assert!(registry.get_or_create("a1", b, t0).is_ok());
        assert_eq!(registry.created_by(a), 3);
        // Another client is unaffected; its own rate applies.
        for _ in 0..3 {
            registry.create(String::new(), b, t0).unwrap();
        }
        let c = key([10, 0, 0, 3]);
        let c_registry = registry_with(
            100,
            usize::MAX,
            CreationLimits {
                per_client: 0,
                burst: 2,
                per_second: 1,
                bytes_per_client: 0,
            },
            t0,
        );
        assert!(c_registry.create(String::new(), c, t0).is_ok());
        assert!(c_registry.create(String::new(), c, t0).is_ok());
        assert!(matches!(
            c_registry.create(String::new(), c, t0),
            Err(CreateError::TooFast { .. })
        ));
        let later = t0 + Duration::from_secs(1);
        assert!(c_registry.create(String::new(), c, later).is_ok());
        // The share comes back when the sessions expire.
        let expired = t0 + Duration::from_secs(61);
        assert!(registry.get("a1", expired).is_none());
        registry.get_or_create("a5", a, expired).unwrap();
        assert_eq!(registry.created_by(a), 1);
    }

    #[test]
    fn sessions_are_charged_to_the_budget_and_refused_when_it_is_full() {
        let t0 = Instant::now();
        let limits = CreationLimits {
            per_client: 0,
            burst: 0,
            per_second: 0,
            bytes_per_client: 0,
        };
        let registry = registry_with(100, 2 * SESSION_OVERHEAD_BYTES + 50, limits, t0);
        let first = registry.create("x".repeat(40), key(KEY), t0).unwrap();
        assert_eq!(registry.budget().used(), SESSION_OVERHEAD_BYTES + 40);
        assert_eq!(
            registry.create("y".repeat(40), key(KEY), t0).unwrap_err(),
            CreateError::OutOfMemory(2 * SESSION_OVERHEAD_BYTES + 50)
        );
        // The refused session gave back what it had charged.
        assert_eq!(registry.budget().used(), SESSION_OVERHEAD_BYTES + 40);
        let id = first.id.clone();
        drop(first);
        assert!(registry.get(&id, t0 + Duration::from_secs(61)).is_none());
        assert_eq!(registry.budget().used(), 0);
    }

    #[test]
    fn a_session_nobody_joined_expires_after_the_shorter_ttl() {
        let t0 = Instant::now();
        let registry = Registry::new(
            10,
            Ttls {
                idle: Duration::from_secs(3600),
                unjoined: Duration::from_secs(300),
            },
            DocumentLimits {
                max_bytes: 100,
                max_log_ops: 10,
                max_log_bytes: 1000,
            },
            Arc::new(MemoryBudget::unlimited()),
            CreationLimits {
                per_client: 0,
                burst: 0,
                per_second: 0,
                bytes_per_client: 0,
            },
            t0,
        );
        registry.get_or_create("never", key(KEY), t0).unwrap();
        let joined = registry.get_or_create("joined", key(KEY), t0).unwrap();
        lock(&joined.state).joined_once = true;
        let after = t0 + Duration::from_secs(300);
        assert!(registry.get("never", after).is_none());
        assert!(registry.get("joined", after).is_some());
        assert!(
            registry
                .get("joined", t0 + Duration::from_secs(3600))
                .is_none()
        );
    }

    #[test]
    fn each_client_has_a_share_of_the_memory_budget() {
        let t0 = Instant::now();
        let share = 2 * SESSION_OVERHEAD_BYTES + 100;
        let registry = registry_with(
            100,
            usize::MAX,
            CreationLimits {
                per_client: 0,
                burst: 0,
                per_second: 0,
                bytes_per_client: share,
            },
            t0,
        );
        let a = key([10, 0, 0, 1]);
        let first = registry.create("x".repeat(90), a, t0).unwrap();
        assert_eq!(
            registry.create("y".repeat(90), a, t0).unwrap_err(),
            CreateError::ShareFull(share)
        );
        assert!(registry.create(String::new(), a, t0).is_ok());
        assert_eq!(registry.state_bytes_of(a), 2 * SESSION_OVERHEAD_BYTES + 90);
        // Others have their own share.
        let b = key([10, 0, 0, 2]);
        assert!(registry.create("z".repeat(90), b, t0).is_ok());
        // The share and its table entry go with the client's last session.
        drop(first);
        let later = t0 + Duration::from_secs(61);
        assert!(registry.get("nothing", later).is_none());
        registry.sweep(&mut lock(&registry.map), later);
        assert_eq!(registry.state_bytes_of(a), 0);
        assert!(lock(&registry.client_budgets).is_empty());
        assert_eq!(registry.budget().used(), 0);
    }
}
