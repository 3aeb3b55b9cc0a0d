//! The client against a scripted fake server: one test per event of the spec.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers: panicking fails the test"
)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Event, Fake, Recorder, Seen, WAIT, drop_socket, seen, send};
use switchboard_core::Peer;
use switchboard_teambot::client::{BotHandle, RunEnd, TeamBot, TeamBotConfig, TeamBotError};
use switchboard_teambot::messages::{TeamId, UrlError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

fn config(url: String) -> TeamBotConfig {
    let mut config = TeamBotConfig::new(url);
    config.ping_interval = Duration::from_millis(100);
    config.pong_timeout = Duration::from_millis(400);
    config.backoff_initial = Duration::from_millis(100);
    config.backoff_max = Duration::from_millis(400);
    config.url_timeout = Duration::from_secs(2);
    config.io_timeout = Duration::from_secs(1);
    config.connect_timeout = Duration::from_secs(2);
    config
}

struct Running {
    handle: BotHandle,
    run: JoinHandle<Result<RunEnd, TeamBotError>>,
    seen: mpsc::Receiver<Seen>,
    global: Peer,
}

/// Starts a bot against `fake` and completes the global handshake (`hello`).
async fn start(fake: &mut Fake) -> Running {
    let (tx, seen) = mpsc::channel(1024);
    let bot = TeamBot::new(config(fake.url("/global")), Recorder(tx));
    let handle = bot.handle();
    let run = tokio::spawn(bot.run());
    let global = fake.open("/global").await;
    send(&global, json!({"type": "hello"}));
    Running {
        handle,
        run,
        seen,
        global,
    }
}

/// `team.join` -> the client's `team.connect` -> our `team.connect` with an `http://` URL to
/// `path` -> the client opens it; returns the team socket.
async fn join(fake: &mut Fake, global: &Peer, id: u64, path: &str) -> Peer {
    send(global, json!({"type": "team.join", "team_id": id}));
    let request = fake.text("/global", "team.connect").await;
    assert_eq!(
        request["team_id"],
        json!(id),
        "team.connect echoes the id as a number"
    );
    answer_connect(fake, global, id, path);
    let team = fake.open(path).await;
    send(&team, json!({"type": "hello"}));
    team
}

fn answer_connect(fake: &Fake, global: &Peer, id: u64, path: &str) {
    send(
        global,
        json!({"type": "team.connect", "team_id": id, "ws_url": fake.http_url(path)}),
    );
}

async fn healthcheck(fake: &mut Fake, global: &Peer) -> Value {
    send(global, json!({"type": "healthcheck"}));
    let reply = fake.text("/global", "healthcheck").await;
    reply["stats"].clone()
}

async fn messages(running: &mut Running, count: usize) {
    for _ in 0..count {
        seen(&mut running.seen, "a counted message", |s| match s {
            Seen::Message(..) => Some(()),
            _ => None,
        })
        .await;
    }
}

async fn finish(running: Running) -> RunEnd {
    running.handle.shutdown();
    timeout(WAIT, running.run)
        .await
        .expect("run ends in time")
        .expect("run task")
        .expect("run succeeds")
}

#[tokio::test]
async fn healthcheck_before_any_team_is_an_empty_list() {
    let mut fake = Fake::start().await;
    let running = start(&mut fake).await;
    send(&running.global, json!({"type": "healthcheck"}));
    let reply = fake.text("/global", "healthcheck").await;
    assert_eq!(reply, json!({"type": "healthcheck", "stats": []}));
    assert_eq!(finish(running).await, RunEnd::Shutdown);
}

#[tokio::test]
async fn an_http_ws_url_is_opened_as_ws_and_messages_are_counted_exactly() {
    let mut fake = Fake::start().await;
    let mut running = start(&mut fake).await;
    let team = join(&mut fake, &running.global, 42, "/team/a").await;
    send(&team, json!({"type": "message", "text": "standup in 5"}));
    send(
        &team,
        json!({"type": "message", "text": "big props to ana"}),
    );
    send(
        &team,
        json!({"type": "message", "text": "Props with a capital P do not count"}),
    );
    send(&team, json!({"type": "message"}));
    messages(&mut running, 4).await;
    let stats = healthcheck(&mut fake, &running.global).await;
    assert_eq!(
        stats,
        json!([{"id": 42, "connected": true, "message_count": 4, "props_count": 1}])
    );
    assert!(stats[0]["id"].is_u64(), "the id stays a number");
    let snapshot = running.handle.stats();
    assert_eq!(snapshot.len(), 1);
    assert_eq!(snapshot[0].id, TeamId::number(42));
    assert_eq!(snapshot[0].message_count, 4);
    assert_eq!(finish(running).await, RunEnd::Shutdown);
}

#[tokio::test]
async fn team_left_on_the_team_socket_closes_it_for_good() {
    let mut fake = Fake::start().await;
    let mut running = start(&mut fake).await;
    let team = join(&mut fake, &running.global, 7, "/team/a").await;
    send(&team, json!({"type": "message", "text": "props"}));
    send(&team, json!({"type": "team.left", "team_id": 7}));
    fake.closed("/team/a").await;
    seen(&mut running.seen, "on_team_left", |s| match s {
        Seen::Left(id) if id == TeamId::number(7) => Some(()),
        _ => None,
    })
    .await;
    // Never reconnected: no team.connect and no new socket, well past the first backoff.
    fake.quiet(Duration::from_millis(600), |e| {
        matches!(e, Event::Text { value, .. } if value["type"] == "team.connect")
            || matches!(e, Event::Open { .. })
    })
    .await;
    let stats = healthcheck(&mut fake, &running.global).await;
    assert_eq!(
        stats,
        json!([{"id": 7, "connected": false, "message_count": 1, "props_count": 1}])
    );
    // A later team.join for the same team is ignored too.
    send(&running.global, json!({"type": "team.join", "team_id": 7}));
    fake.quiet(
        Duration::from_millis(300),
        |e| matches!(e, Event::Text { value, .. } if value["type"] == "team.connect"),
    )
    .await;
    finish(running).await;
}

#[tokio::test]
async fn team_left_on_the_global_socket_closes_the_team_socket_for_good() {
    let mut fake = Fake::start().await;
    let running = start(&mut fake).await;
    let _team = join(&mut fake, &running.global, 8, "/team/a").await;
    send(&running.global, json!({"type": "team.left", "team_id": 8}));
    fake.closed("/team/a").await;
    fake.quiet(Duration::from_millis(600), |e| {
        matches!(e, Event::Text { value, .. } if value["type"] == "team.connect")
            || matches!(e, Event::Open { .. })
    })
    .await;
    let stats = healthcheck(&mut fake, &running.global).await;
    assert_eq!(stats[0]["connected"], json!(false));
    assert!(running.handle.stats()[0].left);
    finish(running).await;
}

#[tokio::test]
async fn a_missing_pong_reestablishes_the_team_socket_and_counts_survive() {
    let mut fake = Fake::start().await;
    let mut running = start(&mut fake).await;
    // Under /mute/ the fake server never answers pings.
    let muted = join(&mut fake, &running.global, 5, "/mute/a").await;
    send(&muted, json!({"type": "message", "text": "props 1"}));
    send(&muted, json!({"type": "message", "text": "two"}));
    messages(&mut running, 2).await;
    let ping = fake.text("/mute/a", "ping").await;
    assert!(ping["unique_id"].is_u64());
    // The pong timeout fires: the client closes the socket and asks for a new URL.
    fake.all(
        "the close and a new team.connect",
        &[
            &|e| matches!(e, Event::Close { path } if path == "/mute/a"),
            &|e| {
                matches!(e, Event::Text { path, value }
                    if path == "/global" && value["type"] == "team.connect" && value["team_id"] == 5)
            },
        ],
    )
    .await;
    answer_connect(&fake, &running.global, 5, "/team/b");
    let team = fake.open("/team/b").await;
    send(&team, json!({"type": "message", "text": "props 3"}));
    messages(&mut running, 1).await;
    let stats = healthcheck(&mut fake, &running.global).await;
    assert_eq!(
        stats,
        json!([{"id": 5, "connected": true, "message_count": 3, "props_count": 2}])
    );
    // The answered socket stays up through several ping intervals.
    fake.quiet(
        Duration::from_millis(500),
        |e| matches!(e, Event::Close { path } if path == "/team/b"),
    )
    .await;
    assert_eq!(running.handle.stats()[0].connections, 2);
    finish(running).await;
}

#[tokio::test]
async fn a_server_close_is_a_drop_and_is_retried_after_a_backoff() {
    let mut fake = Fake::start().await;
    let mut running = start(&mut fake).await;
    let team = join(&mut fake, &running.global, 3, "/team/a").await;
    send(&team, json!({"type": "message", "text": "one"}));
    messages(&mut running, 1).await;
    let dropped_at = Instant::now();
    drop_socket(&team);
    let reason = seen(&mut running.seen, "on_team_dropped", |s| match s {
        Seen::Dropped(_, reason) => Some(reason),
        _ => None,
    })
    .await;
    assert!(reason.contains("1001"), "{reason}");
    fake.text("/global", "team.connect").await;
    let waited = dropped_at.elapsed();
    // backoff_initial is 100 ms with jitter between half and all of it.
    assert!(
        waited >= Duration::from_millis(50),
        "retried after only {waited:?}"
    );
    answer_connect(&fake, &running.global, 3, "/team/b");
    let team = fake.open("/team/b").await;
    send(&team, json!({"type": "message", "text": "two"}));
    messages(&mut running, 1).await;
    let stats = healthcheck(&mut fake, &running.global).await;
    assert_eq!(stats[0]["message_count"], json!(2));
    assert_eq!(stats[0]["connected"], json!(true));
    finish(running).await;
}

#[tokio::test]
async fn error_events_are_logged_and_never_fatal() {
    let mut fake = Fake::start().await;
    let mut running = start(&mut fake).await;
    send(
        &running.global,
        json!({"type": "error", "message": "boom", "received_message": {"type": "x"}}),
    );
    let message = seen(&mut running.seen, "on_error", |s| match s {
        Seen::Error(message) => Some(message),
        _ => None,
    })
    .await;
    assert_eq!(message.as_deref(), Some("boom"));
    // An error in answer to team.connect makes the team ask again after a backoff.
    send(&running.global, json!({"type": "team.join", "team_id": 11}));
    fake.text("/global", "team.connect").await;
    send(
        &running.global,
        json!({"type": "error", "message": "not now", "team_id": 11}),
    );
    let again = fake.text("/global", "team.connect").await;
    assert_eq!(again["team_id"], json!(11));
    answer_connect(&fake, &running.global, 11, "/team/a");
    let team = fake.open("/team/a").await;
    // An error on a team socket is not fatal either.
    send(&team, json!({"type": "error", "message": "team hiccup"}));
    send(&team, json!({"type": "message", "text": "still here"}));
    messages(&mut running, 1).await;
    let stats = healthcheck(&mut fake, &running.global).await;
    assert_eq!(
        stats,
        json!([{"id": 11, "connected": true, "message_count": 1, "props_count": 0}])
    );
    finish(running).await;
}

#[tokio::test]
async fn goodbye_closes_every_socket_and_the_run_succeeds() {
    let mut fake = Fake::start().await;
    let running = start(&mut fake).await;
    let _a = join(&mut fake, &running.global, 1, "/team/a").await;
    let _b = join(&mut fake, &running.global, 2, "/team/b").await;
    send(&running.global, json!({"type": "goodbye"}));
    let end = timeout(WAIT, running.run)
        .await
        .expect("run ends in time")
        .expect("run task");
    assert_eq!(end.expect("goodbye is a success"), RunEnd::Goodbye);
    let mut closed = Vec::new();
    while closed.len() < 3 {
        let path = fake
            .next("every socket closed", |e| match e {
                Event::Close { path } => Some(path.clone()),
                _ => None,
            })
            .await;
        closed.push(path);
    }
    closed.sort();
    assert_eq!(closed, ["/global", "/team/a", "/team/b"]);
    assert!(running.handle.stats().iter().all(|team| !team.connected));
}

#[tokio::test]
async fn shutdown_closes_every_socket_and_the_run_succeeds() {
    let mut fake = Fake::start().await;
    let running = start(&mut fake).await;
    let _a = join(&mut fake, &running.global, 1, "/team/a").await;
    running.handle.shutdown();
    let end = timeout(WAIT, running.run)
        .await
        .expect("in time")
        .expect("task");
    assert_eq!(end.expect("shutdown is a success"), RunEnd::Shutdown);
    fake.closed("/team/a").await;
}

#[tokio::test]
async fn a_dropped_global_socket_is_reopened_and_teams_are_kept() {
    let mut fake = Fake::start().await;
    let mut running = start(&mut fake).await;
    let team = join(&mut fake, &running.global, 1, "/team/a").await;
    // Team 2 asks for its URL, then the global socket drops before the answer.
    send(&running.global, json!({"type": "team.join", "team_id": 2}));
    fake.text("/global", "team.connect").await;
    drop_socket(&running.global);
    let global = fake.open("/global").await;
    send(&global, json!({"type": "hello"}));
    // The pending request is sent again on the new socket; team 1's socket was kept.
    let again = fake.text("/global", "team.connect").await;
    assert_eq!(again["team_id"], json!(2));
    answer_connect(&fake, &global, 2, "/team/b");
    let _b = fake.open("/team/b").await;
    send(
        &team,
        json!({"type": "message", "text": "props after the global drop"}),
    );
    messages(&mut running, 1).await;
    let stats = healthcheck(&mut fake, &global).await;
    assert_eq!(
        stats,
        json!([
            {"id": 1, "connected": true, "message_count": 1, "props_count": 1},
            {"id": 2, "connected": true, "message_count": 0, "props_count": 0}
        ])
    );
    assert_eq!(
        running.handle.stats()[0].connections,
        1,
        "team 1 never reconnected"
    );
    assert_eq!(running.handle.global_connections(), 2);
    running.global = global;
    finish(running).await;
}

#[tokio::test]
async fn a_failed_tls_handshake_is_reported_clearly_and_retried() {
    let mut fake = Fake::start().await;
    let mut running = start(&mut fake).await;
    send(&running.global, json!({"type": "team.join", "team_id": 4}));
    fake.text("/global", "team.connect").await;
    // https:// to a server that speaks plain HTTP: the TLS handshake fails.
    let https = fake.http_url("/t").replacen("http://", "https://", 1);
    send(
        &running.global,
        json!({"type": "team.connect", "team_id": 4, "ws_url": https}),
    );
    let reason = seen(&mut running.seen, "the TLS error", |s| match s {
        Seen::ConnectFailed(_, reason) => Some(reason),
        _ => None,
    })
    .await;
    assert!(reason.contains("TLS handshake"), "{reason}");
    // It asks again (the server may hand out a usable URL next time).
    fake.text("/global", "team.connect").await;
    answer_connect(&fake, &running.global, 4, "/team/a");
    fake.open("/team/a").await;
    finish(running).await;

    let mut global = config(fake.url("/global").replacen("ws://", "wss://", 1));
    global.global_retry_limit = Some(1);
    let bot = TeamBot::new(global, support::Recorder(mpsc::channel(1).0));
    match bot.run().await {
        Err(TeamBotError::GaveUp { last_error, .. }) => {
            assert!(last_error.contains("TLS handshake"), "{last_error}");
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    // An unusable scheme is still refused up front.
    let bot = TeamBot::new(
        TeamBotConfig::new("ftp://example.invalid/global"),
        support::Recorder(mpsc::channel(1).0),
    );
    match bot.run().await {
        Err(TeamBotError::Url { source, .. }) => {
            assert_eq!(source, UrlError::Scheme("ftp".to_owned()));
        }
        other => panic!("expected a URL error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_refused_team_socket_is_retried() {
    let mut fake = Fake::start().await;
    let mut running = start(&mut fake).await;
    send(&running.global, json!({"type": "team.join", "team_id": 6}));
    fake.text("/global", "team.connect").await;
    answer_connect(&fake, &running.global, 6, "/refuse");
    let reason = seen(&mut running.seen, "the refusal", |s| match s {
        Seen::ConnectFailed(_, reason) => Some(reason),
        _ => None,
    })
    .await;
    assert!(reason.contains("503"), "{reason}");
    fake.text("/global", "team.connect").await;
    answer_connect(&fake, &running.global, 6, "/team/a");
    fake.open("/team/a").await;
    finish(running).await;
}

#[tokio::test]
async fn the_global_socket_is_retried_until_the_server_is_up() {
    // Nothing listens on this port for the first attempts: the client keeps retrying with
    // backoff, and gives up only when told to.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut config = config(format!("ws://{addr}/global"));
    config.global_retry_limit = Some(3);
    let started = Instant::now();
    let bot = TeamBot::new(config, support::Recorder(mpsc::channel(1).0));
    match timeout(WAIT, bot.run()).await.expect("gives up in time") {
        Err(TeamBotError::GaveUp { attempts, .. }) => assert_eq!(attempts, 3),
        other => panic!("expected GaveUp, got {other:?}"),
    }
    // Two backoff delays of at least 50 and 100 ms separate the three attempts.
    assert!(started.elapsed() >= Duration::from_millis(150));
}
