//! The open WebSocket peers of a router, so that a shutdown reaches each connection as a close
//! request on its own peer.
//!
//! A connection's task then waits on nothing shared with other connections. Waiting on the
//! router's `CancellationToken` instead cost every wake-up of every connection two locks that
//! all connections share (the token's state and its waiter list), which the cores handed back
//! and forth on each delivery of a fan-out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use switchboard_core::sync::lock;
use switchboard_core::{CloseReason, ConnId, Peer};

/// The open peers and whether a shutdown has started.
#[derive(Debug, Default)]
pub(crate) struct OpenPeers {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    shutting_down: bool,
    peers: HashMap<ConnId, Peer>,
}

impl OpenPeers {
    /// Adds `peer` until the returned guard is dropped. A peer added after shutdown started is
    /// asked to close at once, like every peer open when it started.
    pub(crate) fn add(self: &Arc<Self>, peer: &Peer) -> Registered {
        let mut state = lock(&self.state);
        if state.shutting_down {
            peer.close(CloseReason::shutdown());
        } else {
            state.peers.insert(peer.id(), peer.clone());
        }
        Registered {
            peers: self.clone(),
            id: peer.id(),
        }
    }

    /// Asks every open peer, and every later one, to close with 1001.
    pub(crate) fn close_all(&self) {
        let peers = {
            let mut state = lock(&self.state);
            state.shutting_down = true;
            std::mem::take(&mut state.peers)
        };
        // Closed outside the lock: a close wakes the connection's task.
        for peer in peers.into_values() {
            peer.close(CloseReason::shutdown());
        }
    }
}

/// Keeps one peer in [`OpenPeers`] while it lives.
#[derive(Debug)]
pub(crate) struct Registered {
    peers: Arc<OpenPeers>,
    id: ConnId,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut state = lock(&self.peers.state);
        state.peers.remove(&self.id);
        // A burst of connections that came and went leaves no large table behind.
        let (len, capacity) = (state.peers.len(), state.peers.capacity());
        if capacity > 64 && len < capacity / 4 {
            state.peers.shrink_to(len.saturating_mul(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use switchboard_core::peer_channel;

    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    #[test]
    fn close_all_closes_open_and_later_peers_and_dropped_ones_leave() {
        let open = Arc::new(OpenPeers::default());
        let (first, _link) = peer_channel(addr(), 4);
        let (gone, _gone_link) = peer_channel(addr(), 4);
        let _first = open.add(&first);
        drop(open.add(&gone));
        assert_eq!(lock(&open.state).peers.len(), 1);
        open.close_all();
        assert_eq!(first.close_reason(), Some(&CloseReason::shutdown()));
        assert!(!gone.is_closing());
        let (late, _late_link) = peer_channel(addr(), 4);
        let _late = open.add(&late);
        assert_eq!(late.close_reason(), Some(&CloseReason::shutdown()));
        assert!(lock(&open.state).peers.is_empty());
    }
}
