//! Shared, bounded protocol state: known users, open chats, offline queues and message records.
//!
//! Pure data: no sockets, no locks. Who is online right now is not stored here (that is the
//! [`switchboard_core::Presence`] store's job); where a decision needs it, the caller passes an
//! `is_online` predicate.
//!
//! Every pool is bounded in items by [`Config`], shared per client ([`ClientKey`]) where one
//! client could exhaust it, and charged in bytes to a [`MemoryBudget`] before anything is stored;
//! when the budget refuses, the new work is refused and nothing stored is evicted for it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use switchboard_core::{ClientKey, Frame, MemoryBudget};
use uuid::Uuid;

use crate::Config;
use crate::messages::PresenceUser;

/// Bytes charged per known user: the table slot and `User` (~200 bytes with the hash table's
/// slack), the display name (at most 50 characters, 200 bytes; charged in full so a rename never
/// changes the charge) and the per-client count.
pub const USER_BYTES: usize = 512;
/// Bytes charged per open chat (an entry in each participant's set, with the sets' slack).
pub const CHAT_BYTES: usize = 96;
/// Bytes charged per queued message on top of its frame's length (queue slot, frame handle,
/// shared-buffer header, sender key).
pub const QUEUE_ENTRY_OVERHEAD_BYTES: usize = 96;
/// The largest `MSG` frame the server can build: 1000 content characters JSON-escaped (at most 6
/// bytes each), a 128-character message id (at most 4 bytes each, escaped quotes 2), two ids, a
/// timestamp and the envelope. Used by the worst-case formula; queued frames are charged their
/// actual length.
pub const MAX_MSG_FRAME_BYTES: usize = 8 * 1024;
/// Bytes charged per remembered message on top of twice its id (the id is stored in the table and
/// in the age order): table slot, record, order slot, with slack.
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

/// A user who said HELLO at least once.
#[derive(Debug)]
struct User {
    display_name: String,
    /// Registration order, for a stable `PRESENCE` list.
    seq: u64,
    /// Logical time of the last HELLO or disconnect, for evicting the longest-gone user.
    last_seen: u64,
    /// The client that created this user (said its first HELLO); its share is charged.
    creator: ClientKey,
    /// Partners of the chats this user is in (opened by either side).
    chats: HashSet<Uuid>,
    /// `MSG` frames waiting for this user to come online, oldest first.
    queue: VecDeque<Queued>,
}

/// A message waiting for its offline recipient.
#[derive(Debug)]
struct Queued {
    frame: Frame,
    /// The sending client, whose share of queued messages this takes.
    sender: ClientKey,
}

impl Queued {
    fn bytes(&self) -> usize {
        queued_bytes(&self.frame)
    }
}

fn queued_bytes(frame: &Frame) -> usize {
    frame.len().saturating_add(QUEUE_ENTRY_OVERHEAD_BYTES)
}

fn record_bytes(message_id: &str) -> usize {
    message_id
        .len()
        .saturating_mul(2)
        .saturating_add(RECORD_OVERHEAD_BYTES)
}

/// Delivery state of a message, as reported in `MSG_ACK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Accepted by the server.
    Sent,
    /// Acknowledged by the recipient.
    Delivered,
}

impl Status {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Delivered => "delivered",
        }
    }
}

/// What the server remembers about an accepted message: enough for idempotent retries and for
/// turning the recipient's ack into the sender's "delivered".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRecord {
    /// Sender.
    pub from: Uuid,
    /// Recipient.
    pub to: Uuid,
    /// Current status.
    pub status: Status,
}

/// The outcome of a HELLO for the user table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Registered {
    /// The user was not known before.
    pub new: bool,
    /// The user was known under another display name.
    pub renamed: bool,
    /// Users forgotten to make room (id and last display name), for the `PRESENCE` delta.
    pub forgotten: Vec<(Uuid, String)>,
}

/// Why a HELLO from a new user could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterError {
    /// The user table is full and every known user is online.
    TableFull,
    /// The creating client holds its whole share of users and all of them are online.
    ClientShareFull {
        /// The per-client limit.
        limit: usize,
    },
    /// The memory budget has no room for another user.
    NoMemory,
}

/// Why a chat could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    /// The target never said HELLO (or was forgotten).
    UserNotFound,
    /// This user (`true`: the opener; `false`: the target) has the most chats allowed.
    TooManyChats {
        /// Whether the opener (rather than the target) is at the limit.
        opener: bool,
    },
    /// The memory budget has no room for another chat.
    NoMemory,
}

/// Why a message could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// The recipient's own queue is full.
    UserQueueFull,
    /// The server-wide queue budget is used up.
    ServerQueueFull,
    /// The sending client holds its whole share of queued messages.
    ClientQueueFull,
    /// The memory budget has no room for the message.
    NoMemory,
}

/// The memory budget has no room for the record of a new message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRefused;

/// Users, chats, offline queues and message records, each bounded by [`Config`].
#[derive(Debug)]
pub struct Registry {
    users: HashMap<Uuid, User>,
    next_seq: u64,
    clock: u64,
    queued_total: usize,
    chats_total: usize,
    users_per_client: HashMap<ClientKey, usize>,
    queued_per_client: HashMap<ClientKey, usize>,
    messages: HashMap<String, MessageRecord>,
    message_order: VecDeque<String>,
    /// Bytes charged for `messages`, to tell whether forgetting records could make room.
    records_bytes: usize,
    /// The encoded full `PRESENCE` list while nothing in it changed, shared by every socket
    /// that says its first HELLO meanwhile (one buffer instead of a copy per socket).
    presence_cache: Option<Frame>,
    budget: Arc<MemoryBudget>,
    max_users: usize,
    max_users_per_client: usize,
    max_chats_per_user: usize,
    max_queued_per_user: usize,
    max_queued_per_client: usize,
    max_queued_total: usize,
    max_tracked_messages: usize,
}

fn count_up(map: &mut HashMap<ClientKey, usize>, key: ClientKey) {
    let held = map.entry(key).or_insert(0);
    *held = held.saturating_add(1);
}

fn count_down(map: &mut HashMap<ClientKey, usize>, key: ClientKey) {
    if let Some(held) = map.get_mut(&key) {
        *held = held.saturating_sub(1);
        if *held == 0 {
            map.remove(&key);
        }
    }
}

impl Registry {
    /// An empty registry with the limits of `config`, charging what it stores to `budget`.
    pub fn new(config: &Config, budget: Arc<MemoryBudget>) -> Self {
        Self {
            users: HashMap::new(),
            next_seq: 0,
            clock: 0,
            queued_total: 0,
            chats_total: 0,
            users_per_client: HashMap::new(),
            queued_per_client: HashMap::new(),
            messages: HashMap::new(),
            message_order: VecDeque::new(),
            records_bytes: 0,
            presence_cache: None,
            budget,
            max_users: config.max_users.max(1),
            max_users_per_client: config.max_users_per_client,
            max_chats_per_user: config.max_chats_per_user,
            max_queued_per_user: config.max_queued_per_user,
            max_queued_per_client: config.max_queued_per_client,
            max_queued_total: config.max_queued_total,
            max_tracked_messages: config.max_tracked_messages.max(1),
        }
    }

    /// Charges `bytes` to the budget; the cached `PRESENCE` list (only a cache) gives its room
    /// up first if that is what it takes.
    fn reserve(&mut self, bytes: usize) -> bool {
        if self.budget.try_reserve(bytes).is_ok() {
            return true;
        }
        if self.presence_cache.is_none() {
            return false;
        }
        self.invalidate_presence();
        self.budget.try_reserve(bytes).is_ok()
    }

    fn tick(&mut self) -> u64 {
        self.clock = self.clock.saturating_add(1);
        self.clock
    }

    /// The offline user seen longest ago, among those `include` accepts.
    fn longest_offline(
        &self,
        include: impl Fn(&User) -> bool,
        is_online: &dyn Fn(Uuid) -> bool,
    ) -> Option<Uuid> {
        self.users
            .iter()
            .filter(|(uid, user)| include(user) && !is_online(**uid))
            .min_by_key(|(_, user)| user.last_seen)
            .map(|(uid, _)| *uid)
    }

    /// Records a HELLO from `creator`. A known user is updated (renamed). A new user takes one
    /// unit of `creator`'s share and of the table: when the share is full, that client's own
    /// longest-offline user is forgotten; when the table is full, the longest-offline user of
    /// anyone is; if there is no such user, or the memory budget has no room, it is refused.
    pub fn register(
        &mut self,
        id: Uuid,
        display_name: &str,
        creator: ClientKey,
        is_online: &dyn Fn(Uuid) -> bool,
    ) -> Result<Registered, RegisterError> {
        let now = self.tick();
        if let Some(user) = self.users.get_mut(&id) {
            user.last_seen = now;
            let renamed = user.display_name != display_name;
            if renamed {
                display_name.clone_into(&mut user.display_name);
                self.invalidate_presence();
            }
            return Ok(Registered {
                renamed,
                ..Registered::default()
            });
        }
        let mut victims = Vec::new();
        let held = self.users_per_client.get(&creator).copied().unwrap_or(0);
        if self.max_users_per_client != 0 && held >= self.max_users_per_client {
            let own = self
                .longest_offline(|u| u.creator == creator, is_online)
                .ok_or(RegisterError::ClientShareFull {
                    limit: self.max_users_per_client,
                })?;
            victims.push(own);
        } else if self.users.len() >= self.max_users {
            victims.push(
                self.longest_offline(|_| true, is_online)
                    .ok_or(RegisterError::TableFull)?,
            );
        }
        if victims.is_empty() && !self.reserve(USER_BYTES) {
            return Err(RegisterError::NoMemory);
        }
        let mut forgotten = Vec::new();
        for victim in victims.drain(..) {
            if let Some(name) = self.forget(victim) {
                forgotten.push((victim, name));
            }
        }
        if !forgotten.is_empty() && !self.reserve(USER_BYTES) {
            // Forgetting released at least USER_BYTES, so this only happens when another pool
            // grew in between; refuse rather than overdraw.
            return Err(RegisterError::NoMemory);
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        self.users.insert(
            id,
            User {
                display_name: display_name.to_owned(),
                seq,
                last_seen: now,
                creator,
                chats: HashSet::new(),
                queue: VecDeque::new(),
            },
        );
        count_up(&mut self.users_per_client, creator);
        self.invalidate_presence();
        Ok(Registered {
            new: true,
            renamed: false,
            forgotten,
        })
    }

    /// Forgets a user with their chats and queue, releasing everything charged for them.
    /// Returns their last display name.
    fn forget(&mut self, id: Uuid) -> Option<String> {
        let user = self.users.remove(&id)?;
        self.invalidate_presence();
        self.budget.release(USER_BYTES);
        count_down(&mut self.users_per_client, user.creator);
        for queued in &user.queue {
            self.budget.release(queued.bytes());
            count_down(&mut self.queued_per_client, queued.sender);
        }
        self.queued_total = self.queued_total.saturating_sub(user.queue.len());
        for partner in user.chats {
            if let Some(other) = self.users.get_mut(&partner) {
                other.chats.remove(&id);
            }
            self.budget.release(CHAT_BYTES);
            self.chats_total = self.chats_total.saturating_sub(1);
        }
        tracing::debug!(user = %id, "forgot the longest-offline user to make room");
        Some(user.display_name)
    }

    /// Marks `id` as seen now (on disconnect), so eviction prefers users gone longer.
    pub fn touch(&mut self, id: Uuid) {
        let now = self.tick();
        if let Some(user) = self.users.get_mut(&id) {
            user.last_seen = now;
        }
    }

    /// Whether `id` is a known user.
    pub fn knows(&self, id: Uuid) -> bool {
        self.users.contains_key(&id)
    }

    /// The display name of a known user.
    pub fn display_name(&self, id: Uuid) -> Option<&str> {
        self.users.get(&id).map(|u| u.display_name.as_str())
    }

    /// Opens the chat between `opener` and `target` for both; `Ok(true)` if it was not open yet.
    pub fn open_chat(&mut self, opener: Uuid, target: Uuid) -> Result<bool, OpenError> {
        if !self.users.contains_key(&target) {
            return Err(OpenError::UserNotFound);
        }
        if self.chat_open(opener, target) {
            return Ok(false);
        }
        let full = |id: &Uuid| {
            self.users
                .get(id)
                .is_none_or(|u| u.chats.len() >= self.max_chats_per_user)
        };
        if full(&opener) {
            return Err(OpenError::TooManyChats { opener: true });
        }
        if full(&target) {
            return Err(OpenError::TooManyChats { opener: false });
        }
        if !self.reserve(CHAT_BYTES) {
            return Err(OpenError::NoMemory);
        }
        for (me, other) in [(opener, target), (target, opener)] {
            if let Some(user) = self.users.get_mut(&me) {
                user.chats.insert(other);
            }
        }
        self.chats_total = self.chats_total.saturating_add(1);
        Ok(true)
    }

    /// Whether a chat between `a` and `b` is open.
    pub fn chat_open(&self, a: Uuid, b: Uuid) -> bool {
        self.users.get(&a).is_some_and(|u| u.chats.contains(&b))
    }

    /// The partners of `id`'s open chats.
    pub fn partners(&self, id: Uuid) -> Vec<Uuid> {
        self.users
            .get(&id)
            .map(|u| u.chats.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Queues `frame` from client `sender` for offline user `to`.
    pub fn enqueue(&mut self, to: Uuid, frame: Frame, sender: ClientKey) -> Result<(), QueueError> {
        if self.queued_total >= self.max_queued_total {
            return Err(QueueError::ServerQueueFull);
        }
        let Some(user) = self.users.get(&to) else {
            return Err(QueueError::UserQueueFull);
        };
        if user.queue.len() >= self.max_queued_per_user {
            return Err(QueueError::UserQueueFull);
        }
        let held = self.queued_per_client.get(&sender).copied().unwrap_or(0);
        if self.max_queued_per_client != 0 && held >= self.max_queued_per_client {
            return Err(QueueError::ClientQueueFull);
        }
        if !self.reserve(queued_bytes(&frame)) {
            return Err(QueueError::NoMemory);
        }
        if let Some(user) = self.users.get_mut(&to) {
            user.queue.push_back(Queued { frame, sender });
        }
        count_up(&mut self.queued_per_client, sender);
        self.queued_total = self.queued_total.saturating_add(1);
        Ok(())
    }

    /// Takes everything queued for `id`, oldest first.
    pub fn take_queue(&mut self, id: Uuid) -> Vec<Frame> {
        let Some(user) = self.users.get_mut(&id) else {
            return Vec::new();
        };
        let queued: Vec<Queued> = user.queue.drain(..).collect();
        self.queued_total = self.queued_total.saturating_sub(queued.len());
        queued
            .into_iter()
            .map(|entry| {
                self.budget.release(entry.bytes());
                count_down(&mut self.queued_per_client, entry.sender);
                entry.frame
            })
            .collect()
    }

    /// How many messages are queued server-wide.
    pub fn queued_total(&self) -> usize {
        self.queued_total
    }

    /// How many messages client `key` has queued for offline users.
    pub fn queued_by_client(&self, key: ClientKey) -> usize {
        self.queued_per_client.get(&key).copied().unwrap_or(0)
    }

    /// How many known users client `key` created.
    pub fn users_by_client(&self, key: ClientKey) -> usize {
        self.users_per_client.get(&key).copied().unwrap_or(0)
    }

    /// How many chats are open.
    pub fn chat_count(&self) -> usize {
        self.chats_total
    }

    /// How many message records are remembered.
    pub fn tracked_messages(&self) -> usize {
        self.messages.len()
    }

    /// The record of message `message_id`, if it is still remembered.
    pub fn message(&self, message_id: &str) -> Option<MessageRecord> {
        self.messages.get(message_id).copied()
    }

    fn forget_oldest_record(&mut self) -> bool {
        let Some(oldest) = self.message_order.pop_front() else {
            return false;
        };
        if self.messages.remove(&oldest).is_some() {
            self.release_record(&oldest);
        }
        true
    }

    fn release_record(&mut self, message_id: &str) {
        let bytes = record_bytes(message_id);
        self.budget.release(bytes);
        self.records_bytes = self.records_bytes.saturating_sub(bytes);
    }

    /// Remembers an accepted message. The records are a cache: the oldest is forgotten when the
    /// table is full, or to make room in the memory budget; if even an empty table does not fit
    /// the record, it is refused.
    pub fn record(
        &mut self,
        message_id: String,
        from: Uuid,
        to: Uuid,
    ) -> Result<(), RecordRefused> {
        if self.messages.contains_key(&message_id) {
            return Ok(());
        }
        while self.messages.len() >= self.max_tracked_messages {
            if !self.forget_oldest_record() {
                break;
            }
        }
        let bytes = record_bytes(&message_id);
        let cache = self.presence_cache.as_ref().map_or(0, Frame::len);
        let others = self
            .budget
            .used()
            .saturating_sub(self.records_bytes)
            .saturating_sub(cache);
        if others.saturating_add(bytes) > self.budget.limit() {
            // Even forgetting every record would not make room: evict nothing.
            return Err(RecordRefused);
        }
        while !self.reserve(bytes) {
            if !self.forget_oldest_record() {
                return Err(RecordRefused);
            }
        }
        let record = MessageRecord {
            from,
            to,
            status: Status::Sent,
        };
        self.records_bytes = self.records_bytes.saturating_add(bytes);
        self.messages.insert(message_id.clone(), record);
        self.message_order.push_back(message_id);
        Ok(())
    }

    /// Forgets the record just made for `message_id` (its delivery was refused after all).
    pub fn unrecord(&mut self, message_id: &str) {
        if self.messages.remove(message_id).is_some() {
            self.release_record(message_id);
            if self.message_order.back().is_some_and(|id| id == message_id) {
                self.message_order.pop_back();
            } else if let Some(at) = self.message_order.iter().position(|id| id == message_id) {
                self.message_order.remove(at);
            }
        }
    }

    /// Handles the recipient's ack: returns the sender if the message just became delivered.
    /// Acks for unknown messages, from anyone but the recipient, or repeated, return `None`.
    pub fn mark_delivered(&mut self, message_id: &str, acker: Uuid) -> Option<Uuid> {
        let record = self.messages.get_mut(message_id)?;
        if record.to != acker || record.status == Status::Delivered {
            return None;
        }
        record.status = Status::Delivered;
        Some(record.from)
    }

    /// Every known user in first-HELLO order, with online flags.
    pub fn presence(&self, is_online: &dyn Fn(Uuid) -> bool) -> Vec<PresenceUser> {
        let mut users: Vec<(u64, Uuid, &User)> = self
            .users
            .iter()
            .map(|(id, user)| (user.seq, *id, user))
            .collect();
        users.sort_unstable_by_key(|(seq, _, _)| *seq);
        users
            .into_iter()
            .map(|(_, id, user)| PresenceUser {
                user_id: id.to_string(),
                display_name: user.display_name.clone(),
                online: is_online(id),
                removed: false,
            })
            .collect()
    }

    /// The `PRESENCE` entry of one known user.
    pub fn presence_of(&self, id: Uuid, online: bool) -> Option<PresenceUser> {
        self.users.get(&id).map(|user| PresenceUser {
            user_id: id.to_string(),
            display_name: user.display_name.clone(),
            online,
            removed: false,
        })
    }

    /// How many users are known.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// The cached full `PRESENCE` frame, if nothing changed since it was cached.
    pub fn cached_presence(&self) -> Option<Frame> {
        self.presence_cache.clone()
    }

    /// Caches the full `PRESENCE` frame if the budget has room for it (otherwise it is simply
    /// built again next time).
    pub fn cache_presence(&mut self, frame: Frame) {
        self.invalidate_presence();
        if self.budget.try_reserve(frame.len()).is_ok() {
            self.presence_cache = Some(frame);
        }
    }

    /// Drops the cached `PRESENCE` frame: someone was added, renamed, forgotten, or came online
    /// or went offline.
    pub fn invalidate_presence(&mut self) {
        if let Some(frame) = self.presence_cache.take() {
            self.budget.release(frame.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            max_users: 3,
            max_chats_per_user: 2,
            max_queued_per_user: 2,
            max_queued_total: 3,
            max_tracked_messages: 2,
            ..Config::default()
        }
    }

    fn offline(_: Uuid) -> bool {
        false
    }

    fn client() -> ClientKey {
        ClientKey::from_ip(std::net::Ipv4Addr::LOCALHOST.into())
    }

    fn registry(config: &Config) -> Registry {
        Registry::new(config, Arc::new(MemoryBudget::unlimited()))
    }

    fn ids(n: usize) -> Vec<Uuid> {
        (0..n).map(|_| Uuid::new_v4()).collect()
    }

    #[test]
    fn chat_ids_do_not_depend_on_who_opens() {
        let [a, b, c] = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
        assert_eq!(chat_id(a, b), chat_id(b, a));
        assert_ne!(chat_id(a, b), chat_id(a, c));
        assert_eq!(chat_id(a, b).get_version_num(), 5);
    }

    #[test]
    fn registering_twice_updates_the_name() {
        let mut reg = registry(&config());
        let id = Uuid::new_v4();
        assert_eq!(
            reg.register(id, "Ann", client(), &offline),
            Ok(Registered {
                new: true,
                ..Registered::default()
            })
        );
        assert_eq!(
            reg.register(id, "Ann", client(), &offline),
            Ok(Registered::default())
        );
        assert_eq!(
            reg.register(id, "Anna", client(), &offline),
            Ok(Registered {
                renamed: true,
                ..Registered::default()
            })
        );
        assert_eq!(reg.display_name(id), Some("Anna"));
    }

    #[test]
    fn a_full_table_forgets_the_longest_offline_user() {
        let mut reg = registry(&config());
        let u = ids(5);
        for id in &u[..3] {
            reg.register(*id, "name", client(), &offline).unwrap();
        }
        reg.open_chat(u[0], u[1]).unwrap();
        reg.enqueue(u[0], Frame::text("m"), client()).unwrap();
        reg.touch(u[0]);
        // u[1] was seen longest ago.
        let registered = reg.register(u[3], "name", client(), &offline).unwrap();
        assert_eq!(registered.forgotten, [(u[1], "name".to_owned())]);
        assert!(!reg.knows(u[1]));
        assert!(reg.partners(u[0]).is_empty());
        assert_eq!(reg.user_count(), 3);
        // Everyone online: no room.
        assert_eq!(
            reg.register(u[4], "name", client(), &|_| true),
            Err(RegisterError::TableFull)
        );
        assert_eq!(reg.queued_total(), 1);
    }

    #[test]
    fn presence_keeps_first_hello_order() {
        let mut reg = registry(&config());
        let u = ids(3);
        for id in &u {
            reg.register(*id, "name", client(), &offline).unwrap();
        }
        reg.register(u[0], "again", client(), &offline).unwrap();
        let listed: Vec<String> = reg
            .presence(&|id| id == u[1])
            .into_iter()
            .map(|p| p.user_id)
            .collect();
        assert_eq!(listed, u.iter().map(Uuid::to_string).collect::<Vec<_>>());
        assert!(reg.presence(&|id| id == u[1])[1].online);
    }

    #[test]
    fn chats_are_open_for_both_sides_and_bounded() {
        let mut reg = registry(&config());
        let u = ids(3);
        for id in &u {
            reg.register(*id, "name", client(), &offline).unwrap();
        }
        assert_eq!(
            reg.open_chat(u[0], Uuid::new_v4()),
            Err(OpenError::UserNotFound)
        );
        assert_eq!(reg.open_chat(u[0], u[1]), Ok(true));
        assert_eq!(reg.open_chat(u[1], u[0]), Ok(false));
        assert!(reg.chat_open(u[1], u[0]));
        assert_eq!(reg.open_chat(u[0], u[2]), Ok(true));
        assert_eq!(reg.partners(u[0]).len(), 2);
        let mut small = registry(&Config {
            max_chats_per_user: 1,
            ..config()
        });
        for id in &u {
            small.register(*id, "name", client(), &offline).unwrap();
        }
        assert_eq!(small.open_chat(u[0], u[1]), Ok(true));
        assert_eq!(
            small.open_chat(u[2], u[0]),
            Err(OpenError::TooManyChats { opener: false })
        );
        assert_eq!(
            small.open_chat(u[0], u[2]),
            Err(OpenError::TooManyChats { opener: true })
        );
    }

    #[test]
    fn queues_are_bounded_per_user_and_overall() {
        let mut reg = registry(&config());
        let u = ids(2);
        for id in &u {
            reg.register(*id, "name", client(), &offline).unwrap();
        }
        assert!(reg.enqueue(u[0], Frame::text("1"), client()).is_ok());
        assert!(reg.enqueue(u[0], Frame::text("2"), client()).is_ok());
        assert_eq!(
            reg.enqueue(u[0], Frame::text("3"), client()),
            Err(QueueError::UserQueueFull)
        );
        assert!(reg.enqueue(u[1], Frame::text("4"), client()).is_ok());
        assert_eq!(
            reg.enqueue(u[1], Frame::text("5"), client()),
            Err(QueueError::ServerQueueFull)
        );
        let taken = reg.take_queue(u[0]);
        assert_eq!(taken, [Frame::text("1"), Frame::text("2")]);
        assert_eq!(reg.queued_total(), 1);
        assert!(reg.take_queue(u[0]).is_empty());
    }

    #[test]
    fn message_records_turn_the_recipients_ack_into_delivered_once() {
        let mut reg = registry(&config());
        let [a, b] = [Uuid::new_v4(), Uuid::new_v4()];
        reg.record("m1".into(), a, b).unwrap();
        assert_eq!(reg.mark_delivered("m1", a), None, "only the recipient acks");
        assert_eq!(reg.mark_delivered("m1", b), Some(a));
        assert_eq!(reg.mark_delivered("m1", b), None, "acked once");
        assert_eq!(reg.message("m1").map(|r| r.status), Some(Status::Delivered));
        assert_eq!(reg.mark_delivered("nope", b), None);
    }

    #[test]
    fn message_records_are_bounded_oldest_first() {
        let mut reg = registry(&config());
        let [a, b] = [Uuid::new_v4(), Uuid::new_v4()];
        for id in ["m1", "m2", "m3"] {
            reg.record(id.into(), a, b).unwrap();
        }
        assert!(reg.message("m1").is_none());
        assert!(reg.message("m2").is_some());
        assert!(reg.message("m3").is_some());
    }

    #[test]
    fn a_full_client_share_forgets_that_clients_own_longest_offline_user() {
        let config = Config {
            max_users_per_client: 2,
            ..config()
        };
        let mut reg = registry(&config);
        let other = ClientKey::from_ip([127, 0, 0, 2].into());
        let u = ids(5);
        reg.register(u[0], "other", other, &offline).unwrap();
        reg.register(u[1], "mine", client(), &offline).unwrap();
        reg.register(u[2], "mine", client(), &offline).unwrap();
        assert_eq!(reg.users_by_client(client()), 2);
        // The other client's user is the longest offline, yet only our own is forgotten.
        let registered = reg.register(u[3], "mine", client(), &offline).unwrap();
        assert_eq!(registered.forgotten, [(u[1], "mine".to_owned())]);
        assert!(reg.knows(u[0]));
        // All of ours online: refused, nobody forgotten.
        assert_eq!(
            reg.register(u[4], "mine", client(), &|_| true),
            Err(RegisterError::ClientShareFull { limit: 2 })
        );
        assert_eq!(reg.user_count(), 3);
    }

    #[test]
    fn every_pool_is_charged_to_the_budget_and_released() {
        let budget = Arc::new(MemoryBudget::new(USER_BYTES * 2 + CHAT_BYTES + 396 + 200));
        let mut reg = Registry::new(&config(), budget.clone());
        let u = ids(3);
        reg.register(u[0], "a", client(), &offline).unwrap();
        reg.register(u[1], "b", client(), &offline).unwrap();
        assert_eq!(reg.open_chat(u[0], u[1]), Ok(true));
        assert_eq!(budget.used(), USER_BYTES * 2 + CHAT_BYTES);
        let frame = Frame::text("x".repeat(300));
        reg.enqueue(u[1], frame.clone(), client()).unwrap();
        assert_eq!(
            reg.enqueue(u[1], frame, client()),
            Err(QueueError::NoMemory)
        );
        assert_eq!(
            reg.register(u[2], "c", client(), &offline),
            Err(RegisterError::NoMemory)
        );
        // Records make room by forgetting older records, never other pools.
        reg.record("r1".into(), u[0], u[1]).unwrap();
        reg.record("r2".into(), u[0], u[1]).unwrap();
        assert!(reg.message("r1").is_none());
        // A record that could not fit even in an empty table evicts nothing.
        assert_eq!(reg.record("x".repeat(500), u[0], u[1]), Err(RecordRefused));
        assert!(reg.message("r2").is_some());
        reg.unrecord("r2");
        assert_eq!(reg.tracked_messages(), 0);
        assert_eq!(reg.take_queue(u[1]).len(), 1);
        assert_eq!(reg.queued_by_client(client()), 0);
        assert_eq!(budget.used(), USER_BYTES * 2 + CHAT_BYTES);
    }

    #[test]
    fn per_client_queue_shares_are_charged_to_the_sender() {
        let config = Config {
            max_queued_per_client: 1,
            ..config()
        };
        let mut reg = registry(&config);
        let other = ClientKey::from_ip([127, 0, 0, 2].into());
        let u = ids(2);
        for id in &u {
            reg.register(*id, "name", client(), &offline).unwrap();
        }
        reg.enqueue(u[0], Frame::text("1"), client()).unwrap();
        assert_eq!(
            reg.enqueue(u[1], Frame::text("2"), client()),
            Err(QueueError::ClientQueueFull)
        );
        reg.enqueue(u[1], Frame::text("3"), other).unwrap();
        reg.take_queue(u[0]);
        reg.enqueue(u[1], Frame::text("4"), client()).unwrap();
    }
}
