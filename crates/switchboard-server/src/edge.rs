//! The TCP edge: accepts connections and serves HTTP/1.1 on them with bounds that axum's own
//! `serve` does not set: a header-read timeout, a header size cap, and a cap on connections not
//! (yet) upgraded to WebSocket, server-wide and per client. Without them a client could hold
//! thousands of half-sent requests, each with a growing header buffer and a file descriptor.

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
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower_service::Service;
use tracing::{debug, error};

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
                    debug!(client = %key, "connection refused: per-client pending share");
                    tokio::spawn(refuse(stream, Refusal::ClientBusy, guard));
                    continue;
                }
            }
        }
        tokio::spawn(serve_connection(
            stream,
            remote,
            router.clone(),
            limits,
            shutdown.clone(),
            guard,
        ));
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

async fn serve_connection(
    stream: TcpStream,
    remote: SocketAddr,
    router: Router,
    limits: EdgeLimits,
    shutdown: CancellationToken,
    _guard: Pending,
) {
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
