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
    let page = server.http("GET", "/", None).await;
    assert_eq!(page.status, 200);
    assert!(
        page.headers
            .to_ascii_lowercase()
            .contains("content-type: text/html; charset=utf-8"),
        "{}",
        page.headers
    );
    assert!(page.body.starts_with("<!doctype html>"));
    assert!(page.body.contains("collab"));
    for path in ["/app.js", "/ot.js", "/runner.js", "/style.css"] {
        let asset = server.http("GET", path, None).await;
        assert_eq!(asset.status, 200, "{path}");
        assert!(!asset.body.is_empty(), "{path}");
    }
    assert_eq!(server.http("GET", "/nope.js", None).await.status, 404);
    assert_eq!(server.http("POST", "/", None).await.status, 405);
    // The REST API is unchanged.
    let created = server.http("POST", "/api/sessions", None).await;
    assert_eq!(created.status, 201);
    let id = created.json()["sessionId"].as_str().unwrap().to_owned();
    let got = server
        .http("GET", &format!("/api/sessions/{id}"), None)
        .await;
    assert_eq!(got.status, 200);
    assert_eq!(server.http("GET", "/healthz", None).await.status, 200);
}
