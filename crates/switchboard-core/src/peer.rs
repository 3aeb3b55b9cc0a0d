//! One connected socket as protocols see it: a bounded outbound queue and a close signal.
//!
//! The runtime owns the socket; protocols hold a [`Peer`] and push frames into it. Pushing never
//! waits: when the queue is full the peer is a slow consumer and is closed with 1008, so one
//! client that stops reading can never slow anybody else down.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{Notify, mpsc};

use crate::{CloseReason, Frame};

/// A process-unique connection id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

impl ConnId {
    /// A fresh id, never handed out before in this process.
    pub fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The raw number, for logs.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// One item of a peer's outbound queue.
#[derive(Debug)]
pub enum Outgoing {
    /// A single frame.
    Frame(Frame),
    /// Several frames that take one queue slot, e.g. a history replay on connect.
    Batch(Vec<Frame>),
}

/// What happened to a frame handed to [`Peer::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a frame may not have been queued"]
pub enum Delivery {
    /// The frame is in the peer's queue.
    Queued,
    /// The queue was full: the frame was dropped and the peer is being closed as a slow consumer.
    SlowConsumer,
    /// The peer is already closing or gone; the frame was dropped.
    Closed,
}

impl Delivery {
    /// Whether the frame was queued.
    pub fn is_queued(self) -> bool {
        self == Self::Queued
    }
}

struct PeerInner {
    id: ConnId,
    remote: SocketAddr,
    tx: mpsc::Sender<Outgoing>,
    close_reason: OnceLock<CloseReason>,
    close_signal: Notify,
}

/// The protocol-facing handle of one connection. Cheap to clone.
#[derive(Clone)]
pub struct Peer(Arc<PeerInner>);

impl Peer {
    /// The connection id.
    pub fn id(&self) -> ConnId {
        self.0.id
    }

    /// The remote socket address as seen by the server (not proxy-resolved).
    pub fn remote(&self) -> SocketAddr {
        self.0.remote
    }

    /// Queues `frame` without waiting. A full queue closes the peer as a slow consumer.
    pub fn send(&self, frame: Frame) -> Delivery {
        self.push(Outgoing::Frame(frame))
    }

    /// Queues several frames in one queue slot, in order.
    pub fn send_batch(&self, frames: Vec<Frame>) -> Delivery {
        if frames.is_empty() {
            return Delivery::Queued;
        }
        self.push(Outgoing::Batch(frames))
    }

    fn push(&self, item: Outgoing) -> Delivery {
        if self.is_closing() {
            return Delivery::Closed;
        }
        match self.0.tx.try_send(item) {
            Ok(()) => Delivery::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close(CloseReason::slow_consumer());
                Delivery::SlowConsumer
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Delivery::Closed,
        }
    }

    /// Asks the runtime to close this connection. The first reason given wins.
    pub fn close(&self, reason: CloseReason) {
        if self.0.close_reason.set(reason).is_ok() {
            self.0.close_signal.notify_waiters();
        }
    }

    /// Resolves once a close has been requested, with the reason. Any number of tasks may wait.
    pub async fn closing(&self) -> CloseReason {
        loop {
            let notified = self.0.close_signal.notified();
            tokio::pin!(notified);
            // Register before checking, so a close between the check and the wait is not missed.
            notified.as_mut().enable();
            if let Some(reason) = self.close_reason() {
                return reason.clone();
            }
            notified.await;
        }
    }

    /// Whether a close has been requested (by the protocol, the runtime or a full queue).
    pub fn is_closing(&self) -> bool {
        self.0.close_reason.get().is_some()
    }

    /// The reason the connection is closing, once it is.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.0.close_reason.get()
    }
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("id", &self.0.id)
            .field("remote", &self.0.remote)
            .finish()
    }
}

impl PartialEq for Peer {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for Peer {}

/// The runtime's end of a peer: drains the queue and waits for close requests.
#[derive(Debug)]
pub struct PeerLink {
    rx: mpsc::Receiver<Outgoing>,
    peer: Peer,
}

impl PeerLink {
    /// The next queued item; `None` never happens while the link holds its own peer.
    pub async fn recv(&mut self) -> Option<Outgoing> {
        self.rx.recv().await
    }

    /// A queued item if one is ready.
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        self.rx.try_recv().ok()
    }

    /// Drops everything still queued (used before a slow consumer's close frame).
    pub fn discard_queued(&mut self) {
        while self.rx.try_recv().is_ok() {}
    }

    /// The peer this link drains.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }
}

/// Creates a peer with an outbound queue of `capacity` items (at least 1).
pub fn peer_channel(remote: SocketAddr, capacity: usize) -> (Peer, PeerLink) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let peer = Peer(Arc::new(PeerInner {
        id: ConnId::next(),
        remote,
        tx,
        close_reason: OnceLock::new(),
        close_signal: Notify::new(),
    }));
    (peer.clone(), PeerLink { rx, peer })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    #[tokio::test]
    async fn a_full_queue_closes_the_peer_as_a_slow_consumer() {
        let (peer, mut link) = peer_channel(addr(), 2);
        assert_eq!(peer.send(Frame::text("1")), Delivery::Queued);
        assert_eq!(peer.send(Frame::text("2")), Delivery::Queued);
        assert_eq!(peer.send(Frame::text("3")), Delivery::SlowConsumer);
        assert_eq!(peer.send(Frame::text("4")), Delivery::Closed);
        assert_eq!(peer.closing().await, CloseReason::slow_consumer());
        assert!(link.try_recv().is_some());
    }

    #[tokio::test]
    async fn the_first_close_reason_wins() {
        let (peer, _link) = peer_channel(addr(), 2);
        let waiter = tokio::spawn({
            let peer = peer.clone();
            async move { peer.closing().await }
        });
        tokio::task::yield_now().await;
        peer.close(CloseReason::normal("first"));
        peer.close(CloseReason::normal("second"));
        assert_eq!(peer.closing().await.reason, "first");
        assert_eq!(waiter.await.unwrap().reason, "first");
    }

    #[test]
    fn connection_ids_are_unique() {
        assert_ne!(ConnId::next(), ConnId::next());
    }
}
