//! A scripted fake teambot server: the test plays the server, frame by frame.
//!
//! Every socket the client opens (any path) is reported as [`Event::Open`] with its [`Peer`], so
//! the test can write to it or close it; every frame and close comes back as an [`Event`]. Waits
//! are bounded by [`WAIT`].
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::time::Duration;

use serde_json::Value;
use switchboard_core::{CloseReason, Context, Frame, Handshake, Peer, Protocol, Reject};
use switchboard_server::ServerConfig;
use switchboard_teambot::client::{TeamContext, TeamHandler};
use switchboard_teambot::messages::TeamId;
use switchboard_testkit::TestServer;
use tokio::sync::mpsc;
use tokio::time::timeout;

pub const WAIT: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub enum Event {
    Open { path: String, peer: Peer },
    Text { path: String, value: Value },
    Close { path: String },
}

pub struct Script {
    tx: mpsc::Sender<Event>,
}

impl Protocol for Script {
    type Conn = String;

    fn name(&self) -> &'static str {
        "script"
    }

    fn admit(&self, handshake: &Handshake<'_>) -> Result<String, Reject> {
        if handshake.path == "/refuse" {
            return Err(Reject::Unavailable("scripted refusal".into()));
        }
        Ok(handshake.path.to_owned())
    }

    async fn on_open(&self, conn: &mut String, cx: &Context<'_>) {
        let peer = cx.peer();
        let _ = self
            .tx
            .send(Event::Open {
                path: conn.clone(),
                peer: peer.clone(),
            })
            .await;
    }

    async fn on_text(&self, conn: &mut String, cx: &Context<'_>, text: &str) {
        let peer = cx.peer();
        let value: Value = serde_json::from_str(text).expect("client frames are JSON");
        // Team sockets answer pings by themselves, except under /mute/ (pong-timeout tests).
        if value["type"] == "ping" && !conn.starts_with("/mute/") {
            let pong = serde_json::json!({"type": "pong", "unique_id": value["unique_id"]});
            let _ = peer.send(Frame::text(pong.to_string()));
        }
        let _ = self
            .tx
            .send(Event::Text {
                path: conn.clone(),
                value,
            })
            .await;
    }

    async fn on_close(&self, conn: String, _cx: &Context<'_>) {
        let _ = self.tx.send(Event::Close { path: conn }).await;
    }
}

pub struct Fake {
    pub server: TestServer,
    pub events: mpsc::Receiver<Event>,
}

impl Fake {
    pub async fn start() -> Self {
        let (tx, events) = mpsc::channel(1024);
        let server = TestServer::start(Script { tx }, ServerConfig::default()).await;
        Self { server, events }
    }

    pub fn url(&self, path: &str) -> String {
        self.server.ws_url(path)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.server.addr(), path)
    }

    /// The next event that `accept` returns `Some` for; other events are skipped (pings are
    /// answered if `pong` is set for their path).
    pub async fn next<T>(&mut self, what: &str, mut accept: impl FnMut(&Event) -> Option<T>) -> T {
        let wait = async {
            loop {
                let event = self.events.recv().await.expect("server gone");
                if let Some(found) = accept(&event) {
                    return found;
                }
            }
        };
        timeout(WAIT, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    }

    /// Waits until every predicate has matched some event, in any order.
    pub async fn all(&mut self, what: &str, predicates: &[&dyn Fn(&Event) -> bool]) {
        let mut pending: Vec<_> = predicates.to_vec();
        self.next(what, |event| {
            pending.retain(|matches| !matches(event));
            pending.is_empty().then_some(())
        })
        .await
    }

    pub async fn open(&mut self, path: &str) -> Peer {
        self.next(&format!("a socket on {path}"), |e| match e {
            Event::Open { path: p, peer } if p == path => Some(peer.clone()),
            _ => None,
        })
        .await
    }

    pub async fn text(&mut self, path: &str, kind: &str) -> Value {
        self.next(&format!("{kind} on {path}"), |e| match e {
            Event::Text { path: p, value } if p == path && value["type"] == kind => {
                Some(value.clone())
            }
            _ => None,
        })
        .await
    }

    pub async fn closed(&mut self, path: &str) {
        self.next(&format!("close of {path}"), |e| match e {
            Event::Close { path: p } if p == path => Some(()),
            _ => None,
        })
        .await
    }

    /// Asserts nothing matching `reject` happens for `wait` (other events are skipped).
    pub async fn quiet(&mut self, wait: Duration, reject: impl Fn(&Event) -> bool) {
        let watch = async {
            while let Some(event) = self.events.recv().await {
                assert!(!reject(&event), "unexpected event: {event:?}");
            }
        };
        let _ = timeout(wait, watch).await;
    }
}

pub fn send(peer: &Peer, value: Value) {
    assert!(
        peer.send(Frame::text(value.to_string())).is_queued(),
        "send failed"
    );
}

pub fn drop_socket(peer: &Peer) {
    peer.close(CloseReason::new(CloseReason::GOING_AWAY, "scripted drop"));
}

/// A handler that reports what it sees on a channel.
#[derive(Debug)]
pub enum Seen {
    Message(TeamId, String),
    Connected(TeamId),
    Dropped(TeamId, String),
    ConnectFailed(TeamId, String),
    Left(TeamId),
    Error(Option<String>),
}

pub struct Recorder(pub mpsc::Sender<Seen>);

impl TeamHandler for Recorder {
    fn on_message(&self, team: &TeamContext, text: &str) {
        let _ = self
            .0
            .try_send(Seen::Message(team.id().clone(), text.to_owned()));
    }
    fn on_team_connected(&self, team: &TeamContext) {
        let _ = self.0.try_send(Seen::Connected(team.id().clone()));
    }
    fn on_team_dropped(&self, team_id: &TeamId, reason: &str) {
        let _ = self
            .0
            .try_send(Seen::Dropped(team_id.clone(), reason.to_owned()));
    }
    fn on_connect_failed(&self, team_id: &TeamId, reason: &str) {
        let _ = self
            .0
            .try_send(Seen::ConnectFailed(team_id.clone(), reason.to_owned()));
    }
    fn on_team_left(&self, team_id: &TeamId) {
        let _ = self.0.try_send(Seen::Left(team_id.clone()));
    }
    fn on_error(&self, error: &switchboard_teambot::client::ServerError) {
        let _ = self.0.try_send(Seen::Error(error.message.clone()));
    }
}

pub async fn seen<T>(
    rx: &mut mpsc::Receiver<Seen>,
    what: &str,
    mut accept: impl FnMut(Seen) -> Option<T>,
) -> T {
    let wait = async {
        loop {
            let event = rx.recv().await.expect("handler gone");
            if let Some(found) = accept(event) {
                return found;
            }
        }
    };
    timeout(WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}
