//! The ip-chat wire format: `{"type": ..., "data": {...}}` both ways.

use serde::{Deserialize, Serialize};
use switchboard_core::{Error, Frame, envelope::typed_frame};
use uuid::Uuid;

/// A frame a client may send.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Post a message to everyone.
    SendMessage(SendMessage),
    /// Toggle a reaction on a stored message.
    AddReaction(AddReaction),
}

/// `send_message` data.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct SendMessage {
    /// The text (1–500 characters, not only whitespace).
    pub text: String,
    /// Display name; missing, null or blank means "Anonymous".
    #[serde(default)]
    pub author_name: Option<String>,
}

/// `add_reaction` data.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct AddReaction {
    /// The message to react to.
    pub message_id: String,
    /// The emoji.
    pub emoji: String,
}

/// A stored chat message, as sent in `message` frames (and read back from the history log).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChatMessage {
    /// Message id (UUID v4).
    pub id: Uuid,
    /// The text as sent.
    pub text: String,
    /// The author's id, derived from their IP.
    pub author_id: String,
    /// The author's display name.
    pub author_name: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Emoji to the ids of users who reacted with it, in reaction order. No empty lists.
    pub reactions: Reactions,
}

/// The reactions on one message: each emoji with the users who reacted with it, in the order
/// the emoji first appeared. Encoded as the spec's JSON object `{emoji: [user id, ...]}`.
///
/// A user id is a UUID (16 bytes here rather than a 36-byte string), and every list is kept at
/// exactly its length (no spare capacity), so the heap this holds is small and predictable; see
/// [`Reactions::heap_bytes`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reactions(Vec<(String, Vec<Uuid>)>);

impl Reactions {
    /// The users who reacted with `emoji`, if any did.
    pub fn get(&self, emoji: &str) -> Option<&[Uuid]> {
        self.0
            .iter()
            .find(|(e, _)| e == emoji)
            .map(|(_, users)| users.as_slice())
    }

    /// Distinct emoji on the message.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nobody reacted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Reactions over all emoji (one per user and emoji).
    pub fn total(&self) -> usize {
        self.0
            .iter()
            .fold(0usize, |sum, (_, users)| sum.saturating_add(users.len()))
    }

    /// Each emoji with its users, in first-reaction order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[Uuid])> {
        self.0
            .iter()
            .map(|(emoji, users)| (emoji.as_str(), users.as_slice()))
    }

    /// Heap bytes held: the entry table, each emoji string and each user list, at their
    /// capacities, plus [`ALLOCATION_OVERHEAD`] per allocation.
    pub fn heap_bytes(&self) -> usize {
        let table = self
            .0
            .capacity()
            .saturating_mul(std::mem::size_of::<(String, Vec<Uuid>)>());
        self.0.iter().fold(table, |sum, (emoji, users)| {
            sum.saturating_add(emoji.capacity())
                .saturating_add(users.capacity().saturating_mul(std::mem::size_of::<Uuid>()))
                .saturating_add(ALLOCATION_OVERHEAD.saturating_mul(2))
        })
    }
}

impl<'de> Deserialize<'de> for Reactions {
    /// Reads the `{emoji: [user id, ...]}` object back in its order, each list without spare
    /// capacity (as [`toggle_reaction`] keeps them).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Reactions;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of emoji to user id lists")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Reactions, A::Error> {
                let mut entries = Vec::new();
                while let Some((emoji, mut users)) = map.next_entry::<String, Vec<Uuid>>()? {
                    users.shrink_to_fit();
                    entries.push((emoji, users));
                }
                entries.shrink_to_fit();
                Ok(Reactions(entries))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

impl Serialize for Reactions {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (emoji, users) in &self.0 {
            map.serialize_entry(emoji, users)?;
        }
        map.end()
    }
}

/// What one heap allocation costs beyond its payload (allocator header and rounding), as
/// charged by the accounting.
pub const ALLOCATION_OVERHEAD: usize = 16;

/// Whether a toggle added or removed a reaction.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReactionAction {
    /// The user had not reacted with this emoji; now they have.
    Added,
    /// The user had reacted with this emoji; now they have not.
    Removed,
}

/// Why [`toggle_reaction`] refused to add a reaction (nothing changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReactionRefused {
    /// The message already carries this many distinct emoji.
    TooManyEmoji(usize),
    /// This emoji already has this many users on the message.
    TooManyUsers(usize),
}

/// Per-message reaction bounds applied by [`toggle_reaction`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReactionLimits {
    /// Distinct emoji one message may carry.
    pub max_distinct: usize,
    /// Users one emoji may carry on one message.
    pub max_users_per_emoji: usize,
}

#[derive(Serialize)]
struct ReactionUpdated<'a> {
    message_id: Uuid,
    emoji: &'a str,
    user_id: Uuid,
    action: ReactionAction,
    message: &'a ChatMessage,
}

#[derive(Serialize)]
struct ErrorData<'a> {
    error: &'a str,
}

/// `{"type":"message","data":message}`, held in an allocation of exactly its length (stored
/// frames are charged by their length).
pub fn message_frame(message: &ChatMessage) -> Result<Frame, Error> {
    let frame = typed_frame("message", "data", message)?;
    Ok(Frame::text(frame.as_str().to_owned()))
}

/// `{"type":"reaction_updated","data":{...}}` carrying the full updated message (the spec asks
/// for it; the per-message bounds keep it small).
pub fn reaction_frame(
    message: &ChatMessage,
    emoji: &str,
    user_id: Uuid,
    action: ReactionAction,
) -> Result<Frame, Error> {
    let data = ReactionUpdated {
        message_id: message.id,
        emoji,
        user_id,
        action,
        message,
    };
    typed_frame("reaction_updated", "data", &data)
}

/// The reactions of one stored message as kept in the state engine (compact JSON): the message
/// it belongs to (a record outlives neither its message nor the history log's epoch, but both
/// are checked when it is read) and the reactions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReactionRecord {
    /// The message these reactions belong to.
    pub id: Uuid,
    /// The history log's epoch when the record was written.
    pub epoch: u64,
    /// The reactions, as in the message.
    pub reactions: Reactions,
}

impl ReactionRecord {
    /// The record's stored form.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(self).map_err(Error::Encode)
    }

    /// Reads a stored record; `None` if it is not one.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

#[derive(Deserialize)]
struct Envelope<T> {
    data: T,
}

/// The message carried by a `message` frame (a history log entry); `None` if it is not one.
pub fn parse_message_frame(frame: &str) -> Option<ChatMessage> {
    serde_json::from_str::<Envelope<ChatMessage>>(frame)
        .ok()
        .map(|envelope| envelope.data)
}

/// The id of the message carried by a `message` frame, without reading the rest of it.
pub fn message_frame_id(frame: &str) -> Option<Uuid> {
    #[derive(Deserialize)]
    struct Id {
        id: Uuid,
    }
    serde_json::from_str::<Envelope<Id>>(frame)
        .ok()
        .map(|envelope| envelope.data.id)
}

/// `{"type":"error","data":{"error":text}}`.
pub fn error_frame(text: &str) -> Frame {
    typed_frame("error", "data", &ErrorData { error: text }).unwrap_or_else(|_| {
        Frame::from_static(r#"{"type":"error","data":{"error":"internal error"}}"#)
    })
}

/// Applies a reaction toggle by `user` to `message`: removes the user's `emoji` reaction if there
/// is one, otherwise adds it within `limits`. Removal always succeeds; a refused addition changes
/// nothing. Applying the same toggle twice restores the message exactly (same order), which is
/// how a caller undoes an addition that turned out too large. Lists are kept without spare
/// capacity so their heap is exactly what [`Reactions::heap_bytes`] reports.
pub fn toggle_reaction(
    message: &mut ChatMessage,
    emoji: &str,
    user: Uuid,
    limits: ReactionLimits,
) -> Result<ReactionAction, ReactionRefused> {
    let entries = &mut message.reactions.0;
    if let Some(slot) = entries.iter().position(|(e, _)| e == emoji) {
        let Some((_, users)) = entries.get_mut(slot) else {
            return Err(ReactionRefused::TooManyEmoji(limits.max_distinct));
        };
        if let Some(at) = users.iter().position(|u| *u == user) {
            users.remove(at);
            users.shrink_to_fit();
            if users.is_empty() {
                entries.remove(slot);
                entries.shrink_to_fit();
            }
            return Ok(ReactionAction::Removed);
        }
        if users.len() >= limits.max_users_per_emoji {
            return Err(ReactionRefused::TooManyUsers(limits.max_users_per_emoji));
        }
        users.reserve_exact(1);
        users.push(user);
        return Ok(ReactionAction::Added);
    }
    if entries.len() >= limits.max_distinct {
        return Err(ReactionRefused::TooManyEmoji(limits.max_distinct));
    }
    if limits.max_users_per_emoji == 0 {
        return Err(ReactionRefused::TooManyUsers(0));
    }
    entries.reserve_exact(1);
    entries.push((emoji.to_owned(), vec![user]));
    Ok(ReactionAction::Added)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> ChatMessage {
        ChatMessage {
            id: Uuid::nil(),
            text: "hi".into(),
            author_id: "a".into(),
            author_name: "Anonymous".into(),
            created_at: 0,
            reactions: Reactions::default(),
        }
    }

    #[test]
    fn parses_client_messages() {
        let parsed: ClientMessage =
            serde_json::from_str(r#"{"type":"send_message","data":{"text":"x"}}"#).unwrap();
        assert_eq!(
            parsed,
            ClientMessage::SendMessage(SendMessage {
                text: "x".into(),
                author_name: None
            })
        );
        let bad = [
            r#"{"type":"send_message","data":{"text":5}}"#,
            r#"{"type":"send_message","data":{}}"#,
            r#"{"type":"send_message"}"#,
            r#"{"type":"nope","data":{}}"#,
            r#"{"type":"add_reaction","data":{"message_id":"x"}}"#,
            r#"not json"#,
        ];
        for text in bad {
            assert!(
                serde_json::from_str::<ClientMessage>(text).is_err(),
                "{text}"
            );
        }
    }

    const ROOMY: ReactionLimits = ReactionLimits {
        max_distinct: 8,
        max_users_per_emoji: 8,
    };

    fn user(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn toggling_twice_removes_the_emoji_entirely() {
        let mut m = message();
        assert_eq!(
            toggle_reaction(&mut m, "👍", user(1), ROOMY),
            Ok(ReactionAction::Added)
        );
        assert_eq!(
            toggle_reaction(&mut m, "👍", user(2), ROOMY),
            Ok(ReactionAction::Added)
        );
        assert_eq!(m.reactions.get("👍"), Some(&[user(1), user(2)][..]));
        assert_eq!(
            toggle_reaction(&mut m, "👍", user(1), ROOMY),
            Ok(ReactionAction::Removed)
        );
        assert_eq!(
            toggle_reaction(&mut m, "👍", user(2), ROOMY),
            Ok(ReactionAction::Removed)
        );
        assert!(m.reactions.is_empty());
    }

    #[test]
    fn distinct_emoji_and_users_per_emoji_are_bounded() {
        let limits = ReactionLimits {
            max_distinct: 1,
            max_users_per_emoji: 2,
        };
        let mut m = message();
        assert!(toggle_reaction(&mut m, "a", user(1), limits).is_ok());
        assert_eq!(
            toggle_reaction(&mut m, "b", user(1), limits),
            Err(ReactionRefused::TooManyEmoji(1))
        );
        assert!(toggle_reaction(&mut m, "a", user(2), limits).is_ok());
        assert_eq!(
            toggle_reaction(&mut m, "a", user(3), limits),
            Err(ReactionRefused::TooManyUsers(2))
        );
        // Removing is never refused.
        assert_eq!(
            toggle_reaction(&mut m, "a", user(1), limits),
            Ok(ReactionAction::Removed)
        );
        assert_eq!(m.reactions.total(), 1);
    }

    #[test]
    fn a_second_identical_toggle_undoes_an_addition_exactly() {
        let mut m = message();
        toggle_reaction(&mut m, "a", user(1), ROOMY).unwrap();
        toggle_reaction(&mut m, "b", user(1), ROOMY).unwrap();
        let before = m.clone();
        let encoded = message_frame(&m).unwrap();
        for (emoji, who) in [("a", user(2)), ("c", user(2))] {
            toggle_reaction(&mut m, emoji, who, ROOMY).unwrap();
            toggle_reaction(&mut m, emoji, who, ROOMY).unwrap();
            assert_eq!(m, before);
            assert_eq!(message_frame(&m).unwrap().as_str(), encoded.as_str());
        }
    }

    #[test]
    fn lists_hold_no_spare_capacity() {
        let mut m = message();
        for n in 0..5 {
            toggle_reaction(&mut m, "a", user(n), ROOMY).unwrap();
            toggle_reaction(&mut m, &format!("e{n}"), user(n), ROOMY).unwrap();
        }
        toggle_reaction(&mut m, "a", user(0), ROOMY).unwrap();
        let exact = 6 * std::mem::size_of::<(String, Vec<Uuid>)>()
            + 1
            + 4 * 16
            + 5 * (2 + 16)
            + 6 * 2 * ALLOCATION_OVERHEAD;
        assert_eq!(m.reactions.heap_bytes(), exact);
    }

    #[test]
    fn frames_have_the_spec_shape() {
        let frame = reaction_frame(&message(), "👍", user(1), ReactionAction::Added).unwrap();
        let value: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
        assert_eq!(value["type"], "reaction_updated");
        assert_eq!(value["data"]["action"], "added");
        assert_eq!(value["data"]["message"]["reactions"], serde_json::json!({}));
        assert_eq!(
            error_frame("x").as_str(),
            r#"{"type":"error","data":{"error":"x"}}"#
        );
    }
}
