//! The node-local bounds of remembered responses (sans-IO).
//!
//! The responses themselves are idempotency records in the state engine (`Engine::remember`,
//! read back by `Engine::recall` on any node). This index remembers which records this node
//! wrote, for which client, and their size, so that one client cannot fill the engine with
//! responses: over its share, or over the node's item or byte limit, the oldest records this
//! node wrote are returned for deletion from the engine.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use switchboard_core::{ClientKey, MemoryBudget};

use crate::cost::{CACHE_OVERHEAD, Share};

/// (user, request id).
pub(crate) type Key = (String, String);

/// Bytes charged for one remembered response of `response_len` bytes (the key is held three
/// times here: the map, the global FIFO and the client's FIFO; the response is in the engine).
pub(crate) fn entry_bytes(user: &str, request_id: &str, response_len: usize) -> usize {
    CACHE_OVERHEAD
        .saturating_add(
            user.len()
                .saturating_add(request_id.len())
                .saturating_mul(3),
        )
        .saturating_add(response_len)
}

#[derive(Debug)]
struct Entry {
    client: ClientKey,
    /// Insertion number: tells a FIFO slot of this entry from a stale slot of an older one.
    seq: u64,
    bytes: usize,
}

/// One client's remembered responses, oldest first.
#[derive(Debug, Default)]
struct ClientShare {
    keys: VecDeque<(u64, Key)>,
    /// Live entries and their bytes (`keys` may hold stale slots).
    count: usize,
    bytes: usize,
}

/// A bounded index of (user, request id) records, forgetting the oldest entry when full in items
/// or bytes (first in, first out), charged to the protocol's budget. Each client (the address
/// the request came from) has a share; a client over its share forgets its own oldest
/// responses, so one client's flood cannot push out everybody else's. Forgotten entries are
/// returned to the caller, which deletes their records from the engine.
#[derive(Debug)]
pub(crate) struct IdempotencyCache {
    capacity: usize,
    capacity_bytes: usize,
    share: Share,
    bytes: usize,
    budget: Arc<MemoryBudget>,
    responses: HashMap<Key, Entry>,
    /// Every insertion, oldest first; slots whose entry is gone or newer are stale and skipped.
    order: VecDeque<(u64, Key)>,
    clients: HashMap<ClientKey, ClientShare>,
    next_seq: u64,
    /// Entries forgotten by the current insertion (returned by it).
    forgotten: Vec<Key>,
}

impl IdempotencyCache {
    /// A cache of at most `capacity` responses (0 remembers nothing) and `capacity_bytes`, each
    /// client holding at most `share`.
    pub(crate) fn new(
        capacity: usize,
        capacity_bytes: usize,
        share: Share,
        budget: Arc<MemoryBudget>,
    ) -> Self {
        Self {
            capacity,
            capacity_bytes,
            share,
            bytes: 0,
            budget,
            responses: HashMap::new(),
            order: VecDeque::new(),
            clients: HashMap::new(),
            next_seq: 0,
            forgotten: Vec::new(),
        }
    }

    /// Bytes charged for the remembered responses.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Removes the entry under `key` if it is the one inserted as `seq`; gives back its charge.
    fn remove(&mut self, key: &Key, seq: u64) -> bool {
        let removed = self.remove_quietly(key, seq);
        if removed {
            self.forgotten.push(key.clone());
        }
        removed
    }

    fn remove_quietly(&mut self, key: &Key, seq: u64) -> bool {
        if self.responses.get(key).is_none_or(|e| e.seq != seq) {
            return false;
        }
        let Some(entry) = self.responses.remove(key) else {
            return false;
        };
        self.bytes = self.bytes.saturating_sub(entry.bytes);
        self.budget.release(entry.bytes);
        if let Some(share) = self.clients.get_mut(&entry.client) {
            share.count = share.count.saturating_sub(1);
            share.bytes = share.bytes.saturating_sub(entry.bytes);
            if share.count == 0 {
                self.clients.remove(&entry.client);
            }
        }
        true
    }

    /// Forgets the oldest live entry of the whole cache; `false` if there is none.
    fn evict_oldest(&mut self) -> bool {
        while let Some((seq, key)) = self.order.pop_front() {
            if self.remove(&key, seq) {
                return true;
            }
        }
        false
    }

    /// Forgets `client`'s oldest live entry; `false` if it has none.
    fn evict_oldest_of(&mut self, client: ClientKey) -> bool {
        loop {
            let Some((seq, key)) = self
                .clients
                .get_mut(&client)
                .and_then(|share| share.keys.pop_front())
            else {
                return false;
            };
            if self.remove(&key, seq) {
                return true;
            }
        }
    }

    /// Drops stale FIFO slots once they outnumber the live entries, so the FIFOs stay bounded
    /// by the number of live entries.
    fn compact(&mut self) {
        let live = self.responses.len();
        if self.order.len() > live.saturating_mul(2).saturating_add(16) {
            let responses = &self.responses;
            self.order
                .retain(|(seq, key)| responses.get(key).is_some_and(|e| e.seq == *seq));
        }
        for share in self.clients.values_mut() {
            if share.keys.len() > share.count.saturating_mul(2).saturating_add(16) {
                let responses = &self.responses;
                share
                    .keys
                    .retain(|(seq, key)| responses.get(key).is_some_and(|e| e.seq == *seq));
            }
        }
    }

    /// Whether this node remembers a response for (`user`, `request_id`).
    #[cfg(test)]
    pub(crate) fn contains(&self, user: &str, request_id: &str) -> bool {
        self.responses
            .contains_key(&(user.to_owned(), request_id.to_owned()))
    }

    /// Records that a response of `response_len` bytes is remembered for (`user`,
    /// `request_id`), asked by `client`: forgets the client's own oldest entries while it is
    /// over its share, then the oldest entries of the index while it is over its item or byte
    /// limit, and returns what it forgot (the caller deletes those records). `Err` (with what
    /// was forgotten on the way) when the response must not be kept at all: too large for a
    /// share, or no room in the protocol's budget even with the index empty.
    pub(crate) fn insert(
        &mut self,
        user: &str,
        request_id: &str,
        client: ClientKey,
        response_len: usize,
    ) -> Result<Vec<Key>, Vec<Key>> {
        self.forgotten.clear();
        let bytes = entry_bytes(user, request_id, response_len);
        if self.capacity == 0
            || self.share.items == 0
            || bytes > self.capacity_bytes
            || bytes > self.share.bytes
        {
            return Err(Vec::new());
        }
        let key = (user.to_owned(), request_id.to_owned());
        if let Some(seq) = self.responses.get(&key).map(|e| e.seq) {
            // Replaced: the old entry goes (its record is the one being written again); its
            // FIFO slots become stale.
            self.remove_quietly(&key, seq);
        }
        loop {
            let share = self.clients.get(&client);
            let count = share.map_or(0, |s| s.count);
            let held = share.map_or(0, |s| s.bytes);
            if count < self.share.items && held.saturating_add(bytes) <= self.share.bytes {
                break;
            }
            if !self.evict_oldest_of(client) {
                break;
            }
        }
        while self.responses.len() >= self.capacity
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
                return Err(std::mem::take(&mut self.forgotten));
            }
        }
        let seq = self.next_seq;
        self.next_seq = seq.saturating_add(1);
        self.bytes = self.bytes.saturating_add(bytes);
        self.order.push_back((seq, key.clone()));
        let share = self.clients.entry(client).or_default();
        share.keys.push_back((seq, key.clone()));
        share.count = share.count.saturating_add(1);
        share.bytes = share.bytes.saturating_add(bytes);
        self.responses.insert(key, Entry { client, seq, bytes });
        self.compact();
        Ok(std::mem::take(&mut self.forgotten))
    }

    /// Number of remembered responses.
    pub(crate) fn len(&self) -> usize {
        self.responses.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(last: u8) -> ClientKey {
        ClientKey::from_ip(std::net::IpAddr::from([127, 0, 0, last]))
    }

    fn key(user: &str, id: &str) -> Key {
        (user.to_owned(), id.to_owned())
    }

    #[test]
    fn remembers_per_user_and_request_id() {
        let mut cache = IdempotencyCache::new(10, usize::MAX, Share::UNLIMITED, Arc::default());
        assert_eq!(cache.insert("alice", "r1", client(1), 2), Ok(Vec::new()));
        assert_eq!(cache.insert("bob", "r1", client(1), 2), Ok(Vec::new()));
        assert!(cache.contains("alice", "r1"));
        assert!(cache.contains("bob", "r1"));
        assert!(!cache.contains("alice", "r2"));
    }

    #[test]
    fn forgets_the_oldest_when_full() {
        let mut cache = IdempotencyCache::new(2, usize::MAX, Share::UNLIMITED, Arc::default());
        cache.insert("u", "1", client(1), 1).unwrap();
        cache.insert("u", "2", client(1), 1).unwrap();
        assert_eq!(
            cache.insert("u", "3", client(1), 1),
            Ok(vec![key("u", "1")])
        );
        assert_eq!(cache.len(), 2);
        assert!(!cache.contains("u", "1"));
        assert!(cache.contains("u", "2"));
        assert!(cache.contains("u", "3"));
    }

    #[test]
    fn reinserting_a_key_does_not_grow_the_cache() {
        let mut cache = IdempotencyCache::new(2, usize::MAX, Share::UNLIMITED, Arc::default());
        cache.insert("u", "1", client(1), 3).unwrap();
        assert_eq!(
            cache.insert("u", "1", client(1), 3),
            Ok(Vec::new()),
            "the record rewritten is not one to delete"
        );
        assert_eq!(cache.len(), 1);
        assert_eq!(
            cache.order.len(),
            2,
            "the old slot is stale until compacted"
        );
        assert!(cache.contains("u", "1"));
    }

    #[test]
    fn the_cache_is_bounded_in_bytes_and_yields_to_the_budget() {
        let one = entry_bytes("u", "1", 1);
        let budget = Arc::new(MemoryBudget::new(3 * one));
        let mut cache = IdempotencyCache::new(100, 2 * one, Share::UNLIMITED, budget.clone());
        for id in ["1", "2", "3"] {
            cache.insert("u", id, client(1), 1).unwrap();
        }
        assert_eq!(cache.len(), 2, "the byte limit forgot the oldest");
        assert_eq!(budget.used(), 2 * one);
        // Someone else takes most of the budget: the cache gives its entries back.
        budget.force_reserve(one);
        assert_eq!(
            cache.insert("u", "4", client(1), 1),
            Ok(vec![key("u", "2")])
        );
        assert_eq!(budget.used(), 3 * one);
        assert_eq!(cache.len(), 2);
        assert!(cache.contains("u", "4"));
        // Not even an empty index makes room: the response is not remembered, and what was
        // given up on the way is returned for deletion all the same.
        budget.force_reserve(3 * one);
        assert_eq!(
            cache.insert("u", "5", client(1), 1),
            Err(vec![key("u", "3"), key("u", "4")])
        );
        assert!(!cache.contains("u", "5"));
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_client_over_its_share_forgets_its_own_oldest_not_the_others() {
        let mut cache = IdempotencyCache::new(
            100,
            usize::MAX,
            Share {
                items: 3,
                bytes: usize::MAX,
            },
            Arc::default(),
        );
        cache.insert("alice", "1", client(2), 1).unwrap();
        for i in 0..50 {
            cache
                .insert("mallory", &i.to_string(), client(1), 1)
                .unwrap();
        }
        assert_eq!(cache.len(), 4);
        assert!(
            cache.contains("alice", "1"),
            "the flood did not push alice out"
        );
        assert!(cache.contains("mallory", "49"));
        assert!(!cache.contains("mallory", "46"));
        assert!(cache.order.len() <= 2 * 4 + 16, "stale slots are compacted");
    }

    #[test]
    fn zero_capacity_remembers_nothing() {
        let mut cache = IdempotencyCache::new(0, usize::MAX, Share::UNLIMITED, Arc::default());
        assert!(cache.insert("u", "1", client(1), 1).is_err());
        assert_eq!(cache.len(), 0);
    }
}
