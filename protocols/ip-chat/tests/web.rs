//! The browser demo page is served at `GET /` with its assets.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use switchboard_ip_chat::{Config, IpChat};
use switchboard_server::ServerConfig;
use switchboard_testkit::TestServer;

#[tokio::test]
async fn get_root_serves_the_demo_page_and_its_assets() {
    let server = TestServer::start(IpChat::new(Config::default()), ServerConfig::default()).await;
    let (page, assets) = server.expect_demo_page(&["/app.js", "/style.css"]).await;
    assert!(page.body.contains("app.js"));
    assert!(assets[0].body.contains("WebSocket"));
}

/// `GET /asyncapi.json` is the protocol's AsyncAPI document, byte for byte the one in
/// docs/asyncapi/ (which e2e/contract/asyncapi.test.mjs checks against captured frames).
#[tokio::test]
async fn get_asyncapi_json_serves_the_asyncapi_document() {
    let server = TestServer::start(IpChat::new(Config::default()), ServerConfig::default()).await;
    server
        .expect_asyncapi(
            "ip-chat",
            include_str!("../../../docs/asyncapi/ip-chat.json"),
        )
        .await;
}
