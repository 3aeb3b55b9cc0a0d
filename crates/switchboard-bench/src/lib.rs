//! Load generators behind `switchboard bench`, pointed at a running server like
//! `redis-benchmark`.
//!
//! - [`fanout`]: N subscribers and S senders on ip-chat, on one server or spread over the nodes
//!   of a cluster; deliveries/s, end-to-end latency, and a check that every expected delivery
//!   arrived. Listen-only runs in several processes measure one broadcast together.
//! - [`idle`]: N idle sockets; connect rate and, given the server's pid, resident memory per
//!   connection.
//! - [`reqack`]: request→response latency and event→ack throughput with an exactly-once check,
//!   on one server or with each user's partner on another node of a cluster.
//! - [`attack`]: the attacks listed in docs/hardening.md, one row at a time, each checked against a
//!   documented memory bound and a bystander's latency.
//!
//! Targets are `ws://` or `wss://` URLs; `wss://` is verified with a
//! [`ClientTls`] (the system's roots, or a CA file for a self-signed test deployment), through
//! the workspace's one client-side TLS module, `switchboard_teambot::client::tls`.
//!
//! All traffic stays on 127.0.0.0/8: clients bind distinct loopback source addresses before
//! connecting, which keeps per-IP rate limits per sender and spreads sockets over many
//! ephemeral-port ranges. Every run is bounded in count and time.

pub mod attack;
pub mod fanout;
pub mod idle;
mod proc;
pub mod reqack;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

pub use proc::{ProcessSample, sample_process};
pub use switchboard_teambot::client::tls::{ClientSocket, ClientTls, ConnectError};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The URL is not a `ws://<ip>:<port>/...` (or `wss://`) URL on loopback.
    #[error(
        "invalid target {0}: use ws://127.x.y.z:PORT/path or wss://127.x.y.z:PORT/path (benchmarks stay on loopback)"
    )]
    Target(String),
    /// Connecting failed.
    #[error("connecting socket {index} failed: {source}")]
    Connect {
        /// Which socket.
        index: usize,
        /// Why.
        source: ConnectError,
    },
    /// The run exceeded its time bound.
    #[error("timed out after {0:?}: {1}")]
    Timeout(Duration, String),
    /// A socket failed mid-run.
    #[error("socket failure: {0}")]
    Socket(String),
    /// The file announcing that every socket is connected could not be written.
    #[error("could not write {path}: {source}")]
    ReadyFile {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A parsed, loopback-only WebSocket target.
#[derive(Debug, Clone)]
pub struct Target {
    url: String,
    addr: SocketAddr,
    /// `wss://`.
    secure: bool,
    tls: ClientTls,
}

impl Target {
    /// Parses `url`; refuses anything that is not an IP literal in 127.0.0.0/8. A `wss://`
    /// target is verified with the system's roots ([`Target::with_tls`] to change that).
    pub fn parse(url: &str) -> Result<Self, BenchError> {
        let request = url
            .into_client_request()
            .map_err(|_| BenchError::Target(url.to_owned()))?;
        let secure = match request.uri().scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(BenchError::Target(url.to_owned())),
        };
        let host = request
            .uri()
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']']);
        let ip: IpAddr = host
            .parse()
            .map_err(|_| BenchError::Target(url.to_owned()))?;
        if !ip.is_loopback() {
            return Err(BenchError::Target(url.to_owned()));
        }
        let port = request
            .uri()
            .port_u16()
            .unwrap_or(if secure { 443 } else { 80 });
        Ok(Self {
            url: url.to_owned(),
            addr: SocketAddr::new(ip, port),
            secure,
            tls: ClientTls::system_roots(),
        })
    }

    /// The same target, verifying a `wss://` server with `tls` (e.g.
    /// [`ClientTls::from_ca_file`] for a self-signed certificate).
    pub fn with_tls(mut self, tls: ClientTls) -> Self {
        self.tls = tls;
        self
    }

    /// The same server with another path and query, e.g. `/ws?userId=u1`.
    pub fn with_path(&self, path_and_query: &str) -> Self {
        let scheme = if self.secure { "wss" } else { "ws" };
        Self {
            url: format!("{scheme}://{}{}", self.addr, path_and_query),
            ..self.clone()
        }
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// Client sockets use small buffers too, so one load process can hold ~19,000 of them.
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20)
}

/// The `index`-th loopback source address of a pool starting at `127.<pool>.0.1`: 250 addresses
/// per /24, so any index maps to a distinct address.
pub fn source_address(pool: u8, index: usize) -> Ipv4Addr {
    let third = u8::try_from(index / 250).unwrap_or(u8::MAX);
    let fourth = u8::try_from(index % 250 + 1).unwrap_or(1);
    Ipv4Addr::new(127, pool, third, fourth)
}

/// Opens a WebSocket to `target` from source address `source` (over TLS for `wss://`).
pub async fn connect_from(
    target: &Target,
    source: Ipv4Addr,
    index: usize,
) -> Result<ClientSocket, BenchError> {
    let fail = |source: ConnectError| BenchError::Connect { index, source };
    let io = |source: std::io::Error| {
        fail(ConnectError::Tcp {
            addr: target.addr.to_string(),
            source,
        })
    };
    let socket = TcpSocket::new_v4().map_err(io)?;
    socket
        .bind(SocketAddr::new(IpAddr::V4(source), 0))
        .map_err(io)?;
    let stream = socket.connect(target.addr).await.map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    let (ws, _) = switchboard_teambot::client::tls::connect_stream(
        &target.url,
        stream,
        &target.tls,
        Some(client_config()),
    )
    .await
    .map_err(fail)?;
    Ok(ws)
}

/// Raises this process's open-file soft limit to its hard limit; returns the limit in force.
pub fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            tracing::warn!(%error, "could not raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |(soft, _)| soft)
        }
    }
}

/// Percentiles of a sample set, in the sample's unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
}

impl Percentiles {
    /// Computes percentiles by sorting `samples` (nearest-rank).
    pub fn of(samples: &mut [f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable_by(f64::total_cmp);
        let rank = |q: f64| {
            let index = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
            samples[index]
        };
        Self {
            p50: rank(0.50),
            p99: rank(0.99),
            max: samples[samples.len() - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut samples: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&mut samples);
        assert_eq!((p.p50, p.p99, p.max), (50.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
    }

    #[test]
    fn source_addresses_are_distinct_and_on_loopback() {
        let a = source_address(1, 0);
        let b = source_address(1, 249);
        let c = source_address(1, 250);
        assert_eq!(a, Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(b, Ipv4Addr::new(127, 1, 0, 250));
        assert_eq!(c, Ipv4Addr::new(127, 1, 1, 1));
        assert!(c.is_loopback());
    }

    #[tokio::test]
    async fn wss_targets_connect_over_tls_with_the_given_ca() {
        use futures::{SinkExt, StreamExt};
        use switchboard_testkit::tls::{TestCa, TlsTestServer, temp_dir};
        use tokio_tungstenite::tungstenite::Message;

        let ca = TestCa::new("bench CA");
        let dir = temp_dir("bench");
        let server = TlsTestServer::start(
            switchboard_echo::Echo::new(),
            switchboard_server::ServerConfig::default(),
            ca.issue().tls_config(&dir),
        )
        .await;
        let url = format!("wss://127.0.0.1:{}/ws", server.addr().port());
        let target = Target::parse(&url)
            .unwrap()
            .with_tls(ClientTls::from_config(ca.client_config()));
        let mut socket = connect_from(&target, source_address(9, 0), 0)
            .await
            .unwrap();
        socket.send(Message::text("over tls")).await.unwrap();
        let echoed = socket.next().await.unwrap().unwrap();
        assert_eq!(echoed, Message::text("over tls"));
        // The system's roots do not know the test CA: a clear TLS error, not a hang.
        let untrusted = connect_from(&Target::parse(&url).unwrap(), source_address(9, 1), 1).await;
        let error = untrusted.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            error.contains("TLS handshake") || error.contains("root"),
            "{error}"
        );
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn targets_must_be_loopback() {
        assert!(Target::parse("ws://127.0.0.1:8000/ws").is_ok());
        let secure = Target::parse("wss://127.0.0.1:8443/ws").unwrap();
        assert_eq!(
            secure.with_path("/ws?userId=a").url(),
            "wss://127.0.0.1:8443/ws?userId=a"
        );
        assert!(Target::parse("http://127.0.0.1:8000/ws").is_err());
        assert!(Target::parse("ws://10.0.0.1:8000/ws").is_err());
        assert!(Target::parse("ws://example.com/ws").is_err());
    }
}
