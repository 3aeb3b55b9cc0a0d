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

    let (page, assets) = server.expect_demo_page(&["/app.js", "/style.css"]).await;
    assert!(page.body.contains("app.js"));
    assert!(assets[0].body.contains("/scorecard"));

    let scorecard = server.http("GET", "/scorecard", None).await;
    assert_eq!(scorecard.status, 200);
    assert_eq!(scorecard.json()["phase"], "waiting");
    assert_eq!(
        server.http("POST", "/scorecard", Some("{}")).await.status,
        405
    );
}

/// `GET /asyncapi.json` is the protocol's AsyncAPI document, byte for byte the one in
/// docs/asyncapi/ (which e2e/contract/asyncapi.test.mjs checks against captured frames).
#[tokio::test]
async fn get_asyncapi_json_serves_the_asyncapi_document() {
    let server = TestServer::start(
        TeambotSim::new(SimConfig::default()),
        ServerConfig::default(),
    )
    .await;
    server
        .expect_asyncapi(
            "teambot-sim",
            include_str!("../../../docs/asyncapi/teambot-sim.json"),
        )
        .await;
}
