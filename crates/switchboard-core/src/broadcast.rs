//! Fan-out: deliver one encoded frame to every subscriber of a topic.
//!
//! Topics are plain strings chosen by protocols: `"room"`, `"user:<id>"`, `"session:<id>"`. A
//! user's several sockets subscribe to the same user topic, so direct delivery and broadcast are
//! the same operation.

use std::collections::HashMap;
use std::sync::RwLock;

use crate::sync::{read, write};
use crate::{ConnId, Frame, Peer};

/// Delivers frames to the peers subscribed to a topic.
///
/// Methods are synchronous and never wait on a peer: delivery is [`Peer::send`], which drops a
/// slow consumer instead of blocking. A multi-node backend implements this trait by delivering
/// to local subscribers and forwarding the frame to other nodes through its own bounded queue.
pub trait Broadcaster: Send + Sync + 'static {
    /// Adds `peer` to `topic` (idempotent).
    fn subscribe(&self, topic: &str, peer: &Peer);
    /// Removes connection `conn` from `topic`; an emptied topic is forgotten.
    fn unsubscribe(&self, topic: &str, conn: ConnId);
    /// Sends `frame` to every subscriber of `topic` except `except`; returns how many were queued.
    fn publish(&self, topic: &str, frame: &Frame, except: Option<ConnId>) -> usize;
    /// The number of subscribers of `topic`.
    fn subscriber_count(&self, topic: &str) -> usize;
}

/// The in-process [`Broadcaster`]: the embedded default.
#[derive(Debug, Default)]
pub struct LocalBroadcaster {
    topics: RwLock<HashMap<Box<str>, HashMap<ConnId, Peer>>>,
}

impl LocalBroadcaster {
    /// An empty broadcaster.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Broadcaster for LocalBroadcaster {
    fn subscribe(&self, topic: &str, peer: &Peer) {
        let mut topics = write(&self.topics);
        match topics.get_mut(topic) {
            Some(subscribers) => {
                subscribers.insert(peer.id(), peer.clone());
            }
            None => {
                topics.insert(topic.into(), HashMap::from([(peer.id(), peer.clone())]));
            }
        }
    }

    fn unsubscribe(&self, topic: &str, conn: ConnId) {
        let mut topics = write(&self.topics);
        if let Some(subscribers) = topics.get_mut(topic) {
            subscribers.remove(&conn);
            if subscribers.is_empty() {
                topics.remove(topic);
            }
        }
    }

    fn publish(&self, topic: &str, frame: &Frame, except: Option<ConnId>) -> usize {
        let topics = read(&self.topics);
        let Some(subscribers) = topics.get(topic) else {
            return 0;
        };
        subscribers
            .values()
            .filter(|peer| Some(peer.id()) != except)
            .filter(|peer| peer.send(frame.clone()).is_queued())
            .count()
    }

    fn subscriber_count(&self, topic: &str) -> usize {
        read(&self.topics).get(topic).map_or(0, HashMap::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer_channel;

    fn peer() -> (Peer, crate::PeerLink) {
        peer_channel(([127, 0, 0, 1], 1).into(), 8)
    }

    #[test]
    fn publishes_to_subscribers_except_one() {
        let hub = LocalBroadcaster::new();
        let (a, mut a_link) = peer();
        let (b, mut b_link) = peer();
        hub.subscribe("room", &a);
        hub.subscribe("room", &b);
        assert_eq!(hub.publish("room", &Frame::text("hi"), Some(a.id())), 1);
        assert!(a_link.try_recv().is_none());
        assert!(b_link.try_recv().is_some());
    }

    #[test]
    fn unsubscribing_the_last_peer_forgets_the_topic() {
        let hub = LocalBroadcaster::new();
        let (a, _link) = peer();
        hub.subscribe("room", &a);
        hub.unsubscribe("room", a.id());
        assert_eq!(hub.subscriber_count("room"), 0);
        assert!(read(&hub.topics).is_empty());
    }
}
