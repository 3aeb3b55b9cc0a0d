//! The `Protocol` trait: the one plug point between a protocol crate and the runtime.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;

use crate::engine::EngineEvent;
use crate::{Caller, Context, Engine, Identity};

/// What the runtime knows about a WebSocket upgrade request before accepting it.
#[derive(Debug, Clone, Copy)]
pub struct Handshake<'a> {
    /// The request path relative to where the protocol is mounted, e.g. `/ws` or `/ws/abc123`.
    pub path: &'a str,
    /// The raw query string without `?`, if any.
    pub query: Option<&'a str>,
    /// The TCP peer address.
    pub remote: SocketAddr,
    /// The client's IP: the TCP peer, or the proxy-reported address when the server trusts a proxy.
    pub client_ip: IpAddr,
    /// The `Origin` header, if the client sent one (browsers always do).
    pub origin: Option<&'a str>,
    /// The `Host` header (`host:port`), e.g. for building URLs that point back at this server.
    pub host: Option<&'a str>,
    /// The verified identity when the server requires signed tokens (a request without a valid
    /// token never reaches the protocol then); `None` when it does not.
    pub identity: Option<&'a Identity>,
}

impl Handshake<'_> {
    /// The first value of query parameter `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        crate::query::param(self.query?, name)
    }
}

/// Why an upgrade is refused; the runtime answers with the matching HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// 404: nothing is served at this path.
    #[error("not found")]
    NotFound,
    /// 400: the request is malformed (e.g. a required query parameter is missing).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 401: the request needs a valid signed token and carried none (or a bad one).
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// 403: the request is not allowed.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// 503: the server cannot take this connection now (a limit is reached).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// 429: this client holds its whole share of a pool, or is over its rate.
    #[error("too many requests: {0}")]
    TooMany(String),
}

impl Reject {
    /// The HTTP status code for this rejection.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotFound => 404,
            Self::BadRequest(_) => 400,
            Self::Unauthorized(_) => 401,
            Self::Forbidden(_) => 403,
            Self::Unavailable(_) => 503,
            Self::TooMany(_) => 429,
        }
    }
}

/// A plain HTTP request routed to a protocol (anything that is not a WebSocket upgrade).
#[derive(Debug, Clone)]
pub struct HttpRequest {
    /// Upper-case method, e.g. `GET`.
    pub method: String,
    /// Path relative to where the protocol is mounted.
    pub path: String,
    /// Raw query string without `?`.
    pub query: Option<String>,
    /// The body, already bounded by the server's body limit.
    pub body: Bytes,
    /// The `Host` header, if any.
    pub host: Option<String>,
    /// The client's IP (proxy-resolved only when the server trusts a proxy), for per-client
    /// shares such as "sessions created per client".
    pub client_ip: IpAddr,
    /// The caller's verified identity, if signed identity is configured and a token came.
    pub caller: Caller,
}

/// A plain HTTP response from a protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// `Content-Type` header value.
    pub content_type: &'static str,
    /// The body.
    pub body: Bytes,
}

impl HttpResponse {
    /// A JSON response. Serializing our own response types cannot fail in practice; if it does the
    /// client gets a 500 rather than a panic.
    pub fn json<T: serde::Serialize + ?Sized>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self {
                status,
                content_type: "application/json",
                body: body.into(),
            },
            Err(_) => Self::json_error(500, "response could not be encoded"),
        }
    }

    /// `{"error": message}` with the given status.
    pub fn json_error(status: u16, message: &str) -> Self {
        let body = serde_json::json!({ "error": message }).to_string();
        Self {
            status,
            content_type: "application/json",
            body: body.into(),
        }
    }

    /// A response with any static content type.
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Bytes>) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
        }
    }
}

/// How the runtime finds dead peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Send a WebSocket ping this often; `None` leaves heartbeats to the protocol's own frames.
    pub ping_interval: Option<Duration>,
    /// Drop a peer from which nothing (data, ping or pong) arrived for this long.
    pub idle_timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            ping_interval: Some(Duration::from_secs(30)),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// A realtime protocol served by the Switchboard runtime.
///
/// The runtime owns sockets, limits, keepalive and shutdown. A protocol sees one connection as a
/// [`crate::Peer`] (a bounded outbound queue, reached through the hook's [`Context`]) plus its own
/// per-connection state [`Protocol::Conn`], and reacts to four moments: admission, open, each
/// text frame, close. Every hook of one connection runs on that connection's task, in order, so
/// `Conn` needs no locking; state shared between connections lives in the node's [`Engine`]
/// (the context's [`Context::engine`]), never in the protocol value, so a protocol runs
/// unchanged on one node, on a durable node or in a cluster.
///
/// Identity is the protocol's business: take it from [`Handshake::client_ip`] (by IP), a query
/// parameter, the path (`/ws/<session>`), or leave `Conn` unidentified until a first HELLO frame.
/// When the server verifies signed tokens, [`Handshake::identity`] is the verified user, and a
/// protocol must let a connection act only as that user.
pub trait Protocol: Send + Sync + 'static {
    /// Per-connection state, created by [`Protocol::admit`].
    type Conn: Send + 'static;

    /// Short name used in logs and on the command line, e.g. `ip-chat`.
    fn name(&self) -> &'static str;

    /// Decides whether to accept a WebSocket upgrade, before the `101` is sent. Runs for every
    /// upgrade path, so a protocol serving `/ws` answers [`Reject::NotFound`] for anything else.
    fn admit(&self, handshake: &Handshake<'_>) -> Result<Self::Conn, Reject>;

    /// The socket is open and can be written to.
    fn on_open(&self, conn: &mut Self::Conn, cx: &Context<'_>) -> impl Future<Output = ()> + Send;

    /// A text frame arrived. Errors are the protocol's to report, as frames on the socket.
    fn on_text(
        &self,
        conn: &mut Self::Conn,
        cx: &Context<'_>,
        text: &str,
    ) -> impl Future<Output = ()> + Send;

    /// A binary frame arrived. By default it is treated as text (invalid UTF-8 replaced), so it
    /// reaches the protocol's own "malformed frame" error.
    fn on_binary(
        &self,
        conn: &mut Self::Conn,
        cx: &Context<'_>,
        data: &[u8],
    ) -> impl Future<Output = ()> + Send {
        async move {
            let text = String::from_utf8_lossy(data);
            self.on_text(conn, cx, &text).await;
        }
    }

    /// The connection is gone (for any reason; see [`crate::Peer::close_reason`]). Runs exactly
    /// once per opened connection, also on shutdown.
    fn on_close(&self, conn: Self::Conn, cx: &Context<'_>) -> impl Future<Output = ()> + Send;

    /// How often [`Protocol::on_tick`] runs for each connection; `None` (the default) never.
    fn tick_interval(&self) -> Option<Duration> {
        None
    }

    /// Periodic per-connection work, e.g. redelivering unacknowledged events.
    fn on_tick(
        &self,
        _conn: &mut Self::Conn,
        _cx: &Context<'_>,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// The protocol's own keepalive policy, overriding the server's; `None` keeps the server's.
    fn keepalive(&self) -> Option<Keepalive> {
        None
    }

    /// The largest inbound frame this protocol expects when the server is not told otherwise.
    fn default_max_frame_bytes(&self) -> usize {
        64 * 1024
    }

    /// The largest frame this protocol sends. The runtime sizes each socket's write-buffer bound
    /// to hold one, so a legitimate large frame is never mistaken for a stuck peer.
    fn max_outbound_frame_bytes(&self) -> usize {
        4 * 1024 * 1024
    }

    /// Plain HTTP routes (a REST API, a status page). `None` means 404.
    fn http(
        &self,
        _engine: &Engine,
        _request: HttpRequest,
    ) -> impl Future<Output = Option<HttpResponse>> + Send {
        async { None }
    }

    /// Something changed in the engine that no connection of this node did, e.g. a member of
    /// a presence room expired because its node disappeared. Runs on one node-wide task, one
    /// event at a time; the default ignores events.
    fn on_engine_event(
        &self,
        _engine: &Engine,
        _event: EngineEvent,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }
}
