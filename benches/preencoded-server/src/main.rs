//! The benchmark yardstick for the broadcast hot path: the same ip-chat wire work as
//! `benches/baseline-server` (same handshake, same `send_message` in, same `message` frames out),
//! written the cheapest way we know, so `cargo xtask bench` can show how close Switchboard gets.
//!
//! Two things differ from the tokio-tungstenite baseline, both on the way out:
//! - each broadcast is encoded ONCE to its final wire bytes. Server frames are unmasked, so the
//!   header (2, 4 or 10 bytes) plus payload is the same byte string for every recipient; it lives
//!   in one `Bytes` and each queue gets a reference-counted clone;
//! - each connection's writer takes up to 64 queued frames and hands them to the kernel in one
//!   `write_vectored` call (looping on partial writes), instead of copying them into a per-socket
//!   write buffer first.
//!
//! Reading is a tiny handwritten decoder for masked client frames (unfragmented, ≤ 64 KiB: what
//! WebSocket clients send for chat messages). None of the platform around it (no origin check, rate
//! limit, history, keepalive, shutdown). Usage: `preencoded-server ADDR`.
#![allow(clippy::print_stderr, reason = "a benchmark helper")]

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

type Clients = Arc<Mutex<HashMap<u64, mpsc::Sender<Bytes>>>>;

/// Frames handed to one `write_vectored` call at most (the baseline's batch size too).
const BATCH: usize = 64;
/// Frames queued per connection at most; past it a broadcast skips the connection (as the
/// baseline's does). Switchboard's default `--outbound-queue`, so a burst that Switchboard must
/// hold is one this server holds too (the baseline's 1,024 drops most of a 5,000-message burst).
const QUEUE: usize = 16 * 1024;
/// Largest client frame payload accepted; chat messages are far smaller.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Largest handshake request accepted.
const MAX_REQUEST: usize = 8 * 1024;

#[tokio::main]
async fn main() -> io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".to_owned());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("pre-encoded yardstick listening on {addr}");
    let clients: Clients = Arc::default();
    let mut next_id = 0u64;
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let clients = clients.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            // 1 KiB to start, like the baseline's tungstenite read buffer.
            let mut reader = Reader {
                half: read,
                buf: BytesMut::with_capacity(1024),
            };
            let Some(response) = reader.handshake().await else {
                return;
            };
            if write.write_all(response.as_bytes()).await.is_err() {
                return;
            }
            let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
            tokio::spawn(write_queued(rx, write));
            clients
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, tx.clone());
            reader.serve(&clients, &tx).await;
            // Dropping the last sender lets the writer flush what is queued (e.g. the close
            // reply) and then drop its half, which closes the socket.
            clients
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        });
    }
}

/// The read half with its buffer: handshake first, then client frames.
struct Reader {
    half: OwnedReadHalf,
    buf: BytesMut,
}

impl Reader {
    /// Reads until `buf` holds at least `n` bytes; `false` at EOF or on error.
    async fn fill(&mut self, n: usize) -> bool {
        while self.buf.len() < n {
            self.buf.reserve(n - self.buf.len());
            match self.half.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return false,
                Ok(_) => {}
            }
        }
        true
    }

    /// Reads the HTTP upgrade request and returns the 101 response (the same headers
    /// tungstenite's server handshake sends), or `None` if it is not a WebSocket upgrade.
    async fn handshake(&mut self) -> Option<String> {
        let end = loop {
            if let Some(at) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if self.buf.len() >= MAX_REQUEST || !self.fill(self.buf.len() + 1).await {
                return None;
            }
        };
        // Anything after the request is already frame data: keep it in the buffer.
        let request = self.buf.split_to(end);
        let text = std::str::from_utf8(&request).ok()?;
        let key = text.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim())
        })?;
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        Some(format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Accept: {accept}\r\n\r\n"
        ))
    }

    /// Decodes client frames until the client closes or breaks the protocol.
    async fn serve(&mut self, clients: &Clients, own: &mpsc::Sender<Bytes>) {
        loop {
            if !self.fill(2).await {
                return;
            }
            let (head, len7) = (self.buf[0], self.buf[1]);
            let (fin, opcode, masked) = (head & 0x80 != 0, head & 0x0f, len7 & 0x80 != 0);
            let extended = match len7 & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let header = 2 + extended + 4;
            if !masked || !fin || !self.fill(header).await {
                // Unmasked client frames are a protocol error; fragments are not needed here.
                return;
            }
            let len = match extended {
                0 => usize::from(len7 & 0x7f),
                _ => self.buf[2..2 + extended].iter().fold(0usize, |n, b| {
                    n.saturating_mul(256).saturating_add(usize::from(*b))
                }),
            };
            if len > MAX_PAYLOAD || !self.fill(header + len).await {
                return;
            }
            let mut frame = self.buf.split_to(header + len);
            let mask = [
                frame[header - 4],
                frame[header - 3],
                frame[header - 2],
                frame[header - 1],
            ];
            let payload = &mut frame[header..];
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= mask[i % 4];
            }
            match opcode {
                0x1 => match std::str::from_utf8(payload) {
                    Ok(text) => broadcast(clients, text),
                    Err(_) => return,
                },
                // Close: answer with an empty close frame, as tungstenite would, then stop.
                0x8 => {
                    let _ = own.try_send(Bytes::from_static(&[0x88, 0x00]));
                    return;
                }
                0x9 => {
                    let _ = own.try_send(encode(0xA, payload));
                }
                _ => {}
            }
        }
    }
}

/// One unmasked server frame (FIN set) as its final wire bytes.
fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(10 + payload.len());
    frame.put_u8(0x80 | opcode);
    match payload.len() {
        len @ 0..=125 => frame.put_u8(len as u8),
        len @ 126..=0xffff => {
            frame.put_u8(126);
            frame.put_u16(len as u16);
        }
        len => {
            frame.put_u8(127);
            frame.put_u64(len as u64);
        }
    }
    frame.put_slice(payload);
    frame.freeze()
}

/// Writes queued frames straight to the socket, up to [`BATCH`] per `write_vectored` call.
async fn write_queued(mut rx: mpsc::Receiver<Bytes>, mut socket: OwnedWriteHalf) {
    loop {
        // A fresh batch per wake-up (as the baseline does) so an idle socket holds no buffer.
        let mut batch = Vec::new();
        if rx.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        if write_all_vectored(&mut socket, &batch).await.is_err() {
            return;
        }
    }
}

/// `write_vectored` until every byte of `frames` is written, resuming after partial writes.
async fn write_all_vectored(socket: &mut OwnedWriteHalf, frames: &[Bytes]) -> io::Result<()> {
    let mut slices = [IoSlice::new(&[]); BATCH];
    for (slice, frame) in slices.iter_mut().zip(frames) {
        *slice = IoSlice::new(frame);
    }
    let mut rest = &mut slices[..frames.len().min(BATCH)];
    while !rest.is_empty() {
        let written = socket.write_vectored(rest).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, written);
    }
    Ok(())
}

/// The baseline's broadcast, but the frame is encoded once and shared by every queue.
fn broadcast(clients: &Clients, text: &str) {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(text) else {
        return;
    };
    let Some(body) = value["data"]["text"].as_str() else {
        return;
    };
    let message = serde_json::json!({"type": "message", "data": {
        "id": uuid::Uuid::new_v4(), "text": body, "author_id": "baseline", "author_name": "Anonymous",
        "created_at": chrono::Utc::now().timestamp(), "reactions": {}}});
    let frame = encode(0x1, message.to_string().as_bytes());
    for tx in clients
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .values()
    {
        let _ = tx.try_send(frame.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_take_2_4_or_10_bytes() {
        for (len, header) in [(0, 2), (125, 2), (126, 4), (0xffff, 4), (0x1_0000, 10)] {
            let frame = encode(0x1, &vec![b'x'; len]);
            assert_eq!(frame.len(), header + len, "payload of {len} bytes");
            assert_eq!(frame[0], 0x81);
        }
        assert_eq!(&encode(0x1, b"hi")[..], &[0x81, 2, b'h', b'i']);
        assert_eq!(&encode(0x1, &[0; 126])[..4], &[0x81, 126, 0, 126]);
    }
}
