//! The wire format: parsing client frames and encoding server frames (sans-IO).
//!
//! Client → server: `request` (answered by a `response` with the same `id`), `ack` (of a server
//! event id) and client `event`s (`typing`). Server → client: `response`, `event` (numeric `id`,
//! acknowledged by the client) and `error` (for frames that are not a usable request).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_core::Frame;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Machine-readable error codes, in responses (`payload.error.code`) and error frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The frame is not a JSON object (error frame).
    InvalidJson,
    /// The frame's `type` is missing or not `request`, `ack` or `event` (error frame).
    UnknownType,
    /// A field is missing, has the wrong type or breaks a limit.
    BadRequest,
    /// The message or call named does not exist (or was deleted or forgotten).
    NotFound,
    /// The user may not do this (edit someone else's message, receipt for a message not to them).
    Forbidden,
    /// The request's `payloadType` is not one this server knows.
    UnknownPayloadType,
    /// The client event's `eventType` is not one this server knows (error frame).
    UnknownEventType,
    /// Too many requests or client events; retry later (with the same request id).
    RateLimited,
    /// A recipient's outbox, the server's total or the sending client's share of unacknowledged
    /// events is full (in events or bytes); nothing was stored or sent. Retry later with the same
    /// request id.
    OutboxFull,
    /// A server limit other than an outbox is reached: the user table, the client's share of
    /// users that never connected, or the protocol's memory budget. Nothing was done; retry later.
    LimitReached,
    /// The state engine cannot be reached now, or the same request id is still being answered
    /// on another socket; nothing was done. Retry later with the same request id.
    Unavailable,
    /// The server failed to encode its answer, or stored state could not be read (never
    /// expected).
    Internal,
}

/// An error answer: a code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiError {
    /// The machine-readable code.
    pub code: ErrorCode,
    /// What went wrong, for humans.
    pub message: String,
}

impl ApiError {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
}

// ---------------------------------------------------------------------------------------------
// Client → server

/// One parsed client frame.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Inbound {
    /// `{type:"request", id, payloadType, payload}`; `payload_type` is validated later so the
    /// error can be a response carrying the id.
    Request {
        id: String,
        payload_type: Option<String>,
        payload: Value,
    },
    /// `{type:"ack", id:"<n>"}` (a JSON number is accepted too).
    Ack { id: u64 },
    /// `{type:"event", eventType, payload}`.
    Event { event_type: String, payload: Value },
}

/// Parses a client frame; an `Err` is answered with an error frame.
pub(crate) fn parse(text: &str, max_id_bytes: usize) -> Result<Inbound, ApiError> {
    let Ok(Value::Object(mut object)) = serde_json::from_str::<Value>(text) else {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            "frame is not a JSON object",
        ));
    };
    let kind = match object.get("type") {
        Some(Value::String(kind)) => kind.clone(),
        Some(_) => {
            return Err(ApiError::new(
                ErrorCode::UnknownType,
                "`type` must be a string",
            ));
        }
        None => return Err(ApiError::new(ErrorCode::UnknownType, "missing `type`")),
    };
    let payload = object.remove("payload").unwrap_or(Value::Null);
    match kind.as_str() {
        "request" => {
            let id = match object.get("id") {
                Some(Value::String(id)) if !id.is_empty() && id.len() <= max_id_bytes => id.clone(),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "a request needs an `id`: a non-empty string of at most {max_id_bytes} bytes"
                    )));
                }
            };
            let payload_type = match object.get("payloadType") {
                Some(Value::String(kind)) => Some(kind.clone()),
                _ => None,
            };
            Ok(Inbound::Request {
                id,
                payload_type,
                payload,
            })
        }
        "ack" => {
            let id = match object.get("id") {
                Some(Value::String(id)) => id.trim().parse::<u64>().ok(),
                Some(Value::Number(id)) => id.as_u64(),
                _ => None,
            };
            let Some(id) = id else {
                return Err(ApiError::bad_request(
                    "an ack needs the event `id` as a string of digits, e.g. {\"type\":\"ack\",\"id\":\"23\"}",
                ));
            };
            Ok(Inbound::Ack { id })
        }
        "event" => match object.get("eventType") {
            Some(Value::String(event_type)) => Ok(Inbound::Event {
                event_type: event_type.clone(),
                payload,
            }),
            _ => Err(ApiError::new(
                ErrorCode::UnknownEventType,
                "a client event needs a string `eventType` (\"typing\")",
            )),
        },
        other => Err(ApiError::new(
            ErrorCode::UnknownType,
            format!("unknown frame type {other:?}; expected request, ack or event"),
        )),
    }
}

/// Decodes a request or client-event payload, turning serde's complaint into `BAD_REQUEST`.
pub(crate) fn payload<T: for<'de> Deserialize<'de>>(
    kind: &str,
    payload: Value,
) -> Result<T, ApiError> {
    serde_json::from_value(payload)
        .map_err(|e| ApiError::bad_request(format!("invalid `{kind}` payload: {e}")))
}

/// `new {chatId, message, clientMessageId?}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NewRequest {
    pub(crate) chat_id: String,
    pub(crate) message: String,
    #[serde(default)]
    pub(crate) client_message_id: Option<String>,
}

/// `edit {messageId, message}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EditRequest {
    pub(crate) message_id: u64,
    pub(crate) message: String,
}

/// `delete`, `dlvrd`, `read`: `{messageId}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MessageRef {
    pub(crate) message_id: u64,
}

/// `call {chatId, callType, direction, status?}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CallRequest {
    pub(crate) chat_id: String,
    pub(crate) call_type: CallType,
    pub(crate) direction: Direction,
    #[serde(default)]
    pub(crate) status: Option<CallStatus>,
}

/// `newCall {participants, callType}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NewCallRequest {
    pub(crate) participants: Vec<String>,
    pub(crate) call_type: CallType,
}

/// `closeCall {callId}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CloseCallRequest {
    pub(crate) call_id: String,
}

/// `history {chatId, before?, limit?}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HistoryRequest {
    pub(crate) chat_id: String,
    #[serde(default)]
    pub(crate) before: Option<u64>,
    #[serde(default)]
    pub(crate) limit: Option<usize>,
}

/// Client event `typing {chatId}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TypingRequest {
    pub(crate) chat_id: String,
}

/// `video` or `audio`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallType {
    /// A video call.
    Video,
    /// An audio call.
    Audio,
}

/// `incoming` or `outgoing`, as the requester states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The call came in.
    Incoming,
    /// The call went out.
    Outgoing,
}

/// `missed` or `received`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallStatus {
    /// Nobody answered.
    Missed,
    /// The call was answered.
    Received,
}

// ---------------------------------------------------------------------------------------------
// Server → client

/// A server event and its payload. Serialized as `"eventType": ..., "payload": {...}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "eventType", content = "payload", rename_all = "camelCase")]
pub(crate) enum ServerEvent {
    New(NewEvent),
    Edit(EditEvent),
    Delete(DeleteEvent),
    Dlvrd(ReceiptEvent),
    Read(ReceiptEvent),
    Call(CallEvent),
    NewCall(CallStored),
    CloseCall(CallStored),
    Typing(TypingEvent),
    Online(PresenceEvent),
    Offline(PresenceEvent),
}

impl ServerEvent {
    /// Ephemeral events go to sockets connected now and are never redelivered.
    pub(crate) fn is_ephemeral(&self) -> bool {
        matches!(self, Self::Typing(_) | Self::Online(_) | Self::Offline(_))
    }
}

/// Whether an encoded event frame (from [`event_frame`]) carries an ephemeral event. Ephemeral
/// events take their id from a user's outbox log as transient entries, which are never stored;
/// should one ever be read from an outbox anyway, it must not be redelivered. The envelope is ours and its fields come in a
/// fixed order (`type`, `timestamp`, `id`: none of them strings a client controls), so the first
/// `"eventType":"` is the envelope's own.
pub(crate) fn is_ephemeral_frame(text: &str) -> bool {
    const MARK: &str = "\"eventType\":\"";
    let Some(at) = text.find(MARK) else {
        return false;
    };
    let rest = text.get(at.saturating_add(MARK.len())..).unwrap_or("");
    ["typing\"", "online\"", "offline\""]
        .iter()
        .any(|kind| rest.starts_with(kind))
}

/// Event `new`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NewEvent {
    pub(crate) message_id: u64,
    pub(crate) from: String,
    /// The conversation as the recipient sees it: the sender.
    pub(crate) chat_id: String,
    pub(crate) message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) client_message_id: Option<String>,
    pub(crate) timestamp: u64,
}

/// Event `edit`: the new text plus the EditPayload.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EditEvent {
    pub(crate) message_id: u64,
    pub(crate) from: String,
    pub(crate) chat_id: String,
    pub(crate) message: String,
    pub(crate) original_message_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) original_client_message_id: Option<String>,
    pub(crate) timestamp: u64,
}

/// Event `delete`: the DeletionPayload plus who and where.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DeleteEvent {
    pub(crate) message_id: u64,
    pub(crate) from: String,
    pub(crate) chat_id: String,
    pub(crate) original_message_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) original_client_message_id: Option<String>,
}

/// Events `dlvrd` and `read`, to the message's author; `chatId` is the recipient.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ReceiptEvent {
    pub(crate) message_id: u64,
    pub(crate) chat_id: String,
}

/// Event `call`: a call message (CallPayload).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CallEvent {
    pub(crate) message_id: u64,
    pub(crate) from: String,
    pub(crate) chat_id: String,
    pub(crate) call_type: CallType,
    pub(crate) direction: Direction,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<CallStatus>,
    pub(crate) timestamp: u64,
}

/// CallStoredPayload: events `newCall` / `closeCall` and their responses.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CallStored {
    pub(crate) call_id: String,
    pub(crate) caller: String,
    pub(crate) participants: Vec<String>,
    pub(crate) call_type: CallType,
    /// Seconds; 0 until the call is closed.
    pub(crate) call_duration: u64,
}

/// Event `typing`: `chatId` is the user typing.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TypingEvent {
    pub(crate) chat_id: String,
}

/// Events `online` / `offline`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PresenceEvent {
    pub(crate) user_id: String,
}

/// `{type:"event", timestamp, id, eventType, payload}`.
pub(crate) fn event_frame(
    id: u64,
    timestamp: u64,
    event: &ServerEvent,
) -> Result<Frame, switchboard_core::Error> {
    #[derive(Serialize)]
    struct Envelope<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        timestamp: u64,
        id: u64,
        #[serde(flatten)]
        event: &'a ServerEvent,
    }
    Frame::json(&Envelope {
        kind: "event",
        timestamp,
        id,
        event,
    })
}

/// One event encoded once for many recipients (a fan-out, or the retries of one append): only
/// the id differs between its frames, so each is the encoded text around the id with the id's
/// digits in between, byte for byte what [`event_frame`] gives, without serializing again.
#[derive(Debug, Clone)]
pub(crate) struct EventTemplate {
    /// Everything up to and including `"id":`, and everything after the id's digits; `None`
    /// if the id could not be found (never with our envelope): then each frame is encoded.
    parts: Option<(String, String)>,
    timestamp: u64,
    event: ServerEvent,
    /// The frame with the widest id: an upper bound of every frame's length.
    widest: Frame,
}

impl EventTemplate {
    /// `event` at `timestamp`, for any id.
    pub(crate) fn new(
        timestamp: u64,
        event: &ServerEvent,
    ) -> Result<Self, switchboard_core::Error> {
        // The envelope's fields come in a fixed order (`type`, `timestamp`, `id`, then the
        // event's), none of the first three a string a client controls, and a client's text
        // cannot hold an unescaped `"`: so the first match is the envelope's id.
        const ID: &str = ",\"id\":18446744073709551615,";
        let widest = event_frame(u64::MAX, timestamp, event)?;
        let parts = widest
            .as_str()
            .split_once(ID)
            .map(|(head, tail)| (format!("{head},\"id\":"), format!(",{tail}")));
        Ok(Self {
            parts,
            timestamp,
            event: event.clone(),
            widest,
        })
    }

    /// The longest frame this template gives (the one with the widest id).
    pub(crate) fn max_len(&self) -> usize {
        self.widest.len()
    }

    /// The frame for event id `id`.
    pub(crate) fn frame(&self, id: u64) -> Result<Frame, switchboard_core::Error> {
        let Some((head, tail)) = &self.parts else {
            return event_frame(id, self.timestamp, &self.event);
        };
        Ok(joined(head, id, &[tail]))
    }
}

/// The frame `head`, the digits of `id`, then `after`, allocated at its exact size: a frame
/// made from a `String` with spare capacity costs the frame's buffer a second allocation (its
/// shared header), and a fan-out makes one frame per recipient.
fn joined(head: &str, id: u64, after: &[&str]) -> Frame {
    use std::fmt::Write as _;
    let digits = id.checked_ilog10().map_or(1, |log| log.saturating_add(1));
    let len = after.iter().fold(
        head.len()
            .saturating_add(usize::try_from(digits).unwrap_or(usize::MAX)),
        |len, part| len.saturating_add(part.len()),
    );
    let mut text = String::with_capacity(len);
    text.push_str(head);
    // Writing to a String cannot fail.
    let _ = write!(text, "{id}");
    for part in after {
        text.push_str(part);
    }
    Frame::text(text)
}

/// The roster a newcomer gets: one `online {userId}` per user online, each with its own id,
/// encoded from one template (only the id and the name differ between them).
#[derive(Debug, Clone)]
pub(crate) struct RosterTemplate {
    /// Everything up to `"id":`, and from after the id up to the name's opening quote
    /// (exclusive); `None` if the template could not be split (never with our envelope).
    parts: Option<(String, String)>,
    timestamp: u64,
}

impl RosterTemplate {
    /// What follows the user id in an `online` frame.
    const END: &str = "}}";

    /// Roster events at `timestamp`.
    pub(crate) fn new(timestamp: u64) -> Result<Self, switchboard_core::Error> {
        let empty = ServerEvent::Online(PresenceEvent {
            user_id: String::new(),
        });
        let parts = EventTemplate::new(timestamp, &empty)?
            .parts
            .and_then(|(head, tail)| {
                // The empty name is the last thing before the end: `..."userId":""}}`.
                let middle = tail.strip_suffix(Self::END)?.strip_suffix("\"\"")?;
                Some((head, middle.to_owned()))
            });
        Ok(Self { parts, timestamp })
    }

    /// `online {userId: user}` as event `id`.
    pub(crate) fn frame(&self, id: u64, user: &str) -> Result<Frame, switchboard_core::Error> {
        let Some((head, middle)) = &self.parts else {
            let event = ServerEvent::Online(PresenceEvent {
                user_id: user.to_owned(),
            });
            return event_frame(id, self.timestamp, &event);
        };
        let name = serde_json::to_string(user).map_err(switchboard_core::Error::Encode)?;
        Ok(joined(head, id, &[middle, &name, Self::END]))
    }
}

/// `{type:"response", timestamp, id, payload}`.
pub(crate) fn response_frame(
    id: &str,
    timestamp: u64,
    payload: &Value,
) -> Result<Frame, switchboard_core::Error> {
    #[derive(Serialize)]
    struct Envelope<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        timestamp: u64,
        id: &'a str,
        payload: &'a Value,
    }
    Frame::json(&Envelope {
        kind: "response",
        timestamp,
        id,
        payload,
    })
}

/// A response payload for a failed request: `{error:{code, message}}`.
pub(crate) fn error_payload(error: &ApiError) -> Value {
    serde_json::json!({ "error": error })
}

/// `{type:"error", timestamp, payload:{code, message}}`.
pub(crate) fn error_frame(
    error: &ApiError,
    timestamp: u64,
) -> Result<Frame, switchboard_core::Error> {
    Frame::json(&serde_json::json!({
        "type": "error",
        "timestamp": timestamp,
        "payload": error,
    }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn value(frame: &Frame) -> Value {
        serde_json::from_str(frame.as_str()).unwrap()
    }

    #[test]
    fn parses_requests_acks_and_events() {
        let request = parse(
            r#"{"type":"request","timestamp":1,"id":"r1","payloadType":"new","payload":{"chatId":"b","message":"hi"}}"#,
            128,
        )
        .unwrap();
        assert_eq!(
            request,
            Inbound::Request {
                id: "r1".into(),
                payload_type: Some("new".into()),
                payload: json!({"chatId":"b","message":"hi"}),
            }
        );
        assert_eq!(
            parse(r#"{"type":"ack","id":"23"}"#, 128).unwrap(),
            Inbound::Ack { id: 23 }
        );
        assert_eq!(
            parse(r#"{"type":"ack","id":23}"#, 128).unwrap(),
            Inbound::Ack { id: 23 }
        );
        assert_eq!(
            parse(
                r#"{"type":"event","eventType":"typing","payload":{"chatId":"b"}}"#,
                128
            )
            .unwrap(),
            Inbound::Event {
                event_type: "typing".into(),
                payload: json!({"chatId":"b"}),
            }
        );
    }

    #[test]
    fn rejects_frames_that_are_not_usable() {
        let code = |text: &str| parse(text, 8).unwrap_err().code;
        assert_eq!(code("not json"), ErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ErrorCode::InvalidJson);
        assert_eq!(code(r#"{"id":"1"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":7}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"hello"}"#), ErrorCode::UnknownType);
        assert_eq!(
            code(r#"{"type":"request","payloadType":"new"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(code(r#"{"type":"request","id":""}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"type":"request","id":"123456789"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(code(r#"{"type":"ack","id":"x"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":"ack","id":-1}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":"event"}"#), ErrorCode::UnknownEventType);
    }

    #[test]
    fn a_request_without_payload_type_is_answered_later() {
        let parsed = parse(r#"{"type":"request","id":"r"}"#, 8).unwrap();
        assert!(matches!(
            parsed,
            Inbound::Request {
                payload_type: None,
                ..
            }
        ));
    }

    #[test]
    fn events_are_enveloped_with_a_numeric_id() {
        let event = ServerEvent::New(NewEvent {
            message_id: 5,
            from: "a".into(),
            chat_id: "a".into(),
            message: "hi".into(),
            client_message_id: None,
            timestamp: 7,
        });
        let frame = event_frame(23, 9, &event).unwrap();
        assert_eq!(
            value(&frame),
            json!({"type":"event","timestamp":9,"id":23,"eventType":"new",
                   "payload":{"messageId":5,"from":"a","chatId":"a","message":"hi","timestamp":7}})
        );
        let typing = ServerEvent::Typing(TypingEvent {
            chat_id: "a".into(),
        });
        assert!(typing.is_ephemeral());
        assert!(!event.is_ephemeral());
        let typing_frame = event_frame(1, 1, &typing).unwrap();
        let v = value(&typing_frame);
        assert_eq!(v["eventType"], "typing");
        assert!(is_ephemeral_frame(typing_frame.as_str()));
        assert!(!is_ephemeral_frame(frame.as_str()));
        let sneaky = ServerEvent::New(NewEvent {
            message_id: 5,
            from: "a".into(),
            chat_id: "a".into(),
            message: r#""eventType":"typing""#.into(),
            client_message_id: None,
            timestamp: 7,
        });
        let sneaky = event_frame(3, 9, &sneaky).unwrap();
        assert!(
            !is_ephemeral_frame(sneaky.as_str()),
            "text a client chose cannot make an event look ephemeral"
        );
        let online = ServerEvent::Online(PresenceEvent {
            user_id: "typing".into(),
        });
        assert!(is_ephemeral_frame(
            event_frame(4, 1, &online).unwrap().as_str()
        ));
        let close = ServerEvent::CloseCall(CallStored {
            call_id: "c".into(),
            caller: "a".into(),
            participants: vec!["b".into()],
            call_type: CallType::Video,
            call_duration: 3,
        });
        let v = value(&event_frame(2, 1, &close).unwrap());
        assert_eq!(v["eventType"], "closeCall");
        assert_eq!(v["payload"]["callDuration"], 3);
        assert_eq!(v["payload"]["callType"], "video");
    }

    #[test]
    fn responses_and_errors_have_the_documented_shape() {
        let ok = response_frame("r1", 5, &json!({"messageId": 5})).unwrap();
        assert_eq!(
            value(&ok),
            json!({"type":"response","timestamp":5,"id":"r1","payload":{"messageId":5}})
        );
        let error = ApiError::new(ErrorCode::OutboxFull, "full");
        assert_eq!(
            error_payload(&error),
            json!({"error":{"code":"OUTBOX_FULL","message":"full"}})
        );
        let frame = error_frame(&ApiError::new(ErrorCode::UnknownPayloadType, "x"), 1).unwrap();
        assert_eq!(
            value(&frame),
            json!({"type":"error","timestamp":1,"payload":{"code":"UNKNOWN_PAYLOAD_TYPE","message":"x"}})
        );
    }

    #[test]
    fn call_payloads_accept_only_the_documented_values() {
        let ok: CallRequest = payload(
            "call",
            json!({"chatId":"b","callType":"audio","direction":"outgoing","status":"missed"}),
        )
        .unwrap();
        assert_eq!(ok.call_type, CallType::Audio);
        assert_eq!(ok.status, Some(CallStatus::Missed));
        let err = payload::<CallRequest>(
            "call",
            json!({"chatId":"b","callType":"hologram","direction":"outgoing"}),
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
    }

    #[test]
    fn a_template_gives_the_same_bytes_as_encoding_each_frame() {
        let sneaky = r#"x","id":18446744073709551615,"eventType":"y"#;
        let events = [
            ServerEvent::Online(PresenceEvent {
                user_id: "alice".into(),
            }),
            ServerEvent::Offline(PresenceEvent {
                user_id: sneaky.into(),
            }),
            ServerEvent::Typing(TypingEvent {
                chat_id: "bob".into(),
            }),
            ServerEvent::New(NewEvent {
                message_id: 5,
                from: sneaky.into(),
                chat_id: "c".into(),
                message: sneaky.into(),
                client_message_id: Some(sneaky.into()),
                timestamp: 18_446_744_073_709_551_615,
            }),
        ];
        for event in &events {
            for timestamp in [0, 1_700_000_000_000, u64::MAX] {
                let template = EventTemplate::new(timestamp, event).unwrap();
                assert!(template.parts.is_some(), "the id is found");
                for id in [0, 1, 9, 10, 12_345, u64::MAX - 1, u64::MAX] {
                    let expected = event_frame(id, timestamp, event).unwrap();
                    assert_eq!(template.frame(id).unwrap(), expected);
                    assert!(expected.len() <= template.max_len());
                }
            }
        }
        for timestamp in [0, 1_700_000_000_000, u64::MAX] {
            let roster = RosterTemplate::new(timestamp).unwrap();
            assert!(roster.parts.is_some(), "the template splits");
            for user in ["alice", "", sneaky, "é\u{1F600}\\\"}}\n\u{0}"] {
                for id in [0, 7, u64::MAX] {
                    let event = ServerEvent::Online(PresenceEvent {
                        user_id: user.into(),
                    });
                    let expected = event_frame(id, timestamp, &event).unwrap();
                    assert_eq!(roster.frame(id, user).unwrap(), expected);
                }
            }
        }
    }
}
