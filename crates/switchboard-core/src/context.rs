//! [`Context`]: what a protocol hook can do besides changing its own connection state: send,
//! close, reach the state engine (publish, presence, logs, keyed state), read the clock.

use crate::engine::ConnRef;
use crate::{CloseReason, Delivery, Engine, Frame, Peer};

/// Handed to every connection hook of a [`crate::Protocol`]: this socket (send, close), the
/// node's state [`Engine`] (publish, presence, logs, keyed state, rate limits) and this
/// connection's cluster-wide name. Protocols keep no stores of their own; what outlives a
/// connection goes through the engine, so the same protocol code runs on one node, on a durable
/// node or in a cluster.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    peer: &'a Peer,
    engine: &'a Engine,
}

impl<'a> Context<'a> {
    /// A context for `peer` on the node of `engine`.
    pub fn new(peer: &'a Peer, engine: &'a Engine) -> Self {
        Self { peer, engine }
    }

    /// This connection's socket.
    pub fn peer(&self) -> &'a Peer {
        self.peer
    }

    /// The node's state engine.
    pub fn engine(&self) -> &'a Engine {
        self.engine
    }

    /// This connection's name across the cluster (node + connection id).
    pub fn me(&self) -> ConnRef {
        self.engine.conn_ref(self.peer.id())
    }

    /// Queues `frame` for this socket (see [`Peer::send`]).
    pub fn send(&self, frame: Frame) -> Delivery {
        self.peer.send(frame)
    }

    /// Now, on the runtime's clock. It is tokio's, so a test can pause and advance it
    /// (`#[tokio::test(start_paused = true)]`); the engine's windows and time-to-live use the
    /// same clock.
    pub fn now(&self) -> tokio::time::Instant {
        tokio::time::Instant::now()
    }

    /// Asks the runtime to close this socket (see [`Peer::close`]).
    pub fn close(&self, reason: CloseReason) {
        self.peer.close(reason);
    }
}
