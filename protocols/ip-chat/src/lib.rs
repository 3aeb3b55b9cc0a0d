//! ip-chat: one broadcast room where users are identified by their IP address.
//!
//! Clients connect to `/ws`, receive every stored message (oldest first), then every new
//! `message` and `reaction_updated` as it happens. `send_message` posts to everyone (the sender
//! included); `add_reaction` toggles the caller's emoji on a stored message. The author id is a
//! per-server UUIDv5 of the client IP: stable for one address, different across addresses, and
//! never the address itself.
//!
//! [`IpChat`] implements [`switchboard_core::Protocol`]; serve it with `switchboard-server` or
//! nest its router in your own axum application. History lives behind
//! [`switchboard_core::History`] and fan-out behind [`switchboard_core::Broadcaster`]; both
//! default to the in-memory implementations and can be replaced with [`IpChat::with_backends`].

pub mod messages;
mod web;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard_core::sync::lock;
use switchboard_core::{
    Broadcaster, Frame, Handshake, History, HttpRequest, HttpResponse, LocalBroadcaster,
    MemoryHistory, Peer, Protocol, RateLimiter, Reject,
};
use tracing::warn;
use uuid::Uuid;

use crate::messages::{
    ChatMessage, ClientMessage, ReactionAction, error_frame, message_frame, reaction_frame,
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
}

/// ip-chat limits. Every one is configurable; see `docs/protocols/ip-chat.md`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Messages kept and replayed on connect; the oldest is dropped first.
    pub history_limit: usize,
    /// `send_message` per user per sliding minute (0: unlimited).
    pub rate_limit: usize,
    /// `add_reaction` per user per sliding minute (0: unlimited).
    pub reaction_rate_limit: usize,
    /// Longest message text, in Unicode characters.
    pub max_text_chars: usize,
    /// Longest author name kept, in characters; longer names are cut.
    pub max_author_name_chars: usize,
    /// Longest emoji string, in characters.
    pub max_emoji_chars: usize,
    /// Distinct emoji one message may carry.
    pub max_distinct_reactions: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            history_limit: 1000,
            rate_limit: 60,
            reaction_rate_limit: 60,
            max_text_chars: 500,
            max_author_name_chars: 100,
            max_emoji_chars: 32,
            max_distinct_reactions: 64,
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

/// The ip-chat protocol.
pub struct IpChat {
    config: Config,
    history: Arc<dyn History<StoredMessage>>,
    hub: Arc<dyn Broadcaster>,
    messages: RateLimiter,
    reactions: RateLimiter,
    identity_namespace: Uuid,
    /// Serializes "store + publish" against "replay + subscribe", so a connecting client sees
    /// every message exactly once and in order.
    sequencer: Mutex<()>,
}

impl std::fmt::Debug for IpChat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpChat")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Per-connection state: who this socket is.
#[derive(Debug)]
pub struct Connection {
    user_id: String,
}

impl IpChat {
    /// ip-chat with in-memory history and fan-out.
    pub fn new(config: Config) -> Self {
        let history = Arc::new(MemoryHistory::new(config.history_limit));
        Self::with_backends(config, history, Arc::new(LocalBroadcaster::new()))
    }

    /// ip-chat over other history and fan-out backends.
    pub fn with_backends(
        config: Config,
        history: Arc<dyn History<StoredMessage>>,
        hub: Arc<dyn Broadcaster>,
    ) -> Self {
        let minute = Duration::from_secs(60);
        Self {
            messages: RateLimiter::new(config.rate_limit, minute),
            reactions: RateLimiter::new(config.reaction_rate_limit, minute),
            config,
            history,
            hub,
            identity_namespace: Uuid::new_v4(),
            sequencer: Mutex::new(()),
        }
    }

    /// The author id for a client IP.
    pub fn user_id_for(&self, ip: IpAddr) -> String {
        Uuid::new_v5(&self.identity_namespace, ip.to_string().as_bytes()).to_string()
    }

    fn send_message(&self, user_id: &str, peer: &Peer, text: String, author_name: Option<String>) {
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
        if !self.messages.check(user_id) {
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
        let message = ChatMessage {
            id: Uuid::new_v4(),
            text,
            author_id: user_id.to_owned(),
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
        let _order = lock(&self.sequencer);
        self.history.push(StoredMessage {
            message,
            frame: frame.clone(),
        });
        self.hub.publish(ROOM, &frame, None);
    }

    fn add_reaction(&self, user_id: &str, peer: &Peer, message_id: &str, emoji: &str) {
        let emoji_chars = emoji.chars().count();
        if emoji.trim().is_empty() || emoji_chars > self.config.max_emoji_chars {
            let _ = peer.send(error_frame(errors::INVALID_FORMAT));
            return;
        }
        let Ok(id) = Uuid::parse_str(message_id) else {
            let _ = peer.send(error_frame(errors::NOT_FOUND));
            return;
        };
        if !self.reactions.check(user_id) {
            let error = format!(
                "Rate limit exceeded. Maximum {} reactions per minute.",
                self.config.reaction_rate_limit
            );
            let _ = peer.send(error_frame(&error));
            return;
        }
        let max_distinct = self.config.max_distinct_reactions;
        let _order = lock(&self.sequencer);
        let mut outcome = None;
        let updated = self.history.update(
            &|stored: &StoredMessage| stored.message.id == id,
            &mut |stored| {
                outcome = toggle(stored, emoji, user_id, max_distinct);
            },
        );
        match (updated, outcome) {
            (None, _) => {
                let _ = peer.send(error_frame(errors::NOT_FOUND));
            }
            (Some(_), None) => {
                let error =
                    format!("too many different reactions on this message (max {max_distinct})");
                let _ = peer.send(error_frame(&error));
            }
            (Some(stored), Some(action)) => {
                match reaction_frame(&stored.message, emoji, user_id, action) {
                    Ok(frame) => {
                        self.hub.publish(ROOM, &frame, None);
                    }
                    Err(error) => warn!(%error, "could not encode a reaction update"),
                }
            }
        }
    }
}

/// Toggles the reaction and re-encodes the stored frame so later replays carry it.
fn toggle(
    stored: &mut StoredMessage,
    emoji: &str,
    user_id: &str,
    max_distinct: usize,
) -> Option<ReactionAction> {
    let action = messages::toggle_reaction(&mut stored.message, emoji, user_id, max_distinct)?;
    match message_frame(&stored.message) {
        Ok(frame) => stored.frame = frame,
        Err(error) => warn!(%error, "could not re-encode a message"),
    }
    Some(action)
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
            user_id: self.user_id_for(handshake.client_ip),
        })
    }

    async fn on_open(&self, _conn: &mut Connection, peer: &Peer) {
        let _order = lock(&self.sequencer);
        let replay: Vec<Frame> = self
            .history
            .snapshot()
            .into_iter()
            .map(|stored| stored.frame)
            .collect();
        let _ = peer.send_batch(replay);
        self.hub.subscribe(ROOM, peer);
    }

    async fn on_text(&self, conn: &mut Connection, peer: &Peer, text: &str) {
        match serde_json::from_str::<ClientMessage>(text) {
            Ok(ClientMessage::SendMessage(m)) => {
                self.send_message(&conn.user_id, peer, m.text, m.author_name)
            }
            Ok(ClientMessage::AddReaction(r)) => {
                self.add_reaction(&conn.user_id, peer, &r.message_id, &r.emoji)
            }
            Err(_) => {
                let _ = peer.send(error_frame(errors::INVALID_FORMAT));
            }
        }
    }

    async fn on_close(&self, _conn: Connection, peer: &Peer) {
        self.hub.unsubscribe(ROOM, peer.id());
    }

    async fn http(&self, request: HttpRequest) -> Option<HttpResponse> {
        web::serve(&request)
    }
}
