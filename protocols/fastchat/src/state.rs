//! Shared, bounded protocol state: known users, open chats, offline queues and message records.
//!
//! Pure data: no sockets, no locks. Who is online right now is not stored here (that is the
//! [`switchboard_core::Presence`] store's job); where a decision needs it, the caller passes an
//! `is_online` predicate.

use std::collections::{HashMap, HashSet, VecDeque};

use switchboard_core::Frame;
use uuid::Uuid;

use crate::Config;
use crate::messages::PresenceUser;

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
    /// Partners of the chats this user is in (opened by either side).
    chats: HashSet<Uuid>,
    /// `MSG` frames waiting for this user to come online, oldest first.
    queue: VecDeque<Frame>,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    /// The user was not known before.
    pub new: bool,
    /// The user was known under another display name.
    pub renamed: bool,
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
}

/// Why a message could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueError {
    /// The recipient's own queue is full.
    UserQueueFull,
    /// The server-wide queue budget is used up.
    ServerQueueFull,
}

/// Users, chats, offline queues and message records, each bounded by [`Config`].
#[derive(Debug)]
pub struct Registry {
    users: HashMap<Uuid, User>,
    next_seq: u64,
    clock: u64,
    queued_total: usize,
    messages: HashMap<String, MessageRecord>,
    message_order: VecDeque<String>,
    max_users: usize,
    max_chats_per_user: usize,
    max_queued_per_user: usize,
    max_queued_total: usize,
    max_tracked_messages: usize,
}

impl Registry {
    /// An empty registry with the limits of `config`.
    pub fn new(config: &Config) -> Self {
        Self {
            users: HashMap::new(),
            next_seq: 0,
            clock: 0,
            queued_total: 0,
            messages: HashMap::new(),
            message_order: VecDeque::new(),
            max_users: config.max_users.max(1),
            max_chats_per_user: config.max_chats_per_user,
            max_queued_per_user: config.max_queued_per_user,
            max_queued_total: config.max_queued_total,
            max_tracked_messages: config.max_tracked_messages.max(1),
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Records a HELLO. When the table is full, the offline user gone the longest is forgotten
    /// (with their chats and queue); `None` means every known user is online and there is no room.
    pub fn register(
        &mut self,
        id: Uuid,
        display_name: &str,
        is_online: &dyn Fn(Uuid) -> bool,
    ) -> Option<Registered> {
        let now = self.tick();
        if let Some(user) = self.users.get_mut(&id) {
            user.last_seen = now;
            let renamed = user.display_name != display_name;
            if renamed {
                display_name.clone_into(&mut user.display_name);
            }
            return Some(Registered {
                new: false,
                renamed,
            });
        }
        if self.users.len() >= self.max_users {
            let victim = self
                .users
                .iter()
                .filter(|(uid, _)| !is_online(**uid))
                .min_by_key(|(_, user)| user.last_seen)
                .map(|(uid, _)| *uid)?;
            self.forget(victim);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.users.insert(
            id,
            User {
                display_name: display_name.to_owned(),
                seq,
                last_seen: now,
                chats: HashSet::new(),
                queue: VecDeque::new(),
            },
        );
        Some(Registered {
            new: true,
            renamed: false,
        })
    }

    fn forget(&mut self, id: Uuid) {
        let Some(user) = self.users.remove(&id) else {
            return;
        };
        self.queued_total = self.queued_total.saturating_sub(user.queue.len());
        for partner in user.chats {
            if let Some(other) = self.users.get_mut(&partner) {
                other.chats.remove(&id);
            }
        }
        tracing::debug!(user = %id, "forgot the longest-offline user to make room");
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
        for (me, other) in [(opener, target), (target, opener)] {
            if let Some(user) = self.users.get_mut(&me) {
                user.chats.insert(other);
            }
        }
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

    /// Queues `frame` for offline user `to`.
    pub fn enqueue(&mut self, to: Uuid, frame: Frame) -> Result<(), QueueError> {
        if self.queued_total >= self.max_queued_total {
            return Err(QueueError::ServerQueueFull);
        }
        let Some(user) = self.users.get_mut(&to) else {
            return Err(QueueError::UserQueueFull);
        };
        if user.queue.len() >= self.max_queued_per_user {
            return Err(QueueError::UserQueueFull);
        }
        user.queue.push_back(frame);
        self.queued_total += 1;
        Ok(())
    }

    /// Takes everything queued for `id`, oldest first.
    pub fn take_queue(&mut self, id: Uuid) -> Vec<Frame> {
        let Some(user) = self.users.get_mut(&id) else {
            return Vec::new();
        };
        let frames: Vec<Frame> = user.queue.drain(..).collect();
        self.queued_total = self.queued_total.saturating_sub(frames.len());
        frames
    }

    /// How many messages are queued server-wide.
    pub fn queued_total(&self) -> usize {
        self.queued_total
    }

    /// The record of message `message_id`, if it is still remembered.
    pub fn message(&self, message_id: &str) -> Option<MessageRecord> {
        self.messages.get(message_id).copied()
    }

    /// Remembers an accepted message; the oldest record is forgotten when the table is full.
    pub fn record(&mut self, message_id: String, from: Uuid, to: Uuid) {
        while self.messages.len() >= self.max_tracked_messages {
            let Some(oldest) = self.message_order.pop_front() else {
                break;
            };
            self.messages.remove(&oldest);
        }
        let record = MessageRecord {
            from,
            to,
            status: Status::Sent,
        };
        if self.messages.insert(message_id.clone(), record).is_none() {
            self.message_order.push_back(message_id);
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
            })
            .collect()
    }

    /// How many users are known.
    pub fn user_count(&self) -> usize {
        self.users.len()
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
        let mut reg = Registry::new(&config());
        let id = Uuid::new_v4();
        assert_eq!(
            reg.register(id, "Ann", &offline),
            Some(Registered {
                new: true,
                renamed: false
            })
        );
        assert_eq!(
            reg.register(id, "Ann", &offline),
            Some(Registered {
                new: false,
                renamed: false
            })
        );
        assert_eq!(
            reg.register(id, "Anna", &offline),
            Some(Registered {
                new: false,
                renamed: true
            })
        );
        assert_eq!(reg.display_name(id), Some("Anna"));
    }

    #[test]
    fn a_full_table_forgets_the_longest_offline_user() {
        let mut reg = Registry::new(&config());
        let u = ids(5);
        for id in &u[..3] {
            reg.register(*id, "name", &offline);
        }
        reg.open_chat(u[0], u[1]).unwrap();
        reg.enqueue(u[0], Frame::text("m")).unwrap();
        reg.touch(u[0]);
        // u[1] was seen longest ago.
        reg.register(u[3], "name", &offline).unwrap();
        assert!(!reg.knows(u[1]));
        assert!(reg.partners(u[0]).is_empty());
        assert_eq!(reg.user_count(), 3);
        // Everyone online: no room.
        assert_eq!(reg.register(u[4], "name", &|_| true), None);
        assert_eq!(reg.queued_total(), 1);
    }

    #[test]
    fn presence_keeps_first_hello_order() {
        let mut reg = Registry::new(&config());
        let u = ids(3);
        for id in &u {
            reg.register(*id, "name", &offline);
        }
        reg.register(u[0], "again", &offline);
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
        let mut reg = Registry::new(&config());
        let u = ids(3);
        for id in &u {
            reg.register(*id, "name", &offline);
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
        let mut small = Registry::new(&Config {
            max_chats_per_user: 1,
            ..config()
        });
        for id in &u {
            small.register(*id, "name", &offline);
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
        let mut reg = Registry::new(&config());
        let u = ids(2);
        for id in &u {
            reg.register(*id, "name", &offline);
        }
        assert!(reg.enqueue(u[0], Frame::text("1")).is_ok());
        assert!(reg.enqueue(u[0], Frame::text("2")).is_ok());
        assert_eq!(
            reg.enqueue(u[0], Frame::text("3")),
            Err(QueueError::UserQueueFull)
        );
        assert!(reg.enqueue(u[1], Frame::text("4")).is_ok());
        assert_eq!(
            reg.enqueue(u[1], Frame::text("5")),
            Err(QueueError::ServerQueueFull)
        );
        let taken = reg.take_queue(u[0]);
        assert_eq!(taken, [Frame::text("1"), Frame::text("2")]);
        assert_eq!(reg.queued_total(), 1);
        assert!(reg.take_queue(u[0]).is_empty());
    }

    #[test]
    fn message_records_turn_the_recipients_ack_into_delivered_once() {
        let mut reg = Registry::new(&config());
        let [a, b] = [Uuid::new_v4(), Uuid::new_v4()];
        reg.record("m1".into(), a, b);
        assert_eq!(reg.mark_delivered("m1", a), None, "only the recipient acks");
        assert_eq!(reg.mark_delivered("m1", b), Some(a));
        assert_eq!(reg.mark_delivered("m1", b), None, "acked once");
        assert_eq!(reg.message("m1").map(|r| r.status), Some(Status::Delivered));
        assert_eq!(reg.mark_delivered("nope", b), None);
    }

    #[test]
    fn message_records_are_bounded_oldest_first() {
        let mut reg = Registry::new(&config());
        let [a, b] = [Uuid::new_v4(), Uuid::new_v4()];
        for id in ["m1", "m2", "m3"] {
            reg.record(id.into(), a, b);
        }
        assert!(reg.message("m1").is_none());
        assert!(reg.message("m2").is_some());
        assert!(reg.message("m3").is_some());
    }
}
