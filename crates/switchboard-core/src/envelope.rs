//! Helpers for the `{"type": ..., "<field>": ...}` envelope most JSON protocols use.

use serde::Serialize;
use serde::ser::SerializeMap;

use crate::{Error, Frame};

/// Encodes `{"type": kind, field: payload}` once, as a shareable frame.
///
/// ip-chat and fastchat call the payload field `data`, collab calls it `payload`.
pub fn typed_frame<T: Serialize + ?Sized>(
    kind: &str,
    field: &str,
    payload: &T,
) -> Result<Frame, Error> {
    struct Envelope<'a, T: ?Sized> {
        kind: &'a str,
        field: &'a str,
        payload: &'a T,
    }
    impl<T: Serialize + ?Sized> Serialize for Envelope<'_, T> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut map = serializer.serialize_map(Some(2))?;
            map.serialize_entry("type", self.kind)?;
            map.serialize_entry(self.field, self.payload)?;
            map.end()
        }
    }
    Frame::json(&Envelope {
        kind,
        field,
        payload,
    })
}

/// The `type` of a JSON envelope, if `text` is an object with a string `type`.
pub fn frame_type(text: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Typed {
        #[serde(rename = "type")]
        kind: String,
    }
    serde_json::from_str::<Typed>(text).ok().map(|t| t.kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_reads_envelopes() {
        let frame = typed_frame("error", "data", &serde_json::json!({"error": "x"})).unwrap();
        assert_eq!(frame.as_str(), r#"{"type":"error","data":{"error":"x"}}"#);
        assert_eq!(frame_type(frame.as_str()).as_deref(), Some("error"));
        assert_eq!(frame_type("[1]"), None);
    }
}
