//! ip-chat nested at `/chat` inside another axum application, as `examples/embed-ip-chat` does.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use switchboard_ip_chat::{Config, IpChat};
use switchboard_server::ServerConfig;
use switchboard_testkit::{Client, http_request, json};

#[tokio::test]
async fn ip_chat_serves_under_a_prefix_next_to_the_host_apps_routes() {
    let (chat, handle) = switchboard_server::router(
        Arc::new(IpChat::new(Config::default())),
        ServerConfig::default(),
    );
    let app = Router::new()
        .route("/", get(|| async { "host app" }))
        .nest("/chat", chat);
    let listener = switchboard_server::bind(([127, 0, 0, 1], 0).into(), 128).unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });

    assert_eq!(http_request(addr, "GET", "/", None).await.body, "host app");
    assert_eq!(
        http_request(addr, "GET", "/chat/healthz", None)
            .await
            .status,
        200
    );
    let mut client = Client::connect(&format!("ws://{addr}/chat/ws")).await;
    client
        .send_json(&json!({"type": "send_message", "data": {"text": "nested"}}))
        .await;
    assert_eq!(client.recv_type("message").await["data"]["text"], "nested");

    handle.shutdown();
    client.expect_close().await;
    serving.abort();
}
