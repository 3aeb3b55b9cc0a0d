//! ip-chat: one broadcast room where users are identified by their IP address.
//!
//! Clients connect to `/ws`, receive the stored history (oldest first, each message with its
//! current reactions), then every new `message` and `reaction_updated` as it happens.
//! `send_message` posts to everyone (the sender included); `add_reaction` toggles the caller's
//! emoji on a stored message. The author id is a UUIDv5 of the client IP under a namespace
//! derived from the state engine's cluster id: stable for one address on every node of a
//! cluster (and across restarts with a durable engine), different across addresses, and never
//! the address itself. When the server verifies signed tokens the author id is derived the same
//! way from `"sub:" + sub` instead, and the rate limits count per author rather than per address.
//!
//! [`IpChat`] implements [`switchboard_core::Protocol`]; serve it with `switchboard-server` or
//! nest its router in your own axum application. Everything shared lives in the node's state
//! engine ([`switchboard_core::Engine`]): the history is one log whose entries are the
//! broadcast frames, reactions are keyed records, and the per-client rate limits are the
//! engine's sliding windows, so several nodes sharing an engine form one room.
//! `docs/protocols/ip-chat.md` ("State and the engine") names every structure and argues the
//! ordering.
//!
//! Every pool is bounded; `docs/protocols/ip-chat.md` ("Limits and worst-case memory") lists each
//! limit, its default and its policy, and [`IpChat::worst_case_bytes`] is the formula given there.

pub mod messages;
pub mod telemetry;
mod view;
mod web;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use switchboard_core::engine::{
    Append, Appended, EngineError, Entry, Expect, NodeId, Position, Put, Read, ReadFrom, Retention,
    Versioned,
};
use switchboard_core::sync::lock;
use switchboard_core::{
    ClientKey, CloseReason, Context, Engine, Frame, Handshake, HttpRequest, HttpResponse, Identity,
    Protocol, Rate, Reject, TokenBuckets,
};
use tracing::warn;
use uuid::Uuid;

use crate::messages::{
    ChatMessage, ClientMessage, ReactionAction, ReactionLimits, ReactionRecord, ReactionRefused,
    error_frame, message_frame, parse_message_frame, reaction_frame,
};
use crate::view::{Continue, RoomView, ViewEntry};

/// The history log: every stored `message` frame, oldest first. Appends publish the entry on
/// this topic too, so every client on every node receives messages in the log's one order.
pub const HISTORY_TOPIC: &str = "ip-chat:room";
/// The log that puts `reaction_updated` broadcasts in one order (only its newest entry is
/// kept); every client subscribes to it as well.
pub const REACTIONS_TOPIC: &str = "ip-chat:reaction-updates";
/// Prefix of the reaction records, `ip-chat:reactions:<history offset, 20 digits>`: zero-padded
/// so that key order is history order.
pub const REACTION_KEY_PREFIX: &str = "ip-chat:reactions:";
/// Prefix of the engine's rate-limit windows for `send_message`, per [`RateKey`].
const SEND_RATE_PREFIX: &str = "ip-chat:rate:send:";
/// Prefix of the engine's rate-limit windows for `add_reaction`, per [`RateKey`].
const REACT_RATE_PREFIX: &str = "ip-chat:rate:react:";
/// What an author id is derived from with signed identity, before the token's `sub`: no IP
/// address is written this way, so a subject never maps to an address's author id.
const SUBJECT_PREFIX: &str = "sub:";
/// The window of both per-client rate limits.
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// What the reactions log keeps: its newest entry (it orders broadcasts; nothing reads it back).
const REACTIONS_RETENTION: Retention = Retention::trim(1, usize::MAX);
/// Compare-and-set attempts of one toggle step before it gives up; every failed attempt means
/// another toggle made progress, so this is only reached under an extreme reaction storm.
const MAX_ATTEMPTS: usize = 64;
/// Records read per scan of the reaction records.
const SCAN_PAGE: usize = 256;
/// The most a reaction record holds besides its reactions' JSON: the key (38 bytes) and the
/// envelope `{"id":"<36>","epoch":<at most 20 digits>,"reactions":…}` (87 bytes), rounded up.
pub const RECORD_OVERHEAD: usize = 128;
/// The most a `reaction_updated` frame holds besides the message it carries and the emoji's
/// JSON: envelope, message id, user id and action (about 130 bytes), rounded up.
const UPDATE_OVERHEAD: usize = 160;

/// Error texts, exactly as clients see them.
pub mod errors {
    /// Bad JSON, unknown type, missing or mistyped fields.
    pub const INVALID_FORMAT: &str = "Invalid message format";
    /// Empty or whitespace-only text.
    pub const EMPTY: &str = "message text cannot be empty";
    /// A reaction to a message id that is not stored.
    pub const NOT_FOUND: &str = "message not found";
    /// The encoded message would exceed `Config::max_message_bytes`.
    pub const TOO_LARGE: &str = "message too large";
    /// A reaction would make the encoded message exceed `Config::max_message_bytes`.
    pub const TOO_MANY_REACTIONS: &str = "too many reactions on this message";
    /// The server-wide state budget (`Config::max_state_bytes`) is spent.
    pub const STATE_FULL: &str = "server storage is full, try again later";
    /// The state engine cannot be reached or read now (or a reaction lost every
    /// compare-and-set race); the request did nothing and may be retried.
    pub const UNAVAILABLE: &str = "server storage is unavailable, try again later";
}

/// ip-chat limits; see `docs/protocols/ip-chat.md`.
///
/// With the `cli` feature this is also the `clap::Args` of `switchboard serve --protocol
/// ip-chat`: each field's doc is its flag's help and [`Config::default`] its default. The flags
/// were once unprefixed (`--history-limit`); those names stay as hidden aliases, and the
/// environment twins keep their names (`SWITCHBOARD_HISTORY_LIMIT`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[cfg_attr(feature = "cli", group(id = "ip-chat"))]
#[cfg_attr(feature = "cli", command(next_help_heading = "ip-chat"))]
pub struct Config {
    /// Messages kept and replayed to new clients; the oldest is dropped first.
    #[cfg_attr(feature = "cli", arg(
        id = "ip-chat-history-limit", long, alias = "history-limit",
        env = "SWITCHBOARD_HISTORY_LIMIT", value_name = "N",
        default_value_t = Config::default().history_limit,
    ))]
    pub history_limit: usize,
    /// Bytes the history may hold (as accounted, see `IpChat::message_charge_bound`); the oldest
    /// messages are dropped to make room for a new one, while a reaction that would exceed it is
    /// refused (nothing is dropped for a reaction).
    #[cfg_attr(feature = "cli", arg(
        id = "ip-chat-history-bytes", long, alias = "history-bytes",
        env = "SWITCHBOARD_HISTORY_BYTES", value_name = "BYTES",
        default_value_t = Config::default().max_history_bytes,
    ))]
    pub max_history_bytes: usize,
    /// `send_message` per client per minute (0: unlimited).
    #[cfg_attr(feature = "cli", arg(
        id = "ip-chat-rate-limit", long, alias = "rate-limit",
        env = "SWITCHBOARD_RATE_LIMIT", value_name = "N",
        default_value_t = Config::default().rate_limit,
    ))]
    pub rate_limit: usize,
    /// `add_reaction` per client per minute (0: unlimited).
    #[cfg_attr(feature = "cli", arg(
        id = "ip-chat-reaction-rate-limit", long, alias = "reaction-rate-limit",
        env = "SWITCHBOARD_REACTION_RATE_LIMIT", value_name = "N",
        default_value_t = Config::default().reaction_rate_limit,
    ))]
    pub reaction_rate_limit: usize,
    /// Clients each rate limiter tracks at most; past it, clients whose budget has refilled are
    /// forgotten, and if none has, new clients are refused with the rate-limit error.
    #[cfg_attr(feature = "cli", arg(
        id = "ip-chat-rate-limit-keys", long, alias = "rate-limit-keys",
        env = "SWITCHBOARD_RATE_LIMIT_KEYS", value_name = "N",
        default_value_t = Config::default().max_rate_limit_keys,
    ))]
    pub max_rate_limit_keys: usize,
    /// Longest message text, in Unicode characters.
    #[cfg_attr(feature = "cli", arg(skip = Config::default().max_text_chars))]
    pub max_text_chars: usize,
    /// Longest author name kept, in characters; longer names are cut.
    #[cfg_attr(feature = "cli", arg(skip = Config::default().max_author_name_chars))]
    pub max_author_name_chars: usize,
    /// Longest emoji string, in characters.
    #[cfg_attr(feature = "cli", arg(skip = Config::default().max_emoji_chars))]
    pub max_emoji_chars: usize,
    /// Distinct emoji one message may carry.
    #[cfg_attr(feature = "cli", arg(
        id = "ip-chat-max-distinct-reactions", long, alias = "max-distinct-reactions",
        env = "SWITCHBOARD_MAX_DISTINCT_REACTIONS", value_name = "N",
        default_value_t = Config::default().max_distinct_reactions,
    ))]
    pub max_distinct_reactions: usize,
    /// Users one emoji may carry on one message.
    #[cfg_attr(feature = "cli", arg(
        id = "ip-chat-max-reactions-per-emoji", long, alias = "max-reactions-per-emoji",
        env = "SWITCHBOARD_MAX_REACTIONS_PER_EMOJI", value_name = "N",
        default_value_t = Config::default().max_reactions_per_emoji,
    ))]
    pub max_reactions_per_emoji: usize,
    /// Largest encoded `message` frame, reactions included; this also bounds every
    /// `reaction_updated` broadcast (which carries the whole message, as the spec asks).
    #[cfg_attr(feature = "cli", arg(
        id = "ip-chat-max-message-bytes", long, alias = "max-message-bytes",
        env = "SWITCHBOARD_MAX_MESSAGE_BYTES", value_name = "BYTES",
        default_value_t = Config::default().max_message_bytes,
    ))]
    pub max_message_bytes: usize,
    /// Server-wide byte budget for stored state (the history); when spent, new messages and
    /// growing reactions are refused with an error, nothing stored is evicted for it. The binary
    /// sets it from the runtime's `--max-state-bytes`.
    #[cfg_attr(feature = "cli", arg(skip = Config::default().max_state_bytes))]
    pub max_state_bytes: usize,
}

impl Default for Config {
    /// The defaults, written only here: the `cli` flags take theirs from this.
    fn default() -> Self {
        Self {
            history_limit: 1000,
            // A new client gets the whole history as one batch: it must fit well inside the
            // runtime's per-socket outbound byte bound (4 MiB by default), with room for the
            // broadcasts that arrive while the batch is written.
            max_history_bytes: 2 * 1024 * 1024,
            rate_limit: 60,
            reaction_rate_limit: 60,
            max_rate_limit_keys: 100_000,
            max_text_chars: 500,
            max_author_name_chars: 100,
            max_emoji_chars: 32,
            max_distinct_reactions: 16,
            max_reactions_per_emoji: 100,
            max_message_bytes: 8 * 1024,
            max_state_bytes: 256 * 1024 * 1024,
        }
    }
}

/// The text of a refused request, sent back to the requesting client as an `error` frame.
type Refusal = Cow<'static, str>;

/// The error frame for an engine failure: a full engine answers as a full state budget did,
/// anything else says the storage is unavailable. The request did nothing either way.
fn engine_refusal(error: &EngineError) -> Refusal {
    match error {
        EngineError::Full(_) => Cow::Borrowed(errors::STATE_FULL),
        _ => {
            warn!(%error, "ip-chat: state engine request failed");
            Cow::Borrowed(errors::UNAVAILABLE)
        }
    }
}

fn refuse(error: EngineError) -> Refusal {
    engine_refusal(&error)
}

/// The key of the reaction record of the history entry at `offset`.
fn record_key(offset: u64) -> String {
    format!("{REACTION_KEY_PREFIX}{offset:020}")
}

/// The history offset a reaction record's key names.
fn record_offset(key: &str) -> Option<u64> {
    key.strip_prefix(REACTION_KEY_PREFIX)?.parse().ok()
}

/// The reactions of a stored record, if it belongs to message `id` of history epoch `epoch`
/// (a record left over from another message or epoch counts as no reactions).
fn record_reactions(stored: &Versioned, id: Uuid, epoch: u64) -> Option<messages::Reactions> {
    ReactionRecord::decode(&stored.value)
        .filter(|record| record.id == id && record.epoch == epoch)
        .map(|record| record.reactions)
}

/// What [`IpChat::stats`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Messages in the history.
    pub messages: usize,
    /// Bytes the history holds in the engine: each message's frame plus its reaction record
    /// (key and value).
    pub history_bytes: usize,
    /// Bytes ip-chat holds in the engine's history and records: the history plus records of
    /// messages that already left it and are not pruned yet. Checked against
    /// `Config::max_state_bytes`.
    pub state_bytes: usize,
    /// Reaction records stored.
    pub reaction_records: usize,
    /// The largest `message` frame a replay would send now, reactions included.
    pub largest_message_bytes: usize,
    /// Entries in this node's view of the history.
    pub view_entries: usize,
    /// Slots of the view's deque, used or spare (each [`IpChat::view_slot_bytes`]).
    pub view_slots: usize,
    /// Clients tracked by the two node-local rate-limiter tables together.
    pub rate_limit_keys: usize,
    /// Bytes held by the two node-local rate-limiter tables.
    pub rate_limit_bytes: usize,
}

/// The ip-chat protocol.
pub struct IpChat {
    config: Config,
    /// `send_message` per client (per author with signed identity) on this node: `rate_limit`
    /// per minute, all of it at once if the client likes (GCRA). The node-local first gate, in
    /// front of the engine's cluster-wide window; its table bounds how many clients this node
    /// tracks.
    messages: RateTable,
    /// `add_reaction` per client (or author) on this node: `reaction_rate_limit` per minute,
    /// the same way.
    reactions: RateTable,
    /// Where each message sits in the history log, and what it weighs (a rebuildable cache).
    view: Mutex<RoomView>,
    /// The author-id namespace of the engine of this node (derived from its cluster id).
    namespace: Mutex<Option<(NodeId, Uuid)>>,
}

impl std::fmt::Debug for IpChat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpChat")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Who a rate limit counts: the client (its address key), or with signed identity the author
/// (the author id derived from the token's `sub`), so that users behind one address each get
/// their own limit and one user gets one limit from every address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum RateKey {
    Client(ClientKey),
    Author(Uuid),
}

impl From<ClientKey> for RateKey {
    fn from(key: ClientKey) -> Self {
        Self::Client(key)
    }
}

impl fmt::Display for RateKey {
    /// The engine window's name after the prefix: the client key as before signed identity
    /// existed (an address), or `author:<author id>`, which no address looks like.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Client(key) => key.fmt(f),
            Self::Author(author) => write!(f, "author:{author}"),
        }
    }
}

/// A node-local rate table: token buckets per [`RateKey`], also counting a bare [`ClientKey`]
/// (the key of every connection without signed identity).
struct RateTable(TokenBuckets<RateKey>);

impl RateTable {
    fn new(limit: usize, max_keys: usize) -> Self {
        Self(per_minute(limit, max_keys))
    }

    /// Counts one event of `key` at `now`; `false` if its bucket is empty (or the table is
    /// full of clients that have not refilled).
    fn check_at<K: Into<RateKey> + Copy>(&self, key: &K, now: Instant) -> bool {
        self.0.check_at(&(*key).into(), now)
    }

    fn keys(&self) -> usize {
        self.0.keys()
    }

    fn bytes(&self) -> usize {
        self.0.bytes()
    }

    fn max_bytes(&self) -> usize {
        self.0.max_bytes()
    }
}

/// A per-client limit of `limit` events per minute (0: unlimited), the whole limit allowed at
/// once, then one event per `60 s / limit`; at most `max_keys` clients tracked.
fn per_minute<K: Eq + Hash + Clone>(limit: usize, max_keys: usize) -> TokenBuckets<K> {
    // Limits past u32::MAX events a minute are unlimited in all but name.
    let limit = u32::try_from(limit).unwrap_or(u32::MAX);
    TokenBuckets::with_rate(Rate::per_window(limit, RATE_WINDOW), max_keys)
}

/// Per-connection state: who this socket is.
#[derive(Debug)]
pub struct Connection {
    ip: IpAddr,
    key: ClientKey,
    /// With signed identity, the verified token: the author is its `sub`, not the address.
    signed: Option<Identity>,
    /// The author id, derived once the engine's namespace is known (at open).
    user: Option<Uuid>,
}

impl IpChat {
    /// ip-chat over the state engine of whichever server runs it.
    pub fn new(config: Config) -> Self {
        Self {
            messages: RateTable::new(config.rate_limit, config.max_rate_limit_keys),
            reactions: RateTable::new(config.reaction_rate_limit, config.max_rate_limit_keys),
            view: Mutex::default(),
            namespace: Mutex::new(None),
            config,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The author id for a client IP on the cluster of `engine`.
    pub async fn user_id_for(&self, engine: &Engine, ip: IpAddr) -> Result<String, EngineError> {
        Ok(self.user_for(engine, ip).await?.to_string())
    }

    async fn user_for(&self, engine: &Engine, ip: IpAddr) -> Result<Uuid, EngineError> {
        let namespace = self.namespace(engine).await?;
        Ok(Uuid::new_v5(&namespace, ip.to_string().as_bytes()))
    }

    /// The author id for the verified subject `sub` (a signed token's `sub`) on the cluster of
    /// `engine`: the address derivation applied to `"sub:" + sub`.
    pub async fn user_id_for_subject(
        &self,
        engine: &Engine,
        sub: &str,
    ) -> Result<String, EngineError> {
        Ok(self.user_for_subject(engine, sub).await?.to_string())
    }

    async fn user_for_subject(&self, engine: &Engine, sub: &str) -> Result<Uuid, EngineError> {
        let namespace = self.namespace(engine).await?;
        let name = [SUBJECT_PREFIX.as_bytes(), sub.as_bytes()].concat();
        Ok(Uuid::new_v5(&namespace, &name))
    }

    /// The author-id namespace: a UUIDv5 of the engine's cluster id, the same on every node and,
    /// with a durable engine, after a restart. Fetched once per engine.
    async fn namespace(&self, engine: &Engine) -> Result<Uuid, EngineError> {
        let node = engine.node();
        let cached = *lock(&self.namespace);
        if let Some((cached_node, namespace)) = cached
            && cached_node == node
        {
            return Ok(namespace);
        }
        let cluster = engine.cluster_id().await?;
        let namespace = Uuid::new_v5(&cluster, b"switchboard ip-chat author ids");
        *lock(&self.namespace) = Some((node, namespace));
        Ok(namespace)
    }

    async fn user(&self, conn: &mut Connection, engine: &Engine) -> Result<Uuid, Refusal> {
        if let Some(user) = conn.user {
            return Ok(user);
        }
        let user = match &conn.signed {
            Some(identity) => self.user_for_subject(engine, identity.subject()).await,
            None => self.user_for(engine, conn.ip).await,
        }
        .map_err(refuse)?;
        conn.user = Some(user);
        Ok(user)
    }

    /// Who the rate limits count for `conn`, whose author is `user`.
    fn rate_key(conn: &Connection, user: Uuid) -> RateKey {
        match conn.signed {
            Some(_) => RateKey::Author(user),
            None => RateKey::Client(conn.key),
        }
    }

    fn history_retention(&self) -> Retention {
        Retention::trim(self.config.history_limit, self.config.max_history_bytes)
    }

    /// Whether the state budget can be reached at all: when it is at least the most the
    /// history can hold, checking it would only cost a read on every message.
    fn state_budget_may_bind(&self) -> bool {
        self.config.max_state_bytes
            < self
                .config
                .history_limit
                .saturating_mul(self.message_charge_bound())
    }

    /// The most one message holds in the engine, `M + RECORD_OVERHEAD`: its `message` frame
    /// (without reactions) plus its reaction record. The record's reactions are JSON that the
    /// message frame with reactions (at most `M`) also holds in place of its `{}`, so frame and
    /// record together stay within `M` plus the record's own key and envelope.
    pub fn message_charge_bound(&self) -> usize {
        self.config
            .max_message_bytes
            .saturating_add(RECORD_OVERHEAD)
    }

    /// The largest `reaction_updated` frame: the message (at most `M`), the emoji's JSON (at
    /// most six bytes per character, for escaped control characters) and the rest of the frame.
    pub fn update_frame_bound(&self) -> usize {
        self.config
            .max_message_bytes
            .saturating_add(self.config.max_emoji_chars.saturating_mul(6))
            .saturating_add(UPDATE_OVERHEAD)
    }

    /// The bytes one slot of this node's history view takes.
    pub fn view_slot_bytes() -> usize {
        std::mem::size_of::<ViewEntry>()
    }

    /// The most ip-chat keeps in the state engine (payload bytes; the engine's own per-item
    /// overhead and rate-limit windows are the engine's, bounded by `--max-state-bytes`):
    /// `min(H·C, max_state_bytes) + U`, where `H` is `history_limit`, `C` is
    /// [`IpChat::message_charge_bound`] and `U` is [`IpChat::update_frame_bound`] (the one entry
    /// the reactions log keeps).
    pub fn engine_worst_case_bytes(&self) -> usize {
        self.config
            .history_limit
            .saturating_mul(self.message_charge_bound())
            .min(self.config.max_state_bytes)
            .saturating_add(self.update_frame_bound())
    }

    /// The most this node's protocol value holds: `2·H·V + R`, where `V` is
    /// [`IpChat::view_slot_bytes`] (the view's deque keeps at most `H` spare slots) and `R` the
    /// two rate-limiter tables at `max(max_rate_limit_keys, 4) · 3 · L` each, `L` being
    /// [`TokenBuckets::slot_bytes`] (0 when unlimited).
    pub fn node_worst_case_bytes(&self) -> usize {
        self.config
            .history_limit
            .saturating_mul(2)
            .saturating_mul(Self::view_slot_bytes())
            .saturating_add(self.messages.max_bytes())
            .saturating_add(self.reactions.max_bytes())
    }

    /// The worst-case bytes of ip-chat state, the formula of `docs/protocols/ip-chat.md`:
    /// [`IpChat::engine_worst_case_bytes`] + [`IpChat::node_worst_case_bytes`].
    pub fn worst_case_bytes(&self) -> usize {
        self.engine_worst_case_bytes()
            .saturating_add(self.node_worst_case_bytes())
    }

    /// What ip-chat holds now: the history and reaction records read from `engine`, and this
    /// node's own tables.
    pub async fn stats(&self, engine: &Engine) -> Result<Stats, EngineError> {
        let limit = self.config.history_limit;
        let (entries, epoch) = if limit == 0 {
            (Vec::new(), 0)
        } else {
            match engine
                .read(HISTORY_TOPIC, ReadFrom::Latest(limit), limit)
                .await?
            {
                Read::Entries { entries, top } => (entries, top.epoch),
                Read::Gone { top } => (Vec::new(), top.epoch),
            }
        };
        let mut records = BTreeMap::new();
        let mut record_bytes = 0usize;
        let mut after: Option<String> = None;
        loop {
            let page = engine
                .scan(REACTION_KEY_PREFIX, after.as_deref(), SCAN_PAGE)
                .await?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after = Some(last.clone());
            for (key, stored) in page {
                let bytes = key.len().saturating_add(stored.value.len());
                record_bytes = record_bytes.saturating_add(bytes);
                if let (Some(offset), Some(record)) =
                    (record_offset(&key), ReactionRecord::decode(&stored.value))
                {
                    records.insert(offset, (bytes, record));
                }
            }
        }
        let frames = entries
            .iter()
            .fold(0usize, |sum, entry| sum.saturating_add(entry.frame.len()));
        let mut history_bytes = frames;
        let mut largest_message_bytes = 0;
        for entry in &entries {
            let mut len = entry.frame.len();
            if let Some((bytes, record)) = records.get(&entry.offset)
                && record.epoch == epoch
                && let Some(frame) = with_reactions(&entry.frame, record)
            {
                history_bytes = history_bytes.saturating_add(*bytes);
                len = frame.len();
            }
            largest_message_bytes = largest_message_bytes.max(len);
        }
        let view = lock(&self.view);
        Ok(Stats {
            messages: entries.len(),
            history_bytes,
            state_bytes: frames.saturating_add(record_bytes),
            reaction_records: records.len(),
            largest_message_bytes,
            view_entries: view.len(),
            view_slots: view.capacity(),
            rate_limit_keys: self.messages.keys().saturating_add(self.reactions.keys()),
            rate_limit_bytes: self.messages.bytes().saturating_add(self.reactions.bytes()),
        })
    }

    /// Counts one action of `key` against this node's table, then against the engine's
    /// cluster-wide window; `false` if either is spent.
    async fn allow(
        &self,
        engine: &Engine,
        buckets: &RateTable,
        prefix: &str,
        limit: usize,
        key: impl Into<RateKey>,
    ) -> Result<bool, Refusal> {
        let key = key.into();
        if !buckets.check_at(&key, Instant::now()) {
            return Ok(false);
        }
        if limit == 0 {
            return Ok(true);
        }
        let limit = u32::try_from(limit).unwrap_or(u32::MAX);
        let window = format!("{prefix}{key}");
        let decision = engine
            .rate_limit(&window, limit, RATE_WINDOW)
            .await
            .map_err(refuse)?;
        Ok(decision.is_allowed())
    }

    /// Validates, rate-limits and posts a message; the refusal to send back otherwise.
    async fn send_message(
        &self,
        conn: &mut Connection,
        engine: &Engine,
        text: String,
        author_name: Option<String>,
    ) -> Result<(), Refusal> {
        if text.trim().is_empty() {
            return Err(Cow::Borrowed(errors::EMPTY));
        }
        if text.chars().count() > self.config.max_text_chars {
            return Err(Cow::Owned(format!(
                "message too long (max {} characters)",
                self.config.max_text_chars
            )));
        }
        let user = self.user(conn, engine).await?;
        if !self
            .allow(
                engine,
                &self.messages,
                SEND_RATE_PREFIX,
                self.config.rate_limit,
                Self::rate_key(conn, user),
            )
            .await?
        {
            return Err(Cow::Owned(format!(
                "Rate limit exceeded. Maximum {} messages per minute.",
                self.config.rate_limit
            )));
        }
        self.post(engine, user, text, author_name).await
    }

    /// Stores `user`'s message in the history log and publishes it in the log's order.
    async fn post(
        &self,
        engine: &Engine,
        user: Uuid,
        text: String,
        author_name: Option<String>,
    ) -> Result<(), Refusal> {
        let author_name = match author_name.as_deref().map(str::trim) {
            Some(name) if !name.is_empty() => name
                .chars()
                .take(self.config.max_author_name_chars)
                .collect(),
            _ => "Anonymous".to_owned(),
        };
        let message = ChatMessage {
            id: Uuid::new_v4(),
            text,
            author_id: user.to_string(),
            author_name,
            created_at: chrono::Utc::now().timestamp(),
            reactions: Default::default(),
        };
        let frame = message_frame(&message).map_err(|error| {
            warn!(%error, "could not encode a message");
            Cow::Borrowed(errors::INVALID_FORMAT)
        })?;
        if frame.len() > self.config.max_message_bytes {
            return Err(Cow::Borrowed(errors::TOO_LARGE));
        }
        let limit = self.config.history_limit;
        if limit == 0 {
            // Nothing is kept: the message is only broadcast.
            engine
                .publish(HISTORY_TOPIC, frame, None)
                .await
                .map_err(refuse)?;
            telemetry::message_accepted();
            return Ok(());
        }
        let cap = self.config.max_history_bytes;
        if frame.len() > cap {
            return Err(Cow::Borrowed(errors::TOO_LARGE));
        }
        if self.state_budget_may_bind() {
            self.sync_view(engine).await.map_err(refuse)?;
            let after = lock(&self.view).bytes_after_append(frame.len(), limit, cap);
            if after > self.config.max_state_bytes {
                return Err(Cow::Borrowed(errors::STATE_FULL));
            }
        }
        let len = frame.len();
        let appended = engine
            .append(
                HISTORY_TOPIC,
                frame,
                Append::publish(self.history_retention()),
            )
            .await
            .map_err(refuse)?;
        // Counted once the engine holds it (and ordered its broadcast), not before.
        telemetry::message_accepted();
        if let Appended::Done(at) = appended {
            let mut view = lock(&self.view);
            view.appended(engine.node(), at, message.id, len, limit, cap);
        }
        if lock(&self.view).has_stale_records()
            && let Err(error) = self.prune(engine).await
        {
            warn!(%error, "ip-chat: could not prune reaction records");
        }
        Ok(())
    }

    /// Brings this node's view of the history up to date: continues it from where it stands,
    /// or rebuilds it from the newest entries when it cannot be continued.
    async fn sync_view(&self, engine: &Engine) -> Result<(), EngineError> {
        let node = engine.node();
        let limit = self.config.history_limit;
        let cap = self.config.max_history_bytes;
        // At most: one continuation that finds the epoch changed or a page too far behind,
        // then one rebuild.
        for _ in 0..3 {
            let from = lock(&self.view).continue_from(node);
            match from {
                Continue::Rebuild => {
                    let read = engine
                        .read(HISTORY_TOPIC, ReadFrom::Latest(limit), limit)
                        .await?;
                    if let Read::Entries { entries, top } = read {
                        lock(&self.view).rebuild(node, &entries, top);
                    }
                    return Ok(());
                }
                Continue::After(position) => {
                    match engine
                        .read(HISTORY_TOPIC, ReadFrom::After(position), limit)
                        .await?
                    {
                        Read::Gone { .. } => lock(&self.view).reset(),
                        Read::Entries { entries, top } => {
                            let mut view = lock(&self.view);
                            if view.extend(&entries, top, limit, cap) {
                                return Ok(());
                            }
                            // More than a page behind: everything older left the log anyway.
                            view.reset();
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Where message `id` sits in the history log (offset, epoch), if it is there.
    async fn locate(&self, engine: &Engine, id: Uuid) -> Result<Option<(u64, u64)>, EngineError> {
        {
            let mut view = lock(&self.view);
            view.continue_from(engine.node());
            if let Some(found) = view.offset_of(id) {
                return Ok(Some(found));
            }
        }
        self.sync_view(engine).await?;
        Ok(lock(&self.view).offset_of(id))
    }

    /// The message at `offset` of history epoch `epoch`, if it is still there and is `id`.
    async fn read_message(
        &self,
        engine: &Engine,
        offset: u64,
        epoch: u64,
        id: Uuid,
    ) -> Result<Option<ChatMessage>, EngineError> {
        let from = ReadFrom::After(Position {
            offset: offset.saturating_sub(1),
            epoch,
        });
        Ok(match engine.read(HISTORY_TOPIC, from, 1).await? {
            Read::Entries { entries, top } if top.epoch == epoch => entries
                .first()
                .filter(|entry| entry.offset == offset)
                .and_then(|entry| parse_message_frame(entry.frame.as_str()))
                .filter(|message| message.id == id),
            _ => None,
        })
    }

    /// Validates and rate-limits a reaction, then toggles it.
    async fn add_reaction(
        &self,
        conn: &mut Connection,
        engine: &Engine,
        message_id: &str,
        emoji: &str,
    ) -> Result<(), Refusal> {
        let emoji_chars = emoji.chars().count();
        if emoji.trim().is_empty() || emoji_chars > self.config.max_emoji_chars {
            return Err(Cow::Borrowed(errors::INVALID_FORMAT));
        }
        let Ok(id) = Uuid::parse_str(message_id) else {
            return Err(Cow::Borrowed(errors::NOT_FOUND));
        };
        let user = self.user(conn, engine).await?;
        if !self
            .allow(
                engine,
                &self.reactions,
                REACT_RATE_PREFIX,
                self.config.reaction_rate_limit,
                Self::rate_key(conn, user),
            )
            .await?
        {
            return Err(Cow::Owned(format!(
                "Rate limit exceeded. Maximum {} reactions per minute.",
                self.config.reaction_rate_limit
            )));
        }
        self.toggle(engine, id, emoji, user).await
    }

    /// Toggles `user`'s `emoji` on message `id` and broadcasts the `reaction_updated`. An
    /// addition that would break a bound is refused with the error text to send; the message
    /// keeps every reaction it had.
    async fn toggle(
        &self,
        engine: &Engine,
        id: Uuid,
        emoji: &str,
        user: Uuid,
    ) -> Result<(), Refusal> {
        let not_found = || Cow::Borrowed(errors::NOT_FOUND);
        if self.config.history_limit == 0 {
            return Err(not_found());
        }
        let (offset, epoch) = self
            .locate(engine, id)
            .await
            .map_err(refuse)?
            .ok_or_else(not_found)?;
        let base = self
            .read_message(engine, offset, epoch, id)
            .await
            .map_err(refuse)?
            .ok_or_else(not_found)?;
        let key = record_key(offset);
        let (action, created) = self
            .apply_toggle(engine, &key, &base, (offset, epoch), emoji, user)
            .await?;
        if created && let Err(error) = self.prune(engine).await {
            warn!(%error, "ip-chat: could not prune reaction records");
        }
        self.broadcast_update(engine, &key, &base, epoch, emoji, user, action)
            .await?;
        telemetry::reaction_accepted(action);
        Ok(())
    }

    /// Applies the toggle to the message's reaction record with compare-and-set, retrying when
    /// another toggle wrote first. Returns what it did and whether it created the record.
    async fn apply_toggle(
        &self,
        engine: &Engine,
        key: &str,
        base: &ChatMessage,
        (offset, epoch): (u64, u64),
        emoji: &str,
        user: Uuid,
    ) -> Result<(ReactionAction, bool), Refusal> {
        let limits = ReactionLimits {
            max_distinct: self.config.max_distinct_reactions,
            max_users_per_emoji: self.config.max_reactions_per_emoji,
        };
        let budget = self.state_budget_may_bind();
        if budget {
            self.sync_view(engine).await.map_err(refuse)?;
        }
        for _ in 0..MAX_ATTEMPTS {
            let current = engine.get(key).await.map_err(refuse)?;
            let mut message = base.clone();
            message.reactions = current
                .as_ref()
                .and_then(|stored| record_reactions(stored, base.id, epoch))
                .unwrap_or_default();
            let old_bytes = current
                .as_ref()
                .map_or(0, |stored| key.len().saturating_add(stored.value.len()));
            let action = messages::toggle_reaction(&mut message, emoji, user, limits).map_err(
                |refused| {
                    Cow::Owned(match refused {
                        ReactionRefused::TooManyEmoji(max) => {
                            format!("too many different reactions on this message (max {max})")
                        }
                        ReactionRefused::TooManyUsers(max) => format!(
                            "too many reactions with this emoji on this message (max {max})"
                        ),
                    })
                },
            )?;
            let value = if message.reactions.is_empty() {
                None
            } else {
                let record = ReactionRecord {
                    id: base.id,
                    epoch,
                    reactions: message.reactions.clone(),
                };
                Some(record.encode().map_err(|error| {
                    warn!(%error, "could not encode a reaction record");
                    Cow::Borrowed(errors::TOO_MANY_REACTIONS)
                })?)
            };
            let new_bytes = value
                .as_ref()
                .map_or(0, |value| key.len().saturating_add(value.len()));
            if action == ReactionAction::Added {
                let encoded = message_frame(&message).map_err(|error| {
                    warn!(%error, "could not re-encode a message");
                    Cow::Borrowed(errors::TOO_MANY_REACTIONS)
                })?;
                if encoded.len() > self.config.max_message_bytes {
                    return Err(Cow::Borrowed(errors::TOO_MANY_REACTIONS));
                }
                let state = lock(&self.view).state_bytes();
                if budget
                    && state.saturating_sub(old_bytes).saturating_add(new_bytes)
                        > self.config.max_state_bytes
                {
                    return Err(Cow::Borrowed(errors::STATE_FULL));
                }
            }
            let written = match (value, current.as_ref()) {
                (Some(value), _) => {
                    let expect = current
                        .as_ref()
                        .map_or(Expect::Absent, |stored| Expect::Version(stored.version));
                    let put = engine
                        .put(key, value.into(), expect, None)
                        .await
                        .map_err(refuse)?;
                    matches!(put, Put::Stored(_))
                }
                (None, Some(stored)) => engine
                    .delete(key, Expect::Version(stored.version))
                    .await
                    .map_err(refuse)?,
                // Only a removal empties the reactions, and it needs a record to remove from.
                (None, None) => true,
            };
            if written {
                lock(&self.view).set_reaction_bytes(epoch, offset, new_bytes);
                return Ok((action, current.is_none()));
            }
        }
        Err(Cow::Borrowed(errors::UNAVAILABLE))
    }

    /// Broadcasts the `reaction_updated` of one toggle, carrying the message's reactions as
    /// they are when the broadcast is ordered. The reactions log's top is read before the
    /// record, and the append only succeeds if the top did not move, so broadcasts carry
    /// ever newer records, and the last broadcast carries the latest one.
    #[allow(
        clippy::too_many_arguments,
        reason = "one toggle's facts, passed on from `toggle`"
    )]
    async fn broadcast_update(
        &self,
        engine: &Engine,
        key: &str,
        base: &ChatMessage,
        epoch: u64,
        emoji: &str,
        user: Uuid,
        action: ReactionAction,
    ) -> Result<(), Refusal> {
        for _ in 0..MAX_ATTEMPTS {
            let top = match engine
                .read(REACTIONS_TOPIC, ReadFrom::Latest(0), 0)
                .await
                .map_err(refuse)?
            {
                Read::Entries { top, .. } | Read::Gone { top } => top.offset,
            };
            let current = engine.get(key).await.map_err(refuse)?;
            let mut message = base.clone();
            message.reactions = current
                .as_ref()
                .and_then(|stored| record_reactions(stored, base.id, epoch))
                .unwrap_or_default();
            let frame = reaction_frame(&message, emoji, user, action).map_err(|error| {
                warn!(%error, "could not encode a reaction update");
                Cow::Borrowed(errors::INVALID_FORMAT)
            })?;
            let append = Append::publish(REACTIONS_RETENTION).if_top(top);
            match engine
                .append(REACTIONS_TOPIC, frame, append)
                .await
                .map_err(refuse)?
            {
                Appended::Done(_) => return Ok(()),
                Appended::Conflict(_) => continue,
            }
        }
        Err(Cow::Borrowed(errors::UNAVAILABLE))
    }

    /// Deletes the reaction records of messages that left the history (their keys sort before
    /// the oldest retained offset's).
    async fn prune(&self, engine: &Engine) -> Result<(), EngineError> {
        let oldest = ReadFrom::After(Position {
            offset: 0,
            epoch: 0,
        });
        let first = match engine.read(HISTORY_TOPIC, oldest, 1).await? {
            Read::Entries { entries, top } => entries
                .first()
                .map_or(top.offset.saturating_add(1), |entry| entry.offset),
            Read::Gone { top } => top.offset.saturating_add(1),
        };
        let mut after: Option<String> = None;
        'pages: loop {
            let page = engine
                .scan(REACTION_KEY_PREFIX, after.as_deref(), SCAN_PAGE)
                .await?;
            let Some((last, _)) = page.last() else {
                break;
            };
            after = Some(last.clone());
            for (key, stored) in &page {
                if record_offset(key).is_some_and(|offset| offset >= first) {
                    break 'pages;
                }
                engine.delete(key, Expect::Version(stored.version)).await?;
            }
        }
        lock(&self.view).pruned();
        Ok(())
    }

    /// The reaction records of the history entries `entries` (oldest first), by offset, with
    /// their sizes.
    async fn records_for(
        &self,
        engine: &Engine,
        entries: &[Entry],
    ) -> Result<BTreeMap<u64, (usize, ReactionRecord)>, EngineError> {
        let mut records = BTreeMap::new();
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(records);
        };
        let mut after = record_key(first.offset.saturating_sub(1));
        loop {
            let page = engine
                .scan(REACTION_KEY_PREFIX, Some(&after), SCAN_PAGE)
                .await?;
            let complete = page.len() < SCAN_PAGE;
            for (key, stored) in page {
                let Some(offset) = record_offset(&key) else {
                    continue;
                };
                if offset > last.offset {
                    return Ok(records);
                }
                if let Some(record) = ReactionRecord::decode(&stored.value) {
                    let bytes = key.len().saturating_add(stored.value.len());
                    records.insert(offset, (bytes, record));
                }
                after = key;
            }
            if complete {
                return Ok(records);
            }
        }
    }

    /// The replay for a joining client: each history entry's frame, re-encoded with its
    /// reactions where it has any. Newest first within `max_history_bytes`: only reactions can
    /// make the history's frames outgrow it, and then the oldest are left out of the replay.
    fn replay(
        &self,
        entries: &[Entry],
        records: &BTreeMap<u64, (usize, ReactionRecord)>,
        epoch: u64,
    ) -> Vec<Frame> {
        let mut frames = Vec::with_capacity(entries.len());
        let mut bytes = 0usize;
        for entry in entries.iter().rev() {
            let frame = records
                .get(&entry.offset)
                .filter(|(_, record)| record.epoch == epoch)
                .and_then(|(_, record)| with_reactions(&entry.frame, record))
                .unwrap_or_else(|| entry.frame.clone());
            bytes = bytes.saturating_add(frame.len());
            if bytes > self.config.max_history_bytes {
                break;
            }
            frames.push(frame);
        }
        frames.reverse();
        frames
    }

    /// Subscribes a new client: to the reactions log first, then to the history with a replay
    /// of the newest `history_limit` entries, each with the reactions read after both joins.
    /// Broadcasts ordered after a join's read reach the client after its replay; those ordered
    /// before it carry reactions no newer than the ones replayed.
    async fn open(&self, conn: &mut Connection, cx: &Context<'_>) -> Result<(), Refusal> {
        let engine = cx.engine();
        let peer = cx.peer();
        self.user(conn, engine).await?;
        let limit = self.config.history_limit;
        if limit == 0 {
            return engine.subscribe(HISTORY_TOPIC, peer).await.map_err(refuse);
        }
        let updates = engine
            .join(REACTIONS_TOPIC, peer, ReadFrom::Latest(0), 0)
            .await
            .map_err(refuse)?;
        let history = engine
            .join(HISTORY_TOPIC, peer, ReadFrom::Latest(limit), limit)
            .await
            .map_err(refuse)?;
        let (entries, top) = match history.read() {
            Read::Entries { entries, top } => (entries.clone(), *top),
            Read::Gone { top } => (Vec::new(), *top),
        };
        let records = self.records_for(engine, &entries).await.map_err(refuse)?;
        {
            let mut view = lock(&self.view);
            view.rebuild(engine.node(), &entries, top);
            for (offset, (bytes, record)) in &records {
                if record.epoch == top.epoch {
                    view.set_reaction_bytes(top.epoch, *offset, *bytes);
                }
            }
        }
        history.go_live(self.replay(&entries, &records, top.epoch));
        updates.go_live(Vec::new());
        telemetry::history_replayed();
        Ok(())
    }
}

/// `frame` (a `message` frame from the history) re-encoded with `record`'s reactions, if the
/// record belongs to its message and has any.
fn with_reactions(frame: &Frame, record: &ReactionRecord) -> Option<Frame> {
    if record.reactions.is_empty() {
        return None;
    }
    let mut message = parse_message_frame(frame.as_str())?;
    if message.id != record.id {
        return None;
    }
    message.reactions = record.reactions.clone();
    message_frame(&message).ok()
}

impl Protocol for IpChat {
    type Conn = Connection;

    fn name(&self) -> &'static str {
        "ip-chat"
    }

    fn admit(&self, handshake: &Handshake<'_>) -> Result<Connection, Reject> {
        if handshake.path != "/ws" {
            return Err(Reject::NotFound);
        }
        Ok(Connection {
            ip: handshake.client_ip,
            key: ClientKey::from_ip(handshake.client_ip),
            signed: handshake.identity.cloned(),
            user: None,
        })
    }

    async fn on_open(&self, conn: &mut Connection, cx: &Context<'_>) {
        if let Err(refusal) = self.open(conn, cx).await {
            // Without its subscriptions the socket would see nothing: say why and let the
            // client reconnect.
            let _ = cx.send(error_frame(&refusal));
            cx.close(CloseReason::try_again_later());
        }
    }

    async fn on_text(&self, conn: &mut Connection, cx: &Context<'_>, text: &str) {
        let engine = cx.engine();
        let result = match serde_json::from_str::<ClientMessage>(text) {
            Ok(ClientMessage::SendMessage(m)) => {
                self.send_message(conn, engine, m.text, m.author_name).await
            }
            Ok(ClientMessage::AddReaction(r)) => {
                self.add_reaction(conn, engine, &r.message_id, &r.emoji)
                    .await
            }
            Err(_) => Err(Cow::Borrowed(errors::INVALID_FORMAT)),
        };
        if let Err(refusal) = result {
            telemetry::refused(&refusal);
            let _ = cx.send(error_frame(&refusal));
        }
    }

    async fn on_close(&self, _conn: Connection, cx: &Context<'_>) {
        let engine = cx.engine();
        let id = cx.peer().id();
        engine.unsubscribe(HISTORY_TOPIC, id);
        engine.unsubscribe(REACTIONS_TOPIC, id);
    }

    async fn http(&self, _engine: &Engine, request: HttpRequest) -> Option<HttpResponse> {
        web::serve(&request)
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests fail by panicking"
    )]

    use std::net::Ipv4Addr;

    use switchboard_core::engine::MemoryLimits;

    use super::*;
    use crate::messages::message_frame_id;

    /// The ids of the messages in the history, oldest first.
    async fn history_ids(chat: &IpChat, engine: &Engine) -> Vec<Uuid> {
        let limit = chat.config.history_limit;
        match engine
            .read(HISTORY_TOPIC, ReadFrom::Latest(limit), limit)
            .await
            .unwrap()
        {
            Read::Entries { entries, .. } => entries
                .iter()
                .map(|entry| message_frame_id(entry.frame.as_str()).unwrap())
                .collect(),
            Read::Gone { .. } => Vec::new(),
        }
    }

    /// Fills every pool to its limit with worst-case content (texts and names of control
    /// characters, which JSON escapes to six bytes each, every message full of reactions, both
    /// rate-limiter tables full) and holds the accounting to the documented formula.
    #[tokio::test]
    async fn filling_every_pool_stays_within_the_documented_formula() {
        let config = Config {
            history_limit: 12,
            max_distinct_reactions: 5,
            max_reactions_per_emoji: 40,
            max_message_bytes: 6 * 1024,
            max_rate_limit_keys: 50,
            ..Config::default()
        };
        let chat = IpChat::new(config.clone());
        let engine = Engine::memory(MemoryLimits::default());
        let now = Instant::now();
        for n in 0..200u32 {
            let key = ClientKey::from_ip(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)));
            chat.messages.check_at(&key, now);
            chat.reactions.check_at(&key, now);
        }
        // More messages than the history holds: the oldest go.
        for _ in 0..20 {
            chat.post(
                &engine,
                Uuid::from_u128(7),
                "\u{1}".repeat(config.max_text_chars),
                Some("\u{2}".repeat(config.max_author_name_chars)),
            )
            .await
            .unwrap();
        }
        let ids = history_ids(&chat, &engine).await;
        assert_eq!(ids.len(), config.history_limit);
        // Every stored message gets every reaction it can take, with the longest emoji.
        let emoji: Vec<String> = (0..8)
            .map(|e| {
                char::from(b'a' + e)
                    .to_string()
                    .repeat(config.max_emoji_chars)
            })
            .collect();
        let mut refused = 0;
        for id in ids {
            for (e, emoji) in emoji.iter().enumerate() {
                for u in 0..50u128 {
                    let user = Uuid::from_u128((e as u128) << 64 | u);
                    if chat.toggle(&engine, id, emoji, user).await.is_err() {
                        refused += 1;
                    }
                }
            }
        }
        assert!(refused > 0);
        let stats = chat.stats(&engine).await.unwrap();
        assert_eq!(stats.messages, config.history_limit);
        assert_eq!(stats.reaction_records, config.history_limit);
        assert!(stats.largest_message_bytes <= config.max_message_bytes);
        assert!(
            stats.largest_message_bytes > config.max_message_bytes - 200,
            "the reactions filled the messages: {stats:?}"
        );
        assert!(
            stats.history_bytes <= config.history_limit * chat.message_charge_bound(),
            "{stats:?}"
        );
        assert_eq!(stats.state_bytes, stats.history_bytes);
        assert_eq!(stats.rate_limit_keys, 100);
        assert!(stats.view_slots <= 2 * config.history_limit, "{stats:?}");
        let node = stats.view_slots * IpChat::view_slot_bytes() + stats.rate_limit_bytes;
        assert!(node <= chat.node_worst_case_bytes(), "{stats:?}");
        // The one kept reaction broadcast is within its bound too.
        if let Read::Entries { entries, .. } = engine
            .read(REACTIONS_TOPIC, ReadFrom::Latest(1), 1)
            .await
            .unwrap()
        {
            assert!(
                entries
                    .iter()
                    .all(|e| e.frame.len() <= chat.update_frame_bound())
            );
        }
        let total = stats.state_bytes + chat.update_frame_bound() + node;
        assert!(total <= chat.worst_case_bytes(), "{total} ({stats:?})");
    }

    /// Each record and its message frame stay within `M + RECORD_OVERHEAD`, whatever the
    /// reactions (a record with the largest epoch and a message at the byte cap).
    #[test]
    fn a_record_and_its_frame_stay_within_the_charge_bound() {
        let chat = IpChat::new(Config {
            max_message_bytes: 2048,
            ..Config::default()
        });
        let mut message = ChatMessage {
            id: Uuid::from_u128(u128::MAX),
            text: "\u{1}".repeat(100),
            author_id: Uuid::from_u128(7).to_string(),
            author_name: "n".into(),
            created_at: i64::MAX,
            reactions: Default::default(),
        };
        let base = message_frame(&message).unwrap().len();
        let limits = ReactionLimits {
            max_distinct: 64,
            max_users_per_emoji: 1000,
        };
        for u in 0..1000u128 {
            let emoji = format!("\u{3}{}", u % 7);
            messages::toggle_reaction(&mut message, &emoji, Uuid::from_u128(u), limits).unwrap();
            if message_frame(&message).unwrap().len() > 2048 {
                messages::toggle_reaction(&mut message, &emoji, Uuid::from_u128(u), limits)
                    .unwrap();
                break;
            }
        }
        let record = ReactionRecord {
            id: message.id,
            epoch: u64::MAX,
            reactions: message.reactions.clone(),
        };
        let bytes = record_key(u64::MAX).len() + record.encode().unwrap().len();
        assert!(
            base + bytes <= chat.message_charge_bound(),
            "{base} + {bytes}"
        );
    }

    fn key(n: u8) -> ClientKey {
        ClientKey::from_ip(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)))
    }

    #[test]
    fn a_rate_limit_allows_a_burst_of_the_limit_then_one_per_interval() {
        let limit = per_minute(60, 10);
        let t0 = Instant::now();
        assert!((0..60).all(|_| limit.check_at(&key(1), t0)));
        assert!(!limit.check_at(&key(1), t0));
        assert!(limit.check_at(&key(2), t0));
        assert!(!limit.check_at(&key(1), t0 + Duration::from_millis(500)));
        assert!(limit.check_at(&key(1), t0 + Duration::from_secs(1)));
        assert!(!limit.check_at(&key(1), t0 + Duration::from_secs(1)));
        // A full window later the whole burst is back.
        let later = t0 + Duration::from_secs(62);
        assert!((0..60).all(|_| limit.check_at(&key(1), later)));
        assert!(!limit.check_at(&key(1), later));
    }

    #[test]
    fn rate_limits_under_one_per_second_work() {
        let limit = per_minute(2, 10);
        let t0 = Instant::now();
        assert!(limit.check_at(&key(1), t0));
        assert!(limit.check_at(&key(1), t0));
        assert!(!limit.check_at(&key(1), t0 + Duration::from_secs(29)));
        assert!(limit.check_at(&key(1), t0 + Duration::from_secs(30)));
    }

    #[test]
    fn a_full_rate_limit_table_fails_closed_until_clients_refill() {
        let limit = per_minute(1, 2);
        let t0 = Instant::now();
        assert!(limit.check_at(&key(1), t0));
        assert!(limit.check_at(&key(2), t0));
        assert!(!limit.check_at(&key(3), t0 + Duration::from_secs(1)));
        assert_eq!(limit.keys(), 2);
        assert!(limit.check_at(&key(3), t0 + Duration::from_secs(61)));
        assert!(limit.keys() <= 2);
        assert!(limit.bytes() <= limit.max_bytes());
        let unlimited = per_minute(0, 1);
        assert!((0..1000).all(|n| unlimited.check_at(&key((n % 200) as u8), t0)));
        assert_eq!(unlimited.keys(), 0);
        assert_eq!(unlimited.max_bytes(), 0);
    }

    /// The cluster-wide window: the limit counts every action of the client key on the engine,
    /// whichever node (here: protocol value) served it, and the window slides.
    #[tokio::test(start_paused = true)]
    async fn the_engine_window_is_shared_and_slides() {
        let engine = Engine::memory(MemoryLimits::default());
        let config = Config {
            rate_limit: 3,
            ..Config::default()
        };
        let (a, b) = (IpChat::new(config.clone()), IpChat::new(config));
        async fn allow(chat: &IpChat, engine: &Engine) -> bool {
            chat.allow(engine, &chat.messages, SEND_RATE_PREFIX, 3, key(1))
                .await
                .unwrap()
        }
        assert!(allow(&a, &engine).await);
        assert!(allow(&b, &engine).await);
        assert!(allow(&a, &engine).await);
        assert!(!allow(&b, &engine).await, "three across both values");
        tokio::time::advance(RATE_WINDOW).await;
        assert!(
            allow(&b, &engine).await,
            "the window slid past the first three"
        );
    }

    /// With signed identity the tables are keyed by author: a slot costs what the documented
    /// formula charges for a client key.
    #[test]
    fn an_author_key_costs_what_a_client_key_costs() {
        assert_eq!(
            TokenBuckets::<RateKey>::slot_bytes(),
            TokenBuckets::<ClientKey>::slot_bytes()
        );
        let author = RateKey::Author(Uuid::from_u128(7));
        assert_eq!(
            author.to_string(),
            "author:00000000-0000-0000-0000-000000000007"
        );
        assert_eq!(RateKey::from(key(1)).to_string(), "127.0.0.1");
    }

    /// The numbers in `docs/protocols/ip-chat.md` for the default configuration (64-bit).
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn the_default_worst_case_is_the_documented_one() {
        let chat = IpChat::new(Config::default());
        assert_eq!(IpChat::view_slot_bytes(), 40);
        assert_eq!(TokenBuckets::<ClientKey>::slot_bytes(), 41);
        assert_eq!(chat.message_charge_bound(), 8_320);
        assert_eq!(chat.update_frame_bound(), 8_544);
        assert_eq!(chat.engine_worst_case_bytes(), 8_328_544);
        assert_eq!(chat.node_worst_case_bytes(), 24_680_000);
        assert_eq!(chat.worst_case_bytes(), 33_008_544);
        assert!(std::mem::size_of::<Connection>() <= 64);
    }

    #[tokio::test]
    async fn removing_reactions_gives_every_byte_back() {
        let chat = IpChat::new(Config::default());
        let engine = Engine::memory(MemoryLimits::default());
        chat.post(&engine, Uuid::from_u128(7), "hi".into(), None)
            .await
            .unwrap();
        let id = history_ids(&chat, &engine).await[0];
        let empty = chat.stats(&engine).await.unwrap();
        for u in 0..30u128 {
            chat.toggle(&engine, id, "👍", Uuid::from_u128(u))
                .await
                .unwrap();
        }
        let full = chat.stats(&engine).await.unwrap();
        assert!(full.state_bytes > empty.state_bytes);
        assert_eq!(full.reaction_records, 1);
        for u in 0..30u128 {
            chat.toggle(&engine, id, "👍", Uuid::from_u128(u))
                .await
                .unwrap();
        }
        let after = chat.stats(&engine).await.unwrap();
        assert_eq!(after.state_bytes, empty.state_bytes);
        assert_eq!(after.reaction_records, 0, "the emptied record is deleted");
        assert!(
            engine
                .scan(REACTION_KEY_PREFIX, None, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// Records of messages that leave the history are deleted, so the records never outnumber
    /// the history.
    #[tokio::test]
    async fn records_of_trimmed_messages_are_pruned() {
        let chat = IpChat::new(Config {
            history_limit: 3,
            ..Config::default()
        });
        let engine = Engine::memory(MemoryLimits::default());
        for n in 0..10u128 {
            chat.post(&engine, Uuid::from_u128(7), format!("m{n}"), None)
                .await
                .unwrap();
            let ids = history_ids(&chat, &engine).await;
            let newest = ids.last().copied().unwrap();
            chat.toggle(&engine, newest, "👍", Uuid::from_u128(n))
                .await
                .unwrap();
            let stats = chat.stats(&engine).await.unwrap();
            assert!(stats.reaction_records <= 3, "{stats:?}");
            assert_eq!(stats.state_bytes, stats.history_bytes, "{stats:?}");
        }
        // A trimmed message is gone for reactions too.
        let first = Uuid::nil();
        assert_eq!(
            chat.toggle(&engine, first, "👍", Uuid::from_u128(1)).await,
            Err(Cow::Borrowed(errors::NOT_FOUND))
        );
    }

    /// The replay carries the current reactions; a stale record (another message's, from an
    /// earlier epoch) is ignored.
    #[tokio::test]
    async fn replays_carry_current_reactions_and_ignore_stale_records() {
        let chat = IpChat::new(Config::default());
        let engine = Engine::memory(MemoryLimits::default());
        for text in ["a", "b"] {
            chat.post(&engine, Uuid::from_u128(7), text.into(), None)
                .await
                .unwrap();
        }
        let ids = history_ids(&chat, &engine).await;
        chat.toggle(&engine, ids[1], "🎉", Uuid::from_u128(9))
            .await
            .unwrap();
        let stale = ReactionRecord {
            id: Uuid::from_u128(1),
            epoch: 999,
            reactions: Default::default(),
        };
        engine
            .put(
                &record_key(1),
                stale.encode().unwrap().into(),
                Expect::Any,
                None,
            )
            .await
            .unwrap();
        let (entries, epoch) = match engine
            .read(HISTORY_TOPIC, ReadFrom::Latest(10), 10)
            .await
            .unwrap()
        {
            Read::Entries { entries, top } => (entries, top.epoch),
            Read::Gone { .. } => unreachable!(),
        };
        let records = chat.records_for(&engine, &entries).await.unwrap();
        let replay = chat.replay(&entries, &records, epoch);
        let texts: Vec<ChatMessage> = replay
            .iter()
            .map(|frame| parse_message_frame(frame.as_str()).unwrap())
            .collect();
        assert_eq!(texts[0].text, "a");
        assert!(texts[0].reactions.is_empty());
        assert_eq!(
            texts[1].reactions.get("🎉"),
            Some(&[Uuid::from_u128(9)][..])
        );
    }
}
