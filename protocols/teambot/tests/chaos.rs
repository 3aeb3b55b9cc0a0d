//! The real client against the simulator: chaos on, dozens of teams, a perfect scorecard.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers: panicking fails the test"
)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use switchboard_server::ServerConfig;
use switchboard_teambot::client::tls::ClientTls;
use switchboard_teambot::client::{NoopHandler, RunEnd, TeamBot, TeamBotConfig};
use switchboard_teambot::sim::{Scorecard, SimConfig, TeambotSim, UrlScheme};
use switchboard_testkit::tls::{TestCa, TlsTestServer, temp_dir};
use switchboard_testkit::{Client, TestServer};
use tokio::time::timeout;

fn chaos_config(seed: u64) -> SimConfig {
    SimConfig {
        seed,
        teams: 30,
        join_window: Duration::from_millis(300),
        duration: Duration::from_secs(4),
        message_rate: 400.0,
        props_share: 0.25,
        leaving_teams: 6,
        healthcheck_interval: Duration::from_millis(250),
        healthcheck_timeout: Duration::from_secs(3),
        team_drop_rate: 8.0,
        global_drop_rate: 2.0,
        connect_delay_max: Duration::from_millis(80),
        refuse_connect_share: 0.1,
        refuse_upgrade_share: 0.1,
        leave_quiet: Duration::from_millis(200),
        settle_timeout: Duration::from_secs(10),
        quiet_period: Duration::from_millis(300),
        ..SimConfig::default()
    }
}

fn client_config(url: String) -> TeamBotConfig {
    let mut config = TeamBotConfig::new(url);
    config.ping_interval = Duration::from_millis(150);
    config.pong_timeout = Duration::from_secs(2);
    config.backoff_initial = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(400);
    config.url_timeout = Duration::from_secs(1);
    config.io_timeout = Duration::from_secs(1);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_scores_perfectly_under_chaos() {
    // TEAMBOT_CHAOS_SEED replays another scenario (the plan and chaos rolls follow the seed).
    let seed = std::env::var("TEAMBOT_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let sim = Arc::new(TeambotSim::new(chaos_config(seed)));
    let server = TestServer::start_shared(sim.clone(), ServerConfig::default()).await;
    let bot = TeamBot::new(client_config(server.ws_url("/global")), NoopHandler);
    let handle = bot.handle();
    let end = timeout(Duration::from_secs(40), bot.run())
        .await
        .expect("the scenario ends with goodbye in time")
        .expect("the run succeeds");
    assert_eq!(end, RunEnd::Goodbye);
    let card = timeout(Duration::from_secs(5), sim.finished())
        .await
        .expect("finished");
    assert!(
        card.perfect,
        "scorecard is not perfect: {}",
        serde_json::to_string_pretty(&card).unwrap()
    );
    eprintln!(
        "seed {seed}: {} messages ({} props), team reconnects {}, global reconnects {}, chaos {:?}, healthchecks {:?}",
        card.totals.messages,
        card.totals.props,
        card.totals.team_reconnects,
        card.global.reconnects,
        card.chaos,
        card.healthchecks
    );
    // Chaos really happened, and the scenario really exercised the client.
    assert_eq!(card.teams.len(), 30);
    assert!(card.chaos.team_drops >= 5, "{:?}", card.chaos);
    assert!(card.chaos.global_drops >= 1, "{:?}", card.chaos);
    assert!(
        card.chaos.refused_connects + card.chaos.refused_upgrades >= 1,
        "{:?}",
        card.chaos
    );
    assert!(card.totals.messages >= 500, "{:?}", card.totals);
    assert!(card.totals.props > 0);
    assert!(card.totals.team_reconnects >= 5);
    assert!(card.global.reconnects >= 1);
    assert!(card.healthchecks.answered >= 4, "{:?}", card.healthchecks);
    assert!(card.healthchecks.final_answered);
    let left: Vec<_> = card.teams.iter().filter(|t| t.left_via.is_some()).collect();
    assert_eq!(left.len(), 6);
    assert!(left.iter().any(|t| t.left_via.as_deref() == Some("team")));
    assert!(left.iter().any(|t| t.left_via.as_deref() == Some("global")));
    // The client's own snapshot agrees with the simulator's truth, team by team.
    let stats = handle.stats();
    assert_eq!(stats.len(), 30);
    for team in &card.teams {
        let mine = stats
            .iter()
            .find(|s| s.id.as_u64() == Some(team.id))
            .expect("the client knows every team");
        assert_eq!(
            mine.message_count, team.expected_messages,
            "team {}",
            team.id
        );
        assert_eq!(mine.props_count, team.expected_props, "team {}", team.id);
        assert_eq!(mine.left, team.left_via.is_some(), "team {}", team.id);
    }
    // The scorecard is served over HTTP too.
    let reply = server.http("GET", "/scorecard", None).await;
    assert_eq!(reply.status, 200);
    let served: Scorecard = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(served, card);
}

/// The same client and simulator over TLS (`wss://` global socket, `https://` team URLs), chaos
/// on: every resilience behaviour holds when each reconnect is also a TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_scores_perfectly_under_chaos_over_tls() {
    let ca = TestCa::new("teambot test CA");
    let dir = temp_dir("teambot-chaos");
    let sim = Arc::new(TeambotSim::new(SimConfig {
        teams: 12,
        leaving_teams: 3,
        duration: Duration::from_secs(2),
        url_scheme: UrlScheme::Https,
        ..chaos_config(11)
    }));
    let server = TlsTestServer::start_shared(
        sim.clone(),
        ServerConfig::default(),
        ca.issue().tls_config(&dir),
    )
    .await;
    let mut config = client_config(format!("wss://127.0.0.1:{}/global", server.addr().port()));
    config.tls = ClientTls::from_ca_file(ca.write(&dir)).expect("the test CA file");
    let bot = TeamBot::new(config, NoopHandler);
    let handle = bot.handle();
    let end = timeout(Duration::from_secs(40), bot.run())
        .await
        .expect("the scenario ends with goodbye in time")
        .expect("the run succeeds");
    assert_eq!(end, RunEnd::Goodbye);
    let card = timeout(Duration::from_secs(5), sim.finished())
        .await
        .expect("finished");
    assert!(
        card.perfect,
        "scorecard is not perfect: {}",
        serde_json::to_string_pretty(&card).unwrap()
    );
    eprintln!(
        "over TLS: {} messages, team reconnects {}, global reconnects {}, chaos {:?}",
        card.totals.messages, card.totals.team_reconnects, card.global.reconnects, card.chaos
    );
    assert!(card.chaos.team_drops >= 1, "{:?}", card.chaos);
    assert!(card.totals.team_reconnects >= 1);
    assert!(card.totals.messages >= 100, "{:?}", card.totals);
    let stats = handle.stats();
    for team in &card.teams {
        let mine = stats
            .iter()
            .find(|s| s.id.as_u64() == Some(team.id))
            .expect("the client knows every team");
        assert_eq!(
            mine.message_count, team.expected_messages,
            "team {}",
            team.id
        );
    }
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A client that lies gets caught: the simulator is not a rubber stamp.
#[tokio::test]
async fn a_wrong_healthcheck_reply_is_a_mismatch() {
    let config = SimConfig {
        teams: 3,
        leaving_teams: 0,
        join_window: Duration::ZERO,
        duration: Duration::from_millis(400),
        healthcheck_interval: Duration::from_millis(100),
        healthcheck_timeout: Duration::from_secs(2),
        settle_timeout: Duration::from_millis(300),
        quiet_period: Duration::from_millis(50),
        ..SimConfig::default()
    };
    let sim = Arc::new(TeambotSim::new(config));
    let server = TestServer::start_shared(sim.clone(), ServerConfig::default()).await;
    let mut global = Client::connect(&server.ws_url("/global")).await;
    global.recv_type("hello").await;
    let mut joined = Vec::new();
    // Never connect the teams, and answer every healthcheck with over-counted stats.
    loop {
        let frame = global.recv_json().await;
        match frame["type"].as_str() {
            Some("team.join") => joined.push(frame["team_id"].clone()),
            Some("healthcheck") => {
                let stats: Vec<Value> = joined
                    .iter()
                    .map(|id| json!({"id": id, "connected": true, "message_count": 5, "props_count": 0}))
                    .collect();
                global
                    .send_json(&json!({"type": "healthcheck", "stats": stats}))
                    .await;
            }
            Some("goodbye") => break,
            _ => {}
        }
    }
    let card = sim.finished().await;
    assert!(!card.perfect);
    assert!(card.finished);
    let problems: Vec<&str> = card.mismatches.iter().map(|m| m.problem.as_str()).collect();
    assert!(
        problems.contains(&"message_count over-counts"),
        "{problems:?}"
    );
    assert!(problems.contains(&"message_count differs"), "{problems:?}");
    assert!(problems.contains(&"connected differs"), "{problems:?}");
    assert!(
        problems.iter().any(|p| p.starts_with("not reconnected")),
        "{problems:?}"
    );
}

#[tokio::test]
async fn the_simulator_checks_tokens_and_paths() {
    let sim = TeambotSim::new(SimConfig::default());
    let server = TestServer::start(sim, ServerConfig::default()).await;
    let refused = |path: &str| {
        let url = server.ws_url(path);
        async move { Client::refused_status(&url, Default::default()).await }
    };
    assert_eq!(refused("/nope").await, 404);
    assert_eq!(refused("/team/1").await, 400);
    assert_eq!(refused("/team/1?token=forged").await, 403);
    let reply = server.http("GET", "/scorecard", None).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["phase"], "waiting");
    // Unknown events get the spec's error event; the socket stays open.
    let mut global = Client::connect(&server.ws_url("/global")).await;
    global.recv_type("hello").await;
    global.send_json(&json!({"type": "dance"})).await;
    let error = global.recv_until(|v| v["type"] == "error").await;
    assert_eq!(error["message"], "unknown event type");
    assert_eq!(error["received_message"], json!({"type": "dance"}));
    global
        .send_json(&json!({"type": "team.connect", "team_id": 123456789}))
        .await;
    let error = global.recv_until(|v| v["type"] == "error").await;
    assert_eq!(error["message"], "unknown team");
    assert_eq!(error["team_id"], 123456789);
}
