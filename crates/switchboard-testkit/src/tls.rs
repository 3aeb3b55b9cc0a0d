//! TLS test helpers: certificates generated in the test, and clients that trust them.
//!
//! [`TestCa`] is a throwaway certificate authority (rcgen, ECDSA P-256); [`TestCa::issue`] signs
//! a server certificate for `localhost` and `127.0.0.1`, which [`TestCert::write`] puts in PEM
//! files for `switchboard_server::tls::TlsConfig::load` or `switchboard serve --tls-cert/--tls-key`.
//! [`TlsTestServer`] runs a protocol with `switchboard_server::serve_tls` on `127.0.0.1:0`;
//! [`connect_wss`] and [`https_request`] are clients that trust exactly one [`TestCa`]. Every wait
//! is bounded by [`crate::TIMEOUT`].
#![allow(
    clippy::panic,
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test harness: panicking fails the test"
)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use switchboard_core::Protocol;
use switchboard_server::tls::TlsConfig;
use switchboard_server::{ServerConfig, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::{HttpReply, TIMEOUT};

/// A WebSocket over TLS, as [`connect_wss`] opens it.
pub type WssStream = WebSocketStream<TlsStream<TcpStream>>;

/// A throwaway certificate authority.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A server certificate (chain: the leaf only) and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct TestCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The PKCS#8 private key, PEM.
    pub key_pem: String,
}

impl TestCa {
    /// A new CA whose distinguished name is `name`.
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().expect("generate a CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-sign the CA");
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM (what `--ca-file` is given).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A server certificate for `localhost` and `127.0.0.1`, signed by this CA.
    pub fn issue(&self) -> TestCert {
        let key = KeyPair::generate().expect("generate a server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("server certificate parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, "switchboard test server");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign the server certificate");
        TestCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A rustls client configuration that trusts this CA and nothing else.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.pem.as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("add the test CA");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        Arc::new(config)
    }

    /// Writes the CA certificate to `dir/ca.pem` and returns the path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.pem).expect("write ca.pem");
        path
    }
}

impl TestCert {
    /// Writes `dir/cert.pem` and `dir/key.pem` (replacing them if present) and returns the
    /// certificate and key paths.
    pub fn write(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, &self.cert_pem).expect("write cert.pem");
        std::fs::write(&key, &self.key_pem).expect("write key.pem");
        (cert, key)
    }

    /// A server TLS configuration for this certificate, through files in `dir`.
    pub fn tls_config(&self, dir: &Path) -> TlsConfig {
        let (cert, key) = self.write(dir);
        TlsConfig::load(cert, key).expect("load the test certificate")
    }
}

/// A fresh empty directory under the system temp directory, unique per call in this process.
/// Tests remove it themselves if they care; it holds a few small PEM files.
pub fn temp_dir(label: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "switchboard-tls-{label}-{}-{n}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    dir
}

/// A protocol served with `switchboard_server::serve_tls` on `127.0.0.1:0`.
#[derive(Debug)]
pub struct TlsTestServer {
    addr: SocketAddr,
    handle: ServerHandle,
    task: JoinHandle<std::io::Result<()>>,
}

impl TlsTestServer {
    /// Serves `protocol` with `config` over `tls`.
    pub async fn start<P: Protocol>(protocol: P, config: ServerConfig, tls: TlsConfig) -> Self {
        Self::start_shared(Arc::new(protocol), config, tls).await
    }

    /// [`TlsTestServer::start`] with a protocol the test keeps a handle to.
    pub async fn start_shared<P: Protocol>(
        protocol: Arc<P>,
        config: ServerConfig,
        tls: TlsConfig,
    ) -> Self {
        let listener = switchboard_server::bind(
            "127.0.0.1:0".parse().expect("loopback address"),
            config.accept_backlog,
        )
        .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let grace = config.shutdown_grace;
        let (router, handle) = switchboard_server::router(protocol, config);
        let serve_handle = handle.clone();
        let task = tokio::spawn(async move {
            switchboard_server::serve_tls(listener, router, &serve_handle, grace, &tls).await
        });
        Self { addr, handle, task }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's handle.
    pub fn handle(&self) -> &ServerHandle {
        &self.handle
    }

    /// Shuts down and waits for `serve_tls` to return.
    pub async fn shutdown(self) {
        self.handle.shutdown();
        timeout(TIMEOUT, self.task)
            .await
            .expect("serve_tls returned in time")
            .expect("serve task")
            .expect("serve_tls");
    }
}

/// TCP connect plus TLS handshake to `addr` for server name `localhost`, trusting `client`'s
/// roots; the error is the handshake's, as text.
pub async fn tls_connect(
    addr: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, String> {
    let connect = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        TlsConnector::from(client.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))
    };
    timeout(TIMEOUT, connect)
        .await
        .unwrap_or_else(|_| Err("TLS connect timed out".to_owned()))
}

/// Opens `wss://localhost:<port><path>` on `addr`, trusting `client`'s roots; the error as text.
pub async fn try_connect_wss(
    addr: SocketAddr,
    path: &str,
    client: &Arc<rustls::ClientConfig>,
) -> Result<WssStream, String> {
    let tls = tls_connect(addr, client).await?;
    let request = format!("wss://localhost:{}{path}", addr.port())
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let (ws, _response) = timeout(TIMEOUT, tokio_tungstenite::client_async(request, tls))
        .await
        .map_err(|_| "WebSocket handshake timed out".to_owned())?
        .map_err(|e| format!("WebSocket handshake: {e}"))?;
    Ok(ws)
}

/// [`try_connect_wss`], panicking on failure.
pub async fn connect_wss(
    addr: SocketAddr,
    path: &str,
    client: &Arc<rustls::ClientConfig>,
) -> WssStream {
    try_connect_wss(addr, path, client)
        .await
        .unwrap_or_else(|e| panic!("wss://{addr}{path}: {e}"))
}

/// Sends one HTTP/1.1 request over TLS with `Connection: close` and reads the whole response.
pub async fn https_request(
    addr: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
) -> HttpReply {
    let exchange = async {
        let mut tls = tls_connect(addr, client).await.expect("TLS connect");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost:{}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            addr.port()
        );
        tls.write_all(request.as_bytes())
            .await
            .expect("write HTTPS request");
        let mut raw = Vec::new();
        // A server may close without close_notify after `Connection: close`: what was read counts.
        let _ = tls.read_to_end(&mut raw).await;
        String::from_utf8(raw).expect("HTTPS response is UTF-8")
    };
    let raw = timeout(TIMEOUT, exchange)
        .await
        .expect("HTTPS request timed out");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    HttpReply {
        status,
        headers: head.to_owned(),
        body: body.to_owned(),
    }
}
