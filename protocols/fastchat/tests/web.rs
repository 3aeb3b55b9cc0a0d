//! The browser demo page is served at `GET /` with its assets.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use switchboard_fastchat::{Config, FastChat};
use switchboard_server::ServerConfig;
use switchboard_testkit::TestServer;

#[tokio::test]
async fn get_root_serves_the_demo_page_and_its_assets() {
    let server = TestServer::start(FastChat::new(Config::default()), ServerConfig::default()).await;

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
    assert!(script.body.contains("WebSocket"));
    assert_eq!(server.http("GET", "/style.css", None).await.status, 200);

    assert_eq!(server.http("GET", "/nope", None).await.status, 404);
    assert_eq!(server.http("POST", "/", Some("{}")).await.status, 405);
    assert_eq!(server.http("GET", "/healthz", None).await.status, 200);
}
