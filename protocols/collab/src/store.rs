//! What collab keeps in the state engine, and how it is encoded. Sans-IO: names, records and
//! parsers; the calls themselves are in the protocol.
//!
//! - `collab:session:<id>` (keyed state): the session's [`Record`] (generation, language, whether
//!   anyone joined, and a snapshot of the document with its version), compact JSON.
//! - `collab:ops:<id>:<generation>` (a log, and the session's topic): one entry per accepted edit, the
//!   `code-update` frame every other participant receives. Unlogged publications on the same
//!   topic carry joins, leaves, cursors, language changes and execution relays. The presence
//!   room of the session has the same name.
//! - `collab:user:<id>:<generation>:<userId>` (keyed state): a present participant's display name.
//!
//! The generation (a fresh UUID per incarnation of a session) keeps a session that expired and
//! was created again under the same id apart from the old one's leftovers (its log, presence).

use serde::{Deserialize, Serialize};
use switchboard_core::Frame;

use crate::ot::Operation;

/// Prefix of every session's topic (and presence room).
pub(crate) const TOPIC_PREFIX: &str = "collab:ops:";

/// The keyed-state key of session `id`'s record.
pub(crate) fn record_key(id: &str) -> String {
    format!("collab:session:{id}")
}

/// The log, topic and presence room of incarnation `generation` of session `id`.
pub(crate) fn topic(id: &str, generation: &str) -> String {
    format!("{TOPIC_PREFIX}{id}:{generation}")
}

/// The session id and generation a topic names, if it is one of ours.
pub(crate) fn parse_topic(topic: &str) -> Option<(&str, &str)> {
    topic.strip_prefix(TOPIC_PREFIX)?.split_once(':')
}

/// The prefix of the display-name keys of incarnation `generation` of session `id`.
pub(crate) fn user_prefix(id: &str, generation: &str) -> String {
    format!("collab:user:{id}:{generation}:")
}

/// The display-name key of `user` in incarnation `generation` of session `id`.
pub(crate) fn user_key(id: &str, generation: &str, user: &str) -> String {
    let mut key = user_prefix(id, generation);
    key.push_str(user);
    key
}

/// Length of `text` as a JSON string's contents, as serde_json escapes it: `"` and `\` and the
/// short control escapes take two bytes, other control characters six (`\u0001`), everything
/// else its UTF-8 bytes. What a document costs in the record's snapshot.
pub(crate) fn escaped_len(text: &str) -> usize {
    text.bytes()
        .map(|byte| match byte {
            b'"' | b'\\' | 0x08 | 0x0c | b'\n' | b'\r' | b'\t' => 2,
            0x00..=0x1f => 6,
            _ => 1,
        })
        .fold(0usize, usize::saturating_add)
}

/// A session's record in keyed state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The incarnation: names the session's log, topic and presence room.
    #[serde(rename = "g")]
    pub(crate) generation: String,
    /// The session's language.
    #[serde(rename = "l")]
    pub(crate) language: String,
    /// Whether anyone ever joined (the idle TTL applies instead of the unjoined one).
    #[serde(rename = "j")]
    pub(crate) joined: bool,
    /// The document as of `version`; the log's newest entry is newer when its version is.
    #[serde(rename = "c")]
    pub(crate) code: String,
    /// The snapshot's version.
    #[serde(rename = "v")]
    pub(crate) version: u64,
}

impl Record {
    /// Compact JSON.
    pub(crate) fn encode(&self) -> bytes::Bytes {
        // A struct of strings, a bool and an integer always serializes.
        serde_json::to_vec(self).unwrap_or_default().into()
    }

    /// Parses a stored record.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A record without its document, read when only the metadata is needed: the code is skipped
/// while parsing, never allocated.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct RecordMeta {
    /// See [`Record::generation`].
    #[serde(rename = "g")]
    pub(crate) generation: String,
    /// See [`Record::language`].
    #[serde(rename = "l")]
    pub(crate) language: String,
    /// See [`Record::joined`].
    #[serde(rename = "j")]
    pub(crate) joined: bool,
    /// See [`Record::version`].
    #[serde(rename = "v")]
    pub(crate) version: u64,
}

impl RecordMeta {
    /// Parses a stored record's metadata.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A log entry (a `code-update` frame) read for its edit: the version it made and the operation
/// as applied. The document text it carries is skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoggedEdit {
    /// The version the edit made.
    pub(crate) version: u64,
    /// The operation, based on the version before.
    pub(crate) op: Operation,
}

/// A log entry read for the document it leaves: its version and the whole text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoggedState {
    /// The version.
    pub(crate) version: u64,
    /// The document at that version.
    pub(crate) code: String,
}

#[derive(Deserialize)]
struct Envelope<P> {
    payload: P,
}

#[derive(Deserialize)]
struct EditPayload {
    version: u64,
    // `code` and `userId` are skipped without being built (serde skips unknown fields).
    ops: Operation,
}

#[derive(Deserialize)]
struct StatePayload {
    version: u64,
    code: String,
}

#[derive(Deserialize)]
struct VersionPayload {
    version: u64,
}

/// The edit a log entry records.
pub(crate) fn logged_edit(frame: &Frame) -> Result<LoggedEdit, serde_json::Error> {
    let entry: Envelope<EditPayload> = serde_json::from_str(frame.as_str())?;
    Ok(LoggedEdit {
        version: entry.payload.version,
        op: entry.payload.ops,
    })
}

/// The document a log entry leaves.
pub(crate) fn logged_state(frame: &Frame) -> Result<LoggedState, serde_json::Error> {
    let entry: Envelope<StatePayload> = serde_json::from_str(frame.as_str())?;
    Ok(LoggedState {
        version: entry.payload.version,
        code: entry.payload.code,
    })
}

/// The version a log entry made (its text is skipped).
pub(crate) fn logged_version(frame: &Frame) -> Result<u64, serde_json::Error> {
    let entry: Envelope<VersionPayload> = serde_json::from_str(frame.as_str())?;
    Ok(entry.payload.version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{CodeUpdate, frame};

    #[test]
    fn names_round_trip() {
        let topic = topic("abc-1", "0b8c");
        assert_eq!(topic, "collab:ops:abc-1:0b8c");
        assert_eq!(parse_topic(&topic), Some(("abc-1", "0b8c")));
        assert_eq!(parse_topic("chat:x"), None);
        assert_eq!(user_key("s", "g", "u:1"), "collab:user:s:g:u:1");
        assert!(user_key("s", "g", "u").starts_with(&user_prefix("s", "g")));
    }

    #[test]
    fn records_and_entries_parse() {
        let record = Record {
            generation: "g".into(),
            language: "rust".into(),
            joined: true,
            code: "fn main() {}".into(),
            version: 7,
        };
        let bytes = record.encode();
        assert_eq!(Record::decode(&bytes).unwrap(), record);
        let meta = RecordMeta::decode(&bytes).unwrap();
        assert_eq!((meta.language.as_str(), meta.version), ("rust", 7));

        let op = Operation::new().retain(2).insert("é");
        let update = frame(
            "code-update",
            &CodeUpdate {
                user_id: "u",
                code: "abé",
                version: 3,
                ops: &op,
            },
        );
        assert_eq!(logged_edit(&update).unwrap(), LoggedEdit { version: 3, op });
        assert_eq!(
            logged_state(&update).unwrap(),
            LoggedState {
                version: 3,
                code: "abé".into()
            }
        );
        assert_eq!(logged_version(&update).unwrap(), 3);
        assert!(logged_edit(&Frame::from_static("{}")).is_err());
    }

    #[test]
    fn escaped_len_is_what_serde_json_writes() {
        for text in [
            "",
            "plain",
            "q\"uote\\",
            "\n\t\r\u{8}\u{c}",
            "\u{1}\u{1f}",
            "é\u{7f}/",
        ] {
            let encoded = serde_json::to_string(text).unwrap();
            assert_eq!(escaped_len(text), encoded.len() - 2, "{text:?}");
        }
    }
}
