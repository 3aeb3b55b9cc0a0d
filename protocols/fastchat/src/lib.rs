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
//! When the server verifies signed tokens, HELLO's `user_id` must be the token's `sub` (a UUID
//! v4; another `sub` is refused at the upgrade with 403, another `user_id` gets `UNAUTHORIZED`).
//!
//! Everything stored is bounded in items, shared per client ([`ClientKey`]: an IP, never a
//! `user_id`) where one client could exhaust it, and charged in bytes against
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
//! Shared state lives in the node's state engine (`Context::engine`), so several nodes sharing
//! one engine serve one chat: user records, chats and message records are keyed state, each
//! user's inbox is a log published to that user's sockets, presence is the engine's, and rate
//! limits per user are the engine's sliding windows ([`store`] names every key). The protocol
//! value keeps only node-local things: its config, the per-client token buckets and a cache of
//! the encoded presence list. Liveness is the protocol's own: there are no WebSocket pings; a socket from
//! which no frame arrived for `ping_interval + pong_timeout` is dropped.

mod chat;
pub mod messages;
pub mod sanitize;
pub mod state;
pub mod store;
pub mod telemetry;
mod web;

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use switchboard_core::engine::Position;
use switchboard_core::sync::lock;
use switchboard_core::{ClientKey, Frame, Rate, TokenBuckets};
use uuid::Uuid;

use crate::store::Seen;

/// The only path served.
pub const WS_PATH: &str = "/ws";

/// fastchat's limits and timings. Every collection the protocol keeps is bounded here.
///
/// With the `cli` feature this is also the `clap::Args` of `switchboard serve --protocol
/// fastchat`: each field's doc is its flag's help and [`Config::default`] its default. fastchat
/// brings its own keepalive: the runtime's `--ping-interval` and `--idle-timeout` do not apply.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[cfg_attr(feature = "cli", group(id = "fastchat"))]
#[cfg_attr(feature = "cli", command(next_help_heading = "fastchat"))]
pub struct Config {
    /// How often clients are expected to PING, e.g. 15s.
    #[cfg_attr(feature = "cli", arg(
        id = "fastchat-ping-interval", long,
        env = "SWITCHBOARD_FASTCHAT_PING_INTERVAL", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value = switchboard_core::duration::format(Config::default().ping_interval),
    ))]
    pub ping_interval: Duration,
    /// Grace after a missed ping, e.g. 5s: a socket silent for ping interval + pong timeout is
    /// closed with 1001 "idle timeout".
    #[cfg_attr(feature = "cli", arg(
        id = "fastchat-pong-timeout", long,
        env = "SWITCHBOARD_FASTCHAT_PONG_TIMEOUT", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value = switchboard_core::duration::format(Config::default().pong_timeout),
    ))]
    pub pong_timeout: Duration,
    /// MSG frames per user per rate window (0: unlimited).
    #[cfg_attr(feature = "cli", arg(
        id = "fastchat-msg-rate-limit", long,
        env = "SWITCHBOARD_FASTCHAT_MSG_RATE_LIMIT", value_name = "N",
        default_value_t = Config::default().msg_rate_limit,
    ))]
    pub msg_rate_limit: usize,
    /// TYPING frames per user per rate window (0: unlimited).
    #[cfg_attr(feature = "cli", arg(
        id = "fastchat-typing-rate-limit", long,
        env = "SWITCHBOARD_FASTCHAT_TYPING_RATE_LIMIT", value_name = "N",
        default_value_t = Config::default().typing_rate_limit,
    ))]
    pub typing_rate_limit: usize,
    /// The sliding rate-limit window, e.g. 60s.
    #[cfg_attr(feature = "cli", arg(
        id = "fastchat-rate-window", long,
        env = "SWITCHBOARD_FASTCHAT_RATE_WINDOW", value_name = "DURATION",
        value_parser = switchboard_core::duration::parse,
        default_value = switchboard_core::duration::format(Config::default().rate_window),
    ))]
    pub rate_window: Duration,
    /// Users remembered (online or not); when full the user offline the longest is forgotten
    /// with their chats and queue, and if everyone is online, HELLO from a new user gets
    /// UNAUTHORIZED.
    #[cfg_attr(feature = "cli", arg(
        id = "fastchat-max-users", long,
        env = "SWITCHBOARD_FASTCHAT_MAX_USERS", value_name = "N",
        default_value_t = Config::default().max_users,
    ))]
    pub max_users: usize,
    /// Open chats per user; further OPEN_CHATs get RATE_LIMITED.
    #[cfg_attr(feature = "cli", arg(
        id = "fastchat-max-chats-per-user", long,
        env = "SWITCHBOARD_FASTCHAT_MAX_CHATS_PER_USER", value_name = "N",
        default_value_t = Config::default().max_chats_per_user,
    ))]
    pub max_chats_per_user: usize,
    /// Messages queued for one offline user; beyond it the sender gets MESSAGE_FAILED.
    #[cfg_attr(feature = "cli", arg(
        id = "fastchat-max-queued-per-user", long,
        env = "SWITCHBOARD_FASTCHAT_MAX_QUEUED_PER_USER", value_name = "N",
        default_value_t = Config::default().max_queued_per_user,
    ))]
    pub max_queued_per_user: usize,
    /// Messages queued for all offline users together; beyond it senders get MESSAGE_FAILED.
    #[cfg_attr(feature = "cli", arg(
        id = "fastchat-max-queued-total", long,
        env = "SWITCHBOARD_FASTCHAT_MAX_QUEUED_TOTAL", value_name = "N",
        default_value_t = Config::default().max_queued_total,
    ))]
    pub max_queued_total: usize,
    /// Accepted messages remembered for idempotent retries and delivery acks, oldest forgotten
    /// first.
    #[cfg_attr(feature = "cli", arg(
        id = "fastchat-max-tracked-messages", long,
        env = "SWITCHBOARD_FASTCHAT_MAX_TRACKED_MESSAGES", value_name = "N",
        default_value_t = Config::default().max_tracked_messages,
    ))]
    pub max_tracked_messages: usize,
    /// Largest inbound frame when the server config does not say otherwise; larger frames close
    /// the socket with 1009. Default 64 KiB, the runtime default every protocol but collab uses.
    #[cfg_attr(feature = "cli", arg(skip = Config::default().max_frame_bytes))]
    pub max_frame_bytes: usize,
    /// Valid HELLOs per known user per rate window (0: unlimited); more get RATE_LIMITED.
    #[cfg_attr(feature = "cli", arg(
        id = "fastchat-hello-rate-limit", long,
        env = "SWITCHBOARD_FASTCHAT_HELLO_RATE_LIMIT", value_name = "N",
        default_value_t = Config::default().hello_rate_limit,
    ))]
    pub hello_rate_limit: usize,
    /// Users one client (IPv4 address or IPv6 /64, see `ClientKey`) may create (0: unlimited);
    /// at the limit that client's own longest-offline user is forgotten, or the HELLO of a new
    /// user gets RATE_LIMITED if all of them are online.
    #[cfg_attr(feature = "cli", arg(
        id = "fastchat-max-users-per-client", long,
        env = "SWITCHBOARD_FASTCHAT_MAX_USERS_PER_CLIENT", value_name = "N",
        default_value_t = Config::default().max_users_per_client,
    ))]
    pub max_users_per_client: usize,
    /// Messages one sending client may have waiting in offline queues (0: unlimited); more get
    /// MESSAGE_FAILED.
    #[cfg_attr(feature = "cli", arg(
        id = "fastchat-max-queued-per-client", long,
        env = "SWITCHBOARD_FASTCHAT_MAX_QUEUED_PER_CLIENT", value_name = "N",
        default_value_t = Config::default().max_queued_per_client,
    ))]
    pub max_queued_per_client: usize,
    /// MSG frames per client per minute, whatever user_id it uses (0: unlimited): a token bucket
    /// of this many, refilled at this many a minute.
    #[cfg_attr(feature = "cli", arg(
        id = "fastchat-client-msg-per-minute", long,
        env = "SWITCHBOARD_FASTCHAT_CLIENT_MSG_PER_MINUTE", value_name = "N",
        default_value_t = Config::default().client_msg_per_minute,
    ))]
    pub client_msg_per_minute: u32,
    /// TYPING frames per client per minute, whatever user_id it uses (0: unlimited).
    #[cfg_attr(feature = "cli", arg(
        id = "fastchat-client-typing-per-minute", long,
        env = "SWITCHBOARD_FASTCHAT_CLIENT_TYPING_PER_MINUTE", value_name = "N",
        default_value_t = Config::default().client_typing_per_minute,
    ))]
    pub client_typing_per_minute: u32,
    /// Valid HELLOs per client per minute, whatever user_id it uses (0: unlimited).
    #[cfg_attr(feature = "cli", arg(
        id = "fastchat-client-hello-per-minute", long,
        env = "SWITCHBOARD_FASTCHAT_CLIENT_HELLO_PER_MINUTE", value_name = "N",
        default_value_t = Config::default().client_hello_per_minute,
    ))]
    pub client_hello_per_minute: u32,
    /// Clients tracked by the per-client rate limits; when full, clients whose buckets have
    /// refilled are forgotten, and if none has, new clients are refused (RATE_LIMITED).
    #[cfg_attr(feature = "cli", arg(
        id = "fastchat-max-clients", long,
        env = "SWITCHBOARD_FASTCHAT_MAX_CLIENTS", value_name = "N",
        default_value_t = Config::default().max_clients,
    ))]
    pub max_clients: usize,
    /// Bytes of protocol state (users, chats, queues, message records, rate-limit tables), see
    /// [`Config::worst_case_state_bytes`]. New work that does not fit is refused with the
    /// protocol's error; nothing stored is evicted for it. The binary sets it from the runtime's
    /// `--max-state-bytes`.
    #[cfg_attr(feature = "cli", arg(skip = Config::default().max_state_bytes))]
    pub max_state_bytes: usize,
}

impl Default for Config {
    /// The defaults, written only here: the `cli` flags take theirs from this.
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

/// The fastchat protocol: one value serves every connection of a node; what the connections
/// share lives in the node's state engine.
pub struct FastChat {
    config: Config,
    /// Node-local: the account's counters as this node last saw them.
    seen: Seen,
    /// Node-local: the cached presence list.
    local: Mutex<Local>,
    /// Per-client rate limits, keyed on the client so switching `user_id` does not dodge them.
    /// Node-local: they protect this node from its own clients.
    client_msg: TokenBuckets<ClientKey>,
    client_typing: TokenBuckets<ClientKey>,
    client_hello: TokenBuckets<ClientKey>,
}

/// What one node keeps besides the engine.
#[derive(Debug, Default)]
struct Local {
    /// The encoded full `PRESENCE` list and the position of the delta log it is current at,
    /// shared by every socket that says its first HELLO while no delta was appended.
    presence: Option<(Position, Frame)>,
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
    /// With signed identity, the token's `sub`: the only `user_id` this socket's HELLO may
    /// name. `None` when the server does not verify tokens (HELLO is the identity then).
    signed: Option<Uuid>,
}

impl FastChat {
    /// fastchat on the state engine the runtime hands to every hook.
    pub fn new(config: Config) -> Self {
        let clients = config.max_clients;
        Self {
            seen: Seen::default(),
            local: Mutex::new(Local::default()),
            client_msg: per_minute_buckets(config.client_msg_per_minute, clients),
            client_typing: per_minute_buckets(config.client_typing_per_minute, clients),
            client_hello: per_minute_buckets(config.client_hello_per_minute, clients),
            config,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// What the protocol holds, as this node last saw the cluster-wide accounting (exact on a
    /// single node once a request is answered), plus this node's cached presence list.
    pub fn stats(&self) -> Stats {
        let local = lock(&self.local);
        let usage = self.seen.usage();
        let cache = local.presence.as_ref().map_or(0, |(_, frame)| frame.len());
        Stats {
            state_bytes: self
                .config
                .fixed_state_bytes()
                .saturating_add(usage.bytes)
                .saturating_add(cache),
            state_bytes_limit: self.config.max_state_bytes,
            users: usage.users,
            chats: usage.chats,
            queued: usage.queued,
            tracked_messages: usage.records,
        }
    }

    /// Called after the account grew: the cached presence list is only a cache, it gives its
    /// room up when the budget needs it.
    fn fit_cache(&self) {
        let mut local = lock(&self.local);
        let used = self
            .config
            .fixed_state_bytes()
            .saturating_add(self.seen.usage().bytes);
        let cache = local.presence.as_ref().map_or(0, |(_, frame)| frame.len());
        if used.saturating_add(cache) > self.config.max_state_bytes {
            local.presence = None;
        }
    }

    /// The cached full list, if it is current at `top`.
    fn cached_presence(&self, top: Position) -> Option<Frame> {
        let local = lock(&self.local);
        match &local.presence {
            Some((at, frame)) if *at == top => Some(frame.clone()),
            _ => None,
        }
    }

    /// Caches the full list current at `top`, if the budget has room for it.
    fn cache_presence(&self, top: Position, frame: Frame) {
        let mut local = lock(&self.local);
        let used = self
            .config
            .fixed_state_bytes()
            .saturating_add(self.seen.usage().bytes);
        local.presence = (used.saturating_add(frame.len()) <= self.config.max_state_bytes)
            .then_some((top, frame));
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
