//! Client-side `wss://`: one place for every Switchboard client (the teambot client,
//! `switchboard bench`, the examples) to open WebSockets over plain TCP or TLS.
//!
//! TLS is rustls on ring (no OpenSSL). Servers are verified against the operating system's
//! roots ([`ClientTls::system_roots`], loaded on the first `wss://` connect, so plain `ws://`
//! clients never touch them) or against the CA certificates of one PEM file
//! ([`ClientTls::from_ca_file`], for self-signed test deployments). Protocol versions and cipher
//! suites are rustls's defaults.
//!
//! It lives in this crate because protocol crates depend on `switchboard-core` only: the
//! teambot client cannot reach the server crate, while the bench and the examples can depend on
//! this one.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use switchboard_teambot::client::tls::{ClientTls, connect};
//! let tls = ClientTls::from_ca_file("ca.pem")?;
//! let (socket, _response) = connect("wss://localhost:8443/ws", &tls, None).await?;
//! # drop(socket); Ok(()) }
//! ```

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// A WebSocket opened by [`connect`] or [`connect_stream`], over TCP or TLS.
pub type ClientSocket = WebSocketStream<ClientStream>;

/// Why client TLS settings cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientTlsError {
    /// The CA file cannot be read or holds no usable CA certificate.
    #[error("CA file {}: {reason}", path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The operating system's root certificates cannot be loaded.
    #[error("no system root certificates to verify wss:// servers with ({0}); give a CA file")]
    NoSystemRoots(String),
    /// rustls refused the configuration.
    #[error("cannot build the TLS client configuration: {0}")]
    Config(String),
    /// `--ca-file` was the last argument ([`ClientTls::from_args`]).
    #[error("--ca-file needs a FILE (a PEM file of CA certificates)")]
    MissingCaFileArgument,
}

/// Which servers a `wss://` client trusts. Cheap to clone; clones share the loaded roots.
#[derive(Clone)]
pub struct ClientTls {
    source: Source,
    config: Arc<OnceLock<Result<Arc<rustls::ClientConfig>, ClientTlsError>>>,
}

#[derive(Debug, Clone)]
enum Source {
    System,
    CaFile(PathBuf),
    Given,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("roots", &self.source)
            .finish_non_exhaustive()
    }
}

impl Default for ClientTls {
    /// [`ClientTls::system_roots`].
    fn default() -> Self {
        Self::system_roots()
    }
}

impl ClientTls {
    /// Trust the operating system's root certificates (`rustls-native-certs`; `SSL_CERT_FILE`
    /// and `SSL_CERT_DIR` override the platform's store). They are loaded on the first `wss://`
    /// connect, so a client that only dials `ws://` never needs them.
    pub fn system_roots() -> Self {
        Self {
            source: Source::System,
            config: Arc::new(OnceLock::new()),
        }
    }

    /// Trust exactly the CA certificates of the PEM file at `path` (e.g. the CA that signed a
    /// self-signed test deployment's certificate). The file is read now.
    pub fn from_ca_file(path: impl AsRef<Path>) -> Result<Self, ClientTlsError> {
        let path = path.as_ref();
        let fail = |reason: String| ClientTlsError::CaFile {
            path: path.to_owned(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|error| fail(format!("cannot read it: {error}")))?;
        let config = config_trusting_pem(&pem).map_err(fail)?;
        Ok(Self {
            source: Source::CaFile(path.to_owned()),
            config: Arc::new(OnceLock::from(Ok(config))),
        })
    }

    /// [`ClientTls::from_ca_file`] when a file is given, else [`ClientTls::system_roots`]: what a
    /// `--ca-file` flag means.
    pub fn from_optional_ca_file(path: Option<&Path>) -> Result<Self, ClientTlsError> {
        match path {
            Some(path) => Self::from_ca_file(path),
            None => Ok(Self::system_roots()),
        }
    }

    /// For small programs without an argument parser: removes `--ca-file FILE` (or
    /// `--ca-file=FILE`) from `args` and returns [`ClientTls::from_optional_ca_file`] of it.
    pub fn from_args(args: &mut Vec<String>) -> Result<Self, ClientTlsError> {
        let mut ca_file = None;
        let mut rest = Vec::with_capacity(args.len());
        let mut taken = std::mem::take(args).into_iter();
        while let Some(arg) = taken.next() {
            if arg == "--ca-file" {
                ca_file = Some(taken.next().ok_or(ClientTlsError::MissingCaFileArgument)?);
            } else if let Some(file) = arg.strip_prefix("--ca-file=") {
                ca_file = Some(file.to_owned());
            } else {
                rest.push(arg);
            }
        }
        *args = rest;
        Self::from_optional_ca_file(ca_file.as_deref().map(Path::new))
    }

    /// Use a rustls client configuration built elsewhere as is.
    pub fn from_config(config: Arc<rustls::ClientConfig>) -> Self {
        Self {
            source: Source::Given,
            config: Arc::new(OnceLock::from(Ok(config))),
        }
    }

    /// The rustls client configuration (loading the system roots if they are used and not
    /// loaded yet).
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, ClientTlsError> {
        self.config
            .get_or_init(|| match &self.source {
                Source::System => system_config(),
                // Built eagerly by their constructors; never reached.
                Source::CaFile(path) => Err(ClientTlsError::CaFile {
                    path: path.clone(),
                    reason: "not loaded".to_owned(),
                }),
                Source::Given => Err(ClientTlsError::Config(
                    "client TLS configuration missing".to_owned(),
                )),
            })
            .clone()
    }
}

fn builder() -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, String> {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())
}

fn config_trusting_pem(pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|error| format!("invalid PEM: {error}"))?;
        roots
            .add(cert)
            .map_err(|error| format!("not a usable CA certificate: {error}"))?;
    }
    if roots.is_empty() {
        return Err("no certificate found (expected PEM `BEGIN CERTIFICATE` blocks)".to_owned());
    }
    Ok(Arc::new(
        builder()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

fn system_config() -> Result<Arc<rustls::ClientConfig>, ClientTlsError> {
    let loaded = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (_added, _ignored) = roots.add_parsable_certificates(loaded.certs);
    if roots.is_empty() {
        let reason = loaded
            .errors
            .first()
            .map_or_else(|| "none found".to_owned(), ToString::to_string);
        return Err(ClientTlsError::NoSystemRoots(reason));
    }
    for error in &loaded.errors {
        tracing::debug!(%error, "some system root certificates could not be loaded");
    }
    Ok(Arc::new(
        builder()
            .map_err(ClientTlsError::Config)?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// Why [`connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL is not a usable `ws://` or `wss://` URL.
    #[error("invalid WebSocket URL: {0}")]
    Url(String),
    /// The TCP connection failed.
    #[error("TCP connect to {addr} failed: {source}")]
    Tcp {
        /// `host:port`.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// The client TLS settings cannot be used.
    #[error("{0}")]
    Settings(#[from] ClientTlsError),
    /// The TLS handshake failed (e.g. an untrusted certificate, or a server without TLS).
    #[error("TLS handshake with {host} failed: {source}")]
    Handshake {
        /// The server name verified.
        host: String,
        /// Why.
        source: io::Error,
    },
    /// The WebSocket handshake failed (e.g. the server answered with an HTTP error).
    #[error("WebSocket handshake failed: {0}")]
    WebSocket(#[source] Box<tungstenite::Error>),
}

/// A parsed `ws://` or `wss://` URL: the request to send and where to send it.
struct Target {
    request: Request,
    host: String,
    port: u16,
    secure: bool,
}

fn target(url: &str) -> Result<Target, ConnectError> {
    let request = url
        .into_client_request()
        .map_err(|error| ConnectError::Url(format!("{url}: {error}")))?;
    let uri = request.uri();
    let secure = match uri.scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => {
            return Err(ConnectError::Url(format!(
                "{url}: expected ws:// or wss://"
            )));
        }
    };
    let host = uri
        .host()
        .map(|host| {
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned()
        })
        .filter(|host| !host.is_empty())
        .ok_or_else(|| ConnectError::Url(format!("{url}: no host")))?;
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    Ok(Target {
        request,
        host,
        port,
        secure,
    })
}

/// Opens a WebSocket at `url` (`ws://` over TCP, `wss://` over TLS verified with `tls`), with
/// Nagle's algorithm off. Bound it with a timeout: neither connect nor handshake has one.
pub async fn connect(
    url: &str,
    tls: &ClientTls,
    config: Option<WebSocketConfig>,
) -> Result<(ClientSocket, Response), ConnectError> {
    let target = target(url)?;
    let addr = format!("{}:{}", target.host, target.port);
    let stream = TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|source| ConnectError::Tcp {
            addr: addr.clone(),
            source,
        })?;
    // Small frames should leave at once; a failure only costs latency.
    let _ = stream.set_nodelay(true);
    handshake(target, stream, tls, config).await
}

/// [`connect`] over a TCP stream the caller opened (e.g. from a chosen source address).
pub async fn connect_stream(
    url: &str,
    stream: TcpStream,
    tls: &ClientTls,
    config: Option<WebSocketConfig>,
) -> Result<(ClientSocket, Response), ConnectError> {
    handshake(target(url)?, stream, tls, config).await
}

async fn handshake(
    target: Target,
    stream: TcpStream,
    tls: &ClientTls,
    config: Option<WebSocketConfig>,
) -> Result<(ClientSocket, Response), ConnectError> {
    let stream = secure_if(stream, &target.host, target.secure, tls).await?;
    tokio_tungstenite::client_async_with_config(target.request, stream, config)
        .await
        .map_err(|error| ConnectError::WebSocket(Box::new(error)))
}

/// A TCP connection to `host:port`, with a TLS session over it (verified for `host`) if `secure`:
/// for plain `http://` or `https://` requests next to the WebSockets (e.g. a REST call).
pub async fn open_stream(
    host: &str,
    port: u16,
    secure: bool,
    tls: &ClientTls,
) -> Result<ClientStream, ConnectError> {
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|source| ConnectError::Tcp {
            addr: format!("{host}:{port}"),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    secure_if(stream, host, secure, tls).await
}

async fn secure_if(
    stream: TcpStream,
    host: &str,
    secure: bool,
    tls: &ClientTls,
) -> Result<ClientStream, ConnectError> {
    if !secure {
        return Ok(ClientStream::Plain(stream));
    }
    let client = tls.client_config()?;
    let name = ServerName::try_from(host.to_owned())
        .map_err(|error| ConnectError::Url(format!("{host}: not a server name: {error}")))?;
    let tls_stream = TlsConnector::from(client)
        .connect(name, stream)
        .await
        .map_err(|source| ConnectError::Handshake {
            host: host.to_owned(),
            source,
        })?;
    Ok(ClientStream::Tls(Box::new(tls_stream)))
}

/// A client connection: plain TCP (`ws://`) or TLS (`wss://`).
#[derive(Debug)]
pub enum ClientStream {
    /// `ws://`.
    Plain(TcpStream),
    /// `wss://` (boxed: a TLS session is large, a plain socket should not pay for it).
    Tls(Box<TlsStream<TcpStream>>),
}

impl ClientStream {
    /// The TCP stream underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(stream) => stream,
            Self::Tls(stream) => stream.get_ref().0,
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(stream) => stream.is_write_vectored(),
            Self::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Self::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_with_default_ports() {
        let plain = target("ws://example.com/global").unwrap();
        assert_eq!(
            (plain.host.as_str(), plain.port, plain.secure),
            ("example.com", 80, false)
        );
        let secure = target("wss://[::1]/t").unwrap();
        assert_eq!(
            (secure.host.as_str(), secure.port, secure.secure),
            ("::1", 443, true)
        );
        assert!(target("http://example.com/").is_err());
        assert!(target("not a url").is_err());
    }

    #[test]
    fn ca_file_arguments_are_taken_out() {
        let mut args: Vec<String> = ["ws://x/ws", "--ca-file=/nonexistent.pem", "Alice"]
            .map(String::from)
            .to_vec();
        let error = ClientTls::from_args(&mut args).unwrap_err();
        assert!(error.to_string().contains("/nonexistent.pem"), "{error}");
        assert_eq!(args, ["ws://x/ws", "Alice"]);
        let mut args = vec!["ws://x/ws".to_owned()];
        ClientTls::from_args(&mut args).unwrap();
        assert_eq!(args, ["ws://x/ws"]);
        let mut args = vec!["--ca-file".to_owned()];
        assert_eq!(
            ClientTls::from_args(&mut args).unwrap_err(),
            ClientTlsError::MissingCaFileArgument
        );
    }

    #[test]
    fn a_bad_ca_file_is_reported_with_its_path() {
        let missing = ClientTls::from_ca_file("/nonexistent/ca.pem").unwrap_err();
        assert!(
            missing.to_string().contains("/nonexistent/ca.pem"),
            "{missing}"
        );
        let dir = std::env::temp_dir().join(format!("teambot-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "nothing here").unwrap();
        let error = ClientTls::from_ca_file(&empty).unwrap_err();
        assert!(error.to_string().contains("no certificate"), "{error}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
