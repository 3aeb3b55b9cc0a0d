//! What fastchat keeps in the state engine, as plain data, and the pure decisions over it.
//!
//! No sockets, no engine calls, no locks: the records stored under each key (see
//! `docs/protocols/fastchat.md`, "State and the engine"), the bounds of the state budget
//! ([`Bounds`]) and what a record that finds no room needs, and the choice of the user to forget when a table is
//! full. [`crate::store`] reads and writes these through the engine (records with
//! compare-and-set, the account with bounded counters); the decisions here are unit-tested
//! without an engine.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::messages::PresenceUser;

/// Bytes charged per known user: the record and its key, the display name (at most 50
/// characters, 200 bytes; charged in full so a rename never changes the charge) and the
/// per-client count.
pub const USER_BYTES: usize = 512;
/// Bytes charged per open chat (the chat's key and an index key on each side).
pub const CHAT_BYTES: usize = 96;
/// Bytes charged per queued message on top of its frame's length (the log entry's bookkeeping
/// and the marker naming the sending client).
pub const QUEUE_ENTRY_OVERHEAD_BYTES: usize = 96;
/// The largest `MSG` frame the server can build: 1000 content characters JSON-escaped (at most 6
/// bytes each), a 128-character message id (at most 4 bytes each, escaped quotes 2), two ids, a
/// timestamp and the envelope. Used by the worst-case formula and as the per-entry bound of a
/// user's inbox; queued frames are charged their actual length.
pub const MAX_MSG_FRAME_BYTES: usize = 8 * 1024;
/// Bytes charged per remembered message on top of twice its id (the id is stored as the record's
/// key and in the age-order log): the record and the log entry's bookkeeping.
pub const RECORD_OVERHEAD_BYTES: usize = 160;
/// Longest message id in bytes (128 characters of up to 4 bytes).
pub const MESSAGE_ID_MAX_BYTES: usize = 128 * 4;
/// Most bytes of one user's entry in the encoded `PRESENCE` list: the id (36), a display name of
/// 50 characters JSON-escaped (at most 300 bytes) and the keys and punctuation (~50).
pub const PRESENCE_ENTRY_MAX_BYTES: usize = 400;
/// Bytes of the `PRESENCE` envelope around the entries.
pub const PRESENCE_ENVELOPE_BYTES: usize = 64;

/// Namespace of chat ids: `chat_id = UUIDv5(CHAT_NAMESPACE, smaller_id_bytes ++ larger_id_bytes)`.
pub const CHAT_NAMESPACE: Uuid = Uuid::from_u128(0x6d1f_3c4e_2b7a_4f0e_9c55_8a1d_f00d_c4a7);

/// The id of the chat between `a` and `b`, the same whoever opens it.
pub fn chat_id(a: Uuid, b: Uuid) -> Uuid {
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    let mut name = [0u8; 32];
    name[..16].copy_from_slice(low.as_bytes());
    name[16..].copy_from_slice(high.as_bytes());
    Uuid::new_v5(&CHAT_NAMESPACE, &name)
}

/// Bytes charged for a queued frame.
pub fn queued_bytes(frame_len: usize) -> usize {
    frame_len.saturating_add(QUEUE_ENTRY_OVERHEAD_BYTES)
}

/// Bytes charged for the record of message `message_id`.
pub fn record_bytes(message_id: &str) -> usize {
    message_id
        .len()
        .saturating_mul(2)
        .saturating_add(RECORD_OVERHEAD_BYTES)
}

/// A user who said HELLO at least once (key `fastchat:user:<id>`). Short field names: every
/// record is read when the full `PRESENCE` list is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Latest display name.
    #[serde(rename = "n")]
    pub name: String,
    /// Registration order (a cluster-wide tick), for a stable `PRESENCE` list.
    #[serde(rename = "q")]
    pub seq: u64,
    /// When the user first said HELLO (Unix milliseconds), for operators.
    #[serde(rename = "c")]
    pub created_ms: i64,
    /// Cluster-wide tick of the last HELLO or disconnect, for forgetting the longest-gone user.
    #[serde(rename = "s")]
    pub seen: u64,
    /// The client that created the user (its `ClientKey`, as text); its share is charged.
    #[serde(rename = "k")]
    pub creator: String,
}

/// Delivery state of a message, as reported in `MSG_ACK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Claimed by a sender whose delivery has not finished yet. A node that dies between the
    /// claim and the inbox append leaves this: the sender was never answered, and a retry with
    /// the same id sends the message again instead of answering `sent` for a message that was
    /// never queued.
    Pending,
    /// Accepted by the server.
    Sent,
    /// Acknowledged by the recipient.
    Delivered,
}

impl Status {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            // Never answered as such (a pending message is sent again or refused); "sent" is
            // the nearest wire status.
            Self::Pending | Self::Sent => "sent",
            Self::Delivered => "delivered",
        }
    }
}

/// What the server remembers about an accepted message (key `fastchat:msg:<message_id>`):
/// enough for idempotent retries and for turning the recipient's ack into the sender's
/// "delivered".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    /// Sender.
    pub from: Uuid,
    /// Recipient.
    pub to: Uuid,
    /// Current status.
    pub status: Status,
}

impl MessageRecord {
    /// The record after the recipient `acker` acknowledged it, if that ack counts: only the
    /// recipient's first ack turns `sent` into `delivered` (or `pending`: a recipient online
    /// gets the message before its sender confirms the record).
    pub fn acked_by(self, acker: Uuid) -> Option<Self> {
        (self.to == acker && self.status != Status::Delivered).then_some(Self {
            status: Status::Delivered,
            ..self
        })
    }
}

/// Names the client charged for one queued message (key `fastchat:queued:<to>:<offset>`):
/// whoever removes the inbox entry takes the marker (of racing takers exactly one gets it) and
/// releases the charge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedMarker {
    /// The sending client (`ClientKey` as text).
    #[serde(rename = "k")]
    pub client: String,
    /// The bytes charged.
    #[serde(rename = "b")]
    pub bytes: usize,
}

/// The limits the account enforces, from [`crate::Config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Bytes charged up front for the rate-limit tables.
    pub fixed: usize,
    /// The whole budget, `max_state_bytes`.
    pub limit: usize,
    /// Most known users.
    pub max_users: usize,
    /// Most queued messages, all users.
    pub max_queued_total: usize,
    /// Most remembered message records.
    pub max_tracked_messages: usize,
}

impl Bounds {
    /// The bytes the account may hold besides the fixed rate-limit tables: the bound of the
    /// `fastchat:usage:bytes` counter.
    pub fn budget(&self) -> usize {
        self.limit.saturating_sub(self.fixed)
    }

    /// Most known users (at least one).
    pub fn users(&self) -> usize {
        self.max_users.max(1)
    }

    /// Most remembered message records (at least one).
    pub fn records(&self) -> usize {
        self.max_tracked_messages.max(1)
    }

    /// What a message record of `bytes` that found no room (its count or its bytes) needs, when
    /// the pools other than records hold `others` bytes. Records are a cache: the oldest make
    /// room for new ones, in count and in bytes, but never at another pool's expense, so a
    /// record that could not fit even with no records at all is refused and forgets nothing.
    pub fn record_room(&self, others: usize, bytes: usize) -> RecordRoom {
        if others.saturating_add(bytes) > self.budget() {
            RecordRoom::Refused
        } else {
            RecordRoom::ForgetOldest
        }
    }
}

/// What this node last saw of the cluster-wide account (for [`crate::FastChat::stats`]): each
/// field is the value the engine returned for its counter on this node's latest change of it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes charged (besides the fixed rate-limit tables).
    pub bytes: usize,
    /// Known users.
    pub users: usize,
    /// Open chats.
    pub chats: usize,
    /// Messages waiting in offline queues.
    pub queued: usize,
    /// Remembered message records.
    pub records: usize,
}

/// Why the account refused to take something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The table (users, queue, records) is at its bound.
    Full,
    /// The byte budget has no room.
    NoMemory,
}

/// What a message record that found no room needs (see [`Bounds::record_room`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordRoom {
    /// Forget the oldest record first (the table is full, or its bytes are needed), then retry.
    ForgetOldest,
    /// Even with no records at all the budget could not hold this one: refuse, forget nothing.
    Refused,
}

/// The offline user seen longest ago among `users` that `include` accepts.
pub fn longest_offline<'a>(
    users: &'a [(Uuid, UserRecord)],
    online: &HashSet<Uuid>,
    include: impl Fn(&UserRecord) -> bool,
) -> Option<&'a (Uuid, UserRecord)> {
    users
        .iter()
        .filter(|(id, user)| include(user) && !online.contains(id))
        .min_by_key(|(_, user)| (user.seen, user.seq))
}

/// The full `PRESENCE` list: every user in first-HELLO order, with online flags.
pub fn presence_list(
    mut users: Vec<(Uuid, UserRecord)>,
    online: &HashSet<Uuid>,
) -> Vec<PresenceUser> {
    users.sort_unstable_by_key(|(id, user)| (user.seq, *id));
    users
        .into_iter()
        .map(|(id, user)| PresenceUser {
            user_id: id.to_string(),
            display_name: user.name,
            online: online.contains(&id),
            removed: false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> Bounds {
        Bounds {
            fixed: 1000,
            limit: 1_000_000,
            max_users: 3,
            max_queued_total: 3,
            max_tracked_messages: 2,
        }
    }

    fn user(seq: u64, seen: u64, creator: &str) -> UserRecord {
        UserRecord {
            name: format!("user {seq}"),
            seq,
            created_ms: 0,
            seen,
            creator: creator.into(),
        }
    }

    #[test]
    fn chat_ids_do_not_depend_on_who_opens() {
        let [a, b, c] = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
        assert_eq!(chat_id(a, b), chat_id(b, a));
        assert_ne!(chat_id(a, b), chat_id(a, c));
        assert_eq!(chat_id(a, b).get_version_num(), 5);
    }

    #[test]
    fn the_longest_offline_user_is_chosen_and_online_users_never_are() {
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let users = vec![
            (ids[0], user(0, 5, "a")),
            (ids[1], user(1, 2, "a")),
            (ids[2], user(2, 1, "b")),
        ];
        let none = HashSet::new();
        assert_eq!(longest_offline(&users, &none, |_| true).unwrap().0, ids[2]);
        // Only the creating client's own users, when its share is full.
        assert_eq!(
            longest_offline(&users, &none, |u| u.creator == "a")
                .unwrap()
                .0,
            ids[1]
        );
        let online: HashSet<Uuid> = ids.iter().copied().collect();
        assert!(longest_offline(&users, &online, |_| true).is_none());
    }

    #[test]
    fn presence_keeps_first_hello_order() {
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let users = vec![
            (ids[2], user(7, 0, "a")),
            (ids[0], user(1, 9, "a")),
            (ids[1], user(3, 0, "a")),
        ];
        let online = HashSet::from([ids[1]]);
        let list = presence_list(users, &online);
        let listed: Vec<&str> = list.iter().map(|p| p.user_id.as_str()).collect();
        let expected: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        assert_eq!(listed, expected);
        assert!(list[1].online && !list[0].online);
    }

    #[test]
    fn the_recipients_first_ack_turns_sent_into_delivered() {
        let [a, b] = [Uuid::new_v4(), Uuid::new_v4()];
        let record = MessageRecord {
            from: a,
            to: b,
            status: Status::Sent,
        };
        assert_eq!(record.acked_by(a), None, "only the recipient acks");
        let delivered = record.acked_by(b).unwrap();
        assert_eq!(delivered.status, Status::Delivered);
        assert_eq!(delivered.acked_by(b), None, "acked once");
        let pending = MessageRecord {
            status: Status::Pending,
            ..record
        };
        assert_eq!(
            pending.acked_by(b),
            Some(delivered),
            "acked before its confirmation"
        );
    }

    #[test]
    fn a_record_that_cannot_fit_beside_the_other_pools_forgets_nothing() {
        let bounds = Bounds {
            limit: 1000 + USER_BYTES * 2 + CHAT_BYTES + 396 + 200,
            max_tracked_messages: 100,
            ..bounds()
        };
        assert_eq!(bounds.budget(), USER_BYTES * 2 + CHAT_BYTES + 596);
        let others = USER_BYTES * 2 + CHAT_BYTES + queued_bytes(300);
        // Records make room by forgetting older records, never other pools.
        assert_eq!(
            bounds.record_room(others, record_bytes("r2")),
            RecordRoom::ForgetOldest
        );
        // A record that could not fit even in an empty table evicts nothing.
        assert_eq!(
            bounds.record_room(others, record_bytes(&"x".repeat(500))),
            RecordRoom::Refused
        );
        assert_eq!(
            Bounds {
                limit: 10,
                ..bounds
            }
            .budget(),
            0,
            "a budget below the fixed part holds nothing"
        );
    }

    #[test]
    fn records_round_trip_compactly() {
        let record = user(1, 2, "127.0.0.1");
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(json, r#"{"n":"user 1","q":1,"c":0,"s":2,"k":"127.0.0.1"}"#);
        assert_eq!(serde_json::from_str::<UserRecord>(&json).unwrap(), record);
        let message = MessageRecord {
            from: Uuid::nil(),
            to: Uuid::nil(),
            status: Status::Delivered,
        };
        let json = serde_json::to_string(&message).unwrap();
        assert!(json.contains(r#""status":"delivered""#), "{json}");
    }
}
