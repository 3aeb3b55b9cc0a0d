//! Prometheus metrics: the recorder, the text exposition, and a small listener for it.
//!
//! The runtime, the state engine handle and the protocols record through the [`metrics`]
//! facade, which costs a relaxed atomic check while no recorder is installed. A binary that
//! wants the numbers installs this module's recorder once, **before** it builds the router (the
//! runtime registers its metric handles when [`crate::router`] runs), and serves [`render`]'s
//! text on a listener of its own, never on the public one:
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let handle = switchboard_server::metrics::install()?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9100").await?;
//! tokio::spawn(switchboard_server::metrics::serve(listener, handle));
//! // ... then build the router and serve the protocol as usual.
//! # Ok(()) }
//! ```
//!
//! Every metric name is in [`names`]; every series carries a `protocol` label, and no label
//! ever holds a user, a session, an address or a path. `docs/operations.md` lists them all.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::metrics::{Counter, Gauge, Histogram, Unit};
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_service::Service;
use tracing::{debug, info, warn};

pub use metrics_exporter_prometheus;

/// The names of the runtime's metrics (`switchboard_` prefix, base units, `_total` counters).
pub mod names {
    /// Gauge: WebSocket connections open now.
    pub const CONNECTIONS_OPEN: &str = "switchboard_connections_open";
    /// Counter: WebSocket connections accepted (upgraded).
    pub const CONNECTIONS_ACCEPTED: &str = "switchboard_connections_accepted_total";
    /// Counter: upgrades and connections refused, by `reason`.
    pub const CONNECTIONS_REJECTED: &str = "switchboard_connections_rejected_total";
    /// Counter: WebSocket connections closed, by `code` and `reason`.
    pub const CONNECTIONS_CLOSED: &str = "switchboard_connections_closed_total";
    /// Counter: data messages (text or binary) received from clients.
    pub const FRAMES_IN: &str = "switchboard_frames_in_total";
    /// Counter: data messages (text or binary) written to clients.
    pub const FRAMES_OUT: &str = "switchboard_frames_out_total";
    /// Counter: WebSocket bytes read from clients (frame headers and control frames included).
    pub const BYTES_IN: &str = "switchboard_bytes_in_total";
    /// Counter: WebSocket bytes written to clients (frame headers and control frames included).
    pub const BYTES_OUT: &str = "switchboard_bytes_out_total";
    /// Histogram: bytes in a socket's outbound queue when a sampled write batch was taken
    /// (the batch included).
    pub const OUTBOUND_QUEUE_BYTES: &str = "switchboard_outbound_queue_bytes";
    /// Histogram: data frames in a sampled write batch (a batch takes up to 64 queue items, so
    /// a full one means a backlog).
    pub const OUTBOUND_BATCH_FRAMES: &str = "switchboard_outbound_batch_frames";
    /// Histogram: state engine operation latency in seconds, by `operation`.
    pub const ENGINE_OPERATION_DURATION: &str = switchboard_core::Engine::OPERATION_DURATION_METRIC;
    /// Counter: failed state engine operations, by `operation` and `error`.
    pub const ENGINE_ERRORS: &str = switchboard_core::Engine::ERRORS_METRIC;
    /// Gauge (always 1): the running build, label `version`.
    pub const BUILD_INFO: &str = "switchboard_build_info";
    /// Gauge: resident memory of the process in bytes (Linux).
    pub const PROCESS_RESIDENT_MEMORY: &str = "switchboard_process_resident_memory_bytes";
    /// Gauge: open file descriptors of the process (Linux).
    pub const PROCESS_OPEN_FDS: &str = "switchboard_process_open_fds";
    /// Counter: CPU time of the process in seconds, user and system (Linux).
    pub const PROCESS_CPU_SECONDS: &str = "switchboard_process_cpu_seconds_total";
    /// Gauge: when the process started, in Unix seconds.
    pub const PROCESS_START_TIME: &str = "switchboard_process_start_time_seconds";
}

/// The label every series carries: the served protocol's name.
pub const PROTOCOL_LABEL: &str = "protocol";

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Latency buckets in seconds (histograms whose name ends in `_seconds`): 100 µs to 10 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Size buckets in bytes (histograms whose name ends in `_bytes`): 256 B to 64 MiB.
pub const BYTES_BUCKETS: &[f64] = &[
    256.0,
    1_024.0,
    4_096.0,
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];

/// Buckets of every other histogram (counts: frames, items, members): 1 to 65,536.
pub const COUNT_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1_024.0, 4_096.0, 16_384.0, 65_536.0,
];

/// Why the recorder could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Another recorder (not this module's) is the process's global recorder already.
    #[error("another metrics recorder is already installed")]
    AlreadyInstalled,
    /// The exporter refused its configuration.
    #[error("metrics exporter: {0}")]
    Build(String),
}

/// The handle of the recorder [`install`] installed, if it did.
static INSTALLED: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// The protocol of the first router built in this process (labels the process metrics).
static PROCESS_PROTOCOL: OnceLock<&'static str> = OnceLock::new();

/// A Prometheus builder with the runtime's histogram buckets: seconds, bytes, and counts for
/// everything else, so every histogram renders as a Prometheus histogram, never a summary. Use
/// it to build a recorder yourself (e.g. to combine it with another); [`install`] uses it.
pub fn builder() -> Result<PrometheusBuilder, MetricsError> {
    let build = |e: metrics_exporter_prometheus::BuildError| MetricsError::Build(e.to_string());
    PrometheusBuilder::new()
        .set_buckets(COUNT_BUCKETS)
        .map_err(build)?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .map_err(build)?
        .set_buckets_for_metric(Matcher::Suffix("_bytes".into()), BYTES_BUCKETS)
        .map_err(build)
}

/// Installs the Prometheus recorder as the process's global `metrics` recorder and returns the
/// handle that renders it. Calling it again returns the same handle, so tests and embedders
/// can call it from several places. Install it before building any router.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let recorder = builder()?.build_recorder();
    let handle = recorder.handle();
    ::metrics::set_global_recorder(recorder).map_err(|_| MetricsError::AlreadyInstalled)?;
    describe();
    process_start();
    *installed = Some(handle.clone());
    Ok(handle)
}

/// `# HELP` lines for the runtime's metrics.
fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(names::CONNECTIONS_OPEN, "WebSocket connections open now.");
    describe_counter!(
        names::CONNECTIONS_ACCEPTED,
        "WebSocket connections accepted."
    );
    describe_counter!(
        names::CONNECTIONS_REJECTED,
        "Upgrades and connections refused, by reason."
    );
    describe_counter!(
        names::CONNECTIONS_CLOSED,
        "WebSocket connections closed, by close code and reason."
    );
    describe_counter!(names::FRAMES_IN, "Data messages received from clients.");
    describe_counter!(names::FRAMES_OUT, "Data messages written to clients.");
    describe_counter!(
        names::BYTES_IN,
        Unit::Bytes,
        "WebSocket bytes read from clients."
    );
    describe_counter!(
        names::BYTES_OUT,
        Unit::Bytes,
        "WebSocket bytes written to clients."
    );
    describe_histogram!(
        names::OUTBOUND_QUEUE_BYTES,
        Unit::Bytes,
        "Bytes queued for a socket when a sampled write batch was taken."
    );
    describe_histogram!(
        names::OUTBOUND_BATCH_FRAMES,
        "Data frames in a sampled write batch."
    );
    describe_histogram!(
        names::ENGINE_OPERATION_DURATION,
        Unit::Seconds,
        "State engine operation latency, by operation."
    );
    describe_counter!(
        names::ENGINE_ERRORS,
        "Failed state engine operations, by operation and error."
    );
    describe_gauge!(names::BUILD_INFO, "The running build (always 1).");
}

/// The text exposition of everything recorded through `handle`, followed by the process
/// metrics (read from `/proc/self` now; absent where there is none).
pub fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    let protocol = PROCESS_PROTOCOL.get().copied().unwrap_or("");
    process_metrics(&mut text, protocol);
    text
}

/// A router answering `GET /metrics` with [`render`]'s text, to mount on a listener of its own.
pub fn router(handle: PrometheusHandle) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move {
                (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, CONTENT_TYPE)],
                    render(&handle),
                )
                    .into_response()
            }
        }),
    )
}

/// Scrapes served at once; more wait for the listener's accept. Prometheus scrapes one at a
/// time, so a few cover several scrapers and a curl.
const MAX_SCRAPE_CONNECTIONS: usize = 16;

/// How long a scrape's request header may take.
const SCRAPE_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How often histogram samples are folded into their buckets between scrapes, so their
/// memory stays bounded however rarely the endpoint is scraped.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Serves [`router`] on `listener` (HTTP/1.1, a header-read timeout, a few connections at
/// once) and runs the recorder's upkeep, until the task is dropped. Accept errors are logged
/// and retried.
///
/// The "serving metrics" line is logged by this call, not when the future is first polled, so
/// a server that calls this before it starts its main listener logs the two in that order.
pub fn serve(listener: TcpListener, handle: PrometheusHandle) -> impl Future<Output = ()> {
    if let Ok(local) = listener.local_addr() {
        info!(metrics = %local, "serving metrics at /metrics");
    }
    serve_scrapes(listener, handle)
}

async fn serve_scrapes(listener: TcpListener, handle: PrometheusHandle) {
    let upkeep_handle = handle.clone();
    let upkeep = tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            every.tick().await;
            upkeep_handle.run_upkeep();
        }
    });
    let _stop_upkeep = AbortOnDrop(upkeep);
    let app = router(handle);
    let slots = Arc::new(Semaphore::new(MAX_SCRAPE_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "metrics listener: accept error");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |request| {
                let mut app = app.clone();
                async move {
                    Ok::<_, Infallible>(app.call(request).await.unwrap_or_else(|e| match e {}))
                }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(SCRAPE_HEADER_TIMEOUT);
            if let Err(error) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%remote, %error, "metrics connection ended with an error");
            }
        });
    }
}

/// Aborts a background task when the future that owns it is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// When the process started, in Unix seconds: from `/proc` where there is one, else the
/// first time this module was asked.
fn process_start() -> f64 {
    static START: OnceLock<f64> = OnceLock::new();
    *START.get_or_init(|| {
        proc_start_time().unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        })
    })
}

/// Linux reports CPU times and start times in clock ticks of `USER_HZ`, which is 100 on every
/// architecture Linux supports (it is part of the kernel's ABI, independent of `CONFIG_HZ`).
const USER_HZ: f64 = 100.0;

/// The fields of `/proc/self/stat` after the command name (which may contain spaces), so
/// field 3 of the man page is index 0.
fn proc_stat_fields() -> Option<Vec<String>> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = stat.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_owned).collect())
}

fn proc_start_time() -> Option<f64> {
    let fields = proc_stat_fields()?;
    // Field 22 (starttime): ticks after boot.
    let ticks: f64 = fields.get(19)?.parse().ok()?;
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(boot + ticks / USER_HZ)
}

fn proc_cpu_seconds() -> Option<f64> {
    let fields = proc_stat_fields()?;
    // Fields 14 and 15: user and system time in ticks.
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    Some((user + system) / USER_HZ)
}

fn proc_resident_bytes() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024.0)
}

fn proc_open_fds() -> Option<f64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    // The directory handle itself is one of the entries while it is read.
    let count = entries.count().saturating_sub(1);
    Some(count as f64)
}

/// Appends the process metrics in the text format.
fn process_metrics(text: &mut String, protocol: &str) {
    let series = [
        (
            names::PROCESS_RESIDENT_MEMORY,
            "gauge",
            "Resident memory size in bytes.",
            proc_resident_bytes(),
        ),
        (
            names::PROCESS_OPEN_FDS,
            "gauge",
            "Open file descriptors.",
            proc_open_fds(),
        ),
        (
            names::PROCESS_CPU_SECONDS,
            "counter",
            "User and system CPU time in seconds.",
            proc_cpu_seconds(),
        ),
        (
            names::PROCESS_START_TIME,
            "gauge",
            "Start time of the process in Unix seconds.",
            Some(process_start()),
        ),
    ];
    for (name, kind, help, value) in series {
        let Some(value) = value else { continue };
        let _ = write!(
            text,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{PROTOCOL_LABEL}=\"{}\"}} {value}\n\n",
            escape_label(protocol)
        );
    }
}

/// A label value in the text format: backslash, quote and newline escaped.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Why an upgrade or connection was refused: the `reason` label of
/// [`names::CONNECTIONS_REJECTED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// Malformed upgrade request (method, headers, version): 400/405.
    BadRequest,
    /// `Origin` not allowed: 403.
    Origin,
    /// Missing or invalid signed token: 401.
    Auth,
    /// The server is shutting down: 503.
    ShuttingDown,
    /// The client's connection share is used up: 429.
    PerIp,
    /// `--max-connections` reached: 503.
    Limit,
    /// The protocol's `admit` refused it (its status).
    Protocol,
    /// Over the per-client request rate: 429.
    Rate,
    /// Too many connections not yet upgraded, server-wide: bare 503.
    Pending,
    /// Too many connections not yet upgraded from one client: bare 429.
    PendingPerIp,
}

impl Rejection {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Origin => "origin",
            Self::Auth => "auth",
            Self::ShuttingDown => "shutting_down",
            Self::PerIp => "per_ip",
            Self::Limit => "limit",
            Self::Protocol => "protocol",
            Self::Rate => "rate",
            Self::Pending => "pending",
            Self::PendingPerIp => "pending_per_ip",
        }
    }
}

/// The runtime's metric handles for one served protocol, registered when the router is built.
#[derive(Debug)]
pub(crate) struct RuntimeMetrics {
    pub(crate) protocol: &'static str,
    pub(crate) open: Gauge,
    pub(crate) accepted: Counter,
    pub(crate) frames_in: Counter,
    pub(crate) frames_out: Counter,
    pub(crate) bytes_in: Counter,
    pub(crate) bytes_out: Counter,
    pub(crate) queue_bytes: Histogram,
    pub(crate) batch_frames: Histogram,
}

impl RuntimeMetrics {
    pub(crate) fn new(protocol: &'static str) -> Self {
        let _ = PROCESS_PROTOCOL.set(protocol);
        ::metrics::gauge!(
            names::BUILD_INFO,
            PROTOCOL_LABEL => protocol,
            "version" => env!("CARGO_PKG_VERSION")
        )
        .set(1.0);
        Self {
            protocol,
            open: ::metrics::gauge!(names::CONNECTIONS_OPEN, PROTOCOL_LABEL => protocol),
            accepted: ::metrics::counter!(names::CONNECTIONS_ACCEPTED, PROTOCOL_LABEL => protocol),
            frames_in: ::metrics::counter!(names::FRAMES_IN, PROTOCOL_LABEL => protocol),
            frames_out: ::metrics::counter!(names::FRAMES_OUT, PROTOCOL_LABEL => protocol),
            bytes_in: ::metrics::counter!(names::BYTES_IN, PROTOCOL_LABEL => protocol),
            bytes_out: ::metrics::counter!(names::BYTES_OUT, PROTOCOL_LABEL => protocol),
            queue_bytes: ::metrics::histogram!(
                names::OUTBOUND_QUEUE_BYTES,
                PROTOCOL_LABEL => protocol
            ),
            batch_frames: ::metrics::histogram!(
                names::OUTBOUND_BATCH_FRAMES,
                PROTOCOL_LABEL => protocol
            ),
        }
    }

    /// Counts a refusal (rare next to traffic: a registry lookup each is fine).
    pub(crate) fn rejected(&self, why: Rejection) {
        ::metrics::counter!(
            names::CONNECTIONS_REJECTED,
            PROTOCOL_LABEL => self.protocol,
            "reason" => why.label()
        )
        .increment(1);
    }

    /// Counts a closed connection (once per connection: a registry lookup is fine).
    pub(crate) fn closed(&self, code: u16, by_client: bool, reason: &'static str) {
        ::metrics::counter!(
            names::CONNECTIONS_CLOSED,
            PROTOCOL_LABEL => self.protocol,
            "code" => code_label(code, by_client),
            "reason" => reason
        )
        .increment(1);
    }
}

/// A close code as a label value. The server's codes (the runtime's and the protocol's) are a
/// small fixed set and kept as they are; a code a client picks is kept only when standard
/// (1000-1015), so clients cannot grow the number of series.
fn code_label(code: u16, by_client: bool) -> String {
    if by_client && !(1000..=1015).contains(&code) {
        return "other".to_owned();
    }
    code.to_string()
}

/// A socket's traffic, counted in its own state (no shared atomics per frame) and added to the
/// shared counters in one go: at most about once a second while it is busy, on each ping, and at
/// close.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    pub(crate) frames_in: u64,
    pub(crate) frames_out: u64,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    /// The totals already added to the shared counters.
    flushed: [u64; 4],
    /// The flush epoch (see [`crate::Counters::epoch`]) of the last flush.
    epoch: u64,
}

impl Traffic {
    /// Whether a flush is due: the epoch moved since the last one.
    pub(crate) fn due(&self, epoch: u64) -> bool {
        self.epoch != epoch
    }

    /// Adds what was counted since the last flush to the shared counters.
    pub(crate) fn flush(&mut self, metrics: &RuntimeMetrics, epoch: u64) {
        self.epoch = epoch;
        let totals = [
            self.frames_in,
            self.frames_out,
            self.bytes_in,
            self.bytes_out,
        ];
        let counters = [
            &metrics.frames_in,
            &metrics.frames_out,
            &metrics.bytes_in,
            &metrics.bytes_out,
        ];
        for ((total, flushed), counter) in totals.iter().zip(self.flushed.iter_mut()).zip(counters)
        {
            let delta = total.saturating_sub(*flushed);
            if delta > 0 {
                counter.increment(delta);
                *flushed = *total;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_code_labels_are_bounded() {
        assert_eq!(code_label(1000, true), "1000");
        assert_eq!(code_label(1015, true), "1015");
        assert_eq!(code_label(4999, true), "other");
        assert_eq!(code_label(3000, true), "other");
        assert_eq!(code_label(0, true), "other");
        assert_eq!(code_label(4401, false), "4401");
        assert_eq!(code_label(4003, false), "4003");
    }

    #[test]
    fn process_metrics_render_on_linux() {
        let mut text = String::new();
        process_metrics(&mut text, "echo");
        assert!(text.contains("switchboard_process_start_time_seconds{protocol=\"echo\"}"));
        if cfg!(target_os = "linux") {
            for name in [
                names::PROCESS_RESIDENT_MEMORY,
                names::PROCESS_OPEN_FDS,
                names::PROCESS_CPU_SECONDS,
            ] {
                assert!(
                    text.contains(&format!("{name}{{protocol=\"echo\"}} ")),
                    "{text}"
                );
            }
        }
    }
}
