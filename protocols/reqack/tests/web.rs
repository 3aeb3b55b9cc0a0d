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
