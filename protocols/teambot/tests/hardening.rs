//! Adversarial tests of the simulator over real sockets: a second `/global` client cannot take
//! over the scenario, team tokens cannot be predicted from the seed, and client input cannot
//! write long log lines.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers: panicking fails the test"
)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use switchboard_server::ServerConfig;
use switchboard_teambot::client::{NoopHandler, RunEnd, TeamBot, TeamBotConfig};
use switchboard_teambot::sim::{SimConfig, TeambotSim};
use switchboard_testkit::{Client, TestServer};
use tokio::time::{Instant, sleep, timeout};

fn short_scenario(seed: u64) -> SimConfig {
    SimConfig {
        seed,
        teams: 3,
        leaving_teams: 0,
        join_window: Duration::ZERO,
        duration: Duration::from_millis(800),
        message_rate: 100.0,
        healthcheck_interval: Duration::from_millis(200),
        healthcheck_timeout: Duration::from_secs(2),
        settle_timeout: Duration::from_secs(3),
        quiet_period: Duration::from_millis(100),
        ..SimConfig::default()
    }
}

/// Waits (bounded) until `done` holds, checking every few milliseconds.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_global_client_is_refused_and_cannot_spoil_the_scorecard() {
    let sim = Arc::new(TeambotSim::new(short_scenario(3)));
    let server = TestServer::start_shared(sim.clone(), ServerConfig::default()).await;
    let mut config = TeamBotConfig::new(server.ws_url("/global"));
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(200);
    let bot = TeamBot::new(config, NoopHandler);
    let handle = bot.handle();
    let run = tokio::spawn(bot.run());
    eventually("the bot's global socket", || handle.global_connected()).await;

    // While the bot owns /global, every other upgrade is refused with 403, and none of them
    // may answer a healthcheck or take the scenario away from the bot.
    let url = server.ws_url("/global");
    let mut refused = 0;
    while !sim.scorecard().finished && refused < 20 {
        assert_eq!(Client::refused_status(&url, Default::default()).await, 403);
        refused += 1;
        sleep(Duration::from_millis(20)).await;
    }
    assert!(refused >= 1);
    let end = timeout(Duration::from_secs(20), run)
        .await
        .expect("the scenario ends in time")
        .unwrap()
        .expect("the run succeeds");
    assert_eq!(end, RunEnd::Goodbye);
    let card = timeout(Duration::from_secs(5), sim.finished())
        .await
        .unwrap();
    assert!(
        card.perfect,
        "{}",
        serde_json::to_string_pretty(&card).unwrap()
    );
    assert_eq!(card.global.connections, 1, "{:?}", card.global);
    assert_eq!(card.global.refused, refused, "{:?}", card.global);

    // Once the owner is gone, /global is free again (after the goodbye: hello then goodbye).
    let mut next = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while next.is_none() {
        assert!(Instant::now() < deadline, "/global was never freed");
        next = Client::connect_with(&url, Default::default()).await.ok();
        if next.is_none() {
            sleep(Duration::from_millis(10)).await;
        }
    }
    let mut next = next.unwrap();
    next.recv_type("hello").await;
    next.recv_type("goodbye").await;
}

/// The `token` of a `ws_url` handed out for the first team of a fresh simulator with `seed`.
async fn first_token(seed: u64) -> (Value, String, String) {
    let server = TestServer::start(
        TeambotSim::new(short_scenario(seed)),
        ServerConfig::default(),
    )
    .await;
    let mut global = Client::connect(&server.ws_url("/global")).await;
    global.recv_type("hello").await;
    let join = global.recv_until(|v| v["type"] == "team.join").await;
    let team = join["team_id"].clone();
    let mut tokens = Vec::new();
    for _ in 0..2 {
        global
            .send_json(&json!({"type": "team.connect", "team_id": team}))
            .await;
        let reply = global.recv_until(|v| v["type"] == "team.connect").await;
        let url = reply["ws_url"].as_str().unwrap().to_owned();
        let token = url.split("token=").nth(1).unwrap().to_owned();
        assert_eq!(token.len(), 32, "{url}");
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{url}");
        tokens.push(token);
    }
    let second = tokens.pop().unwrap();
    let first = tokens.pop().unwrap();
    (team, first, second)
}

#[tokio::test]
async fn team_tokens_differ_across_runs_with_the_same_seed() {
    let (team_a, first_a, second_a) = first_token(42).await;
    let (team_b, first_b, second_b) = first_token(42).await;
    assert_eq!(team_a, team_b, "the seeded plan is still reproducible");
    assert_ne!(first_a, first_b, "tokens do not follow the seed");
    assert_ne!(second_a, second_b);
    assert_ne!(first_a, second_a, "every team.connect gets a fresh token");
}

/// Collects everything the `tracing` fmt layer writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// A current-thread runtime, so the thread-local subscriber sees the server's tasks too.
#[tokio::test(flavor = "current_thread")]
async fn client_input_is_cut_in_log_lines_and_in_the_scorecard() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let sim = Arc::new(TeambotSim::new(short_scenario(5)));
    let server = TestServer::start_shared(sim.clone(), ServerConfig::default()).await;
    let mut global = Client::connect(&server.ws_url("/global")).await;
    global.recv_type("hello").await;
    let huge = "x".repeat(60_000);
    // An unknown event type, and a healthcheck reply nobody asked for, each 60 KB.
    global.send_json(&json!({"type": huge})).await;
    global.recv_until(|v| v["type"] == "error").await;
    global
        .send_json(&json!({"type": "healthcheck", "stats": huge}))
        .await;
    // A healthcheck whose entries are huge too.
    global.recv_until(|v| v["type"] == "healthcheck").await;
    global
        .send_json(&json!({"type": "healthcheck", "stats": [{"id": huge}]}))
        .await;
    eventually("the mismatches", || sim.scorecard().mismatch_count >= 2).await;

    let card = sim.scorecard();
    for mismatch in &card.mismatches {
        assert!(mismatch.reported.to_string().len() < 512, "{mismatch:?}");
    }
    let reply = server.http("GET", "/scorecard", None).await;
    assert!(reply.body.len() < 16 * 1024, "{} bytes", reply.body.len());

    drop(global);
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let longest = logs.lines().map(str::len).max().unwrap_or(0);
    assert!(
        logs.contains("…[cut, "),
        "client input was logged, clipped:\n{logs}"
    );
    assert!(longest < 2048, "a log line of {longest} bytes");
}

fn roomy_scenario() -> SimConfig {
    SimConfig {
        duration: Duration::from_secs(20),
        healthcheck_interval: Duration::from_secs(20),
        ..short_scenario(9)
    }
}

/// Opens `/global` and returns it with the first joined team's id.
async fn global_with_a_team(server: &TestServer) -> (Client, Value) {
    let mut global = Client::connect(&server.ws_url("/global")).await;
    global.recv_type("hello").await;
    let join = global.recv_until(|v| v["type"] == "team.join").await;
    (global, join["team_id"].clone())
}

/// `team.connect` for `team`: the `ws_url`, or the error message.
async fn team_connect(global: &mut Client, team: &Value) -> Result<String, String> {
    global
        .send_json(&json!({"type": "team.connect", "team_id": team}))
        .await;
    let reply = global
        .recv_until(|v| v["type"] == "team.connect" || v["type"] == "error")
        .await;
    match reply["ws_url"].as_str() {
        Some(url) => Ok(url.to_owned()),
        None => Err(reply["message"].as_str().unwrap_or_default().to_owned()),
    }
}

#[tokio::test]
async fn the_state_budget_refuses_tokens_and_gives_bytes_back_when_one_is_used() {
    use switchboard_teambot::sim::{TEAM_BYTES, TOKEN_BYTES};
    let limit = 3 * TEAM_BYTES + 5 * TOKEN_BYTES + 100;
    let sim = Arc::new(TeambotSim::new(SimConfig {
        max_state_bytes: limit,
        ..roomy_scenario()
    }));
    let server = TestServer::start_shared(sim.clone(), ServerConfig::default()).await;
    let (mut global, team) = global_with_a_team(&server).await;
    let mut urls = Vec::new();
    let refusal = loop {
        match team_connect(&mut global, &team).await {
            Ok(url) => urls.push(url),
            Err(message) => break message,
        }
        assert!(urls.len() <= 5, "the budget never refused");
    };
    assert_eq!(refusal, "too many outstanding connects, try again");
    assert_eq!(urls.len(), 5);
    assert_eq!(sim.outstanding_tokens(), 5);
    assert!(
        sim.state_bytes() <= limit,
        "{} > {limit}",
        sim.state_bytes()
    );
    assert!(sim.state_bytes() <= sim.worst_case_bytes());

    // Using a token gives its bytes back: the team socket works and another connect fits.
    let url = urls.pop().unwrap().replacen("http://", "ws://", 1);
    let mut team_socket = Client::connect(&url).await;
    team_socket.recv_type("hello").await;
    assert_eq!(sim.outstanding_tokens(), 4);
    assert!(team_connect(&mut global, &team).await.is_ok());
}

#[tokio::test]
async fn filling_every_pool_stays_within_the_documented_formula() {
    let sim = Arc::new(TeambotSim::new(SimConfig {
        max_tokens: 20,
        max_listed_mismatches: 10,
        ..roomy_scenario()
    }));
    let server = TestServer::start_shared(sim.clone(), ServerConfig::default()).await;
    let (mut global, team) = global_with_a_team(&server).await;
    let mut handed_out = 0;
    for _ in 0..25 {
        if team_connect(&mut global, &team).await.is_ok() {
            handed_out += 1;
        }
    }
    assert_eq!(handed_out, 20);
    // Unasked healthcheck replies with the largest values that still clip: every one is a
    // mismatch, the first 10 are listed.
    // [[],[],...]: many values per encoded byte, and the encoding still under the clip length.
    let empties: Vec<Value> = (0..70).map(|_| json!([])).collect();
    for n in 0..15 {
        global
            .send_json(&json!({"type": "healthcheck", "n": n, "stats": empties}))
            .await;
    }
    eventually("15 mismatches", || sim.scorecard().mismatch_count >= 15).await;
    let card = sim.scorecard();
    assert_eq!(card.mismatches.len(), 10);
    let used = sim.state_bytes();
    let worst = sim.worst_case_bytes();
    assert!(used <= worst, "{used} > {worst}");
    eprintln!("state {used} bytes, worst case {worst} bytes");
}

/// The numbers in `docs/protocols/teambot.md` (64-bit).
#[cfg(target_pointer_width = "64")]
#[test]
fn the_default_worst_case_is_the_documented_one() {
    use switchboard_teambot::sim::{MAX_TEAMS, MISMATCH_BYTES, TEAM_BYTES, TOKEN_BYTES};
    assert_eq!(
        (TEAM_BYTES, TOKEN_BYTES, MISMATCH_BYTES),
        (203, 195, 35_072)
    );
    assert_eq!(
        TeambotSim::new(SimConfig::default()).worst_case_bytes(),
        5_459_470
    );
    let most = TeambotSim::new(SimConfig {
        teams: MAX_TEAMS,
        ..SimConfig::default()
    });
    assert_eq!(most.worst_case_bytes(), 28_157_200);
}
