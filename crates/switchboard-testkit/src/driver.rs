//! An in-process driver: a protocol's hooks run directly, with no sockets and no runtime.
//!
//! [`Driver::open`] admits a connection and runs `on_open`; [`Session::text`] runs `on_text` to
//! completion; [`Session::frames`] returns what the hooks queued for this connection. Hooks run
//! on the test's own task and the in-memory engine delivers synchronously, so when `text`
//! returns every frame it caused is already queued: tests read them without waiting, and the
//! result does not depend on scheduling. Use it for protocol logic; use [`crate::TestServer`]
//! for anything the wire or the runtime takes part in (framing, limits, timeouts, HTTP).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde_json::Value;
use switchboard_core::{
    CloseReason, Context, Engine, Handshake, Outgoing, Peer, PeerLink, Protocol, Reject,
    peer_channel,
};

/// Queue capacity of a driven connection: large, so a test sees every frame rather than a
/// slow-consumer close (the runtime's queue limits are tested with real sockets).
const QUEUE: usize = 1 << 16;

/// Runs a protocol's hooks in process against one engine.
pub struct Driver<P: Protocol> {
    protocol: Arc<P>,
    engine: Engine,
}

impl<P: Protocol> std::fmt::Debug for Driver<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("protocol", &self.protocol.name())
            .field("engine", &self.engine)
            .finish()
    }
}

impl<P: Protocol> Driver<P> {
    /// Drives `protocol` on a fresh in-memory engine.
    pub fn new(protocol: P) -> Self {
        Self::with_engine(Arc::new(protocol), Engine::default())
    }

    /// Drives `protocol` on `engine` (e.g. one node of a `MemoryCluster`).
    pub fn with_engine(protocol: Arc<P>, engine: Engine) -> Self {
        Self { protocol, engine }
    }

    /// The protocol.
    pub fn protocol(&self) -> &Arc<P> {
        &self.protocol
    }

    /// The engine the hooks see.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Admits a connection to `path` (with an optional `?query`) from 127.0.0.1 and runs
    /// `on_open`.
    pub async fn open(&self, path: &str) -> Result<Session<P>, Reject> {
        self.open_from(path, [127, 0, 0, 1]).await
    }

    /// Like [`Driver::open`], from loopback address `source`.
    pub async fn open_from(&self, path: &str, source: [u8; 4]) -> Result<Session<P>, Reject> {
        self.open_with(path, source, None).await
    }

    /// Like [`Driver::open`], as the server does it when it verified a signed token for
    /// `identity` (`None`: signed identity is not configured).
    pub async fn open_as(
        &self,
        path: &str,
        identity: Option<&switchboard_core::Identity>,
    ) -> Result<Session<P>, Reject> {
        self.open_with(path, [127, 0, 0, 1], identity).await
    }

    async fn open_with(
        &self,
        path: &str,
        source: [u8; 4],
        identity: Option<&switchboard_core::Identity>,
    ) -> Result<Session<P>, Reject> {
        let (path, query) = match path.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path, None),
        };
        let remote = SocketAddr::new(IpAddr::from(source), 40_000);
        let handshake = Handshake {
            path,
            query,
            remote,
            client_ip: remote.ip(),
            origin: None,
            host: Some("127.0.0.1"),
            identity,
        };
        let mut conn = self.protocol.admit(&handshake)?;
        let (peer, link) = peer_channel(remote, QUEUE);
        self.protocol
            .on_open(&mut conn, &Context::new(&peer, &self.engine))
            .await;
        Ok(Session {
            protocol: self.protocol.clone(),
            engine: self.engine.clone(),
            conn: Some(conn),
            peer,
            link,
        })
    }
}

/// One driven connection.
pub struct Session<P: Protocol> {
    protocol: Arc<P>,
    engine: Engine,
    conn: Option<P::Conn>,
    peer: Peer,
    link: PeerLink,
}

impl<P: Protocol> std::fmt::Debug for Session<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("protocol", &self.protocol.name())
            .field("peer", &self.peer)
            .finish()
    }
}

impl<P: Protocol> Session<P> {
    /// Runs `on_text` with `text` to completion.
    pub async fn text(&mut self, text: &str) {
        let Some(conn) = self.conn.as_mut() else {
            panic!("the session is closed");
        };
        self.protocol
            .on_text(conn, &Context::new(&self.peer, &self.engine), text)
            .await;
    }

    /// Runs `on_text` with `value` encoded as JSON.
    pub async fn json(&mut self, value: &Value) {
        self.text(&value.to_string()).await;
    }

    /// Runs `on_tick` once.
    pub async fn tick(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            panic!("the session is closed");
        };
        self.protocol
            .on_tick(conn, &Context::new(&self.peer, &self.engine))
            .await;
    }

    /// Every frame queued for this connection so far, in order (batches flattened).
    pub fn frames(&mut self) -> Vec<String> {
        let mut frames = Vec::new();
        while let Some(item) = self.link.try_recv() {
            match item {
                Outgoing::Frame(frame) => frames.push(frame.as_str().to_owned()),
                Outgoing::Batch(batch) => {
                    frames.extend(batch.iter().map(|frame| frame.as_str().to_owned()));
                }
                Outgoing::Binary(_) => panic!("a binary frame was queued"),
            }
        }
        frames
    }

    /// Every frame queued so far, parsed as JSON.
    pub fn json_frames(&mut self) -> Vec<Value> {
        self.frames()
            .iter()
            .map(|frame| {
                serde_json::from_str(frame).unwrap_or_else(|e| panic!("not JSON ({e}): {frame}"))
            })
            .collect()
    }

    /// The close the protocol asked for, if it did.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.peer.close_reason().cloned()
    }

    /// This connection's peer (its id, for presence assertions).
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Closes the connection: marks the peer closed and runs `on_close`, as the runtime does.
    pub async fn close(mut self) {
        self.peer.close(CloseReason::new(1000, "driver closed"));
        if let Some(conn) = self.conn.take() {
            self.protocol
                .on_close(conn, &Context::new(&self.peer, &self.engine))
                .await;
        }
    }
}
