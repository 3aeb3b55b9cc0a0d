//! The browser demo client is served at `GET /` with its assets, next to the REST API.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use switchboard_collab::{Collab, Config};
use switchboard_server::ServerConfig;
use switchboard_testkit::TestServer;

#[tokio::test]
async fn get_root_serves_the_demo_page_and_its_assets() {
    let server = TestServer::start(Collab::new(Config::default()), ServerConfig::default()).await;
    let (page, _) = server
        .expect_demo_page(&["/app.js", "/ot.js", "/runner.js", "/style.css"])
        .await;
    assert!(page.body.contains("collab"));
    // The REST API is unchanged.
    let created = server.http("POST", "/api/sessions", None).await;
    assert_eq!(created.status, 201);
    let id = created.json()["sessionId"].as_str().unwrap().to_owned();
    let got = server
        .http("GET", &format!("/api/sessions/{id}"), None)
        .await;
    assert_eq!(got.status, 200);
}

/// `GET /asyncapi.json` is the protocol's AsyncAPI document, byte for byte the one in
/// docs/asyncapi/ (which e2e/contract/asyncapi.test.mjs checks against captured frames).
#[tokio::test]
async fn get_asyncapi_json_serves_the_asyncapi_document() {
    let server = TestServer::start(Collab::new(Config::default()), ServerConfig::default()).await;
    server
        .expect_asyncapi("collab", include_str!("../../../docs/asyncapi/collab.json"))
        .await;
}
