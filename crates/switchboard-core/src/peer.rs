//! One connected socket as protocols see it: a bounded outbound queue and a close signal.
//!
//! The runtime owns the socket; protocols hold a [`Peer`] and push frames into it. Pushing never
//! waits: when the queue is full the peer is a slow consumer and is closed with 1008, so one
//! client that stops reading can never slow anybody else down.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Poll, Waker};

use tokio::sync::Notify;

use crate::frame::{BODY_OVERHEAD, Body};
use crate::sync::lock;
use crate::{CloseReason, Frame};

/// Queue capacity (in items) kept after a burst drains; anything larger is released so a socket
/// that once lagged does not hold a large buffer forever.
const RETAINED_QUEUE_CAPACITY: usize = 64;

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

    /// Rebuilds the id of a connection named in a message from another node (the number its
    /// node's [`ConnId::get`] gave). It names that node's connection; it reserves nothing here.
    pub fn from_raw(raw: u64) -> Self {
        Self(raw)
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
    /// One binary message (e.g. the `echo` diagnostics protocol).
    Binary(bytes::Bytes),
}

/// Bytes one queued item costs besides its payload, at most: its 8-byte queue slot and, for a
/// batch or binary item, the box behind it. A shared frame's box is paid once for all its
/// recipients, so it is charged less than this in truth; one figure keeps the bound simple.
const ITEM_OVERHEAD: usize = std::mem::size_of::<Frame>() + BODY_OVERHEAD;

impl Outgoing {
    /// What this item counts against the peer's byte budget: its payload bytes (once per
    /// recipient, even when the payload is shared) plus the queue slots it takes.
    pub fn cost(&self) -> usize {
        match self {
            Self::Frame(frame) => frame.len().saturating_add(ITEM_OVERHEAD),
            Self::Binary(data) => data.len().saturating_add(ITEM_OVERHEAD),
            Self::Batch(frames) => frames.iter().fold(ITEM_OVERHEAD, |sum, frame| {
                sum.saturating_add(frame.len())
                    .saturating_add(std::mem::size_of::<Frame>())
            }),
        }
    }

    /// The item as one queue slot: a frame as it is, anything else boxed behind a frame handle.
    fn into_slot(self) -> Frame {
        match self {
            Self::Frame(frame) => frame,
            Self::Binary(data) => Frame::boxed(Body::Binary(data)),
            Self::Batch(frames) => Frame::boxed(Body::Batch(frames)),
        }
    }

    /// The item a queue slot holds, unboxed again.
    fn from_slot(slot: Frame) -> Self {
        match slot.body() {
            Body::Text(_) => Self::Frame(slot),
            Body::Binary(_) | Body::Batch(_) => match slot.into_body() {
                Ok(Body::Binary(data)) => Self::Binary(data),
                Ok(Body::Batch(frames)) => Self::Batch(frames),
                Ok(Body::Text(text)) => Self::Frame(Frame::from(text)),
                // A boxed item has one handle, the slot's; were it shared, copy its contents.
                Err(shared) => match shared.body() {
                    Body::Binary(data) => Self::Binary(data.clone()),
                    Body::Batch(frames) => Self::Batch(frames.clone()),
                    Body::Text(_) => Self::Frame(shared),
                },
            },
        }
    }
}

/// What the runtime's end of a peer should do next.
#[derive(Debug)]
pub enum LinkEvent {
    /// Write this to the socket.
    Send(Outgoing),
    /// Somebody asked to close the peer (the protocol, or a full queue).
    Close(CloseReason),
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

/// The outbound queue. A plain deque behind a mutex rather than a channel: it allocates nothing
/// until the first frame, so an idle socket costs a few dozen bytes here instead of a
/// preallocated channel block (~1.3 KiB). Each slot is one word (an [`Outgoing`] boxed behind a
/// [`Frame`] handle unless it is a frame): a fan-out writes one slot into every recipient's
/// queue, and fewer bytes there is fewer cache lines taken from the recipient's core.
#[derive(Debug, Default)]
struct Queue {
    items: VecDeque<Frame>,
    /// Sum of [`Outgoing::cost`] over `items`.
    bytes: usize,
    /// Set when the runtime's end is gone; later pushes report `Delivery::Closed`.
    detached: bool,
    /// The runtime's end, waiting for the queue to go from empty to non-empty or for a close
    /// request. Kept under the queue's own lock rather than in an atomic waker beside it: the
    /// push that must wake it holds the lock already, and a wake-up then touches no other line.
    waiter: Option<Waker>,
}

struct PeerInner {
    id: ConnId,
    remote: SocketAddr,
    capacity: usize,
    max_bytes: usize,
    queue: Mutex<Queue>,
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

    /// Queues one binary message without waiting, under the same bounds as [`Peer::send`].
    pub fn send_binary(&self, data: bytes::Bytes) -> Delivery {
        self.push(Outgoing::Binary(data))
    }

    /// Bytes queued now (see [`Outgoing::cost`]); what a stalled reader holds on the server.
    pub fn queued_bytes(&self) -> usize {
        lock(&self.0.queue).bytes
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
        let mut queue = lock(&self.0.queue);
        if queue.detached {
            return Delivery::Closed;
        }
        let cost = item.cost();
        // One item larger than the whole byte budget still goes through into an empty queue: a
        // legitimate large frame must reach a reader that keeps up.
        let over_bytes = queue.bytes > 0 && queue.bytes.saturating_add(cost) > self.0.max_bytes;
        if queue.items.len() >= self.0.capacity || over_bytes {
            drop(queue);
            self.close(CloseReason::slow_consumer());
            return Delivery::SlowConsumer;
        }
        let was_empty = queue.items.is_empty();
        queue.bytes = queue.bytes.saturating_add(cost);
        queue.items.push_back(item.into_slot());
        let waiter = if was_empty { queue.waiter.take() } else { None };
        drop(queue);
        if let Some(waiter) = waiter {
            waiter.wake();
        }
        Delivery::Queued
    }

    /// Asks the runtime to close this connection. The first reason given wins.
    pub fn close(&self, reason: CloseReason) {
        if self.0.close_reason.set(reason).is_ok() {
            self.0.close_signal.notify_waiters();
            // The runtime's end waits for its next event; a close is one. The reason is set
            // before the lock is taken, so a waiter registered after this looks sees it.
            let waiter = lock(&self.0.queue).waiter.take();
            if let Some(waiter) = waiter {
                waiter.wake();
            }
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

/// The runtime's end of a peer: drains the queue and waits for close requests. There is exactly
/// one link per peer; dropping it detaches the queue.
#[derive(Debug)]
pub struct PeerLink {
    peer: Peer,
}

impl PeerLink {
    /// Waits for the next queued item. Always `Some`: the `Option` lets it sit in a `select!`
    /// pattern like a channel receiver.
    pub async fn recv(&mut self) -> Option<Outgoing> {
        std::future::poll_fn(|cx| {
            self.poll_next(cx.waker(), false).map(|event| match event {
                LinkEvent::Send(item) => Some(item),
                // Not asked for: `poll_next` with `false` only ever yields items.
                LinkEvent::Close(_) => None,
            })
        })
        .await
    }

    /// Waits for the next thing to do: a close request wins over queued frames. One wait serves
    /// both, so the runtime's loop registers a single waiter per idle period.
    pub async fn next_event(&mut self) -> LinkEvent {
        std::future::poll_fn(|cx| self.poll_next(cx.waker(), true)).await
    }

    /// The next item (or, with `closes`, a close request first), else registers `waker` for
    /// the next push or close, under the same lock that looked, so neither can be missed.
    fn poll_next(&mut self, waker: &Waker, closes: bool) -> Poll<LinkEvent> {
        let close = |peer: &Peer| {
            peer.close_reason()
                .filter(|_| closes)
                .map(|reason| LinkEvent::Close(reason.clone()))
        };
        if let Some(event) = close(&self.peer) {
            return Poll::Ready(event);
        }
        let mut queue = lock(&self.peer.0.queue);
        if let Some(item) = pop(&mut queue) {
            return Poll::Ready(LinkEvent::Send(item));
        }
        if !queue.waiter.as_ref().is_some_and(|w| w.will_wake(waker)) {
            queue.waiter = Some(waker.clone());
        }
        drop(queue);
        // A close requested before the registration found no waiter to wake: look again.
        match close(&self.peer) {
            Some(event) => Poll::Ready(event),
            None => Poll::Pending,
        }
    }

    /// A queued item if one is ready.
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        pop(&mut lock(&self.peer.0.queue))
    }

    /// Moves up to `max` queued items into `out` under one lock (a burst costs one lock per
    /// batch instead of one per frame).
    pub fn take_into(&mut self, out: &mut Vec<Outgoing>, max: usize) {
        let mut queue = lock(&self.peer.0.queue);
        let n = queue.items.len().min(max);
        let start = out.len();
        out.extend(queue.items.drain(..n).map(Outgoing::from_slot));
        let taken = out[start..]
            .iter()
            .fold(0usize, |sum, item| sum.saturating_add(item.cost()));
        queue.bytes = queue.bytes.saturating_sub(taken);
        if queue.items.is_empty() && queue.items.capacity() > RETAINED_QUEUE_CAPACITY {
            queue.items.shrink_to(RETAINED_QUEUE_CAPACITY);
        }
    }

    /// Drops everything still queued (used before a slow consumer's close frame).
    pub fn discard_queued(&mut self) {
        let mut queue = lock(&self.peer.0.queue);
        queue.items = VecDeque::new();
        queue.bytes = 0;
    }

    /// The peer this link drains.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        let mut queue = lock(&self.peer.0.queue);
        queue.detached = true;
        queue.items = VecDeque::new();
        queue.bytes = 0;
        queue.waiter = None;
    }
}

/// Takes the first item off `queue`, giving back a drained burst's memory.
fn pop(queue: &mut Queue) -> Option<Outgoing> {
    let item = Outgoing::from_slot(queue.items.pop_front()?);
    queue.bytes = queue.bytes.saturating_sub(item.cost());
    if queue.items.is_empty() && queue.items.capacity() > RETAINED_QUEUE_CAPACITY {
        queue.items.shrink_to(RETAINED_QUEUE_CAPACITY);
    }
    Some(item)
}

/// Creates a peer with an outbound queue of `capacity` items (at least 1) and no byte bound.
pub fn peer_channel(remote: SocketAddr, capacity: usize) -> (Peer, PeerLink) {
    peer_channel_bounded(remote, capacity, usize::MAX)
}

/// Creates a peer whose outbound queue holds at most `capacity` items (at least 1) and
/// `max_bytes` bytes ([`Outgoing::cost`]); a push over either bound closes it as a slow consumer.
/// A single item larger than `max_bytes` is accepted into an empty queue.
pub fn peer_channel_bounded(
    remote: SocketAddr,
    capacity: usize,
    max_bytes: usize,
) -> (Peer, PeerLink) {
    let peer = Peer(Arc::new(PeerInner {
        id: ConnId::next(),
        remote,
        capacity: capacity.max(1),
        max_bytes,
        queue: Mutex::new(Queue::default()),
        close_reason: OnceLock::new(),
        close_signal: Notify::new(),
    }));
    (peer.clone(), PeerLink { peer })
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

    #[test]
    fn the_byte_budget_closes_a_peer_that_holds_too_many_bytes() {
        let (peer, mut link) = peer_channel_bounded(addr(), 1000, 3 * (100 + ITEM_OVERHEAD));
        let big = Frame::text("x".repeat(100));
        for _ in 0..3 {
            assert_eq!(peer.send(big.clone()), Delivery::Queued);
        }
        assert_eq!(peer.queued_bytes(), 3 * (100 + ITEM_OVERHEAD));
        assert_eq!(peer.send(big), Delivery::SlowConsumer);
        let mut out = Vec::new();
        link.take_into(&mut out, 2);
        assert_eq!(peer.queued_bytes(), 100 + ITEM_OVERHEAD);
        assert!(link.try_recv().is_some());
        assert_eq!(peer.queued_bytes(), 0);
    }

    #[test]
    fn one_item_larger_than_the_budget_reaches_an_empty_queue() {
        let (peer, _link) = peer_channel_bounded(addr(), 10, 10);
        assert!(peer.send(Frame::text("x".repeat(100))).is_queued());
        assert_eq!(peer.send(Frame::text("y")), Delivery::SlowConsumer);
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

    #[tokio::test]
    async fn recv_wakes_on_a_push_from_another_task() {
        let (peer, mut link) = peer_channel(addr(), 4);
        let pusher = tokio::spawn(async move {
            tokio::task::yield_now().await;
            peer.send(Frame::text("late"))
        });
        let item = tokio::time::timeout(std::time::Duration::from_secs(5), link.recv()).await;
        assert!(matches!(item, Ok(Some(Outgoing::Frame(f))) if f.as_str() == "late"));
        assert_eq!(pusher.await.unwrap(), Delivery::Queued);
    }

    #[test]
    fn a_dropped_link_refuses_frames_and_a_drained_burst_gives_memory_back() {
        let (peer, mut link) = peer_channel(addr(), 1000);
        for _ in 0..500 {
            assert!(peer.send(Frame::text("x")).is_queued());
        }
        while link.try_recv().is_some() {}
        assert!(lock(&peer.0.queue).items.capacity() <= RETAINED_QUEUE_CAPACITY);
        drop(link);
        assert_eq!(peer.send(Frame::text("y")), Delivery::Closed);
    }

    #[tokio::test]
    async fn a_close_request_wakes_the_link_ahead_of_queued_frames() {
        let (peer, mut link) = peer_channel(addr(), 4);
        assert!(peer.send(Frame::text("queued")).is_queued());
        assert!(matches!(link.next_event().await, LinkEvent::Send(_)));
        let closer = tokio::spawn({
            let peer = peer.clone();
            async move {
                tokio::task::yield_now().await;
                peer.close(CloseReason::normal("bye"));
            }
        });
        let event =
            tokio::time::timeout(std::time::Duration::from_secs(5), link.next_event()).await;
        assert!(matches!(event, Ok(LinkEvent::Close(r)) if r.reason == "bye"));
        closer.await.unwrap();
    }

    #[test]
    fn connection_ids_are_unique() {
        assert_ne!(ConnId::next(), ConnId::next());
    }
}
