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
    Broadcaster, CloseReason, Frame, Handshake, HttpRequest, HttpResponse, LocalBroadcaster,
    LocalPresence, Peer, Presence, Protocol, Reject,
};
use tracing::debug;

pub use client::{ClientDocument, OutgoingEdit};
pub use document::{Applied, Document, DocumentLimits, EditError};
pub use messages::{
    Change, ClientMessage, INVALID_TYPE, Join, MAX_CURSOR_BYTES, MAX_LANGUAGE_CHARS,
    MAX_USER_ID_CHARS, MAX_USERNAME_CHARS, ParseError, Participant, parse,
};
pub use sessions::{MAX_SESSION_ID_LEN, is_valid_session_id};

use messages::{CodeUpdate, SessionState, error_frame, frame};
use sessions::{Registry, Session};

/// JSON escaping can turn one byte of text into six (`\u0001`); frames are sized for that.
const JSON_ESCAPE_FACTOR: usize = 6;
/// Room for the envelope and the rest of the payload around a maximal document.
const FRAME_OVERHEAD: usize = 64 * 1024;

/// Limits and defaults of the collab protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Largest document, in UTF-8 bytes. Edits that would exceed it are refused.
    pub max_document_bytes: usize,
    /// Distinct users per session; a further user's `join-session` is refused.
    pub max_participants: usize,
    /// Sessions in total; creating more (REST or first connect) is refused with 503.
    pub max_sessions: usize,
    /// A session with no open socket is removed after this long.
    pub idle_ttl: Duration,
    /// Recent operations kept per session to transform late edits against. An edit based on an
    /// older version is refused and the client resyncs.
    pub max_op_log: usize,
    /// Approximate bytes the per-session operation log may hold (the newest entry always stays).
    pub max_op_log_bytes: usize,
    /// Language of a session created without one.
    pub default_language: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_document_bytes: 1024 * 1024,
            max_participants: 50,
            max_sessions: 10_000,
            idle_ttl: Duration::from_secs(3600),
            max_op_log: 1000,
            max_op_log_bytes: 2 * 1024 * 1024,
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
            config.idle_ttl,
            config.document_limits(),
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
        self.sessions
            .get_or_create(id, &self.config.default_language, Instant::now())
            .map_err(|full| Reject::Unavailable(full.to_string()))?;
        Ok(CollabConn {
            session_id: id.to_owned(),
            session: None,
            user: None,
        })
    }

    async fn on_open(&self, conn: &mut CollabConn, peer: &Peer) {
        match self.sessions.attach(
            &conn.session_id,
            &self.config.default_language,
            Instant::now(),
        ) {
            Ok(session) => conn.session = Some(session),
            Err(full) => {
                // Only when the session idled out between admission and open and the registry
                // filled up meanwhile.
                let _ = peer.send(error_frame(&full.to_string()));
                peer.close(CloseReason::new(
                    CloseReason::POLICY,
                    "session limit reached",
                ));
            }
        }
    }

    async fn on_text(&self, conn: &mut CollabConn, peer: &Peer, text: &str) {
        self.handle(conn, peer, text);
    }

    async fn on_close(&self, mut conn: CollabConn, peer: &Peer) {
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
    async fn http(&self, request: HttpRequest) -> Option<HttpResponse> {
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
                    let _ = peer.send(self.state_frame(&session, &state));
                }
                return;
            }
        };
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
            ClientMessage::CodeChange(change) => self.code_change(&session, &user, peer, change),
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
            ClientMessage::ExecuteCode(mut payload) => {
                {
                    let state = lock(&session.state);
                    fill_default(&mut payload, "language", &state.language);
                    fill_default(&mut payload, "code", state.doc.text());
                }
                self.relay(&session, &user, peer, "execute-code", payload);
            }
            ClientMessage::ExecutionResult(payload) => {
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
        let first = self.presence.join(&session.id, &join.user_id, peer.id());
        let username = state
            .usernames
            .entry(join.user_id.clone())
            .or_insert_with(|| join.username.unwrap_or_else(|| join.user_id.clone()))
            .clone();
        let _ = peer.send(self.state_frame(session, &state));
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
            state.usernames.remove(&user.user_id);
            let left = frame("participant-left", &json!({ "userId": user.user_id }));
            self.broadcaster.publish(&session.topic, &left, None);
        }
        debug!(session = %session.id, user = %user.user_id, conn = %peer.id(), "left");
    }

    fn code_change(&self, session: &Session, user: &Identity, peer: &Peer, change: Change) {
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
                let _ = peer.send(self.state_frame(session, &state));
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
                "POST" => self.create_session(&request.body),
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

    fn create_session(&self, body: &[u8]) -> HttpResponse {
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
        match self.sessions.create(code, language, Instant::now()) {
            Ok(session) => HttpResponse::json(201, &json!({ "sessionId": session.id })),
            Err(full) => HttpResponse::json_error(503, &full.to_string()),
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

fn fill_default(payload: &mut Map<String, Value>, field: &str, value: &str) {
    if matches!(payload.get(field), None | Some(Value::Null)) {
        payload.insert(field.to_owned(), Value::String(value.to_owned()));
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
