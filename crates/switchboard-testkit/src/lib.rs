//! Test helpers every Switchboard protocol crate reuses.
//!
//! [`TestServer`] runs a protocol on `127.0.0.1:0` with the real runtime; [`Client`] is a real
//! tokio-tungstenite client (optionally bound to a chosen loopback source address such as
//! `127.0.0.2`) whose every wait is bounded by [`TIMEOUT`]. Helpers panic with a clear message
//! instead of returning errors: a panic is how a test fails.
#![allow(
    clippy::panic,
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test harness: panicking fails the test"
)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use switchboard_core::Protocol;
use switchboard_server::{ServerConfig, ServerHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

mod capture;
pub mod conformance;
pub mod driver;
pub mod jwt;
pub mod metrics;
pub mod redis;
pub mod tls;

pub use driver::{Driver, Session};
pub use serde_json::json;

/// The bound on every wait in this crate.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A protocol served by the real runtime on an ephemeral loopback port.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    handle: ServerHandle,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    /// Serves `protocol` with `config` on `127.0.0.1:0`.
    pub async fn start<P: Protocol>(protocol: P, config: ServerConfig) -> Self {
        Self::start_shared(Arc::new(protocol), config).await
    }

    /// Like [`TestServer::start`] for a protocol the test keeps a handle to.
    pub async fn start_shared<P: Protocol>(protocol: Arc<P>, config: ServerConfig) -> Self {
        let listener = switchboard_server::bind(([127, 0, 0, 1], 0).into(), config.accept_backlog)
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let grace = config.shutdown_grace;
        let (router, handle) = switchboard_server::router(protocol, config);
        let serve_handle = handle.clone();
        let task = tokio::spawn(async move {
            switchboard_server::serve(listener, router, &serve_handle, grace).await
        });
        Self { addr, handle, task }
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://127.0.0.1:<port><path>`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// The runtime handle (connection count, shutdown).
    pub fn handle(&self) -> &ServerHandle {
        &self.handle
    }

    /// Connects a client to `path`.
    pub async fn connect(&self, path: &str) -> Client {
        Client::connect(&self.ws_url(path)).await
    }

    /// Connects a client to `path` from loopback address `source` (e.g. `127.0.0.2`).
    pub async fn connect_from(&self, path: &str, source: [u8; 4]) -> Client {
        let options = ConnectOptions {
            source_ip: Some(IpAddr::from(source)),
            ..ConnectOptions::default()
        };
        Client::connect_with(&self.ws_url(path), options)
            .await
            .expect("connect")
    }

    /// Sends a plain HTTP request and returns the response.
    pub async fn http(&self, method: &str, path: &str, body: Option<&str>) -> HttpReply {
        http_request(self.addr, method, path, body).await
    }

    /// Checks the demo page every protocol serves: `GET /` is an HTML document, each of `assets`
    /// (e.g. `/app.js`) answers 200 with the content type of its extension and a body, unknown
    /// paths are 404, `POST /` is 405 and `/healthz` still answers. Returns the page and the
    /// assets' replies, in order, for the protocol's own checks.
    pub async fn expect_demo_page(&self, assets: &[&str]) -> (HttpReply, Vec<HttpReply>) {
        let page = self.http("GET", "/", None).await;
        assert_eq!(page.status, 200, "GET /");
        let headers = page.headers.to_ascii_lowercase();
        assert!(
            headers.contains("content-type: text/html; charset=utf-8"),
            "{}",
            page.headers
        );
        assert!(
            page.body.starts_with("<!doctype html>"),
            "GET / is not an HTML document"
        );
        let mut replies = Vec::with_capacity(assets.len());
        for path in assets {
            let asset = self.http("GET", path, None).await;
            assert_eq!(asset.status, 200, "{path}");
            let kind = match path.rsplit_once('.').map(|(_, ext)| ext) {
                Some("js") => "text/javascript",
                Some("css") => "text/css",
                _ => "",
            };
            assert!(
                asset.headers.to_ascii_lowercase().contains(kind),
                "{path}: {}",
                asset.headers
            );
            assert!(!asset.body.is_empty(), "{path} is empty");
            replies.push(asset);
        }
        for unknown in ["/nope", "/nope.js"] {
            assert_eq!(
                self.http("GET", unknown, None).await.status,
                404,
                "{unknown}"
            );
        }
        assert_eq!(
            self.http("POST", "/", Some("{}")).await.status,
            405,
            "POST /"
        );
        assert_eq!(
            self.http("GET", "/healthz", None).await.status,
            200,
            "/healthz"
        );
        (page, replies)
    }

    /// Checks that `GET /asyncapi.json` answers 200 with `application/json` and exactly
    /// `document` (the protocol's file in docs/asyncapi/, which the e2e contract test checks
    /// against captured frames), an AsyncAPI 3.0.0 document titled `title`.
    pub async fn expect_asyncapi(&self, title: &str, document: &str) {
        let reply = self.http("GET", "/asyncapi.json", None).await;
        assert_eq!(reply.status, 200, "GET /asyncapi.json");
        assert!(
            reply
                .headers
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{}",
            reply.headers
        );
        let served = reply.json();
        assert_eq!(served["asyncapi"], "3.0.0");
        assert_eq!(served["info"]["title"], title);
        assert_eq!(reply.body, document, "the served document is the file");
    }

    /// Starts a graceful shutdown and waits (bounded) for the server task to return.
    pub async fn shutdown(self) -> std::io::Result<()> {
        self.handle.shutdown();
        timeout(TIMEOUT * 2, self.task)
            .await
            .expect("server did not stop in time")
            .expect("server task panicked")
    }
}

/// Options for [`Client::connect_with`].
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Bind the client socket to this local IP before connecting.
    pub source_ip: Option<IpAddr>,
    /// Send this `Origin` header.
    pub origin: Option<String>,
    /// Shrink the client's kernel receive buffer (bytes), e.g. to make a slow reader quickly.
    pub recv_buffer: Option<u32>,
    /// Extra request headers, e.g. `("x-forwarded-for", "203.0.113.9")`.
    pub headers: Vec<(String, String)>,
}

/// A WebSocket client whose waits are bounded by [`TIMEOUT`].
#[derive(Debug)]
pub struct Client {
    ws: WebSocketStream<TcpStream>,
    /// The WebSocket path (no query), under which received frames are captured.
    path: String,
}

impl Client {
    /// Connects to `url` or panics.
    pub async fn connect(url: &str) -> Self {
        Self::connect_with(url, ConnectOptions::default())
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"))
    }

    /// Connects with options; an HTTP refusal comes back as `Err(WsError::Http(..))`.
    pub async fn connect_with(url: &str, options: ConnectOptions) -> Result<Self, WsError> {
        let mut request = url.into_client_request()?;
        if let Some(origin) = &options.origin {
            request.headers_mut().insert(
                "origin",
                HeaderValue::from_str(origin).expect("origin header"),
            );
        }
        for (name, value) in &options.headers {
            let name =
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .expect("header name");
            request
                .headers_mut()
                .append(name, HeaderValue::from_str(value).expect("header value"));
        }
        let path = request.uri().path().to_owned();
        let host = request.uri().host().unwrap_or("127.0.0.1").to_owned();
        let port = request.uri().port_u16().unwrap_or(80);
        let target: SocketAddr = format!("{host}:{port}")
            .parse()
            .expect("test URLs use IP literals");
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = options.source_ip {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        if let Some(bytes) = options.recv_buffer {
            socket.set_recv_buffer_size(bytes)?;
        }
        let stream = timeout(TIMEOUT, socket.connect(target))
            .await
            .map_err(|_| timed_out())??;
        stream.set_nodelay(true)?;
        let (ws, _response) = timeout(TIMEOUT, tokio_tungstenite::client_async(request, stream))
            .await
            .map_err(|_| timed_out())??;
        Ok(Self { ws, path })
    }

    /// The HTTP status with which connecting to `url` was refused; panics if it was accepted.
    pub async fn refused_status(url: &str, options: ConnectOptions) -> u16 {
        match Self::connect_with(url, options).await {
            Ok(_) => panic!("expected {url} to be refused, but the upgrade succeeded"),
            Err(WsError::Http(response)) => response.status().as_u16(),
            Err(other) => panic!("expected an HTTP refusal from {url}, got {other}"),
        }
    }

    /// Sends `value` as a JSON text frame.
    pub async fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string()).await;
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.send(Message::text(text)).await;
    }

    /// Sends any message.
    pub async fn send(&mut self, message: Message) {
        timeout(TIMEOUT, self.ws.send(message))
            .await
            .expect("send timed out")
            .expect("send failed");
    }

    /// The next data or close message (pings and pongs are skipped), or panics after [`TIMEOUT`].
    pub async fn recv(&mut self) -> Message {
        self.recv_within(TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("no frame within {TIMEOUT:?}"))
    }

    /// The next data or close message within `wait`, `None` if nothing came.
    pub async fn recv_within(&mut self, wait: Duration) -> Option<Message> {
        let next = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(message)) => {
                        self.captured(&message);
                        return message;
                    }
                    Some(Err(e)) => panic!("socket error while waiting for a frame: {e}"),
                    None => panic!("socket ended while waiting for a frame"),
                }
            }
        };
        timeout(wait, next).await.ok()
    }

    /// The next text frame parsed as JSON.
    pub async fn recv_json(&mut self) -> Value {
        match self.recv().await {
            Message::Text(text) => {
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
            }
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next JSON frame, which must have `"type": kind`.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        let frame = self.recv_json().await;
        assert_eq!(frame["type"], kind, "unexpected frame: {frame}");
        frame
    }

    /// Skips JSON frames until one satisfies `accept` (bounded by [`TIMEOUT`] overall).
    pub async fn recv_until(&mut self, accept: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let message = self
                .recv_within(left)
                .await
                .unwrap_or_else(|| panic!("no matching frame within {TIMEOUT:?}"));
            if let Message::Text(text) = message
                && let Ok(value) = serde_json::from_str::<Value>(&text)
                && accept(&value)
            {
                return value;
            }
        }
    }

    /// Asserts that no data frame arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        if let Some(message) = self.recv_within(wait).await {
            panic!("expected no frame, got {message:?}");
        }
    }

    /// Reads until the server's close frame arrives (data frames before it are skipped) and
    /// returns it; panics if the socket ends without one.
    pub async fn expect_close(&mut self) -> CloseFrame {
        let next = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Close(Some(frame)))) => return frame,
                    Some(Ok(Message::Close(None))) => panic!("close frame without a code"),
                    Some(Ok(message)) => self.captured(&message),
                    Some(Err(e)) => panic!("socket error before a close frame: {e}"),
                    None => panic!("socket ended without a close frame"),
                }
            }
        };
        timeout(TIMEOUT, next)
            .await
            .expect("no close frame in time")
    }

    /// Reads until the socket ends for any reason (close frame, reset, EOF); bounded.
    pub async fn expect_end(&mut self) {
        let drain = async {
            while let Some(Ok(message)) = self.ws.next().await {
                self.captured(&message);
            }
        };
        timeout(TIMEOUT, drain)
            .await
            .expect("socket did not end in time");
    }

    /// Closes politely.
    pub async fn close(mut self) {
        let _ = timeout(TIMEOUT, self.ws.close(None)).await;
    }

    /// Hands a received text frame to the frame capture (a no-op unless it is turned on).
    fn captured(&self, message: &Message) {
        if let Message::Text(text) = message {
            capture::record(&self.path, text);
        }
    }

    /// The underlying stream, for tests that need raw control.
    pub fn inner(&mut self) -> &mut WebSocketStream<TcpStream> {
        &mut self.ws
    }
}

fn timed_out() -> WsError {
    WsError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "timed out",
    ))
}

/// A plain HTTP response.
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// Status code.
    pub status: u16,
    /// Raw header block.
    pub headers: String,
    /// Body as text.
    pub body: String,
}

impl HttpReply {
    /// The body parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// Sends one HTTP/1.1 request with `Connection: close` and reads the whole response.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> HttpReply {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect for HTTP");
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write HTTP request");
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .expect("read HTTP response");
        String::from_utf8(raw).expect("HTTP response is UTF-8")
    };
    let raw = timeout(TIMEOUT, exchange)
        .await
        .expect("HTTP request timed out");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    HttpReply {
        status,
        headers: head.to_owned(),
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}
