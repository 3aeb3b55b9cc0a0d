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
/// docs/asyncapi/ (which e2e/contract/asyncapi.test.mjs checks against captured frames).
#[tokio::test]
async fn get_asyncapi_json_serves_the_asyncapi_document() {
    let server = start(Config::default()).await.1;
    server
        .expect_asyncapi("reqack", include_str!("../../../docs/asyncapi/reqack.json"))
        .await;
}
