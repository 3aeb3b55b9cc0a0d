//! Bounded message history.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::sync::lock;

/// A bounded, ordered log of items, oldest first. When full, the oldest item is dropped.
///
/// Object-safe so a protocol can hold an `Arc<dyn History<T>>` and an embedder can swap in a
/// shared backend.
pub trait History<T>: Send + Sync {
    /// Appends `item`; returns the item evicted to stay within the limit, if any.
    fn push(&self, item: T) -> Option<T>;
    /// A copy of every item, oldest first.
    fn snapshot(&self) -> Vec<T>;
    /// Applies `change` to the newest item matching `find` and returns a copy of it afterwards.
    fn update(&self, find: &dyn Fn(&T) -> bool, change: &mut dyn FnMut(&mut T)) -> Option<T>;
    /// Number of items held.
    fn len(&self) -> usize;
    /// Whether the history is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The most items ever held.
    fn limit(&self) -> usize;
}

/// The in-memory [`History`]: the embedded default.
#[derive(Debug)]
pub struct MemoryHistory<T> {
    limit: usize,
    items: Mutex<VecDeque<T>>,
}

impl<T> MemoryHistory<T> {
    /// A history holding at most `limit` items (0 keeps nothing).
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            items: Mutex::new(VecDeque::new()),
        }
    }
}

impl<T: Clone + Send> History<T> for MemoryHistory<T> {
    fn push(&self, item: T) -> Option<T> {
        if self.limit == 0 {
            return Some(item);
        }
        let mut items = lock(&self.items);
        let evicted = if items.len() >= self.limit {
            items.pop_front()
        } else {
            None
        };
        items.push_back(item);
        evicted
    }

    fn snapshot(&self) -> Vec<T> {
        lock(&self.items).iter().cloned().collect()
    }

    fn update(&self, find: &dyn Fn(&T) -> bool, change: &mut dyn FnMut(&mut T)) -> Option<T> {
        let mut items = lock(&self.items);
        let item = items.iter_mut().rev().find(|item| find(item))?;
        change(item);
        Some(item.clone())
    }

    fn len(&self) -> usize {
        lock(&self.items).len()
    }

    fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_oldest_when_full() {
        let history = MemoryHistory::new(2);
        assert_eq!(history.push(1), None);
        assert_eq!(history.push(2), None);
        assert_eq!(history.push(3), Some(1));
        assert_eq!(history.snapshot(), [2, 3]);
    }

    #[test]
    fn updates_in_place() {
        let history = MemoryHistory::new(5);
        history.push(1);
        history.push(2);
        assert_eq!(history.update(&|x| *x == 2, &mut |x| *x = 20), Some(20));
        assert_eq!(history.update(&|x| *x == 9, &mut |x| *x = 0), None);
        assert_eq!(history.snapshot(), [1, 20]);
    }
}
