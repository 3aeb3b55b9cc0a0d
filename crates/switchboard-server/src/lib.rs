//! The Switchboard runtime: serves any [`switchboard_core::Protocol`] over HTTP and WebSocket.
//!
//! [`router`] turns a protocol into an axum [`Router`] that answers `GET /healthz` (liveness),
//! `GET /readyz` (the state engine can serve) and `GET /status` (uptime, connections, engine
//! state and the limits in force, as JSON or HTML), upgrades WebSocket requests (origin check,
//! connection limit, protocol admission) and routes every other request to the protocol's plain
//! HTTP handler. Mount it at the root with [`serve`] (or [`serve_tls`] for `https://` and
//! `wss://`, see [`tls`]), or nest it
//! inside your own axum application next to your own routes. Each upgraded socket runs on its
//! own task with a bounded outbound queue, keepalive, a frame-size limit and a clean close.
//! Prometheus metrics go through the `metrics` facade; [`metrics`] installs the recorder and
//! serves the exposition on a listener of its own. Each WebSocket session and each refused
//! upgrade is one `info` line on the `switchboard::access` target.
//!
//! ```no_run
//! # async fn run<P: switchboard_core::Protocol>(protocol: P) -> std::io::Result<()> {
//! use switchboard_server::{ServerConfig, bind, router, serve};
//! let config = ServerConfig::default();
//! let (app, handle) = router(std::sync::Arc::new(protocol), config.clone());
//! let listener = bind("127.0.0.1:8000".parse().unwrap(), config.accept_backlog)?;
//! tokio::spawn(switchboard_server::shutdown_on_signal(handle.clone()));
//! serve(listener, app, &handle, config.shutdown_grace).await
//! # }
//! ```

pub mod auth;
mod config;
mod connection;
mod edge;
mod metered;
pub mod metrics;
mod peers;
mod status;
pub mod tls;
mod upgrade;
mod wire;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use switchboard_core::{Engine, Protocol};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use auth::{JwtOptions, JwtVerifier};
pub use config::ServerConfig;

/// Distinct clients each per-client table of the runtime tracks (connections, pending
/// connections, request rates, partial-message bytes); beyond it a flood of new addresses is
/// refused until entries age out. Each entry is a few dozen bytes: ~6 MiB per table at the bound.
pub(crate) const MAX_TRACKED_CLIENTS: usize = 100_000;

/// Counters of a running router, for operators and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RuntimeStats {
    /// WebSocket connections open now.
    pub open_connections: usize,
    /// WebSocket connections accepted since start.
    pub accepted_total: u64,
    /// Connections closed because their outbound queue overflowed.
    pub slow_consumers_total: u64,
    /// Connections closed for sending an oversized message.
    pub oversized_total: u64,
    /// Connections dropped by the idle timeout.
    pub idle_timeouts_total: u64,
    /// Connections closed because their writes made no progress for the write timeout.
    pub write_timeouts_total: u64,
    /// Connections closed because an inbound message was not completed in time.
    pub message_timeouts_total: u64,
    /// Connections closed (1013) because the server-wide reassembly budget was spent.
    pub reassembly_refusals_total: u64,
    /// Connections closed (1007) for invalid UTF-8 in a text message.
    pub invalid_utf8_total: u64,
    /// Requests and connections refused (429) because one client held its whole share.
    pub per_client_refusals_total: u64,
    /// Requests refused (429) for the per-client request rate.
    pub rate_limited_total: u64,
    /// Connections refused (503) because too many were pending server-wide.
    pub pending_refusals_total: u64,
    /// Upgrades and requests refused (401) for a missing or invalid signed token.
    pub auth_refusals_total: u64,
    /// Connections closed (4401) because their token expired while they were open.
    pub token_expiries_total: u64,
    /// Bytes of partly received inbound messages held now, server-wide.
    pub reassembly_bytes: usize,
}

#[derive(Debug)]
pub(crate) struct Counters {
    /// The Prometheus handles of this router's protocol.
    pub(crate) metrics: metrics::RuntimeMetrics,
    /// Advanced once a second while the router runs: a socket adds its traffic to the shared
    /// counters when it sees a new value, so busy sockets flush about once a second and the
    /// hot path reads one mostly-unchanging atomic instead of a clock.
    pub(crate) epoch: AtomicU64,
    /// Refused upgrades logged in the current epoch, and those left unlogged (see
    /// [`Counters::log_refusal`]).
    refusals_logged: AtomicU64,
    refusals_unlogged: AtomicU64,
    refusals_epoch: AtomicU64,
    pub(crate) accepted: AtomicU64,
    pub(crate) slow_consumers: AtomicU64,
    pub(crate) oversized: AtomicU64,
    pub(crate) idle_timeouts: AtomicU64,
    pub(crate) write_timeouts: AtomicU64,
    pub(crate) message_timeouts: AtomicU64,
    pub(crate) reassembly_refusals: AtomicU64,
    pub(crate) invalid_utf8: AtomicU64,
    pub(crate) per_client_refusals: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) pending_refusals: AtomicU64,
    pub(crate) auth_refusals: AtomicU64,
    pub(crate) token_expiries: AtomicU64,
}

/// Refused upgrades logged per second at most: a flood of refusals must not become a flood of
/// log lines (the counters still count every one).
const REFUSAL_LOGS_PER_SECOND: u64 = 100;

impl Counters {
    fn new(protocol: &'static str) -> Self {
        Self {
            metrics: metrics::RuntimeMetrics::new(protocol),
            epoch: AtomicU64::new(1),
            refusals_logged: AtomicU64::new(0),
            refusals_unlogged: AtomicU64::new(0),
            refusals_epoch: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            slow_consumers: AtomicU64::new(0),
            oversized: AtomicU64::new(0),
            idle_timeouts: AtomicU64::new(0),
            write_timeouts: AtomicU64::new(0),
            message_timeouts: AtomicU64::new(0),
            reassembly_refusals: AtomicU64::new(0),
            invalid_utf8: AtomicU64::new(0),
            per_client_refusals: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            pending_refusals: AtomicU64::new(0),
            auth_refusals: AtomicU64::new(0),
            token_expiries: AtomicU64::new(0),
        }
    }

    /// Whether one more refused upgrade may be logged this second. The first call of a new
    /// second reports how many went unlogged in the one before.
    pub(crate) fn log_refusal(&self) -> bool {
        let epoch = self.epoch.load(Ordering::Relaxed);
        let seen = self.refusals_epoch.load(Ordering::Relaxed);
        if seen != epoch
            && self
                .refusals_epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.refusals_logged.store(0, Ordering::Relaxed);
            let unlogged = self.refusals_unlogged.swap(0, Ordering::Relaxed);
            if unlogged > 0 {
                info!(target: ACCESS_TARGET, unlogged, "refused upgrades not logged (over {REFUSAL_LOGS_PER_SECOND} a second)");
            }
        }
        if self.refusals_logged.fetch_add(1, Ordering::Relaxed) < REFUSAL_LOGS_PER_SECOND {
            true
        } else {
            self.refusals_unlogged.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// The `tracing` target of the access log: one line per WebSocket session at its close and
/// one per refused upgrade.
pub const ACCESS_TARGET: &str = "switchboard::access";

/// Controls a running router: shutdown, drain, and live connection counts. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    shutdown: CancellationToken,
    /// Every open WebSocket peer: a shutdown closes each one (the token serves the rest).
    open: Arc<peers::OpenPeers>,
    tracker: TaskTracker,
    active: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    edge: edge::EdgeLimits,
    reassembly: Arc<metered::ReassemblyPool>,
    /// Whether [`serve_tls`] serves this router (for `/status`).
    tls: Arc<AtomicBool>,
}

impl ServerHandle {
    fn new(config: &ServerConfig, protocol: &'static str) -> Self {
        Self {
            shutdown: CancellationToken::new(),
            open: Arc::default(),
            tracker: TaskTracker::new(),
            active: Arc::default(),
            counters: Arc::new(Counters::new(protocol)),
            tls: Arc::default(),
            edge: edge::EdgeLimits {
                max_pending: config.max_pending_connections,
                max_pending_per_ip: config.max_pending_per_ip,
                header_read_timeout: config.header_read_timeout,
                max_header_bytes: config.max_header_bytes,
                trust_proxy: config.trust_proxy,
            },
            reassembly: Arc::new(metered::ReassemblyPool::new(
                config.reassembly_budget_bytes,
                config.reassembly_per_ip_bytes,
            )),
        }
    }

    /// A snapshot of the runtime counters.
    pub fn stats(&self) -> RuntimeStats {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RuntimeStats {
            open_connections: self.connections(),
            accepted_total: load(&self.counters.accepted),
            slow_consumers_total: load(&self.counters.slow_consumers),
            oversized_total: load(&self.counters.oversized),
            idle_timeouts_total: load(&self.counters.idle_timeouts),
            write_timeouts_total: load(&self.counters.write_timeouts),
            message_timeouts_total: load(&self.counters.message_timeouts),
            reassembly_refusals_total: load(&self.counters.reassembly_refusals),
            invalid_utf8_total: load(&self.counters.invalid_utf8),
            per_client_refusals_total: load(&self.counters.per_client_refusals),
            rate_limited_total: load(&self.counters.rate_limited),
            pending_refusals_total: load(&self.counters.pending_refusals),
            auth_refusals_total: load(&self.counters.auth_refusals),
            token_expiries_total: load(&self.counters.token_expiries),
            reassembly_bytes: self.reassembly.used(),
        }
    }

    /// Starts a graceful shutdown: stop accepting, close every socket with 1001.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
        self.open.close_all();
    }

    /// Whether shutdown has started.
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Resolves when shutdown starts.
    pub async fn shutdown_requested(&self) {
        self.shutdown.cancelled().await;
    }

    /// Open WebSocket connections right now.
    pub fn connections(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Waits up to `grace` for every connection task to finish; `true` if they all did.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// Builds the router serving `protocol` with `config`, and the handle that controls it.
///
/// Serve it with [`serve`], or with `axum::serve` using
/// `into_make_service_with_connect_info::<SocketAddr>()`: the runtime needs the peer address.
///
/// Metric handles are registered here: install a recorder ([`metrics::install`]) before
/// calling it, or the router records into the facade's no-op recorder.
pub fn router<P: Protocol>(protocol: Arc<P>, config: ServerConfig) -> (Router, ServerHandle) {
    let handle = ServerHandle::new(&config, protocol.name());
    config.engine.instrument(protocol.name());
    spawn_engine_events(protocol.clone(), config.engine.clone(), &handle);
    spawn_epoch(&handle);
    let engine = config.engine.clone();
    let status = Arc::new(status::Status::new(&*protocol, &config, handle.clone()));
    let state = Arc::new(upgrade::App::new(protocol, config, handle.clone()));
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route(
            "/readyz",
            get(move || {
                let engine = engine.clone();
                async move { readyz(&engine).await }
            }),
        )
        .route(
            "/status",
            get(move |headers: axum::http::HeaderMap| {
                let status = status.clone();
                async move { status.respond(&headers).await }
            }),
        )
        .fallback(upgrade::entry::<P>)
        .with_state(state);
    (router, handle)
}

/// How often the flush epoch advances (see [`Counters::epoch`]).
const EPOCH_INTERVAL: Duration = Duration::from_secs(1);

/// Advances the router's flush epoch every second until shutdown.
fn spawn_epoch(handle: &ServerHandle) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let shutdown = handle.shutdown.clone();
    let counters = handle.counters.clone();
    runtime.spawn(async move {
        let mut every = tokio::time::interval(EPOCH_INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = every.tick() => {
                    counters.epoch.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
}

/// Runs the node-wide task that hands engine events (e.g. presence of a lost node expiring) to
/// the protocol, one at a time, until the server shuts down. Outside a tokio runtime there is
/// nothing to run it on, and nothing to serve either.
fn spawn_engine_events<P: Protocol>(protocol: Arc<P>, engine: Engine, handle: &ServerHandle) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let shutdown = handle.shutdown.clone();
    runtime.spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                event = engine.next_event() => match event {
                    Some(event) => protocol.on_engine_event(&engine, event).await,
                    None => break,
                },
            }
        }
    });
}

async fn healthz() -> &'static str {
    "ok"
}

/// How long `GET /readyz` waits for the engine's answer: a probe that hangs tells a load
/// balancer less than one that says "not ready".
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// 200 while the state engine can serve (always, for the in-process engines), 503 while it
/// cannot (e.g. a cluster engine that has lost its Redis), so a load balancer can take the node
/// out of rotation without restarting it (`/healthz` stays 200).
async fn readyz(engine: &Engine) -> (StatusCode, &'static str) {
    if tokio::time::timeout(READY_TIMEOUT, engine.ready())
        .await
        .unwrap_or(false)
    {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "engine unavailable")
    }
}

/// Binds a TCP listener with a deliberate accept backlog.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Serves `router` on `listener` until `handle` shuts down, then drains sockets for at most
/// `grace`.
///
/// This is the edge the router was built for: HTTP/1.1 with a header-read timeout and a header
/// size cap, and a cap on connections not yet upgraded to WebSocket, server-wide and per client
/// (all from the [`ServerConfig`] given to [`router`]). An embedder that serves the router with
/// its own loop (e.g. `axum::serve`) keeps every WebSocket limit but should bound its own
/// HTTP edge. Accept errors (such as running out of file descriptors) are logged and retried
/// after a pause; they never end the server.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    handle: &ServerHandle,
    grace: Duration,
) -> io::Result<()> {
    serve_edge(listener, router, handle, grace, None).await
}

/// [`serve`] over TLS: `https://` and `wss://` with the certificate of `tls`.
///
/// Everything [`serve`] does applies unchanged; in addition each connection's TLS handshake
/// counts as a pending connection and must finish within the header-read timeout (a client
/// that never finishes it is dropped), and a plain HTTP request on the port gets a bare 400
/// saying it speaks TLS. [`tls::TlsConfig::reload`] (or [`tls::reload_on_sighup`]) swaps the
/// certificate for new handshakes while this runs; open connections keep theirs.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    handle: &ServerHandle,
    grace: Duration,
    tls: &tls::TlsConfig,
) -> io::Result<()> {
    serve_edge(listener, router, handle, grace, Some(tls.acceptor())).await
}

async fn serve_edge(
    listener: TcpListener,
    router: Router,
    handle: &ServerHandle,
    grace: Duration,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    handle.tls.store(tls.is_some(), Ordering::Relaxed);
    info!(%local, tls = tls.is_some(), "listening");
    edge::accept_loop(listener, router, handle, handle.edge, tls).await;
    let open = handle.connections();
    info!(open, "stopped accepting; closing connections");
    if !handle.drain(grace).await {
        warn!(
            left = handle.connections(),
            "drain timed out; dropping remaining connections"
        );
    }
    Ok(())
}

/// A process signal that asks for a graceful stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// Ctrl-C.
    Interrupt,
    /// `kill` / a service manager.
    Terminate,
}

/// Resolves on the first SIGINT or SIGTERM. Used by the server and by clients (teambot) alike.
///
/// On Unix the handlers are installed by the call itself, not on the first poll: a signal that
/// arrives after `stop_signal()` returns is caught even if the future is spawned and has not
/// run yet (otherwise a `kill` right after "listening" could find the default action and kill
/// the process). Elsewhere only Ctrl-C is watched, from the first poll. Must be called inside
/// a tokio runtime.
pub fn stop_signal() -> impl Future<Output = StopSignal> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt()).ok();
        let terminate = signal(SignalKind::terminate()).ok();
        async move {
            let interrupt = wait_unix(interrupt);
            let terminate = wait_unix(terminate);
            tokio::select! {
                () = interrupt => StopSignal::Interrupt,
                () = terminate => StopSignal::Terminate,
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            StopSignal::Interrupt
        }
    }
}

/// Waits for the next delivery of a watched signal; forever if it could not be watched.
#[cfg(unix)]
async fn wait_unix(signal: Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(mut signal) => {
            if signal.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// Starts `handle`'s shutdown on SIGINT or SIGTERM. Like [`stop_signal`], the handlers are
/// installed by the call, so spawn it before the server says it is listening.
pub fn shutdown_on_signal(handle: ServerHandle) -> impl Future<Output = ()> + Send + 'static {
    let signal = stop_signal();
    async move {
        match signal.await {
            StopSignal::Interrupt => info!("SIGINT received"),
            StopSignal::Terminate => info!("SIGTERM received"),
        }
        handle.shutdown();
    }
}
