//! Responses remembered by (user, request id), so a retried request is answered, not run again.

use std::collections::{HashMap, VecDeque};

use switchboard_core::Frame;

type Key = (String, String);

/// A bounded map from (user, request id) to the encoded response, forgetting the oldest entry
/// when full (first in, first out).
#[derive(Debug)]
pub(crate) struct IdempotencyCache {
    capacity: usize,
    responses: HashMap<Key, Frame>,
    order: VecDeque<Key>,
}

impl IdempotencyCache {
    /// A cache of at most `capacity` responses (0 remembers nothing).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            responses: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The response already given to `user` for `request_id`, if remembered.
    pub(crate) fn get(&self, user: &str, request_id: &str) -> Option<Frame> {
        // Borrowed lookups on a tuple key need an owned key; ids are short (bounded by config).
        self.responses
            .get(&(user.to_owned(), request_id.to_owned()))
            .cloned()
    }

    /// Remembers `response` for (`user`, `request_id`), forgetting the oldest entry if full.
    pub(crate) fn insert(&mut self, user: &str, request_id: &str, response: Frame) {
        if self.capacity == 0 {
            return;
        }
        let key = (user.to_owned(), request_id.to_owned());
        if self.responses.insert(key.clone(), response).is_some() {
            return;
        }
        self.order.push_back(key);
        while self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.responses.remove(&oldest);
            }
        }
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
        let mut cache = IdempotencyCache::new(10);
        cache.insert("alice", "r1", Frame::text("a1"));
        cache.insert("bob", "r1", Frame::text("b1"));
        assert_eq!(cache.get("alice", "r1"), Some(Frame::text("a1")));
        assert_eq!(cache.get("bob", "r1"), Some(Frame::text("b1")));
        assert_eq!(cache.get("alice", "r2"), None);
    }

    #[test]
    fn forgets_the_oldest_when_full() {
        let mut cache = IdempotencyCache::new(2);
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
        let mut cache = IdempotencyCache::new(2);
        cache.insert("u", "1", Frame::text("old"));
        cache.insert("u", "1", Frame::text("new"));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.order.len(), 1);
        assert_eq!(cache.get("u", "1"), Some(Frame::text("new")));
    }

    #[test]
    fn zero_capacity_remembers_nothing() {
        let mut cache = IdempotencyCache::new(0);
        cache.insert("u", "1", Frame::text("1"));
        assert_eq!(cache.len(), 0);
    }
}
