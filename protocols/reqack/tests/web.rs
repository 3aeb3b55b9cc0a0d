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
    let (page, _) = server.expect_demo_page(&["/app.js", "/style.css"]).await;
    assert!(page.body.contains("reqack"));
}

/// `GET /asyncapi.json` is the protocol's AsyncAPI document, byte for byte the one in
/// docs/asyncapi/ (which e2e/tests/asyncapi.test.mjs checks against captured frames).
#[tokio::test]
async fn get_asyncapi_json_serves_the_asyncapi_document() {
    let server = start(Config::default()).await.1;
    let reply = server.http("GET", "/asyncapi.json", None).await;
    assert_eq!(reply.status, 200, "GET /asyncapi.json");
    assert!(
        reply
            .headers
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{}",
        reply.headers
    );
    let document = reply.json();
    assert_eq!(document["asyncapi"], "3.0.0");
    assert_eq!(document["info"]["title"], "reqack");
    assert_eq!(
        reply.body,
        include_str!("../../../docs/asyncapi/reqack.json")
    );
}
