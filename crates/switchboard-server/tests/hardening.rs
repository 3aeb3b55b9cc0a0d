//! The runtime under attack, over real sockets: every bound holds and a bystander keeps its
//! latency. Each test is a scaled-down form of an attack measured against a release build
//! (stalled readers, unfinished fragmented messages, one address taking every connection,
//! half-sent HTTP requests, invalid UTF-8), with small limits so it runs in about a second.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::SinkExt;
use switchboard_core::{Context, Frame, Handshake, Protocol, Reject};
use switchboard_echo::Echo;
use switchboard_server::ServerConfig;
use switchboard_testkit::{Client, ConnectOptions, TIMEOUT, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame as WireFrame, coding::CloseCode};

/// A protocol that queues `n` frames of `size` bytes to the sender when asked with
/// `flood <n> <size>`, and answers anything else with `pong`: a fan-out burst in one step.
#[derive(Debug)]
struct Flood;

impl Protocol for Flood {
    type Conn = ();

    fn name(&self) -> &'static str {
        "flood"
    }

    fn admit(&self, _handshake: &Handshake<'_>) -> Result<(), Reject> {
        Ok(())
    }

    async fn on_open(&self, _conn: &mut (), _cx: &Context<'_>) {}

    async fn on_text(&self, _conn: &mut (), cx: &Context<'_>, text: &str) {
        let peer = cx.peer();
        let mut words = text.split_whitespace();
        if words.next() == Some("flood") {
            let n: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            let size: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            let frame = Frame::text("x".repeat(size));
            for _ in 0..n {
                if !peer.send(frame.clone()).is_queued() {
                    break;
                }
            }
        } else {
            let _ = peer.send(Frame::from_static("pong"));
        }
    }

    async fn on_close(&self, _conn: (), _cx: &Context<'_>) {}

    fn max_outbound_frame_bytes(&self) -> usize {
        1024 * 1024
    }
}

/// One echo round trip; returns how long it took.
async fn round_trip(client: &mut Client) -> Duration {
    let started = Instant::now();
    client.send_text("ping").await;
    match client.recv().await {
        Message::Text(text) => assert!(text.as_str() == "ping" || text.as_str() == "pong"),
        other => panic!("expected the echo, got {other:?}"),
    }
    started.elapsed()
}

/// A bystander's latency stays low while an attack runs. Generous on purpose (debug build, two
/// shared cores), but far below what the unbounded runtime showed (seconds).
const BYSTANDER_BOUND: Duration = Duration::from_millis(250);

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn from(ip: [u8; 4]) -> ConnectOptions {
    ConnectOptions {
        source_ip: Some(ip.into()),
        ..ConnectOptions::default()
    }
}

/// Opens `n` WebSockets to `url` from `ip`; each must be accepted.
async fn hold(url: &str, ip: [u8; 4], n: usize) -> Vec<Client> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(Client::connect_with(url, from(ip)).await.unwrap());
    }
    held
}

#[tokio::test]
async fn a_text_frame_with_invalid_utf8_is_closed_with_1007() {
    let server = TestServer::start(Echo::new(), ServerConfig::default()).await;
    let mut bystander = server.connect("/ws").await;
    let mut client = server.connect("/ws").await;
    let bad = WireFrame::message(vec![b'o', b'k', 0xff, 0xfe], OpCode::Data(Data::Text), true);
    client.inner().send(Message::Frame(bad)).await.unwrap();
    let close = client.expect_close().await;
    assert_eq!(close.code, CloseCode::Invalid);
    assert_eq!(u16::from(close.code), 1007);
    assert!(round_trip(&mut bystander).await < BYSTANDER_BOUND);
    assert_eq!(server.handle().stats().invalid_utf8_total, 1);
}

#[tokio::test]
async fn a_burst_over_the_byte_budget_closes_only_that_client() {
    let config = ServerConfig {
        outbound_queue_bytes: 256 * 1024,
        ..ServerConfig::default()
    };
    let server = TestServer::start(Flood, config).await;
    let mut bystander = server.connect("/").await;
    // Under the item cap (16,384) by far, over the byte bound (256 KiB backlog + the protocol's
    // 1 MiB largest frame) by 3x: an item-only bound would have queued all of it for every such
    // client.
    let mut greedy = server.connect("/").await;
    greedy.send_text("flood 64 65536").await;
    let close = greedy.expect_close().await;
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "slow consumer");
    assert!(round_trip(&mut bystander).await < BYSTANDER_BOUND);
    // The same burst within the budget reaches a client that reads.
    bystander.send_text("flood 3 65536").await;
    for _ in 0..3 {
        assert!(matches!(bystander.recv().await, Message::Text(t) if t.len() == 65536));
    }
}

#[tokio::test]
async fn a_reader_that_stops_is_closed_by_the_write_timeout_and_its_memory_freed() {
    let config = ServerConfig {
        outbound_queue_bytes: 64 * 1024 * 1024,
        write_timeout: Duration::from_millis(500),
        ..ServerConfig::default()
    };
    let server = TestServer::start(Flood, config).await;
    let mut bystander = server.connect("/").await;
    let options = ConnectOptions {
        recv_buffer: Some(4096),
        ..ConnectOptions::default()
    };
    let mut stalled = Client::connect_with(&server.ws_url("/"), options)
        .await
        .unwrap();
    // 32 MiB for a client that never reads: far more than the kernel buffers take.
    stalled.send_text("flood 32 1048576").await;
    let started = Instant::now();
    wait_until("the write timeout", || {
        server.handle().stats().write_timeouts_total == 1
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(3));
    wait_until("the stalled connection to end", || {
        server.handle().connections() == 1
    })
    .await;
    assert!(round_trip(&mut bystander).await < BYSTANDER_BOUND);
}

/// Sends the first fragment of a text message that never ends.
async fn start_unfinished_message(client: &mut Client, size: usize) {
    let fragment = WireFrame::message(vec![b'a'; size], OpCode::Data(Data::Text), false);
    client.inner().send(Message::Frame(fragment)).await.unwrap();
}

#[tokio::test]
async fn an_unfinished_fragmented_message_is_closed_by_the_message_timeout_despite_pings() {
    let config = ServerConfig {
        message_timeout: Duration::from_millis(400),
        ..ServerConfig::default()
    };
    let server = TestServer::start(Echo::new(), config).await;
    let mut bystander = server.connect("/ws").await;
    let mut client = server.connect("/ws").await;
    start_unfinished_message(&mut client, 100_000).await;
    let started = Instant::now();
    let closed = async {
        loop {
            // Pings between fragments used to keep such a socket alive until the idle timeout.
            client
                .inner()
                .send(Message::Ping(Default::default()))
                .await
                .ok();
            if let Some(Message::Close(Some(frame))) =
                client.recv_within(Duration::from_millis(100)).await
            {
                return frame;
            }
        }
    };
    let frame = tokio::time::timeout(TIMEOUT, closed).await.unwrap();
    assert_eq!(u16::from(frame.code), 1008);
    assert_eq!(frame.reason.as_str(), "message timeout");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(server.handle().stats().message_timeouts_total, 1);
    // The charge goes when the socket (and the codec's buffers) is gone.
    wait_until("the partial message's bytes to be released", || {
        server.handle().stats().reassembly_bytes == 0
    })
    .await;
    assert!(round_trip(&mut bystander).await < BYSTANDER_BOUND);
}

#[tokio::test]
async fn unfinished_messages_are_bounded_per_client_and_server_wide() {
    // Charged at twice the bytes received: a 400 KiB fragment costs ~800 KiB.
    let config = ServerConfig {
        reassembly_budget_bytes: 3 * 1024 * 1024,
        reassembly_per_ip_bytes: 1200 * 1024,
        ..ServerConfig::default()
    };
    let server = TestServer::start(Echo::new(), config).await;
    let url = server.ws_url("/ws");

    // One client address: its second half-sent message goes over its share and is refused.
    let mut first = Client::connect_with(&url, from([127, 0, 0, 2]))
        .await
        .unwrap();
    let mut second = Client::connect_with(&url, from([127, 0, 0, 2]))
        .await
        .unwrap();
    start_unfinished_message(&mut first, 400 * 1024).await;
    wait_until("the first fragment to be counted", || {
        server.handle().stats().reassembly_bytes > 300 * 1024
    })
    .await;
    start_unfinished_message(&mut second, 400 * 1024).await;
    let close = second.expect_close().await;
    assert_eq!(u16::from(close.code), 1013);
    let held = server.handle().stats().reassembly_bytes;
    assert!(held <= 1200 * 1024, "{held}");

    // Another address still gets its own large message through, whole.
    let mut other = Client::connect_with(&url, from([127, 0, 0, 3]))
        .await
        .unwrap();
    let big = "b".repeat(500 * 1024);
    other.send_text(&big).await;
    assert!(matches!(other.recv().await, Message::Text(t) if t.len() == big.len()));
    assert!(round_trip(&mut other).await < BYSTANDER_BOUND);

    // Finishing the message gives the bytes back.
    let last = WireFrame::message(b"end".to_vec(), OpCode::Data(Data::Continue), true);
    first.inner().send(Message::Frame(last)).await.unwrap();
    assert!(matches!(first.recv().await, Message::Text(t) if t.len() == 400 * 1024 + 3));
    // The refused socket's charge goes with its socket.
    drop(second);
    wait_until("every charge to be released", || {
        server.handle().stats().reassembly_bytes == 0
    })
    .await;
}

#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    let config = ServerConfig {
        max_connections_per_ip: 3,
        ..ServerConfig::default()
    };
    let server = TestServer::start(Echo::new(), config).await;
    let url = server.ws_url("/ws");
    let mut held = hold(&url, [127, 0, 0, 2], 3).await;
    assert_eq!(
        Client::refused_status(&url, from([127, 0, 0, 2])).await,
        429
    );
    // Everyone else is still served.
    let mut bystander = Client::connect_with(&url, from([127, 0, 0, 3]))
        .await
        .unwrap();
    assert!(round_trip(&mut bystander).await < BYSTANDER_BOUND);
    // A closed connection gives its share back.
    held.pop().unwrap().close().await;
    wait_until("the share to come back", || {
        server.handle().connections() == 3
    })
    .await;
    held.extend(hold(&url, [127, 0, 0, 2], 1).await);
    assert_eq!(server.handle().stats().per_client_refusals_total, 1);
}

#[tokio::test]
async fn requests_over_the_per_address_rate_get_429() {
    let config = ServerConfig {
        requests_per_ip_burst: 5,
        requests_per_ip_per_second: 1,
        ..ServerConfig::default()
    };
    let server = TestServer::start(Echo::new(), config).await;
    let url = server.ws_url("/ws");
    let _held = hold(&url, [127, 0, 0, 2], 5).await;
    assert_eq!(
        Client::refused_status(&url, from([127, 0, 0, 2])).await,
        429
    );
    assert!(
        Client::connect_with(&url, from([127, 0, 0, 3]))
            .await
            .is_ok()
    );
    // Health checks are never rate-limited.
    assert_eq!(server.http("GET", "/healthz", None).await.status, 200);
    assert_eq!(server.handle().stats().rate_limited_total, 1);
}

/// A raw TCP connection from `source`.
async fn raw_connect(server: SocketAddr, source: [u8; 4]) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((source, 0))).unwrap();
    tokio::time::timeout(TIMEOUT, socket.connect(server))
        .await
        .unwrap()
        .unwrap()
}

/// Reads until EOF (or reset) and returns what arrived, bounded by `TIMEOUT`.
async fn read_to_end(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn half_sent_requests_are_timed_out_and_capped_per_address() {
    let config = ServerConfig {
        header_read_timeout: Duration::from_millis(500),
        max_pending_per_ip: 4,
        ..ServerConfig::default()
    };
    let server = TestServer::start(Echo::new(), config).await;
    let mut slow = Vec::new();
    for i in 0..4 {
        let mut stream = raw_connect(server.addr(), [127, 0, 0, 2]).await;
        // Half a header, or (the last one) nothing at all.
        if i < 3 {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        slow.push(stream);
    }
    // The fifth connection from that address is refused at once...
    let mut refused = raw_connect(server.addr(), [127, 0, 0, 2]).await;
    assert!(read_to_end(&mut refused).await.starts_with("HTTP/1.1 429"));
    // ...while another address is served.
    let mut other = raw_connect(server.addr(), [127, 0, 0, 3]).await;
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert!(read_to_end(&mut other).await.starts_with("HTTP/1.1 200"));
    // The half-sent requests are closed by the header-read timeout.
    let started = Instant::now();
    for stream in &mut slow {
        let reply = read_to_end(stream).await;
        assert!(
            reply.is_empty() || reply.starts_with("HTTP/1.1 408"),
            "{reply}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    // Their slots are free again.
    let mut again = raw_connect(server.addr(), [127, 0, 0, 2]).await;
    again
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    assert!(read_to_end(&mut again).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn an_oversized_header_block_is_refused() {
    let server = TestServer::start(Echo::new(), ServerConfig::default()).await;
    let mut stream = raw_connect(server.addr(), [127, 0, 0, 2]).await;
    let filler = "a".repeat(300 * 1024);
    let request = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: {filler}\r\n\r\n");
    // The server stops reading and answers before the whole header is sent.
    let _ = tokio::time::timeout(TIMEOUT, stream.write_all(request.as_bytes())).await;
    let reply = read_to_end(&mut stream).await;
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 431"),
        "{reply}"
    );
    assert_eq!(server.http("GET", "/healthz", None).await.status, 200);
}

#[tokio::test]
async fn a_body_that_never_arrives_gets_408() {
    let config = ServerConfig {
        body_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let server = TestServer::start(Echo::new(), config).await;
    let mut stream = raw_connect(server.addr(), [127, 0, 0, 2]).await;
    stream
        .write_all(b"POST /anything HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-part")
        .await
        .unwrap();
    let reply = read_to_end(&mut stream).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
}
