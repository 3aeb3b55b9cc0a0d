//! The TCP edge: accepts connections and serves HTTP/1.1 on them with bounds that axum's own
//! `serve` does not set: a header-read timeout, a header size cap, and a cap on connections not
//! (yet) upgraded to WebSocket, server-wide and per client. Without them a client could hold
//! thousands of half-sent requests, each with a growing header buffer and a file descriptor.
//!
//! With TLS ([`crate::serve_tls`]) the handshake happens inside the same bounds: it counts as a
//! pending connection and must finish within the header-read timeout, then hyper serves
//! HTTP/1.1 over the TLS stream exactly as over plain TCP. Without TLS nothing of this runs: the
//! plain path serves the `TcpStream` itself.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use switchboard_core::{ClientKey, ShareGuard, Shares};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower_service::Service;
use tracing::{debug, error};

use crate::metrics::Rejection;
use crate::{MAX_TRACKED_CLIENTS, ServerHandle};

/// The edge's limits, taken from [`crate::ServerConfig`] when the router is built.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EdgeLimits {
    pub(crate) max_pending: usize,
    pub(crate) max_pending_per_ip: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) max_header_bytes: usize,
    /// Behind a trusted proxy every TCP peer is the proxy: per-client TCP counts would throttle
    /// everyone at once, so only the server-wide cap applies there.
    pub(crate) trust_proxy: bool,
}

/// How long a refusal (a bare 429/503) may take to write before the socket is dropped.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Pause after an accept error such as running out of file descriptors, so the loop does not
/// spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(200);

/// Answer to a plain HTTP request on a TLS port: a client that forgot `https://` learns why
/// instead of seeing the connection drop.
const PLAIN_HTTP_ON_TLS_PORT: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 56\r\nconnection: close\r\n\r\n{\"error\":\"this port speaks TLS: use https:// or wss://\"}";

/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// One not-yet-upgraded connection: counted server-wide and per client while it lives.
struct Pending {
    count: Arc<AtomicUsize>,
    _per_client: Option<ShareGuard<ClientKey>>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a new connection is refused before HTTP is spoken.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    ServerBusy,
    ClientBusy,
}

impl Refusal {
    fn response(self) -> &'static [u8] {
        match self {
            Self::ServerBusy => {
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 36\r\nconnection: close\r\n\r\n{\"error\":\"too many pending requests\"}"
            }
            Self::ClientBusy => {
                b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: 48\r\nconnection: close\r\n\r\n{\"error\":\"too many connections from this address\"}"
            }
        }
    }
}

pub(crate) async fn accept_loop(
    listener: TcpListener,
    router: Router,
    handle: &ServerHandle,
    limits: EdgeLimits,
    tls: Option<TlsAcceptor>,
) {
    let pending = Arc::new(AtomicUsize::new(0));
    let per_client = Arc::new(Shares::new(limits.max_pending_per_ip, MAX_TRACKED_CLIENTS));
    let shutdown = handle.shutdown.clone();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(error) if is_connection_error(&error) => continue,
            Err(error) => {
                error!(%error, "accept error: {error}");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        if let Err(error) = stream.set_nodelay(true) {
            debug!(%error, "could not set TCP_NODELAY");
        }
        let before = pending.fetch_add(1, Ordering::AcqRel);
        let mut guard = Pending {
            count: pending.clone(),
            _per_client: None,
        };
        if before >= limits.max_pending {
            handle
                .counters
                .pending_refusals
                .fetch_add(1, Ordering::Relaxed);
            handle.counters.metrics.rejected(Rejection::Pending);
            debug!(%remote, "connection refused: too many pending connections");
            tokio::spawn(refuse(stream, Refusal::ServerBusy, guard));
            continue;
        }
        if !limits.trust_proxy {
            let key = ClientKey::from_ip(remote.ip());
            match per_client.try_take(key) {
                Ok(share) => guard._per_client = Some(share),
                Err(_) => {
                    handle
                        .counters
                        .per_client_refusals
                        .fetch_add(1, Ordering::Relaxed);
                    handle.counters.metrics.rejected(Rejection::PendingPerIp);
                    debug!(client = %key, "connection refused: per-client pending share");
                    tokio::spawn(refuse(stream, Refusal::ClientBusy, guard));
                    continue;
                }
            }
        }
        match &tls {
            None => tokio::spawn(serve_connection(
                stream,
                remote,
                router.clone(),
                limits,
                shutdown.clone(),
                guard,
            )),
            Some(acceptor) => tokio::spawn(serve_tls_connection(
                acceptor.clone(),
                stream,
                remote,
                router.clone(),
                limits,
                shutdown.clone(),
                guard,
            )),
        };
    }
}

/// Errors that concern one connection only (it was reset before we took it).
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn refuse(mut stream: TcpStream, refusal: Refusal, _guard: Pending) {
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        stream.write_all(refusal.response()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Completes the TLS handshake (still pending, bounded by the header-read timeout), then serves
/// HTTP/1.1 over the TLS stream. A plain HTTP request gets a bare 400 saying the port speaks TLS;
/// any other failed handshake just closes the connection.
async fn serve_tls_connection(
    acceptor: TlsAcceptor,
    mut stream: TcpStream,
    remote: SocketAddr,
    router: Router,
    limits: EdgeLimits,
    shutdown: CancellationToken,
    guard: Pending,
) {
    let handshake = async {
        let mut first = [0_u8; 1];
        let peeked = stream.peek(&mut first).await?;
        if peeked == 0 {
            return Ok(None);
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            if first[0].is_ascii_uppercase() {
                stream.write_all(PLAIN_HTTP_ON_TLS_PORT).await?;
                stream.shutdown().await?;
            }
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a TLS handshake",
            ));
        }
        acceptor.accept(stream).await.map(Some)
    };
    let accepted = tokio::select! {
        () = shutdown.cancelled() => return,
        accepted = tokio::time::timeout(limits.header_read_timeout, handshake) => accepted,
    };
    match accepted {
        Ok(Ok(Some(tls))) => {
            serve_connection(tls, remote, router, limits, shutdown, guard).await;
        }
        Ok(Ok(None)) => debug!(%remote, "closed before the TLS handshake"),
        Ok(Err(error)) => debug!(%remote, %error, "TLS handshake failed"),
        Err(_) => debug!(%remote, "TLS handshake timed out"),
    }
}

async fn serve_connection<S>(
    stream: S,
    remote: SocketAddr,
    router: Router,
    limits: EdgeLimits,
    shutdown: CancellationToken,
    _guard: Pending,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(remote));
        let mut router = router.clone();
        async move { Ok::<_, Infallible>(router.call(request).await.unwrap_or_else(|e| match e {})) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                debug!(%remote, %error, "HTTP connection ended with an error");
            }
        }
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.header_read_timeout, connection).await;
        }
    }
}
