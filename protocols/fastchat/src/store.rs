//! fastchat's state in the engine: the keys, logs and topics it uses, and the operations on them
//! (compare-and-set loops on records, the account's bounded counters, the inbox and its charges).
//!
//! Every function here is one request's worth of engine calls; none holds a process lock across
//! an `.await`. See `docs/protocols/fastchat.md`, "State and the engine", for the layout and the
//! ordering argument.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use switchboard_core::engine::{
    Append, Appended, EngineError, EngineResult, Expect, Position, Put, Read, ReadFrom, Retention,
};
use switchboard_core::{Engine, Frame};
use tracing::{debug, warn};
use uuid::Uuid;

use crate::state::{
    Bounds, CHAT_BYTES, MAX_MSG_FRAME_BYTES, MessageRecord, QueuedMarker, RecordRoom, Refused,
    Status, USER_BYTES, Usage, UserRecord, chat_id, queued_bytes, record_bytes,
};

/// Presence room of online users: member = user id, one connection per socket.
pub const ONLINE_ROOM: &str = "fastchat:online";
/// The log of `PRESENCE` deltas, published to every identified socket.
pub const PRESENCE_LOG: &str = "fastchat:presence";
/// Prefix of user records.
pub const USER_PREFIX: &str = "fastchat:user:";
/// The account of `max_state_bytes`: bytes charged by every pool, at most [`Bounds::budget`].
/// Like every counter below it is changed with `Engine::add` in one step (no read-modify-write
/// on a shared record) and is gone while it is 0.
const BYTES_KEY: &str = "fastchat:usage:bytes";
/// The part of [`BYTES_KEY`] charged by users, chats and queued messages (everything but
/// message records), read only when a record finds no room.
const OTHER_BYTES_KEY: &str = "fastchat:usage:other-bytes";
/// Known users, at most `max_users`.
const USERS_KEY: &str = "fastchat:usage:users";
/// Open chats (no bound of its own; counted for [`crate::FastChat::stats`]).
const CHATS_KEY: &str = "fastchat:usage:chats";
/// Messages waiting in offline queues, at most `max_queued_total`.
const QUEUED_KEY: &str = "fastchat:usage:queued";
/// Remembered message records, at most `max_tracked_messages` (a log has no entry count, so the
/// age-order log cannot say how many records there are).
const RECORDS_KEY: &str = "fastchat:usage:records";
/// The bound of a counter that has none.
const UNBOUNDED: usize = usize::MAX;
/// A log whose offsets are the cluster-wide clock (registration order, last seen).
const CLOCK_LOG: &str = "fastchat:clock";
/// The age order of message records (entries are message ids).
const MSG_ORDER_LOG: &str = "fastchat:msg-order";

/// Only the newest delta is kept: the log exists for its order and its top, which tells a
/// joining socket which deltas its full list already covers.
const PRESENCE_RETENTION: Retention = Retention::trim(1, 4 * 1024 * 1024);
/// The clock keeps no history.
const CLOCK_RETENTION: Retention = Retention::trim(1, 16);
/// How often a compare-and-set is retried before the request is answered as failed.
const CAS_ATTEMPTS: usize = 64;
/// How often a new message record forgets the oldest one to make room before it is refused.
const ROOM_ATTEMPTS: usize = 64;
/// Users read per page when the whole table is scanned.
const SCAN_PAGE: usize = 512;

/// Key of user `id`'s record.
pub fn user_key(id: Uuid) -> String {
    format!("{USER_PREFIX}{id}")
}

/// The topic of user `id`'s sockets. Its log is the user's inbox: every `MSG` to the user is
/// appended and published here; what stays in the log is what no socket of the user has had.
pub fn user_topic(id: Uuid) -> String {
    format!("fastchat:user-topic:{id}")
}

fn chat_key(a: Uuid, b: Uuid) -> String {
    format!("fastchat:chat:{}", chat_id(a, b))
}

fn partner_prefix(id: Uuid) -> String {
    format!("fastchat:partner:{id}:")
}

fn partner_key(id: Uuid, partner: Uuid) -> String {
    format!("fastchat:partner:{id}:{partner}")
}

fn msg_key(message_id: &str) -> String {
    format!("fastchat:msg:{message_id}")
}

fn marker_key(to: Uuid, offset: u64) -> String {
    format!("fastchat:queued:{to}:{offset}")
}

/// Users created by `client` (its `ClientKey` as text), at most `max_users_per_client`.
fn client_users_key(client: &str) -> String {
    format!("fastchat:client:{client}:users")
}

/// Messages from `client` waiting in offline queues, at most `max_queued_per_client`.
fn client_queued_key(client: &str) -> String {
    format!("fastchat:client:{client}:queued")
}

/// The per-user rate-limit key of `kind` (`msg`, `typing`, `hello`).
pub fn rate_key(kind: &str, id: Uuid) -> String {
    format!("fastchat:rate:{kind}:{id}")
}

fn encode<T: Serialize>(value: &T) -> EngineResult<Bytes> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| EngineError::Corrupt(format!("cannot encode a fastchat record: {e}")))
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> EngineResult<T> {
    serde_json::from_slice(bytes).map_err(|e| EngineError::Corrupt(format!("{key}: {e}")))
}

/// Reads `key` as a `T` with its version.
async fn get<T: DeserializeOwned>(engine: &Engine, key: &str) -> EngineResult<Option<(T, u64)>> {
    match engine.get(key).await? {
        Some(stored) => Ok(Some((decode(key, &stored.value)?, stored.version))),
        None => Ok(None),
    }
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_usize(n: i64) -> usize {
    usize::try_from(n).unwrap_or(0)
}

/// What this node last saw of the account's counters: every value the engine returns for one
/// of them on this node is noted here, so [`crate::FastChat::stats`] costs no engine call. On a
/// single node it is exact once a request is answered (two requests racing on one counter may
/// note their values in either order, until the next change); with several nodes it lags behind
/// their changes until this node changes the same counter.
#[derive(Debug, Default)]
pub struct Seen {
    bytes: AtomicUsize,
    users: AtomicUsize,
    chats: AtomicUsize,
    queued: AtomicUsize,
    records: AtomicUsize,
}

impl Seen {
    fn note(&self, key: &str, value: i64) {
        let slot = match key {
            BYTES_KEY => &self.bytes,
            USERS_KEY => &self.users,
            CHATS_KEY => &self.chats,
            QUEUED_KEY => &self.queued,
            RECORDS_KEY => &self.records,
            _ => return,
        };
        slot.store(to_usize(value), Ordering::Relaxed);
    }

    /// The counters as last seen.
    pub fn usage(&self) -> Usage {
        Usage {
            bytes: self.bytes.load(Ordering::Relaxed),
            users: self.users.load(Ordering::Relaxed),
            chats: self.chats.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            records: self.records.load(Ordering::Relaxed),
        }
    }
}

/// One part of a charge: `amount` added to the counter at `key`, which must stay at most `max`.
#[derive(Debug, Clone)]
struct Charge<K> {
    key: K,
    amount: usize,
    max: usize,
}

impl<K> Charge<K> {
    const fn new(key: K, amount: usize, max: usize) -> Self {
        Self { key, amount, max }
    }
}

/// The engine operations of fastchat, for one node.
#[derive(Debug, Clone, Copy)]
pub struct Store<'a> {
    /// The node's engine.
    pub engine: &'a Engine,
    /// The bounds of the accounting.
    pub bounds: Bounds,
    /// This node's view of the account, updated by every counter change made here.
    pub seen: &'a Seen,
    /// Messages queued per offline user.
    pub max_queued_per_user: usize,
    /// Messages queued per sending client (0: unlimited).
    pub max_queued_per_client: usize,
}

/// How a queued message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRefused {
    /// The recipient's inbox is full.
    User,
    /// The server-wide count of queued messages is at its bound.
    Server,
    /// The sending client holds its whole share.
    Client,
    /// The byte budget has no room.
    NoMemory,
}

impl<'a> Store<'a> {
    /// A cluster-wide clock tick (strictly increasing).
    pub async fn tick(&self) -> EngineResult<u64> {
        let appended = self
            .engine
            .append(CLOCK_LOG, Frame::text(""), Append::store(CLOCK_RETENTION))
            .await?;
        Ok(match appended {
            Appended::Done(position) | Appended::Conflict(position) => position.offset,
        })
    }

    /// Adds `delta` to the counter at `key` if it stays within `0..=max`: `Ok(new)`, or
    /// `Err(current)` with nothing changed. Either value is noted in the node's view.
    async fn add(&self, key: &str, delta: i64, max: usize) -> EngineResult<Result<usize, usize>> {
        let added = self.engine.add(key, delta, 0, to_i64(max)).await?;
        let (Ok(now) | Err(now)) = added;
        self.seen.note(key, now);
        Ok(added.map(to_usize).map_err(to_usize))
    }

    /// The counter at `key` (0 when absent).
    async fn counter(&self, key: &str) -> EngineResult<usize> {
        let Some(stored) = self.engine.get(key).await? else {
            return Ok(0);
        };
        std::str::from_utf8(&stored.value)
            .ok()
            .and_then(|text| text.parse::<i64>().ok())
            .map(to_usize)
            .ok_or_else(|| EngineError::Corrupt(format!("{key} is not a counter")))
    }

    /// Takes every part of a charge in order, or none: at the first part that would pass its
    /// bound, the parts already taken are given back and `Err((index, current))` names that part
    /// and its counter's value. An engine failure gives back what was taken, too.
    async fn charge<K: AsRef<str>>(
        &self,
        parts: &[Charge<K>],
    ) -> EngineResult<Result<(), (usize, usize)>> {
        for (index, part) in parts.iter().enumerate() {
            let outcome = match self
                .add(part.key.as_ref(), to_i64(part.amount), part.max)
                .await
            {
                Ok(Ok(_)) => continue,
                Ok(Err(current)) => Ok(Err((index, current))),
                Err(error) => Err(error),
            };
            self.give_back(parts.get(..index).unwrap_or_default())
                .await?;
            return outcome;
        }
        Ok(Ok(()))
    }

    /// Gives back what [`Store::charge`] took (never refused; a counter never goes below 0).
    async fn give_back<K: AsRef<str>>(&self, parts: &[Charge<K>]) -> EngineResult<()> {
        for part in parts.iter().rev() {
            if part.amount == 0 {
                continue;
            }
            let key = part.key.as_ref();
            let delta = to_i64(part.amount).saturating_neg();
            if let Err(current) = self.add(key, delta, UNBOUNDED).await?
                && current > 0
            {
                // Less left than this charge: a charge was lost half-way to an engine failure.
                // Down to 0, as the saturating release it is (a racing change may refuse this
                // too; the counter then stays as that change left it).
                let _ = self
                    .add(key, to_i64(current).saturating_neg(), UNBOUNDED)
                    .await?;
            }
        }
        Ok(())
    }

    fn user_charge(&self) -> [Charge<&'static str>; 3] {
        [
            Charge::new(USERS_KEY, 1, self.bounds.users()),
            Charge::new(BYTES_KEY, USER_BYTES, self.bounds.budget()),
            Charge::new(OTHER_BYTES_KEY, USER_BYTES, UNBOUNDED),
        ]
    }

    /// Takes one unit of the user table and its bytes.
    pub async fn charge_user(&self) -> EngineResult<Result<(), Refused>> {
        Ok(self
            .charge(&self.user_charge())
            .await?
            .map_err(|(part, _)| match part {
                0 => Refused::Full,
                _ => Refused::NoMemory,
            }))
    }

    /// Gives back what [`Store::charge_user`] took.
    pub async fn release_user(&self) -> EngineResult<()> {
        self.give_back(&self.user_charge()).await
    }

    fn chat_charge(&self) -> [Charge<&'static str>; 3] {
        [
            Charge::new(BYTES_KEY, CHAT_BYTES, self.bounds.budget()),
            Charge::new(OTHER_BYTES_KEY, CHAT_BYTES, UNBOUNDED),
            Charge::new(CHATS_KEY, 1, UNBOUNDED),
        ]
    }

    /// Takes the bytes of one chat; `false` if the budget has no room.
    pub async fn charge_chat(&self) -> EngineResult<bool> {
        Ok(self.charge(&self.chat_charge()).await?.is_ok())
    }

    /// Gives back what [`Store::charge_chat`] took.
    pub async fn release_chat(&self) -> EngineResult<()> {
        self.give_back(&self.chat_charge()).await
    }

    /// Takes one of `client`'s share of users, at most `share` (0: unlimited, still counted);
    /// `false` if the share is full.
    pub async fn charge_client_user(&self, client: &str, share: usize) -> EngineResult<bool> {
        let max = if share == 0 { UNBOUNDED } else { share };
        let charge = [Charge::new(client_users_key(client), 1, max)];
        Ok(self.charge(&charge).await?.is_ok())
    }

    /// Gives back one of `client`'s share of users.
    pub async fn release_client_user(&self, client: &str) -> EngineResult<()> {
        self.give_back(&[Charge::new(client_users_key(client), 1, UNBOUNDED)])
            .await
    }

    /// User `id`'s record and version.
    pub async fn user(&self, id: Uuid) -> EngineResult<Option<(UserRecord, u64)>> {
        get(self.engine, &user_key(id)).await
    }

    /// Writes user `id`'s record if it still has `expect`.
    pub async fn put_user(
        &self,
        id: Uuid,
        record: &UserRecord,
        expect: Expect,
    ) -> EngineResult<bool> {
        let stored = self
            .engine
            .put(&user_key(id), encode(record)?, expect, None)
            .await?;
        Ok(matches!(stored, Put::Stored(_)))
    }

    /// Marks user `id` as seen now (a disconnect), so eviction prefers users gone longer.
    pub async fn touch(&self, id: Uuid) -> EngineResult<()> {
        let seen = self.tick().await?;
        for _ in 0..CAS_ATTEMPTS {
            let Some((mut record, version)) = self.user(id).await? else {
                return Ok(());
            };
            record.seen = seen;
            if self.put_user(id, &record, Expect::Version(version)).await? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Every known user (at most `max_users` and a page more, so a table overfilled by a race
    /// is still bounded).
    pub async fn users(&self) -> EngineResult<Vec<(Uuid, UserRecord)>> {
        let most = self.bounds.max_users.max(1).saturating_add(SCAN_PAGE);
        let mut users = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .engine
                .scan(USER_PREFIX, after.as_deref(), SCAN_PAGE)
                .await?;
            let full = page.len() == SCAN_PAGE;
            after = page.last().map(|(key, _)| key.clone());
            for (key, stored) in page {
                let Some(id) = key
                    .strip_prefix(USER_PREFIX)
                    .and_then(|id| Uuid::parse_str(id).ok())
                else {
                    continue;
                };
                match decode::<UserRecord>(&key, &stored.value) {
                    Ok(record) => users.push((id, record)),
                    Err(error) => warn!(%error, "skipping an unreadable user record"),
                }
            }
            if !full || users.len() >= most {
                return Ok(users);
            }
        }
    }

    /// The ids of users with a socket anywhere in the cluster.
    pub async fn online(&self) -> EngineResult<HashSet<Uuid>> {
        Ok(self
            .engine
            .presence_members(ONLINE_ROOM)
            .await?
            .iter()
            .filter_map(|member| Uuid::parse_str(member).ok())
            .collect())
    }

    /// Whether user `id` has a socket anywhere in the cluster.
    pub async fn is_online(&self, id: Uuid) -> EngineResult<bool> {
        self.engine
            .presence_contains(ONLINE_ROOM, &id.to_string())
            .await
    }

    /// Forgets user `id` with their chats and queued messages, releasing what was charged.
    /// Returns their last display name, or `None` if someone else changed or forgot them first.
    pub async fn forget(&self, id: Uuid) -> EngineResult<Option<String>> {
        let Some((record, version)) = self.user(id).await? else {
            return Ok(None);
        };
        if !self
            .engine
            .delete(&user_key(id), Expect::Version(version))
            .await?
        {
            return Ok(None);
        }
        self.release_user().await?;
        self.release_client_user(&record.creator).await?;
        let partners = self
            .engine
            .scan(&partner_prefix(id), None, usize::MAX)
            .await?;
        let prefix = partner_prefix(id);
        for (key, _) in partners {
            let Some(partner) = key
                .strip_prefix(&prefix)
                .and_then(|p| Uuid::parse_str(p).ok())
            else {
                continue;
            };
            self.engine.delete(&key, Expect::Any).await?;
            self.engine
                .delete(&partner_key(partner, id), Expect::Any)
                .await?;
            if self
                .engine
                .delete(&chat_key(id, partner), Expect::Any)
                .await?
            {
                self.release_chat().await?;
            }
        }
        let topic = user_topic(id);
        let read = self
            .engine
            .read(
                &topic,
                ReadFrom::After(Position {
                    offset: 0,
                    epoch: 0,
                }),
                usize::MAX,
            )
            .await?;
        if let Read::Entries { entries, .. } = read {
            for entry in entries {
                self.take_entry(id, entry.offset).await?;
            }
        }
        self.engine.drop_log(&topic).await?;
        debug!(user = %id, "forgot the longest-offline user to make room");
        Ok(Some(record.name))
    }

    /// Whether a chat between `a` and `b` is open.
    pub async fn chat_open(&self, a: Uuid, b: Uuid) -> EngineResult<bool> {
        Ok(self.engine.get(&chat_key(a, b)).await?.is_some())
    }

    /// How many chats `id` is in, counting at most `most`.
    pub async fn chat_count(&self, id: Uuid, most: usize) -> EngineResult<usize> {
        Ok(self
            .engine
            .scan(&partner_prefix(id), None, most)
            .await?
            .len())
    }

    /// The partners of `id`'s open chats (at most `most`).
    pub async fn partners(&self, id: Uuid, most: usize) -> EngineResult<Vec<Uuid>> {
        let prefix = partner_prefix(id);
        Ok(self
            .engine
            .scan(&prefix, None, most)
            .await?
            .into_iter()
            .filter_map(|(key, _)| {
                key.strip_prefix(&prefix)
                    .and_then(|p| Uuid::parse_str(p).ok())
            })
            .collect())
    }

    /// Opens the chat between `a` and `b` (already charged): `false` if it was open already.
    pub async fn open_chat(&self, a: Uuid, b: Uuid) -> EngineResult<bool> {
        let put = self
            .engine
            .put(&chat_key(a, b), Bytes::new(), Expect::Absent, None)
            .await?;
        if matches!(put, Put::Conflict(_)) {
            return Ok(false);
        }
        for (me, other) in [(a, b), (b, a)] {
            self.engine
                .put(&partner_key(me, other), Bytes::new(), Expect::Any, None)
                .await?;
        }
        Ok(true)
    }

    /// The record of message `message_id`, if still remembered, with its version.
    pub async fn message(&self, message_id: &str) -> EngineResult<Option<(MessageRecord, u64)>> {
        get(self.engine, &msg_key(message_id)).await
    }

    /// Sets message `message_id`'s record to `record` if it still has `version`.
    pub async fn update_message(
        &self,
        message_id: &str,
        record: &MessageRecord,
        version: u64,
    ) -> EngineResult<bool> {
        let put = self
            .engine
            .put(
                &msg_key(message_id),
                encode(record)?,
                Expect::Version(version),
                None,
            )
            .await?;
        Ok(matches!(put, Put::Stored(_)))
    }

    /// Turns message `message_id`'s record from `pending` into `sent` once its delivery is
    /// done (a record already `delivered`, or gone, is left alone).
    pub async fn confirm_message(&self, message_id: &str) -> EngineResult<()> {
        for _ in 0..CAS_ATTEMPTS {
            let Some((record, version)) = self.message(message_id).await? else {
                return Ok(());
            };
            if record.status != Status::Pending {
                return Ok(());
            }
            let sent = MessageRecord {
                status: Status::Sent,
                ..record
            };
            if self.update_message(message_id, &sent, version).await? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Forgets the oldest message record; `false` if there is none.
    async fn forget_oldest_record(&self) -> EngineResult<bool> {
        let read = self
            .engine
            .read(
                MSG_ORDER_LOG,
                ReadFrom::After(Position {
                    offset: 0,
                    epoch: 0,
                }),
                1,
            )
            .await?;
        let Read::Entries { entries, .. } = read else {
            return Ok(false);
        };
        let Some(oldest) = entries.into_iter().next() else {
            return Ok(false);
        };
        if self.engine.remove(MSG_ORDER_LOG, oldest.offset).await? {
            self.drop_record(oldest.frame.as_str()).await?;
        }
        Ok(true)
    }

    async fn drop_record(&self, message_id: &str) -> EngineResult<()> {
        if self
            .engine
            .delete(&msg_key(message_id), Expect::Any)
            .await?
        {
            self.give_back(&self.record_charge(record_bytes(message_id)))
                .await?;
        }
        Ok(())
    }

    /// Remembers a new message. `Ok(Err(Some(record)))`: the id is taken (a retry raced this
    /// one, or another sender has it); `Ok(Err(None))`: no room. Returns the offset of the id in
    /// the age order, for [`Store::unrecord`].
    pub async fn record(
        &self,
        message_id: &str,
        record: &MessageRecord,
    ) -> EngineResult<Result<u64, Option<MessageRecord>>> {
        let put = self
            .engine
            .put(&msg_key(message_id), encode(record)?, Expect::Absent, None)
            .await?;
        if let Put::Conflict(existing) = put {
            let existing = match existing {
                Some(stored) => Some(decode(&msg_key(message_id), &stored.value)?),
                None => None,
            };
            return Ok(Err(existing));
        }
        let charged = self.charge_record(message_id).await;
        match charged {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                self.engine
                    .delete(&msg_key(message_id), Expect::Any)
                    .await?;
                return charged.map(|_| Err(None));
            }
        }
        let order = Append::store(Retention::refuse(
            self.bounds.max_tracked_messages.max(1).saturating_mul(2),
            self.bounds
                .max_tracked_messages
                .max(1)
                .saturating_mul(2)
                .saturating_mul(crate::state::MESSAGE_ID_MAX_BYTES),
        ));
        match self
            .engine
            .append(MSG_ORDER_LOG, Frame::text(message_id), order)
            .await
        {
            Ok(Appended::Done(position)) => Ok(Ok(position.offset)),
            Ok(Appended::Conflict(_)) | Err(_) => {
                self.drop_record(message_id).await?;
                Ok(Err(None))
            }
        }
    }

    fn record_charge(&self, bytes: usize) -> [Charge<&'static str>; 2] {
        [
            Charge::new(RECORDS_KEY, 1, self.bounds.records()),
            Charge::new(BYTES_KEY, bytes, self.bounds.budget()),
        ]
    }

    /// Charges a record, forgetting the oldest ones while that is what it takes.
    async fn charge_record(&self, message_id: &str) -> EngineResult<bool> {
        let bytes = record_bytes(message_id);
        let charge = self.record_charge(bytes);
        for _ in 0..ROOM_ATTEMPTS {
            if self.charge(&charge).await?.is_ok() {
                return Ok(true);
            }
            // No room in count or bytes: forgetting records helps unless the other pools alone
            // leave no room (read only on this path, so a record costs two counter steps).
            let others = self.counter(OTHER_BYTES_KEY).await?;
            match self.bounds.record_room(others, bytes) {
                RecordRoom::ForgetOldest => {
                    if !self.forget_oldest_record().await? {
                        return Ok(false);
                    }
                }
                RecordRoom::Refused => return Ok(false),
            }
        }
        Ok(false)
    }

    /// Forgets a record just made (its message was refused after all).
    pub async fn unrecord(&self, message_id: &str, order_offset: u64) -> EngineResult<()> {
        self.engine.remove(MSG_ORDER_LOG, order_offset).await?;
        self.drop_record(message_id).await
    }

    fn queued_charge(&self, client: &str, frame_len: usize) -> [Charge<Cow<'static, str>>; 4] {
        let bytes = queued_bytes(frame_len);
        let per_client = match self.max_queued_per_client {
            0 => UNBOUNDED,
            limit => limit,
        };
        [
            Charge::new(QUEUED_KEY.into(), 1, self.bounds.max_queued_total),
            Charge::new(BYTES_KEY.into(), bytes, self.bounds.budget()),
            Charge::new(OTHER_BYTES_KEY.into(), bytes, UNBOUNDED),
            Charge::new(client_queued_key(client).into(), 1, per_client),
        ]
    }

    /// Charges one queued message of a `frame_len`-byte frame to the server-wide count, the
    /// budget and the sending client's share.
    pub async fn charge_queued(
        &self,
        client: &str,
        frame_len: usize,
    ) -> EngineResult<Result<(), QueueRefused>> {
        let charged = self.charge(&self.queued_charge(client, frame_len)).await?;
        Ok(charged.map_err(|(part, _)| match part {
            0 => QueueRefused::Server,
            3 => QueueRefused::Client,
            _ => QueueRefused::NoMemory,
        }))
    }

    /// Releases what [`Store::charge_queued`] took.
    pub async fn release_queued(&self, client: &str, frame_len: usize) -> EngineResult<()> {
        self.give_back(&self.queued_charge(client, frame_len)).await
    }

    /// The retention of a user's inbox: refuses beyond the queue bound, so nothing queued is
    /// ever dropped (a full inbox answers the sender `MESSAGE_FAILED`).
    fn inbox_append(&self) -> Append {
        let entries = self.max_queued_per_user.max(1);
        Append::publish(Retention::refuse(
            entries,
            entries.saturating_mul(MAX_MSG_FRAME_BYTES),
        ))
    }

    /// Appends `frame` to `to`'s inbox and publishes it to their sockets on every node.
    pub async fn append_inbox(
        &self,
        to: Uuid,
        frame: Frame,
    ) -> EngineResult<Result<Position, QueueRefused>> {
        match self
            .engine
            .append(&user_topic(to), frame, self.inbox_append())
            .await
        {
            Ok(Appended::Done(position) | Appended::Conflict(position)) => Ok(Ok(position)),
            Err(EngineError::Full(_)) => Ok(Err(QueueRefused::User)),
            Err(error) => Err(error),
        }
    }

    /// Leaves the charge for `to`'s inbox entry at `offset` with a marker naming `client`, so
    /// whoever removes the entry releases it. If the entry is already gone (a socket of the user
    /// took it meanwhile), the charge is released at once.
    pub async fn mark_queued(
        &self,
        to: Uuid,
        position: Position,
        client: &str,
        frame_len: usize,
    ) -> EngineResult<()> {
        let marker = QueuedMarker {
            client: client.to_owned(),
            bytes: frame_len,
        };
        let key = marker_key(to, position.offset);
        self.engine
            .put(&key, encode(&marker)?, Expect::Any, None)
            .await?;
        let before = Position {
            offset: position.offset.saturating_sub(1),
            epoch: position.epoch,
        };
        let still_there = match self
            .engine
            .read(&user_topic(to), ReadFrom::After(before), 1)
            .await?
        {
            Read::Entries { entries, .. } => {
                entries.first().is_some_and(|e| e.offset == position.offset)
            }
            Read::Gone { .. } => false,
        };
        if !still_there {
            self.release_marker(to, position.offset).await?;
        }
        Ok(())
    }

    /// Releases the charge of `to`'s inbox entry at `offset` if its marker is still there (of
    /// racing takers of the marker exactly one gets it, so the charge is released once).
    async fn release_marker(&self, to: Uuid, offset: u64) -> EngineResult<()> {
        let key = marker_key(to, offset);
        if let Some(stored) = self.engine.take(&key, Expect::Any).await? {
            let marker: QueuedMarker = decode(&key, &stored.value)?;
            self.release_queued(&marker.client, marker.bytes).await?;
        }
        Ok(())
    }

    /// Removes `to`'s inbox entry at `offset` (delivered, or forgotten with its user) and
    /// releases its charge if this call removed it.
    pub async fn take_entry(&self, to: Uuid, offset: u64) -> EngineResult<bool> {
        if self.engine.remove(&user_topic(to), offset).await? {
            self.release_marker(to, offset).await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Removes every entry of `to`'s inbox after `after` (entries a socket subscribed before
    /// they were appended, so it had them live).
    pub async fn take_after(&self, to: Uuid, after: Position) -> EngineResult<()> {
        let read = self
            .engine
            .read(&user_topic(to), ReadFrom::After(after), usize::MAX)
            .await?;
        if let Read::Entries { entries, .. } = read {
            for entry in entries {
                self.take_entry(to, entry.offset).await?;
            }
        }
        Ok(())
    }
}

/// The retention and options of a `PRESENCE` delta appended after `top` (see
/// `docs/protocols/fastchat.md` for why deltas are appended with compare-and-set).
pub fn presence_append(top: Option<u64>) -> Append {
    let append = Append::publish(PRESENCE_RETENTION);
    match top {
        Some(top) => append.if_top(top),
        None => append,
    }
}

#[cfg(test)]
mod tests {
    use switchboard_core::engine::MemoryLimits;

    use super::*;
    use crate::state::CHAT_BYTES;

    fn bounds() -> Bounds {
        Bounds {
            fixed: 1000,
            limit: 1_000_000,
            max_users: 3,
            max_queued_total: 3,
            max_tracked_messages: 2,
        }
    }

    fn store<'a>(engine: &'a Engine, seen: &'a Seen, bounds: Bounds) -> Store<'a> {
        Store {
            engine,
            bounds,
            seen,
            max_queued_per_user: 10,
            max_queued_per_client: 0,
        }
    }

    fn record() -> MessageRecord {
        MessageRecord {
            from: Uuid::nil(),
            to: Uuid::nil(),
            status: crate::state::Status::Sent,
        }
    }

    #[tokio::test]
    async fn the_user_table_is_bounded() {
        let (engine, seen) = (Engine::memory(MemoryLimits::default()), Seen::default());
        let store = store(&engine, &seen, bounds());
        for _ in 0..3 {
            store.charge_user().await.unwrap().unwrap();
        }
        assert_eq!(store.charge_user().await.unwrap(), Err(Refused::Full));
        store.release_user().await.unwrap();
        store.charge_user().await.unwrap().unwrap();
        let usage = seen.usage();
        assert_eq!((usage.users, usage.bytes), (3, 3 * USER_BYTES));
    }

    #[tokio::test]
    async fn queues_are_bounded_overall_and_per_client_and_charged_their_length() {
        let (engine, seen) = (Engine::memory(MemoryLimits::default()), Seen::default());
        let store = Store {
            max_queued_per_client: 2,
            ..store(&engine, &seen, bounds())
        };
        store.charge_queued("a", 10).await.unwrap().unwrap();
        store.charge_queued("a", 10).await.unwrap().unwrap();
        assert_eq!(
            store.charge_queued("a", 10).await.unwrap(),
            Err(QueueRefused::Client)
        );
        store.charge_queued("b", 10).await.unwrap().unwrap();
        assert_eq!(
            store.charge_queued("b", 10).await.unwrap(),
            Err(QueueRefused::Server)
        );
        store.release_queued("a", 10).await.unwrap();
        let usage = seen.usage();
        assert_eq!((usage.queued, usage.bytes), (2, 2 * queued_bytes(10)));
        store.release_queued("a", 10).await.unwrap();
        store.release_queued("b", 10).await.unwrap();
        for key in [
            BYTES_KEY,
            OTHER_BYTES_KEY,
            QUEUED_KEY,
            &client_queued_key("a"),
            &client_queued_key("b"),
        ] {
            assert_eq!(engine.get(key).await.unwrap(), None, "{key} is gone at 0");
        }
    }

    #[tokio::test]
    async fn message_records_are_bounded_oldest_first() {
        let (engine, seen) = (Engine::memory(MemoryLimits::default()), Seen::default());
        let store = store(&engine, &seen, bounds());
        for id in ["m1", "m2", "m3"] {
            store.record(id, &record()).await.unwrap().unwrap();
        }
        assert!(
            store.message("m1").await.unwrap().is_none(),
            "oldest forgotten"
        );
        assert!(store.message("m3").await.unwrap().is_some());
        assert_eq!(seen.usage().records, 2);
        assert_eq!(seen.usage().bytes, 2 * record_bytes("m2"));
    }

    #[tokio::test]
    async fn every_pool_is_charged_to_the_budget_and_records_only_evict_records() {
        let bounds = Bounds {
            limit: 1000 + USER_BYTES * 2 + CHAT_BYTES + 396 + 200,
            max_tracked_messages: 100,
            ..bounds()
        };
        let (engine, seen) = (Engine::memory(MemoryLimits::default()), Seen::default());
        let store = store(&engine, &seen, bounds);
        store.charge_user().await.unwrap().unwrap();
        store.charge_user().await.unwrap().unwrap();
        assert!(store.charge_chat().await.unwrap());
        assert_eq!(seen.usage().bytes, USER_BYTES * 2 + CHAT_BYTES);
        store.charge_queued("a", 300).await.unwrap().unwrap();
        assert_eq!(
            store.charge_queued("a", 300).await.unwrap(),
            Err(QueueRefused::NoMemory)
        );
        assert_eq!(store.charge_user().await.unwrap(), Err(Refused::NoMemory));
        // Records make room by forgetting older records, never other pools.
        store.record("r1", &record()).await.unwrap().unwrap();
        store.record("r2", &record()).await.unwrap().unwrap();
        assert!(store.message("r1").await.unwrap().is_none());
        assert_eq!(seen.usage().records, 1);
        // A record that could not fit even in an empty table evicts nothing.
        let long = "x".repeat(500);
        assert_eq!(store.record(&long, &record()).await.unwrap(), Err(None));
        assert!(store.message("r2").await.unwrap().is_some());
        assert_eq!(store.message(&long).await.unwrap(), None);
        store.release_queued("a", 300).await.unwrap();
        assert_eq!(
            seen.usage().bytes,
            USER_BYTES * 2 + CHAT_BYTES + record_bytes("r2")
        );
        assert_eq!(
            store.counter(OTHER_BYTES_KEY).await.unwrap(),
            USER_BYTES * 2 + CHAT_BYTES
        );
    }

    #[tokio::test]
    async fn a_queued_charge_is_released_once_whoever_takes_its_marker() {
        let (engine, seen) = (Engine::memory(MemoryLimits::default()), Seen::default());
        let store = store(&engine, &seen, bounds());
        let to = Uuid::new_v4();
        let frame = Frame::text("{}");
        store
            .charge_queued("a", frame.len())
            .await
            .unwrap()
            .unwrap();
        let position = store
            .append_inbox(to, frame.clone())
            .await
            .unwrap()
            .unwrap();
        store
            .mark_queued(to, position, "a", frame.len())
            .await
            .unwrap();
        assert_eq!(seen.usage().queued, 1);
        let takers = [
            store.take_entry(to, position.offset),
            store.take_entry(to, position.offset),
        ];
        let [a, b] = takers;
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        assert!(a ^ b, "one taker removes the entry");
        assert_eq!(seen.usage(), Usage::default(), "released once, to 0");
        assert_eq!(engine.get(&client_queued_key("a")).await.unwrap(), None);
    }
}
