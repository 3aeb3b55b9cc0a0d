//! Runtime flags shared by every protocol, and the code that serves a protocol with them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use switchboard_core::engine::MemoryLimits;
use switchboard_core::{Engine, Keepalive, Protocol};
use switchboard_engine_durable::{DurableEngine, DurableLimits};
use switchboard_engine_redis::{RedisConfig, RedisEngine};
use switchboard_server::tls::TlsConfig;
use switchboard_server::{JwtOptions, JwtVerifier, ServerConfig};

use crate::CliError;

/// Flags of the shared runtime (limits, keepalive, shutdown).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Runtime")]
pub(crate) struct RuntimeArgs {
    /// Origins allowed to open a WebSocket, comma-separated (default: any).
    #[arg(long, env = "SWITCHBOARD_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub(crate) allowed_origins: Vec<String>,
    /// Largest inbound WebSocket message in bytes; larger ones close the socket with 1009
    /// (default: the protocol's, 64 KiB for most).
    #[arg(long, env = "SWITCHBOARD_MAX_FRAME_BYTES")]
    pub(crate) max_frame_bytes: Option<usize>,
    /// Open WebSocket connections at most; further upgrades get HTTP 503.
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub(crate) max_connections: usize,
    /// Outbound queue per connection (items); a full queue disconnects a slow consumer (1008).
    #[arg(long, env = "SWITCHBOARD_OUTBOUND_QUEUE", default_value_t = 16 * 1024)]
    pub(crate) outbound_queue: usize,
    /// Outbound queue per connection in bytes (each recipient counts a shared frame in full);
    /// over it the client is disconnected as a slow consumer (1008).
    #[arg(long, env = "SWITCHBOARD_OUTBOUND_QUEUE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub(crate) outbound_queue_bytes: usize,
    /// Close a socket (1008) whose writes make no progress for this long, e.g. 10s.
    #[arg(long, env = "SWITCHBOARD_WRITE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub(crate) write_timeout: Duration,
    /// Close a socket (1008) that leaves an inbound message unfinished for this long, e.g. 10s.
    #[arg(long, env = "SWITCHBOARD_MESSAGE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub(crate) message_timeout: Duration,
    /// Server-wide memory of partly received inbound messages (charged at twice the bytes
    /// received); a socket that would exceed it is closed with 1013.
    #[arg(long, env = "SWITCHBOARD_REASSEMBLY_BUDGET_BYTES", default_value_t = 128 * 1024 * 1024)]
    pub(crate) reassembly_budget_bytes: usize,
    /// One client IP's share of --reassembly-budget-bytes.
    #[arg(long, env = "SWITCHBOARD_REASSEMBLY_PER_IP_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub(crate) reassembly_per_ip_bytes: usize,
    /// Open WebSocket connections per client IP (IPv6: per /64); the next upgrade gets HTTP 429
    /// (0: no per-client limit).
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_CONNECTIONS_PER_IP",
        default_value_t = 256
    )]
    pub(crate) max_connections_per_ip: usize,
    /// HTTP requests and upgrades per client IP per second, after a burst of
    /// --requests-per-ip-burst; over it HTTP 429.
    #[arg(
        long,
        env = "SWITCHBOARD_REQUESTS_PER_IP_PER_SECOND",
        default_value_t = 100
    )]
    pub(crate) requests_per_ip_per_second: u32,
    /// Requests one client IP may make at once before the per-second rate applies (0: no limit).
    #[arg(long, env = "SWITCHBOARD_REQUESTS_PER_IP_BURST", default_value_t = 512)]
    pub(crate) requests_per_ip_burst: u32,
    /// TCP connections not upgraded to WebSocket (plain HTTP, handshakes), server-wide; over it
    /// a bare HTTP 503.
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_PENDING_CONNECTIONS",
        default_value_t = 4096
    )]
    pub(crate) max_pending_connections: usize,
    /// Not-yet-upgraded TCP connections per client IP; over it a bare HTTP 429 (0: no limit).
    #[arg(long, env = "SWITCHBOARD_MAX_PENDING_PER_IP", default_value_t = 256)]
    pub(crate) max_pending_per_ip: usize,
    /// A request's headers must arrive within this long, e.g. 10s.
    #[arg(long, env = "SWITCHBOARD_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub(crate) header_read_timeout: Duration,
    /// Largest request header block in bytes (at least 8192).
    #[arg(long, env = "SWITCHBOARD_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub(crate) max_header_bytes: usize,
    /// A plain HTTP request body must arrive within this long (else HTTP 408), e.g. 10s.
    #[arg(long, env = "SWITCHBOARD_BODY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub(crate) body_timeout: Duration,
    /// WebSocket ping interval, e.g. 30s; 0 disables pings.
    #[arg(long, env = "SWITCHBOARD_PING_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub(crate) ping_interval: Duration,
    /// Drop a peer silent for this long, e.g. 60s.
    #[arg(long, env = "SWITCHBOARD_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub(crate) idle_timeout: Duration,
    /// Trust the last X-Forwarded-For entry as the client IP (only behind your own proxy).
    #[arg(long, env = "SWITCHBOARD_TRUST_PROXY")]
    pub(crate) trust_proxy: bool,
    /// How long shutdown waits for sockets to close, e.g. 5s.
    #[arg(long, env = "SWITCHBOARD_SHUTDOWN_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub(crate) shutdown_grace: Duration,
    /// tungstenite read buffer per socket, in bytes.
    #[arg(long, env = "SWITCHBOARD_READ_BUFFER_BYTES", default_value_t = 1024)]
    pub(crate) read_buffer_bytes: usize,
    /// TCP accept backlog.
    #[arg(long, env = "SWITCHBOARD_ACCEPT_BACKLOG", default_value_t = 4096)]
    pub(crate) accept_backlog: u32,
    /// Budget in bytes for the protocol's stored state (history, documents, queues, outboxes):
    /// the state engine's bound (in memory, or in --data-dir), and each protocol's own; when it
    /// is reached new work is refused with the protocol's error.
    #[arg(long, env = "SWITCHBOARD_MAX_STATE_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub(crate) max_state_bytes: usize,
    /// Keep the state engine's logs, keyed state and idempotency records in this directory
    /// (created if missing), so they survive a restart or a crash; without it, state lives in
    /// memory and is gone when the process stops. One process per directory.
    #[arg(long, env = "SWITCHBOARD_DATA_DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// Keep the state in a shared engine instead: `redis://HOST:PORT[/DB]` makes this node one
    /// of a cluster whose nodes share logs, presence, keyed state and rate limits through that
    /// Redis (or Valkey). Cannot be combined with --data-dir.
    #[arg(long, env = "SWITCHBOARD_ENGINE", value_name = "URL")]
    pub(crate) engine: Option<String>,
    /// The cluster this node joins on --engine's Redis: nodes with the same name share state,
    /// other names on the same Redis are separate clusters (1 to 64 of A-Z a-z 0-9 - _ .).
    #[arg(
        long,
        env = "SWITCHBOARD_CLUSTER_NAME",
        value_name = "NAME",
        default_value = RedisConfig::DEFAULT_CLUSTER_NAME
    )]
    pub(crate) cluster_name: String,
    /// Serve https:// and wss:// with this PEM certificate chain (the server's certificate
    /// first); needs --tls-key. Re-read with the key on SIGHUP without dropping connections.
    #[arg(
        long,
        env = "SWITCHBOARD_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1); needs --tls-cert.
    #[arg(
        long,
        env = "SWITCHBOARD_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub(crate) tls_key: Option<PathBuf>,
    /// Signed identity with HS256: every WebSocket upgrade needs a JWT (`Authorization: Bearer`
    /// or `?token=`) signed with the shared secret in this file (at least 32 bytes), else HTTP
    /// 401; its `sub` is the user. See docs/security.md.
    #[arg(
        long,
        env = "SWITCHBOARD_AUTH_JWT_SECRET_FILE",
        value_name = "FILE",
        conflicts_with = "auth_jwt_public_key"
    )]
    pub(crate) auth_jwt_secret_file: Option<PathBuf>,
    /// Signed identity with RS256 (an RSA key) or ES256 (a P-256 key): the token issuer's public
    /// key in PEM.
    #[arg(long, env = "SWITCHBOARD_AUTH_JWT_PUBLIC_KEY", value_name = "FILE")]
    pub(crate) auth_jwt_public_key: Option<PathBuf>,
    /// With signed identity: the token's `aud` must contain this.
    #[arg(long, env = "SWITCHBOARD_AUTH_JWT_AUDIENCE", value_name = "AUD")]
    pub(crate) auth_jwt_audience: Option<String>,
    /// With signed identity: the token's `iss` must equal this.
    #[arg(long, env = "SWITCHBOARD_AUTH_JWT_ISSUER", value_name = "ISS")]
    pub(crate) auth_jwt_issuer: Option<String>,
    /// With signed identity: clock skew tolerated on the token's `exp` and `nbf`, e.g. 30s.
    #[arg(long, env = "SWITCHBOARD_AUTH_JWT_LEEWAY", default_value = "30s", value_parser = parse_duration)]
    pub(crate) auth_jwt_leeway: Duration,
    /// Serve Prometheus metrics at `GET /metrics` on this separate address, e.g.
    /// 127.0.0.1:9100 (default: off, so metrics are never public by accident). See
    /// docs/operations.md.
    #[arg(long, env = "SWITCHBOARD_METRICS_LISTEN", value_name = "ADDR")]
    pub(crate) metrics_listen: Option<SocketAddr>,
}

impl RuntimeArgs {
    /// The server's configuration, with its state engine: shared at `--engine`'s URL when given,
    /// durable in `--data-dir` when given (an unusable directory is an error: nothing is wiped
    /// to get past it), else in memory. Must run inside the tokio runtime: the Redis engine
    /// connects in the background from the start.
    ///
    /// With `--metrics-listen` it first installs the Prometheus recorder (before the engine and
    /// the router register their metrics) and starts serving `/metrics` on that address for
    /// the life of the process: scrapes keep working while the server drains.
    pub(crate) fn config(&self) -> Result<ServerConfig, CliError> {
        if let Some(addr) = self.metrics_listen {
            start_metrics(addr)?;
        }
        let engine = match (&self.engine, &self.data_dir) {
            (Some(_), Some(_)) => return Err(CliError::EngineWithDataDir),
            (Some(url), None) => self.shared_engine(url)?,
            // Bounded by the same state budget the protocols check against, like the memory
            // engine below.
            (None, Some(dir)) => DurableEngine::engine(
                dir,
                DurableLimits {
                    max_bytes: self.max_state_bytes,
                    ..DurableLimits::default()
                },
            )?,
            // The embedded default: everything shared lives in this process.
            (None, None) => Engine::memory(MemoryLimits {
                max_bytes: self.max_state_bytes,
                ..MemoryLimits::default()
            }),
        };
        Ok(ServerConfig {
            allowed_origins: (!self.allowed_origins.is_empty())
                .then(|| self.allowed_origins.clone()),
            max_frame_bytes: self.max_frame_bytes,
            outbound_queue: self.outbound_queue,
            outbound_queue_bytes: self.outbound_queue_bytes,
            write_timeout: self.write_timeout,
            message_timeout: self.message_timeout,
            reassembly_budget_bytes: self.reassembly_budget_bytes,
            reassembly_per_ip_bytes: self.reassembly_per_ip_bytes,
            max_connections_per_ip: self.max_connections_per_ip,
            requests_per_ip_per_second: self.requests_per_ip_per_second,
            requests_per_ip_burst: self.requests_per_ip_burst,
            max_pending_connections: self.max_pending_connections,
            max_pending_per_ip: self.max_pending_per_ip,
            header_read_timeout: self.header_read_timeout,
            max_header_bytes: self.max_header_bytes,
            body_timeout: self.body_timeout,
            keepalive: Keepalive {
                ping_interval: (!self.ping_interval.is_zero()).then_some(self.ping_interval),
                idle_timeout: self.idle_timeout,
            },
            max_connections: self.max_connections,
            trust_proxy: self.trust_proxy,
            shutdown_grace: self.shutdown_grace,
            read_buffer_bytes: self.read_buffer_bytes,
            accept_backlog: self.accept_backlog,
            engine,
            auth: self.auth()?,
            ..ServerConfig::default()
        })
    }

    /// The token verifier of `--auth-jwt-*`, if signed identity is on. A bad key file stops the
    /// server at start; so does an audience or issuer check without a key to check with.
    fn auth(&self) -> Result<Option<Arc<JwtVerifier>>, CliError> {
        let options = JwtOptions {
            audience: self.auth_jwt_audience.clone(),
            issuer: self.auth_jwt_issuer.clone(),
            leeway: self.auth_jwt_leeway,
        };
        let verifier = match (&self.auth_jwt_secret_file, &self.auth_jwt_public_key) {
            (Some(secret), _) => JwtVerifier::hs256_file(secret, options)?,
            (None, Some(key)) => JwtVerifier::public_key_file(key, options)?,
            (None, None) => {
                if options.audience.is_some() || options.issuer.is_some() {
                    return Err(CliError::Failed(
                        "--auth-jwt-audience and --auth-jwt-issuer need --auth-jwt-secret-file or \
                         --auth-jwt-public-key"
                            .into(),
                    ));
                }
                return Ok(None);
            }
        };
        tracing::info!(algorithm = ?verifier.algorithm(), "signed identity: every upgrade needs a valid token");
        Ok(Some(Arc::new(verifier)))
    }
}

impl RuntimeArgs {
    /// The certificate and key files to serve TLS with, when given (clap makes sure both are).
    pub(crate) fn tls_files(&self) -> Option<(PathBuf, PathBuf)> {
        self.tls_cert.clone().zip(self.tls_key.clone())
    }

    /// The engine `--engine`'s URL names, chosen by its scheme (only `redis://` so far).
    fn shared_engine(&self, url: &str) -> Result<Engine, CliError> {
        let scheme = url.split_once("://").map(|(scheme, _)| scheme);
        if scheme != Some("redis") {
            return Err(CliError::UnsupportedEngine(
                switchboard_engine_redis::redacted(url),
            ));
        }
        let engine = RedisEngine::engine(RedisConfig::new(url, self.cluster_name.as_str()))?;
        // The URL may carry a password: log the cluster, not the URL.
        tracing::info!(cluster = %self.cluster_name, "state engine: redis (connecting in the background)");
        Ok(engine)
    }
}

/// Installs the recorder and serves `/metrics` on `addr` in the background.
fn start_metrics(addr: SocketAddr) -> Result<(), CliError> {
    let handle = switchboard_server::metrics::install()
        .map_err(|error| CliError::Failed(format!("cannot record metrics: {error}")))?;
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|listener| {
            listener.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(listener)
        })
        .map_err(|source| CliError::Bind { addr, source })?;
    tokio::spawn(switchboard_server::metrics::serve(listener, handle));
    Ok(())
}

/// Where and how to serve; `run` serves one protocol until SIGINT/SIGTERM.
#[derive(Debug, Clone)]
pub(crate) struct Server {
    pub(crate) listen: SocketAddr,
    pub(crate) config: ServerConfig,
    /// `--max-state-bytes`: each protocol's `Config::max_state_bytes`.
    pub(crate) max_state_bytes: usize,
    /// `--tls-cert` and `--tls-key`: serve TLS with them.
    pub(crate) tls: Option<(PathBuf, PathBuf)>,
}

impl Server {
    pub(crate) async fn run<P: Protocol>(self, protocol: P) -> Result<(), CliError> {
        self.run_shared(Arc::new(protocol)).await
    }

    pub(crate) async fn run_shared<P: Protocol>(self, protocol: Arc<P>) -> Result<(), CliError> {
        let name = protocol.name();
        // A bad certificate or key is refused before anything listens.
        let tls = match &self.tls {
            Some((cert, key)) => Some(TlsConfig::load(cert, key)?),
            None => None,
        };
        // Each socket is a file descriptor: take the whole hard limit, not the (often 1024) soft one.
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(limit) => tracing::info!(limit, "open-file limit"),
            Err(error) => tracing::warn!(%error, "could not raise the open-file limit"),
        }
        let listener = switchboard_server::bind(self.listen, self.config.accept_backlog).map_err(
            |source| CliError::Bind {
                addr: self.listen,
                source,
            },
        )?;
        let grace = self.config.shutdown_grace;
        let (router, handle) = switchboard_server::router(protocol, self.config);
        tokio::spawn(switchboard_server::shutdown_on_signal(handle.clone()));
        let served = match tls {
            Some(tls) => {
                tracing::info!(
                    protocol = name,
                    listen = %self.listen,
                    cert = %tls.cert_path().display(),
                    "serving https:// and wss:// (SIGHUP reloads the certificate)"
                );
                tokio::spawn(switchboard_server::tls::reload_on_sighup(
                    tls.clone(),
                    handle.clone(),
                ));
                switchboard_server::serve_tls(listener, router, &handle, grace, &tls).await
            }
            None => {
                tracing::info!(protocol = name, listen = %self.listen, "serving");
                switchboard_server::serve(listener, router, &handle, grace).await
            }
        };
        served.map_err(CliError::Serve)?;
        tracing::info!("shut down cleanly");
        Ok(())
    }
}

/// Parses `500ms`, `30s`, `2m`, `1h`, or a bare number of seconds: the core's syntax, which
/// protocol `Config`s use for their own duration flags too.
pub(crate) use switchboard_core::duration::parse as parse_duration;
