//! ip-chat: one broadcast room where users are identified by their IP address.
//!
//! Clients connect to `/ws`, receive every stored message (oldest first), then every new
//! `message` and `reaction_updated` as it happens. `send_message` posts to everyone (the sender
//! included); `add_reaction` toggles the caller's emoji on a stored message. The author id is a
//! per-server UUIDv5 of the client IP: stable for one address, different across addresses, and
//! never the address itself.
//!
//! [`IpChat`] implements [`switchboard_core::Protocol`]; serve it with `switchboard-server` or
//! nest its router in your own axum application. Fan-out goes through a
//! [`switchboard_core::Broadcaster`] (in-memory by default, replaceable with
//! [`IpChat::with_broadcaster`]); the history is held here, bounded in items and bytes and charged
//! to a [`MemoryBudget`].
//!
//! Every pool is bounded; `docs/protocols/ip-chat.md` ("Limits and worst-case memory") lists each
//! limit, its default and its policy, and [`IpChat::worst_case_bytes`] is the formula given there.

pub mod messages;
mod web;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchboard_core::sync::lock;
use switchboard_core::{
    Broadcaster, ClientKey, Context, Engine, Frame, Handshake, HttpRequest, HttpResponse,
    LocalBroadcaster, MemoryBudget, Peer, Protocol, Rate, Reject, TokenBuckets,
};
use tracing::warn;
use uuid::Uuid;

use crate::messages::{
    ALLOCATION_OVERHEAD, ChatMessage, ClientMessage, ReactionAction, ReactionLimits,
    ReactionRefused, error_frame, message_frame, reaction_frame,
};

/// The fan-out topic every ip-chat socket subscribes to.
const ROOM: &str = "ip-chat";

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
    /// A reaction would make the message exceed `Config::max_message_bytes` (or the history
    /// exceed `Config::max_history_bytes`).
    pub const TOO_MANY_REACTIONS: &str = "too many reactions on this message";
    /// The server-wide state budget (`Config::max_state_bytes`) is spent.
    pub const STATE_FULL: &str = "server storage is full, try again later";
}

/// ip-chat limits. Every one is configurable; see `docs/protocols/ip-chat.md`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Messages kept and replayed on connect; the oldest is dropped first.
    pub history_limit: usize,
    /// Bytes the history may hold (as accounted, see [`IpChat::message_charge_bound`]); the
    /// oldest messages are dropped first to make room for a new one. A reaction that would
    /// exceed it is refused instead (nothing is dropped for a reaction).
    pub max_history_bytes: usize,
    /// `send_message` per client per minute (0: unlimited).
    pub rate_limit: usize,
    /// `add_reaction` per client per minute (0: unlimited).
    pub reaction_rate_limit: usize,
    /// Clients each rate limiter tracks at most; past it, clients whose budget has refilled are
    /// forgotten, and if none has, new clients are refused with the rate-limit error.
    pub max_rate_limit_keys: usize,
    /// Longest message text, in Unicode characters.
    pub max_text_chars: usize,
    /// Longest author name kept, in characters; longer names are cut.
    pub max_author_name_chars: usize,
    /// Longest emoji string, in characters.
    pub max_emoji_chars: usize,
    /// Distinct emoji one message may carry.
    pub max_distinct_reactions: usize,
    /// Users one emoji may carry on one message.
    pub max_reactions_per_emoji: usize,
    /// Largest encoded `message` frame, reactions included; this also bounds every
    /// `reaction_updated` broadcast (which carries the whole message, as the spec asks).
    pub max_message_bytes: usize,
    /// Server-wide byte budget for stored state (the history); when spent, new messages and
    /// growing reactions are refused with an error, nothing stored is evicted for it.
    pub max_state_bytes: usize,
}

impl Default for Config {
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

/// A stored message with its `message` frame, encoded once and reused for every replay.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    /// The message.
    pub message: ChatMessage,
    /// Its encoded `message` frame.
    pub frame: Frame,
}

impl StoredMessage {
    /// Bytes this message is charged: its slot in the history, the frame, every string and the
    /// reactions at their capacities, plus [`ALLOCATION_OVERHEAD`] per allocation.
    pub fn charged_bytes(&self) -> usize {
        let m = &self.message;
        std::mem::size_of::<Self>()
            .saturating_add(self.frame.len())
            .saturating_add(m.text.capacity())
            .saturating_add(m.author_id.capacity())
            .saturating_add(m.author_name.capacity())
            .saturating_add(m.reactions.heap_bytes())
            .saturating_add(ALLOCATION_OVERHEAD.saturating_mul(4))
    }
}

/// The history: messages oldest first, with what each is charged.
#[derive(Debug, Default)]
struct Store {
    items: VecDeque<(StoredMessage, usize)>,
    bytes: usize,
}

/// What [`IpChat::stats`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Messages in the history.
    pub messages: usize,
    /// Bytes the history is charged (the sum of [`StoredMessage::charged_bytes`]).
    pub history_bytes: usize,
    /// Bytes charged to the state budget (`Config::max_state_bytes`).
    pub state_bytes: usize,
    /// Spare history slots, each [`std::mem::size_of::<StoredMessage>`] plus its charge slot.
    pub history_spare_slots: usize,
    /// Clients tracked by the two rate limiters together.
    pub rate_limit_keys: usize,
    /// Bytes held by the two rate-limiter tables.
    pub rate_limit_bytes: usize,
    /// The largest encoded `message` frame in the history.
    pub largest_message_bytes: usize,
}

/// The ip-chat protocol.
pub struct IpChat {
    config: Config,
    /// The history; holding this lock also serializes "store + publish" against "replay +
    /// subscribe", so a connecting client sees every message exactly once and in order.
    store: Mutex<Store>,
    budget: MemoryBudget,
    hub: Arc<dyn Broadcaster>,
    /// `send_message` per client: `rate_limit` per minute, all of it at once if the client
    /// likes (GCRA, one instant per client whatever the limit).
    messages: TokenBuckets<ClientKey>,
    /// `add_reaction` per client: `reaction_rate_limit` per minute, the same way.
    reactions: TokenBuckets<ClientKey>,
    identity_namespace: Uuid,
}

impl std::fmt::Debug for IpChat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpChat")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A per-client limit of `limit` events per minute (0: unlimited), the whole limit allowed at
/// once, then one event per `60 s / limit`; at most `max_keys` clients tracked.
fn per_minute(limit: usize, max_keys: usize) -> TokenBuckets<ClientKey> {
    // Limits past u32::MAX events a minute are unlimited in all but name.
    let limit = u32::try_from(limit).unwrap_or(u32::MAX);
    TokenBuckets::with_rate(Rate::per_window(limit, Duration::from_secs(60)), max_keys)
}

/// Per-connection state: who this socket is.
#[derive(Debug)]
pub struct Connection {
    user: Uuid,
    key: ClientKey,
}

impl IpChat {
    /// ip-chat with in-memory fan-out.
    pub fn new(config: Config) -> Self {
        Self::with_broadcaster(config, Arc::new(LocalBroadcaster::new()))
    }

    /// ip-chat over another fan-out backend.
    pub fn with_broadcaster(config: Config, hub: Arc<dyn Broadcaster>) -> Self {
        Self {
            messages: per_minute(config.rate_limit, config.max_rate_limit_keys),
            reactions: per_minute(config.reaction_rate_limit, config.max_rate_limit_keys),
            budget: MemoryBudget::new(config.max_state_bytes),
            store: Mutex::default(),
            config,
            hub,
            identity_namespace: Uuid::new_v4(),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The author id for a client IP.
    pub fn user_id_for(&self, ip: IpAddr) -> String {
        self.user_for(ip).to_string()
    }

    fn user_for(&self, ip: IpAddr) -> Uuid {
        Uuid::new_v5(&self.identity_namespace, ip.to_string().as_bytes())
    }

    /// What the protocol holds now, as accounted.
    pub fn stats(&self) -> Stats {
        let store = lock(&self.store);
        Stats {
            messages: store.items.len(),
            history_bytes: store.bytes,
            state_bytes: self.budget.used(),
            history_spare_slots: store.items.capacity().saturating_sub(store.items.len()),
            rate_limit_keys: self.messages.keys().saturating_add(self.reactions.keys()),
            rate_limit_bytes: self.messages.bytes().saturating_add(self.reactions.bytes()),
            largest_message_bytes: store
                .items
                .iter()
                .map(|(stored, _)| stored.frame.len())
                .max()
                .unwrap_or(0),
        }
    }

    /// The most one stored message can be charged under this configuration:
    /// `S + 5·A + 2·M + D·(E + 2·A)`, where `S` is `size_of::<StoredMessage>()`, `A` is
    /// [`ALLOCATION_OVERHEAD`], `M` is `max_message_bytes`, `D` is `max_distinct_reactions` and
    /// `E` is the size of one reaction entry (emoji string + user list headers). Strings and
    /// user ids are held in no more bytes than their JSON in the frame (which is at most `M`),
    /// hence `2·M`.
    pub fn message_charge_bound(&self) -> usize {
        let entry = std::mem::size_of::<(String, Vec<Uuid>)>()
            .saturating_add(ALLOCATION_OVERHEAD.saturating_mul(2));
        std::mem::size_of::<StoredMessage>()
            .saturating_add(ALLOCATION_OVERHEAD.saturating_mul(5))
            .saturating_add(self.config.max_message_bytes.saturating_mul(2))
            .saturating_add(self.config.max_distinct_reactions.saturating_mul(entry))
    }

    /// The worst-case bytes of protocol state, the formula of `docs/protocols/ip-chat.md`:
    /// `min(H·C, max_history_bytes, max_state_bytes) + 2·H·P + R`, where `H` is
    /// `history_limit`, `C` is [`IpChat::message_charge_bound`], `P` is one history slot's
    /// header (the deque keeps at most `H` spare slots) and `R` the two rate-limiter tables at
    /// `max(max_rate_limit_keys, 4) · 3 · L` each, `L` being
    /// [`TokenBuckets::slot_bytes`] (0 when unlimited).
    pub fn worst_case_bytes(&self) -> usize {
        let h = self.config.history_limit;
        let history = h
            .saturating_mul(self.message_charge_bound())
            .min(self.config.max_history_bytes)
            .min(self.config.max_state_bytes);
        let slots = h
            .saturating_mul(2)
            .saturating_mul(std::mem::size_of::<(StoredMessage, usize)>());
        history
            .saturating_add(slots)
            .saturating_add(self.messages.max_bytes())
            .saturating_add(self.reactions.max_bytes())
    }

    fn send_message(
        &self,
        conn: &Connection,
        peer: &Peer,
        text: String,
        author_name: Option<String>,
    ) {
        if text.trim().is_empty() {
            let _ = peer.send(error_frame(errors::EMPTY));
            return;
        }
        if text.chars().count() > self.config.max_text_chars {
            let error = format!(
                "message too long (max {} characters)",
                self.config.max_text_chars
            );
            let _ = peer.send(error_frame(&error));
            return;
        }
        if !self.messages.check_at(&conn.key, Instant::now()) {
            let error = format!(
                "Rate limit exceeded. Maximum {} messages per minute.",
                self.config.rate_limit
            );
            let _ = peer.send(error_frame(&error));
            return;
        }
        let author_name = match author_name.as_deref().map(str::trim) {
            Some(name) if !name.is_empty() => name
                .chars()
                .take(self.config.max_author_name_chars)
                .collect(),
            _ => "Anonymous".to_owned(),
        };
        let mut text = text;
        text.shrink_to_fit();
        let message = ChatMessage {
            id: Uuid::new_v4(),
            text,
            author_id: conn.user.to_string(),
            author_name,
            created_at: chrono::Utc::now().timestamp(),
            reactions: Default::default(),
        };
        let frame = match message_frame(&message) {
            Ok(frame) => frame,
            Err(error) => {
                warn!(%error, "could not encode a message");
                return;
            }
        };
        if frame.len() > self.config.max_message_bytes {
            let _ = peer.send(error_frame(errors::TOO_LARGE));
            return;
        }
        let stored = StoredMessage {
            message,
            frame: frame.clone(),
        };
        let mut store = lock(&self.store);
        if let Err(error) = self.store_message(&mut store, stored) {
            let _ = peer.send(error_frame(error));
            return;
        }
        self.hub.publish(ROOM, &frame, None);
    }

    /// Stores a new message: drops the oldest while the history is over its item or byte limit,
    /// then charges the budget (refusing, with nothing dropped for it, when the budget is spent).
    fn store_message(&self, store: &mut Store, stored: StoredMessage) -> Result<(), &'static str> {
        if self.config.history_limit == 0 {
            // Nothing is kept: the message is only broadcast.
            return Ok(());
        }
        let charge = stored.charged_bytes();
        if charge > self.config.max_history_bytes {
            return Err(errors::TOO_LARGE);
        }
        if self.budget.try_reserve(charge).is_err() {
            // Dropping the oldest for the history's own caps would give bytes back; try once
            // more after doing only what those caps demand anyway.
            self.evict_for(store, charge);
            if self.budget.try_reserve(charge).is_err() {
                return Err(errors::STATE_FULL);
            }
        } else {
            self.evict_for(store, charge);
        }
        store.items.push_back((stored, charge));
        store.bytes = store.bytes.saturating_add(charge);
        Ok(())
    }

    /// Drops the oldest messages until one more of `charge` bytes fits the item and byte caps.
    fn evict_for(&self, store: &mut Store, charge: usize) {
        while store.items.len() >= self.config.history_limit
            || store.bytes.saturating_add(charge) > self.config.max_history_bytes
        {
            let Some((_, old)) = store.items.pop_front() else {
                break;
            };
            store.bytes = store.bytes.saturating_sub(old);
            self.budget.release(old);
        }
    }

    fn add_reaction(&self, conn: &Connection, peer: &Peer, message_id: &str, emoji: &str) {
        let emoji_chars = emoji.chars().count();
        if emoji.trim().is_empty() || emoji_chars > self.config.max_emoji_chars {
            let _ = peer.send(error_frame(errors::INVALID_FORMAT));
            return;
        }
        let Ok(id) = Uuid::parse_str(message_id) else {
            let _ = peer.send(error_frame(errors::NOT_FOUND));
            return;
        };
        if !self.reactions.check_at(&conn.key, Instant::now()) {
            let error = format!(
                "Rate limit exceeded. Maximum {} reactions per minute.",
                self.config.reaction_rate_limit
            );
            let _ = peer.send(error_frame(&error));
            return;
        }
        let mut store = lock(&self.store);
        match self.toggle(&mut store, id, emoji, conn.user) {
            Ok(frame) => {
                self.hub.publish(ROOM, &frame, None);
            }
            Err(error) => {
                let _ = peer.send(error_frame(&error));
            }
        }
    }

    /// Toggles `user`'s `emoji` on message `id` and returns the `reaction_updated` frame. An
    /// addition that would break a bound is undone and refused with the error text to send;
    /// existing reactions are kept either way.
    fn toggle(
        &self,
        store: &mut Store,
        id: Uuid,
        emoji: &str,
        user: Uuid,
    ) -> Result<Frame, String> {
        let limits = ReactionLimits {
            max_distinct: self.config.max_distinct_reactions,
            max_users_per_emoji: self.config.max_reactions_per_emoji,
        };
        let history_bytes = store.bytes;
        let Some((stored, charged)) = store
            .items
            .iter_mut()
            .rev()
            .find(|(stored, _)| stored.message.id == id)
        else {
            return Err(errors::NOT_FOUND.to_owned());
        };
        let action = messages::toggle_reaction(&mut stored.message, emoji, user, limits).map_err(
            |refused| match refused {
                ReactionRefused::TooManyEmoji(max) => {
                    format!("too many different reactions on this message (max {max})")
                }
                ReactionRefused::TooManyUsers(max) => {
                    format!("too many reactions with this emoji on this message (max {max})")
                }
            },
        )?;
        let undo = |stored: &mut StoredMessage| {
            let _ = messages::toggle_reaction(&mut stored.message, emoji, user, limits);
        };
        let frame = match message_frame(&stored.message) {
            Ok(frame) => frame,
            Err(error) => {
                warn!(%error, "could not re-encode a message");
                undo(stored);
                return Err(errors::TOO_MANY_REACTIONS.to_owned());
            }
        };
        let old_frame = std::mem::replace(&mut stored.frame, frame);
        let charge = stored.charged_bytes();
        let grows = charge > *charged;
        let fits = stored.frame.len() <= self.config.max_message_bytes
            && history_bytes
                .saturating_sub(*charged)
                .saturating_add(charge)
                <= self.config.max_history_bytes;
        if action == ReactionAction::Added && grows && !fits {
            stored.frame = old_frame;
            undo(stored);
            return Err(errors::TOO_MANY_REACTIONS.to_owned());
        }
        if self.budget.try_resize(*charged, charge).is_err() {
            stored.frame = old_frame;
            undo(stored);
            return Err(errors::STATE_FULL.to_owned());
        }
        let old_charge = std::mem::replace(charged, charge);
        store.bytes = history_bytes
            .saturating_sub(old_charge)
            .saturating_add(charge);
        reaction_frame(&stored.message, emoji, user, action).map_err(|error| {
            warn!(%error, "could not encode a reaction update");
            errors::INVALID_FORMAT.to_owned()
        })
    }
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
            user: self.user_for(handshake.client_ip),
            key: ClientKey::from_ip(handshake.client_ip),
        })
    }

    async fn on_open(&self, _conn: &mut Connection, cx: &Context<'_>) {
        let peer = cx.peer();
        let store = lock(&self.store);
        let replay: Vec<Frame> = store
            .items
            .iter()
            .map(|(stored, _)| stored.frame.clone())
            .collect();
        let _ = peer.send_batch(replay);
        self.hub.subscribe(ROOM, peer);
    }

    async fn on_text(&self, conn: &mut Connection, cx: &Context<'_>, text: &str) {
        let peer = cx.peer();
        match serde_json::from_str::<ClientMessage>(text) {
            Ok(ClientMessage::SendMessage(m)) => {
                self.send_message(conn, peer, m.text, m.author_name)
            }
            Ok(ClientMessage::AddReaction(r)) => {
                self.add_reaction(conn, peer, &r.message_id, &r.emoji)
            }
            Err(_) => {
                let _ = peer.send(error_frame(errors::INVALID_FORMAT));
            }
        }
    }

    async fn on_close(&self, _conn: Connection, cx: &Context<'_>) {
        let peer = cx.peer();
        self.hub.unsubscribe(ROOM, peer.id());
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

    use super::*;

    /// Fills every pool to its limit with worst-case content (texts and names of control
    /// characters, which JSON escapes to six bytes each, every message full of reactions, both
    /// rate-limiter tables full) and holds the accounting to the documented formula.
    #[test]
    fn filling_every_pool_stays_within_the_documented_formula() {
        let config = Config {
            history_limit: 12,
            max_distinct_reactions: 5,
            max_reactions_per_emoji: 40,
            max_message_bytes: 6 * 1024,
            max_rate_limit_keys: 50,
            ..Config::default()
        };
        let chat = IpChat::new(config.clone());
        let now = Instant::now();
        for n in 0..200u32 {
            let key = ClientKey::from_ip(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)));
            chat.messages.check_at(&key, now);
            chat.reactions.check_at(&key, now);
        }
        let mut store = lock(&chat.store);
        // More messages than the history holds: the oldest go.
        for n in 0..20u32 {
            let message = ChatMessage {
                id: Uuid::from_u128(u128::from(n) + 1),
                text: "\u{1}".repeat(config.max_text_chars),
                author_id: Uuid::from_u128(7).to_string(),
                author_name: "\u{2}".repeat(config.max_author_name_chars),
                created_at: i64::MAX,
                reactions: Default::default(),
            };
            let frame = message_frame(&message).unwrap();
            assert!(frame.len() <= config.max_message_bytes);
            chat.store_message(&mut store, StoredMessage { message, frame })
                .unwrap();
        }
        assert_eq!(store.items.len(), config.history_limit);
        // Every stored message gets every reaction it can take, with the longest emoji.
        let ids: Vec<Uuid> = store.items.iter().map(|(s, _)| s.message.id).collect();
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
                    if chat.toggle(&mut store, id, emoji, user).is_err() {
                        refused += 1;
                    }
                }
            }
        }
        assert!(refused > 0);
        let bound = chat.message_charge_bound();
        let mut sum = 0usize;
        for (stored, charged) in &store.items {
            assert_eq!(*charged, stored.charged_bytes());
            assert!(stored.frame.len() <= config.max_message_bytes);
            assert!(*charged <= bound, "{charged} > {bound}");
            sum += charged;
        }
        assert_eq!(sum, store.bytes);
        let history_bytes = store.bytes;
        drop(store);
        let stats = chat.stats();
        assert_eq!(stats.state_bytes, history_bytes);
        assert_eq!(stats.rate_limit_keys, 100);
        let slots = (stats.messages + stats.history_spare_slots)
            * std::mem::size_of::<(StoredMessage, usize)>();
        let total = stats.state_bytes + slots + stats.rate_limit_bytes;
        assert!(
            total <= chat.worst_case_bytes(),
            "{total} > {} ({stats:?})",
            chat.worst_case_bytes()
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

    /// The numbers in `docs/protocols/ip-chat.md` for the default configuration (64-bit).
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn the_default_worst_case_is_the_documented_one() {
        let chat = IpChat::new(Config::default());
        assert_eq!(std::mem::size_of::<StoredMessage>(), 152);
        assert_eq!(TokenBuckets::<ClientKey>::slot_bytes(), 41);
        assert_eq!(chat.message_charge_bound(), 17_896);
        assert_eq!(chat.worst_case_bytes(), 27_017_152);
    }

    #[test]
    fn removing_reactions_gives_every_byte_back() {
        let chat = IpChat::new(Config::default());
        let mut store = lock(&chat.store);
        let message = ChatMessage {
            id: Uuid::from_u128(1),
            text: "hi".into(),
            author_id: Uuid::from_u128(7).to_string(),
            author_name: "Anonymous".into(),
            created_at: 0,
            reactions: Default::default(),
        };
        let frame = message_frame(&message).unwrap();
        chat.store_message(&mut store, StoredMessage { message, frame })
            .unwrap();
        let empty = store.bytes;
        for u in 0..30u128 {
            chat.toggle(&mut store, Uuid::from_u128(1), "👍", Uuid::from_u128(u))
                .unwrap();
        }
        assert!(store.bytes > empty);
        for u in 0..30u128 {
            chat.toggle(&mut store, Uuid::from_u128(1), "👍", Uuid::from_u128(u))
                .unwrap();
        }
        assert_eq!(store.bytes, empty);
        drop(store);
        assert_eq!(chat.stats().state_bytes, empty);
    }
}
