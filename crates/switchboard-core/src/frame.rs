//! Outbound frames: encoded once, shared by every recipient.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use tungstenite::Utf8Bytes;

/// One text frame ready for the wire.
///
/// A `Frame` is one pointer to a reference-counted body: cloning it for a thousand recipients
/// copies a pointer, not the text. Encode a broadcast once with [`Frame::json`] and hand clones
/// to every [`crate::Peer`].
///
/// It is a single machine word on purpose: a fan-out writes one of these into each recipient's
/// queue, and the bytes written per recipient, in lines the recipient's own task last touched on
/// another core, are the largest cost of a broadcast (a 40-byte slot cost about twice as much
/// per push as an 8-byte one, measured).
#[derive(Clone)]
pub struct Frame(Arc<Body>);

/// What a [`Frame`] points at. Only [`Frame`]'s public constructors make text bodies; the other
/// two exist so a peer's queue can hold every kind of item in one 8-byte slot.
#[derive(Debug)]
pub(crate) enum Body {
    /// A text frame.
    Text(Utf8Bytes),
    /// A binary message (see [`crate::Outgoing::Binary`]).
    Binary(bytes::Bytes),
    /// Several frames in one queue slot (see [`crate::Outgoing::Batch`]).
    Batch(Vec<Frame>),
}

/// Bytes one [`Frame`] body costs besides its payload: the reference counts and the body.
pub(crate) const BODY_OVERHEAD: usize =
    2 * std::mem::size_of::<usize>() + std::mem::size_of::<Body>();

impl Frame {
    /// A frame holding `text` as is.
    pub fn text(text: impl Into<String>) -> Self {
        Self::from(Utf8Bytes::from(text.into()))
    }

    /// A frame for text known at compile time; the text itself is not copied.
    pub fn from_static(text: &'static str) -> Self {
        Self::from(Utf8Bytes::from_static(text))
    }

    /// Serializes `value` as JSON into a frame.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, crate::Error> {
        serde_json::to_string(value)
            .map(Self::text)
            .map_err(crate::Error::Encode)
    }

    /// The frame's text.
    pub fn as_str(&self) -> &str {
        match &*self.0 {
            Body::Text(text) => text.as_str(),
            // Never a public frame: these bodies live only inside a peer's queue.
            Body::Binary(_) | Body::Batch(_) => "",
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.as_str().len()
    }

    /// Whether the frame is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shared UTF-8 bytes, for a runtime that writes them to a socket.
    pub fn into_utf8_bytes(self) -> Utf8Bytes {
        match &*self.0 {
            Body::Text(text) => text.clone(),
            Body::Binary(_) | Body::Batch(_) => Utf8Bytes::default(),
        }
    }

    /// A queue item that is not a text frame, boxed behind the same one-word handle.
    pub(crate) fn boxed(body: Body) -> Self {
        Self(Arc::new(body))
    }

    /// The body, for a peer's queue to turn back into an [`crate::Outgoing`].
    pub(crate) fn body(&self) -> &Body {
        &self.0
    }

    /// The body by value when this is its only handle (a batch or binary item always is),
    /// else `None`.
    pub(crate) fn into_body(self) -> Result<Body, Self> {
        Arc::try_unwrap(self.0).map_err(Self)
    }
}

impl Default for Frame {
    fn default() -> Self {
        Self::from_static("")
    }
}

impl PartialEq for Frame {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Frame {}

impl From<Utf8Bytes> for Frame {
    fn from(bytes: Utf8Bytes) -> Self {
        Self(Arc::new(Body::Text(bytes)))
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
    fn a_frame_is_one_word() {
        assert_eq!(std::mem::size_of::<Frame>(), std::mem::size_of::<usize>());
    }

    #[test]
    fn json_encodes_values() {
        let frame = Frame::json(&serde_json::json!({"type": "x"})).unwrap();
        assert_eq!(frame.as_str(), r#"{"type":"x"}"#);
    }
}
