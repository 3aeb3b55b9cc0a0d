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
//! Sessions live in the runtime's state engine (a record, a log of edits that is also the
//! session's topic, presence), so every node of a cluster serves every session: edits are
//! appended to the log with compare-and-set and reach every node in log order. Each node keeps
//! only caches and the limits that protect its own memory (see "State and the engine" in the
//! protocol doc).
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
mod grant;
mod messages;
pub mod ot;
mod sessions;
mod store;
pub mod telemetry;
mod web;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use switchboard_core::engine::{
    Append, Appended, ConnRef, EngineError, EngineEvent, Expect, Position, Put, Read, ReadFrom,
    Retention,
};
use switchboard_core::sync::lock;
use switchboard_core::{
    ClientKey, CloseReason, Context, Engine, Frame, Handshake, HttpRequest, HttpResponse,
    MemoryBudget, Protocol, Reject,
};
use tracing::{debug, warn};
use uuid::Uuid;

pub use budget::ENGINE_ENTRY_BYTES;
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

use budget::{LogBounds, RateBucket};
use messages::{CodeUpdate, SessionState, error_frame, frame};
use sessions::{CreationLimits, Registry, Session, Ttls};
use store::{Record, RecordMeta};

/// JSON escaping can turn one byte of text into six (`\u0001`); frames are sized for that.
const JSON_ESCAPE_FACTOR: usize = 6;
/// Room for the envelope and the rest of the payload around a maximal document.
const FRAME_OVERHEAD: usize = 64 * 1024;

/// `session-state` frames one connection may receive at once (its join included)...
pub const STATE_FRAME_BURST: u32 = 10;
/// ...and regains per second. Past that allowance the connection is closed with 1008.
pub const STATE_FRAMES_PER_SECOND: u32 = 1;

/// Limits and defaults of the collab protocol.
///
/// With the `cli` feature this is also the `clap::Args` of `switchboard serve --protocol
/// collab`: each field's doc is its flag's help and [`Config::default`] its default. The
/// WebSocket frame limit follows from `max_document_bytes` ([`Config::max_frame_bytes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[cfg_attr(feature = "cli", group(id = "collab"))]
#[cfg_attr(feature = "cli", command(next_help_heading = "collab"))]
pub struct Config {
    /// Largest document in UTF-8 bytes; edits that would exceed it are refused.
    #[cfg_attr(feature = "cli", arg(
        id = "collab-max-document-bytes", long,
        env = "SWITCHBOARD_COLLAB_MAX_DOCUMENT_BYTES", value_name = "BYTES",
        default_value_t = Config::default().max_document_bytes,
    ))]
    pub max_document_bytes: usize,
    /// Distinct users per session; a further user's join-session is refused.
    #[cfg_attr(feature = "cli", arg(
        id = "collab-max-participants", long,
        env = "SWITCHBOARD_COLLAB_MAX_PARTICIPANTS", value_name = "N",
        default_value_t = Config::default().max_participants,
    ))]
    pub max_participants: usize,
    /// Sessions in total; creating more (REST or first connect) is refused with HTTP 503.
    #[cfg_attr(feature = "cli", arg(
        id = "collab-max-sessions", long,
        env = "SWITCHBOARD_COLLAB_MAX_SESSIONS", value_name = "N",
        default_value_t = Config::default().max_sessions,
    ))]
    pub max_sessions: usize,
    /// Live sessions one client (IPv4 address or IPv6 /64) may have created; more are refused with
    /// HTTP 429, REST and upgrade (0: unlimited).
    #[cfg_attr(feature = "cli", arg(
        id = "collab-max-sessions-per-client", long,
        env = "SWITCHBOARD_COLLAB_MAX_SESSIONS_PER_CLIENT", value_name = "N",
        default_value_t = Config::default().max_sessions_per_client,
    ))]
    pub max_sessions_per_client: usize,
    /// Sessions one client may create at once (token bucket burst; 0 disables the rate limit).
    #[cfg_attr(feature = "cli", arg(
        id = "collab-session-create-burst", long,
        env = "SWITCHBOARD_COLLAB_SESSION_CREATE_BURST", value_name = "N",
        default_value_t = Config::default().session_create_burst,
    ))]
    pub session_create_burst: u32,
    /// Session creations a client regains per second.
    #[cfg_attr(feature = "cli", arg(
        id = "collab-session-create-per-second", long,
        env = "SWITCHBOARD_COLLAB_SESSION_CREATE_PER_SECOND", value_name = "N",
        default_value_t = Config::default().session_create_per_second,
    ))]
    pub session_create_per_second: u32,
    /// A session someone joined is removed after having no open socket for this long, e.g. 1h.
    #[cfg_attr(feature = "cli", arg(
        id = "collab-idle-ttl", long,
        env = "SWITCHBOARD_COLLAB_IDLE_TTL", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value = switchboard_core::duration::format(Config::default().idle_ttl),
    ))]
    pub idle_ttl: Duration,
    /// A session nobody ever joined is removed after having no open socket for this long (or the
    /// idle TTL if that is shorter), so an abandoned flood of created sessions frees itself
    /// quickly.
    #[cfg_attr(feature = "cli", arg(
        id = "collab-unjoined-ttl", long,
        env = "SWITCHBOARD_COLLAB_UNJOINED_TTL", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value = switchboard_core::duration::format(Config::default().unjoined_ttl),
    ))]
    pub unjoined_ttl: Duration,
    /// Recent operations kept per session to transform late edits against; an edit based on an
    /// older version is refused and the client resyncs.
    #[cfg_attr(feature = "cli", arg(
        id = "collab-max-op-log", long,
        env = "SWITCHBOARD_COLLAB_MAX_OP_LOG", value_name = "N",
        default_value_t = Config::default().max_op_log,
    ))]
    pub max_op_log: usize,
    /// Bytes the per-session operation log may hold (`Operation::weight`); a hard bound, also for
    /// the newest entry: an operation heavier than this is refused.
    #[cfg_attr(feature = "cli", arg(
        id = "collab-max-op-log-bytes", long,
        env = "SWITCHBOARD_COLLAB_MAX_OP_LOG_BYTES", value_name = "BYTES",
        default_value_t = Config::default().max_op_log_bytes,
    ))]
    pub max_op_log_bytes: usize,
    /// Frames that fan out (code-change, cursor-move, language-change, execute-code,
    /// execution-result) one connection may send at once (0: unlimited).
    #[cfg_attr(feature = "cli", arg(
        id = "collab-relay-burst", long,
        env = "SWITCHBOARD_COLLAB_RELAY_BURST", value_name = "N",
        default_value_t = Config::default().relay_burst,
    ))]
    pub relay_burst: u32,
    /// Such frames a connection regains per second.
    #[cfg_attr(feature = "cli", arg(
        id = "collab-relay-per-second", long,
        env = "SWITCHBOARD_COLLAB_RELAY_PER_SECOND", value_name = "N",
        default_value_t = Config::default().relay_per_second,
    ))]
    pub relay_per_second: u32,
    /// Bytes all sessions together may hold: this node's copies (documents, operation logs,
    /// participants, fixed per-session overhead) and what the sessions keep in the state engine
    /// (the snapshot record and the shared log's entries). When reached, new sessions, joins of
    /// new users and growing edits are refused with the protocol's error; existing state is kept.
    /// The binary sets it from the runtime's `--max-state-bytes`.
    #[cfg_attr(feature = "cli", arg(skip = Config::default().max_state_bytes))]
    pub max_state_bytes: usize,
    /// Bytes of session state the sessions created by one client (IPv4 address or IPv6 /64) may
    /// hold together, a share of the state budget (--max-state-bytes); over it that client's new
    /// sessions get HTTP 429 and its sessions' growing edits and new joins are refused (0: no
    /// share).
    #[cfg_attr(feature = "cli", arg(
        id = "collab-max-state-bytes-per-client", long,
        env = "SWITCHBOARD_COLLAB_MAX_STATE_BYTES_PER_CLIENT", value_name = "BYTES",
        default_value_t = Config::default().max_state_bytes_per_client,
    ))]
    pub max_state_bytes_per_client: usize,
    /// Language of a session created without one.
    #[cfg_attr(feature = "cli", arg(
        id = "collab-default-language", long,
        env = "SWITCHBOARD_COLLAB_DEFAULT_LANGUAGE", value_name = "LANGUAGE",
        default_value_t = Config::default().default_language,
    ))]
    pub default_language: String,
}

impl Default for Config {
    /// The defaults, written only here: the `cli` flags take theirs from this.
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

    /// Entries a session's shared log in the state engine keeps at most: `max_op_log`, at
    /// least 1 and at most 64.
    pub fn shared_log_entries(&self) -> usize {
        self.max_op_log.clamp(1, SHARED_LOG_ENTRIES)
    }

    /// Bytes of frames a session's shared log in the state engine keeps at most: one maximal
    /// `code-update` ([`Config::max_outbound_frame_bytes`]), so the newest entry always fits
    /// and, for typical documents, a few older ones with it.
    pub fn shared_log_bytes(&self) -> usize {
        self.max_outbound_frame_bytes()
    }

    /// The most bytes one session can have charged to the state budget, what it holds on this
    /// node and in the state engine (see "Limits and worst-case memory" in
    /// `docs/protocols/collab.md`):
    ///
    /// ```text
    ///   SESSION_OVERHEAD_BYTES + max_participants × PARTICIPANT_BYTES
    /// + max_document_bytes + TEXT_SLACK_BYTES + max_op_log_bytes      this node's copy
    /// + 6 × max_document_bytes                                        the record's snapshot
    /// + shared_log_bytes() + shared_log_entries() × ENGINE_ENTRY_BYTES the shared log
    /// ```
    pub fn worst_case_session_bytes(&self) -> usize {
        SESSION_OVERHEAD_BYTES
            .saturating_add(self.max_participants.saturating_mul(PARTICIPANT_BYTES))
            .saturating_add(self.max_document_bytes)
            .saturating_add(TEXT_SLACK_BYTES)
            .saturating_add(self.max_op_log_bytes)
            .saturating_add(self.max_document_bytes.saturating_mul(JSON_ESCAPE_FACTOR))
            .saturating_add(self.shared_log_bytes())
            .saturating_add(self.shared_log_entries().saturating_mul(ENGINE_ENTRY_BYTES))
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

/// Attempts at appending one edit when other edits keep landing first; then the edit is refused
/// (with a resync) rather than retried forever.
const MAX_EDIT_ATTEMPTS: usize = 16;
/// Attempts at a compare-and-set of the session's record (language, keep-alive).
const MAX_CAS_ATTEMPTS: usize = 8;
/// Log entries read at once when this node's copy of a document catches up.
const READ_BATCH: usize = 256;
/// Rounds of catching up (reads, reloads) one edit may take before it is refused.
const MAX_SYNC_ROUNDS: usize = 8;
/// Entries a session's log keeps at most (see [`Collab::retention`]): a node whose copy of the
/// document fell further behind loads it again from the newest entry.
const SHARED_LOG_ENTRIES: usize = 64;
/// Display-name keys read at once when listing participants.
const SCAN_PAGE: usize = 256;
/// The session log's time to live is at least this long (an idle TTL of zero would make every
/// append start a new log).
const MIN_LOG_TTL: Duration = Duration::from_secs(1);

/// The collab protocol.
///
/// What a session is (its record, its log of edits, its presence) lives in the node's state
/// engine, so several nodes serve the same sessions; what this value holds is node-local: the
/// configuration, the registry of sessions this node serves with its copies of their documents,
/// and the per-client shares and byte budgets that protect this node's memory.
pub struct Collab {
    config: Config,
    sessions: Registry,
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
    /// A collab server. Sessions are shared through the runtime's state engine
    /// (`ServerConfig::engine`): one node by default, a cluster when the engine spans nodes.
    pub fn new(config: Config) -> Self {
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
        Self { config, sessions }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Sessions this node currently holds (idle ones awaiting removal included).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Bytes of session state charged to this node's budget now (never above
    /// [`Config::max_state_bytes`] nor [`Config::worst_case_state_bytes`]).
    pub fn state_bytes(&self) -> usize {
        self.sessions.budget().used()
    }

    /// This node's budget session state is charged to.
    pub fn budget(&self) -> &MemoryBudget {
        self.sessions.budget()
    }

    /// Bytes of session state charged to the client at `ip` on this node (the sessions it made
    /// this node hold; its share of [`Config::max_state_bytes_per_client`]).
    pub fn state_bytes_of(&self, ip: std::net::IpAddr) -> usize {
        self.sessions.state_bytes_of(ClientKey::from_ip(ip))
    }

    /// Live sessions the client at `ip` made this node hold (its share of
    /// [`Config::max_sessions_per_client`]).
    pub fn sessions_created_by(&self, ip: std::net::IpAddr) -> usize {
        self.sessions.created_by(ClientKey::from_ip(ip))
    }

    /// How long a session's record lives without a keep-alive: the idle TTL once someone
    /// joined, the (shorter) unjoined TTL before.
    fn ttl(&self, joined: bool) -> Duration {
        if joined {
            self.config.idle_ttl
        } else {
            self.config.unjoined_ttl.min(self.config.idle_ttl)
        }
    }

    /// How often a node with sockets on a session writes its record again: a quarter of the
    /// shorter TTL, so the record never expires while someone is connected.
    fn refresh_every(&self) -> Duration {
        (self.ttl(false) / 4).clamp(Duration::from_millis(10), Duration::from_secs(60))
    }

    /// The bounds of a session's log. Each entry is a whole `code-update` frame (document
    /// included), so the log keeps few of them: enough for other nodes' copies to catch up
    /// (each node's copy keeps its own operation log to transform against; one that fell
    /// further behind loads the newest entry again), at most [`SHARED_LOG_ENTRIES`], and at
    /// most one maximal frame's bytes ([`Config::shared_log_bytes`]).
    fn log_bounds(&self) -> LogBounds {
        LogBounds {
            max_entries: self.config.shared_log_entries(),
            max_bytes: self.config.shared_log_bytes(),
        }
    }

    /// The bounds of an append whose session cannot afford to keep older entries (its budget
    /// or its creator's share is full): the log keeps only the new entry, the engine's
    /// counterpart of dropping the session's own operation log.
    fn tight_log_bounds(&self) -> LogBounds {
        LogBounds {
            max_entries: 1,
            ..self.log_bounds()
        }
    }

    /// The engine's retention for an append under `bounds`. Forgotten after the idle TTL
    /// without an edit (the record's snapshot holds the document by then).
    fn retention(&self, bounds: LogBounds) -> Retention {
        Retention::trim(bounds.max_entries, bounds.max_bytes)
            .with_ttl(self.config.idle_ttl.max(MIN_LOG_TTL))
    }

    fn full_error(&self) -> EditError {
        EditError::OutOfMemory {
            limit: self.config.max_state_bytes,
        }
    }
}

/// The edit error for a refused charge.
fn refused_edit(refused: budget::Refused) -> EditError {
    match refused {
        budget::Refused::Server(limit) => EditError::OutOfMemory { limit },
        budget::Refused::Client(limit) => EditError::ShareFull { limit },
    }
}

impl Collab {}

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
    /// The session's incarnation in the engine (names its topic), once its record is known.
    generation: Option<Arc<str>>,
    user: Option<Identity>,
    /// With signed identity, the token's `sub`: the only `userId` this connection may join as.
    /// `None` when the server does not verify tokens (the join's `userId` is the identity then).
    signed: Option<String>,
    /// Who is connecting, for the per-client share of session creation.
    client: ClientKey,
    /// This connection's allowance of frames that reach the session.
    relays: RateBucket,
    /// This connection's allowance of `session-state` frames.
    resyncs: RateBucket,
}

/// Why an edit (or another change to a session) was refused.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    /// The document refused it.
    #[error("{0}")]
    Edit(#[from] EditError),
    /// The state engine failed.
    #[error("{0}; try again")]
    Engine(EngineError),
    /// Other changes kept landing first.
    #[error(
        "the session changed too often while this change was applied; resync from the session-state that follows"
    )]
    Busy,
    /// The session expired or was created again meanwhile.
    #[error("the session no longer exists; reconnect")]
    Gone,
}

impl From<EngineError> for Refusal {
    fn from(error: EngineError) -> Self {
        Self::Engine(error)
    }
}

fn corrupt(error: serde_json::Error) -> EngineError {
    EngineError::Corrupt(format!("collab session record: {error}"))
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

/// The document a joiner or a reader sees: the log's newest entry when it is at least as new as
/// the record's snapshot, else the snapshot (parsed only then).
fn newest_document(
    read: &Read,
    meta: &RecordMeta,
    record_bytes: &[u8],
) -> Result<(String, u64), EngineError> {
    if let Read::Entries { entries, .. } = read
        && let Some(entry) = entries.last()
        && let Ok(state) = store::logged_state(&entry.frame)
        && state.version >= meta.version
    {
        return Ok((state.code, state.version));
    }
    let record = Record::decode(record_bytes).map_err(corrupt)?;
    Ok((record.code, record.version))
}

/// The operations of the newest entries of `read` that lead, one version after the other and
/// with no gap in the log, to `version` (oldest first); empty when the newest entry is not at
/// `version` (the document came from the record's snapshot).
fn logged_ops(read: &Read, version: u64) -> Vec<crate::ot::Operation> {
    let Read::Entries { entries, .. } = read else {
        return Vec::new();
    };
    let mut ops = Vec::new();
    let mut want = version;
    let mut next_offset: Option<u64> = None;
    for entry in entries.iter().rev() {
        let continues = next_offset.is_none_or(|next| entry.offset.checked_add(1) == Some(next));
        let Ok(edit) = store::logged_edit(&entry.frame) else {
            break;
        };
        if !continues || edit.version != want || want == 0 {
            break;
        }
        ops.push(edit.op);
        want = want.saturating_sub(1);
        next_offset = Some(entry.offset);
    }
    ops.reverse();
    ops
}

impl Protocol for Collab {
    type Conn = CollabConn;

    fn name(&self) -> &'static str {
        "collab"
    }

    fn admit(&self, handshake: &Handshake<'_>) -> Result<CollabConn, Reject> {
        let id = session_id_from_path(handshake.path)?;
        // Before anything is created: a token may not even create a session it may not use.
        if let Some(identity) = handshake.identity {
            grant::check(identity, id).map_err(Reject::Forbidden)?;
        }
        let client = ClientKey::from_ip(handshake.client_ip);
        let now = Instant::now();
        // Admission is synchronous: this node's limits decide (a session new to this node
        // counts against them even if another node created it); the engine's record is read
        // or written when the socket opens.
        self.sessions
            .get_or_create(id, client, now)
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
            generation: None,
            user: None,
            signed: handshake
                .identity
                .map(|identity| identity.subject().to_owned()),
            client,
            relays: RateBucket::new(self.config.relay_burst, now),
            resyncs: RateBucket::new(STATE_FRAME_BURST, now),
        })
    }

    async fn on_open(&self, conn: &mut CollabConn, cx: &Context<'_>) {
        let session = match self
            .sessions
            .attach(&conn.session_id, conn.client, Instant::now())
        {
            Ok(session) => session,
            Err(refused) => {
                // Only when the session idled out between admission and open and could not be
                // created again (a limit was reached meanwhile).
                telemetry::error("open");
                let _ = cx.send(error_frame(&refused.to_string()));
                cx.close(CloseReason::new(
                    CloseReason::POLICY,
                    "session could not be created",
                ));
                return;
            }
        };
        conn.session = Some(session.clone());
        match self.ensure_record(cx.engine(), &session).await {
            Ok(generation) => conn.generation = Some(generation),
            Err(error) => {
                telemetry::error("open");
                let _ = cx.send(error_frame(&format!(
                    "the session could not be opened ({error}); try again later"
                )));
                cx.close(CloseReason::new(
                    CloseReason::TRY_AGAIN_LATER,
                    "session could not be opened",
                ));
            }
        }
    }

    async fn on_text(&self, conn: &mut CollabConn, cx: &Context<'_>, text: &str) {
        self.handle(conn, cx, text).await;
    }

    async fn on_close(&self, mut conn: CollabConn, cx: &Context<'_>) {
        let Some(session) = conn.session.take() else {
            return;
        };
        if let (Some(user), Some(generation)) = (conn.user.take(), &conn.generation) {
            self.leave(cx, &session, generation, &user).await;
        }
        if self.sessions.detach(&session, Instant::now()) {
            // This node's last socket: write the newest document and start the idle clock.
            self.keep_alive(cx.engine(), &session, true).await;
        }
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(self.refresh_every())
    }

    async fn on_tick(&self, conn: &mut CollabConn, cx: &Context<'_>) {
        if let Some(session) = &conn.session {
            self.keep_alive(cx.engine(), session, false).await;
        }
    }

    fn default_max_frame_bytes(&self) -> usize {
        self.config.max_frame_bytes()
    }

    fn max_outbound_frame_bytes(&self) -> usize {
        self.config.max_outbound_frame_bytes()
    }

    /// The REST API (`/api/sessions...`) and the browser demo client (`GET /`, see `web/`).
    async fn http(&self, engine: &Engine, request: HttpRequest) -> Option<HttpResponse> {
        match self.rest(engine, &request).await {
            Some(response) => Some(response),
            None => web::serve(&request),
        }
    }

    async fn on_engine_event(&self, engine: &Engine, event: EngineEvent) {
        let EngineEvent::MemberExpired { room, member } = event;
        let Some((id, generation)) = store::parse_topic(&room) else {
            return;
        };
        // The member's node is gone: announce it exactly as its last socket closing would have.
        self.forget_username(engine, id, generation, &room, &member)
            .await;
        let left = frame("participant-left", &json!({ "userId": member }));
        if let Err(error) = engine.publish(&room, left, None).await {
            warn!(session = id, user = %member, %error, "participant-left not announced");
        }
        debug!(session = id, user = %member, "participant expired with its node");
    }
}

impl Collab {
    async fn handle(&self, conn: &mut CollabConn, cx: &Context<'_>, text: &str) {
        if conn.session.is_none() || conn.generation.is_none() {
            return;
        }
        let message = match parse(text) {
            Ok(message) => message,
            Err(error) => {
                telemetry::error(error.kind.unwrap_or("invalid"));
                let _ = cx.send(error_frame(&error.message));
                // A refused edit leaves the client's copy ahead of the server's: resync it.
                if error.kind == Some("code-change") && conn.user.is_some() {
                    self.resync(conn, cx).await;
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
            telemetry::error(kind);
            let _ = cx.send(error_frame(&format!(
                "{kind} refused: rate limit of {} frames a second (burst {}) reached; slow down",
                self.config.relay_per_second, self.config.relay_burst
            )));
            if matches!(message, ClientMessage::CodeChange(_)) && conn.user.is_some() {
                self.resync(conn, cx).await;
            }
            return;
        }
        let message = match message {
            ClientMessage::Join(join) => return self.join(conn, cx, join).await,
            other => other,
        };
        let (Some(session), Some(generation), Some(user)) = (
            conn.session.clone(),
            conn.generation.clone(),
            conn.user.clone(),
        ) else {
            telemetry::error(kind_of(&message));
            let _ = cx.send(error_frame(&format!(
                "Not joined: send join-session before {}",
                kind_of(&message)
            )));
            return;
        };
        let engine = cx.engine();
        let topic = store::topic(&session.id, &generation);
        match message {
            ClientMessage::Join(_) => {}
            ClientMessage::Leave => {
                self.leave(cx, &session, &generation, &user).await;
                conn.user = None;
            }
            ClientMessage::CodeChange(change) => {
                if let Err(refusal) = self
                    .apply_change(cx, &session, &generation, &user, change)
                    .await
                {
                    debug!(session = %session.id, user = %user.user_id, %refusal, "edit refused");
                    telemetry::error("code-change");
                    let _ = cx.send(error_frame(&format!("code-change refused: {refusal}")));
                    self.resync(conn, cx).await;
                }
            }
            ClientMessage::CursorMove(cursor) => {
                let update = frame(
                    "cursor-update",
                    &json!({ "userId": user.user_id, "cursor": cursor }),
                );
                self.publish(cx, &topic, "cursor-move", update, Some(cx.me()))
                    .await;
            }
            ClientMessage::LanguageChange(language) => {
                match self
                    .set_language(engine, &session.id, &generation, &language)
                    .await
                {
                    Ok(()) => {
                        let updated = frame(
                            "language-updated",
                            &json!({ "userId": user.user_id, "language": language }),
                        );
                        self.publish(cx, &topic, "language-change", updated, None)
                            .await;
                    }
                    Err(refusal) => {
                        telemetry::error("language-change");
                        let _ =
                            cx.send(error_frame(&format!("language-change refused: {refusal}")));
                    }
                }
            }
            ClientMessage::ExecuteCode(request) => {
                let mut payload = Map::new();
                if let Some(code) = &request.code
                    && code.len() > self.config.max_document_bytes
                {
                    telemetry::error("execute-code");
                    let _ = cx.send(error_frame(&format!(
                        "Invalid execute-code payload: \"code\" is {} bytes, over the document limit of {} bytes",
                        code.len(),
                        self.config.max_document_bytes
                    )));
                    return;
                }
                let language = match request.language {
                    Some(language) => language,
                    None => match self.read_meta(engine, &session.id).await {
                        Ok(Some(meta)) => meta.language,
                        Ok(None) => {
                            telemetry::error("execute-code");
                            let _ = cx.send(error_frame(&format!(
                                "execute-code refused: {}",
                                Refusal::Gone
                            )));
                            return;
                        }
                        Err(error) => {
                            telemetry::error("execute-code");
                            let _ = cx.send(error_frame(&format!(
                                "execute-code refused: {}",
                                Refusal::Engine(error)
                            )));
                            return;
                        }
                    },
                };
                payload.insert("language".to_owned(), Value::String(language));
                if let Some(code) = request.code {
                    payload.insert("code".to_owned(), Value::String(code));
                }
                self.relay(cx, &topic, &user, "execute-code", payload).await;
            }
            ClientMessage::ExecutionResult(payload) => {
                let bytes = ["output", "error"]
                    .iter()
                    .filter_map(|field| payload.get(*field).and_then(Value::as_str))
                    .map(str::len)
                    .fold(0usize, usize::saturating_add);
                if bytes > self.config.max_document_bytes {
                    telemetry::error("execution-result");
                    let _ = cx.send(error_frame(&format!(
                        "Invalid execution-result payload: \"output\" and \"error\" are {bytes} bytes, over the limit of {} bytes",
                        self.config.max_document_bytes
                    )));
                    return;
                }
                self.relay(cx, &topic, &user, "execution-result", payload)
                    .await;
            }
        }
    }

    /// Publishes an unlogged frame (cursor, language, relay, announcement) to the session's
    /// topic; an engine failure becomes an error frame for `kind`.
    async fn publish(
        &self,
        cx: &Context<'_>,
        topic: &str,
        kind: &'static str,
        frame: Frame,
        except: Option<ConnRef>,
    ) {
        if let Err(error) = cx.engine().publish(topic, frame, except).await {
            telemetry::error(kind);
            let _ = cx.send(error_frame(&format!(
                "{kind} refused: {}",
                Refusal::Engine(error)
            )));
        }
    }

    async fn relay(
        &self,
        cx: &Context<'_>,
        topic: &str,
        user: &Identity,
        kind: &'static str,
        mut payload: Map<String, Value>,
    ) {
        payload.insert("userId".to_owned(), Value::String(user.user_id.clone()));
        let relayed = frame(kind, &payload);
        self.publish(cx, topic, kind, relayed, Some(cx.me())).await;
    }

    async fn join(&self, conn: &mut CollabConn, cx: &Context<'_>, join: Join) {
        if let Some(user) = &conn.user {
            telemetry::error("join-session");
            let _ = cx.send(error_frame(&format!(
                "Already joined as {:?}: a connection's identity cannot change",
                user.user_id
            )));
            return;
        }
        if let Some(signed) = &conn.signed
            && join.user_id != *signed
        {
            telemetry::error("join-session");
            let _ = cx.send(error_frame(
                "join-session refused: \"userId\" must be the signed-in user (the token's sub)",
            ));
            return;
        }
        let (Some(session), Some(generation)) = (conn.session.clone(), conn.generation.clone())
        else {
            return;
        };
        let engine = cx.engine();
        let topic = store::topic(&session.id, &generation);
        let user_id = join.user_id;
        let first = match engine.presence_join(&topic, &user_id, cx.me()).await {
            Ok(first) => first,
            Err(error) => {
                telemetry::error("join-session");
                let _ = cx.send(error_frame(&self.join_refused(&error)));
                return;
            }
        };
        let undo = JoinUndo {
            session: &session,
            generation: &generation,
            topic: &topic,
            user_id: &user_id,
            local: false,
        };
        // The participant limit counts users across every node; presence lists them in the
        // order they joined, so of several users joining at once the later ones are refused.
        if first {
            let admitted = match engine.presence_members(&topic).await {
                Ok(members) => members
                    .iter()
                    .position(|member| *member == user_id)
                    .is_some_and(|at| at < self.config.max_participants),
                Err(error) => {
                    self.undo_join(cx, undo).await;
                    telemetry::error("join-session");
                    let _ = cx.send(error_frame(&self.join_refused(&error)));
                    return;
                }
            };
            if !admitted {
                self.undo_join(cx, undo).await;
                telemetry::error("join-session");
                let _ = cx.send(error_frame(&format!(
                    "Session is full: at most {} participants",
                    self.config.max_participants
                )));
                return;
            }
        }
        // A user new to this node is charged to this node's budget before anything is kept.
        if let Err(refused) = session.add_user(&user_id) {
            self.undo_join(cx, undo).await;
            let whose = match refused {
                budget::Refused::Server(_) => "the server's memory for sessions is full",
                budget::Refused::Client(_) => {
                    "the sessions created from this session's creator's address use their whole share of memory"
                }
            };
            let limit = match refused {
                budget::Refused::Server(limit) | budget::Refused::Client(limit) => limit,
            };
            telemetry::error("join-session");
            let _ = cx.send(error_frame(&format!(
                "{whose} ({limit} bytes); cannot join now, try again later"
            )));
            return;
        }
        let undo = JoinUndo {
            local: true,
            ..undo
        };
        let username = join.username.unwrap_or_else(|| user_id.clone());
        // The display name of the user's first socket (on any node) is the one shown.
        if first
            && let Err(error) = engine
                .put(
                    &store::user_key(&session.id, &generation, &user_id),
                    Bytes::from(username.clone().into_bytes()),
                    Expect::Any,
                    Some(self.ttl(true)),
                )
                .await
        {
            self.undo_join(cx, undo).await;
            telemetry::error("join-session");
            let _ = cx.send(error_frame(&self.join_refused(&error)));
            return;
        }
        if !self.spend_resync(conn, cx) {
            // Closing: undo the join so that nobody sees a participant who is not there.
            self.undo_join(cx, undo).await;
            return;
        }
        if let Err(error) = self.send_state(cx, &session, &generation).await {
            self.undo_join(cx, undo).await;
            telemetry::error("join-session");
            let _ = cx.send(error_frame(&self.join_refused(&error)));
            return;
        }
        if first {
            let joined = frame(
                "participant-joined",
                &Participant {
                    user_id: user_id.clone(),
                    username,
                },
            );
            self.publish(cx, &topic, "join-session", joined, Some(cx.me()))
                .await;
        }
        if !session.joined_once() {
            lock(&session.state).joined_once = true;
            // The session now lives for the idle TTL rather than the unjoined one.
            self.keep_alive(engine, &session, true).await;
        }
        debug!(session = %session.id, user = %user_id, conn = %cx.me(), "joined");
        telemetry::joined();
        conn.user = Some(Identity { user_id });
    }

    fn join_refused(&self, error: &EngineError) -> String {
        match error {
            EngineError::Full(_) => format!(
                "the server's memory for sessions is full ({} bytes); cannot join now, try again later",
                self.config.max_state_bytes
            ),
            other => format!("cannot join now ({other}); try again later"),
        }
    }

    async fn undo_join(&self, cx: &Context<'_>, undo: JoinUndo<'_>) {
        if undo.local {
            undo.session.remove_user(undo.user_id);
        }
        let engine = cx.engine();
        match engine
            .presence_leave(undo.topic, undo.user_id, cx.me())
            .await
        {
            Ok(true) => {
                self.forget_username(
                    engine,
                    &undo.session.id,
                    undo.generation,
                    undo.topic,
                    undo.user_id,
                )
                .await;
            }
            Ok(false) => {}
            Err(error) => {
                warn!(session = %undo.session.id, user = undo.user_id, %error, "presence not undone");
            }
        }
    }

    async fn leave(&self, cx: &Context<'_>, session: &Session, generation: &str, user: &Identity) {
        let engine = cx.engine();
        let topic = store::topic(&session.id, generation);
        engine.unsubscribe(&topic, cx.peer().id());
        session.remove_user(&user.user_id);
        match engine.presence_leave(&topic, &user.user_id, cx.me()).await {
            Ok(true) => {
                self.forget_username(engine, &session.id, generation, &topic, &user.user_id)
                    .await;
                let left = frame("participant-left", &json!({ "userId": user.user_id }));
                if let Err(error) = engine.publish(&topic, left, None).await {
                    warn!(session = %session.id, user = %user.user_id, %error, "participant-left not announced");
                }
            }
            Ok(false) => {}
            Err(error) => {
                warn!(session = %session.id, user = %user.user_id, %error, "presence not left");
            }
        }
        debug!(session = %session.id, user = %user.user_id, conn = %cx.me(), "left");
    }

    /// Deletes `user`'s display name unless the user is (again) present: read, check presence,
    /// then delete only the version read, so a name written by a rejoin meanwhile stays.
    async fn forget_username(
        &self,
        engine: &Engine,
        id: &str,
        generation: &str,
        topic: &str,
        user: &str,
    ) {
        let key = store::user_key(id, generation, user);
        let Ok(Some(stored)) = engine.get(&key).await else {
            return;
        };
        if matches!(engine.presence_contains(topic, user).await, Ok(false)) {
            let _ = engine.delete(&key, Expect::Version(stored.version)).await;
        }
    }

    /// Applies one `code-change`: brings this node's copy of the document to the log's newest
    /// entry, transforms and applies the edit on it, and appends the resulting `code-update` to
    /// the log only if no other edit landed meanwhile (`if_top`); otherwise catches up and
    /// tries again. The log's order is the document's order on every node.
    async fn apply_change(
        &self,
        cx: &Context<'_>,
        session: &Session,
        generation: &str,
        user: &Identity,
        change: Change,
    ) -> Result<(), Refusal> {
        let engine = cx.engine();
        let topic = store::topic(&session.id, generation);
        let _turn = session.edit_turn.lock().await;
        for _ in 0..MAX_EDIT_ATTEMPTS {
            self.sync_replica(engine, session, generation, &topic)
                .await?;
            let (prepared, pos, update) = {
                let state = lock(&session.state);
                let Some(replica) = state.replica.as_ref() else {
                    continue;
                };
                let prepared = match &change {
                    Change::FullText(text) => replica.doc.prepare_replace(text),
                    Change::Operation { base_version, op } => {
                        replica.doc.prepare_operation(*base_version, op.clone())
                    }
                }?;
                let update = frame(
                    "code-update",
                    &CodeUpdate {
                        user_id: &user.user_id,
                        code: prepared.text(),
                        version: prepared.applied().version,
                        ops: &prepared.applied().op,
                    },
                );
                (prepared, replica.pos, update)
            };
            // What the engine will hold is charged like this node's copy: the entry, with the
            // older entries its retention keeps, and the snapshot of the document it leaves.
            let size = update.len();
            let planned = session
                .reserve_append(
                    pos,
                    size,
                    store::escaped_len(prepared.text()),
                    self.log_bounds(),
                    self.tight_log_bounds(),
                )
                .map_err(refused_edit)?;
            let ack = frame(
                "code-ack",
                &json!({ "version": prepared.applied().version }),
            );
            let append = Append::publish(self.retention(planned.bounds))
                .if_top(pos.offset)
                .except(cx.me());
            // The author gets its ack instead of the entry, at the entry's place in the
            // topic's order: after every earlier update, before every later one, on any node.
            // Sending it after the append returned would let an update appended meanwhile by
            // another author reach this socket first.
            match engine.append_with_reply(&topic, update, append, ack).await {
                Ok(Appended::Done(at)) => {
                    // Operations that landed between the client's base and the version this
                    // one was prepared on: what it was transformed against.
                    let concurrent = match &change {
                        Change::FullText(_) => 0,
                        Change::Operation { base_version, .. } => {
                            prepared.prepared_on().saturating_sub(*base_version)
                        }
                    };
                    session.commit(prepared, pos, at, planned, size);
                    telemetry::operation_applied(matches!(change, Change::FullText(_)), concurrent);
                    return Ok(());
                }
                Ok(Appended::Conflict(_)) => continue,
                Err(EngineError::Full(_)) => return Err(Refusal::Edit(self.full_error())),
                Err(error) => return Err(Refusal::Engine(error)),
            }
        }
        Err(Refusal::Busy)
    }

    /// Brings this node's copy of the session's document to the log's newest entry, loading it
    /// (from the newest entry, or the record's snapshot) when there is none or the log cannot
    /// continue from it.
    async fn sync_replica(
        &self,
        engine: &Engine,
        session: &Session,
        generation: &str,
        topic: &str,
    ) -> Result<(), Refusal> {
        for _ in 0..MAX_SYNC_ROUNDS {
            let pos = {
                let state = lock(&session.state);
                if state.generation.as_deref() != Some(generation) {
                    return Err(Refusal::Gone);
                }
                state.replica.as_ref().map(|replica| replica.pos)
            };
            let Some(pos) = pos else {
                self.load_replica(engine, session, generation, topic)
                    .await?;
                continue;
            };
            let (entries, top) = match engine.read(topic, ReadFrom::After(pos), READ_BATCH).await? {
                Read::Gone { .. } => {
                    session.forget_replica_at(pos);
                    session.log_gone();
                    continue;
                }
                Read::Entries { entries, top } => (entries, top),
            };
            if entries.is_empty() {
                let same_log =
                    top.offset == pos.offset && (pos.offset == 0 || top.epoch == pos.epoch);
                if same_log {
                    return Ok(());
                }
                session.forget_replica_at(pos);
                continue;
            }
            // Parsed outside the lock; each entry's text is skipped.
            let edits: Result<Vec<_>, _> = entries
                .iter()
                .map(|entry| {
                    store::logged_edit(&entry.frame)
                        .map(|edit| (entry.offset, entry.frame.len(), edit))
                })
                .collect();
            let Ok(edits) = edits else {
                session.forget_replica_at(pos);
                continue;
            };
            // Done when the copy reached the log's top; otherwise (more entries than one read,
            // or the copy moved or went meanwhile) another round.
            if session
                .follow(pos, top.epoch, edits, self.log_bounds())
                .is_some_and(|now| now.offset >= top.offset)
            {
                return Ok(());
            }
        }
        Err(Refusal::Busy)
    }

    /// Loads this node's copy of the document: the log's newest entry, or the record's snapshot
    /// when that is newer (the log expired or is empty). The operations of the entries the log
    /// keeps go into the copy's operation log, so an edit a client based on a version before
    /// this node loaded the document (another node's edits landed first) is transformed like
    /// on the node that made them, not refused.
    async fn load_replica(
        &self,
        engine: &Engine,
        session: &Session,
        generation: &str,
        topic: &str,
    ) -> Result<(), Refusal> {
        let keep = self.config.shared_log_entries();
        let read = engine.read(topic, ReadFrom::Latest(keep), keep).await?;
        let top = match &read {
            Read::Entries { top, .. } | Read::Gone { top } => *top,
        };
        match &read {
            Read::Entries { entries, top } if !entries.is_empty() => {
                for entry in entries {
                    let at = Position {
                        offset: entry.offset,
                        epoch: top.epoch,
                    };
                    session.saw_entry(at, entry.frame.len(), self.log_bounds());
                }
            }
            Read::Entries { .. } | Read::Gone { .. } => session.log_gone(),
        }
        let Some(stored) = engine.get(&store::record_key(&session.id)).await? else {
            return Err(Refusal::Gone);
        };
        let meta = RecordMeta::decode(&stored.value).map_err(corrupt)?;
        if meta.generation != generation {
            return Err(Refusal::Gone);
        }
        let (code, version) = newest_document(&read, &meta, &stored.value)?;
        let ops = logged_ops(&read, version);
        let replica = session.load_replica(code, version, ops, top)?;
        let mut state = lock(&session.state);
        if state.generation.as_deref() == Some(generation) && state.replica.is_none() {
            state.replica = Some(replica);
        }
        Ok(())
    }

    /// Spends one `session-state` from this connection's allowance; past it the connection is
    /// told why and closed with 1008. A state frame carries the whole document (up to about
    /// 6 MiB), so a stream of tiny frames that each earn one would cost the server a full
    /// serialization per 40 bytes received; a legitimate client needs a handful at most (it
    /// reconnects and joins again to resync).
    fn spend_resync(&self, conn: &mut CollabConn, cx: &Context<'_>) -> bool {
        if conn
            .resyncs
            .check_at(STATE_FRAME_BURST, STATE_FRAMES_PER_SECOND, Instant::now())
        {
            return true;
        }
        telemetry::error("resync");
        let _ = cx.send(error_frame(
            "too many session-state resyncs (refused edits or joins); closing: reconnect and join again",
        ));
        cx.close(CloseReason::new(CloseReason::POLICY, "too many resyncs"));
        false
    }

    /// Sends a fresh `session-state` to a joined connection (after a refused edit), in order
    /// with the session's updates; returns whether it was sent.
    async fn resync(&self, conn: &mut CollabConn, cx: &Context<'_>) -> bool {
        if !self.spend_resync(conn, cx) {
            return false;
        }
        let (Some(session), Some(generation)) = (conn.session.clone(), conn.generation.clone())
        else {
            return false;
        };
        match self.send_state(cx, &session, &generation).await {
            Ok(()) => {
                telemetry::resynced();
                true
            }
            Err(error) => {
                // The connection is no longer subscribed and its copy cannot be reset: it
                // reconnects and joins again.
                telemetry::error("resync");
                let _ = cx.send(error_frame(&format!(
                    "the session's state could not be read ({error}); closing: reconnect and join again"
                )));
                cx.close(CloseReason::new(
                    CloseReason::TRY_AGAIN_LATER,
                    "session state unavailable",
                ));
                false
            }
        }
    }

    /// Subscribes this connection to the session's topic with a `session-state` as its replay:
    /// the state is the document at the log's newest entry when subscribing, and every later
    /// entry follows it exactly once, in order. Re-subscribing a subscribed connection (a
    /// resync) is the same: updates the state already contains are not delivered again.
    async fn send_state(
        &self,
        cx: &Context<'_>,
        session: &Session,
        generation: &str,
    ) -> Result<(), EngineError> {
        let engine = cx.engine();
        let topic = store::topic(&session.id, generation);
        let joining = engine
            .join(&topic, cx.peer(), ReadFrom::Latest(1), 1)
            .await?;
        match self
            .state_frame(engine, &session.id, generation, &topic, joining.read())
            .await
        {
            Ok(state) => {
                joining.go_live(vec![state]);
                Ok(())
            }
            Err(error) => {
                drop(joining);
                engine.unsubscribe(&topic, cx.peer().id());
                Err(error)
            }
        }
    }

    async fn state_frame(
        &self,
        engine: &Engine,
        id: &str,
        generation: &str,
        topic: &str,
        read: &Read,
    ) -> Result<Frame, EngineError> {
        let Some(stored) = engine.get(&store::record_key(id)).await? else {
            return Err(EngineError::Unavailable(
                "the session's record expired".to_owned(),
            ));
        };
        let meta = RecordMeta::decode(&stored.value).map_err(corrupt)?;
        let (code, version) = newest_document(read, &meta, &stored.value)?;
        let participants = self.participants(engine, id, generation, topic).await?;
        Ok(frame(
            "session-state",
            &SessionState {
                code: &code,
                language: &meta.language,
                version,
                participants: &participants,
            },
        ))
    }

    /// Everyone present, in the order they joined, with their display names.
    async fn participants(
        &self,
        engine: &Engine,
        id: &str,
        generation: &str,
        topic: &str,
    ) -> Result<Vec<Participant>, EngineError> {
        let members = engine.presence_members(topic).await?;
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let prefix = store::user_prefix(id, generation);
        let mut names = HashMap::new();
        let mut after: Option<String> = None;
        // Names of users who left are deleted as they leave; the bound only guards against
        // leftovers of failed deletes.
        let most = self
            .config
            .max_participants
            .saturating_add(members.len())
            .saturating_mul(2);
        let mut seen = 0usize;
        loop {
            let page = engine.scan(&prefix, after.as_deref(), SCAN_PAGE).await?;
            let more = page.len() == SCAN_PAGE;
            seen = seen.saturating_add(page.len());
            for (key, stored) in page {
                if let Some(user) = key.strip_prefix(&prefix) {
                    names.insert(
                        user.to_owned(),
                        String::from_utf8_lossy(&stored.value).into_owned(),
                    );
                }
                after = Some(key);
            }
            if !more || seen >= most {
                break;
            }
        }
        Ok(members
            .into_iter()
            .map(|user_id| Participant {
                username: names.remove(&user_id).unwrap_or_else(|| user_id.clone()),
                user_id,
            })
            .collect())
    }

    async fn read_meta(
        &self,
        engine: &Engine,
        id: &str,
    ) -> Result<Option<RecordMeta>, EngineError> {
        match engine.get(&store::record_key(id)).await? {
            Some(stored) => RecordMeta::decode(&stored.value).map(Some).map_err(corrupt),
            None => Ok(None),
        }
    }

    /// Stores the session's language (compare-and-set on the record).
    async fn set_language(
        &self,
        engine: &Engine,
        id: &str,
        generation: &str,
        language: &str,
    ) -> Result<(), Refusal> {
        let key = store::record_key(id);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let Some(stored) = engine.get(&key).await? else {
                return Err(Refusal::Gone);
            };
            let mut record = Record::decode(&stored.value).map_err(corrupt)?;
            if record.generation != generation {
                return Err(Refusal::Gone);
            }
            record.language = language.to_owned();
            let ttl = self.ttl(record.joined);
            match engine
                .put(
                    &key,
                    record.encode(),
                    Expect::Version(stored.version),
                    Some(ttl),
                )
                .await
            {
                Ok(Put::Stored(_)) => return Ok(()),
                Ok(Put::Conflict(_)) => continue,
                Err(EngineError::Full(_)) => return Err(Refusal::Edit(self.full_error())),
                Err(error) => return Err(Refusal::Engine(error)),
            }
        }
        Err(Refusal::Busy)
    }

    /// The session's incarnation: read from its record, or a new record written when there is
    /// none (a socket opened a session id nobody holds).
    async fn ensure_record(
        &self,
        engine: &Engine,
        session: &Session,
    ) -> Result<Arc<str>, EngineError> {
        let key = store::record_key(&session.id);
        for _ in 0..MAX_CAS_ATTEMPTS {
            if let Some(stored) = engine.get(&key).await? {
                let meta = RecordMeta::decode(&stored.value).map_err(corrupt)?;
                return Ok(session.adopt(&meta.generation, false));
            }
            let generation = Uuid::new_v4().to_string();
            let record = Record {
                generation: generation.clone(),
                language: self.config.default_language.clone(),
                joined: false,
                code: String::new(),
                version: 0,
            };
            match engine
                .put(&key, record.encode(), Expect::Absent, Some(self.ttl(false)))
                .await?
            {
                Put::Stored(_) => return Ok(session.adopt(&generation, true)),
                // Another node created it at the same moment: read theirs.
                Put::Conflict(_) => continue,
            }
        }
        Err(EngineError::Unavailable(
            "the session's record kept changing".to_owned(),
        ))
    }

    /// Keeps the session's record (and the display names of this node's users) alive while
    /// this node has sockets on it, and copies the newest document from the log into the
    /// record's snapshot, so the session survives its log's expiry and a late joiner always
    /// finds the current text. At most once per [`Collab::refresh_every`] unless `force`d.
    async fn keep_alive(&self, engine: &Engine, session: &Session, force: bool) {
        let Some(generation) = session.generation() else {
            return;
        };
        let now = Instant::now();
        if !session.begin_refresh(now, self.refresh_every(), force) {
            return;
        }
        let result = self.write_keep_alive(engine, session, &generation).await;
        if let Err(error) = &result {
            debug!(session = %session.id, %error, "session keep-alive failed");
        }
        session.end_refresh(now, result.is_ok());
    }

    async fn write_keep_alive(
        &self,
        engine: &Engine,
        session: &Session,
        generation: &str,
    ) -> Result<(), EngineError> {
        let key = store::record_key(&session.id);
        let topic = store::topic(&session.id, generation);
        let joined = session.joined_once();
        let mut written = false;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let stored = engine.get(&key).await?;
            let newest = match engine.read(&topic, ReadFrom::Latest(1), 1).await? {
                Read::Entries { entries, .. } => entries.into_iter().last(),
                Read::Gone { .. } => None,
            };
            let Some(stored) = stored else {
                // Expired although this node still serves it (a keep-alive came too late):
                // write it again with what the log holds.
                let (code, version) = newest
                    .and_then(|entry| store::logged_state(&entry.frame).ok())
                    .map(|state| (state.code, state.version))
                    .unwrap_or_default();
                let snapshot = store::escaped_len(&code);
                let record = Record {
                    generation: generation.to_owned(),
                    language: self.config.default_language.clone(),
                    joined,
                    code,
                    version,
                };
                match engine
                    .put(
                        &key,
                        record.encode(),
                        Expect::Absent,
                        Some(self.ttl(joined)),
                    )
                    .await?
                {
                    Put::Stored(_) => {
                        session.wrote_snapshot(snapshot);
                        written = true;
                        break;
                    }
                    Put::Conflict(_) => continue,
                }
            };
            let meta = RecordMeta::decode(&stored.value).map_err(corrupt)?;
            if meta.generation != generation {
                // Another incarnation: not this node's to keep.
                return Ok(());
            }
            let newer = newest.as_ref().and_then(|entry| {
                store::logged_version(&entry.frame)
                    .ok()
                    .filter(|version| *version > meta.version)
            });
            let (value, snapshot) = if newer.is_some() || (joined && !meta.joined) {
                let mut record = Record::decode(&stored.value).map_err(corrupt)?;
                if let Some(entry) = &newest
                    && let Ok(state) = store::logged_state(&entry.frame)
                    && state.version > record.version
                {
                    record.code = state.code;
                    record.version = state.version;
                }
                record.joined |= joined;
                (record.encode(), Some(store::escaped_len(&record.code)))
            } else {
                (stored.value.clone(), None)
            };
            let ttl = self.ttl(joined || meta.joined);
            match engine
                .put(&key, value, Expect::Version(stored.version), Some(ttl))
                .await?
            {
                Put::Stored(_) => {
                    // The snapshot this node wrote replaces the one charged before (an
                    // unchanged record keeps what was charged).
                    if let Some(snapshot) = snapshot {
                        session.wrote_snapshot(snapshot);
                    }
                    written = true;
                    break;
                }
                Put::Conflict(_) => continue,
            }
        }
        if !written {
            return Err(EngineError::Unavailable(
                "the session's record kept changing".to_owned(),
            ));
        }
        for user in session.local_users() {
            let key = store::user_key(&session.id, generation, &user);
            if let Some(stored) = engine.get(&key).await? {
                engine
                    .put(
                        &key,
                        stored.value,
                        Expect::Version(stored.version),
                        Some(self.ttl(true)),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    async fn rest(&self, engine: &Engine, request: &HttpRequest) -> Option<HttpResponse> {
        let path = request.path.strip_suffix('/').unwrap_or(&request.path);
        if path == "/api/sessions" {
            return Some(match request.method.as_str() {
                "POST" => {
                    if let Err(refused) = grant::rest(&request.caller, None) {
                        return Some(refused);
                    }
                    self.create_session(
                        engine,
                        &request.body,
                        ClientKey::from_ip(request.client_ip),
                    )
                    .await
                }
                _ => HttpResponse::json_error(405, "use POST to create a session"),
            });
        }
        let id = path.strip_prefix("/api/sessions/")?;
        if id.contains('/') {
            return None;
        }
        Some(match request.method.as_str() {
            "GET" => match grant::rest(&request.caller, Some(id)) {
                Ok(()) => self.describe_session(engine, id).await,
                Err(refused) => refused,
            },
            _ => HttpResponse::json_error(405, "use GET to read a session"),
        })
    }

    async fn create_session(
        &self,
        engine: &Engine,
        body: &[u8],
        client: ClientKey,
    ) -> HttpResponse {
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
        let session = match self.sessions.create(code.clone(), client, Instant::now()) {
            Ok(session) => session,
            Err(refused) if refused.is_per_client() => {
                return HttpResponse::json_error(429, &refused.to_string());
            }
            Err(refused) => return HttpResponse::json_error(503, &refused.to_string()),
        };
        // The record's snapshot is a second copy of the document, in the engine: charged to
        // the same budgets before it is written.
        if let Err(refused) = session.try_snapshot(store::escaped_len(&code)) {
            self.sessions.remove(&session.id);
            return match refused {
                budget::Refused::Client(limit) => HttpResponse::json_error(
                    429,
                    &sessions::CreateError::ShareFull(limit).to_string(),
                ),
                budget::Refused::Server(limit) => HttpResponse::json_error(
                    503,
                    &sessions::CreateError::OutOfMemory(limit).to_string(),
                ),
            };
        }
        let generation = Uuid::new_v4().to_string();
        let record = Record {
            generation: generation.clone(),
            language,
            joined: false,
            code,
            version: 0,
        };
        let written = engine
            .put(
                &store::record_key(&session.id),
                record.encode(),
                Expect::Absent,
                Some(self.ttl(false)),
            )
            .await;
        match written {
            Ok(Put::Stored(_)) => {
                session.adopt(&generation, true);
                telemetry::session_created();
                HttpResponse::json(201, &json!({ "sessionId": session.id }))
            }
            Ok(Put::Conflict(_)) => {
                // A random UUID already in use: practically never; the client retries.
                self.sessions.remove(&session.id);
                HttpResponse::json_error(503, "session id collision; try again")
            }
            Err(EngineError::Full(_)) => {
                self.sessions.remove(&session.id);
                HttpResponse::json_error(
                    503,
                    &format!(
                        "the server's memory for sessions is full ({} bytes); try again later",
                        self.config.max_state_bytes
                    ),
                )
            }
            Err(error) => {
                self.sessions.remove(&session.id);
                HttpResponse::json_error(503, &format!("{error}; try again later"))
            }
        }
    }

    async fn describe_session(&self, engine: &Engine, id: &str) -> HttpResponse {
        let unavailable = |error: EngineError| HttpResponse::json_error(503, &error.to_string());
        if !is_valid_session_id(id) {
            return HttpResponse::json_error(404, "session not found");
        }
        let key = store::record_key(id);
        let mut stored = match engine.get(&key).await {
            Ok(stored) => stored,
            Err(error) => return unavailable(error),
        };
        if stored.is_none()
            && let Some(session) = self.sessions.get(id, Instant::now())
        {
            // A socket opened this session an instant ago and its record is being written.
            if let Err(error) = self.ensure_record(engine, &session).await {
                return unavailable(error);
            }
            stored = match engine.get(&key).await {
                Ok(stored) => stored,
                Err(error) => return unavailable(error),
            };
        }
        let Some(stored) = stored else {
            return HttpResponse::json_error(404, "session not found");
        };
        let described = async {
            let meta = RecordMeta::decode(&stored.value).map_err(corrupt)?;
            let topic = store::topic(id, &meta.generation);
            let read = engine.read(&topic, ReadFrom::Latest(1), 1).await?;
            let (code, version) = newest_document(&read, &meta, &stored.value)?;
            let participants = self
                .participants(engine, id, &meta.generation, &topic)
                .await?;
            Ok::<_, EngineError>(json!({
                "sessionId": id,
                "code": code,
                "language": meta.language,
                "version": version,
                "participants": participants,
            }))
        };
        match described.await {
            Ok(body) => HttpResponse::json(200, &body),
            Err(error) => unavailable(error),
        }
    }
}

/// What to take back when a join is refused halfway.
#[derive(Clone, Copy)]
struct JoinUndo<'a> {
    session: &'a Session,
    generation: &'a str,
    topic: &'a str,
    user_id: &'a str,
    /// Whether the user was counted on this node already.
    local: bool,
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
    fn the_documented_worst_case_is_the_defaults() {
        // docs/protocols/collab.md, "Limits and worst-case memory".
        let config = Config::default();
        assert_eq!(config.shared_log_entries(), 64);
        assert_eq!(config.shared_log_bytes(), 12_648_448);
        assert_eq!(config.worst_case_session_bytes(), 22_304_768);
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
