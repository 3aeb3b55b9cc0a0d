//! The browser demo client is served at `GET /` with its assets; other paths stay 404.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use common::start;
use switchboard_reqack::Config;

#[tokio::test]
async fn get_root_serves_the_demo_page_and_its_assets() {
    let (_, server) = start(Config::default()).await;
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
    assert!(page.body.contains("reqack"));
    for (path, kind) in [("/app.js", "text/javascript"), ("/style.css", "text/css")] {
        let asset = server.http("GET", path, None).await;
        assert_eq!(asset.status, 200, "{path}");
        assert!(asset.headers.to_ascii_lowercase().contains(kind), "{path}");
        assert!(!asset.body.is_empty(), "{path}");
    }
    assert_eq!(server.http("GET", "/nope.js", None).await.status, 404);
    assert_eq!(server.http("POST", "/", None).await.status, 405);
    assert_eq!(server.http("GET", "/healthz", None).await.status, 200);
}
