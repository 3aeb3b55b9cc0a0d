//! Runtime limits and policies, shared by every protocol.

use std::time::Duration;

use switchboard_core::Keepalive;

/// How the runtime serves a protocol. Every queue and buffer here is bounded; the defaults suit a
/// chat server with thousands of mostly idle sockets.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Origins allowed to open a WebSocket (exact match on the `Origin` header). `None` allows
    /// any. Requests without an `Origin` header (non-browser clients) are always allowed.
    pub allowed_origins: Option<Vec<String>>,
    /// Largest inbound WebSocket message; larger ones close the socket with 1009. `None` uses the
    /// protocol's own default (64 KiB for most).
    pub max_frame_bytes: Option<usize>,
    /// Largest plain-HTTP request body; `None` uses the frame limit.
    pub max_http_body_bytes: Option<usize>,
    /// Outbound queue capacity per connection, in queue items. A full queue disconnects the
    /// client with 1008 "slow consumer". Items are handles to shared frames (40 bytes each), so
    /// the bound is about backlog, not copies; it must absorb a broadcast burst that arrives
    /// faster than a busy server schedules the connection's writer.
    pub outbound_queue: usize,
    /// WebSocket pings and the idle timeout, unless the protocol brings its own policy.
    pub keepalive: Keepalive,
    /// Open WebSocket connections at most; further upgrades get HTTP 503.
    pub max_connections: usize,
    /// Take the client IP from the last `X-Forwarded-For` entry (set by the proxy in front).
    pub trust_proxy: bool,
    /// How long shutdown waits for connections to finish their close handshake.
    pub shutdown_grace: Duration,
    /// How long a closing connection waits to flush its close frame and hear the peer's reply.
    pub close_timeout: Duration,
    /// tungstenite read buffer per socket, allocated up front. tungstenite's default is 128 KiB;
    /// 1 KiB holds a typical chat frame in one read and keeps an idle socket near 4.6 KiB of
    /// server memory in all (docs/performance.md). Larger messages still arrive, over more reads.
    pub read_buffer_bytes: usize,
    /// Bytes tungstenite buffers before writing to the socket; frames of one batch are coalesced.
    pub write_buffer_bytes: usize,
    /// Hard bound on tungstenite's write buffer (its default is unbounded). The runtime raises it
    /// to `write_buffer_bytes` + the protocol's `max_outbound_frame_bytes()` when that is larger.
    pub max_write_buffer_bytes: usize,
    /// Listen backlog for the accept queue (tokio's default of 128 stalls connect bursts).
    pub accept_backlog: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            allowed_origins: None,
            max_frame_bytes: None,
            max_http_body_bytes: None,
            outbound_queue: 1024,
            keepalive: Keepalive::default(),
            max_connections: 10_000,
            trust_proxy: false,
            shutdown_grace: Duration::from_secs(5),
            close_timeout: Duration::from_secs(2),
            read_buffer_bytes: 1024,
            write_buffer_bytes: 16 * 1024,
            max_write_buffer_bytes: 8 * 1024 * 1024,
            accept_backlog: 4096,
        }
    }
}
