//! The simulator's live dashboard is served at `GET /` next to `/scorecard`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use switchboard_server::ServerConfig;
use switchboard_teambot::sim::{SimConfig, TeambotSim};
use switchboard_testkit::TestServer;

#[tokio::test]
async fn get_root_serves_the_dashboard_and_the_scorecard_still_works() {
    let server = TestServer::start(
        TeambotSim::new(SimConfig::default()),
        ServerConfig::default(),
    )
    .await;

    let page = server.http("GET", "/", None).await;
    assert_eq!(page.status, 200);
    assert!(
        page.headers
            .to_ascii_lowercase()
            .contains("content-type: text/html")
    );
    assert!(page.body.starts_with("<!doctype html>"));
    assert!(page.body.contains("app.js"));

    let script = server.http("GET", "/app.js", None).await;
    assert_eq!(script.status, 200);
    assert!(script.body.contains("/scorecard"));
    assert_eq!(server.http("GET", "/style.css", None).await.status, 200);

    let scorecard = server.http("GET", "/scorecard", None).await;
    assert_eq!(scorecard.status, 200);
    assert_eq!(scorecard.json()["phase"], "waiting");
    assert_eq!(
        server.http("POST", "/scorecard", Some("{}")).await.status,
        405
    );
    assert_eq!(server.http("GET", "/nope", None).await.status, 404);
    assert_eq!(server.http("POST", "/", Some("{}")).await.status, 405);
}
