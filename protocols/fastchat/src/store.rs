//! fastchat's state in the engine: the keys, logs and topics it uses, and the operations on them
//! (compare-and-set loops, the accounting of [`Usage`], the inbox and its charges).
//!
//! Every function here is one request's worth of engine calls; none holds a process lock across
//! an `.await`. See `docs/protocols/fastchat.md`, "State and the engine", for the layout and the
//! ordering argument.

use std::collections::HashSet;

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use switchboard_core::engine::{
    Append, Appended, EngineError, EngineResult, Expect, Position, Put, Read, ReadFrom, Retention,
};
use switchboard_core::{ClientKey, Engine, Frame};
use tracing::{debug, warn};
use uuid::Uuid;

use crate::state::{
    Bounds, ClientCount, MAX_MSG_FRAME_BYTES, MessageRecord, QueuedMarker, RecordRoom, Refused,
    Usage, UserRecord, chat_id, queued_bytes, record_bytes,
};

/// Presence room of online users: member = user id, one connection per socket.
pub const ONLINE_ROOM: &str = "fastchat:online";
/// The log of `PRESENCE` deltas, published to every identified socket.
pub const PRESENCE_LOG: &str = "fastchat:presence";
/// Prefix of user records.
pub const USER_PREFIX: &str = "fastchat:user:";
/// The cluster-wide accounting record.
const USAGE_KEY: &str = "fastchat:usage";
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

fn client_key(client: &str) -> String {
    format!("fastchat:client:{client}")
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

/// Changes `key` with compare-and-set: `change` sees the current value (the default when
/// absent) and either changes it or refuses. Retried on conflict. Returns the stored value and
/// its version.
async fn update<T, R>(
    engine: &Engine,
    key: &str,
    mut change: impl FnMut(&mut T) -> Result<(), R>,
) -> EngineResult<Result<(T, u64), R>>
where
    T: Serialize + DeserializeOwned + Default,
{
    let mut current = engine.get(key).await?;
    for _ in 0..CAS_ATTEMPTS {
        let (mut value, expect) = match &current {
            Some(stored) => (decode(key, &stored.value)?, Expect::Version(stored.version)),
            None => (T::default(), Expect::Absent),
        };
        if let Err(refused) = change(&mut value) {
            return Ok(Err(refused));
        }
        match engine.put(key, encode(&value)?, expect, None).await? {
            Put::Stored(version) => return Ok(Ok((value, version))),
            Put::Conflict(now) => current = now,
        }
    }
    Err(EngineError::Unavailable(format!(
        "{key}: too many concurrent writers"
    )))
}

/// An infallible change for [`update`].
type Never = std::convert::Infallible;

/// The engine operations of fastchat, for one node.
#[derive(Debug, Clone, Copy)]
pub struct Store<'a> {
    /// The node's engine.
    pub engine: &'a Engine,
    /// The bounds of the accounting.
    pub bounds: Bounds,
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

    /// The accounting as stored now.
    pub async fn usage(&self) -> EngineResult<Usage> {
        Ok(get(self.engine, USAGE_KEY)
            .await?
            .map(|(usage, _)| usage)
            .unwrap_or_default())
    }

    /// Gives something back to the accounting (never refused); the stored result.
    pub async fn release(&self, mut change: impl FnMut(&mut Usage)) -> EngineResult<Usage> {
        let released = self
            .account::<Never>(|usage| {
                change(usage);
                Ok(())
            })
            .await?;
        Ok(match released {
            Ok(usage) => usage,
            Err(never) => match never {},
        })
    }

    /// Changes the accounting; the stored result.
    pub async fn account<R>(
        &self,
        change: impl FnMut(&mut Usage) -> Result<(), R>,
    ) -> EngineResult<Result<Usage, R>> {
        Ok(update(self.engine, USAGE_KEY, change)
            .await?
            .map(|(usage, _)| usage))
    }

    async fn count_client(
        &self,
        client: &str,
        change: impl FnMut(&mut ClientCount) -> Result<(), QueueRefused>,
    ) -> EngineResult<Result<ClientCount, QueueRefused>> {
        let key = client_key(client);
        let result = update(self.engine, &key, change).await?;
        if let Ok((count, version)) = &result
            && count.is_empty()
        {
            // An empty share is forgotten; a concurrent change makes this a no-op.
            self.engine.delete(&key, Expect::Version(*version)).await?;
        }
        Ok(result.map(|(count, _)| count))
    }

    /// The share of `client`.
    pub async fn client_count(&self, client: ClientKey) -> EngineResult<ClientCount> {
        Ok(get(self.engine, &client_key(&client.to_string()))
            .await?
            .map(|(count, _)| count)
            .unwrap_or_default())
    }

    /// Adds `delta` users to `client`'s share (saturating).
    pub async fn count_users(&self, client: &str, add: bool) -> EngineResult<()> {
        self.count_client(client, |count| {
            count.users = if add {
                count.users.saturating_add(1)
            } else {
                count.users.saturating_sub(1)
            };
            Ok(())
        })
        .await?
        .map_err(|_| EngineError::Full("client share"))?;
        Ok(())
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
        self.release(|usage| usage.remove_user()).await?;
        self.count_users(&record.creator, false).await?;
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
                self.release(|usage| usage.remove_chat()).await?;
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
            let bytes = record_bytes(message_id);
            self.release(|usage| usage.remove_record(bytes)).await?;
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

    /// Charges a record, forgetting the oldest ones while that is what it takes.
    async fn charge_record(&self, message_id: &str) -> EngineResult<bool> {
        let bytes = record_bytes(message_id);
        let bounds = self.bounds;
        for _ in 0..CAS_ATTEMPTS {
            let room = self
                .account(|usage| match usage.add_record(&bounds, bytes) {
                    RecordRoom::Taken => Ok(()),
                    other => Err(other),
                })
                .await?;
            match room {
                Ok(_) => return Ok(true),
                Err(RecordRoom::ForgetOldest) => {
                    if !self.forget_oldest_record().await? {
                        return Ok(false);
                    }
                }
                Err(RecordRoom::Taken | RecordRoom::Refused) => return Ok(false),
            }
        }
        Ok(false)
    }

    /// Forgets a record just made (its message was refused after all).
    pub async fn unrecord(&self, message_id: &str, order_offset: u64) -> EngineResult<()> {
        self.engine.remove(MSG_ORDER_LOG, order_offset).await?;
        self.drop_record(message_id).await
    }

    /// Charges one queued message of a `frame_len`-byte frame to the server-wide count, the
    /// budget and the sending client's share.
    pub async fn charge_queued(
        &self,
        client: &str,
        frame_len: usize,
    ) -> EngineResult<Result<(), QueueRefused>> {
        let bytes = queued_bytes(frame_len);
        let bounds = self.bounds;
        let charged = self
            .account(|usage| {
                usage
                    .add_queued(&bounds, bytes)
                    .map_err(|refused| match refused {
                        Refused::Full => QueueRefused::Server,
                        Refused::NoMemory => QueueRefused::NoMemory,
                    })
            })
            .await?;
        if let Err(refused) = charged {
            return Ok(Err(refused));
        }
        let limit = self.max_queued_per_client;
        let share = self
            .count_client(client, |count| {
                if limit != 0 && count.queued >= limit {
                    return Err(QueueRefused::Client);
                }
                count.queued = count.queued.saturating_add(1);
                Ok(())
            })
            .await;
        match share {
            Ok(Ok(_)) => Ok(Ok(())),
            other => {
                self.release_server_queued(bytes).await?;
                other.map(|result| result.map(|_| ()))
            }
        }
    }

    async fn release_server_queued(&self, bytes: usize) -> EngineResult<()> {
        self.release(|usage| usage.remove_queued(bytes)).await?;
        Ok(())
    }

    /// Releases what [`Store::charge_queued`] took.
    pub async fn release_queued(&self, client: &str, frame_len: usize) -> EngineResult<()> {
        self.release_server_queued(queued_bytes(frame_len)).await?;
        self.count_client(client, |count| {
            count.queued = count.queued.saturating_sub(1);
            Ok(())
        })
        .await?
        .map_err(|_| EngineError::Full("client share"))?;
        Ok(())
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

    /// Releases the charge of `to`'s inbox entry at `offset` if its marker is still there (the
    /// marker's deletion decides who releases it, exactly once).
    async fn release_marker(&self, to: Uuid, offset: u64) -> EngineResult<()> {
        let key = marker_key(to, offset);
        let Some((marker, version)) = get::<QueuedMarker>(self.engine, &key).await? else {
            return Ok(());
        };
        if self.engine.delete(&key, Expect::Version(version)).await? {
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
