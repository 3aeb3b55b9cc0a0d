//! The wire: `{"type": "...", "data": {...}}` frames in both directions (sans-IO).
//!
//! Incoming frames are parsed in two steps so the protocol can answer `UNAUTHORIZED` before it
//! looks at a payload: [`parse_envelope`] reads the type, [`parse_body`] validates the payload of
//! a known type and sanitizes its text fields.

use serde::Serialize;
use serde_json::{Map, Value};
use switchboard_core::Frame;
use switchboard_core::envelope::typed_frame;
use tracing::error;
use uuid::Uuid;

use crate::sanitize::{self, FieldError};

/// The client message types this server understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `HELLO`: identify this socket.
    Hello,
    /// `OPEN_CHAT`: open a one-to-one chat.
    OpenChat,
    /// `MSG`: send a chat message.
    Msg,
    /// `MSG_ACK`: the client received a message.
    MsgAck,
    /// `TYPING`: typing indicator.
    Typing,
    /// `PING`: heartbeat.
    Ping,
}

impl Kind {
    fn from_wire(kind: &str) -> Option<Self> {
        Some(match kind {
            "HELLO" => Self::Hello,
            "OPEN_CHAT" => Self::OpenChat,
            "MSG" => Self::Msg,
            "MSG_ACK" => Self::MsgAck,
            "TYPING" => Self::Typing,
            "PING" => Self::Ping,
            _ => return None,
        })
    }

    /// Whether a socket may send this before a valid HELLO.
    pub fn allowed_before_hello(self) -> bool {
        matches!(self, Self::Hello | Self::Ping)
    }
}

/// A validated, sanitized client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    /// `HELLO {user_id, display_name}`.
    Hello {
        /// The user's id (UUID v4).
        user_id: Uuid,
        /// Display name, tags stripped and trimmed.
        display_name: String,
    },
    /// `OPEN_CHAT {target_user_id}`; `target_display_name` is accepted and ignored (the server
    /// answers with the name the target gave in its own HELLO).
    OpenChat {
        /// The other participant.
        target: Uuid,
    },
    /// `MSG {to, content, message_id?}`.
    Msg {
        /// The recipient.
        to: Uuid,
        /// Content, tags stripped.
        content: String,
        /// The client's idempotency key, if it sent one.
        message_id: Option<String>,
    },
    /// `MSG_ACK {message_id}` from a recipient.
    MsgAck {
        /// The acknowledged message.
        message_id: String,
    },
    /// `TYPING {is_typing}`.
    Typing {
        /// Whether the user is typing.
        is_typing: bool,
    },
    /// `PING`.
    Ping,
}

/// Why a frame was refused with `VALIDATION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The field at fault, when there is one.
    pub field: Option<&'static str>,
    /// What is wrong, naming the field.
    pub message: String,
}

impl Invalid {
    fn frame(message: impl Into<String>) -> Self {
        Self {
            field: None,
            message: message.into(),
        }
    }
}

impl From<FieldError> for Invalid {
    fn from(error: FieldError) -> Self {
        Self {
            field: Some(error.field),
            message: error.message,
        }
    }
}

/// Reads the envelope: a JSON object with a known string `type` and an object `data` (a missing
/// or `null` `data` counts as `{}`).
pub fn parse_envelope(text: &str) -> Result<(Kind, Map<String, Value>), Invalid> {
    let value: Value = serde_json::from_str(text)
        .map_err(|error| Invalid::frame(format!("malformed JSON: {error}")))?;
    let Value::Object(mut object) = value else {
        return Err(Invalid::frame("a frame must be a JSON object"));
    };
    let kind = match object.get("type") {
        Some(Value::String(kind)) => kind,
        Some(_) => return Err(FieldError::new("type", "type must be a string").into()),
        None => return Err(FieldError::new("type", "type is required").into()),
    };
    let Some(kind) = Kind::from_wire(kind) else {
        let shown: String = kind.chars().take(40).collect();
        return Err(FieldError::new("type", format!("unknown type {shown:?}")).into());
    };
    let data = match object.remove("data") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(data)) => data,
        Some(_) => return Err(FieldError::new("data", "data must be an object").into()),
    };
    Ok((kind, data))
}

fn optional_str<'a>(
    data: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, FieldError> {
    match data.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) => Ok(Some(value)),
        Some(_) => Err(FieldError::new(field, format!("{field} must be a string"))),
    }
}

fn required_str<'a>(
    data: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, FieldError> {
    optional_str(data, field)?.ok_or_else(|| FieldError::new(field, format!("{field} is required")))
}

/// Validates and sanitizes the payload of a frame of type `kind`.
pub fn parse_body(kind: Kind, data: &Map<String, Value>) -> Result<ClientMessage, Invalid> {
    Ok(match kind {
        Kind::Hello => ClientMessage::Hello {
            user_id: sanitize::parse_user_id("user_id", required_str(data, "user_id")?)?,
            display_name: sanitize::display_name(required_str(data, "display_name")?)?,
        },
        Kind::OpenChat => ClientMessage::OpenChat {
            target: sanitize::parse_user_id(
                "target_user_id",
                required_str(data, "target_user_id")?,
            )?,
        },
        Kind::Msg => ClientMessage::Msg {
            to: sanitize::parse_user_id("to", required_str(data, "to")?)?,
            content: sanitize::content(required_str(data, "content")?)?,
            message_id: optional_str(data, "message_id")?
                .map(sanitize::message_id)
                .transpose()?,
        },
        Kind::MsgAck => ClientMessage::MsgAck {
            message_id: sanitize::message_id(required_str(data, "message_id")?)?,
        },
        Kind::Typing => match data.get("is_typing") {
            Some(Value::Bool(is_typing)) => ClientMessage::Typing {
                is_typing: *is_typing,
            },
            None | Some(Value::Null) => {
                return Err(FieldError::new("is_typing", "is_typing is required").into());
            }
            Some(_) => {
                return Err(FieldError::new("is_typing", "is_typing must be a boolean").into());
            }
        },
        Kind::Ping => ClientMessage::Ping,
    })
}

/// Error codes of `ERROR` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame or a field is invalid.
    Validation,
    /// The message was not accepted (the recipient's offline queue is full).
    MessageFailed,
    /// The user never said HELLO (or was forgotten).
    UserNotFound,
    /// No chat is open with the recipient.
    ChatNotOpened,
    /// A rate limit (or the open-chat limit) is reached.
    RateLimited,
    /// HELLO first (or the server has no room for another user).
    Unauthorized,
}

impl ErrorCode {
    /// The wire form, e.g. `VALIDATION`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validation => "VALIDATION",
            Self::MessageFailed => "MESSAGE_FAILED",
            Self::UserNotFound => "USER_NOT_FOUND",
            Self::ChatNotOpened => "CHAT_NOT_OPENED",
            Self::RateLimited => "RATE_LIMITED",
            Self::Unauthorized => "UNAUTHORIZED",
        }
    }
}

/// `HELLO_ACK` payload.
#[derive(Debug, Serialize)]
pub struct HelloAck<'a> {
    /// The canonical (lower-case) user id.
    pub user_id: &'a str,
    /// Always `connected`.
    pub status: &'static str,
}

/// One entry of `PRESENCE`.
#[derive(Debug, Clone, Serialize)]
pub struct PresenceUser {
    /// User id.
    pub user_id: String,
    /// Latest display name.
    pub display_name: String,
    /// Whether the user has a connected socket.
    pub online: bool,
    /// In a delta only: the user was forgotten and should be dropped from the list. Omitted
    /// when `false`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

/// `PRESENCE` payload.
#[derive(Debug, Serialize)]
pub struct Presence {
    /// The full list (every known user, in the order they first said HELLO), or in a delta only
    /// the users that changed, each with their current state.
    pub users: Vec<PresenceUser>,
    /// `true` for a delta, to be merged into the list the client holds (upsert by `user_id`,
    /// drop entries with `removed`); omitted for the full list.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub delta: bool,
}

/// `CHAT_OPENED` payload, from the point of view of the recipient.
#[derive(Debug, Serialize)]
pub struct ChatOpened<'a> {
    /// Deterministic chat id (the same whoever opens it).
    pub chat_id: &'a str,
    /// Both participants, sorted.
    pub participants: [&'a str; 2],
    /// The other participant.
    pub target_user_id: &'a str,
    /// The other participant's display name.
    pub target_display_name: &'a str,
}

/// Incoming `MSG` payload as delivered to a recipient.
#[derive(Debug, Clone, Serialize)]
pub struct Msg<'a> {
    /// Sender.
    pub from: &'a str,
    /// Recipient.
    pub to: &'a str,
    /// Sanitized content.
    pub content: &'a str,
    /// The client's message id, or a server-made UUID.
    pub message_id: &'a str,
    /// When the server accepted the message (ISO 8601 UTC).
    pub timestamp: &'a str,
}

/// `MSG_ACK` payload.
#[derive(Debug, Serialize)]
pub struct MsgAck<'a> {
    /// The acknowledged message.
    pub message_id: &'a str,
    /// `sent` or `delivered`.
    pub status: &'static str,
}

/// Outgoing `TYPING` payload.
#[derive(Debug, Serialize)]
pub struct Typing<'a> {
    /// Who is typing.
    pub user_id: &'a str,
    /// Whether they are.
    pub is_typing: bool,
}

/// `PONG` payload.
#[derive(Debug, Serialize)]
pub struct Pong<'a> {
    /// Server time (ISO 8601 UTC).
    pub timestamp: &'a str,
}

/// `ERROR` payload.
#[derive(Debug, Serialize)]
pub struct ErrorPayload<'a> {
    /// One of the [`ErrorCode`]s.
    pub code: &'static str,
    /// What went wrong.
    pub message: &'a str,
    /// Machine-readable context (`field`, `message_id`, `limit`, ...); `{}` when there is none.
    pub details: Value,
}

/// Encodes `{"type": kind, "data": payload}`. Encoding our own types cannot fail in practice; if
/// it does, the failure is logged and nothing is sent.
pub fn frame<T: Serialize + ?Sized>(kind: &str, payload: &T) -> Option<Frame> {
    match typed_frame(kind, "data", payload) {
        Ok(frame) => Some(frame),
        Err(err) => {
            error!(kind, error = %err, "could not encode a frame");
            None
        }
    }
}

/// An `ERROR` frame.
pub fn error_frame(code: ErrorCode, message: &str, details: Value) -> Option<Frame> {
    frame(
        "ERROR",
        &ErrorPayload {
            code: code.as_str(),
            message,
            details,
        },
    )
}

/// The current time as ISO 8601 UTC with milliseconds, e.g. `2024-01-01T12:00:00.000Z`.
pub fn now_iso8601() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ID: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

    fn parse(value: Value) -> Result<ClientMessage, Invalid> {
        let (kind, data) = parse_envelope(&value.to_string())?;
        parse_body(kind, &data)
    }

    #[test]
    fn malformed_frames_are_invalid_without_a_field() {
        for text in ["{", "[1]", "\"HELLO\"", "null", ""] {
            let error = parse_envelope(text).unwrap_err();
            assert_eq!(error.field, None, "{text}");
        }
    }

    #[test]
    fn the_type_must_be_known() {
        assert_eq!(
            parse_envelope(r#"{"data":{}}"#).unwrap_err().field,
            Some("type")
        );
        assert_eq!(
            parse_envelope(r#"{"type":1}"#).unwrap_err().field,
            Some("type")
        );
        let error = parse_envelope(r#"{"type":"NOPE"}"#).unwrap_err();
        assert_eq!(error.field, Some("type"));
        assert!(error.message.contains("NOPE"));
        assert_eq!(
            parse_envelope(r#"{"type":"PING","data":3}"#)
                .unwrap_err()
                .field,
            Some("data")
        );
        assert_eq!(parse(json!({"type": "PING"})), Ok(ClientMessage::Ping));
    }

    #[test]
    fn hello_is_validated_and_sanitized() {
        let hello = parse(
            json!({"type": "HELLO", "data": {"user_id": ID, "display_name": " <b>Ann</b> "}}),
        );
        assert_eq!(
            hello,
            Ok(ClientMessage::Hello {
                user_id: Uuid::parse_str(ID).unwrap(),
                display_name: "Ann".into()
            })
        );
        let missing = parse(json!({"type": "HELLO", "data": {"display_name": "Ann"}})).unwrap_err();
        assert_eq!(missing.field, Some("user_id"));
        let wrong = parse(json!({"type": "HELLO", "data": {"user_id": 7, "display_name": "Ann"}}))
            .unwrap_err();
        assert_eq!(wrong.field, Some("user_id"));
        let short = parse(json!({"type": "HELLO", "data": {"user_id": ID, "display_name": "An"}}))
            .unwrap_err();
        assert_eq!(short.field, Some("display_name"));
    }

    #[test]
    fn msg_fields_are_checked() {
        let ok =
            parse(json!({"type": "MSG", "data": {"to": ID, "content": "hi", "message_id": "m1"}}));
        assert!(matches!(ok, Ok(ClientMessage::Msg { message_id: Some(ref m), .. }) if m == "m1"));
        let no_id =
            parse(json!({"type": "MSG", "data": {"to": ID, "content": "hi", "message_id": null}}));
        assert!(matches!(
            no_id,
            Ok(ClientMessage::Msg {
                message_id: None,
                ..
            })
        ));
        let bad_to =
            parse(json!({"type": "MSG", "data": {"to": "x", "content": "hi"}})).unwrap_err();
        assert_eq!(bad_to.field, Some("to"));
        let bad_id =
            parse(json!({"type": "MSG", "data": {"to": ID, "content": "hi", "message_id": 5}}))
                .unwrap_err();
        assert_eq!(bad_id.field, Some("message_id"));
        let typing = parse(json!({"type": "TYPING", "data": {"is_typing": "yes"}})).unwrap_err();
        assert_eq!(typing.field, Some("is_typing"));
        let ack = parse(json!({"type": "MSG_ACK", "data": {}})).unwrap_err();
        assert_eq!(ack.field, Some("message_id"));
    }

    #[test]
    fn error_frames_have_code_message_and_details() {
        let frame = error_frame(ErrorCode::ChatNotOpened, "no chat", json!({})).unwrap();
        let value: Value = serde_json::from_str(frame.as_str()).unwrap();
        assert_eq!(
            value,
            json!({"type": "ERROR", "data": {"code": "CHAT_NOT_OPENED", "message": "no chat", "details": {}}})
        );
    }

    #[test]
    fn presence_deltas_are_marked_and_the_full_list_is_the_specs_frame() {
        let entry = |removed| PresenceUser {
            user_id: ID.into(),
            display_name: "Ann".into(),
            online: false,
            removed,
        };
        let full = frame(
            "PRESENCE",
            &Presence {
                users: vec![entry(false)],
                delta: false,
            },
        )
        .unwrap();
        let value: Value = serde_json::from_str(full.as_str()).unwrap();
        assert_eq!(
            value,
            json!({"type": "PRESENCE", "data": {"users": [{"user_id": ID, "display_name": "Ann", "online": false}]}})
        );
        let delta = frame(
            "PRESENCE",
            &Presence {
                users: vec![entry(true)],
                delta: true,
            },
        )
        .unwrap();
        let value: Value = serde_json::from_str(delta.as_str()).unwrap();
        assert_eq!(value["data"]["delta"], true);
        assert_eq!(value["data"]["users"][0]["removed"], true);
    }

    #[test]
    fn timestamps_are_utc_iso8601() {
        let now = now_iso8601();
        assert!(now.ends_with('Z'), "{now}");
        assert!(chrono::DateTime::parse_from_rfc3339(&now).is_ok());
    }
}
