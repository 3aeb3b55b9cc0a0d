//! fastchat: one-to-one direct chat over WebSocket, as documented in `docs/protocols/fastchat.md`.
//!
//! Clients connect to `/ws`, identify with `HELLO {user_id, display_name}` and then open chats
//! (`OPEN_CHAT`), send messages (`MSG`, acknowledged in two phases: `sent` by the server,
//! `delivered` when the recipient answers `MSG_ACK`), signal typing (`TYPING`) and heartbeat
//! (`PING`/`PONG`). A socket's first HELLO is answered with `PRESENCE`, the list of every known
//! user with an `online` flag; after that every identified socket hears each change as a small
//! `PRESENCE` delta. Messages to a user who is offline wait in a bounded queue until that user's
//! next HELLO. See `docs/protocols/fastchat.md` for every rule and error.
//!
//! Everything stored is bounded in items, shared per client ([`ClientKey`]: an IP, never a
//! `user_id`) where one client could exhaust it, and charged in bytes to a [`MemoryBudget`] of
//! [`Config::max_state_bytes`]; see [`Config::worst_case_state_bytes`] and [`FastChat::stats`].
//!
//! [`FastChat`] implements [`switchboard_core::Protocol`]; serve it with `switchboard-server`:
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use std::sync::Arc;
//! use switchboard_fastchat::{Config, FastChat};
//! use switchboard_server::{ServerConfig, bind, router, serve};
//!
//! let server = ServerConfig::default();
//! let (app, handle) = router(Arc::new(FastChat::new(Config::default())), server.clone());
//! let listener = bind(([127, 0, 0, 1], 8000).into(), server.accept_backlog)?;
//! serve(listener, app, &handle, server.shutdown_grace).await
//! # }
//! ```
//!
//! Shared state is one bounded [`state::Registry`] behind a mutex, plus the core's
//! [`Broadcaster`] (topics `fastchat:user:<id>` and `fastchat:presence`) and [`Presence`] (who is
//! online, per socket) stores, which an embedder may replace. Liveness is the protocol's own:
//! there are no WebSocket pings; a socket from which no frame arrived for `ping_interval +
//! pong_timeout` is dropped.

pub mod messages;
pub mod sanitize;
pub mod state;
mod web;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use switchboard_core::sync::lock;
use switchboard_core::{
    Broadcaster, ClientKey, ConnId, Context, Engine, Frame, Handshake, HttpRequest, HttpResponse,
    Keepalive, LocalBroadcaster, LocalPresence, MemoryBudget, Peer, Presence, Protocol, Rate,
    RateLimiter, Reject, TokenBuckets,
};
use tracing::debug;
use uuid::Uuid;

use crate::messages::{ClientMessage, ErrorCode, Kind, PresenceUser, frame, now_iso8601};
use crate::state::{OpenError, QueueError, RegisterError, Registry, chat_id};

/// The only path served.
pub const WS_PATH: &str = "/ws";
/// Presence room of online users (members are user ids, one entry per socket).
const ONLINE_ROOM: &str = "fastchat:online";
/// Topic of every identified socket, for `PRESENCE`.
const PRESENCE_TOPIC: &str = "fastchat:presence";

fn user_topic(id: Uuid) -> String {
    format!("fastchat:user:{id}")
}

/// fastchat's limits and timings. Every collection the protocol keeps is bounded here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// How often clients are expected to PING. Default 15 s.
    pub ping_interval: Duration,
    /// Grace after a missed ping. A socket silent for `ping_interval + pong_timeout` (20 s by
    /// default) is closed with 1001 "idle timeout". Default 5 s.
    pub pong_timeout: Duration,
    /// `MSG` per user per `rate_window` (0: unlimited). Default 60.
    pub msg_rate_limit: usize,
    /// `TYPING` per user per `rate_window` (0: unlimited). Default 10.
    pub typing_rate_limit: usize,
    /// The sliding rate-limit window. Default 60 s.
    pub rate_window: Duration,
    /// Users remembered (online or not). When full, the user offline the longest is forgotten
    /// with their chats and queue; if everyone is online, HELLO from a new user gets
    /// `UNAUTHORIZED`. Default 10 000.
    pub max_users: usize,
    /// Open chats per user; further `OPEN_CHAT`s get `RATE_LIMITED`. Default 200.
    pub max_chats_per_user: usize,
    /// Messages queued for one offline user; beyond it the sender gets `MESSAGE_FAILED`.
    /// Default 100.
    pub max_queued_per_user: usize,
    /// Messages queued for all offline users together; beyond it senders get `MESSAGE_FAILED`.
    /// Default 10 000.
    pub max_queued_total: usize,
    /// Accepted messages remembered for idempotent retries and delivery acks, oldest forgotten
    /// first. Default 100 000.
    pub max_tracked_messages: usize,
    /// Largest inbound frame when the server config does not say otherwise; larger frames close
    /// the socket with 1009. Default 64 KiB, the runtime default every protocol but collab uses.
    pub max_frame_bytes: usize,
    /// Valid `HELLO`s per user per `rate_window` (0: unlimited); more get `RATE_LIMITED`.
    /// Default 10.
    pub hello_rate_limit: usize,
    /// Users one client (IPv4 address or IPv6 /64, see [`ClientKey`]) may create (0:
    /// unlimited). At the limit that client's own longest-offline user is forgotten; if all of
    /// them are online, the HELLO of a new user gets `RATE_LIMITED`. Default 100.
    pub max_users_per_client: usize,
    /// Messages one client may have waiting in offline queues, counted against the sender's
    /// client (0: unlimited); more get `MESSAGE_FAILED`. Default 1 000.
    pub max_queued_per_client: usize,
    /// Per client: `MSG`s a minute (a token bucket of this many, refilled at this many a
    /// minute); keyed on the client, so switching `user_id` does not dodge it. 0: unlimited.
    /// Default 600.
    pub client_msg_per_minute: u32,
    /// Per client: `TYPING`s a minute, like `client_msg_per_minute`. Default 120.
    pub client_typing_per_minute: u32,
    /// Per client: valid `HELLO`s a minute, like `client_msg_per_minute`. Default 60.
    pub client_hello_per_minute: u32,
    /// Clients tracked by the per-client rate limits; when full, clients whose buckets have
    /// refilled are forgotten, and if none has, new clients are refused (`RATE_LIMITED`).
    /// Default 10 000.
    pub max_clients: usize,
    /// Bytes of protocol state (users, chats, queues, message records, rate-limit tables), see
    /// [`Config::worst_case_state_bytes`]. New work that does not fit is refused with the
    /// protocol's error; nothing stored is evicted for it. Default 256 MiB.
    pub max_state_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(15),
            pong_timeout: Duration::from_secs(5),
            msg_rate_limit: 60,
            typing_rate_limit: 10,
            rate_window: Duration::from_secs(60),
            max_users: 10_000,
            max_chats_per_user: 200,
            max_queued_per_user: 100,
            max_queued_total: 10_000,
            max_tracked_messages: 100_000,
            max_frame_bytes: 64 * 1024,
            hello_rate_limit: 10,
            max_users_per_client: 100,
            max_queued_per_client: 1_000,
            client_msg_per_minute: 600,
            client_typing_per_minute: 120,
            client_hello_per_minute: 60,
            max_clients: 10_000,
            max_state_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Bytes charged per key of a per-user sliding-window rate limiter besides its timestamps (the
/// 36-byte key string, the table slot, the deque header, with slack).
pub const RATE_KEY_OVERHEAD_BYTES: usize = 192;

/// A per-client limit of `per_minute` events a minute (0: unlimited): a token bucket of
/// `per_minute` tokens refilled at `per_minute / 60` a second, fractions included (GCRA, one
/// instant per client), at most `max_clients` clients tracked.
fn per_minute_buckets(per_minute: u32, max_clients: usize) -> TokenBuckets<ClientKey> {
    TokenBuckets::with_rate(
        Rate::per_window(per_minute, Duration::from_secs(60)),
        max_clients,
    )
}

/// Worst-case bytes of one sliding-window limiter of `limit` events over `keys` keys: each key
/// keeps at most `limit` 16-byte timestamps, in a deque whose capacity grows to the next power of
/// two.
fn sliding_limiter_bytes(limit: usize, keys: usize) -> usize {
    if limit == 0 {
        return 0;
    }
    let per_key = limit
        .checked_next_power_of_two()
        .unwrap_or(usize::MAX)
        .saturating_mul(16)
        .saturating_add(RATE_KEY_OVERHEAD_BYTES);
    per_key.saturating_mul(keys)
}

impl Config {
    /// The longest idle timeout honoured (7 days), so absurd settings cannot overflow timers.
    pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

    /// How long a socket may stay silent: `ping_interval + pong_timeout`, at most
    /// [`Config::MAX_IDLE_TIMEOUT`].
    pub fn idle_timeout(&self) -> Duration {
        self.ping_interval
            .saturating_add(self.pong_timeout)
            .min(Self::MAX_IDLE_TIMEOUT)
    }

    /// Bytes charged up front for the rate-limit tables, whose worst case is fixed by the
    /// limits: the per-user sliding windows (MSG, TYPING, HELLO; at most `max_users` keys each)
    /// and the per-client token buckets (three tables of at most `max_clients` keys).
    pub fn fixed_state_bytes(&self) -> usize {
        let users = self.max_users.max(1);
        // Each table's own bound (`max(max_clients, 4)` keys at three slots each; 0 when
        // unlimited), from an empty table, which allocates nothing.
        let buckets = [
            self.client_msg_per_minute,
            self.client_typing_per_minute,
            self.client_hello_per_minute,
        ]
        .iter()
        .map(|per_minute| per_minute_buckets(*per_minute, self.max_clients).max_bytes())
        .fold(0usize, usize::saturating_add);
        sliding_limiter_bytes(self.msg_rate_limit, users)
            .saturating_add(sliding_limiter_bytes(self.typing_rate_limit, users))
            .saturating_add(sliding_limiter_bytes(self.hello_rate_limit, users))
            .saturating_add(buckets)
    }

    /// The most bytes of protocol state the limits allow, the formula documented in
    /// `docs/protocols/fastchat.md`:
    ///
    /// ```text
    /// fixed_state_bytes
    ///   + max_users * PRESENCE_ENTRY_MAX_BYTES + PRESENCE_ENVELOPE_BYTES   (cached full list)
    ///   + max_users * USER_BYTES
    ///   + max_users * max_chats_per_user / 2 * CHAT_BYTES
    ///   + max_queued_total * (MAX_MSG_FRAME_BYTES + QUEUE_ENTRY_OVERHEAD_BYTES)
    ///   + max_tracked_messages * (2 * MESSAGE_ID_MAX_BYTES + RECORD_OVERHEAD_BYTES)
    /// ```
    ///
    /// What is actually charged never exceeds this, nor `max(max_state_bytes,
    /// fixed_state_bytes)`.
    pub fn worst_case_state_bytes(&self) -> usize {
        use crate::state::{
            CHAT_BYTES, MAX_MSG_FRAME_BYTES, MESSAGE_ID_MAX_BYTES, PRESENCE_ENTRY_MAX_BYTES,
            PRESENCE_ENVELOPE_BYTES, QUEUE_ENTRY_OVERHEAD_BYTES, RECORD_OVERHEAD_BYTES, USER_BYTES,
        };
        let users = self.max_users.max(1);
        let chats = users.saturating_mul(self.max_chats_per_user) / 2;
        let queued = MAX_MSG_FRAME_BYTES.saturating_add(QUEUE_ENTRY_OVERHEAD_BYTES);
        let record = MESSAGE_ID_MAX_BYTES
            .saturating_mul(2)
            .saturating_add(RECORD_OVERHEAD_BYTES);
        let presence_list = users
            .saturating_mul(PRESENCE_ENTRY_MAX_BYTES)
            .saturating_add(PRESENCE_ENVELOPE_BYTES);
        self.fixed_state_bytes()
            .saturating_add(presence_list)
            .saturating_add(users.saturating_mul(USER_BYTES))
            .saturating_add(chats.saturating_mul(CHAT_BYTES))
            .saturating_add(self.max_queued_total.saturating_mul(queued))
            .saturating_add(self.max_tracked_messages.max(1).saturating_mul(record))
    }
}

/// What the protocol holds right now, for operators and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Bytes charged to the state budget (see [`Config::worst_case_state_bytes`]).
    pub state_bytes: usize,
    /// The budget's limit ([`Config::max_state_bytes`]).
    pub state_bytes_limit: usize,
    /// Known users.
    pub users: usize,
    /// Open chats.
    pub chats: usize,
    /// Messages waiting in offline queues.
    pub queued: usize,
    /// Remembered message records.
    pub tracked_messages: usize,
}

/// The fastchat protocol: one value serves every connection.
pub struct FastChat {
    config: Config,
    registry: Mutex<Registry>,
    broadcaster: Arc<dyn Broadcaster>,
    presence: Arc<dyn Presence>,
    budget: Arc<MemoryBudget>,
    msg_limiter: RateLimiter,
    typing_limiter: RateLimiter,
    hello_limiter: RateLimiter,
    /// Per-client rate limits, keyed on the client so switching `user_id` does not dodge them.
    client_msg: TokenBuckets<ClientKey>,
    client_typing: TokenBuckets<ClientKey>,
    client_hello: TokenBuckets<ClientKey>,
}

impl fmt::Debug for FastChat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FastChat")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Per-connection state: the client it comes from and who this socket is, once it said HELLO.
#[derive(Debug)]
pub struct Conn {
    client: ClientKey,
    user: Option<Uuid>,
}

impl FastChat {
    /// fastchat with in-process stores.
    pub fn new(config: Config) -> Self {
        Self::with_stores(
            config,
            Arc::new(LocalBroadcaster::new()),
            Arc::new(LocalPresence::new()),
        )
    }

    /// fastchat with the given fan-out and presence backends.
    pub fn with_stores(
        config: Config,
        broadcaster: Arc<dyn Broadcaster>,
        presence: Arc<dyn Presence>,
    ) -> Self {
        let keys = config.max_users.max(1);
        let budget = Arc::new(MemoryBudget::new(config.max_state_bytes));
        // The rate-limit tables are bounded by their key counts; their worst case is charged up
        // front so the budget covers them without instrumenting the core's limiters.
        budget.force_reserve(config.fixed_state_bytes());
        let clients = config.max_clients;
        Self {
            registry: Mutex::new(Registry::new(&config, budget.clone())),
            budget,
            msg_limiter: RateLimiter::new(config.msg_rate_limit, config.rate_window)
                .with_max_keys(keys),
            typing_limiter: RateLimiter::new(config.typing_rate_limit, config.rate_window)
                .with_max_keys(keys),
            hello_limiter: RateLimiter::new(config.hello_rate_limit, config.rate_window)
                .with_max_keys(keys),
            client_msg: per_minute_buckets(config.client_msg_per_minute, clients),
            client_typing: per_minute_buckets(config.client_typing_per_minute, clients),
            client_hello: per_minute_buckets(config.client_hello_per_minute, clients),
            broadcaster,
            presence,
            config,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// What the protocol holds now, including the bytes charged to its state budget.
    pub fn stats(&self) -> Stats {
        let registry = lock(&self.registry);
        Stats {
            state_bytes: self.budget.used(),
            state_bytes_limit: self.budget.limit(),
            users: registry.user_count(),
            chats: registry.chat_count(),
            queued: registry.queued_total(),
            tracked_messages: registry.tracked_messages(),
        }
    }

    fn rate_limited(
        peer: &Peer,
        message: &str,
        limit: usize,
        per_client: bool,
        mut details: Value,
    ) {
        details["limit"] = json!(limit);
        if per_client {
            details["window_secs"] = json!(60);
            details["per"] = json!("client");
        }
        Self::error(peer, ErrorCode::RateLimited, message, details);
    }

    fn is_online(&self, id: Uuid) -> bool {
        self.presence.is_present(ONLINE_ROOM, &id.to_string())
    }

    /// The full `PRESENCE` list, for a socket's first HELLO: cached until the list changes, so
    /// sockets joining meanwhile share one buffer.
    fn presence_frame(&self, registry: &mut Registry) -> Option<Frame> {
        if let Some(cached) = registry.cached_presence() {
            return Some(cached);
        }
        let users = registry.presence(&|id| self.is_online(id));
        let full = frame(
            "PRESENCE",
            &messages::Presence {
                users,
                delta: false,
            },
        )?;
        registry.cache_presence(full.clone());
        Some(full)
    }

    /// A `PRESENCE` delta with just `users`: what changed, in its current state.
    fn presence_delta(users: Vec<PresenceUser>) -> Option<Frame> {
        frame("PRESENCE", &messages::Presence { users, delta: true })
    }

    /// Sends a delta to every identified socket but `except`. Called with the registry locked,
    /// so deltas reach each socket in the order the changes were made, and after any full list
    /// that socket got before them.
    fn publish_delta(&self, users: Vec<PresenceUser>, except: Option<ConnId>) {
        if users.is_empty() {
            return;
        }
        if let Some(delta) = Self::presence_delta(users) {
            self.broadcaster.publish(PRESENCE_TOPIC, &delta, except);
        }
    }

    fn send(peer: &Peer, frame: Option<Frame>) {
        if let Some(frame) = frame {
            // A full queue closes the peer (the runtime's policy); nothing else to do here.
            let _ = peer.send(frame);
        }
    }

    fn publish(&self, topic: &str, frame: Option<&Frame>) -> usize {
        frame.map_or(0, |frame| self.broadcaster.publish(topic, frame, None))
    }

    fn error(peer: &Peer, code: ErrorCode, message: &str, details: Value) {
        Self::send(peer, messages::error_frame(code, message, details));
    }

    fn hello(&self, conn: &mut Conn, peer: &Peer, user_id: Uuid, display_name: &str) {
        if let Some(current) = conn.user
            && current != user_id
        {
            let message = format!("user_id: this connection already said HELLO as {current}");
            Self::error(
                peer,
                ErrorCode::Validation,
                &message,
                json!({"field": "user_id"}),
            );
            return;
        }
        // HELLO rewrites presence for everyone, so it is rate-limited per client (switching
        // user_id does not dodge that) and per user.
        if !self.client_hello.check(&conn.client) {
            let limit = usize::try_from(self.config.client_hello_per_minute).unwrap_or(usize::MAX);
            Self::rate_limited(
                peer,
                "too many HELLOs from this client",
                limit,
                true,
                json!({}),
            );
            return;
        }
        let id = user_id.to_string();
        let mut registry = lock(&self.registry);
        // Per user only for known users (reconnects and renames): new users are bounded by the
        // client's bucket and share, and must not fill the limiter's key table.
        if registry.knows(user_id) && !self.hello_limiter.check(&id) {
            let details = json!({"window_secs": self.config.rate_window.as_secs_f64()});
            let limit = self.config.hello_rate_limit;
            Self::rate_limited(peer, "too many HELLOs for this user", limit, false, details);
            return;
        }
        let registered =
            match registry.register(user_id, display_name, conn.client, &|u| self.is_online(u)) {
                Ok(registered) => registered,
                Err(RegisterError::ClientShareFull { limit }) => {
                    Self::rate_limited(
                        peer,
                        "this client has created the most users allowed, and all are online",
                        limit,
                        true,
                        json!({}),
                    );
                    return;
                }
                Err(RegisterError::TableFull | RegisterError::NoMemory) => {
                    Self::error(
                        peer,
                        ErrorCode::Unauthorized,
                        "the server has no room for another user",
                        json!({}),
                    );
                    return;
                }
            };
        let first_hello = conn.user.is_none();
        let mut came_online = false;
        if first_hello {
            self.broadcaster.subscribe(&user_topic(user_id), peer);
            self.broadcaster.subscribe(PRESENCE_TOPIC, peer);
            came_online = self.presence.join(ONLINE_ROOM, &id, peer.id());
            conn.user = Some(user_id);
        }
        if came_online {
            registry.invalidate_presence();
        }
        Self::send(
            peer,
            frame(
                "HELLO_ACK",
                &messages::HelloAck {
                    user_id: &id,
                    status: "connected",
                },
            ),
        );
        // This socket gets the full list on its first HELLO and a delta with its own entry on
        // later ones (it already holds the list); everyone else gets a delta of what changed.
        let me = registry.presence_of(user_id, true);
        if first_hello {
            Self::send(peer, self.presence_frame(&mut registry));
        } else {
            Self::send(peer, Self::presence_delta(me.iter().cloned().collect()));
        }
        if registered.new || registered.renamed || came_online {
            let mut changed: Vec<PresenceUser> = registered
                .forgotten
                .into_iter()
                .map(|(id, display_name)| PresenceUser {
                    user_id: id.to_string(),
                    display_name,
                    online: false,
                    removed: true,
                })
                .collect();
            changed.extend(me);
            self.publish_delta(changed, Some(peer.id()));
        }
        if came_online {
            let queued = registry.take_queue(user_id);
            if !queued.is_empty() {
                debug!(user = %id, count = queued.len(), "delivering queued messages");
                let _ = peer.send_batch(queued);
            }
        }
    }

    fn open_chat(&self, me: Uuid, peer: &Peer, target: Uuid) {
        let details = json!({"target_user_id": target.to_string()});
        if target == me {
            let mut details = details;
            details["field"] = json!("target_user_id");
            Self::error(
                peer,
                ErrorCode::Validation,
                "target_user_id: cannot open a chat with yourself",
                details,
            );
            return;
        }
        let mut registry = lock(&self.registry);
        let newly = match registry.open_chat(me, target) {
            Ok(newly) => newly,
            Err(OpenError::UserNotFound) => {
                Self::error(
                    peer,
                    ErrorCode::UserNotFound,
                    "target user not found",
                    details,
                );
                return;
            }
            Err(OpenError::NoMemory) => {
                Self::error(
                    peer,
                    ErrorCode::RateLimited,
                    "the server has no room for another chat",
                    details,
                );
                return;
            }
            Err(OpenError::TooManyChats { opener }) => {
                let message = if opener {
                    "you have too many open chats"
                } else {
                    "the target user has too many open chats"
                };
                let mut details = details;
                details["limit"] = json!(self.config.max_chats_per_user);
                Self::error(peer, ErrorCode::RateLimited, message, details);
                return;
            }
        };
        let chat = chat_id(me, target).to_string();
        let (me_s, target_s) = (me.to_string(), target.to_string());
        let participants = if me <= target {
            [me_s.as_str(), target_s.as_str()]
        } else {
            [target_s.as_str(), me_s.as_str()]
        };
        let opened_for = |other: &str, other_name: &str| {
            frame(
                "CHAT_OPENED",
                &messages::ChatOpened {
                    chat_id: &chat,
                    participants,
                    target_user_id: other,
                    target_display_name: other_name,
                },
            )
        };
        let target_name = registry.display_name(target).unwrap_or_default();
        let my_name = registry.display_name(me).unwrap_or_default();
        self.publish(&user_topic(me), opened_for(&target_s, target_name).as_ref());
        if newly {
            self.publish(&user_topic(target), opened_for(&me_s, my_name).as_ref());
        }
    }

    fn msg(
        &self,
        (me, client): (Uuid, ClientKey),
        peer: &Peer,
        to: Uuid,
        content: &str,
        client_id: Option<String>,
    ) {
        let details = || match &client_id {
            Some(id) => json!({"message_id": id, "to": to.to_string()}),
            None => json!({"to": to.to_string()}),
        };
        let mut registry = lock(&self.registry);
        if let Some(id) = &client_id
            && let Some(record) = registry.message(id)
        {
            if record.from == me {
                // Idempotent retry: answer with the current status, deliver nothing.
                Self::send(
                    peer,
                    frame(
                        "MSG_ACK",
                        &messages::MsgAck {
                            message_id: id,
                            status: record.status.as_str(),
                        },
                    ),
                );
            } else {
                let mut details = details();
                details["field"] = json!("message_id");
                Self::error(
                    peer,
                    ErrorCode::Validation,
                    "message_id: already used by another sender",
                    details,
                );
            }
            return;
        }
        if !registry.knows(to) {
            Self::error(
                peer,
                ErrorCode::UserNotFound,
                "recipient not found",
                details(),
            );
            return;
        }
        if !registry.chat_open(me, to) {
            Self::error(
                peer,
                ErrorCode::ChatNotOpened,
                "open a chat with the recipient first",
                details(),
            );
            return;
        }
        let me_s = me.to_string();
        if !self.msg_limiter.check(&me_s) {
            let mut details = details();
            details["window_secs"] = json!(self.config.rate_window.as_secs_f64());
            let limit = self.config.msg_rate_limit;
            Self::rate_limited(peer, "too many messages", limit, false, details);
            return;
        }
        if !self.client_msg.check(&client) {
            let limit = usize::try_from(self.config.client_msg_per_minute).unwrap_or(usize::MAX);
            let message = "too many messages from this client";
            Self::rate_limited(peer, message, limit, true, details());
            return;
        }
        let message_id = client_id
            .clone()
            .unwrap_or_else(|| Uuid::new_v4().to_string());
        let to_s = to.to_string();
        let timestamp = now_iso8601();
        let Some(incoming) = frame(
            "MSG",
            &messages::Msg {
                from: &me_s,
                to: &to_s,
                content,
                message_id: &message_id,
                timestamp: &timestamp,
            },
        ) else {
            return;
        };
        let failed = |why: &str| {
            let mut details = details();
            details["message_id"] = json!(message_id);
            Self::error(peer, ErrorCode::MessageFailed, why, details);
        };
        // The record comes first: a message is only delivered once the server can remember it
        // (for retries and the delivered tick).
        if registry.record(message_id.clone(), me, to).is_err() {
            failed("the server has no room to track another message");
            return;
        }
        let live =
            self.is_online(to) && self.broadcaster.publish(&user_topic(to), &incoming, None) > 0;
        if !live && let Err(error) = registry.enqueue(to, incoming, client) {
            registry.unrecord(&message_id);
            failed(match error {
                QueueError::UserQueueFull => "the recipient's offline queue is full",
                QueueError::ServerQueueFull => "the server's offline queue is full",
                QueueError::ClientQueueFull => {
                    "this client has the most messages waiting in offline queues allowed"
                }
                QueueError::NoMemory => "the server has no room to queue another message",
            });
            return;
        }
        drop(registry);
        Self::send(
            peer,
            frame(
                "MSG_ACK",
                &messages::MsgAck {
                    message_id: &message_id,
                    status: "sent",
                },
            ),
        );
    }

    fn msg_ack(&self, me: Uuid, message_id: &str) {
        let mut registry = lock(&self.registry);
        if let Some(sender) = registry.mark_delivered(message_id, me) {
            let ack = frame(
                "MSG_ACK",
                &messages::MsgAck {
                    message_id,
                    status: "delivered",
                },
            );
            self.publish(&user_topic(sender), ack.as_ref());
        }
    }

    fn typing(&self, (me, client): (Uuid, ClientKey), peer: &Peer, is_typing: bool) {
        let me_s = me.to_string();
        if !self.typing_limiter.check(&me_s) {
            let details = json!({"window_secs": self.config.rate_window.as_secs_f64()});
            let limit = self.config.typing_rate_limit;
            Self::rate_limited(peer, "too many typing indicators", limit, false, details);
            return;
        }
        if !self.client_typing.check(&client) {
            let limit = usize::try_from(self.config.client_typing_per_minute).unwrap_or(usize::MAX);
            let message = "too many typing indicators from this client";
            Self::rate_limited(peer, message, limit, true, json!({}));
            return;
        }
        let registry = lock(&self.registry);
        let typing = frame(
            "TYPING",
            &messages::Typing {
                user_id: &me_s,
                is_typing,
            },
        );
        for partner in registry.partners(me) {
            self.publish(&user_topic(partner), typing.as_ref());
        }
    }
}

impl Protocol for FastChat {
    type Conn = Conn;

    fn name(&self) -> &'static str {
        "fastchat"
    }

    fn admit(&self, handshake: &Handshake<'_>) -> Result<Conn, Reject> {
        if handshake.path == WS_PATH {
            Ok(Conn {
                client: ClientKey::from_ip(handshake.client_ip),
                user: None,
            })
        } else {
            Err(Reject::NotFound)
        }
    }

    async fn on_open(&self, _conn: &mut Conn, cx: &Context<'_>) {
        let peer = cx.peer();
        debug!(conn = %peer.id(), remote = %peer.remote(), "fastchat socket open");
    }

    async fn on_text(&self, conn: &mut Conn, cx: &Context<'_>, text: &str) {
        let peer = cx.peer();
        let (kind, data) = match messages::parse_envelope(text) {
            Ok(parsed) => parsed,
            Err(invalid) => {
                let details = invalid
                    .field
                    .map_or_else(|| json!({}), |f| json!({"field": f}));
                Self::error(peer, ErrorCode::Validation, &invalid.message, details);
                return;
            }
        };
        if conn.user.is_none() && !kind.allowed_before_hello() {
            Self::error(peer, ErrorCode::Unauthorized, "send HELLO first", json!({}));
            return;
        }
        let message = match messages::parse_body(kind, &data) {
            Ok(message) => message,
            Err(invalid) => {
                let mut details = invalid
                    .field
                    .map_or_else(|| json!({}), |f| json!({"field": f}));
                if kind == Kind::Msg
                    && let Some(Value::String(id)) = data.get("message_id")
                {
                    details["message_id"] = json!(id);
                }
                Self::error(peer, ErrorCode::Validation, &invalid.message, details);
                return;
            }
        };
        match (message, conn.user) {
            (ClientMessage::Ping, _) => {
                let timestamp = now_iso8601();
                Self::send(
                    peer,
                    frame(
                        "PONG",
                        &messages::Pong {
                            timestamp: &timestamp,
                        },
                    ),
                );
            }
            (
                ClientMessage::Hello {
                    user_id,
                    display_name,
                },
                _,
            ) => self.hello(conn, peer, user_id, &display_name),
            (_, None) => Self::error(peer, ErrorCode::Unauthorized, "send HELLO first", json!({})),
            (ClientMessage::OpenChat { target }, Some(me)) => self.open_chat(me, peer, target),
            (
                ClientMessage::Msg {
                    to,
                    content,
                    message_id,
                },
                Some(me),
            ) => self.msg((me, conn.client), peer, to, &content, message_id),
            (ClientMessage::MsgAck { message_id }, Some(me)) => self.msg_ack(me, &message_id),
            (ClientMessage::Typing { is_typing }, Some(me)) => {
                self.typing((me, conn.client), peer, is_typing);
            }
        }
    }

    async fn on_close(&self, conn: Conn, cx: &Context<'_>) {
        let peer = cx.peer();
        let Some(user_id) = conn.user else {
            return;
        };
        let id = user_id.to_string();
        let mut registry = lock(&self.registry);
        self.broadcaster
            .unsubscribe(&user_topic(user_id), peer.id());
        self.broadcaster.unsubscribe(PRESENCE_TOPIC, peer.id());
        if self.presence.leave(ONLINE_ROOM, &id, peer.id()) {
            registry.touch(user_id);
            registry.invalidate_presence();
            let gone = registry.presence_of(user_id, false);
            self.publish_delta(gone.into_iter().collect(), Some(peer.id()));
            debug!(user = %id, "user went offline");
        }
    }

    fn keepalive(&self) -> Option<Keepalive> {
        Some(Keepalive {
            ping_interval: None,
            idle_timeout: self.config.idle_timeout(),
        })
    }

    fn default_max_frame_bytes(&self) -> usize {
        self.config.max_frame_bytes
    }

    async fn http(&self, _engine: &Engine, request: HttpRequest) -> Option<HttpResponse> {
        web::serve(&request)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Instant;

    use super::*;

    fn client(n: u32) -> ClientKey {
        ClientKey::from_ip(IpAddr::V4(Ipv4Addr::from(
            0x7f00_0000_u32.saturating_add(n),
        )))
    }

    #[test]
    fn a_minutes_worth_at_once_then_the_rate() {
        let buckets = per_minute_buckets(6, 10);
        let t0 = Instant::now();
        assert!((0..6).all(|_| buckets.check_at(&client(1), t0)));
        assert!(!buckets.check_at(&client(1), t0));
        assert!(buckets.check_at(&client(2), t0), "clients are independent");
        // 6 a minute: one token every 10 s.
        assert!(!buckets.check_at(&client(1), t0 + Duration::from_secs(9)));
        assert!(buckets.check_at(&client(1), t0 + Duration::from_secs(19)));
        assert!(!buckets.check_at(&client(1), t0 + Duration::from_secs(19)));
        assert!(
            per_minute_buckets(0, 1).check_at(&client(1), t0),
            "0 is unlimited"
        );
    }

    #[test]
    fn the_client_table_is_bounded_and_forgets_refilled_clients() {
        let buckets = per_minute_buckets(60, 1);
        let t0 = Instant::now();
        assert!(buckets.check_at(&client(1), t0));
        assert!(
            !buckets.check_at(&client(2), t0),
            "table full of an active client"
        );
        assert!(buckets.check_at(&client(2), t0 + Duration::from_secs(61)));
        assert_eq!(buckets.keys(), 1);
    }

    /// The per-client tables, full, hold no more than the bytes charged for them up front.
    #[test]
    fn full_client_tables_stay_within_what_is_charged_for_them() {
        let config = Config {
            max_clients: 300,
            msg_rate_limit: 0,
            typing_rate_limit: 0,
            hello_rate_limit: 0,
            ..Config::default()
        };
        let chat = FastChat::new(config.clone());
        let t0 = Instant::now();
        for n in 0..1000 {
            chat.client_msg.check_at(&client(n), t0);
            chat.client_typing.check_at(&client(n), t0);
            chat.client_hello.check_at(&client(n), t0);
        }
        let tables = [&chat.client_msg, &chat.client_typing, &chat.client_hello];
        assert!(tables.iter().all(|table| table.keys() == 300));
        let held: usize = tables.iter().map(|table| table.bytes()).sum();
        assert!(held > 0);
        assert!(
            held <= config.fixed_state_bytes(),
            "{held} > {}",
            config.fixed_state_bytes()
        );
    }

    /// The per-key figure in `docs/protocols/fastchat.md` (64-bit): three 41-byte slots.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn a_client_key_costs_the_documented_bytes() {
        assert_eq!(TokenBuckets::<ClientKey>::slot_bytes(), 41);
        assert_eq!(per_minute_buckets(1, 10_000).max_bytes(), 10_000 * 123);
    }
}
