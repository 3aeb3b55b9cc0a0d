//! The node-local half of publish/subscribe: which sockets of this node subscribe to which topic.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::OnceCell;

use crate::sync::{lock, read, write};
use crate::{CloseReason, ConnId, Frame, Peer};

use super::{ConnRef, EngineResult, NodeId};

/// Publications held for one joining subscriber, at most this many...
const MAX_HELD_ITEMS: usize = 4096;
/// ...and this many bytes; beyond either the subscriber is closed as a slow consumer.
const MAX_HELD_BYTES: usize = 4 * 1024 * 1024;

/// Publications held for a joining subscriber until its replay is queued.
#[derive(Debug)]
struct Held {
    peer: Peer,
    frames: VecDeque<(Option<u64>, Frame)>,
    bytes: usize,
}

/// A subscriber that receives publications as they come.
#[derive(Debug)]
struct Live {
    peer: Peer,
    /// The offset its replay reached (0: none). An engine whose deliveries travel (over a
    /// network) may still bring entries up to it after the subscriber went live; those are
    /// skipped. Cleared by the first entry beyond it: after that, a lower offset belongs to a
    /// recreated log and is delivered.
    floor: AtomicU64,
}

impl Live {
    fn new(peer: Peer, floor: u64) -> Self {
        Self {
            peer,
            floor: AtomicU64::new(floor),
        }
    }

    /// Whether the entry at `offset` is new to this subscriber.
    fn wants(&self, offset: Option<u64>) -> bool {
        let Some(offset) = offset else {
            return true;
        };
        let floor = self.floor.load(Ordering::Relaxed);
        if floor == 0 {
            return true;
        }
        if offset <= floor {
            return false;
        }
        self.floor.store(0, Ordering::Relaxed);
        true
    }
}

#[derive(Debug, Default)]
struct Topic {
    /// Subscribers that receive publications as they come: the fan-out's hot path reads these
    /// under the hub's read lock and touches nothing else.
    live: HashMap<ConnId, Live>,
    /// Subscribers still joining (rare, short-lived).
    held: Mutex<HashMap<ConnId, Held>>,
    /// Set once the engine brings this topic's publications to the node.
    ready: Arc<OnceCell<()>>,
}

/// One node's subscribers, and the fan-out of every publication the engine brings to the node.
///
/// Delivery is synchronous and never waits on a peer: it pushes one shared [`Frame`] into each
/// subscriber's bounded queue ([`Peer::send`]), so a slow reader is closed rather than slowing
/// the topic down. The engine calls [`Hub::deliver`] for each topic in order.
#[derive(Debug)]
pub struct Hub {
    node: NodeId,
    topics: RwLock<HashMap<Box<str>, Topic>>,
}

impl Hub {
    /// An empty hub for `node`.
    pub fn new(node: NodeId) -> Arc<Self> {
        Arc::new(Self {
            node,
            topics: RwLock::new(HashMap::new()),
        })
    }

    /// The node this hub serves.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// Delivers one publication of `topic` to this node's subscribers. `except` (e.g. the
    /// author) gets `reply` instead, at the same place in the topic's order, or nothing when
    /// there is no reply. `offset` is the entry's log offset for logged topics. Returns how many
    /// live subscribers it was queued for.
    pub fn deliver(
        &self,
        topic: &str,
        offset: Option<u64>,
        frame: &Frame,
        except: Option<ConnRef>,
        reply: Option<&Frame>,
    ) -> usize {
        let except = except.filter(|c| c.node == self.node).map(|c| c.conn);
        let frame_for = |id: ConnId| -> Option<&Frame> {
            if Some(id) == except {
                reply
            } else {
                Some(frame)
            }
        };
        let topics = read(&self.topics);
        let Some(entry) = topics.get(topic) else {
            return 0;
        };
        let delivered = entry
            .live
            .iter()
            .filter_map(|(id, live)| frame_for(*id).map(|frame| (live, frame)))
            .filter(|(live, frame)| {
                live.wants(offset) && live.peer.send((*frame).clone()).is_queued()
            })
            .count();
        let mut held = lock(&entry.held);
        for (id, joining) in held.iter_mut() {
            let Some(frame) = frame_for(*id) else {
                continue;
            };
            joining.bytes = joining.bytes.saturating_add(frame.len());
            if joining.frames.len() >= MAX_HELD_ITEMS || joining.bytes > MAX_HELD_BYTES {
                joining.peer.close(CloseReason::slow_consumer());
                joining.frames.clear();
            } else {
                joining.frames.push_back((offset, frame.clone()));
            }
        }
        delivered
    }

    /// Adds `peer` to `topic`, live at once or holding publications until [`Hub::go_live`].
    /// Returns the cell that says whether the node is subscribed to the topic.
    pub(crate) fn add(&self, topic: &str, peer: &Peer, held: bool) -> Arc<OnceCell<()>> {
        let mut topics = write(&self.topics);
        let entry = match topics.get_mut(topic) {
            Some(entry) => entry,
            None => topics.entry(topic.into()).or_default(),
        };
        if held {
            entry.live.remove(&peer.id());
            lock(&entry.held).insert(
                peer.id(),
                Held {
                    peer: peer.clone(),
                    frames: VecDeque::new(),
                    bytes: 0,
                },
            );
        } else {
            entry.live.insert(peer.id(), Live::new(peer.clone(), 0));
        }
        entry.ready.clone()
    }

    /// Queues `replay` for the held subscriber `conn` of `topic`, then what was held for it
    /// with an offset after `replayed_to` (or no offset), and makes it live. Nothing is lost or
    /// doubled between the replay and live delivery.
    pub(crate) fn go_live(&self, topic: &str, conn: ConnId, replay: Vec<Frame>, replayed_to: u64) {
        // The write lock keeps deliveries out while the catch-up is queued, so the next
        // publication lands after it.
        let mut topics = write(&self.topics);
        let Some(entry) = topics.get_mut(topic) else {
            return;
        };
        let Some(joining) = lock(&entry.held).remove(&conn) else {
            return;
        };
        let mut frames = replay;
        frames.extend(
            joining
                .frames
                .into_iter()
                .filter(|(offset, _)| offset.is_none_or(|offset| offset > replayed_to))
                .map(|(_, frame)| frame),
        );
        // One queue slot for the whole catch-up, in order.
        let _ = joining.peer.send_batch(frames);
        entry
            .live
            .insert(conn, Live::new(joining.peer, replayed_to));
    }

    /// Removes `conn` from `topic`; returns `true` if it was the node's last subscriber there.
    pub(crate) fn remove(&self, topic: &str, conn: ConnId) -> bool {
        let mut topics = write(&self.topics);
        let Some(entry) = topics.get_mut(topic) else {
            return false;
        };
        let was_live = entry.live.remove(&conn).is_some();
        let held = lock(&entry.held);
        let was_held = held.contains_key(&conn);
        let empty = entry.live.is_empty() && held.len() <= usize::from(was_held);
        drop(held);
        if was_held {
            lock(&entry.held).remove(&conn);
        }
        if !(was_live || was_held) {
            return false;
        }
        if empty {
            topics.remove(topic);
        }
        empty
    }

    /// How many of this node's connections subscribe to `topic` (live or joining).
    pub fn local_subscribers(&self, topic: &str) -> usize {
        read(&self.topics).get(topic).map_or(0, |entry| {
            entry.live.len().saturating_add(lock(&entry.held).len())
        })
    }

    /// The topics this node subscribes to (for an engine that must re-subscribe after a
    /// reconnect).
    pub fn topics(&self) -> Vec<String> {
        read(&self.topics).keys().map(|t| t.to_string()).collect()
    }

    /// Marks every topic as needing a fresh node subscription (after the engine lost them).
    pub fn reset_subscriptions(&self) {
        for entry in write(&self.topics).values_mut() {
            entry.ready = Arc::new(OnceCell::new());
        }
    }
}

/// Ensures the node is subscribed to a topic once, however many sockets join at the same time.
pub(crate) async fn ensure_ready<F, Fut>(cell: &OnceCell<()>, subscribe: F) -> EngineResult<()>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = EngineResult<()>>,
{
    cell.get_or_try_init(subscribe).await.map(|_| ())
}
