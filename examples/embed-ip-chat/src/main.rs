//! Mounts ip-chat at `/chat` inside an ordinary axum application, next to its own routes.
//!
//! ```text
//! cargo run -p embed-ip-chat            # listens on 127.0.0.1:3000 (or EMBED_LISTEN)
//! websocat ws://127.0.0.1:3000/chat/ws  # the chat
//! curl http://127.0.0.1:3000/           # your own route
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use switchboard_ip_chat::{Config, IpChat};
use switchboard_server::ServerConfig;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let listen: SocketAddr = std::env::var("EMBED_LISTEN")
        .ok()
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3000)));

    let config = ServerConfig::default();
    let (chat, chat_handle) =
        switchboard_server::router(Arc::new(IpChat::new(Config::default())), config.clone());
    let app = Router::new()
        .route(
            "/",
            get(|| async { "my own service; chat lives at /chat/ws\n" }),
        )
        .nest("/chat", chat);

    // The chat needs each client's address: serve with connect info.
    let listener = switchboard_server::bind(listen, config.accept_backlog)?;
    // SIGINT and SIGTERM, watched from here on: a signal right after the line below stops the
    // server gracefully instead of killing it.
    let stop = switchboard_server::stop_signal();
    tracing::info!(%listen, "embedded ip-chat at /chat/ws");
    let shutdown = chat_handle.clone();
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        stop.await;
        // Close every chat socket with 1001, then let axum stop accepting.
        shutdown.shutdown();
    })
    .await?;
    chat_handle.drain(config.shutdown_grace).await;
    Ok(())
}
