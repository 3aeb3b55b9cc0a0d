//! Responses remembered by (user, request id), so a retried request is answered, not run again.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use switchboard_core::{Frame, MemoryBudget};

use crate::cost::CACHE_OVERHEAD;

type Key = (String, String);

/// Bytes charged for one remembered response (the key is held twice: map and FIFO).
fn entry_bytes(user: &str, request_id: &str, response: &Frame) -> usize {
    CACHE_OVERHEAD
        .saturating_add(
            user.len()
                .saturating_add(request_id.len())
                .saturating_mul(2),
        )
        .saturating_add(response.as_str().len())
}

/// A bounded map from (user, request id) to the encoded response, forgetting the oldest entry
/// when full in items or bytes (first in, first out), charged to the protocol's budget.
#[derive(Debug)]
pub(crate) struct IdempotencyCache {
    capacity: usize,
    capacity_bytes: usize,
    bytes: usize,
    budget: Arc<MemoryBudget>,
    responses: HashMap<Key, Frame>,
    order: VecDeque<Key>,
}

impl IdempotencyCache {
    /// A cache of at most `capacity` responses (0 remembers nothing) and `capacity_bytes`.
    pub(crate) fn new(capacity: usize, capacity_bytes: usize, budget: Arc<MemoryBudget>) -> Self {
        Self {
            capacity,
            capacity_bytes,
            bytes: 0,
            budget,
            responses: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Bytes charged for the remembered responses.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    fn evict_oldest(&mut self) -> bool {
        let Some((user, id)) = self.order.pop_front() else {
            return false;
        };
        if let Some(frame) = self.responses.remove(&(user.clone(), id.clone())) {
            let bytes = entry_bytes(&user, &id, &frame);
            self.bytes = self.bytes.saturating_sub(bytes);
            self.budget.release(bytes);
        }
        true
    }

    /// The response already given to `user` for `request_id`, if remembered.
    pub(crate) fn get(&self, user: &str, request_id: &str) -> Option<Frame> {
        // Borrowed lookups on a tuple key need an owned key; ids are short (bounded by config).
        self.responses
            .get(&(user.to_owned(), request_id.to_owned()))
            .cloned()
    }

    /// Remembers `response` for (`user`, `request_id`), forgetting the oldest entries while
    /// over the item or byte limit. When the protocol's budget has no room even with the cache
    /// empty, the response is not remembered (a retry runs the request again).
    pub(crate) fn insert(&mut self, user: &str, request_id: &str, response: Frame) {
        let bytes = entry_bytes(user, request_id, &response);
        if self.capacity == 0 || bytes > self.capacity_bytes {
            return;
        }
        let key = (user.to_owned(), request_id.to_owned());
        if let Some(old) = self.responses.remove(&key) {
            // Replaced: give back the old charge; the entry moves to the back of the FIFO.
            let old_bytes = entry_bytes(user, request_id, &old);
            self.bytes = self.bytes.saturating_sub(old_bytes);
            self.budget.release(old_bytes);
            self.order.retain(|k| k != &key);
        }
        while self.order.len() >= self.capacity
            || self.bytes.saturating_add(bytes) > self.capacity_bytes
        {
            if !self.evict_oldest() {
                break;
            }
        }
        // The cache is the one pool that gives memory back under pressure: its entries are
        // only a convenience for retries, unlike outboxes or users.
        while self.budget.try_reserve(bytes).is_err() {
            if !self.evict_oldest() {
                return;
            }
        }
        self.bytes = self.bytes.saturating_add(bytes);
        self.responses.insert(key.clone(), response);
        self.order.push_back(key);
    }

    /// Number of remembered responses.
    pub(crate) fn len(&self) -> usize {
        self.responses.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_per_user_and_request_id() {
        let mut cache = IdempotencyCache::new(10, usize::MAX, Arc::default());
        cache.insert("alice", "r1", Frame::text("a1"));
        cache.insert("bob", "r1", Frame::text("b1"));
        assert_eq!(cache.get("alice", "r1"), Some(Frame::text("a1")));
        assert_eq!(cache.get("bob", "r1"), Some(Frame::text("b1")));
        assert_eq!(cache.get("alice", "r2"), None);
    }

    #[test]
    fn forgets_the_oldest_when_full() {
        let mut cache = IdempotencyCache::new(2, usize::MAX, Arc::default());
        cache.insert("u", "1", Frame::text("1"));
        cache.insert("u", "2", Frame::text("2"));
        cache.insert("u", "3", Frame::text("3"));
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get("u", "1"), None);
        assert!(cache.get("u", "2").is_some());
        assert!(cache.get("u", "3").is_some());
    }

    #[test]
    fn reinserting_a_key_does_not_grow_the_cache() {
        let mut cache = IdempotencyCache::new(2, usize::MAX, Arc::default());
        cache.insert("u", "1", Frame::text("old"));
        cache.insert("u", "1", Frame::text("new"));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.order.len(), 1);
        assert_eq!(cache.get("u", "1"), Some(Frame::text("new")));
    }

    #[test]
    fn the_cache_is_bounded_in_bytes_and_yields_to_the_budget() {
        let one = entry_bytes("u", "1", &Frame::text("x"));
        let budget = Arc::new(MemoryBudget::new(3 * one));
        let mut cache = IdempotencyCache::new(100, 2 * one, budget.clone());
        for id in ["1", "2", "3"] {
            cache.insert("u", id, Frame::text("x"));
        }
        assert_eq!(cache.len(), 2, "the byte limit forgot the oldest");
        assert_eq!(budget.used(), 2 * one);
        // Someone else takes most of the budget: the cache gives its entries back.
        budget.force_reserve(one);
        cache.insert("u", "4", Frame::text("x"));
        assert_eq!(budget.used(), 3 * one);
        assert_eq!(cache.len(), 2);
        assert!(cache.get("u", "4").is_some());
    }

    #[test]
    fn zero_capacity_remembers_nothing() {
        let mut cache = IdempotencyCache::new(0, usize::MAX, Arc::default());
        cache.insert("u", "1", Frame::text("1"));
        assert_eq!(cache.len(), 0);
    }
}
