//! The session registry: a bounded map of sessions, each a document plus who is connected, with
//! idle sessions removed once nobody has been connected for the idle TTL.
//!
//! Expiry is lazy: a lookup treats an expired session as gone (and removes it), and the whole map
//! is swept at most once per sweep interval and whenever it is full. Time is passed in, so the
//! policy is tested without waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchboard_core::sync::lock;
use switchboard_core::{ClientKey, MemoryBudget, ShareRefused, Shares, TokenBuckets};

use crate::budget::{Budgets, Charge, Refused};
use crate::document::{Document, DocumentLimits};

/// Longest session id, in bytes.
pub const MAX_SESSION_ID_LEN: usize = 64;

/// Bytes charged for a session besides its document: the registry entry, the id and topic
/// strings, the session and state structs, the language (at most 64 characters) and the
/// per-client table entries. A deliberate over-estimate (the structs add up to about 600 bytes).
pub const SESSION_OVERHEAD_BYTES: usize = 1024;

/// Bytes charged per participant (distinct user) of a session: the user id and display name
/// (at most 128 characters each, so at most 512 bytes each in UTF-8), their map entries here and
/// in the presence table. An over-estimate, like [`SESSION_OVERHEAD_BYTES`].
pub const PARTICIPANT_BYTES: usize = 2048;

/// Whether `id` is a well-formed session id: 1 to 64 ASCII letters, digits, `-` or `_`.
pub fn is_valid_session_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SESSION_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One collaborative session.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) id: String,
    pub(crate) topic: String,
    /// Who created it: the session counts against this client's share until it is removed.
    creator: ClientKey,
    pub(crate) state: Mutex<SessionState>,
}

/// The mutable part of a session, behind its lock.
#[derive(Debug)]
pub(crate) struct SessionState {
    pub(crate) doc: Document,
    pub(crate) language: String,
    /// Display names of the users present (first join wins).
    pub(crate) usernames: HashMap<String, String>,
    /// The session's fixed overhead plus [`PARTICIPANT_BYTES`] per entry of `usernames`.
    pub(crate) charge: Charge,
    /// Whether anyone ever joined: a session nobody joined expires after the shorter TTL.
    pub(crate) joined_once: bool,
    /// Open sockets on this session, joined or not.
    sockets: usize,
    /// When the last socket left (or the session was created).
    empty_since: Instant,
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
        language: String,
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
        self.insert(&mut map, id, code, language, creator, now)
    }

    /// The live session `id`, created empty (with `language`) for `creator` if it does not exist.
    pub(crate) fn get_or_create(
        &self,
        id: &str,
        language: &str,
        creator: ClientKey,
        now: Instant,
    ) -> Result<Arc<Session>, CreateError> {
        let mut map = lock(&self.map);
        self.maybe_sweep(&mut map, now);
        match self.live(&mut map, id, now) {
            Some(session) => Ok(session),
            None => self.insert(
                &mut map,
                id.to_owned(),
                String::new(),
                language.to_owned(),
                creator,
                now,
            ),
        }
    }

    /// Counts one more open socket on session `id` (creating it if it expired meanwhile).
    pub(crate) fn attach(
        &self,
        id: &str,
        language: &str,
        creator: ClientKey,
        now: Instant,
    ) -> Result<Arc<Session>, CreateError> {
        // Holding the map lock while counting the socket means a sweep cannot remove the session
        // between the lookup and the increment.
        let mut map = lock(&self.map);
        let session = match self.live(&mut map, id, now) {
            Some(session) => session,
            None => self.insert(
                &mut map,
                id.to_owned(),
                String::new(),
                language.to_owned(),
                creator,
                now,
            )?,
        };
        let mut state = lock(&session.state);
        state.sockets = state.sockets.saturating_add(1);
        drop(state);
        Ok(session)
    }

    /// Counts one socket fewer on `session`; the idle clock starts when none are left.
    pub(crate) fn detach(&self, session: &Session, now: Instant) {
        let mut state = lock(&session.state);
        state.sockets = state.sockets.saturating_sub(1);
        if state.sockets == 0 {
            state.empty_since = now;
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
        language: String,
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
        match self.build(&id, code, language, creator, now) {
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
        language: String,
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
        Ok(Arc::new(Session {
            topic: format!("collab:{id}"),
            id: id.to_owned(),
            creator,
            state: Mutex::new(SessionState {
                doc,
                language,
                usernames: HashMap::new(),
                charge,
                joined_once: false,
                sockets: 0,
                empty_since: now,
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
        let created = registry
            .create("x".into(), "python".into(), key(KEY), t0)
            .unwrap();
        let id = created.id.clone();
        let session = registry.attach(&id, "js", key(KEY), t0).unwrap();
        assert!(Arc::ptr_eq(&created, &session));
        // Connected for two hours: still there.
        let later = t0 + Duration::from_secs(7200);
        assert!(registry.get(&id, later).is_some());
        registry.detach(&session, later);
        assert!(registry.get(&id, later + Duration::from_secs(59)).is_some());
        assert!(registry.get(&id, later + Duration::from_secs(60)).is_none());
        assert_eq!(registry.len(), 0);
    }

    #[test]
    fn the_session_limit_counts_only_live_sessions() {
        let t0 = Instant::now();
        let registry = registry(2, t0);
        registry.get_or_create("a", "js", key(KEY), t0).unwrap();
        registry.get_or_create("b", "js", key(KEY), t0).unwrap();
        assert_eq!(
            registry.get_or_create("c", "js", key(KEY), t0).unwrap_err(),
            CreateError::Full(2)
        );
        // Existing sessions are still reachable at the limit.
        assert!(registry.get_or_create("a", "js", key(KEY), t0).is_ok());
        // Once they have idled out, new ones fit again.
        let later = t0 + Duration::from_secs(61);
        assert!(
            registry
                .create(String::new(), "js".into(), key(KEY), later)
                .is_ok()
        );
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
            registry.get_or_create(id, "js", a, t0).unwrap();
        }
        assert_eq!(
            registry.get_or_create("a4", "js", a, t0).unwrap_err(),
            CreateError::TooMany(3)
        );
        // Joining an existing session is not creating one.
        assert!(registry.get_or_create("a1", "js", b, t0).is_ok());
        assert_eq!(registry.created_by(a), 3);
        // Another client is unaffected; its own rate applies.
        for _ in 0..3 {
            registry.create(String::new(), "js".into(), b, t0).unwrap();
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
        assert!(c_registry.create(String::new(), "js".into(), c, t0).is_ok());
        assert!(c_registry.create(String::new(), "js".into(), c, t0).is_ok());
        assert!(matches!(
            c_registry.create(String::new(), "js".into(), c, t0),
            Err(CreateError::TooFast { .. })
        ));
        let later = t0 + Duration::from_secs(1);
        assert!(
            c_registry
                .create(String::new(), "js".into(), c, later)
                .is_ok()
        );
        // The share comes back when the sessions expire.
        let expired = t0 + Duration::from_secs(61);
        assert!(registry.get("a1", expired).is_none());
        registry.get_or_create("a5", "js", a, expired).unwrap();
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
        let first = registry
            .create("x".repeat(40), "js".into(), key(KEY), t0)
            .unwrap();
        assert_eq!(registry.budget().used(), SESSION_OVERHEAD_BYTES + 40);
        assert_eq!(
            registry
                .create("y".repeat(40), "js".into(), key(KEY), t0)
                .unwrap_err(),
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
        registry.get_or_create("never", "js", key(KEY), t0).unwrap();
        let joined = registry
            .get_or_create("joined", "js", key(KEY), t0)
            .unwrap();
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
        let first = registry.create("x".repeat(90), "js".into(), a, t0).unwrap();
        assert_eq!(
            registry
                .create("y".repeat(90), "js".into(), a, t0)
                .unwrap_err(),
            CreateError::ShareFull(share)
        );
        assert!(registry.create(String::new(), "js".into(), a, t0).is_ok());
        assert_eq!(registry.state_bytes_of(a), 2 * SESSION_OVERHEAD_BYTES + 90);
        // Others have their own share.
        let b = key([10, 0, 0, 2]);
        assert!(registry.create("z".repeat(90), "js".into(), b, t0).is_ok());
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
