//! The attack harness against an in-process server: a row that holds passes, and the report
//! carries the memory, latency and row checks.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail by panicking"
)]

use switchboard_bench::Target;
use switchboard_bench::attack::{AttackOptions, LatencyRule, run};
use switchboard_echo::Echo;
use switchboard_server::ServerConfig;
use switchboard_testkit::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_row_passes_against_the_echo_protocol() {
    let server = TestServer::start(Echo::new(), ServerConfig::default()).await;
    let options = AttackOptions {
        row: 12,
        protocol: Some("echo".into()),
        target: Target::parse(&server.ws_url("/ws")).unwrap(),
        // The test process hosts the server: its own RSS is the server's.
        server_pid: Some(std::process::id()),
    };
    let report = run(options).await.unwrap();
    let failing: Vec<_> = report.checks.iter().filter(|c| !c.ok).collect();
    assert!(report.passed, "{failing:?}");
    assert!(
        report
            .checks
            .iter()
            .any(|c| c.name.contains("1007") && c.detail.matches("1007").count() == 5),
        "{:?}",
        report.checks
    );
    assert!(report.rss_growth_bytes.is_some());
    assert!(!report.rss_bound_formula.is_empty());
    assert!(report.idle_rtt_ms.p50 > 0.0 && report.attack_rtt_ms.p50 > 0.0);
}

#[tokio::test]
async fn without_a_pid_the_memory_check_fails_and_an_unknown_row_is_reported() {
    let server = TestServer::start(Echo::new(), ServerConfig::default()).await;
    let options = AttackOptions {
        row: 99,
        protocol: None,
        target: Target::parse(&server.ws_url("/ws")).unwrap(),
        server_pid: None,
    };
    let report = run(options).await.unwrap();
    assert!(!report.passed);
    let failed: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.name.as_str())
        .collect();
    assert!(failed.contains(&"row ran"), "{failed:?}");
    assert!(
        failed.contains(&"server RSS growth within the bound"),
        "{failed:?}"
    );
}

#[test]
fn the_latency_bound_is_twice_the_idle_median_or_50_ms() {
    assert_eq!(LatencyRule::from_idle(0.4).bound_ms, 50.0);
    assert_eq!(LatencyRule::from_idle(40.0).bound_ms, 80.0);
    assert!(LatencyRule::from_idle(40.0).holds(80.0));
    assert!(!LatencyRule::from_idle(40.0).holds(80.1));
}
