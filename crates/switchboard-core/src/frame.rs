//! Outbound frames: encoded once, shared by every recipient.

use std::fmt;

use serde::Serialize;
use tungstenite::Utf8Bytes;

/// One text frame ready for the wire.
///
/// A `Frame` is reference counted: cloning it for a thousand recipients copies a pointer, not the
/// text. Encode a broadcast once with [`Frame::json`] and hand clones to every [`crate::Peer`].
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Frame(Utf8Bytes);

impl Frame {
    /// A frame holding `text` as is.
    pub fn text(text: impl Into<String>) -> Self {
        Self(Utf8Bytes::from(text.into()))
    }

    /// A frame for text known at compile time; costs no allocation.
    pub const fn from_static(text: &'static str) -> Self {
        Self(Utf8Bytes::from_static(text))
    }

    /// Serializes `value` as JSON into a frame.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, crate::Error> {
        serde_json::to_string(value)
            .map(Self::text)
            .map_err(crate::Error::Encode)
    }

    /// The frame's text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the frame is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The shared UTF-8 bytes, for the runtime that writes them to a socket.
    pub fn into_utf8_bytes(self) -> Utf8Bytes {
        self.0
    }
}

impl From<Utf8Bytes> for Frame {
    fn from(bytes: Utf8Bytes) -> Self {
        Self(bytes)
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Frame").field(&self.as_str()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_same_bytes() {
        let frame = Frame::text("hello");
        let copy = frame.clone();
        assert_eq!(frame.as_str().as_ptr(), copy.as_str().as_ptr());
    }

    #[test]
    fn json_encodes_values() {
        let frame = Frame::json(&serde_json::json!({"type": "x"})).unwrap();
        assert_eq!(frame.as_str(), r#"{"type":"x"}"#);
    }
}
