//! Stored messages (with a per-conversation index for `history`) and open calls. Both bounded,
//! forgetting the oldest entry when full.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use serde::Serialize;

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
}

/// The messages store. Ids come from one server-wide counter starting at 1.
#[derive(Debug)]
pub(crate) struct Messages {
    limit: usize,
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
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            next_id: 1,
            by_id: BTreeMap::new(),
            conversations: HashMap::new(),
        }
    }

    /// Stores a message and returns its id, forgetting the oldest message if the store is full.
    pub(crate) fn insert(&mut self, from: &str, to: &str, timestamp: u64, body: Body) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        while self.by_id.len() >= self.limit {
            self.evict_oldest();
        }
        self.by_id.insert(
            id,
            StoredMessage {
                message_id: id,
                from: from.to_owned(),
                to: to.to_owned(),
                timestamp,
                body,
                receipt: Receipt::Sent,
                deleted: false,
            },
        );
        self.conversations
            .entry(conversation(from, to))
            .or_default()
            .push_back(id);
        id
    }

    fn evict_oldest(&mut self) {
        let Some((id, message)) = self.by_id.pop_first() else {
            return;
        };
        let key = conversation(&message.from, &message.to);
        if let Some(ids) = self.conversations.get_mut(&key) {
            // The globally oldest message is the oldest of its conversation.
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
            message.deleted = true;
            if let Body::Text { message, .. } = &mut message.body {
                *message = String::new();
            }
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
    /// Whether `user` is the caller or a participant.
    pub(crate) fn involves(&self, user: &str) -> bool {
        self.caller == user || self.participants.iter().any(|p| p == user)
    }
}

/// Open calls by id, forgetting the oldest when full.
#[derive(Debug)]
pub(crate) struct Calls {
    limit: usize,
    open: HashMap<String, OpenCall>,
    /// Call ids in opening order; may hold ids of closed calls until compacted.
    order: VecDeque<String>,
}

impl Calls {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit: limit.max(1),
            open: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub(crate) fn insert(&mut self, call_id: String, call: OpenCall) {
        while self.open.len() >= self.limit {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.open.remove(&oldest);
                }
                None => break,
            }
        }
        self.order.push_back(call_id.clone());
        self.open.insert(call_id, call);
        if self.order.len() > self.limit.saturating_mul(2) {
            let open = &self.open;
            self.order.retain(|id| open.contains_key(id));
        }
    }

    pub(crate) fn get(&self, call_id: &str) -> Option<&OpenCall> {
        self.open.get(call_id)
    }

    pub(crate) fn remove(&mut self, call_id: &str) -> Option<OpenCall> {
        self.open.remove(call_id)
    }

    pub(crate) fn len(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(message: &str) -> Body {
        Body::Text {
            message: message.into(),
            client_message_id: None,
            edited: false,
        }
    }

    #[test]
    fn history_is_per_conversation_newest_last_and_pages_backwards() {
        let mut store = Messages::new(100);
        let m1 = store.insert("a", "b", 1, text("1"));
        let _other = store.insert("a", "c", 2, text("x"));
        let m2 = store.insert("b", "a", 3, text("2"));
        let m3 = store.insert("a", "b", 4, text("3"));
        let ids = |page: Vec<StoredMessage>| page.iter().map(|m| m.message_id).collect::<Vec<_>>();
        assert_eq!(ids(store.history("b", "a", None, 10)), [m1, m2, m3]);
        assert_eq!(ids(store.history("a", "b", None, 2)), [m2, m3]);
        assert_eq!(ids(store.history("a", "b", Some(m3), 10)), [m1, m2]);
        assert!(store.history("a", "z", None, 10).is_empty());
    }

    #[test]
    fn deleted_messages_leave_history_but_keep_their_slot() {
        let mut store = Messages::new(100);
        let m1 = store.insert("a", "b", 1, text("secret"));
        store.delete(m1);
        assert!(store.live(m1).is_none());
        assert!(store.history("a", "b", None, 10).is_empty());
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn a_full_store_forgets_the_oldest_message() {
        let mut store = Messages::new(2);
        let m1 = store.insert("a", "b", 1, text("1"));
        let m2 = store.insert("a", "c", 2, text("2"));
        let m3 = store.insert("a", "b", 3, text("3"));
        assert_eq!(store.len(), 2);
        assert!(store.live(m1).is_none());
        assert!(store.live(m2).is_some());
        assert_eq!(store.history("a", "b", None, 10).len(), 1);
        assert_eq!(store.history("a", "b", None, 10)[0].message_id, m3);
        let _m4 = store.insert("a", "d", 4, text("4"));
        assert!(!store.conversations.contains_key(&conversation("a", "c")));
    }

    #[test]
    fn stored_messages_serialize_for_history() {
        let mut store = Messages::new(10);
        let id = store.insert(
            "a",
            "b",
            7,
            Body::Call {
                call_type: CallType::Audio,
                direction: Direction::Outgoing,
                status: None,
            },
        );
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
        let mut calls = Calls::new(2);
        calls.insert("1".into(), call("a"));
        calls.insert("2".into(), call("b"));
        calls.insert("3".into(), call("c"));
        assert!(calls.get("1").is_none());
        assert_eq!(calls.len(), 2);
        assert!(calls.get("3").unwrap().involves("p"));
        assert!(!calls.get("3").unwrap().involves("x"));
        for i in 0..100 {
            let id = format!("x{i}");
            calls.insert(id.clone(), call("a"));
            calls.remove(&id);
        }
        assert!(calls.order.len() <= 4);
    }
}
