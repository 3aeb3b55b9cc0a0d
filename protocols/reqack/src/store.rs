//! Stored messages (with a per-conversation index for `history`) and open calls. Both bounded,
//! forgetting the oldest entry when full.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use switchboard_core::{BudgetExceeded, ClientKey, MemoryBudget};

use crate::cost::{CALL_OVERHEAD, MESSAGE_OVERHEAD, STRING_OVERHEAD, Share};

/// What each client put in a store, oldest first, with the bytes of each entry: a client over
/// its share makes room by forgetting its own oldest entries, so one client's flood cannot push
/// everybody else's entries out of an evict-oldest store.
#[derive(Debug)]
struct ClientFifo<K> {
    share: Share,
    clients: HashMap<ClientKey, (VecDeque<(K, usize)>, usize)>,
}

impl<K: PartialEq + Clone> ClientFifo<K> {
    fn new(share: Share) -> Self {
        Self {
            share,
            clients: HashMap::new(),
        }
    }

    /// Whether `client` may add an entry of `bytes` within its share.
    fn fits(&self, client: ClientKey, bytes: usize) -> bool {
        let (count, held) = self
            .clients
            .get(&client)
            .map_or((0, 0), |(keys, held)| (keys.len(), *held));
        count < self.share.items && held.saturating_add(bytes) <= self.share.bytes
    }

    /// `client`'s oldest entry.
    fn oldest(&self, client: ClientKey) -> Option<K> {
        self.clients
            .get(&client)
            .and_then(|(keys, _)| keys.front())
            .map(|(key, _)| key.clone())
    }

    fn push(&mut self, client: ClientKey, key: K, bytes: usize) {
        let (keys, held) = self.clients.entry(client).or_default();
        keys.push_back((key, bytes));
        *held = held.saturating_add(bytes);
    }

    /// Sets the bytes of `client`'s entry `key` (after an edit).
    fn resize(&mut self, client: ClientKey, key: &K, bytes: usize) {
        if let Some((keys, held)) = self.clients.get_mut(&client)
            && let Some(entry) = keys.iter_mut().find(|(k, _)| k == key)
        {
            *held = held.saturating_sub(entry.1).saturating_add(bytes);
            entry.1 = bytes;
        }
    }

    /// Forgets `client`'s entry `key` (cheap when it is the client's oldest, the usual case).
    fn remove(&mut self, client: ClientKey, key: &K) {
        let Some((keys, held)) = self.clients.get_mut(&client) else {
            return;
        };
        if let Some(pos) = keys.iter().position(|(k, _)| k == key)
            && let Some((_, bytes)) = keys.remove(pos)
        {
            *held = held.saturating_sub(bytes);
        }
        if keys.is_empty() {
            self.clients.remove(&client);
        }
    }
}
use crate::messages::{CallStatus, CallType, Direction};

/// How far a message got, as told by its recipient's receipts. Only ever advances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Receipt {
    Sent,
    Delivered,
    Read,
}

/// What a message carries.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(
    tag = "kind",
    rename_all = "lowercase",
    rename_all_fields = "camelCase"
)]
pub(crate) enum Body {
    /// A text message (`new`, maybe `edit`ed).
    Text {
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_message_id: Option<String>,
        edited: bool,
    },
    /// A call message (`call`).
    Call {
        call_type: CallType,
        direction: Direction,
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<CallStatus>,
    },
}

impl Body {
    pub(crate) fn client_message_id(&self) -> Option<String> {
        match self {
            Self::Text {
                client_message_id, ..
            } => client_message_id.clone(),
            Self::Call { .. } => None,
        }
    }
}

/// One message as `history` returns it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StoredMessage {
    pub(crate) message_id: u64,
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) timestamp: u64,
    #[serde(flatten)]
    pub(crate) body: Body,
    pub(crate) receipt: Receipt,
    #[serde(skip)]
    pub(crate) deleted: bool,
    /// The client (address) that sent it: its share of the store.
    #[serde(skip)]
    pub(crate) client: ClientKey,
}

impl StoredMessage {
    /// Bytes charged for this message (see [`crate::cost`]).
    fn bytes(&self) -> usize {
        let text = match &self.body {
            Body::Text {
                message,
                client_message_id,
                ..
            } => message
                .len()
                .saturating_add(client_message_id.as_ref().map_or(0, String::len)),
            Body::Call { .. } => 0,
        };
        // The names are held twice: in the message and in the conversation index key.
        MESSAGE_OVERHEAD
            .saturating_add(
                self.from
                    .len()
                    .saturating_add(self.to.len())
                    .saturating_mul(2),
            )
            .saturating_add(text)
    }
}

/// The messages store. Ids come from one server-wide counter starting at 1. Bounded in items
/// and bytes (forgetting the oldest), and charged to the protocol's budget.
#[derive(Debug)]
pub(crate) struct Messages {
    limit: usize,
    limit_bytes: usize,
    bytes: usize,
    budget: Arc<MemoryBudget>,
    shares: ClientFifo<u64>,
    next_id: u64,
    by_id: BTreeMap<u64, StoredMessage>,
    /// Message ids per conversation (unordered pair of users), oldest first.
    conversations: HashMap<(String, String), VecDeque<u64>>,
}

fn conversation(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

impl Messages {
    pub(crate) fn new(
        limit: usize,
        limit_bytes: usize,
        share: Share,
        budget: Arc<MemoryBudget>,
    ) -> Self {
        Self {
            limit: limit.max(1),
            limit_bytes,
            bytes: 0,
            budget,
            shares: ClientFifo::new(share),
            next_id: 1,
            by_id: BTreeMap::new(),
            conversations: HashMap::new(),
        }
    }

    /// The id the next stored message will get.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Stores a message sent by `client` and returns its id: first forgets the client's own
    /// oldest messages while it is over its share, then the oldest messages while the store is
    /// over its item or byte limit. Refused, with nothing changed, when the protocol's budget
    /// has no room for it.
    pub(crate) fn insert(
        &mut self,
        from: &str,
        to: &str,
        timestamp: u64,
        body: Body,
        client: ClientKey,
    ) -> Result<u64, BudgetExceeded> {
        let id = self.next_id;
        let message = StoredMessage {
            message_id: id,
            from: from.to_owned(),
            to: to.to_owned(),
            timestamp,
            body,
            receipt: Receipt::Sent,
            deleted: false,
            client,
        };
        let bytes = message.bytes();
        self.budget.try_reserve(bytes)?;
        self.next_id = self.next_id.saturating_add(1);
        while !self.shares.fits(client, bytes) {
            match self.shares.oldest(client) {
                Some(oldest) => self.evict(oldest),
                None => break,
            }
        }
        while !self.by_id.is_empty()
            && (self.by_id.len() >= self.limit
                || self.bytes.saturating_add(bytes) > self.limit_bytes)
        {
            self.evict_oldest();
        }
        self.bytes = self.bytes.saturating_add(bytes);
        self.shares.push(client, id, bytes);
        self.by_id.insert(id, message);
        self.conversations
            .entry(conversation(from, to))
            .or_default()
            .push_back(id);
        Ok(id)
    }

    /// Replaces the text of live text message `id` (marking it edited). Refused, with nothing
    /// changed, when the growth does not fit the budget.
    pub(crate) fn edit(&mut self, id: u64, text: &str) -> Result<(), BudgetExceeded> {
        let Some(stored) = self.by_id.get_mut(&id).filter(|m| !m.deleted) else {
            return Ok(());
        };
        let old = stored.bytes();
        let Body::Text {
            message, edited, ..
        } = &mut stored.body
        else {
            return Ok(());
        };
        let new = old.saturating_sub(message.len()).saturating_add(text.len());
        self.budget.try_resize(old, new)?;
        message.clear();
        message.push_str(text);
        *edited = true;
        let client = stored.client;
        self.shares.resize(client, &id, new);
        self.bytes = self.bytes.saturating_sub(old).saturating_add(new);
        // A longer text may push the store over its byte limit: forget older messages.
        while self.bytes > self.limit_bytes {
            match self.by_id.first_key_value() {
                Some((&oldest, _)) if oldest != id => self.evict_oldest(),
                _ => break,
            }
        }
        Ok(())
    }

    fn evict_oldest(&mut self) {
        if let Some((&id, _)) = self.by_id.first_key_value() {
            self.evict(id);
        }
    }

    /// Forgets message `id` and gives back its charge.
    fn evict(&mut self, id: u64) {
        let Some(message) = self.by_id.remove(&id) else {
            return;
        };
        let bytes = message.bytes();
        self.bytes = self.bytes.saturating_sub(bytes);
        self.budget.release(bytes);
        self.shares.remove(message.client, &id);
        let key = conversation(&message.from, &message.to);
        if let Some(ids) = self.conversations.get_mut(&key) {
            // Usually the oldest of its conversation (the store and each share are FIFOs).
            if ids.front() == Some(&id) {
                ids.pop_front();
            } else {
                ids.retain(|i| *i != id);
            }
            if ids.is_empty() {
                self.conversations.remove(&key);
            }
        }
    }

    /// A message that exists and is not deleted.
    pub(crate) fn live(&self, id: u64) -> Option<&StoredMessage> {
        self.by_id.get(&id).filter(|m| !m.deleted)
    }

    /// Like [`Messages::live`], mutable.
    pub(crate) fn live_mut(&mut self, id: u64) -> Option<&mut StoredMessage> {
        self.by_id.get_mut(&id).filter(|m| !m.deleted)
    }

    /// Marks a message deleted. Its slot is kept (a tombstone, text dropped) so the store stays
    /// bounded by `limit` however many messages are deleted.
    pub(crate) fn delete(&mut self, id: u64) {
        if let Some(message) = self.by_id.get_mut(&id) {
            let before = message.bytes();
            message.deleted = true;
            if let Body::Text { message, .. } = &mut message.body {
                *message = String::new();
            }
            let after = message.bytes();
            let client = message.client;
            self.shares.resize(client, &id, after);
            let freed = before.saturating_sub(after);
            self.bytes = self.bytes.saturating_sub(freed);
            self.budget.release(freed);
        }
    }

    /// Up to `limit` live messages between `a` and `b` with ids below `before`, newest last.
    pub(crate) fn history(
        &self,
        a: &str,
        b: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Vec<StoredMessage> {
        let Some(ids) = self.conversations.get(&conversation(a, b)) else {
            return Vec::new();
        };
        let before = before.unwrap_or(u64::MAX);
        let mut page: Vec<StoredMessage> = ids
            .iter()
            .rev()
            .filter(|id| **id < before)
            .filter_map(|id| self.live(*id))
            .take(limit)
            .cloned()
            .collect();
        page.reverse();
        page
    }

    /// Number of stored messages (tombstones included).
    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Bytes charged for the stored messages.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

/// A call opened by `newCall`.
#[derive(Debug, Clone)]
pub(crate) struct OpenCall {
    pub(crate) caller: String,
    pub(crate) participants: Vec<String>,
    pub(crate) call_type: CallType,
    pub(crate) started: Instant,
}

impl OpenCall {
    /// Bytes charged for this call, whose id is `call_id` (see [`crate::cost`]).
    fn bytes(&self, call_id: &str) -> usize {
        let ids = self
            .participants
            .iter()
            .map(|p| p.len().saturating_add(STRING_OVERHEAD))
            .fold(0usize, usize::saturating_add);
        // The call id is held four times: the map key, the opening order, the opener map and
        // the opener's share.
        CALL_OVERHEAD
            .saturating_add(call_id.len().saturating_mul(4))
            .saturating_add(self.caller.len())
            .saturating_add(ids)
    }

    /// Whether `user` is the caller or a participant.
    pub(crate) fn involves(&self, user: &str) -> bool {
        self.caller == user || self.participants.iter().any(|p| p == user)
    }
}

/// Open calls by id, bounded in items and bytes (forgetting the oldest), charged to the budget.
#[derive(Debug)]
pub(crate) struct Calls {
    limit: usize,
    limit_bytes: usize,
    bytes: usize,
    budget: Arc<MemoryBudget>,
    shares: ClientFifo<String>,
    /// Who opened each call (its share).
    openers: HashMap<String, ClientKey>,
    open: HashMap<String, OpenCall>,
    /// Call ids in opening order; may hold ids of closed calls until compacted.
    order: VecDeque<String>,
}

impl Calls {
    pub(crate) fn new(
        limit: usize,
        limit_bytes: usize,
        share: Share,
        budget: Arc<MemoryBudget>,
    ) -> Self {
        Self {
            limit: limit.max(1),
            limit_bytes,
            bytes: 0,
            budget,
            shares: ClientFifo::new(share),
            openers: HashMap::new(),
            open: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Opens `call` for `client`: forgets the client's own oldest open calls while it is over
    /// its share, then the oldest open calls while over the item or byte limit. Refused, with
    /// nothing changed, when the budget has no room.
    pub(crate) fn insert(
        &mut self,
        call_id: String,
        call: OpenCall,
        client: ClientKey,
    ) -> Result<(), BudgetExceeded> {
        let bytes = call.bytes(&call_id);
        self.budget.try_reserve(bytes)?;
        while !self.shares.fits(client, bytes) {
            match self.shares.oldest(client) {
                Some(oldest) => {
                    self.remove(&oldest);
                }
                None => break,
            }
        }
        while !self.open.is_empty()
            && (self.open.len() >= self.limit
                || self.bytes.saturating_add(bytes) > self.limit_bytes)
        {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.remove(&oldest);
                }
                None => break,
            }
        }
        self.bytes = self.bytes.saturating_add(bytes);
        self.order.push_back(call_id.clone());
        self.shares.push(client, call_id.clone(), bytes);
        self.openers.insert(call_id.clone(), client);
        self.open.insert(call_id, call);
        if self.order.len() > self.limit.saturating_mul(2) {
            let open = &self.open;
            self.order.retain(|id| open.contains_key(id));
        }
        Ok(())
    }

    pub(crate) fn get(&self, call_id: &str) -> Option<&OpenCall> {
        self.open.get(call_id)
    }

    pub(crate) fn remove(&mut self, call_id: &str) -> Option<OpenCall> {
        let call = self.open.remove(call_id)?;
        let bytes = call.bytes(call_id);
        if let Some(client) = self.openers.remove(call_id) {
            self.shares.remove(client, &call_id.to_owned());
        }
        self.bytes = self.bytes.saturating_sub(bytes);
        self.budget.release(bytes);
        Some(call)
    }

    pub(crate) fn len(&self) -> usize {
        self.open.len()
    }

    /// Bytes charged for the open calls.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(last: u8) -> ClientKey {
        ClientKey::from_ip(std::net::IpAddr::from([127, 0, 0, last]))
    }

    fn messages(limit: usize) -> Messages {
        Messages::new(limit, usize::MAX, Share::UNLIMITED, Arc::default())
    }

    fn text(message: &str) -> Body {
        Body::Text {
            message: message.into(),
            client_message_id: None,
            edited: false,
        }
    }

    #[test]
    fn history_is_per_conversation_newest_last_and_pages_backwards() {
        let mut store = messages(100);
        let m1 = store.insert("a", "b", 1, text("1"), client(1)).unwrap();
        let _other = store.insert("a", "c", 2, text("x"), client(1)).unwrap();
        let m2 = store.insert("b", "a", 3, text("2"), client(1)).unwrap();
        let m3 = store.insert("a", "b", 4, text("3"), client(1)).unwrap();
        let ids = |page: Vec<StoredMessage>| page.iter().map(|m| m.message_id).collect::<Vec<_>>();
        assert_eq!(ids(store.history("b", "a", None, 10)), [m1, m2, m3]);
        assert_eq!(ids(store.history("a", "b", None, 2)), [m2, m3]);
        assert_eq!(ids(store.history("a", "b", Some(m3), 10)), [m1, m2]);
        assert!(store.history("a", "z", None, 10).is_empty());
    }

    #[test]
    fn deleted_messages_leave_history_but_keep_their_slot() {
        let mut store = messages(100);
        let m1 = store
            .insert("a", "b", 1, text("secret"), client(1))
            .unwrap();
        store.delete(m1);
        assert!(store.live(m1).is_none());
        assert!(store.history("a", "b", None, 10).is_empty());
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn a_full_store_forgets_the_oldest_message() {
        let mut store = messages(2);
        let m1 = store.insert("a", "b", 1, text("1"), client(1)).unwrap();
        let m2 = store.insert("a", "c", 2, text("2"), client(1)).unwrap();
        let m3 = store.insert("a", "b", 3, text("3"), client(1)).unwrap();
        assert_eq!(store.len(), 2);
        assert!(store.live(m1).is_none());
        assert!(store.live(m2).is_some());
        assert_eq!(store.history("a", "b", None, 10).len(), 1);
        assert_eq!(store.history("a", "b", None, 10)[0].message_id, m3);
        let _m4 = store.insert("a", "d", 4, text("4"), client(1)).unwrap();
        assert!(!store.conversations.contains_key(&conversation("a", "c")));
    }

    #[test]
    fn the_store_is_bounded_in_bytes_and_charges_the_budget() {
        let budget = Arc::new(MemoryBudget::new(100_000));
        let mut store = Messages::new(
            1_000,
            2 * (MESSAGE_OVERHEAD + 4 + 100),
            Share::UNLIMITED,
            budget.clone(),
        );
        let big = "x".repeat(100);
        let m1 = store.insert("a", "b", 1, text(&big), client(1)).unwrap();
        store.insert("a", "b", 2, text(&big), client(1)).unwrap();
        assert_eq!(budget.used(), store.bytes());
        store.insert("a", "b", 3, text(&big), client(1)).unwrap();
        assert_eq!(store.len(), 2, "the byte limit forgot the oldest");
        assert!(store.live(m1).is_none());
        assert_eq!(budget.used(), store.bytes());
        let tight = Arc::new(MemoryBudget::new(10));
        let mut refused = Messages::new(10, usize::MAX, Share::UNLIMITED, tight.clone());
        assert!(refused.insert("a", "b", 1, text("hi"), client(1)).is_err());
        assert_eq!((refused.len(), refused.next_id(), tight.used()), (0, 1, 0));
    }

    #[test]
    fn a_client_over_its_share_forgets_its_own_oldest_messages_and_calls() {
        let share = Share {
            items: 3,
            bytes: usize::MAX,
        };
        let mut store = Messages::new(100, usize::MAX, share, Arc::default());
        let alice = store
            .insert("alice", "bob", 1, text("hi"), client(2))
            .unwrap();
        let mut flood = Vec::new();
        for i in 0..20 {
            flood.push(store.insert("m", "x", i, text("spam"), client(1)).unwrap());
        }
        assert_eq!(store.len(), 4);
        assert!(
            store.live(alice).is_some(),
            "the flood did not push alice out"
        );
        assert!(store.live(flood[19]).is_some() && store.live(flood[16]).is_none());
        assert_eq!(store.history("m", "x", None, 100).len(), 3);

        let mut calls = Calls::new(100, usize::MAX, share, Arc::default());
        let call = |caller: &str| OpenCall {
            caller: caller.into(),
            participants: vec!["p".into()],
            call_type: CallType::Video,
            started: Instant::now(),
        };
        calls
            .insert("alice".into(), call("alice"), client(2))
            .unwrap();
        for i in 0..20 {
            calls.insert(format!("m{i}"), call("m"), client(1)).unwrap();
        }
        assert_eq!(calls.len(), 4);
        assert!(calls.get("alice").is_some());
        assert!(calls.get("m19").is_some() && calls.get("m16").is_none());
        // A closed call leaves its opener's share.
        calls.remove("m19");
        calls.insert("m20".into(), call("m"), client(1)).unwrap();
        assert!(calls.get("m17").is_some());
    }

    #[test]
    fn stored_messages_serialize_for_history() {
        let mut store = messages(10);
        let id = store
            .insert(
                "a",
                "b",
                7,
                Body::Call {
                    call_type: CallType::Audio,
                    direction: Direction::Outgoing,
                    status: None,
                },
                client(1),
            )
            .unwrap();
        let value = serde_json::to_value(store.live(id).unwrap()).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"messageId": id, "from": "a", "to": "b", "timestamp": 7,
                "kind": "call", "callType": "audio", "direction": "outgoing", "receipt": "sent"})
        );
    }

    #[test]
    fn calls_are_bounded_and_closed_ones_do_not_pile_up() {
        let call = |caller: &str| OpenCall {
            caller: caller.into(),
            participants: vec!["p".into()],
            call_type: CallType::Video,
            started: Instant::now(),
        };
        let mut calls = Calls::new(2, usize::MAX, Share::UNLIMITED, Arc::default());
        calls.insert("1".into(), call("a"), client(1)).unwrap();
        calls.insert("2".into(), call("b"), client(1)).unwrap();
        calls.insert("3".into(), call("c"), client(1)).unwrap();
        assert!(calls.get("1").is_none());
        assert_eq!(calls.len(), 2);
        assert!(calls.get("3").unwrap().involves("p"));
        assert!(!calls.get("3").unwrap().involves("x"));
        for i in 0..100 {
            let id = format!("x{i}");
            calls.insert(id.clone(), call("a"), client(1)).unwrap();
            calls.remove(&id);
        }
        assert!(calls.order.len() <= 4);
    }
}
