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

use crate::document::{Document, DocumentLimits};

/// Longest session id, in bytes.
pub const MAX_SESSION_ID_LEN: usize = 64;

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
    pub(crate) state: Mutex<SessionState>,
}

/// The mutable part of a session, behind its lock.
#[derive(Debug)]
pub(crate) struct SessionState {
    pub(crate) doc: Document,
    pub(crate) language: String,
    /// Display names of the users present (first join wins).
    pub(crate) usernames: HashMap<String, String>,
    /// Open sockets on this session, joined or not.
    sockets: usize,
    /// When the last socket left (or the session was created).
    empty_since: Instant,
}

impl SessionState {
    fn expired(&self, now: Instant, ttl: Duration) -> bool {
        self.sockets == 0 && now.saturating_duration_since(self.empty_since) >= ttl
    }
}

/// The session limit was reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("session limit reached ({0} sessions); try again later")]
pub(crate) struct Full(pub(crate) usize);

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
    idle_ttl: Duration,
    sweep_every: Duration,
    limits: DocumentLimits,
}

impl Registry {
    pub(crate) fn new(
        max_sessions: usize,
        idle_ttl: Duration,
        limits: DocumentLimits,
        now: Instant,
    ) -> Self {
        Self {
            map: Mutex::new(Map {
                sessions: HashMap::new(),
                last_sweep: now,
            }),
            max_sessions,
            idle_ttl,
            sweep_every: idle_ttl.min(Duration::from_secs(60)),
            limits,
        }
    }

    /// Sessions currently held (expired ones not yet swept included).
    pub(crate) fn len(&self) -> usize {
        lock(&self.map).sessions.len()
    }

    /// The live session `id`, if any.
    pub(crate) fn get(&self, id: &str, now: Instant) -> Option<Arc<Session>> {
        let mut map = lock(&self.map);
        self.maybe_sweep(&mut map, now);
        self.live(&mut map, id, now)
    }

    /// Creates a session with a fresh id.
    pub(crate) fn create(
        &self,
        code: String,
        language: String,
        now: Instant,
    ) -> Result<Arc<Session>, Full> {
        let mut map = lock(&self.map);
        self.maybe_sweep(&mut map, now);
        let id = loop {
            let id = uuid::Uuid::new_v4().to_string();
            if !map.sessions.contains_key(&id) {
                break id;
            }
        };
        self.insert(&mut map, id, code, language, now)
    }

    /// The live session `id`, created empty (with `language`) if it does not exist.
    pub(crate) fn get_or_create(
        &self,
        id: &str,
        language: &str,
        now: Instant,
    ) -> Result<Arc<Session>, Full> {
        let mut map = lock(&self.map);
        self.maybe_sweep(&mut map, now);
        match self.live(&mut map, id, now) {
            Some(session) => Ok(session),
            None => self.insert(
                &mut map,
                id.to_owned(),
                String::new(),
                language.to_owned(),
                now,
            ),
        }
    }

    /// Counts one more open socket on session `id` (creating it if it expired meanwhile).
    pub(crate) fn attach(
        &self,
        id: &str,
        language: &str,
        now: Instant,
    ) -> Result<Arc<Session>, Full> {
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
                now,
            )?,
        };
        lock(&session.state).sockets += 1;
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
        if lock(&session.state).expired(now, self.idle_ttl) {
            map.sessions.remove(id);
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
        now: Instant,
    ) -> Result<Arc<Session>, Full> {
        if map.sessions.len() >= self.max_sessions {
            self.sweep(map, now);
            if map.sessions.len() >= self.max_sessions {
                return Err(Full(self.max_sessions));
            }
        }
        let session = Arc::new(Session {
            topic: format!("collab:{id}"),
            id: id.clone(),
            state: Mutex::new(SessionState {
                doc: Document::new(code, self.limits),
                language,
                usernames: HashMap::new(),
                sockets: 0,
                empty_since: now,
            }),
        });
        map.sessions.insert(id, session.clone());
        Ok(session)
    }

    fn maybe_sweep(&self, map: &mut Map, now: Instant) {
        if now.saturating_duration_since(map.last_sweep) >= self.sweep_every {
            self.sweep(map, now);
        }
    }

    fn sweep(&self, map: &mut Map, now: Instant) {
        map.last_sweep = now;
        let ttl = self.idle_ttl;
        let before = map.sessions.len();
        map.sessions
            .retain(|_, session| !lock(&session.state).expired(now, ttl));
        let removed = before - map.sessions.len();
        if removed > 0 {
            tracing::debug!(removed, "idle sessions swept");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(max: usize, now: Instant) -> Registry {
        Registry::new(
            max,
            Duration::from_secs(60),
            DocumentLimits {
                max_bytes: 100,
                max_log_ops: 10,
                max_log_bytes: 1000,
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
        let created = registry.create("x".into(), "python".into(), t0).unwrap();
        let id = created.id.clone();
        let session = registry.attach(&id, "js", t0).unwrap();
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
        registry.get_or_create("a", "js", t0).unwrap();
        registry.get_or_create("b", "js", t0).unwrap();
        assert_eq!(registry.get_or_create("c", "js", t0).unwrap_err(), Full(2));
        // Existing sessions are still reachable at the limit.
        assert!(registry.get_or_create("a", "js", t0).is_ok());
        // Once they have idled out, new ones fit again.
        let later = t0 + Duration::from_secs(61);
        assert!(registry.create(String::new(), "js".into(), later).is_ok());
        assert_eq!(registry.len(), 1);
    }
}
