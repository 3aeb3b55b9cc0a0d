//! reqack: request/response messaging with acknowledged, never-lost events.
//!
//! Clients connect at `/ws?userId=<id>` (a missing or empty `userId` gets HTTP 400) and speak
//! four envelopes. When the server verifies signed tokens the user is the token's `sub`
//! instead: `userId` may be left out, and one naming another user gets HTTP 403.
//! The envelopes:
//!
//! - `request {type, timestamp, id, payloadType, payload}` → `response {type, timestamp, id,
//!   payload}` with the same `id`: `new`, `edit`, `delete`, `dlvrd`, `read`, `call`, `newCall`,
//!   `closeCall`, `history`. A failed request's payload is `{error:{code, message}}`.
//! - `event {type, timestamp, id:<number>, eventType, payload}` from the server, which the client
//!   acknowledges with `{type:"ack", id:"<id>"}`.
//! - `event {type, eventType:"typing", payload:{chatId}}` from the client (no response).
//! - `error {type, payload:{code, message}}` for frames that are not JSON or have an unknown type.
//!
//! # Delivery
//! Every user has an outbox: a log in the state engine whose offsets are the user's event ids,
//! so they only grow and are unique per user across nodes. An event stays in the outbox until a
//! socket of its user acks it, on any node; it is sent again, with its original id and in order,
//! whenever a socket of the user connects, and on a live socket once it has gone unacknowledged
//! for [`Config::redelivery_timeout`]. `typing`, `online` and `offline` are ephemeral: they get
//! ids but go only to sockets connected now. Outboxes are bounded; a request whose event would
//! not fit fails with `OUTBOX_FULL` and changes nothing. Requests are idempotent by (user,
//! request id), on any node. See `docs/protocols/reqack.md` for the full protocol.
//!
//! # Bounds
//! Shared state is bounded by the state engine's own limit and by the retention of each log.
//! What this node keeps (its books of what it queued and stored, per sending client; its user
//! table; its rate buckets) is bounded in items and bytes and charged to one
//! [`switchboard_core::MemoryBudget`] ([`Config::max_state_bytes`]); [`worst_case_bytes`] is the
//! documented formula. What a client can make the server keep (users that never connected,
//! pending events, stored messages, open calls, remembered responses) and how fast it may ask
//! (requests, connects) is counted per [`switchboard_core::ClientKey`] (its address), so
//! changing `userId` dodges nothing. Events for a user that never connected are few and expire
//! ([`Config::unclaimed_ttl`]).
//!
//! # Plugging in
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use std::sync::Arc;
//! use switchboard_reqack::{Config, ReqAck};
//! let protocol = Arc::new(ReqAck::new(Config::default()));
//! let config = switchboard_server::ServerConfig::default();
//! let (app, handle) = switchboard_server::router(protocol, config.clone());
//! let listener = switchboard_server::bind("127.0.0.1:8000".parse().unwrap(), config.accept_backlog)?;
//! switchboard_server::serve(listener, app, &handle, config.shutdown_grace).await
//! # }
//! ```
//!
//! # State
//! Nothing shared is kept in the protocol value: outboxes, messages, calls, remembered
//! responses, presence and the per-user rate live in the node's [`Engine`] (see the `state`
//! module), so the same code serves one node, a durable node or a cluster. Request handling is
//! split into validation (pure) and effects on the engine; redelivery timing and the node's
//! books are sans-IO state machines unit-tested without sockets.

mod config;
mod cost;
mod idempotency;
mod ledger;
mod messages;
mod outbox;
mod state;
mod store;
pub mod telemetry;
mod web;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use switchboard_core::engine::EngineEvent;
use switchboard_core::{
    ClientKey, Context, Engine, Handshake, HttpRequest, HttpResponse, MemoryBudget, Peer, Protocol,
    Reject,
};
use tracing::{debug, error};

pub use config::Config;
pub use cost::worst_case_bytes;
pub use messages::{ApiError, CallStatus, CallType, Direction, ErrorCode};
pub use state::{IDEMPOTENCY_TTL, Memory, Stats};

use messages::Inbound;
use state::Node;

/// The reqack protocol. Cheap to share behind an `Arc`; shared state is in the engine.
#[derive(Debug)]
pub struct ReqAck {
    node: Node,
    /// The engine this protocol is served with, remembered from the first hook that names it,
    /// for [`ReqAck::stats`] and [`ReqAck::pending_for`] (the runtime owns the engine).
    engine: OnceLock<Engine>,
}

/// Per-connection state: who this socket belongs to and what it redelivers.
#[derive(Debug)]
pub struct Conn {
    user: String,
    /// The client's address key: its shares and rate buckets.
    client: ClientKey,
    /// The user's outbox topic.
    topic: String,
    /// When this socket last sent each pending event.
    redelivery: outbox::Redelivery,
    /// Counted in the node's sockets of the user.
    registered: bool,
    /// Subscribed to the outbox topic.
    joined: bool,
    /// In the online room.
    present: bool,
}

impl Conn {
    fn new(user: String, client: ClientKey) -> Self {
        Self {
            topic: state::keys::outbox(&user),
            user,
            client,
            redelivery: outbox::Redelivery::default(),
            registered: false,
            joined: false,
            present: false,
        }
    }
}

impl ReqAck {
    /// A server with `config`; its shared state is in the engine it is served with.
    pub fn new(config: Config) -> Self {
        let budget = Arc::new(MemoryBudget::new(config.max_state_bytes));
        Self {
            node: Node::new(config, budget),
            engine: OnceLock::new(),
        }
    }

    fn remember_engine(&self, engine: &Engine) {
        let _ = self.engine.get_or_init(|| engine.clone());
    }

    /// The engine this protocol is served with, once a connection or an HTTP request named it.
    pub fn engine(&self) -> Option<&Engine> {
        self.engine.get()
    }

    /// Bytes of node-local protocol state charged to the memory budget now (at most
    /// [`Config::max_state_bytes`]).
    pub fn state_bytes(&self) -> usize {
        self.node.budget().used()
    }

    /// Bytes charged per node-local pool, and the budget's total and limit.
    pub fn memory(&self) -> Memory {
        self.node.memory()
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        self.node.config()
    }

    /// Counters: users, online users, pending events, stored messages, open calls, cache size
    /// (see [`Stats`] for which are cluster-wide). Before a hook named the engine only the
    /// node-local ones are known (the others are 0).
    pub async fn stats(&self) -> Stats {
        match self.engine.get() {
            Some(engine) => self.node.stats(engine).await,
            None => self.node.local_stats(),
        }
    }

    /// Unacknowledged events waiting for `user` (its outbox, on any node); 0 before the first
    /// connection.
    pub async fn pending_for(&self, user: &str) -> usize {
        match self.engine.get() {
            Some(engine) => self.node.pending_for(engine, user).await,
            None => 0,
        }
    }

    fn send_error(peer: &Peer, error: &ApiError) {
        match messages::error_frame(error, messages::now_ms()) {
            Ok(frame) => {
                let _ = peer.send(frame);
            }
            Err(e) => error!(error = %e, "could not encode an error frame"),
        }
    }
}

impl Default for ReqAck {
    fn default() -> Self {
        Self::new(Config::default())
    }
}

/// Who the socket of `handshake` is: its `userId`, or with signed identity the token's `sub`
/// (a `userId` naming anyone else is refused with 403, a missing or empty one means `sub`).
fn user_of(handshake: &Handshake<'_>) -> Result<String, Reject> {
    let asked = handshake.query_param("userId").filter(|u| !u.is_empty());
    let Some(identity) = handshake.identity else {
        return asked.ok_or_else(|| Reject::BadRequest("missing `userId` query parameter".into()));
    };
    let subject = identity.subject();
    match asked {
        // The refusal does not echo the parameter: it is the client's text, of any length.
        Some(asked) if asked != subject => Err(Reject::Forbidden(
            "`userId` is not the user the token was issued to (omit it or use the token's `sub`)"
                .into(),
        )),
        _ => Ok(subject.to_owned()),
    }
}

impl Protocol for ReqAck {
    type Conn = Conn;

    fn name(&self) -> &'static str {
        "reqack"
    }

    fn admit(&self, handshake: &Handshake<'_>) -> Result<Conn, Reject> {
        if handshake.path != "/ws" {
            return Err(Reject::NotFound);
        }
        let user = user_of(handshake)?;
        let client = ClientKey::from_ip(handshake.client_ip);
        self.node.admit(&user, client, Instant::now())?;
        Ok(Conn::new(user, client))
    }

    async fn on_open(&self, conn: &mut Conn, cx: &Context<'_>) {
        self.remember_engine(cx.engine());
        debug!(user = %conn.user, conn = %cx.me(), "reqack socket open");
        self.node
            .open(cx.engine(), conn, cx.peer(), cx.me(), Instant::now())
            .await;
    }

    async fn on_text(&self, conn: &mut Conn, cx: &Context<'_>, text: &str) {
        let peer = cx.peer();
        let engine = cx.engine();
        let inbound = match messages::parse(text, self.node.config().max_id_bytes) {
            Ok(inbound) => inbound,
            Err(error) => return Self::send_error(peer, &error),
        };
        let now = Instant::now();
        match inbound {
            Inbound::Ack { id } => self.node.ack(engine, &conn.user, id).await,
            Inbound::Request {
                id,
                payload_type,
                payload,
            } => {
                let response = self
                    .node
                    .request(
                        engine,
                        &conn.user,
                        conn.client,
                        &id,
                        payload_type.as_deref(),
                        payload,
                        now,
                    )
                    .await;
                if let Some(frame) = response {
                    let _ = peer.send(frame);
                }
            }
            Inbound::Event {
                event_type,
                payload,
            } => {
                let result = self
                    .node
                    .client_event(engine, &conn.user, conn.client, &event_type, payload, now)
                    .await;
                if let Err(error) = result {
                    Self::send_error(peer, &error);
                }
            }
        }
    }

    async fn on_close(&self, conn: Conn, cx: &Context<'_>) {
        debug!(user = %conn.user, conn = %cx.me(), "reqack socket closed");
        self.node.close(cx.engine(), conn, cx.me()).await;
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(self.node.config().tick_interval())
    }

    async fn on_tick(&self, conn: &mut Conn, cx: &Context<'_>) {
        self.node
            .tick(cx.engine(), conn, cx.peer(), Instant::now())
            .await;
    }

    /// The browser demo client: `GET /` and its assets (see `web/`).
    async fn http(&self, engine: &Engine, request: HttpRequest) -> Option<HttpResponse> {
        self.remember_engine(engine);
        web::serve(&request)
    }

    /// A user whose last socket was on a node that disappeared is announced `offline`, as if
    /// that socket had closed.
    async fn on_engine_event(&self, engine: &Engine, event: EngineEvent) {
        self.remember_engine(engine);
        match event {
            EngineEvent::MemberExpired { room, member } if room == state::ONLINE_ROOM => {
                debug!(user = %member, "online user expired with its node");
                self.node.member_expired(engine, &member).await;
            }
            other => debug!(event = ?other, "engine event ignored"),
        }
    }
}

/// The wire codec's hot paths, public so benchmarks and fuzzers can drive them directly.
pub mod codec {
    use switchboard_core::Frame;

    use crate::messages::{self, NewEvent, ServerEvent};

    /// Parses one inbound frame with the default id limit; `true` if it is a well-formed
    /// request, ack or client event.
    pub fn parse_frame(text: &str) -> bool {
        messages::parse(text, crate::Config::default().max_id_bytes).is_ok()
    }

    /// Encodes the `new` event a recipient gets for a message.
    pub fn encode_new_event(
        event_id: u64,
        message_id: u64,
        from: &str,
        message: &str,
    ) -> Option<Frame> {
        let event = ServerEvent::New(NewEvent {
            message_id,
            from: from.to_owned(),
            chat_id: from.to_owned(),
            message: message.to_owned(),
            client_message_id: None,
            timestamp: messages::now_ms(),
        });
        messages::event_frame(event_id, messages::now_ms(), &event).ok()
    }
}
