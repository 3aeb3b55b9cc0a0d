//! The wire: `{"type": ..., "payload": {...}}` frames in both directions. Sans-IO.

use std::borrow::Cow;

use serde::de;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use switchboard_core::Frame;
use switchboard_core::envelope::typed_frame;

use crate::ot::Operation;

/// Longest `userId`, in characters.
pub const MAX_USER_ID_CHARS: usize = 128;
/// Longest `username`, in characters.
pub const MAX_USERNAME_CHARS: usize = 128;
/// Longest `language`, in characters.
pub const MAX_LANGUAGE_CHARS: usize = 64;
/// Largest `cursor` object, in bytes of JSON.
pub const MAX_CURSOR_BYTES: usize = 1024;

/// The error sent for a `type` this protocol does not know (wording fixed by the spec).
pub const INVALID_TYPE: &str = "Invalid message type";

/// A frame a client sends, parsed and validated.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// `join-session`.
    Join(Join),
    /// `leave-session`.
    Leave,
    /// `code-change`.
    CodeChange(Change),
    /// `cursor-move`, with the cursor object to relay.
    CursorMove(Value),
    /// `language-change`.
    LanguageChange(String),
    /// `execute-code`.
    ExecuteCode(ExecuteCode),
    /// `execution-result`, with the fields to relay: the spec's `output` and `error` (strings or
    /// null), plus `language` and `durationMs`, which the demo page shows. Other fields are
    /// dropped, so a relay carries only what the spec and the page need.
    ExecutionResult(Map<String, Value>),
}

/// `execute-code`: what to run. Only these two fields are relayed (with the sender's `userId`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecuteCode {
    /// The language; the session's when missing or null.
    pub language: Option<String>,
    /// The code; relayed only when the sender gave it (never filled in from the document, which
    /// would turn a 30-byte request into a frame as large as the document).
    pub code: Option<String>,
}

/// `join-session`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Join {
    /// The identity this connection uses from now on.
    pub user_id: String,
    /// Display name; defaults to the `userId`.
    #[serde(default)]
    pub username: Option<String>,
}

/// What a `code-change` carries in `changes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The full text: replaces the document.
    FullText(String),
    /// An operation made on `base_version`.
    Operation {
        /// The version the operation was made on.
        base_version: u64,
        /// The operation.
        op: Operation,
    },
}

/// A frame that could not be accepted; `message` goes back in an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The message for the client.
    pub message: String,
    /// The frame's `type`, when it was a known one (a refused `code-change` triggers a resync).
    pub kind: Option<&'static str>,
}

impl ParseError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            kind: None,
        }
    }

    fn payload(kind: &'static str, detail: impl std::fmt::Display) -> Self {
        Self {
            message: format!("Invalid {kind} payload: {detail}"),
            kind: Some(kind),
        }
    }
}

const KNOWN_TYPES: [&str; 7] = [
    "join-session",
    "leave-session",
    "code-change",
    "cursor-move",
    "language-change",
    "execute-code",
    "execution-result",
];

/// A field kept as its raw JSON text, distinguishing "absent" (`None`) from `null` (`Some`).
/// Parsing into raw text first means nothing is built from a field until its size and kind
/// are known: a generic `serde_json::Value` tree costs about 16 bytes of memory per byte of
/// input (a 6 MiB frame of `[1,1,1,...]` becomes ~100 MB), which input must not control.
#[derive(Debug, Default, Clone, Copy)]
struct Field<'a>(Option<&'a RawValue>);

impl<'de: 'a, 'a> Deserialize<'de> for Field<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <&'a RawValue>::deserialize(deserializer).map(|raw| Self(Some(raw)))
    }
}

impl<'a> Field<'a> {
    /// The raw text, unless the field is absent or `null`.
    fn present(self) -> Option<&'a str> {
        self.0.map(RawValue::get).filter(|raw| *raw != "null")
    }

    /// The first byte of the raw JSON (`{`, `[`, `"`, a digit...).
    fn starts_with(self, byte: u8) -> bool {
        self.present()
            .is_some_and(|raw| raw.as_bytes().first() == Some(&byte))
    }
}

/// Parses one text frame.
pub fn parse(text: &str) -> Result<ClientMessage, ParseError> {
    #[derive(Deserialize)]
    struct Envelope<'a> {
        #[serde(rename = "type", default, borrow)]
        kind: Field<'a>,
        #[serde(default, borrow)]
        payload: Field<'a>,
    }
    let not_object = || {
        ParseError::new(
            "Malformed message: expected a JSON object {\"type\": ..., \"payload\": {...}}",
        )
    };
    let is_object = text.trim_start().starts_with('{');
    let envelope = match serde_json::from_str::<Envelope<'_>>(text) {
        Ok(envelope) if is_object => envelope,
        Ok(_) => return Err(not_object()),
        Err(error) => {
            // Skipping (IgnoredAny) checks the syntax without building anything.
            if serde_json::from_str::<de::IgnoredAny>(text).is_err() {
                return Err(ParseError::new(format!(
                    "Malformed message: not valid JSON ({error})"
                )));
            }
            if !is_object {
                return Err(not_object());
            }
            return Err(ParseError::new(format!("Malformed message: {error}")));
        }
    };
    let kind = match envelope.kind.0 {
        None => return Err(ParseError::new("Malformed message: missing \"type\"")),
        Some(raw) => match serde_json::from_str::<Cow<'_, str>>(raw.get()) {
            Ok(kind) => kind,
            Err(_) => {
                return Err(ParseError::new(
                    "Malformed message: \"type\" must be a string",
                ));
            }
        },
    };
    let Some(kind) = KNOWN_TYPES.iter().copied().find(|k| *k == kind) else {
        return Err(ParseError::new(INVALID_TYPE));
    };
    let payload = match envelope.payload.present() {
        None => "{}",
        Some(raw) if raw.starts_with('{') => raw,
        Some(_) => return Err(ParseError::payload(kind, "\"payload\" must be an object")),
    };
    match kind {
        "join-session" => {
            let join: Join = fields(kind, payload)?;
            check_text(kind, "userId", &join.user_id, MAX_USER_ID_CHARS)?;
            if let Some(name) = &join.username {
                check_text(kind, "username", name, MAX_USERNAME_CHARS)?;
            }
            Ok(ClientMessage::Join(join))
        }
        "leave-session" => Ok(ClientMessage::Leave),
        "code-change" => parse_change(kind, payload).map(ClientMessage::CodeChange),
        "cursor-move" => {
            #[derive(Deserialize)]
            struct CursorMove<'a> {
                #[serde(default, borrow)]
                cursor: Field<'a>,
            }
            let fields: CursorMove<'_> = fields(kind, payload)?;
            let raw = fields.cursor.present().unwrap_or("null");
            if raw.len() > MAX_CURSOR_BYTES {
                return Err(ParseError::payload(
                    kind,
                    format!("\"cursor\" is larger than {MAX_CURSOR_BYTES} bytes"),
                ));
            }
            match serde_json::from_str::<Value>(raw) {
                Ok(cursor @ Value::Object(_)) => Ok(ClientMessage::CursorMove(cursor)),
                _ => Err(ParseError::payload(
                    kind,
                    "\"cursor\" must be an object such as {\"line\": 4, \"column\": 10}",
                )),
            }
        }
        "language-change" => {
            #[derive(Deserialize)]
            struct LanguageChange {
                language: String,
            }
            let change: LanguageChange = fields(kind, payload)?;
            check_text(kind, "language", &change.language, MAX_LANGUAGE_CHARS)?;
            Ok(ClientMessage::LanguageChange(change.language))
        }
        "execute-code" => {
            #[derive(Deserialize)]
            struct Execute<'a> {
                #[serde(default, borrow)]
                language: Field<'a>,
                #[serde(default, borrow)]
                code: Field<'a>,
            }
            let fields: Execute<'_> = fields(kind, payload)?;
            let language = optional_string(kind, "language", fields.language)?;
            if let Some(language) = &language {
                check_text(kind, "language", language, MAX_LANGUAGE_CHARS)?;
            }
            let code = optional_string(kind, "code", fields.code)?;
            Ok(ClientMessage::ExecuteCode(ExecuteCode { language, code }))
        }
        "execution-result" => {
            #[derive(Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Result<'a> {
                #[serde(default, borrow)]
                output: Field<'a>,
                #[serde(default, borrow)]
                error: Field<'a>,
                #[serde(default, borrow)]
                language: Field<'a>,
                #[serde(default, borrow)]
                duration_ms: Field<'a>,
            }
            let fields: Result<'_> = fields(kind, payload)?;
            let mut relayed = Map::new();
            for (name, field) in [("output", fields.output), ("error", fields.error)] {
                if field.0.is_none() {
                    continue;
                }
                let value = optional_string(kind, name, field)?.map_or(Value::Null, Value::String);
                relayed.insert(name.to_owned(), value);
            }
            // Extras the demo page shows; anything malformed or oversized is simply dropped.
            if let Ok(Some(language)) = optional_string(kind, "language", fields.language)
                && check_text(kind, "language", &language, MAX_LANGUAGE_CHARS).is_ok()
            {
                relayed.insert("language".to_owned(), Value::String(language));
            }
            if let Some(raw) = fields.duration_ms.present()
                && let Ok(duration) = serde_json::from_str::<serde_json::Number>(raw)
            {
                relayed.insert("durationMs".to_owned(), Value::Number(duration));
            }
            Ok(ClientMessage::ExecutionResult(relayed))
        }
        _ => Err(ParseError::new(INVALID_TYPE)),
    }
}

/// Deserializes a payload (raw JSON text) into its typed fields; unknown fields are skipped
/// without being built.
fn fields<'a, T: Deserialize<'a>>(kind: &'static str, payload: &'a str) -> Result<T, ParseError> {
    serde_json::from_str(payload).map_err(|e| ParseError::payload(kind, e))
}

fn check_text(
    kind: &'static str,
    field: &str,
    value: &str,
    max_chars: usize,
) -> Result<(), ParseError> {
    if value.trim().is_empty() {
        return Err(ParseError::payload(
            kind,
            format!("\"{field}\" must not be empty"),
        ));
    }
    if value.chars().count() > max_chars {
        return Err(ParseError::payload(
            kind,
            format!("\"{field}\" is longer than {max_chars} characters"),
        ));
    }
    Ok(())
}

/// A field that must be a string or null (or absent).
fn optional_string(
    kind: &'static str,
    name: &str,
    field: Field<'_>,
) -> Result<Option<String>, ParseError> {
    let Some(raw) = field.present() else {
        return Ok(None);
    };
    if !raw.starts_with('"') {
        return Err(ParseError::payload(
            kind,
            format!("\"{name}\" must be a string or null"),
        ));
    }
    serde_json::from_str(raw)
        .map(Some)
        .map_err(|e| ParseError::payload(kind, format!("\"{name}\": {e}")))
}

fn parse_change(kind: &'static str, payload: &str) -> Result<Change, ParseError> {
    #[derive(Deserialize)]
    struct CodeChange<'a> {
        #[serde(default, borrow)]
        changes: Field<'a>,
    }
    let fields: CodeChange<'_> = fields(kind, payload)?;
    let changes = fields.changes;
    if changes.starts_with(b'"') {
        let text = optional_string(kind, "changes", changes)?.unwrap_or_default();
        return Ok(Change::FullText(text));
    }
    if let (true, Some(raw)) = (changes.starts_with(b'{'), changes.present()) {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct WireOperation {
            base_version: u64,
            ops: Operation,
        }
        let op: WireOperation = serde_json::from_str(raw)
            .map_err(|e| ParseError::payload(kind, format!("\"changes\": {e}")))?;
        return Ok(Change::Operation {
            base_version: op.base_version,
            op: op.ops,
        });
    }
    Err(ParseError::payload(
        kind,
        "\"changes\" must be the full text (a string) or an operation {\"baseVersion\": <version>, \"ops\": [retain/insert/delete...]}",
    ))
}

/// A participant as listed in `session-state` and the REST API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Participant {
    /// The user's id.
    pub user_id: String,
    /// The user's display name.
    pub username: String,
}

/// `session-state`, sent to a connection that joins (and after a refused `code-change`).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SessionState<'a> {
    /// The whole document.
    pub(crate) code: &'a str,
    /// The session's language.
    pub language: &'a str,
    /// The document's version.
    pub version: u64,
    /// Everyone in the session, in join order.
    pub participants: &'a [Participant],
}

/// `code-update`, sent to every other connection after an edit.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CodeUpdate<'a> {
    /// The author.
    pub user_id: &'a str,
    /// The whole document after the edit.
    pub(crate) code: &'a str,
    /// The document's new version.
    pub version: u64,
    /// The edit as applied (transformed to the previous version).
    pub ops: &'a Operation,
}

/// Encodes a server frame. Our own payload types always encode; should one ever fail, a plain
/// error frame goes out instead of a panic.
pub(crate) fn frame<T: Serialize + ?Sized>(kind: &str, payload: &T) -> Frame {
    typed_frame(kind, "payload", payload).unwrap_or_else(|_| {
        Frame::from_static(
            r#"{"type":"error","payload":{"message":"internal error: a frame could not be encoded"}}"#,
        )
    })
}

/// Longest error message sent, in bytes. Parser messages can quote the offending input (serde
/// quotes a mistyped string in full), so they are cut here: an error never echoes a large frame.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// `{"type": "error", "payload": {"message": message}}`, the message cut to
/// [`MAX_ERROR_MESSAGE_BYTES`] (at a character boundary, marked with `…`).
pub(crate) fn error_frame(message: &str) -> Frame {
    let message = if message.len() > MAX_ERROR_MESSAGE_BYTES {
        let mut end = MAX_ERROR_MESSAGE_BYTES;
        while !message.is_char_boundary(end) {
            end = end.saturating_sub(1);
        }
        Cow::Owned(format!("{}…", message.get(..end).unwrap_or_default()))
    } else {
        Cow::Borrowed(message)
    };
    frame("error", &serde_json::json!({ "message": message }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse(text).unwrap_err().message
    }

    #[test]
    fn parses_every_client_message() {
        let join = parse(r#"{"type":"join-session","payload":{"userId":"u1","username":"Ann"}}"#);
        assert_eq!(
            join,
            Ok(ClientMessage::Join(Join {
                user_id: "u1".into(),
                username: Some("Ann".into())
            }))
        );
        assert_eq!(
            parse(r#"{"type":"leave-session"}"#),
            Ok(ClientMessage::Leave)
        );
        assert_eq!(
            parse(r#"{"type":"code-change","payload":{"userId":"x","changes":"abc"}}"#),
            Ok(ClientMessage::CodeChange(Change::FullText("abc".into())))
        );
        let Ok(ClientMessage::CodeChange(Change::Operation { base_version, op })) = parse(
            r#"{"type":"code-change","payload":{"changes":{"baseVersion":3,"ops":[1,"a",-1]}}}"#,
        ) else {
            panic!("operation not parsed")
        };
        assert_eq!((base_version, op.base_len(), op.target_len()), (3, 2, 2));
        assert!(matches!(
            parse(r#"{"type":"cursor-move","payload":{"cursor":{"line":1,"column":2}}}"#),
            Ok(ClientMessage::CursorMove(_))
        ));
        assert_eq!(
            parse(r#"{"type":"language-change","payload":{"language":"rust"}}"#),
            Ok(ClientMessage::LanguageChange("rust".into()))
        );
        assert!(matches!(
            parse(r#"{"type":"execute-code","payload":{"language":"python","code":"print(1)"}}"#),
            Ok(ClientMessage::ExecuteCode(_))
        ));
        assert!(matches!(
            parse(r#"{"type":"execution-result","payload":{"output":"2\n","error":null}}"#),
            Ok(ClientMessage::ExecutionResult(_))
        ));
    }

    #[test]
    fn bad_frames_get_clear_messages() {
        assert_eq!(err(r#"{"type":"dance"}"#), INVALID_TYPE);
        assert_eq!(
            err(r#"{"type":7}"#),
            "Malformed message: \"type\" must be a string"
        );
        assert!(err("{nope").starts_with("Malformed message: not valid JSON"));
        assert!(err("[1]").contains("expected a JSON object"));
        assert!(err(r#"{"payload":{}}"#).contains("missing \"type\""));
        assert!(err(r#"{"type":"join-session","payload":{}}"#).contains("missing field `userId`"));
        assert!(
            err(r#"{"type":"join-session","payload":{"userId":" "}}"#)
                .contains("must not be empty")
        );
        assert!(err(r#"{"type":"code-change","payload":{}}"#).contains("\"changes\" must be"));
        let bad_op =
            parse(r#"{"type":"code-change","payload":{"changes":{"baseVersion":0,"ops":[true]}}}"#)
                .unwrap_err();
        assert_eq!(bad_op.kind, Some("code-change"));
        assert!(
            bad_op.message.contains("positive integer (retain)"),
            "{}",
            bad_op.message
        );
        assert!(
            err(r#"{"type":"cursor-move","payload":{"cursor":3}}"#).contains("must be an object")
        );
        assert!(
            err(r#"{"type":"execution-result","payload":{"output":1}}"#)
                .contains("\"output\" must be a string")
        );
        assert!(err(r#"{"type":"language-change","payload":"x"}"#).contains("must be an object"));
    }

    #[test]
    fn errors_never_echo_large_input() {
        let huge = format!(
            r#"{{"type":"code-change","payload":{{"changes":{{"baseVersion":"{}","ops":[]}}}}}}"#,
            "é".repeat(100_000)
        );
        let message = parse(&huge).unwrap_err().message;
        let frame = error_frame(&message);
        assert!(
            frame.as_str().len() < MAX_ERROR_MESSAGE_BYTES + 100,
            "{}",
            frame.as_str().len()
        );
        assert!(frame.as_str().contains('…'));
    }

    #[test]
    fn unknown_fields_are_skipped_and_odd_envelopes_get_clear_messages() {
        let junk = format!("[{}1]", "1,".repeat(100_000));
        let frame = format!(
            r#"{{"junk":{junk},"type":"cursor-move","payload":{{"more":{junk},"cursor":{{"line":1}}}}}}"#
        );
        assert!(matches!(parse(&frame), Ok(ClientMessage::CursorMove(_))));
        assert_eq!(
            err(r#"{"type":null}"#),
            "Malformed message: \"type\" must be a string"
        );
        assert!(err(r#"{"type":"x","type":"y"}"#).starts_with("Malformed message: duplicate"));
        assert!(err("7").contains("expected a JSON object"));
        assert!(err("[1").starts_with("Malformed message: not valid JSON"));
        assert_eq!(
            parse(r#"{"type":"leave-session","payload":null}"#),
            Ok(ClientMessage::Leave)
        );
        assert!(
            err(r#"{"type":"cursor-move","payload":{"cursor":[1]}}"#).contains("must be an object")
        );
        let big = format!(
            r#"{{"type":"cursor-move","payload":{{"cursor":{{"a":"{}"}}}}}}"#,
            "x".repeat(2000)
        );
        assert!(err(&big).contains("larger than 1024 bytes"));
    }

    #[test]
    fn server_frames_use_the_payload_envelope() {
        assert_eq!(
            error_frame(INVALID_TYPE).as_str(),
            r#"{"type":"error","payload":{"message":"Invalid message type"}}"#
        );
        let op = Operation::new().retain(1).insert("x");
        let update = CodeUpdate {
            user_id: "u",
            code: "ax",
            version: 4,
            ops: &op,
        };
        assert_eq!(
            frame("code-update", &update).as_str(),
            r#"{"type":"code-update","payload":{"userId":"u","code":"ax","version":4,"ops":[1,"x"]}}"#
        );
    }
}
