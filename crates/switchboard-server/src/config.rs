//! Runtime limits and policies, shared by every protocol.

use std::sync::Arc;
use std::time::Duration;

use switchboard_core::{Engine, Keepalive};

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
    /// client with 1008 "slow consumer". Items are handles to shared frames, so the bound is
    /// about backlog, not copies; it must absorb a broadcast burst that arrives faster than a
    /// busy server schedules the connection's writer. The byte bound below is the real memory
    /// bound; this one caps bookkeeping for floods of tiny frames.
    pub outbound_queue: usize,
    /// Outbound backlog per connection in bytes: every queued frame counts its full length for
    /// each recipient (even though recipients share one copy), plus its queue slot. The bound
    /// in force is this plus the protocol's `max_outbound_frame_bytes()`, so one maximal frame
    /// always fits behind a backlog; over it the client is closed with 1008 "slow consumer".
    pub outbound_queue_bytes: usize,
    /// A socket whose writes make no progress for this long is closed with 1008 "write
    /// timeout" and its memory freed, whatever the idle timer says.
    pub write_timeout: Duration,
    /// An inbound message (all its fragments, or one large frame) must arrive within this long
    /// of its first byte; otherwise the socket is closed with 1008 "message timeout".
    pub message_timeout: Duration,
    /// Server-wide memory of inbound messages still being received (fragments and partial
    /// frames) across all sockets, charged at twice the bytes received (the runtime's WebSocket
    /// codec holds a fragmented message about twice while it is assembled). A socket whose next
    /// bytes would go over it is closed with 1013 "try again later".
    pub reassembly_budget_bytes: usize,
    /// One client's share of `reassembly_budget_bytes` (keep it above the largest message a
    /// legitimate client sends). Each socket also holds up to 8 KiB of a partial message
    /// outside the budget, so ordinary messages never touch the shared counters.
    pub reassembly_per_ip_bytes: usize,
    /// Open WebSocket connections per client (IPv4 address or IPv6 /64); the next upgrade from
    /// that client gets HTTP 429. 0 disables the share.
    pub max_connections_per_ip: usize,
    /// HTTP requests (upgrades included, `/healthz` and `/readyz` excluded) one client may make at once...
    pub requests_per_ip_burst: u32,
    /// ...and per second after the burst; over the rate a request gets HTTP 429. A burst of 0
    /// disables the limit.
    pub requests_per_ip_per_second: u32,
    /// TCP connections not (yet) upgraded to WebSocket, server-wide: plain HTTP, keep-alive and
    /// handshakes in progress. Over it new connections get a bare HTTP 503 and are closed.
    /// Enforced by [`crate::serve`] (an embedder's own accept loop brings its own).
    pub max_pending_connections: usize,
    /// Not-yet-upgraded TCP connections per client; over it, a bare HTTP 429. 0 disables.
    pub max_pending_per_ip: usize,
    /// A client must send a request's whole header within this long (slow-header attacks).
    pub header_read_timeout: Duration,
    /// Largest request header block in bytes (hyper's read buffer; at least 8 KiB).
    pub max_header_bytes: usize,
    /// A plain HTTP request body must arrive within this long (HTTP 408 otherwise).
    pub body_timeout: Duration,
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
    /// Listen backlog for the accept queue (tokio's default of 128 stalls connect bursts).
    pub accept_backlog: u32,
    /// The state engine every connection's hooks reach through their context: this node's view
    /// of the logs, topics, presence and keyed state protocols share. Defaults to a fresh
    /// in-memory engine; clones of a config share one engine.
    pub engine: Engine,
    /// Signed identity: with a verifier, every WebSocket upgrade needs a valid token (HTTP 401
    /// otherwise) and the protocol sees the verified [`switchboard_core::Identity`]; a
    /// connection is closed with 4401 when its token expires. `None` (the default): identity is
    /// whatever each protocol's spec says.
    pub auth: Option<Arc<crate::JwtVerifier>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            allowed_origins: None,
            max_frame_bytes: None,
            max_http_body_bytes: None,
            outbound_queue: 16 * 1024,
            outbound_queue_bytes: 4 * 1024 * 1024,
            write_timeout: Duration::from_secs(10),
            message_timeout: Duration::from_secs(10),
            reassembly_budget_bytes: 128 * 1024 * 1024,
            reassembly_per_ip_bytes: 32 * 1024 * 1024,
            max_connections_per_ip: 256,
            requests_per_ip_burst: 512,
            requests_per_ip_per_second: 100,
            max_pending_connections: 4096,
            max_pending_per_ip: 256,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            body_timeout: Duration::from_secs(10),
            keepalive: Keepalive::default(),
            max_connections: 10_000,
            trust_proxy: false,
            shutdown_grace: Duration::from_secs(5),
            close_timeout: Duration::from_secs(2),
            read_buffer_bytes: 1024,
            accept_backlog: 4096,
            engine: Engine::default(),
            auth: None,
        }
    }
}
