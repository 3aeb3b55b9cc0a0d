//! A minimal WebSocket and HTTP/1.1 client over raw TCP, for attacks a well-behaved client
//! library refuses to make: unfinished fragmented messages, invalid UTF-8 in a text frame,
//! half-sent requests, oversized headers. It also reads cheaply: thousands of sockets that only
//! need to keep up with a fan-out discard bytes without parsing frames.
//!
//! Client frames are masked with the all-zero key (the mask bit is set, as RFC 6455 requires,
//! and XOR with zero leaves the payload as it is), so one shared payload buffer serves every
//! socket without a per-socket copy.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout};

/// Opcodes used here.
pub(crate) const TEXT: u8 = 0x1;
pub(crate) const CLOSE: u8 = 0x8;
pub(crate) const PING: u8 = 0x9;
pub(crate) const PONG: u8 = 0xA;

/// Why a raw exchange failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RawError {
    /// The server answered the upgrade with this HTTP status.
    Status(u16),
    /// The connection failed, closed, or timed out.
    Io(String),
}

impl std::fmt::Display for RawError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status(status) => write!(f, "HTTP {status}"),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

fn io(e: impl std::fmt::Display) -> RawError {
    RawError::Io(e.to_string())
}

/// Opens a TCP connection to `server` from loopback address `source`.
pub(crate) async fn tcp_from(server: SocketAddr, source: Ipv4Addr) -> Result<TcpStream, RawError> {
    let socket = TcpSocket::new_v4().map_err(io)?;
    socket
        .bind(SocketAddr::new(IpAddr::V4(source), 0))
        .map_err(io)?;
    let stream = timeout(Duration::from_secs(5), socket.connect(server))
        .await
        .map_err(|_| RawError::Io("connect timed out".into()))?
        .map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    Ok(stream)
}

/// One frame from the server.
#[derive(Debug)]
pub(crate) struct ServerFrame {
    pub(crate) opcode: u8,
    pub(crate) payload: Vec<u8>,
}

impl ServerFrame {
    /// The close code and reason of a close frame.
    pub(crate) fn close_code(&self) -> Option<(u16, String)> {
        (self.opcode == CLOSE).then(|| {
            let code = match self.payload.get(..2) {
                Some(&[a, b]) => u16::from_be_bytes([a, b]),
                _ => 1005,
            };
            let reason = String::from_utf8_lossy(self.payload.get(2..).unwrap_or_default());
            (code, reason.into_owned())
        })
    }

    /// The payload as JSON, for text frames.
    pub(crate) fn json(&self) -> Option<serde_json::Value> {
        (self.opcode == TEXT)
            .then(|| serde_json::from_slice(&self.payload).ok())
            .flatten()
    }
}

/// A WebSocket client over a raw TCP stream.
#[derive(Debug)]
pub(crate) struct RawWs {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawWs {
    /// Connects from `source` and upgrades `path`; a refusal returns its HTTP status.
    pub(crate) async fn connect(
        server: SocketAddr,
        source: Ipv4Addr,
        path: &str,
    ) -> Result<Self, RawError> {
        let stream = tcp_from(server, source).await?;
        Self::upgrade(stream, server, path).await
    }

    async fn upgrade(
        mut stream: TcpStream,
        server: SocketAddr,
        path: &str,
    ) -> Result<Self, RawError> {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut buffer = Vec::with_capacity(1024);
        let deadline = Instant::now() + Duration::from_secs(5);
        let head_end = loop {
            if let Some(at) = find(&buffer, b"\r\n\r\n") {
                break at + 4;
            }
            if buffer.len() > 64 * 1024 {
                return Err(RawError::Io("response head too large".into()));
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
                .await
                .map_err(|_| RawError::Io("upgrade timed out".into()))?
                .map_err(io)?;
            if n == 0 {
                return Err(RawError::Io("closed during the upgrade".into()));
            }
            buffer.extend_from_slice(chunk.get(..n).unwrap_or_default());
        };
        let status = status_of(&buffer).ok_or_else(|| RawError::Io("no HTTP status".into()))?;
        if status != 101 {
            return Err(RawError::Status(status));
        }
        buffer.drain(..head_end);
        Ok(Self { stream, buffer })
    }

    /// Writes one masked frame (zero key) with `payload`.
    pub(crate) async fn send_frame(
        &mut self,
        opcode: u8,
        fin: bool,
        payload: &[u8],
    ) -> Result<(), RawError> {
        self.stream
            .write_all(&frame_header(opcode, fin, payload.len()))
            .await
            .map_err(io)?;
        self.stream.write_all(payload).await.map_err(io)
    }

    /// Writes one text frame.
    pub(crate) async fn send_text(&mut self, text: &str) -> Result<(), RawError> {
        self.send_frame(TEXT, true, text.as_bytes()).await
    }

    /// Reads the next frame within `wait`; `Ok(None)` on timeout. Answers pings.
    pub(crate) async fn next_frame(
        &mut self,
        wait: Duration,
    ) -> Result<Option<ServerFrame>, RawError> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(frame) = self.parse_frame()? {
                if frame.opcode == PING {
                    let payload = frame.payload.clone();
                    self.send_frame(PONG, true, &payload).await?;
                    continue;
                }
                return Ok(Some(frame));
            }
            let mut chunk = [0u8; 16 * 1024];
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await;
            let n = match read {
                Err(_) => return Ok(None),
                Ok(result) => result.map_err(io)?,
            };
            if n == 0 {
                return Err(RawError::Io("closed by the server".into()));
            }
            self.buffer
                .extend_from_slice(chunk.get(..n).unwrap_or_default());
        }
    }

    /// Reads frames until one's JSON satisfies `accept`, within `wait`.
    pub(crate) async fn until_json(
        &mut self,
        wait: Duration,
        accept: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value, RawError> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left).await? {
                None => return Err(RawError::Io(format!("no matching frame within {wait:?}"))),
                Some(frame) => {
                    if let Some((code, reason)) = frame.close_code() {
                        return Err(RawError::Io(format!("closed {code} {reason}")));
                    }
                    if let Some(value) = frame.json()
                        && accept(&value)
                    {
                        return Ok(value);
                    }
                }
            }
        }
    }

    /// Reads until the server's close frame (or EOF) within `wait`: the close code and reason.
    pub(crate) async fn close_code(&mut self, wait: Duration) -> Option<(u16, String)> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame(left).await {
                Ok(Some(frame)) => {
                    if let Some(close) = frame.close_code() {
                        return Some(close);
                    }
                }
                Ok(None) => return None,
                Err(_) => return Some((1006, "connection dropped".into())),
            }
        }
    }

    /// The stream and the bytes already read from it but not parsed.
    pub(crate) fn into_parts(self) -> (TcpStream, Vec<u8>) {
        (self.stream, self.buffer)
    }

    fn parse_frame(&mut self) -> Result<Option<ServerFrame>, RawError> {
        let Some(&[b0, b1]) = self.buffer.get(..2) else {
            return Ok(None);
        };
        let (len, header) = match b1 & 0x7F {
            126 => match self.buffer.get(2..4) {
                Some(&[a, b]) => (u64::from(u16::from_be_bytes([a, b])), 4usize),
                _ => return Ok(None),
            },
            127 => match self.buffer.get(2..10) {
                Some(bytes) => {
                    let mut be = [0u8; 8];
                    be.copy_from_slice(bytes);
                    (u64::from_be_bytes(be), 10usize)
                }
                None => return Ok(None),
            },
            n => (u64::from(n), 2usize),
        };
        let len = usize::try_from(len).map_err(io)?;
        if len > 64 * 1024 * 1024 {
            return Err(RawError::Io(format!("a {len}-byte frame from the server")));
        }
        let end = header.saturating_add(len);
        if self.buffer.len() < end {
            return Ok(None);
        }
        let payload = self.buffer.get(header..end).unwrap_or_default().to_vec();
        self.buffer.drain(..end);
        Ok(Some(ServerFrame {
            opcode: b0 & 0x0F,
            payload,
        }))
    }
}

/// The header of a client frame carrying `len` bytes, masked with the zero key.
pub(crate) fn frame_header(opcode: u8, fin: bool, len: usize) -> Vec<u8> {
    let mut header = Vec::with_capacity(14);
    header.push(if fin { 0x80 } else { 0 } | (opcode & 0x0F));
    if len < 126 {
        header.push(0x80 | u8::try_from(len).unwrap_or(0));
    } else if let Ok(short) = u16::try_from(len) {
        header.push(0x80 | 126);
        header.extend_from_slice(&short.to_be_bytes());
    } else {
        header.push(0x80 | 127);
        header.extend_from_slice(&(len as u64).to_be_bytes());
    }
    header.extend_from_slice(&[0, 0, 0, 0]);
    header
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn status_of(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A plain HTTP reply.
#[derive(Debug, Clone)]
pub(crate) struct HttpReply {
    pub(crate) status: u16,
    pub(crate) body: String,
}

/// One HTTP/1.1 request on a fresh connection from `source` (`Connection: close`), bounded.
pub(crate) async fn http(
    server: SocketAddr,
    source: Ipv4Addr,
    method: &str,
    path: &str,
    body: &str,
) -> Result<HttpReply, RawError> {
    let exchange = async {
        let mut stream = tcp_from(server, source).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        stream.write_all(body.as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.map_err(io)?;
        let status = status_of(&raw).ok_or_else(|| RawError::Io("no HTTP status".into()))?;
        let body = find(&raw, b"\r\n\r\n")
            .and_then(|at| raw.get(at + 4..))
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default();
        Ok(HttpReply { status, body })
    };
    timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| RawError::Io("HTTP request timed out".into()))?
}

/// Reads what the server sends on a half-open exchange within `wait`: the status of a reply if
/// one came, `Err` when it closed without one, `Ok(None)` when it is still waiting.
pub(crate) async fn server_answer(
    stream: &mut TcpStream,
    wait: Duration,
) -> Result<Option<u16>, RawError> {
    let mut raw = Vec::new();
    let deadline = Instant::now() + wait;
    loop {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return Ok(status_of(&raw)),
            Ok(Ok(0)) => {
                return status_of(&raw)
                    .map(Some)
                    .ok_or(RawError::Io("closed".into()));
            }
            Ok(Ok(n)) => {
                raw.extend_from_slice(chunk.get(..n).unwrap_or_default());
                if let Some(status) = status_of(&raw)
                    && find(&raw, b"\r\n").is_some()
                {
                    return Ok(Some(status));
                }
            }
            Ok(Err(e)) => {
                return status_of(&raw).map(Some).ok_or(io(e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_encode_every_length_form_with_the_mask_bit() {
        assert_eq!(frame_header(TEXT, true, 5), vec![0x81, 0x85, 0, 0, 0, 0]);
        assert_eq!(
            frame_header(TEXT, false, 300),
            vec![0x01, 0xFE, 1, 44, 0, 0, 0, 0]
        );
        let long = frame_header(0x0, true, 70_000);
        assert_eq!(long.get(..2), Some(&[0x80, 0xFF][..]));
        assert_eq!(long.len(), 14);
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(status_of(b"HTTP/1.1 429 Too Many Requests\r\n"), Some(429));
        assert_eq!(status_of(b"garbage"), None);
    }
}
