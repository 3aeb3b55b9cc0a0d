//! The ip-chat wire format: `{"type": ..., "data": {...}}` both ways.

use std::collections::BTreeMap;

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

/// A stored chat message, as sent in `message` frames.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
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
    pub reactions: BTreeMap<String, Vec<String>>,
}

/// Whether a toggle added or removed a reaction.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReactionAction {
    /// The user had not reacted with this emoji; now they have.
    Added,
    /// The user had reacted with this emoji; now they have not.
    Removed,
}

#[derive(Serialize)]
struct ReactionUpdated<'a> {
    message_id: Uuid,
    emoji: &'a str,
    user_id: &'a str,
    action: ReactionAction,
    message: &'a ChatMessage,
}

#[derive(Serialize)]
struct ErrorData<'a> {
    error: &'a str,
}

/// `{"type":"message","data":message}`.
pub fn message_frame(message: &ChatMessage) -> Result<Frame, Error> {
    typed_frame("message", "data", message)
}

/// `{"type":"reaction_updated","data":{...}}` carrying the full updated message.
pub fn reaction_frame(
    message: &ChatMessage,
    emoji: &str,
    user_id: &str,
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

/// `{"type":"error","data":{"error":text}}`.
pub fn error_frame(text: &str) -> Frame {
    typed_frame("error", "data", &ErrorData { error: text }).unwrap_or_else(|_| {
        Frame::from_static(r#"{"type":"error","data":{"error":"internal error"}}"#)
    })
}

/// Applies a reaction toggle by `user_id` to `message`. Returns `None` (and changes nothing) when
/// adding a new emoji would exceed `max_distinct` emoji on the message.
pub fn toggle_reaction(
    message: &mut ChatMessage,
    emoji: &str,
    user_id: &str,
    max_distinct: usize,
) -> Option<ReactionAction> {
    if let Some(users) = message.reactions.get_mut(emoji) {
        if let Some(at) = users.iter().position(|u| u == user_id) {
            users.remove(at);
            if users.is_empty() {
                message.reactions.remove(emoji);
            }
            return Some(ReactionAction::Removed);
        }
        users.push(user_id.to_owned());
        return Some(ReactionAction::Added);
    }
    if message.reactions.len() >= max_distinct {
        return None;
    }
    message
        .reactions
        .insert(emoji.to_owned(), vec![user_id.to_owned()]);
    Some(ReactionAction::Added)
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
            reactions: BTreeMap::new(),
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

    #[test]
    fn toggling_twice_removes_the_emoji_entirely() {
        let mut m = message();
        assert_eq!(
            toggle_reaction(&mut m, "👍", "u1", 8),
            Some(ReactionAction::Added)
        );
        assert_eq!(
            toggle_reaction(&mut m, "👍", "u2", 8),
            Some(ReactionAction::Added)
        );
        assert_eq!(m.reactions["👍"], ["u1", "u2"]);
        assert_eq!(
            toggle_reaction(&mut m, "👍", "u1", 8),
            Some(ReactionAction::Removed)
        );
        assert_eq!(
            toggle_reaction(&mut m, "👍", "u2", 8),
            Some(ReactionAction::Removed)
        );
        assert!(m.reactions.is_empty());
    }

    #[test]
    fn distinct_emoji_are_bounded() {
        let mut m = message();
        assert!(toggle_reaction(&mut m, "a", "u", 1).is_some());
        assert!(toggle_reaction(&mut m, "b", "u", 1).is_none());
        assert!(toggle_reaction(&mut m, "a", "v", 1).is_some());
    }

    #[test]
    fn frames_have_the_spec_shape() {
        let frame = reaction_frame(&message(), "👍", "u", ReactionAction::Added).unwrap();
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
