//! `echo`: a diagnostics protocol. Every text and binary message that arrives on `/ws` is sent
//! back unchanged, as the same kind of message.
//!
//! It has no state and no rules of its own, so what a client sees is exactly what the runtime
//! does: framing, fragmentation, UTF-8 validation, control frames, limits and close handshakes.
//! That makes it the target for conformance fuzzers such as the Autobahn|Testsuite
//! (`cargo xtask autobahn`). Its default message limit is 16 MiB, the largest message the
//! Autobahn cases send.

use bytes::Bytes;
use switchboard_core::{Context, Frame, Handshake, Protocol, Reject};

/// The default inbound (and outbound) message limit: 16 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The echo protocol.
#[derive(Debug, Clone)]
pub struct Echo {
    max_message_bytes: usize,
}

impl Echo {
    /// Echo with the default 16 MiB message limit.
    pub fn new() -> Self {
        Self {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }

    /// Echo with another message limit (the runtime's `--max-frame-bytes` still wins when set).
    pub fn with_max_message_bytes(max_message_bytes: usize) -> Self {
        Self { max_message_bytes }
    }
}

impl Default for Echo {
    fn default() -> Self {
        Self::new()
    }
}

impl Protocol for Echo {
    type Conn = ();

    fn name(&self) -> &'static str {
        "echo"
    }

    fn admit(&self, handshake: &Handshake<'_>) -> Result<Self::Conn, Reject> {
        if handshake.path == "/ws" {
            Ok(())
        } else {
            Err(Reject::NotFound)
        }
    }

    async fn on_open(&self, _conn: &mut Self::Conn, _cx: &Context<'_>) {}

    async fn on_text(&self, _conn: &mut Self::Conn, cx: &Context<'_>, text: &str) {
        let peer = cx.peer();
        // A full queue closes the peer as a slow consumer; nothing else to do here.
        let _ = peer.send(Frame::text(text));
    }

    async fn on_binary(&self, _conn: &mut Self::Conn, cx: &Context<'_>, data: &[u8]) {
        let peer = cx.peer();
        let _ = peer.send_binary(Bytes::copy_from_slice(data));
    }

    async fn on_close(&self, _conn: Self::Conn, _cx: &Context<'_>) {}

    fn default_max_frame_bytes(&self) -> usize {
        self.max_message_bytes
    }

    fn max_outbound_frame_bytes(&self) -> usize {
        self.max_message_bytes
    }
}
