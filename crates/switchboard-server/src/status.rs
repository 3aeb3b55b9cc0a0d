//! `GET /status`: what an operator wants to see at a glance (uptime, version, protocol, open
//! connections, engine state, the limits in force), as JSON, or as a small HTML page when the
//! client asks for `text/html`. Nothing secret is in it: no keys, no tokens, no engine URL.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use switchboard_core::Protocol;

use crate::{READY_TIMEOUT, ServerConfig, ServerHandle};

/// The parts of `/status` fixed when the router is built.
pub(crate) struct Status {
    protocol: &'static str,
    started: Instant,
    handle: ServerHandle,
    engine: switchboard_core::Engine,
    /// The limits in force, rendered once.
    limits: Value,
    auth: Option<String>,
}

fn seconds(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

impl Status {
    pub(crate) fn new<P: Protocol>(
        protocol: &P,
        config: &ServerConfig,
        handle: ServerHandle,
    ) -> Self {
        let keepalive = protocol.keepalive().unwrap_or(config.keepalive);
        let max_frame = config
            .max_frame_bytes
            .unwrap_or_else(|| protocol.default_max_frame_bytes());
        let limits = json!({
            "max_connections": config.max_connections,
            "max_connections_per_ip": config.max_connections_per_ip,
            "requests_per_ip_burst": config.requests_per_ip_burst,
            "requests_per_ip_per_second": config.requests_per_ip_per_second,
            "max_pending_connections": config.max_pending_connections,
            "max_pending_per_ip": config.max_pending_per_ip,
            "max_frame_bytes": max_frame,
            "max_http_body_bytes": config.max_http_body_bytes.unwrap_or(max_frame),
            "outbound_queue": config.outbound_queue,
            "outbound_queue_bytes": config.outbound_queue_bytes,
            "max_outbound_frame_bytes": protocol.max_outbound_frame_bytes(),
            "reassembly_budget_bytes": config.reassembly_budget_bytes,
            "reassembly_per_ip_bytes": config.reassembly_per_ip_bytes,
            "max_header_bytes": config.max_header_bytes,
            "write_timeout_seconds": seconds(config.write_timeout),
            "message_timeout_seconds": seconds(config.message_timeout),
            "idle_timeout_seconds": seconds(keepalive.idle_timeout),
            "ping_interval_seconds": keepalive.ping_interval.map(seconds),
            "header_read_timeout_seconds": seconds(config.header_read_timeout),
            "body_timeout_seconds": seconds(config.body_timeout),
            "shutdown_grace_seconds": seconds(config.shutdown_grace),
            "trust_proxy": config.trust_proxy,
            "allowed_origins": config.allowed_origins,
        });
        Self {
            protocol: protocol.name(),
            started: Instant::now(),
            handle,
            engine: config.engine.clone(),
            limits,
            auth: config
                .auth
                .as_ref()
                .map(|verifier| format!("{:?}", verifier.algorithm())),
        }
    }

    async fn snapshot(&self) -> Value {
        let ready = tokio::time::timeout(READY_TIMEOUT, self.engine.ready())
            .await
            .unwrap_or(false);
        let stats = self.handle.stats();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": self.protocol,
            "uptime_seconds": self.started.elapsed().as_secs(),
            "shutting_down": self.handle.is_shutting_down(),
            "connections": {
                "open": stats.open_connections,
                "accepted_total": stats.accepted_total,
            },
            "engine": {
                "node": self.engine.node().to_string(),
                "ready": ready,
            },
            "tls": self.handle.tls.load(Ordering::Relaxed),
            "signed_identity": self.auth.as_deref(),
            "limits": self.limits,
        })
    }

    /// JSON, or HTML when the `Accept` header prefers `text/html` (a browser).
    pub(crate) async fn respond(&self, headers: &HeaderMap) -> Response {
        let snapshot = self.snapshot().await;
        let wants_html = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.contains("text/html"));
        if wants_html {
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                html(&snapshot),
            )
                .into_response()
        } else {
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                snapshot.to_string(),
            )
                .into_response()
        }
    }
}

/// The snapshot as a page: one table per object, values escaped.
fn html(snapshot: &Value) -> String {
    let title = format!(
        "switchboard {} ({})",
        escape(&plain(&snapshot["protocol"])),
        escape(&plain(&snapshot["version"]))
    );
    let mut page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:1.5em}}\
         td,th{{border:1px solid #ccc;padding:.3em .8em;text-align:left}}</style></head><body>\
         <h1>{title}</h1>\n"
    );
    table(
        &mut page,
        "Server",
        snapshot,
        &["connections", "engine", "limits"],
    );
    for section in ["connections", "engine", "limits"] {
        table(&mut page, section, &snapshot[section], &[]);
    }
    page.push_str("</body></html>\n");
    page
}

fn table(page: &mut String, caption: &str, object: &Value, skip: &[&str]) {
    let Some(map) = object.as_object() else {
        return;
    };
    let _ = write!(page, "<h2>{}</h2><table>", escape(caption));
    for (key, value) in map.iter().filter(|(key, _)| !skip.contains(&key.as_str())) {
        let _ = write!(
            page,
            "<tr><th>{}</th><td>{}</td></tr>",
            escape(key),
            escape(&plain(value))
        );
    }
    page.push_str("</table>\n");
}

/// A value as text: strings without their quotes, `null` as a dash.
fn plain(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes_values() {
        let page = html(&json!({
            "protocol": "<x>",
            "version": "1",
            "limits": {"allowed_origins": ["https://a.example/\"<script>"]},
        }));
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;x&gt;"), "{page}");
    }
}
