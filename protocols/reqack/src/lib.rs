//! reqack: request/response messaging with acknowledged, never-lost events.
//!
//! Clients connect at `/ws?userId=<id>` (a missing or empty `userId` gets HTTP 400) and speak
//! four envelopes:
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
//! Every user has an outbox and one event-id counter that only grows. An event stays in the
//! outbox until a socket of its user acks it; it is sent again, with its original id and in
//! order, whenever a socket of the user connects, and on a live socket once it has gone
//! unacknowledged for [`Config::redelivery_timeout`]. `typing`, `online` and `offline` are
//! ephemeral: they get ids but go only to sockets connected now. Outboxes are bounded; a request
//! whose event would not fit fails with `OUTBOX_FULL` and changes nothing. Requests are
//! idempotent by (user, request id). See `docs/protocols/reqack.md` for the full protocol.
//!
//! # Bounds
//! Every pool is bounded in items and bytes and charged to one
//! [`switchboard_core::MemoryBudget`] ([`Config::max_state_bytes`]); [`worst_case_bytes`] is the
//! documented formula. What a client can make the server keep (users that never connected,
//! pending events) and how fast it may ask (requests, connects) is counted per
//! [`switchboard_core::ClientKey`] (its address), so changing `userId` dodges nothing. Events for
//! a user that never connected are few and expire ([`Config::unclaimed_ttl`]).
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
//! All state lives in memory behind one lock (see the `state` module for why one: an event's id,
//! its place in the outbox and its hand-off to the user's sockets must be one step). Unlike the
//! broadcast protocols this one does not use `Broadcaster`: every recipient gets its own frame
//! (its own event id), redeliveries are batches, and delivery must be atomic with the outbox.

mod config;
mod cost;
mod idempotency;
mod messages;
mod outbox;
mod state;
mod store;
mod web;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchboard_core::sync::lock;
use switchboard_core::{
    ClientKey, Context, Engine, Handshake, HttpRequest, HttpResponse, MemoryBudget, Peer, Protocol,
    Reject,
};
use tracing::{debug, error};

pub use config::Config;
pub use cost::worst_case_bytes;
pub use messages::{ApiError, CallStatus, CallType, Direction, ErrorCode};
pub use state::{Memory, Stats};

use messages::Inbound;
use state::State;

/// The reqack protocol. Cheap to share behind an `Arc`; all state is inside.
#[derive(Debug)]
pub struct ReqAck {
    config: Config,
    budget: Arc<MemoryBudget>,
    state: Mutex<State>,
    /// Serializes presence fan-outs, which are sent outside the state lock: the online and
    /// offline events of one user reach everybody in the order they were decided, and the state
    /// lock is held only to allocate their ids. An async lock: a connect waiting for another's
    /// fan-out yields its worker thread instead of blocking it, so requests keep being served.
    presence: tokio::sync::Mutex<()>,
}

/// Per-connection state: who this socket belongs to.
#[derive(Debug)]
pub struct Conn {
    user: String,
    /// The client's address key: its shares and rate buckets.
    client: ClientKey,
}

impl ReqAck {
    /// A server with `config` and empty state.
    pub fn new(config: Config) -> Self {
        let budget = Arc::new(MemoryBudget::new(config.max_state_bytes));
        Self {
            state: Mutex::new(State::new(config.clone(), budget.clone())),
            budget,
            presence: tokio::sync::Mutex::new(()),
            config,
        }
    }

    /// Bytes of protocol state charged to the memory budget now (at most
    /// [`Config::max_state_bytes`]).
    pub fn state_bytes(&self) -> usize {
        self.budget.used()
    }

    /// Bytes charged per pool, and the budget's total and limit.
    pub fn memory(&self) -> Memory {
        lock(&self.state).memory()
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters: users, online users, pending events, stored messages, open calls, cache size.
    pub fn stats(&self) -> Stats {
        lock(&self.state).stats()
    }

    /// Unacknowledged events waiting for `user`.
    pub fn pending_for(&self, user: &str) -> usize {
        lock(&self.state).pending_for(user)
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

impl Protocol for ReqAck {
    type Conn = Conn;

    fn name(&self) -> &'static str {
        "reqack"
    }

    fn admit(&self, handshake: &Handshake<'_>) -> Result<Conn, Reject> {
        if handshake.path != "/ws" {
            return Err(Reject::NotFound);
        }
        let user = handshake
            .query_param("userId")
            .filter(|u| !u.is_empty())
            .ok_or_else(|| Reject::BadRequest("missing `userId` query parameter".into()))?;
        let client = ClientKey::from_ip(handshake.client_ip);
        lock(&self.state).admit(&user, client, Instant::now())?;
        Ok(Conn { user, client })
    }

    async fn on_open(&self, conn: &mut Conn, cx: &Context<'_>) {
        let peer = cx.peer();
        debug!(user = %conn.user, conn = %peer.id(), "reqack socket open");
        let _order = self.presence.lock().await;
        let fanout = lock(&self.state).open(&conn.user, peer, Instant::now());
        if let Some(fanout) = fanout {
            fanout.send();
        }
    }

    async fn on_text(&self, conn: &mut Conn, cx: &Context<'_>, text: &str) {
        let peer = cx.peer();
        let inbound = match messages::parse(text, self.config.max_id_bytes) {
            Ok(inbound) => inbound,
            Err(error) => return Self::send_error(peer, &error),
        };
        let now = Instant::now();
        match inbound {
            Inbound::Ack { id } => lock(&self.state).ack(&conn.user, id),
            Inbound::Request {
                id,
                payload_type,
                payload,
            } => {
                let response = lock(&self.state).request(
                    &conn.user,
                    conn.client,
                    &id,
                    payload_type.as_deref(),
                    payload,
                    now,
                );
                if let Some(frame) = response {
                    let _ = peer.send(frame);
                }
            }
            Inbound::Event {
                event_type,
                payload,
            } => {
                let result = lock(&self.state).client_event(
                    &conn.user,
                    conn.client,
                    &event_type,
                    payload,
                    now,
                );
                if let Err(error) = result {
                    Self::send_error(peer, &error);
                }
            }
        }
    }

    async fn on_close(&self, conn: Conn, cx: &Context<'_>) {
        let peer = cx.peer();
        debug!(user = %conn.user, conn = %peer.id(), "reqack socket closed");
        let _order = self.presence.lock().await;
        let fanout = lock(&self.state).close(&conn.user, peer.id());
        if let Some(fanout) = fanout {
            fanout.send();
        }
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(self.config.tick_interval())
    }

    async fn on_tick(&self, conn: &mut Conn, _cx: &Context<'_>) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        state.expire_unclaimed(now);
        state.redeliver_overdue(&conn.user, now);
    }

    /// The browser demo client: `GET /` and its assets (see `web/`).
    async fn http(&self, _engine: &Engine, request: HttpRequest) -> Option<HttpResponse> {
        web::serve(&request)
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
