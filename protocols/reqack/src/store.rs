//! Stored messages and open calls: their records in the state engine (serde, compact JSON) and
//! the node-local index that bounds what this node stored (sans-IO).
//!
//! A message is the keyed record `reqack:msg:<id>` and an open call `reqack:call:<callId>`, each
//! changed only by compare-and-set, so two nodes never lose each other's edits, receipts,
//! deletes or closes. [`Evictions`] remembers which records this node wrote, for which client
//! and how large they are: over a client's share or the node's item or byte limit, the oldest
//! are returned for deletion, as the in-memory stores forgot their oldest entries before.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use switchboard_core::{ClientKey, MemoryBudget};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Receipt {
    Sent,
    Delivered,
    Read,
}

/// What a message carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "kind",
    rename_all = "lowercase",
    rename_all_fields = "camelCase"
)]
pub(crate) enum Body {
    /// A text message (`new`, maybe `edit`ed).
    Text {
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_message_id: Option<String>,
        edited: bool,
    },
    /// A call message (`call`).
    Call {
        call_type: CallType,
        direction: Direction,
        #[serde(default, skip_serializing_if = "Option::is_none")]
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

/// One message: its record in the engine, and (with `deleted` skipped) what `history` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StoredMessage {
    pub(crate) message_id: u64,
    pub(crate) from: String,
    pub(crate) to: String,
    pub(crate) timestamp: u64,
    #[serde(flatten)]
    pub(crate) body: Body,
    pub(crate) receipt: Receipt,
    /// A tombstone: the text is gone, the id answers `NOT_FOUND`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) deleted: bool,
}

impl StoredMessage {
    /// Bytes charged for this message (see [`crate::cost`]): what this node's index accounts
    /// for the record it wrote.
    pub(crate) fn bytes(&self) -> usize {
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
        // The names are held twice: in the record and in the conversation index's name.
        MESSAGE_OVERHEAD
            .saturating_add(
                self.from
                    .len()
                    .saturating_add(self.to.len())
                    .saturating_mul(2),
            )
            .saturating_add(text)
    }

    /// Whether it is there for `history`, edits and receipts.
    pub(crate) fn is_live(&self) -> bool {
        !self.deleted
    }

    /// The history item: the record as the protocol documents it (no tombstone flag).
    pub(crate) fn history_item(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// A call opened by `newCall`, as stored in the engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OpenCall {
    pub(crate) caller: String,
    pub(crate) participants: Vec<String>,
    pub(crate) call_type: CallType,
    /// When `newCall` ran, in milliseconds since the Unix epoch: a wall clock, because the call
    /// may be closed on another node.
    pub(crate) started_ms: u64,
}

impl OpenCall {
    /// Bytes charged for this call, whose id is `call_id` (see [`crate::cost`]).
    pub(crate) fn bytes(&self, call_id: &str) -> usize {
        let ids = self
            .participants
            .iter()
            .map(|p| p.len().saturating_add(STRING_OVERHEAD))
            .fold(0usize, usize::saturating_add);
        // The call id is held four times: the record's key, the opening order, the opener map
        // and the opener's share.
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

/// The records this node wrote to one store (messages or open calls), oldest first, bounded in
/// items and bytes, with a share per client; charged to the protocol's budget.
///
/// [`Evictions::insert`] returns the records to delete from the engine to make room: first the
/// client's own oldest while it is over its share, then the oldest of all while over a limit.
#[derive(Debug)]
pub(crate) struct Evictions<K> {
    limit: usize,
    limit_bytes: usize,
    bytes: usize,
    budget: Arc<MemoryBudget>,
    shares: ClientFifo<K>,
    /// Live entries: who wrote them and their charge.
    live: HashMap<K, (ClientKey, usize)>,
    /// Keys in insertion order; may hold keys removed since, until compacted.
    order: VecDeque<K>,
}

impl<K: Eq + Hash + Clone> Evictions<K> {
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
            live: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Records `key` of `bytes`, written for `client`, and returns the keys forgotten to make
    /// room. Refused, with nothing changed, when the protocol's budget has no room for it.
    #[cfg(test)]
    pub(crate) fn insert(
        &mut self,
        key: K,
        bytes: usize,
        client: ClientKey,
    ) -> Result<Vec<K>, switchboard_core::BudgetExceeded> {
        self.budget.try_reserve(bytes)?;
        Ok(self.insert_reserved(key, bytes, client))
    }

    /// [`Evictions::insert`] for `bytes` the caller already reserved on the budget (before the
    /// record was written, so a refused request evicts nothing).
    pub(crate) fn insert_reserved(&mut self, key: K, bytes: usize, client: ClientKey) -> Vec<K> {
        let mut forgotten = Vec::new();
        while !self.shares.fits(client, bytes) {
            match self.shares.oldest(client) {
                Some(oldest) => {
                    if self.remove(&oldest) {
                        forgotten.push(oldest);
                    }
                }
                None => break,
            }
        }
        while !self.live.is_empty()
            && (self.live.len() >= self.limit
                || self.bytes.saturating_add(bytes) > self.limit_bytes)
        {
            match self.order.pop_front() {
                Some(oldest) => {
                    if self.remove(&oldest) {
                        forgotten.push(oldest);
                    }
                }
                None => break,
            }
        }
        self.bytes = self.bytes.saturating_add(bytes);
        self.order.push_back(key.clone());
        self.shares.push(client, key.clone(), bytes);
        self.live.insert(key, (client, bytes));
        if self.order.len() > self.live.len().saturating_mul(2).saturating_add(16) {
            let live = &self.live;
            self.order.retain(|k| live.contains_key(k));
        }
        forgotten
    }

    /// Sets the charge of `key` (an edit or a delete changed the record's size); the budget is
    /// charged without refusal: the record is stored already.
    pub(crate) fn resize(&mut self, key: &K, bytes: usize) {
        let Some((client, old)) = self.live.get_mut(key) else {
            return;
        };
        let (client, old) = (*client, std::mem::replace(old, bytes));
        self.budget.release(old);
        self.budget.force_reserve(bytes);
        self.bytes = self.bytes.saturating_sub(old).saturating_add(bytes);
        self.shares.resize(client, key, bytes);
    }

    /// Forgets `key` (its record was deleted); `false` if this node did not hold it.
    pub(crate) fn remove(&mut self, key: &K) -> bool {
        let Some((client, bytes)) = self.live.remove(key) else {
            return false;
        };
        self.bytes = self.bytes.saturating_sub(bytes);
        self.budget.release(bytes);
        self.shares.remove(client, key);
        true
    }

    /// Entries held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.live.len()
    }

    /// Bytes charged for them.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether `key` is held.
    #[cfg(test)]
    pub(crate) fn contains(&self, key: &K) -> bool {
        self.live.contains_key(key)
    }
}

/// The ids of a page of `history`, newest first: from the conversation's index (message ids,
/// oldest first, as read from its log), those below `before`, each once.
pub(crate) fn page_candidates(index: &[u64], before: Option<u64>) -> Vec<u64> {
    let before = before.unwrap_or(u64::MAX);
    let mut seen = HashSet::new();
    index
        .iter()
        .rev()
        .copied()
        .filter(|id| *id < before && seen.insert(*id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(last: u8) -> ClientKey {
        ClientKey::from_ip(std::net::IpAddr::from([127, 0, 0, last]))
    }

    fn text(message: &str) -> Body {
        Body::Text {
            message: message.into(),
            client_message_id: None,
            edited: false,
        }
    }

    #[test]
    fn history_pages_go_backwards_from_before() {
        assert_eq!(page_candidates(&[1, 3, 4, 7], None), [7, 4, 3, 1]);
        assert_eq!(page_candidates(&[1, 3, 4, 7], Some(4)), [3, 1]);
        assert!(page_candidates(&[], Some(4)).is_empty());
        assert_eq!(page_candidates(&[2, 2], None), [2], "each id once");
    }

    #[test]
    fn a_full_index_forgets_the_oldest() {
        let mut index = Evictions::new(2, usize::MAX, Share::UNLIMITED, Arc::default());
        assert_eq!(index.insert(1u64, 10, client(1)), Ok(vec![]));
        assert_eq!(index.insert(2, 10, client(1)), Ok(vec![]));
        assert_eq!(index.insert(3, 10, client(1)), Ok(vec![1]));
        assert_eq!(index.len(), 2);
        assert!(!index.contains(&1) && index.contains(&3));
        // A record deleted on purpose is not forgotten twice.
        assert!(index.remove(&2));
        assert_eq!(index.insert(4, 10, client(1)), Ok(vec![]));
        assert_eq!(index.insert(5, 10, client(1)), Ok(vec![3]));
    }

    #[test]
    fn the_index_is_bounded_in_bytes_and_charges_the_budget() {
        let budget = Arc::new(MemoryBudget::new(100_000));
        let mut index = Evictions::new(1_000, 250, Share::UNLIMITED, budget.clone());
        index.insert(1u64, 100, client(1)).unwrap();
        index.insert(2, 100, client(1)).unwrap();
        assert_eq!(budget.used(), 200);
        assert_eq!(index.insert(3, 100, client(1)), Ok(vec![1]));
        assert_eq!(budget.used(), index.bytes());
        index.resize(&3, 10);
        assert_eq!((index.bytes(), budget.used()), (110, 110));
        let tight = Arc::new(MemoryBudget::new(10));
        let mut refused = Evictions::new(10, usize::MAX, Share::UNLIMITED, tight.clone());
        assert!(refused.insert(1u64, 11, client(1)).is_err());
        assert_eq!((refused.len(), tight.used()), (0, 0));
    }

    #[test]
    fn a_client_over_its_share_forgets_its_own_oldest() {
        let share = Share {
            items: 3,
            bytes: usize::MAX,
        };
        let mut index = Evictions::new(100, usize::MAX, share, Arc::default());
        index.insert("alice".to_owned(), 10, client(2)).unwrap();
        let mut forgotten = Vec::new();
        for i in 0..20 {
            forgotten.extend(index.insert(format!("m{i}"), 10, client(1)).unwrap());
        }
        assert_eq!(index.len(), 4);
        assert!(
            index.contains(&"alice".to_owned()),
            "the flood did not push alice out"
        );
        assert_eq!(forgotten.len(), 17);
        assert!(!forgotten.contains(&"alice".to_owned()));
        // A removed entry leaves its opener's share.
        index.remove(&"m19".to_owned());
        index.insert("m20".to_owned(), 10, client(1)).unwrap();
        assert!(index.contains(&"m17".to_owned()));
        for i in 0..100 {
            let key = format!("x{i}");
            index.insert(key.clone(), 10, client(3)).unwrap();
            index.remove(&key);
        }
        assert!(
            index.order.len() <= 2 * index.len() + 16,
            "closed ones do not pile up"
        );
    }

    #[test]
    fn records_round_trip_and_history_items_have_the_documented_shape() {
        let message = StoredMessage {
            message_id: 9,
            from: "a".into(),
            to: "b".into(),
            timestamp: 7,
            body: Body::Call {
                call_type: CallType::Audio,
                direction: Direction::Outgoing,
                status: None,
            },
            receipt: Receipt::Sent,
            deleted: false,
        };
        let stored = serde_json::to_string(&message).unwrap();
        let back: StoredMessage = serde_json::from_str(&stored).unwrap();
        assert_eq!(back, message);
        assert_eq!(
            message.history_item(),
            serde_json::json!({"messageId": 9, "from": "a", "to": "b", "timestamp": 7,
                "kind": "call", "callType": "audio", "direction": "outgoing", "receipt": "sent"})
        );
        let mut edited = StoredMessage {
            body: text("hi"),
            deleted: true,
            ..message
        };
        let back: StoredMessage =
            serde_json::from_str(&serde_json::to_string(&edited).unwrap()).unwrap();
        assert_eq!(back, edited);
        edited.deleted = false;
        assert!(edited.history_item().get("deleted").is_none());
        let call = OpenCall {
            caller: "a".into(),
            participants: vec!["p".into()],
            call_type: CallType::Video,
            started_ms: 5,
        };
        assert!(call.involves("p") && call.involves("a") && !call.involves("x"));
        let back: OpenCall = serde_json::from_str(&serde_json::to_string(&call).unwrap()).unwrap();
        assert_eq!(back, call);
    }
}
