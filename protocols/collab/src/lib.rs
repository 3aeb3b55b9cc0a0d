//! collab: collaborative code-editing sessions that never lose a keystroke.
//!
//! Participants connect to `/ws/<sessionId>` (a session that does not exist yet is created on
//! first connect), send `join-session`, and then share one document, their cursors, the session's
//! language and code-execution requests and results. Sessions are also created and inspected over
//! REST (`POST /api/sessions`, `GET /api/sessions/<id>`).
//!
//! Edits travel either as the full text or as an operation (`{baseVersion, ops}` in the
//! retain/insert/delete form). The server keeps each document with a version and a bounded log of
//! recent operations, and transforms an operation made on an older version against everything
//! applied since ([`ot`], [`Document`]), so two people typing at once both keep their edits. The
//! matching client algorithm is [`ClientDocument`]. See `docs/protocols/collab.md`.
//!
//! Plug it into the runtime like any protocol:
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use std::sync::Arc;
//! use switchboard_collab::{Collab, Config};
//! let (app, _handle) = switchboard_server::router(
//!     Arc::new(Collab::new(Config::default())),
//!     switchboard_server::ServerConfig::default(),
//! );
//! # let _ = app; Ok(()) }
//! ```

mod budget;
mod client;
mod document;
mod messages;
pub mod ot;
mod sessions;
mod web;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Map, Value, json};
use switchboard_core::sync::lock;
use switchboard_core::{
    Broadcaster, ClientKey, CloseReason, Context, Engine, Frame, Handshake, HttpRequest,
    HttpResponse, LocalBroadcaster, LocalPresence, MemoryBudget, Peer, Presence, Protocol, Reject,
};
use tracing::debug;

pub use client::{ClientDocument, OutgoingEdit};
pub use document::{Applied, Document, DocumentLimits, EditError, TEXT_SLACK_BYTES};
pub use messages::{
    Change, ClientMessage, ExecuteCode, INVALID_TYPE, Join, MAX_CURSOR_BYTES,
    MAX_ERROR_MESSAGE_BYTES, MAX_LANGUAGE_CHARS, MAX_USER_ID_CHARS, MAX_USERNAME_CHARS, ParseError,
    Participant, parse,
};
pub use sessions::{
    MAX_SESSION_ID_LEN, PARTICIPANT_BYTES, SESSION_OVERHEAD_BYTES, is_valid_session_id,
};

use budget::RateBucket;
use messages::{CodeUpdate, SessionState, error_frame, frame};
use sessions::{CreationLimits, Registry, Session, Ttls};

/// JSON escaping can turn one byte of text into six (`\u0001`); frames are sized for that.
const JSON_ESCAPE_FACTOR: usize = 6;
/// Room for the envelope and the rest of the payload around a maximal document.
const FRAME_OVERHEAD: usize = 64 * 1024;

/// `session-state` frames one connection may receive at once (its join included)...
pub const STATE_FRAME_BURST: u32 = 10;
/// ...and regains per second. Past that allowance the connection is closed with 1008.
pub const STATE_FRAMES_PER_SECOND: u32 = 1;

/// Limits and defaults of the collab protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Largest document, in UTF-8 bytes. Edits that would exceed it are refused.
    pub max_document_bytes: usize,
    /// Distinct users per session; a further user's `join-session` is refused.
    pub max_participants: usize,
    /// Sessions in total; creating more (REST or first connect) is refused with 503.
    pub max_sessions: usize,
    /// Live sessions one client (a [`ClientKey`]: IPv4 address or IPv6 /64) may have created;
    /// more are refused with 429 (REST and upgrade). 0 means unlimited.
    pub max_sessions_per_client: usize,
    /// Sessions one client may create at once (token bucket burst); 0 disables the rate limit.
    pub session_create_burst: u32,
    /// Session creations a client regains per second.
    pub session_create_per_second: u32,
    /// A session someone joined is removed after having no open socket for this long.
    pub idle_ttl: Duration,
    /// A session nobody ever joined is removed after having no open socket for this long (or
    /// `idle_ttl` if that is shorter), so an abandoned flood of created sessions frees itself
    /// quickly.
    pub unjoined_ttl: Duration,
    /// Recent operations kept per session to transform late edits against. An edit based on an
    /// older version is refused and the client resyncs.
    pub max_op_log: usize,
    /// Bytes the per-session operation log may hold ([`ot::Operation::weight`]); a hard bound,
    /// also for the newest entry: an operation heavier than this is refused.
    pub max_op_log_bytes: usize,
    /// Frames that fan out (`code-change`, `cursor-move`, `language-change`, `execute-code`,
    /// `execution-result`) one connection may send at once; 0 disables the limit.
    pub relay_burst: u32,
    /// Such frames a connection regains per second.
    pub relay_per_second: u32,
    /// Bytes all sessions together may hold (documents, operation logs, participants and fixed
    /// per-session overhead). When reached, new sessions, joins of new users and growing edits
    /// are refused with the protocol's error; existing state is kept.
    pub max_state_bytes: usize,
    /// Bytes of session state the sessions created by one client (a [`ClientKey`]) may hold
    /// together, so that one address cannot take the whole `max_state_bytes`; over it, that
    /// client's new sessions get 429 and its sessions' growing edits and new joins are refused.
    /// 0 means no share besides `max_state_bytes`.
    pub max_state_bytes_per_client: usize,
    /// Language of a session created without one.
    pub default_language: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_document_bytes: 1024 * 1024,
            max_participants: 50,
            max_sessions: 10_000,
            max_sessions_per_client: 100,
            session_create_burst: 20,
            session_create_per_second: 1,
            idle_ttl: Duration::from_secs(3600),
            unjoined_ttl: Duration::from_secs(300),
            max_op_log: 1000,
            max_op_log_bytes: 2 * 1024 * 1024,
            relay_burst: 100,
            relay_per_second: 50,
            max_state_bytes: 256 * 1024 * 1024,
            max_state_bytes_per_client: 32 * 1024 * 1024,
            default_language: "javascript".to_owned(),
        }
    }
}

impl Config {
    /// The WebSocket frame limit this configuration needs: a full-text change of a maximal
    /// document, even with every byte JSON-escaped, plus room for the envelope.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_document_bytes
            .saturating_mul(JSON_ESCAPE_FACTOR)
            .saturating_add(FRAME_OVERHEAD)
    }

    /// The largest frame the server sends: a `code-update` carrying a maximal document and an
    /// operation inserting all of it, both fully escaped; with the default limits about 12 MiB.
    /// Reported to the runtime through `Protocol::max_outbound_frame_bytes`, which sizes each
    /// socket's write-buffer bound to hold one.
    pub fn max_outbound_frame_bytes(&self) -> usize {
        self.max_document_bytes
            .saturating_mul(2 * JSON_ESCAPE_FACTOR)
            .saturating_add(FRAME_OVERHEAD)
    }

    /// The most bytes one session can have charged to the state budget:
    /// `SESSION_OVERHEAD_BYTES + max_document_bytes + TEXT_SLACK_BYTES + max_op_log_bytes
    /// + max_participants × PARTICIPANT_BYTES` (see "Limits and worst-case memory" in
    /// `docs/protocols/collab.md`).
    pub fn worst_case_session_bytes(&self) -> usize {
        SESSION_OVERHEAD_BYTES
            .saturating_add(self.max_document_bytes)
            .saturating_add(TEXT_SLACK_BYTES)
            .saturating_add(self.max_op_log_bytes)
            .saturating_add(self.max_participants.saturating_mul(PARTICIPANT_BYTES))
    }

    /// The most bytes all session state can have charged: the smaller of `max_state_bytes` and
    /// `max_sessions × worst_case_session_bytes()`.
    pub fn worst_case_state_bytes(&self) -> usize {
        self.max_state_bytes.min(
            self.max_sessions
                .saturating_mul(self.worst_case_session_bytes()),
        )
    }

    fn document_limits(&self) -> DocumentLimits {
        DocumentLimits {
            max_bytes: self.max_document_bytes,
            max_log_ops: self.max_op_log,
            max_log_bytes: self.max_op_log_bytes,
        }
    }
}

/// The collab protocol.
pub struct Collab {
    config: Config,
    sessions: Registry,
    broadcaster: Arc<dyn Broadcaster>,
    presence: Arc<dyn Presence>,
}

impl std::fmt::Debug for Collab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collab")
            .field("config", &self.config)
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

impl Collab {
    /// A collab server with in-process fan-out and presence.
    pub fn new(config: Config) -> Self {
        Self::with_backends(
            config,
            Arc::new(LocalBroadcaster::new()),
            Arc::new(LocalPresence::new()),
        )
    }

    /// A collab server with the given fan-out and presence backends.
    pub fn with_backends(
        config: Config,
        broadcaster: Arc<dyn Broadcaster>,
        presence: Arc<dyn Presence>,
    ) -> Self {
        let sessions = Registry::new(
            config.max_sessions,
            Ttls {
                idle: config.idle_ttl,
                // Never longer than the TTL of a session someone joined.
                unjoined: config.unjoined_ttl.min(config.idle_ttl),
            },
            config.document_limits(),
            Arc::new(MemoryBudget::new(config.max_state_bytes)),
            CreationLimits {
                per_client: config.max_sessions_per_client,
                burst: config.session_create_burst,
                per_second: config.session_create_per_second,
                bytes_per_client: config.max_state_bytes_per_client,
            },
            Instant::now(),
        );
        Self {
            config,
            sessions,
            broadcaster,
            presence,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Sessions currently held in memory (idle ones awaiting removal included).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Bytes of session state charged to the server-wide budget now (never above
    /// [`Config::max_state_bytes`] nor [`Config::worst_case_state_bytes`]).
    pub fn state_bytes(&self) -> usize {
        self.sessions.budget().used()
    }

    /// The server-wide budget session state is charged to.
    pub fn budget(&self) -> &MemoryBudget {
        self.sessions.budget()
    }

    /// Bytes of session state charged to the client at `ip` (the sessions it created; its share
    /// of [`Config::max_state_bytes_per_client`]).
    pub fn state_bytes_of(&self, ip: std::net::IpAddr) -> usize {
        self.sessions.state_bytes_of(ClientKey::from_ip(ip))
    }

    /// Live sessions the client at `ip` has created (its share of [`Config::max_sessions_per_client`]).
    pub fn sessions_created_by(&self, ip: std::net::IpAddr) -> usize {
        self.sessions.created_by(ClientKey::from_ip(ip))
    }
}

/// Who a joined connection is.
#[derive(Debug, Clone)]
struct Identity {
    user_id: String,
}

/// Per-connection state of collab.
#[derive(Debug)]
pub struct CollabConn {
    session_id: String,
    session: Option<Arc<Session>>,
    user: Option<Identity>,
    /// Who is connecting, for the per-client share of session creation.
    client: ClientKey,
    /// This connection's allowance of frames that reach the session.
    relays: RateBucket,
    /// This connection's allowance of `session-state` frames.
    resyncs: RateBucket,
}

/// The session id of a WebSocket path `/ws/<sessionId>`.
fn session_id_from_path(path: &str) -> Result<&str, Reject> {
    let Some(id) = path.strip_prefix("/ws/") else {
        return Err(Reject::NotFound);
    };
    let id = id.strip_suffix('/').unwrap_or(id);
    if id.is_empty() || id.contains('/') {
        return Err(Reject::NotFound);
    }
    if !is_valid_session_id(id) {
        return Err(Reject::BadRequest(format!(
            "invalid session id: use 1 to {MAX_SESSION_ID_LEN} letters, digits, '-' or '_'"
        )));
    }
    Ok(id)
}

impl Protocol for Collab {
    type Conn = CollabConn;

    fn name(&self) -> &'static str {
        "collab"
    }

    fn admit(&self, handshake: &Handshake<'_>) -> Result<CollabConn, Reject> {
        let id = session_id_from_path(handshake.path)?;
        let client = ClientKey::from_ip(handshake.client_ip);
        let now = Instant::now();
        self.sessions
            .get_or_create(id, &self.config.default_language, client, now)
            .map_err(|refused| {
                if refused.is_per_client() {
                    Reject::TooMany(refused.to_string())
                } else {
                    Reject::Unavailable(refused.to_string())
                }
            })?;
        Ok(CollabConn {
            session_id: id.to_owned(),
            session: None,
            user: None,
            client,
            relays: RateBucket::new(self.config.relay_burst, now),
            resyncs: RateBucket::new(STATE_FRAME_BURST, now),
        })
    }

    async fn on_open(&self, conn: &mut CollabConn, cx: &Context<'_>) {
        let peer = cx.peer();
        match self.sessions.attach(
            &conn.session_id,
            &self.config.default_language,
            conn.client,
            Instant::now(),
        ) {
            Ok(session) => conn.session = Some(session),
            Err(refused) => {
                // Only when the session idled out between admission and open and could not be
                // created again (a limit was reached meanwhile).
                let _ = peer.send(error_frame(&refused.to_string()));
                peer.close(CloseReason::new(
                    CloseReason::POLICY,
                    "session could not be created",
                ));
            }
        }
    }

    async fn on_text(&self, conn: &mut CollabConn, cx: &Context<'_>, text: &str) {
        let peer = cx.peer();
        self.handle(conn, peer, text);
    }

    async fn on_close(&self, mut conn: CollabConn, cx: &Context<'_>) {
        let peer = cx.peer();
        let Some(session) = conn.session.take() else {
            return;
        };
        if let Some(user) = conn.user.take() {
            self.leave(&session, &user, peer);
        }
        self.sessions.detach(&session, Instant::now());
    }

    fn default_max_frame_bytes(&self) -> usize {
        self.config.max_frame_bytes()
    }

    fn max_outbound_frame_bytes(&self) -> usize {
        self.config.max_outbound_frame_bytes()
    }

    /// The REST API (`/api/sessions...`) and the browser demo client (`GET /`, see `web/`).
    async fn http(&self, _engine: &Engine, request: HttpRequest) -> Option<HttpResponse> {
        self.rest(&request).or_else(|| web::serve(&request))
    }
}

impl Collab {
    fn handle(&self, conn: &mut CollabConn, peer: &Peer, text: &str) {
        let Some(session) = conn.session.clone() else {
            return;
        };
        let message = match parse(text) {
            Ok(message) => message,
            Err(error) => {
                let _ = peer.send(error_frame(&error.message));
                // A refused edit leaves the client's copy ahead of the server's: resync it.
                if error.kind == Some("code-change") && conn.user.is_some() {
                    let state = lock(&session.state);
                    self.resync(&mut conn.resyncs, &session, &state, peer);
                }
                return;
            }
        };
        // Every frame that reaches the session (joins and leaves announce themselves too) spends
        // from this connection's allowance, so no client can make the others' queues grow faster
        // than the rate.
        if !conn.relays.check_at(
            self.config.relay_burst,
            self.config.relay_per_second,
            Instant::now(),
        ) {
            let kind = kind_of(&message);
            let _ = peer.send(error_frame(&format!(
                "{kind} refused: rate limit of {} frames a second (burst {}) reached; slow down",
                self.config.relay_per_second, self.config.relay_burst
            )));
            if matches!(message, ClientMessage::CodeChange(_)) && conn.user.is_some() {
                let state = lock(&session.state);
                self.resync(&mut conn.resyncs, &session, &state, peer);
            }
            return;
        }
        let message = match message {
            ClientMessage::Join(join) => return self.join(conn, &session, peer, join),
            other => other,
        };
        let Some(user) = conn.user.clone() else {
            let _ = peer.send(error_frame(&format!(
                "Not joined: send join-session before {}",
                kind_of(&message)
            )));
            return;
        };
        match message {
            ClientMessage::Join(_) => {}
            ClientMessage::Leave => {
                self.leave(&session, &user, peer);
                conn.user = None;
            }
            ClientMessage::CodeChange(change) => {
                self.code_change(&session, &user, peer, &mut conn.resyncs, change);
            }
            ClientMessage::CursorMove(cursor) => {
                let update = frame(
                    "cursor-update",
                    &json!({ "userId": user.user_id, "cursor": cursor }),
                );
                self.broadcaster
                    .publish(&session.topic, &update, Some(peer.id()));
            }
            ClientMessage::LanguageChange(language) => {
                let mut state = lock(&session.state);
                let updated = frame(
                    "language-updated",
                    &json!({ "userId": user.user_id, "language": language }),
                );
                state.language = language;
                self.broadcaster.publish(&session.topic, &updated, None);
            }
            ClientMessage::ExecuteCode(request) => {
                let mut payload = Map::new();
                let language = match request.language {
                    Some(language) => language,
                    None => lock(&session.state).language.clone(),
                };
                payload.insert("language".to_owned(), Value::String(language));
                if let Some(code) = request.code {
                    if code.len() > self.config.max_document_bytes {
                        let _ = peer.send(error_frame(&format!(
                            "Invalid execute-code payload: \"code\" is {} bytes, over the document limit of {} bytes",
                            code.len(),
                            self.config.max_document_bytes
                        )));
                        return;
                    }
                    payload.insert("code".to_owned(), Value::String(code));
                }
                self.relay(&session, &user, peer, "execute-code", payload);
            }
            ClientMessage::ExecutionResult(payload) => {
                let bytes = ["output", "error"]
                    .iter()
                    .filter_map(|field| payload.get(*field).and_then(Value::as_str))
                    .map(str::len)
                    .fold(0usize, usize::saturating_add);
                if bytes > self.config.max_document_bytes {
                    let _ = peer.send(error_frame(&format!(
                        "Invalid execution-result payload: \"output\" and \"error\" are {bytes} bytes, over the limit of {} bytes",
                        self.config.max_document_bytes
                    )));
                    return;
                }
                self.relay(&session, &user, peer, "execution-result", payload);
            }
        }
    }

    fn join(&self, conn: &mut CollabConn, session: &Session, peer: &Peer, join: Join) {
        if let Some(user) = &conn.user {
            let _ = peer.send(error_frame(&format!(
                "Already joined as {:?}: a connection's identity cannot change",
                user.user_id
            )));
            return;
        }
        let mut state = lock(&session.state);
        let present = self.presence.is_present(&session.id, &join.user_id);
        if !present && self.presence.member_count(&session.id) >= self.config.max_participants {
            let _ = peer.send(error_frame(&format!(
                "Session is full: at most {} participants",
                self.config.max_participants
            )));
            return;
        }
        // A new participant is charged before anything is stored for them.
        let new_name = !state.usernames.contains_key(&join.user_id);
        if new_name && let Err(refused) = state.charge.try_grow(PARTICIPANT_BYTES) {
            let whose = match refused {
                budget::Refused::Server(_) => "the server's memory for sessions is full",
                budget::Refused::Client(_) => {
                    "the sessions created from this session's creator's address use their whole share of memory"
                }
            };
            let limit = match refused {
                budget::Refused::Server(limit) | budget::Refused::Client(limit) => limit,
            };
            let _ = peer.send(error_frame(&format!(
                "{whose} ({limit} bytes); cannot join now, try again later"
            )));
            return;
        }
        let first = self.presence.join(&session.id, &join.user_id, peer.id());
        state.joined_once = true;
        let username = state
            .usernames
            .entry(join.user_id.clone())
            .or_insert_with(|| join.username.unwrap_or_else(|| join.user_id.clone()))
            .clone();
        if !self.resync(&mut conn.resyncs, session, &state, peer) {
            // Closing: undo the join so that nobody sees a participant who is not there.
            if self.presence.leave(&session.id, &join.user_id, peer.id())
                && state.usernames.remove(&join.user_id).is_some()
            {
                state.charge.shrink(PARTICIPANT_BYTES);
            }
            return;
        }
        self.broadcaster.subscribe(&session.topic, peer);
        if first {
            let joined = frame(
                "participant-joined",
                &Participant {
                    user_id: join.user_id.clone(),
                    username,
                },
            );
            self.broadcaster
                .publish(&session.topic, &joined, Some(peer.id()));
        }
        drop(state);
        debug!(session = %session.id, user = %join.user_id, conn = %peer.id(), "joined");
        conn.user = Some(Identity {
            user_id: join.user_id,
        });
    }

    fn leave(&self, session: &Session, user: &Identity, peer: &Peer) {
        let mut state = lock(&session.state);
        self.broadcaster.unsubscribe(&session.topic, peer.id());
        if self.presence.leave(&session.id, &user.user_id, peer.id()) {
            if state.usernames.remove(&user.user_id).is_some() {
                state.charge.shrink(PARTICIPANT_BYTES);
            }
            let left = frame("participant-left", &json!({ "userId": user.user_id }));
            self.broadcaster.publish(&session.topic, &left, None);
        }
        debug!(session = %session.id, user = %user.user_id, conn = %peer.id(), "left");
    }

    fn code_change(
        &self,
        session: &Session,
        user: &Identity,
        peer: &Peer,
        resyncs: &mut RateBucket,
        change: Change,
    ) {
        // Applying and fanning out under the session lock keeps every connection's view of the
        // document in version order.
        let mut state = lock(&session.state);
        let result = match change {
            Change::FullText(text) => state.doc.replace(&text),
            Change::Operation { base_version, op } => state.doc.apply_operation(base_version, op),
        };
        match result {
            Ok(applied) => {
                let update = frame(
                    "code-update",
                    &CodeUpdate {
                        user_id: &user.user_id,
                        code: state.doc.text(),
                        version: applied.version,
                        ops: &applied.op,
                    },
                );
                self.broadcaster
                    .publish(&session.topic, &update, Some(peer.id()));
                let _ = peer.send(frame("code-ack", &json!({ "version": applied.version })));
            }
            Err(error) => {
                debug!(session = %session.id, user = %user.user_id, %error, "edit refused");
                let _ = peer.send(error_frame(&format!("code-change refused: {error}")));
                self.resync(resyncs, session, &state, peer);
            }
        }
    }

    fn relay(
        &self,
        session: &Session,
        user: &Identity,
        peer: &Peer,
        kind: &str,
        mut payload: Map<String, Value>,
    ) {
        payload.insert("userId".to_owned(), Value::String(user.user_id.clone()));
        let relayed = frame(kind, &payload);
        self.broadcaster
            .publish(&session.topic, &relayed, Some(peer.id()));
    }

    /// Sends `session-state` (on join, or after a refused edit) if this connection's allowance
    /// of them is not spent; otherwise closes the connection with 1008. A state frame carries the
    /// whole document (up to about 6 MiB), so a stream of tiny frames that each earn one would
    /// cost the server a full serialization per 40 bytes received; a legitimate client needs a
    /// handful at most (it reconnects and joins again to resync). Returns whether it was sent.
    fn resync(
        &self,
        resyncs: &mut RateBucket,
        session: &Session,
        state: &sessions::SessionState,
        peer: &Peer,
    ) -> bool {
        if resyncs.check_at(STATE_FRAME_BURST, STATE_FRAMES_PER_SECOND, Instant::now()) {
            let _ = peer.send(self.state_frame(session, state));
            return true;
        }
        let _ = peer.send(error_frame(
            "too many session-state resyncs (refused edits or joins); closing: reconnect and join again",
        ));
        peer.close(CloseReason::new(CloseReason::POLICY, "too many resyncs"));
        false
    }

    fn participants(&self, session: &Session, state: &sessions::SessionState) -> Vec<Participant> {
        self.presence
            .members(&session.id)
            .into_iter()
            .map(|user_id| Participant {
                username: state
                    .usernames
                    .get(&user_id)
                    .cloned()
                    .unwrap_or_else(|| user_id.clone()),
                user_id,
            })
            .collect()
    }

    fn state_frame(&self, session: &Session, state: &sessions::SessionState) -> Frame {
        let participants = self.participants(session, state);
        frame(
            "session-state",
            &SessionState {
                code: state.doc.text(),
                language: &state.language,
                version: state.doc.version(),
                participants: &participants,
            },
        )
    }

    fn rest(&self, request: &HttpRequest) -> Option<HttpResponse> {
        let path = request.path.strip_suffix('/').unwrap_or(&request.path);
        if path == "/api/sessions" {
            return Some(match request.method.as_str() {
                "POST" => self.create_session(&request.body, ClientKey::from_ip(request.client_ip)),
                _ => HttpResponse::json_error(405, "use POST to create a session"),
            });
        }
        let id = path.strip_prefix("/api/sessions/")?;
        if id.contains('/') {
            return None;
        }
        Some(match request.method.as_str() {
            "GET" => self.describe_session(id),
            _ => HttpResponse::json_error(405, "use GET to read a session"),
        })
    }

    fn create_session(&self, body: &[u8], client: ClientKey) -> HttpResponse {
        #[derive(Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct NewSession {
            #[serde(default)]
            language: Option<String>,
            #[serde(default)]
            code: Option<String>,
        }
        let request = if body.iter().all(u8::is_ascii_whitespace) {
            NewSession::default()
        } else {
            match serde_json::from_slice::<Option<NewSession>>(body) {
                Ok(request) => request.unwrap_or_default(),
                Err(error) => {
                    return HttpResponse::json_error(
                        400,
                        &format!(
                            "invalid body: expected {{\"language\"?: string, \"code\"?: string}} ({error})"
                        ),
                    );
                }
            }
        };
        let language = request
            .language
            .unwrap_or_else(|| self.config.default_language.clone());
        if language.trim().is_empty() || language.chars().count() > MAX_LANGUAGE_CHARS {
            return HttpResponse::json_error(
                400,
                &format!("\"language\" must be 1 to {MAX_LANGUAGE_CHARS} characters"),
            );
        }
        let code = request.code.unwrap_or_default();
        if code.len() > self.config.max_document_bytes {
            return HttpResponse::json_error(
                413,
                &format!(
                    "\"code\" is {} bytes, over the document limit of {} bytes",
                    code.len(),
                    self.config.max_document_bytes
                ),
            );
        }
        match self.sessions.create(code, language, client, Instant::now()) {
            Ok(session) => HttpResponse::json(201, &json!({ "sessionId": session.id })),
            Err(refused) if refused.is_per_client() => {
                HttpResponse::json_error(429, &refused.to_string())
            }
            Err(refused) => HttpResponse::json_error(503, &refused.to_string()),
        }
    }

    fn describe_session(&self, id: &str) -> HttpResponse {
        let Some(session) = self.sessions.get(id, Instant::now()) else {
            return HttpResponse::json_error(404, "session not found");
        };
        let state = lock(&session.state);
        HttpResponse::json(
            200,
            &json!({
                "sessionId": session.id,
                "code": state.doc.text(),
                "language": state.language,
                "version": state.doc.version(),
                "participants": self.participants(&session, &state),
            }),
        )
    }
}

fn kind_of(message: &ClientMessage) -> &'static str {
    match message {
        ClientMessage::Join(_) => "join-session",
        ClientMessage::Leave => "leave-session",
        ClientMessage::CodeChange(_) => "code-change",
        ClientMessage::CursorMove(_) => "cursor-move",
        ClientMessage::LanguageChange(_) => "language-change",
        ClientMessage::ExecuteCode(_) => "execute-code",
        ClientMessage::ExecutionResult(_) => "execution-result",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_session_ids() {
        assert_eq!(session_id_from_path("/ws/abc123"), Ok("abc123"));
        assert_eq!(session_id_from_path("/ws/abc123/"), Ok("abc123"));
        assert_eq!(session_id_from_path("/ws"), Err(Reject::NotFound));
        assert_eq!(session_id_from_path("/ws/"), Err(Reject::NotFound));
        assert_eq!(session_id_from_path("/ws/a/b"), Err(Reject::NotFound));
        assert_eq!(session_id_from_path("/chat/abc"), Err(Reject::NotFound));
        assert!(matches!(
            session_id_from_path("/ws/a%20b"),
            Err(Reject::BadRequest(_))
        ));
    }

    #[test]
    fn the_frame_limit_fits_a_fully_escaped_maximal_document() {
        let config = Config::default();
        let worst = serde_json::to_string(&json!({
            "type": "code-change",
            "payload": {"userId": "u".repeat(MAX_USER_ID_CHARS), "changes": "\u{1}".repeat(config.max_document_bytes)},
        }))
        .unwrap();
        assert!(worst.len() <= config.max_frame_bytes());
    }
}
