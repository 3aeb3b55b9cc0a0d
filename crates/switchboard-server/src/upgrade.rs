//! The HTTP edge: WebSocket upgrades (checks, admission, handoff to a connection task) and
//! plain HTTP requests routed to the protocol.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use switchboard_core::{
    Caller, ClientKey, Handshake, HttpRequest, HttpResponse, Identity, Keepalive, Protocol, Reject,
    Shares, TokenBuckets, peer_channel_bounded,
};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::{debug, info, warn};

use crate::auth::{self, AuthError, JwtVerifier};
use crate::connection::{self, Access, ConnectionContext};
use crate::metered::{Metered, ReassemblyPool, Watch};
use crate::metrics::Rejection;
use crate::{ACCESS_TARGET, MAX_TRACKED_CLIENTS, ServerConfig, ServerHandle};

pub(crate) struct App<P> {
    protocol: Arc<P>,
    config: ServerConfig,
    handle: ServerHandle,
    ws_config: WebSocketConfig,
    keepalive: Keepalive,
    max_body: usize,
    /// Open WebSocket connections per client.
    per_client: Arc<Shares<ClientKey>>,
    /// HTTP requests (upgrades included) per client and second.
    request_rate: TokenBuckets<ClientKey>,
    /// Bytes of inbound messages still being received, server-wide and per client.
    reassembly: Arc<ReassemblyPool>,
    /// Each socket's outbound byte bound: the configured backlog plus room for one of the
    /// protocol's largest frames, so a reader that keeps up is never cut because a maximal frame
    /// (a collab resync, a history replay) follows a small one.
    queue_bytes: usize,
}

impl<P: Protocol> App<P> {
    pub(crate) fn new(protocol: Arc<P>, config: ServerConfig, handle: ServerHandle) -> Self {
        let max_frame = config
            .max_frame_bytes
            .unwrap_or_else(|| protocol.default_max_frame_bytes());
        // tungstenite only writes control replies (the connection writes data frames itself,
        // pre-encoded), so it needs no write buffer: each reply goes straight to the socket
        // wrapper's small control buffer.
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(config.read_buffer_bytes.max(256))
            .write_buffer_size(0)
            .max_message_size(Some(max_frame))
            .max_frame_size(Some(max_frame));
        let keepalive = protocol.keepalive().unwrap_or(config.keepalive);
        let max_body = config.max_http_body_bytes.unwrap_or(max_frame);
        let per_client = Arc::new(Shares::new(
            config.max_connections_per_ip,
            MAX_TRACKED_CLIENTS,
        ));
        let request_rate = TokenBuckets::new(
            config.requests_per_ip_burst,
            config.requests_per_ip_per_second,
            MAX_TRACKED_CLIENTS,
        );
        let reassembly = handle.reassembly.clone();
        let queue_bytes = config
            .outbound_queue_bytes
            .saturating_add(protocol.max_outbound_frame_bytes());
        Self {
            protocol,
            config,
            handle,
            ws_config,
            keepalive,
            max_body,
            per_client,
            request_rate,
            reassembly,
            queue_bytes,
        }
    }
}

/// Counts one open connection for as long as it lives.
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    fn take(active: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        let before = active.fetch_add(1, Ordering::AcqRel);
        if before >= max {
            active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(active.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) async fn entry<P: Protocol>(
    State(app): State<Arc<App<P>>>,
    request: Request,
) -> Response {
    // The peer and the client IP behind it, resolved once for the rate check, admission and
    // the protocol's HTTP handler.
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(remote)| {
            let ip = client_ip(*remote, request.headers(), app.config.trust_proxy);
            (*remote, ip)
        });
    if let Some((_, ip)) = peer {
        let key = ClientKey::from_ip(ip);
        if !app.request_rate.check(&key) {
            app.handle
                .counters
                .rate_limited
                .fetch_add(1, Ordering::Relaxed);
            debug!(client = %key, "request refused: over the per-client request rate");
            let message = "too many requests from this address";
            if is_websocket_upgrade(request.headers()) {
                let path = request.uri().path();
                return refuse(&app, Rejection::Rate, 429, message, path, Some(ip));
            }
            app.handle.counters.metrics.rejected(Rejection::Rate);
            return error_response(429, message);
        }
    }
    if is_websocket_upgrade(request.headers()) {
        upgrade(app, request, peer)
    } else {
        plain_http(app, request, peer.map(|(_, ip)| ip)).await
    }
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

fn error_response(status: u16, message: &str) -> Response {
    to_response(HttpResponse::json_error(status, message))
}

fn to_response(response: HttpResponse) -> Response {
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, response.content_type)],
        response.body,
    )
        .into_response()
}

/// Longest path the access log keeps (the header size cap bounds the rest, but a log line
/// need not carry 16 KiB of it).
const MAX_LOGGED_PATH: usize = 256;

/// `path` cut to [`MAX_LOGGED_PATH`] bytes on a character boundary.
fn logged_path(path: &str) -> &str {
    if path.len() <= MAX_LOGGED_PATH {
        return path;
    }
    let mut end = MAX_LOGGED_PATH;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

/// Counts a refused upgrade, writes its access-log line (at most
/// `REFUSAL_LOGS_PER_SECOND` a second) and builds the error response. `path` never holds the
/// query string, which may carry a token.
fn refuse<P>(
    app: &App<P>,
    why: Rejection,
    status: u16,
    message: &str,
    path: &str,
    client_ip: Option<IpAddr>,
) -> Response {
    log_refusal(app, why, status, message, path, client_ip);
    error_response(status, message)
}

fn log_refusal<P>(
    app: &App<P>,
    why: Rejection,
    status: u16,
    message: &str,
    path: &str,
    client_ip: Option<IpAddr>,
) {
    let counters = &app.handle.counters;
    counters.metrics.rejected(why);
    if counters.log_refusal() {
        info!(
            target: ACCESS_TARGET,
            protocol = counters.metrics.protocol,
            status,
            reason = why.label(),
            detail = message,
            path = logged_path(path),
            client_ip = client_ip.map(tracing::field::display),
            "upgrade refused"
        );
    }
}

fn upgrade<P: Protocol>(
    app: Arc<App<P>>,
    mut request: Request,
    peer: Option<(SocketAddr, IpAddr)>,
) -> Response {
    let path: Box<str> = logged_path(request.uri().path()).into();
    let ip = peer.map(|(_, ip)| ip);
    let bad = |message: &str| refuse(&app, Rejection::BadRequest, 400, message, &path, ip);
    let headers = request.headers();
    if request.method() != Method::GET {
        return refuse(
            &app,
            Rejection::BadRequest,
            405,
            "WebSocket upgrades use GET",
            &path,
            ip,
        );
    }
    let connection_has_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
        });
    if !connection_has_upgrade {
        return bad("missing `Connection: upgrade`");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        return bad("unsupported WebSocket version (need 13)");
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return bad("missing Sec-WebSocket-Key");
    };
    let accept = derive_accept_key(key.as_bytes());

    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if let (Some(allowed), Some(origin)) = (&app.config.allowed_origins, origin)
        && !allowed.iter().any(|a| a == origin)
    {
        debug!(origin, "upgrade refused: origin not allowed");
        return refuse(
            &app,
            Rejection::Origin,
            403,
            "origin not allowed",
            &path,
            ip,
        );
    }

    // Signed identity before any share or slot is taken: a refused token costs no more than
    // a request.
    let identity = match &app.config.auth {
        None => None,
        Some(verifier) => match verify(verifier, headers, request.uri().query()) {
            Ok(identity) => Some(identity),
            Err(refused) => {
                app.handle
                    .counters
                    .auth_refusals
                    .fetch_add(1, Ordering::Relaxed);
                debug!(reason = refused.reason(), "upgrade refused: signed token");
                log_refusal(&app, Rejection::Auth, 401, refused.reason(), &path, ip);
                return unauthorized(refused);
            }
        },
    };
    // A token that expires while connected ends the connection (4401) when it does.
    let expires_in = identity.as_ref().and_then(|identity| {
        app.config
            .auth
            .as_ref()
            .and_then(|verifier| verifier.remaining(identity, SystemTime::now()))
    });

    let Some((remote, client_ip)) = peer else {
        warn!(
            "no peer address: serve the router with into_make_service_with_connect_info::<SocketAddr>()"
        );
        return error_response(500, "server misconfigured: peer address unavailable");
    };

    if app.handle.is_shutting_down() {
        return refuse(
            &app,
            Rejection::ShuttingDown,
            503,
            "server shutting down",
            &path,
            ip,
        );
    }
    let client_key = ClientKey::from_ip(client_ip);
    // Held for as long as the connection lives.
    let share = match app.per_client.try_take(client_key) {
        Ok(share) => share,
        Err(refused) => {
            app.handle
                .counters
                .per_client_refusals
                .fetch_add(1, Ordering::Relaxed);
            debug!(client = %client_key, %refused, "upgrade refused: per-client connection share");
            return refuse(
                &app,
                Rejection::PerIp,
                429,
                "too many connections from this address",
                &path,
                ip,
            );
        }
    };
    let Some(slot) = ConnectionSlot::take(&app.handle.active, app.config.max_connections) else {
        debug!(%remote, "upgrade refused: connection limit reached");
        return refuse(
            &app,
            Rejection::Limit,
            503,
            "connection limit reached",
            &path,
            ip,
        );
    };

    let handshake = Handshake {
        path: request.uri().path(),
        query: request.uri().query(),
        remote,
        client_ip,
        origin,
        host: headers.get(header::HOST).and_then(|v| v.to_str().ok()),
        identity: identity.as_ref(),
    };
    let conn = match app.protocol.admit(&handshake) {
        Ok(conn) => conn,
        Err(reject) => {
            debug!(%remote, %reject, "upgrade refused by protocol");
            let message = match &reject {
                Reject::NotFound => "not found".to_owned(),
                other => other.to_string(),
            };
            return refuse(
                &app,
                Rejection::Protocol,
                reject.status(),
                &message,
                &path,
                ip,
            );
        }
    };

    let access = Access {
        path,
        client_ip,
        identity,
        opened: tokio::time::Instant::now(),
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let task_app = app.clone();
    app.handle.tracker.spawn(async move {
        let _slot = slot;
        let _share = share;
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                debug!(%remote, %error, "upgrade failed");
                return;
            }
        };
        // Everything from here lives in one boxed future: a task is as large as its largest
        // state, so building the socket inline here would make every idle task carry a second
        // copy of the socket's size.
        Box::pin(open_connection(
            task_app, conn, upgraded, remote, client_key, expires_in, access,
        ))
        .await;
    });

    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Wraps the upgraded socket (metering, WebSocket codec, outbound queue) and runs the
/// connection until it ends.
// Not an `async fn`: those keep each argument twice in their state machine (see
// `connection::run`).
#[allow(clippy::manual_async_fn)]
fn open_connection<P: Protocol>(
    app: Arc<App<P>>,
    conn: P::Conn,
    upgraded: hyper::upgrade::Upgraded,
    remote: SocketAddr,
    client_key: ClientKey,
    expires_in: Option<Duration>,
    access: Access,
) -> impl Future<Output = ()> + Send {
    async move {
        let watch = Arc::new(Watch::default());
        let io = Metered::new(
            TokioIo::new(upgraded),
            watch.clone(),
            app.reassembly.clone(),
            client_key,
        );
        let socket = WebSocketStream::from_raw_socket(io, Role::Server, Some(app.ws_config)).await;
        let (peer, link) = peer_channel_bounded(remote, app.config.outbound_queue, app.queue_bytes);
        debug!(conn = %peer.id(), %remote, client_ip = %access.client_ip, "connection open");
        app.handle.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let metrics = &app.handle.counters.metrics;
        metrics.accepted.increment(1);
        metrics.open.increment(1.0);
        let _open = OpenGauge(metrics.open.clone());
        let _registered = app.handle.open.add(&peer);
        let ctx = ConnectionContext {
            counters: app.handle.counters.clone(),
            keepalive: app.keepalive,
            close_timeout: app.config.close_timeout,
            write_timeout: app.config.write_timeout,
            message_timeout: app.config.message_timeout,
            watch,
            engine: app.config.engine.clone(),
            expires_at: expires_in.map(|left| tokio::time::Instant::now() + left),
            access,
        };
        connection::run(app.protocol.clone(), conn, socket, peer, link, ctx).await;
    }
}

/// Takes one connection off the open-connections gauge when it ends, however it ends.
struct OpenGauge(::metrics::Gauge);

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The verified identity of a request's token (header, else `?token=`).
fn verify(
    verifier: &JwtVerifier,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Identity, AuthError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = auth::token_from(authorization, query).ok_or(AuthError::Missing)?;
    verifier.verify(&token)
}

/// 401 with the reason and the RFC 6750 challenge.
fn unauthorized(refused: AuthError) -> Response {
    let mut response = error_response(401, refused.reason());
    let challenge = match refused {
        AuthError::Missing => HeaderValue::from_static("Bearer"),
        _ => HeaderValue::from_static("Bearer error=\"invalid_token\""),
    };
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, challenge);
    response
}

/// The client's IP: the TCP peer, or with a trusted proxy the last `X-Forwarded-For` entry (the
/// address our proxy saw; earlier entries are client-supplied and could be forged).
fn client_ip(remote: SocketAddr, headers: &HeaderMap, trust_proxy: bool) -> IpAddr {
    let peer_ip = remote.ip().to_canonical();
    if !trust_proxy {
        return peer_ip;
    }
    // Only the very last entry is trusted; if it is garbage, fall back to the TCP peer rather
    // than to an earlier, client-controlled entry.
    headers
        .get_all("x-forwarded-for")
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .and_then(|entry| entry.trim().parse::<IpAddr>().ok())
        .map_or(peer_ip, |ip| ip.to_canonical())
}

async fn plain_http<P: Protocol>(
    app: Arc<App<P>>,
    request: Request,
    client_ip: Option<IpAddr>,
) -> Response {
    let (parts, body) = request.into_parts();
    let client_ip = client_ip.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let body = match tokio::time::timeout(
        app.config.body_timeout,
        axum::body::to_bytes(body, app.max_body),
    )
    .await
    {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => return error_response(413, "request body too large"),
        Err(_) => return error_response(408, "request body not received in time"),
    };
    let caller = match &app.config.auth {
        None => Caller::Open,
        Some(verifier) => match verify(verifier, &parts.headers, parts.uri.query()) {
            Ok(identity) => Caller::Verified(identity),
            Err(AuthError::Missing) => Caller::Anonymous,
            Err(refused) => {
                app.handle
                    .counters
                    .auth_refusals
                    .fetch_add(1, Ordering::Relaxed);
                debug!(reason = refused.reason(), "request refused: signed token");
                return unauthorized(refused);
            }
        },
    };
    let request = HttpRequest {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        body,
        host: parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        client_ip,
        caller,
    };
    match app.protocol.http(&app.config.engine, request).await {
        Some(response) => to_response(response),
        None => error_response(404, "not found"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_used_only_when_trusted() {
        let remote: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 2.2.2.2"),
        );
        assert_eq!(client_ip(remote, &headers, false), remote.ip());
        assert_eq!(
            client_ip(remote, &headers, true),
            "2.2.2.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_ip(remote, &HeaderMap::new(), true), remote.ip());
    }

    #[test]
    fn v4_mapped_addresses_are_canonical() {
        let remote: SocketAddr = "[::ffff:127.0.0.2]:5000".parse().unwrap();
        assert_eq!(
            client_ip(remote, &HeaderMap::new(), false),
            "127.0.0.2".parse::<IpAddr>().unwrap()
        );
    }
}
