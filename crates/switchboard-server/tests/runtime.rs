//! Runtime behaviour every protocol gets, tested once here with a small room protocol built on
//! the state engine: origin check, frame limit, slow consumers, connection limit, keepalive,
//! graceful shutdown, hooks that wait on the engine, and engine events.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::sync::Arc;
use std::time::Duration;

use switchboard_core::engine::{EngineEvent, MemoryCluster, MemoryLimits};
use switchboard_core::{Context, Engine, Frame, Handshake, Keepalive, Protocol, Reject};
use switchboard_server::ServerConfig;
use switchboard_testkit::{Client, ConnectOptions, TIMEOUT, TestServer};
use tokio::sync::Semaphore;
use tokio::time::{Instant, sleep, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const ROOM: &str = "room";

/// Everyone on `/ws` is in one room: a text frame is published to the room (the sender too).
/// `wait` makes the hook wait for a permit of `gate` first, as a hook waiting on a slow engine
/// would, then answers `done`. Presence: every socket joins the room as member `m<conn id>`;
/// a member that expires is announced to the room as `expired:<member>`.
struct Room {
    gate: Arc<Semaphore>,
}

impl Room {
    fn new() -> Self {
        Self {
            gate: Arc::new(Semaphore::new(0)),
        }
    }
}

impl Protocol for Room {
    type Conn = ();

    fn name(&self) -> &'static str {
        "room"
    }

    fn admit(&self, handshake: &Handshake<'_>) -> Result<(), Reject> {
        if handshake.path == "/ws" {
            Ok(())
        } else {
            Err(Reject::NotFound)
        }
    }

    async fn on_open(&self, _conn: &mut (), cx: &Context<'_>) {
        cx.engine().subscribe(ROOM, cx.peer()).await.unwrap();
        let member = format!("m{}", cx.peer().id().get());
        cx.engine()
            .presence_join(ROOM, &member, cx.me())
            .await
            .unwrap();
    }

    async fn on_text(&self, _conn: &mut (), cx: &Context<'_>, text: &str) {
        if text == "wait" {
            let permit = self.gate.acquire().await.unwrap();
            permit.forget();
            let _ = cx.send(Frame::from_static("done"));
            return;
        }
        cx.engine()
            .publish(ROOM, Frame::text(text), None)
            .await
            .unwrap();
    }

    async fn on_close(&self, _conn: (), cx: &Context<'_>) {
        cx.engine().unsubscribe(ROOM, cx.peer().id());
        let member = format!("m{}", cx.peer().id().get());
        let _ = cx.engine().presence_leave(ROOM, &member, cx.me()).await;
    }

    async fn on_engine_event(&self, engine: &Engine, event: EngineEvent) {
        let EngineEvent::MemberExpired { member, .. } = event;
        let _ = engine
            .publish(ROOM, Frame::text(format!("expired:{member}")), None)
            .await;
    }
}

async fn start(config: ServerConfig) -> TestServer {
    TestServer::start(Room::new(), config).await
}

async fn recv_text(client: &mut Client) -> String {
    match client.recv().await {
        Message::Text(text) => text.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

#[tokio::test]
async fn upgrades_from_unlisted_origins_are_refused_with_403() {
    let config = ServerConfig {
        allowed_origins: Some(vec!["http://good.example".into()]),
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let url = server.ws_url("/ws");
    let evil = ConnectOptions {
        origin: Some("http://evil.example".into()),
        ..ConnectOptions::default()
    };
    assert_eq!(Client::refused_status(&url, evil).await, 403);
    let good = ConnectOptions {
        origin: Some("http://good.example".into()),
        ..ConnectOptions::default()
    };
    let mut client = Client::connect_with(&url, good)
        .await
        .expect("listed origin is accepted");
    client.send_text("hi").await;
    assert_eq!(recv_text(&mut client).await, "hi");
    // Non-browser clients send no Origin at all and are accepted.
    Client::connect(&url).await;
}

#[tokio::test]
async fn an_oversized_frame_closes_that_connection_with_1009() {
    let config = ServerConfig {
        max_frame_bytes: Some(1024),
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let mut bystander = server.connect("/ws").await;
    let mut client = server.connect("/ws").await;
    client.send_text(&"x".repeat(1024)).await;
    assert_eq!(
        recv_text(&mut client).await.len(),
        1024,
        "at the limit is fine"
    );
    client.send_text(&"x".repeat(1025)).await;
    assert_eq!(client.expect_close().await.code, CloseCode::Size);
    assert_eq!(server.handle().stats().oversized_total, 1);
    // The bystander got the 1024-byte frame, and is still served.
    assert_eq!(recv_text(&mut bystander).await.len(), 1024);
    bystander.send_text("still serving").await;
    assert_eq!(recv_text(&mut bystander).await, "still serving");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_as_a_slow_consumer_and_nobody_else_waits() {
    let config = ServerConfig {
        outbound_queue: 16,
        close_timeout: TIMEOUT * 2,
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let url = server.ws_url("/ws");
    let small = ConnectOptions {
        recv_buffer: Some(4096),
        ..ConnectOptions::default()
    };
    let mut slow = Client::connect_with(&url, small)
        .await
        .expect("slow client connects");
    let mut fast = server.connect("/ws").await;
    let text = "y".repeat(500);
    let started = Instant::now();
    let mut sent = 0usize;
    while server.handle().stats().slow_consumers_total == 0 {
        assert!(sent < 20_000, "the slow client was never disconnected");
        assert!(started.elapsed() < TIMEOUT * 4, "flooding took too long");
        fast.send_text(&text).await;
        assert_eq!(recv_text(&mut fast).await, text);
        sent += 1;
    }
    fast.send_text("after").await;
    assert_eq!(recv_text(&mut fast).await, "after");
    let close = slow.expect_close().await;
    assert_eq!(close.code, CloseCode::Policy);
    assert_eq!(close.reason.as_str(), "slow consumer");
}

#[tokio::test]
async fn a_hook_waiting_on_the_engine_does_not_stall_its_sockets_writer() {
    // A queue of 8 items: if the socket's writer stopped while its hook waits, the frames
    // published to it meanwhile would overflow the queue and close it as a slow consumer.
    let config = ServerConfig {
        outbound_queue: 8,
        ..ServerConfig::default()
    };
    let room = Room::new();
    let gate = room.gate.clone();
    let server = TestServer::start(room, config).await;
    let mut waiting = server.connect("/ws").await;
    let mut talker = server.connect("/ws").await;
    waiting.send_text("wait").await;
    for i in 0..200 {
        talker.send_text(&format!("n{i}")).await;
        assert_eq!(recv_text(&mut talker).await, format!("n{i}"));
        // The waiting socket receives every frame while its own hook is still blocked.
        assert_eq!(recv_text(&mut waiting).await, format!("n{i}"));
    }
    assert_eq!(server.handle().stats().slow_consumers_total, 0);
    gate.add_permits(1);
    assert_eq!(recv_text(&mut waiting).await, "done");
    waiting.send_text("back").await;
    assert_eq!(recv_text(&mut waiting).await, "back");
}

#[tokio::test]
async fn a_member_of_a_lost_node_is_announced_by_the_protocols_engine_event_hook() {
    let cluster = MemoryCluster::new(MemoryLimits::default());
    let config = ServerConfig {
        engine: cluster.node(),
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let mut client = server.connect("/ws").await;
    // Another node of the cluster holds one member, then dies.
    let other = cluster.node();
    let conn = other.conn_ref(switchboard_core::ConnId::next());
    assert!(other.presence_join(ROOM, "ghost", conn).await.unwrap());
    cluster.kill(other.node());
    assert_eq!(recv_text(&mut client).await, "expired:ghost");
}

#[tokio::test]
async fn readyz_answers_200_while_the_engine_is_ready() {
    // The in-memory engine is always ready; a cluster engine that lost its Redis answers 503
    // (tested against a real Redis in the CLI's tests).
    let server = start(ServerConfig::default()).await;
    let reply = server.http("GET", "/readyz", None).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "ready"));
    assert_eq!(server.http("GET", "/healthz", None).await.status, 200);
}

#[tokio::test]
async fn past_max_connections_upgrades_get_503() {
    let config = ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let url = server.ws_url("/ws");
    let first = Client::connect(&url).await;
    let _second = Client::connect(&url).await;
    assert_eq!(
        Client::refused_status(&url, ConnectOptions::default()).await,
        503
    );
    first.close().await;
    let deadline = Instant::now() + TIMEOUT;
    while server.handle().connections() >= 2 {
        assert!(
            Instant::now() < deadline,
            "the closed connection was never released"
        );
        sleep(Duration::from_millis(10)).await;
    }
    Client::connect(&url).await;
}

#[tokio::test]
async fn a_silent_peer_is_dropped_after_the_idle_timeout() {
    let config = ServerConfig {
        keepalive: Keepalive {
            ping_interval: None,
            idle_timeout: Duration::from_millis(300),
        },
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let mut client = server.connect("/ws").await;
    let close = client.expect_close().await;
    assert_eq!(close.code, CloseCode::Away);
    assert_eq!(close.reason.as_str(), "idle timeout");
}

#[tokio::test]
async fn pings_keep_a_responsive_peer_alive() {
    let config = ServerConfig {
        keepalive: Keepalive {
            ping_interval: Some(Duration::from_millis(50)),
            idle_timeout: Duration::from_millis(300),
        },
        ..ServerConfig::default()
    };
    let server = start(config).await;
    let mut client = server.connect("/ws").await;
    // Reading answers the server's pings; a second of that outlives the idle timeout threefold.
    client.expect_silence(Duration::from_secs(1)).await;
    assert_eq!(server.handle().stats().idle_timeouts_total, 0);
}

#[tokio::test]
async fn shutdown_closes_every_socket_with_1001_and_returns() {
    let server = start(ServerConfig::default()).await;
    let mut alice = server.connect("/ws").await;
    let mut bob = server.connect("/ws").await;
    let addr = server.addr();
    let stopping = tokio::spawn(server.shutdown());
    for client in [&mut alice, &mut bob] {
        let close = client.expect_close().await;
        assert_eq!(close.code, CloseCode::Away);
        assert_eq!(close.reason.as_str(), "server shutting down");
    }
    timeout(TIMEOUT, stopping)
        .await
        .expect("shutdown finished")
        .expect("join")
        .expect("serve returned Ok");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

/// Signed identity (`ServerConfig::auth`), tested with a protocol that tells each socket who
/// the server says it is.
mod signed_identity {
    use super::*;
    use switchboard_core::{CloseReason, HttpRequest, HttpResponse};
    use switchboard_server::JwtOptions;
    use switchboard_testkit::json;
    use switchboard_testkit::jwt::{Keys, alg_none, claims, now, tampered};

    struct Whoami;

    impl Protocol for Whoami {
        type Conn = String;

        fn name(&self) -> &'static str {
            "whoami"
        }

        fn admit(&self, handshake: &Handshake<'_>) -> Result<String, Reject> {
            if handshake.path != "/ws" {
                return Err(Reject::NotFound);
            }
            Ok(handshake
                .identity
                .map_or_else(|| "nobody".to_owned(), |id| id.subject().to_owned()))
        }

        async fn on_open(&self, conn: &mut String, cx: &Context<'_>) {
            let _ = cx.send(Frame::text(format!("you are {conn}")));
        }

        async fn on_text(&self, _conn: &mut String, cx: &Context<'_>, text: &str) {
            tracing::info!(text, "whoami heard");
            let _ = cx.send(Frame::text(text));
        }

        async fn on_close(&self, _conn: String, _cx: &Context<'_>) {}

        async fn http(&self, _engine: &Engine, request: HttpRequest) -> Option<HttpResponse> {
            let caller = match request.caller.identity() {
                Some(identity) => identity.subject().to_owned(),
                None if request.caller.auth_enabled() => "anonymous".to_owned(),
                None => "open".to_owned(),
            };
            Some(HttpResponse::json(200, &json!({ "caller": caller })))
        }
    }

    async fn serve(keys: &Keys, options: JwtOptions) -> TestServer {
        let config = ServerConfig {
            auth: Some(keys.verifier_with(options)),
            ..ServerConfig::default()
        };
        TestServer::start(Whoami, config).await
    }

    async fn greeting(server: &TestServer, token: &str) -> String {
        let mut client = Client::connect(&server.ws_url(&format!("/ws?token={token}"))).await;
        recv_text(&mut client).await
    }

    async fn status(server: &TestServer, token: Option<&str>) -> u16 {
        let url = match token {
            Some(token) => server.ws_url(&format!("/ws?token={token}")),
            None => server.ws_url("/ws"),
        };
        Client::refused_status(&url, ConnectOptions::default()).await
    }

    #[tokio::test]
    async fn each_algorithm_admits_its_valid_tokens_from_the_query_or_the_header() {
        for keys in [Keys::hs256(), Keys::rs256(), Keys::es256()] {
            let server = serve(&keys, JwtOptions::default()).await;
            let token = keys.token(&claims("alice", 60));
            assert_eq!(greeting(&server, &token).await, "you are alice");
            let bearer = ConnectOptions {
                headers: vec![("authorization".into(), format!("Bearer {token}"))],
                ..ConnectOptions::default()
            };
            let mut client = Client::connect_with(&server.ws_url("/ws"), bearer)
                .await
                .expect("a bearer token is accepted");
            assert_eq!(recv_text(&mut client).await, "you are alice");
        }
    }

    #[tokio::test]
    async fn missing_expired_early_forged_and_unsigned_tokens_get_401() {
        let keys = Keys::hs256();
        let server = serve(&keys, JwtOptions::default()).await;
        let good = keys.token(&claims("alice", 60));
        let expired = keys.token(&claims("alice", -120));
        let early = keys.token(&json!({"sub": "alice", "exp": now() + 600, "nbf": now() + 300}));
        let other_key = Keys::hs256().token(&claims("alice", 60));
        let no_sub = keys.token(&json!({"exp": now() + 60}));
        let no_exp = keys.token(&json!({"sub": "alice"}));
        let rsa_token = Keys::es256().token(&claims("alice", 60));
        for (what, token) in [
            ("no token", None),
            ("expired", Some(expired)),
            ("not yet valid", Some(early)),
            ("another key", Some(other_key)),
            ("alg none", Some(alg_none(&claims("alice", 60)))),
            ("tampered", Some(tampered(&good, &claims("mallory", 60)))),
            ("no sub", Some(no_sub)),
            ("no exp", Some(no_exp)),
            ("another algorithm", Some(rsa_token)),
            ("garbage", Some("not.a.token".to_owned())),
        ] {
            assert_eq!(status(&server, token.as_deref()).await, 401, "{what}");
        }
        assert_eq!(server.handle().stats().auth_refusals_total, 10);
        // The good token still works, and the refusals cost nobody else anything.
        assert_eq!(greeting(&server, &good).await, "you are alice");
    }

    #[tokio::test]
    async fn a_public_key_server_refuses_a_token_signed_with_its_public_key_as_a_secret() {
        let keys = Keys::rs256();
        let server = serve(&keys, JwtOptions::default()).await;
        let confused = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims("mallory", 60),
            &jsonwebtoken::EncodingKey::from_secret(keys.verifying_key()),
        )
        .unwrap();
        assert_eq!(status(&server, Some(&confused)).await, 401);
    }

    #[tokio::test]
    async fn audience_and_issuer_are_checked_when_configured() {
        let keys = Keys::hs256();
        let options = JwtOptions {
            audience: Some("switchboard".into()),
            issuer: Some("https://issuer.example".into()),
            ..JwtOptions::default()
        };
        let server = serve(&keys, options).await;
        let token = |aud: &str, iss: &str| {
            keys.token(&json!({"sub": "alice", "exp": now() + 60, "aud": aud, "iss": iss}))
        };
        assert_eq!(
            greeting(&server, &token("switchboard", "https://issuer.example")).await,
            "you are alice"
        );
        assert_eq!(
            status(&server, Some(&token("other", "https://issuer.example"))).await,
            401
        );
        assert_eq!(
            status(&server, Some(&token("switchboard", "https://evil.example"))).await,
            401
        );
    }

    /// A `MakeWriter` into a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Self;

        fn make_writer(&'a self) -> Self {
            self.clone()
        }
    }

    #[tokio::test]
    async fn a_protocols_log_lines_carry_the_sessions_connection_id() {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(captured.clone())
            .with_max_level(tracing::Level::INFO)
            .finish();
        // The test's runtime is single-threaded: the server's tasks log through this default.
        let _guard = tracing::subscriber::set_default(subscriber);
        let server = TestServer::start(Whoami, ServerConfig::default()).await;
        let mut client = Client::connect(&server.ws_url("/ws")).await;
        assert_eq!(recv_text(&mut client).await, "you are nobody");
        client.send_text("hello").await;
        assert_eq!(recv_text(&mut client).await, "hello");
        let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let line = logs
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|line| line["fields"]["message"] == "whoami heard")
            .unwrap_or_else(|| panic!("no protocol line in {logs}"));
        assert_eq!(line["span"]["name"], "session", "{line}");
        assert!(
            line["span"]["conn"]
                .as_str()
                .is_some_and(|c| c.starts_with('c')),
            "{line}"
        );
    }

    #[tokio::test]
    async fn a_connection_is_closed_with_4401_when_its_token_expires() {
        let keys = Keys::hs256();
        let options = JwtOptions {
            leeway: Duration::ZERO,
            ..JwtOptions::default()
        };
        let server = serve(&keys, options).await;
        let short = keys.token(&claims("alice", 2));
        let long = keys.token(&claims("bob", 600));
        let mut alice = Client::connect(&server.ws_url(&format!("/ws?token={short}"))).await;
        let mut bob = Client::connect(&server.ws_url(&format!("/ws?token={long}"))).await;
        assert_eq!(recv_text(&mut alice).await, "you are alice");
        assert_eq!(recv_text(&mut bob).await, "you are bob");
        // TIMEOUT (5 s) bounds the wait; the token has at most 2 s left.
        let close = alice.expect_close().await;
        assert_eq!(u16::from(close.code), CloseReason::TOKEN_EXPIRED);
        assert_eq!(close.reason.as_str(), "token expired");
        bob.send_text("still here").await;
        assert_eq!(recv_text(&mut bob).await, "still here");
        assert_eq!(server.handle().stats().token_expiries_total, 1);
    }

    #[tokio::test]
    async fn http_requests_reach_the_protocol_anonymous_or_verified_but_never_forged() {
        let keys = Keys::hs256();
        let server = serve(&keys, JwtOptions::default()).await;
        let reply = server.http("GET", "/whoami", None).await;
        assert_eq!(reply.json()["caller"], "anonymous");
        let token = keys.token(&claims("alice", 60));
        let reply = server
            .http("GET", &format!("/whoami?token={token}"), None)
            .await;
        assert_eq!(reply.json()["caller"], "alice");
        let forged = Keys::hs256().token(&claims("alice", 60));
        let reply = server
            .http("GET", &format!("/whoami?token={forged}"), None)
            .await;
        assert_eq!(reply.status, 401);
        assert_eq!(reply.json()["error"], "bad token signature");
        // Without signed identity configured the protocol is told so.
        let open = TestServer::start(Whoami, ServerConfig::default()).await;
        assert_eq!(
            open.http("GET", "/whoami", None).await.json()["caller"],
            "open"
        );
        assert_eq!(
            greeting(&open, "anything").await,
            "you are nobody",
            "a token is ignored without auth"
        );
    }
}

// TLS at the edge (`serve_tls`): the same runtime over https:// and wss://, with certificates
// generated in the test.

mod tls {
    use std::time::Duration;

    use futures::{SinkExt, StreamExt};
    use switchboard_server::ServerConfig;
    use switchboard_server::tls::{TlsConfig, TlsError};
    use switchboard_testkit::tls::{
        TestCa, TlsTestServer, WssStream, connect_wss, https_request, temp_dir, try_connect_wss,
    };
    use switchboard_testkit::{TIMEOUT, http_request};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::{Instant, timeout};
    use tokio_tungstenite::tungstenite::Message;

    use super::Room;

    /// Sends `text` to the room and expects it back.
    async fn echo_round_trip(ws: &mut WssStream, text: &str) {
        ws.send(Message::text(text)).await.expect("send over wss");
        expect_frame(ws, text).await;
    }

    async fn expect_frame(ws: &mut WssStream, text: &str) {
        let frame = timeout(TIMEOUT, ws.next())
            .await
            .expect("frame in time")
            .expect("socket open")
            .expect("frame");
        assert_eq!(frame, Message::text(text));
    }

    /// Reads until the server closes; `true` if it did within `TIMEOUT`.
    async fn closed_by_server(stream: &mut TcpStream) -> bool {
        let mut buf = [0_u8; 1024];
        timeout(TIMEOUT, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    #[tokio::test]
    async fn wss_upgrades_carry_frames_and_https_serves_healthz() {
        let ca = TestCa::new("test CA");
        let dir = temp_dir("serve");
        let server = TlsTestServer::start(
            Room::new(),
            ServerConfig::default(),
            ca.issue().tls_config(&dir),
        )
        .await;
        let trust = ca.client_config();
        let started = Instant::now();
        let mut alice = connect_wss(server.addr(), "/ws", &trust).await;
        let handshake = started.elapsed();
        let mut bob = connect_wss(server.addr(), "/ws", &trust).await;
        echo_round_trip(&mut alice, "hello over TLS").await;
        expect_frame(&mut bob, "hello over TLS").await;
        // A frame larger than one TLS record (16 KiB) crosses several records.
        let big = "x".repeat(40_000);
        echo_round_trip(&mut bob, &big).await;
        let health = https_request(server.addr(), &trust, "GET", "/healthz").await;
        assert_eq!((health.status, health.body.as_str()), (200, "ok"));
        assert!(
            handshake < Duration::from_secs(1),
            "TCP + TLS + WebSocket handshake took {handshake:?}"
        );
        alice.close(None).await.expect("close");
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn plain_clients_on_a_tls_port_are_refused_and_others_keep_being_served() {
        let ca = TestCa::new("test CA");
        let dir = temp_dir("plain");
        let server = TlsTestServer::start(
            Room::new(),
            ServerConfig::default(),
            ca.issue().tls_config(&dir),
        )
        .await;
        let trust = ca.client_config();
        let mut before = connect_wss(server.addr(), "/ws", &trust).await;
        // Plain HTTP gets a bare 400 that says why, then the connection closes.
        let reply = http_request(server.addr(), "GET", "/healthz", None).await;
        assert_eq!(reply.status, 400);
        assert!(reply.body.contains("TLS"), "{}", reply.body);
        // Neither plain WebSocket nor garbage gets anywhere; the server closes on them.
        let plain_ws = tokio_tungstenite::connect_async(format!("ws://{}/ws", server.addr())).await;
        assert!(plain_ws.is_err(), "a plain WebSocket upgrade succeeded");
        let mut garbage = TcpStream::connect(server.addr()).await.expect("connect");
        garbage.write_all(&[0xff; 64]).await.expect("write");
        assert!(
            closed_by_server(&mut garbage).await,
            "garbage was not dropped"
        );
        // A client that does not trust the certificate fails its handshake.
        let stranger = TestCa::new("another CA").client_config();
        let refused = try_connect_wss(server.addr(), "/ws", &stranger).await;
        assert!(refused.is_err(), "an untrusted certificate was accepted");
        // Everyone else is served as before.
        echo_round_trip(&mut before, "still here").await;
        let mut after = connect_wss(server.addr(), "/ws", &trust).await;
        echo_round_trip(&mut after, "new one").await;
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_the_tls_handshake_is_dropped_after_the_header_timeout() {
        let ca = TestCa::new("test CA");
        let dir = temp_dir("slow");
        let config = ServerConfig {
            header_read_timeout: Duration::from_millis(300),
            ..ServerConfig::default()
        };
        let server = TlsTestServer::start(Room::new(), config, ca.issue().tls_config(&dir)).await;
        let started = Instant::now();
        // One sends nothing at all, one the first bytes of a ClientHello and nothing more.
        let mut silent = TcpStream::connect(server.addr()).await.expect("connect");
        let mut partial = TcpStream::connect(server.addr()).await.expect("connect");
        partial
            .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .expect("write");
        assert!(closed_by_server(&mut silent).await, "silent client kept");
        assert!(closed_by_server(&mut partial).await, "partial client kept");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(290),
            "dropped before the timeout: {waited:?}"
        );
        // The pending slots are free again: a real client still gets in.
        let mut ws = connect_wss(server.addr(), "/ws", &ca.client_config()).await;
        echo_round_trip(&mut ws, "ok").await;
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_reload_serves_the_new_certificate_to_new_handshakes_and_keeps_open_connections() {
        let ca_a = TestCa::new("CA A");
        let ca_b = TestCa::new("CA B");
        let dir = temp_dir("reload");
        let tls = ca_a.issue().tls_config(&dir);
        let server = TlsTestServer::start(Room::new(), ServerConfig::default(), tls.clone()).await;
        let (trust_a, trust_b) = (ca_a.client_config(), ca_b.client_config());
        let mut old = connect_wss(server.addr(), "/ws", &trust_a).await;
        assert!(
            try_connect_wss(server.addr(), "/ws", &trust_b)
                .await
                .is_err()
        );

        ca_b.issue().write(&dir);
        tls.reload().expect("reload with B");
        let mut new = connect_wss(server.addr(), "/ws", &trust_b).await;
        // A fresh client config: one that connected before could resume its session, which
        // involves no certificate at all.
        assert!(
            try_connect_wss(server.addr(), "/ws", &ca_a.client_config())
                .await
                .is_err(),
            "the old certificate is still presented"
        );
        // Both are in the room: the connection opened before the reload still hears and talks.
        echo_round_trip(&mut new, "new").await;
        expect_frame(&mut old, "new").await;
        echo_round_trip(&mut old, "old").await;
        expect_frame(&mut new, "old").await;

        // A broken file fails the reload and B stays in use.
        std::fs::write(dir.join("cert.pem"), "not a certificate").expect("write");
        let error = tls
            .reload()
            .expect_err("a broken file must fail the reload");
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");
        connect_wss(server.addr(), "/ws", &trust_b).await;
        server.shutdown().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn unusable_files_are_reported_with_their_path_and_reason() {
        let ca = TestCa::new("test CA");
        let dir = temp_dir("errors");
        let (cert, key) = ca.issue().write(&dir);
        let missing = dir.join("missing.pem");
        let error = TlsConfig::load(&missing, &key).unwrap_err();
        assert!(matches!(error, TlsError::Read { .. }), "{error}");
        assert!(error.to_string().contains("missing.pem"), "{error}");

        // A key where the certificate should be, and the certificate where the key should be.
        let error = TlsConfig::load(&key, &key).unwrap_err();
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");
        let error = TlsConfig::load(&cert, &cert).unwrap_err();
        assert!(matches!(error, TlsError::NoKey { .. }), "{error}");

        // Truncated PEM.
        let broken = dir.join("broken.pem");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
        let error = TlsConfig::load(&broken, &key).unwrap_err();
        assert!(matches!(error, TlsError::Pem { .. }), "{error}");

        // Another certificate's key.
        let other = ca.issue();
        let other_key = dir.join("other-key.pem");
        std::fs::write(&other_key, &other.key_pem).unwrap();
        let error = TlsConfig::load(&cert, &other_key).unwrap_err();
        assert!(error.to_string().contains("does not belong"), "{error}");
        TlsConfig::load(&cert, &key).expect("the matching pair loads");
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Metrics, the access log's counterparts in the exposition, and `/status`. The recorder is
/// process-wide and other tests of this binary may record too, so assertions compare one
/// protocol's series (`observed`, used only here) before and after, and counters only grow.
mod observability {
    use std::collections::BTreeMap;

    use super::*;
    use switchboard_core::engine::Expect;
    use switchboard_testkit::jwt::Keys;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Echoes each text frame after storing it in the engine (one `put` per frame).
    struct Observed;

    impl Protocol for Observed {
        type Conn = ();

        fn name(&self) -> &'static str {
            "observed"
        }

        fn admit(&self, handshake: &Handshake<'_>) -> Result<(), Reject> {
            if handshake.path == "/ws" {
                Ok(())
            } else {
                Err(Reject::NotFound)
            }
        }

        async fn on_open(&self, _conn: &mut (), _cx: &Context<'_>) {}

        async fn on_text(&self, _conn: &mut (), cx: &Context<'_>, text: &str) {
            cx.engine()
                .put("last", text.to_owned().into(), Expect::Any, None)
                .await
                .unwrap();
            let _ = cx.send(Frame::text(text));
        }

        async fn on_close(&self, _conn: (), _cx: &Context<'_>) {}
    }

    /// One parsed sample of the text exposition format.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: BTreeMap<String, String>,
        value: f64,
    }

    /// A parser of the text format (version 0.0.4) for what the exporter writes: comments,
    /// `name value` and `name{k="v",...} value`, label values with `\\`, `\"` and `\n` escapes.
    fn parse(text: &str) -> Vec<Sample> {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, rest) = match line.find(['{', ' ']) {
                Some(at) => line.split_at(at),
                None => panic!("no value: {line}"),
            };
            let mut labels = BTreeMap::new();
            let mut rest = rest;
            if let Some(inner) = rest.strip_prefix('{') {
                let mut chars = inner.char_indices();
                let mut key = String::new();
                let mut end = None;
                while let Some((at, c)) = chars.next() {
                    match c {
                        '}' => {
                            end = Some(at);
                            break;
                        }
                        ',' => {}
                        '=' => {
                            assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                            let mut value = String::new();
                            loop {
                                match chars.next().map(|(_, c)| c) {
                                    Some('\\') => match chars.next().map(|(_, c)| c) {
                                        Some('n') => value.push('\n'),
                                        Some(other) => value.push(other),
                                        None => panic!("bad escape: {line}"),
                                    },
                                    Some('"') => break,
                                    Some(other) => value.push(other),
                                    None => panic!("unterminated value: {line}"),
                                }
                            }
                            labels.insert(std::mem::take(&mut key), value);
                        }
                        c => key.push(c),
                    }
                }
                rest = &inner[end.expect("closing brace") + 1..];
            }
            let value = rest.split_whitespace().next().expect("a value");
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
            };
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        samples
    }

    /// The sum of the samples named `name` whose labels include `labels`.
    fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        parse(text)
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    fn render() -> String {
        let handle = switchboard_server::metrics::install().unwrap();
        switchboard_server::metrics::render(&handle)
    }

    const P: (&str, &str) = ("protocol", "observed");

    /// Waits (bounded) until `check` holds for a fresh exposition and returns that exposition.
    async fn until(check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let text = render();
            if check(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "metrics never got there:\n{text}"
            );
            sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn series_exist_and_move_with_traffic_closes_refusals_and_engine_calls() {
        switchboard_server::metrics::install().unwrap();
        let config = ServerConfig {
            max_frame_bytes: Some(1024),
            allowed_origins: Some(vec!["http://good.example".into()]),
            ..ServerConfig::default()
        };
        let server = TestServer::start(Observed, config).await;
        let before = render();
        let count = |text: &str, name: &str, labels: &[(&str, &str)]| {
            let mut all = vec![P];
            all.extend_from_slice(labels);
            value(text, name, &all)
        };

        let mut client = server.connect("/ws").await;
        client.send_text("hello").await;
        assert_eq!(recv_text(&mut client).await, "hello");
        let open = render();
        assert!(
            count(&open, "switchboard_connections_open", &[]) >= 1.0,
            "{open}"
        );

        // A refused origin and a path the protocol does not serve.
        let url = server.ws_url("/ws");
        let evil = ConnectOptions {
            origin: Some("http://evil.example".into()),
            ..ConnectOptions::default()
        };
        assert_eq!(Client::refused_status(&url, evil).await, 403);
        let nowhere = server.ws_url("/nowhere");
        assert_eq!(
            Client::refused_status(&nowhere, ConnectOptions::default()).await,
            404
        );

        // An oversized message: closed with 1009.
        client.send_text(&"x".repeat(1025)).await;
        assert_eq!(client.expect_close().await.code, CloseCode::Size);
        let closed = [("code", "1009"), ("reason", "oversized")];
        let after = until(|text| {
            count(text, "switchboard_connections_closed_total", &closed)
                > count(&before, "switchboard_connections_closed_total", &closed)
        })
        .await;

        let grew = |name: &str, labels: &[(&str, &str)]| {
            let (was, now) = (count(&before, name, labels), count(&after, name, labels));
            assert!(
                now > was,
                "{name}{labels:?} did not grow: {was} -> {now}\n{after}"
            );
        };
        grew("switchboard_connections_accepted_total", &[]);
        grew("switchboard_frames_in_total", &[]);
        grew("switchboard_frames_out_total", &[]);
        grew("switchboard_bytes_in_total", &[]);
        grew("switchboard_bytes_out_total", &[]);
        grew(
            "switchboard_connections_rejected_total",
            &[("reason", "origin")],
        );
        grew(
            "switchboard_connections_rejected_total",
            &[("reason", "protocol")],
        );
        grew(
            "switchboard_engine_operation_duration_seconds_count",
            &[("operation", "put")],
        );
        assert!(
            count(&after, "switchboard_frames_in_total", &[])
                - count(&before, "switchboard_frames_in_total", &[])
                >= 1.0
        );
        // Histograms render as Prometheus histograms (buckets), not summaries.
        assert!(
            after.contains("# TYPE switchboard_engine_operation_duration_seconds histogram"),
            "{after}"
        );
        assert!(
            count(
                &after,
                "switchboard_engine_operation_duration_seconds_bucket",
                &[("operation", "put"), ("le", "+Inf")]
            ) >= 1.0
        );
        assert_eq!(count(&after, "switchboard_build_info", &[]), 1.0, "{after}");
        for name in [
            "switchboard_process_start_time_seconds",
            "switchboard_process_resident_memory_bytes",
            "switchboard_process_open_fds",
            "switchboard_process_cpu_seconds_total",
        ] {
            assert!(
                parse(&after).iter().any(|s| s.name == name),
                "{name} missing\n{after}"
            );
        }
        // No label ever holds a path, an address or a session.
        for sample in parse(&after)
            .iter()
            .filter(|s| s.name.starts_with("switchboard_"))
        {
            for value in sample.labels.values() {
                assert!(
                    !value.contains("127.0.0.1") && !value.contains('/'),
                    "{sample:?}"
                );
            }
        }
    }

    /// GET `path` with an `Accept` header; the raw head and body.
    async fn get_accepting(
        addr: std::net::SocketAddr,
        path: &str,
        accept: &str,
    ) -> (String, String) {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.unwrap();
            String::from_utf8(raw).unwrap()
        };
        let raw = timeout(TIMEOUT, exchange).await.expect("status in time");
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), body.to_owned())
    }

    #[tokio::test]
    async fn status_reports_connections_engine_and_limits_as_json_or_html_without_secrets() {
        let keys = Keys::hs256();
        let config = ServerConfig {
            max_connections: 321,
            max_connections_per_ip: 7,
            auth: Some(keys.verifier_with(Default::default())),
            ..ServerConfig::default()
        };
        let server = TestServer::start(Observed, config).await;
        let token = keys.token(&switchboard_testkit::jwt::claims("alice", 60));
        let _client = Client::connect(&server.ws_url(&format!("/ws?token={token}"))).await;

        let reply = server.http("GET", "/status", None).await;
        assert_eq!(reply.status, 200);
        let status = reply.json();
        assert_eq!(status["protocol"], "observed", "{status}");
        assert_eq!(status["connections"]["open"], 1, "{status}");
        assert_eq!(status["engine"]["ready"], true, "{status}");
        assert_eq!(status["limits"]["max_connections"], 321, "{status}");
        assert_eq!(status["limits"]["max_connections_per_ip"], 7, "{status}");
        assert_eq!(status["signed_identity"], "HS256", "{status}");
        assert_eq!(status["tls"], false, "{status}");
        assert!(status["uptime_seconds"].is_u64(), "{status}");
        assert!(status["version"].is_string(), "{status}");
        let secret = String::from_utf8_lossy(keys.verifying_key()).into_owned();
        assert!(
            !reply.body.contains(&secret),
            "the secret leaked: {}",
            reply.body
        );
        assert!(
            !reply.body.contains(&token),
            "a token leaked: {}",
            reply.body
        );

        let (head, page) = get_accepting(server.addr(), "/status", "text/html,*/*;q=0.8").await;
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/html"),
            "{head}"
        );
        assert!(
            page.contains("<table>") && page.contains("max_connections"),
            "{page}"
        );
        assert!(page.contains("321") && page.contains("observed"), "{page}");
        assert!(!page.contains(&secret));
    }

    #[tokio::test]
    async fn the_metrics_router_serves_the_text_format() {
        let handle = switchboard_server::metrics::install().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(switchboard_server::metrics::serve(listener, handle));
        let reply = switchboard_testkit::http_request(addr, "GET", "/metrics", None).await;
        assert_eq!(reply.status, 200);
        assert!(
            reply
                .headers
                .to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{}",
            reply.headers
        );
        assert!(
            parse(&reply.body)
                .iter()
                .any(|s| s.name == "switchboard_process_start_time_seconds"),
            "{}",
            reply.body
        );
        served.abort();
    }
}
