//! This node's view of the history log: which message sits at which offset, what it weighs,
//! and the reactions this node knows of. A pure cache, rebuilt from the log whenever it cannot
//! be continued; the log in the engine is the truth.
//!
//! It answers two questions without reading the whole log: "at which offset is message `id`?"
//! (an `add_reaction` names a message by id, the log by offset) and "how many bytes would the
//! history hold after this append?" (the state budget). It mirrors the log by applying the
//! log's own retention (the newest `H` entries within the byte cap, oldest dropped first) to
//! every entry it learns of, in offset order, so on one node it is exact.

use std::collections::VecDeque;

use switchboard_core::engine::{Entry, NodeId, Position};
use uuid::Uuid;

use crate::messages::message_frame_id;

/// One history entry as this node knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ViewEntry {
    /// Its offset in the log.
    pub(crate) offset: u64,
    /// The message id.
    pub(crate) id: Uuid,
    /// The length of its `message` frame.
    pub(crate) frame_bytes: usize,
    /// The bytes of its reaction record (key and value), as last seen by this node.
    pub(crate) reaction_bytes: usize,
}

/// The view; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct RoomView {
    /// The node whose engine this mirrors (a protocol value served by another engine starts
    /// over).
    node: Option<NodeId>,
    /// Whether `epoch`/`top` describe a read of the log.
    synced: bool,
    epoch: u64,
    /// The newest offset applied.
    top: u64,
    entries: VecDeque<ViewEntry>,
    frame_bytes: usize,
    reaction_bytes: usize,
    /// Reaction records of messages that left the history, not yet deleted from the engine.
    stale_reaction_bytes: usize,
}

/// Where to read the log from to bring a view up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Continue {
    /// Read the newest entries and rebuild.
    Rebuild,
    /// Read what follows this position.
    After(Position),
}

impl RoomView {
    /// How to bring the view up to date for the engine of `node`.
    pub(crate) fn continue_from(&mut self, node: NodeId) -> Continue {
        if self.node != Some(node) {
            *self = Self {
                node: Some(node),
                ..Self::default()
            };
        }
        if self.synced {
            Continue::After(Position {
                offset: self.top,
                epoch: self.epoch,
            })
        } else {
            Continue::Rebuild
        }
    }

    /// Forgets where the view stands (the log could not be continued), keeping nothing.
    pub(crate) fn reset(&mut self) {
        self.synced = false;
    }

    /// Rebuilds from a read of the newest entries (at most the history's item bound, i.e. the
    /// whole retained log). Reaction sizes already known for surviving entries are kept. A read
    /// older than what the view already holds is ignored.
    pub(crate) fn rebuild(&mut self, node: NodeId, entries: &[Entry], top: Position) {
        if self.node != Some(node) {
            self.node = Some(node);
            self.synced = false;
            self.entries.clear();
            self.stale_reaction_bytes = 0;
        }
        if self.synced && self.epoch == top.epoch && self.top > top.offset {
            return;
        }
        let same_epoch = self.synced && self.epoch == top.epoch;
        let old = std::mem::take(&mut self.entries);
        let mut known = old.iter().peekable();
        let mut rebuilt = VecDeque::with_capacity(entries.len());
        for entry in entries {
            let Some(id) = message_frame_id(entry.frame.as_str()) else {
                continue;
            };
            while known.next_if(|k| k.offset < entry.offset).is_some() {}
            let reaction_bytes = match known.peek() {
                Some(k) if same_epoch && k.offset == entry.offset && k.id == id => k.reaction_bytes,
                _ => 0,
            };
            rebuilt.push_back(ViewEntry {
                offset: entry.offset,
                id,
                frame_bytes: entry.frame.len(),
                reaction_bytes,
            });
        }
        let surviving: usize = rebuilt.iter().map(|e| e.reaction_bytes).sum();
        let dropped = self.reaction_bytes.saturating_sub(surviving);
        self.stale_reaction_bytes = self.stale_reaction_bytes.saturating_add(dropped);
        self.entries = rebuilt;
        self.frame_bytes = self.entries.iter().map(|e| e.frame_bytes).sum();
        self.reaction_bytes = surviving;
        self.epoch = top.epoch;
        self.top = top.offset;
        self.synced = true;
    }

    /// Applies a continuation read (entries after the view's top). Returns whether the view is
    /// now at the log's top; if not, more entries follow and the caller reads again.
    pub(crate) fn extend(
        &mut self,
        entries: &[Entry],
        top: Position,
        max_items: usize,
        max_bytes: usize,
    ) -> bool {
        if !self.synced || !self.continues(top.epoch) {
            self.synced = false;
            return false;
        }
        self.epoch = top.epoch;
        for entry in entries {
            if entry.offset <= self.top {
                continue;
            }
            if let Some(id) = message_frame_id(entry.frame.as_str()) {
                self.push(entry.offset, id, entry.frame.len(), max_items, max_bytes);
            }
            self.top = entry.offset;
        }
        if entries.is_empty() || self.top >= top.offset {
            self.top = self.top.max(top.offset);
            true
        } else {
            false
        }
    }

    /// Applies this node's own append of message `id` (a frame of `frame_bytes`) at `at`, if it
    /// directly follows what the view holds; otherwise the next catch-up reads it.
    pub(crate) fn appended(
        &mut self,
        node: NodeId,
        at: Position,
        id: Uuid,
        frame_bytes: usize,
        max_items: usize,
        max_bytes: usize,
    ) {
        if self.node == Some(node)
            && self.synced
            && self.continues(at.epoch)
            && self.top.checked_add(1) == Some(at.offset)
        {
            self.epoch = at.epoch;
            self.push(at.offset, id, frame_bytes, max_items, max_bytes);
            self.top = at.offset;
        }
    }

    /// Whether entries of `epoch` continue the view: the same epoch, or a view of a log that
    /// was never written (its first append starts the epoch).
    fn continues(&self, epoch: u64) -> bool {
        self.epoch == epoch || (self.top == 0 && self.entries.is_empty())
    }

    /// Adds one entry and drops the oldest as the log's retention does.
    fn push(
        &mut self,
        offset: u64,
        id: Uuid,
        frame_bytes: usize,
        max_items: usize,
        max_bytes: usize,
    ) {
        self.trim_for(frame_bytes, max_items, max_bytes);
        self.entries.push_back(ViewEntry {
            offset,
            id,
            frame_bytes,
            reaction_bytes: 0,
        });
        self.frame_bytes = self.frame_bytes.saturating_add(frame_bytes);
    }

    /// Drops the oldest entries until one of `frame_bytes` fits, exactly as the log's
    /// `TrimOldest` retention does before an append.
    fn trim_for(&mut self, frame_bytes: usize, max_items: usize, max_bytes: usize) {
        while self.entries.len() >= max_items
            || self.frame_bytes.saturating_add(frame_bytes) > max_bytes
        {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.frame_bytes = self.frame_bytes.saturating_sub(old.frame_bytes);
            self.reaction_bytes = self.reaction_bytes.saturating_sub(old.reaction_bytes);
            self.stale_reaction_bytes =
                self.stale_reaction_bytes.saturating_add(old.reaction_bytes);
        }
    }

    /// The bytes the history would hold (frames, and the reactions this node knows of) right
    /// after appending a frame of `frame_bytes`. Reaction records of trimmed messages still
    /// count: they are stored until the next prune.
    pub(crate) fn bytes_after_append(
        &self,
        frame_bytes: usize,
        max_items: usize,
        max_bytes: usize,
    ) -> usize {
        let mut frames = self.frame_bytes;
        let mut len = self.entries.len();
        for old in &self.entries {
            if len < max_items && frames.saturating_add(frame_bytes) <= max_bytes {
                break;
            }
            frames = frames.saturating_sub(old.frame_bytes);
            len = len.saturating_sub(1);
        }
        frames
            .saturating_add(frame_bytes)
            .saturating_add(self.reaction_bytes)
            .saturating_add(self.stale_reaction_bytes)
    }

    /// The bytes the history holds as this node knows it (frames, reactions, stale records).
    pub(crate) fn state_bytes(&self) -> usize {
        self.frame_bytes
            .saturating_add(self.reaction_bytes)
            .saturating_add(self.stale_reaction_bytes)
    }

    /// The offset of message `id`, if the view holds it.
    pub(crate) fn offset_of(&self, id: Uuid) -> Option<(u64, u64)> {
        if !self.synced {
            return None;
        }
        self.entries
            .iter()
            .rev()
            .find(|e| e.id == id)
            .map(|e| (e.offset, self.epoch))
    }

    /// Records that the reaction record of the message at `offset` now weighs `bytes`.
    pub(crate) fn set_reaction_bytes(&mut self, epoch: u64, offset: u64, bytes: usize) {
        if !self.synced || epoch != self.epoch {
            return;
        }
        let Ok(index) = self.entries.binary_search_by_key(&offset, |e| e.offset) else {
            return;
        };
        if let Some(entry) = self.entries.get_mut(index) {
            self.reaction_bytes = self
                .reaction_bytes
                .saturating_sub(entry.reaction_bytes)
                .saturating_add(bytes);
            entry.reaction_bytes = bytes;
        }
    }

    /// Whether records of messages that left the history may still be stored.
    pub(crate) fn has_stale_records(&self) -> bool {
        self.stale_reaction_bytes > 0
    }

    /// Stale records were deleted.
    pub(crate) fn pruned(&mut self) {
        self.stale_reaction_bytes = 0;
    }

    /// Entries held (for the memory accounting).
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Slots the deque holds, used or spare (for the memory accounting).
    pub(crate) fn capacity(&self) -> usize {
        self.entries.capacity()
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        reason = "tests fail by panicking"
    )]

    use switchboard_core::Engine;
    use switchboard_core::engine::{Append, Appended, MemoryLimits, Read, ReadFrom, Retention};

    use super::*;
    use crate::messages::{ChatMessage, message_frame};

    const TOPIC: &str = "log";

    fn frame(n: u128, text_len: usize) -> (Uuid, switchboard_core::Frame) {
        let message = ChatMessage {
            id: Uuid::from_u128(n),
            text: "x".repeat(text_len),
            author_id: "a".into(),
            author_name: "b".into(),
            created_at: 0,
            reactions: Default::default(),
        };
        (message.id, message_frame(&message).unwrap())
    }

    async fn log(engine: &Engine, limit: usize) -> (Vec<u64>, usize, Position) {
        match engine
            .read(TOPIC, ReadFrom::Latest(limit), limit)
            .await
            .unwrap()
        {
            Read::Entries { entries, top } => (
                entries.iter().map(|e| e.offset).collect(),
                entries.iter().map(|e| e.frame.len()).sum(),
                top,
            ),
            Read::Gone { .. } => unreachable!(),
        }
    }

    fn offsets(view: &RoomView) -> Vec<u64> {
        view.entries.iter().map(|e| e.offset).collect()
    }

    /// The view applies the log's retention (items and bytes, oldest first) exactly, whether
    /// it learns of entries from its own appends or from continuation reads, and predicts what
    /// an append would leave.
    #[tokio::test]
    async fn the_view_mirrors_the_logs_retention() {
        let engine = Engine::memory(MemoryLimits::default());
        let (limit, cap) = (5, 900);
        let retention = Retention::trim(limit, cap);
        let node = engine.node();
        let mut own = RoomView::default();
        let mut follower = RoomView::default();
        assert_eq!(own.continue_from(node), Continue::Rebuild);
        let (_, _, top) = log(&engine, limit).await;
        own.rebuild(node, &[], top);
        for n in 0..40u128 {
            let (id, frame) = frame(n, (n as usize * 37) % 300);
            let predicted = own.bytes_after_append(frame.len(), limit, cap);
            let len = frame.len();
            let Appended::Done(at) = engine
                .append(TOPIC, frame, Append::store(retention))
                .await
                .unwrap()
            else {
                unreachable!()
            };
            own.appended(node, at, id, len, limit, cap);
            let (in_log, bytes, _) = log(&engine, limit).await;
            assert_eq!(offsets(&own), in_log, "after {n}");
            assert_eq!(own.state_bytes(), bytes);
            assert_eq!(predicted, bytes);
            assert_eq!(own.offset_of(id), Some((at.offset, at.epoch)));
            // Another node catches up every third append.
            if n % 3 == 2 {
                // As `IpChat::sync_view` does: continue, or rebuild when the log moved on.
                for _ in 0..3 {
                    match follower.continue_from(node) {
                        Continue::Rebuild => {
                            let read = engine
                                .read(TOPIC, ReadFrom::Latest(limit), limit)
                                .await
                                .unwrap();
                            let Read::Entries { entries, top } = read else {
                                unreachable!()
                            };
                            follower.rebuild(node, &entries, top);
                            break;
                        }
                        Continue::After(position) => match engine
                            .read(TOPIC, ReadFrom::After(position), limit)
                            .await
                            .unwrap()
                        {
                            Read::Entries { entries, top } => {
                                if follower.extend(&entries, top, limit, cap) {
                                    break;
                                }
                                follower.reset();
                            }
                            Read::Gone { .. } => follower.reset(),
                        },
                    }
                }
                assert_eq!(offsets(&follower), in_log, "follower after {n}");
            }
        }
        assert!(own.capacity() <= 2 * limit);
    }

    /// Reaction bytes follow their message: kept over a rebuild, counted as stale once the
    /// message is trimmed, cleared by a prune.
    #[test]
    fn reaction_bytes_follow_their_message() {
        let node = NodeId::random();
        let mut view = RoomView::default();
        let top = Position {
            offset: 0,
            epoch: 1,
        };
        view.rebuild(node, &[], top);
        let at = |offset| Position { offset, epoch: 1 };
        view.appended(node, at(1), Uuid::from_u128(1), 100, 2, 10_000);
        view.appended(node, at(2), Uuid::from_u128(2), 100, 2, 10_000);
        view.set_reaction_bytes(1, 1, 50);
        assert_eq!(view.state_bytes(), 250);
        view.appended(node, at(3), Uuid::from_u128(3), 100, 2, 10_000);
        assert!(view.has_stale_records());
        assert_eq!(view.state_bytes(), 250, "the record is stored until pruned");
        view.pruned();
        assert_eq!(view.state_bytes(), 200);
        assert_eq!(view.offset_of(Uuid::from_u128(1)), None);
        // Another engine starts over.
        assert_eq!(view.continue_from(NodeId::random()), Continue::Rebuild);
        assert_eq!(view.offset_of(Uuid::from_u128(3)), None);
    }
}
