//! The shared state behind one lock: users (event counter, outbox, sockets), stored messages,
//! open calls, the idempotency cache, the rate buckets and the per-client shares.
//!
//! Everything that decides a durable event's id, puts it in an outbox and hands it to sockets
//! happens under the one lock, so a user's sockets see durable events in id order and a socket
//! that connects while events are created misses none of them: it registers, then gets the
//! outbox. Nothing here waits: [`Peer::send`] never blocks. Presence fan-out is the exception to
//! "send under the lock": its ids are allocated here, but the frames are encoded and sent by
//! [`PresenceFanout::send`] after the lock is released (it is O(online users)).
//!
//! Every pool is bounded in items and bytes and charged to one [`MemoryBudget`]; what a client
//! can make the server keep (users that never connected, pending events) is also counted per
//! [`ClientKey`], the client's address, which it cannot change as freely as a `userId`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};
use switchboard_core::{
    ClientKey, CloseReason, ConnId, Frame, MemoryBudget, Peer, Reject, TokenBucket,
};
use tracing::{debug, error};

use crate::Config;
use crate::cost::Share;
use crate::cost::{self, RATE_ENTRY};
use crate::idempotency::IdempotencyCache;
use crate::messages::{
    self, ApiError, CallEvent, CallRequest, CallStored, CloseCallRequest, DeleteEvent, EditEvent,
    EditRequest, ErrorCode, HistoryRequest, MessageRef, NewCallRequest, NewEvent, NewRequest,
    PresenceEvent, ReceiptEvent, ServerEvent, TypingEvent, TypingRequest, now_ms,
};
use crate::outbox::{Charge, Outbox};
use crate::store::{Body, Calls, Messages, OpenCall, Receipt};

/// One user: known implicitly from the first time it connects or is written to.
#[derive(Debug)]
struct User {
    /// The next event id for this user; only grows.
    next_event_id: u64,
    outbox: Outbox,
    sockets: Vec<Peer>,
    /// While the user has never connected: the client that created it by writing to it (its
    /// share of unclaimed users). `None` once it connected, or if it was created by connecting.
    creator: Option<ClientKey>,
    /// The per-user request bucket (`rate_limit` per `rate_window`).
    rate: TokenBucket,
    /// Bytes charged for the user itself (not its outbox).
    charge: usize,
}

impl User {
    fn is_idle(&self) -> bool {
        self.sockets.is_empty() && self.outbox.is_empty()
    }

    fn is_unclaimed(&self) -> bool {
        self.creator.is_some()
    }
}

/// What one client (by address) makes the server keep.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct ClientUsage {
    /// Users it created by writing to them that never connected.
    unclaimed_users: usize,
    /// Unacknowledged events its requests caused, and their charged bytes.
    pending: usize,
    pending_bytes: usize,
}

impl ClientUsage {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One client's rate buckets.
#[derive(Debug, Clone, Copy)]
struct ClientRate {
    requests: TokenBucket,
    connects: TokenBucket,
}

/// Which of a client's buckets to spend from.
#[derive(Debug, Clone, Copy)]
enum RateKind {
    Requests,
    Connects,
}

/// What a request produced: the response payload, and whether a retry should get it again.
struct Answer {
    payload: Value,
    cache: bool,
}

impl Answer {
    /// A response remembered for idempotent retries (the request changed something).
    fn done(payload: Value) -> Self {
        Self {
            payload,
            cache: true,
        }
    }
}

/// A durable event encoded for one recipient, checked against every limit and charged to the
/// budget, not yet in the outbox (see [`State::prepare_events`] and [`State::commit_events`]).
struct Prepared {
    to: String,
    id: u64,
    frame: Frame,
    bytes: usize,
}

/// Counters for tests and status output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Users tracked.
    pub users: usize,
    /// Users with at least one open socket.
    pub online_users: usize,
    /// Users that never connected (created by being written to).
    pub unclaimed_users: usize,
    /// Unacknowledged events across all outboxes.
    pub pending_events: usize,
    /// Charged bytes of those events.
    pub pending_bytes: usize,
    /// Stored messages (deleted ones included until forgotten).
    pub messages: usize,
    /// Open calls.
    pub open_calls: usize,
    /// Remembered responses.
    pub cached_responses: usize,
    /// Client keys holding a share (unclaimed users or pending events).
    pub clients: usize,
    /// Client keys with rate buckets.
    pub rate_keys: usize,
}

/// Bytes charged per pool; their sum is what the [`MemoryBudget`] holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// Users (without their outboxes).
    pub users: usize,
    /// Pending events (frames plus overhead).
    pub pending: usize,
    /// Stored messages.
    pub messages: usize,
    /// Open calls.
    pub calls: usize,
    /// Remembered responses.
    pub cache: usize,
    /// Rate buckets.
    pub rates: usize,
    /// What the budget holds now (the sum of the above).
    pub total: usize,
    /// The budget's limit (`Config::max_state_bytes`).
    pub limit: usize,
}

/// Presence events decided under the lock (ids allocated), to be encoded and sent without it.
#[derive(Debug)]
pub(crate) struct PresenceFanout {
    user: String,
    online: bool,
    /// (event id, sockets) of each other user told about `user`.
    announce: Vec<(u64, Vec<Peer>)>,
    /// For a newcomer: (event id in its own counter, user online now), and its socket.
    roster: Vec<(u64, String)>,
    newcomer: Option<Peer>,
}

impl PresenceFanout {
    /// Encodes and sends every presence frame. Call without holding the state lock.
    pub(crate) fn send(self) {
        let timestamp = now_ms();
        let event = if self.online {
            ServerEvent::Online(PresenceEvent { user_id: self.user })
        } else {
            ServerEvent::Offline(PresenceEvent { user_id: self.user })
        };
        for (id, sockets) in self.announce {
            match messages::event_frame(id, timestamp, &event) {
                Ok(frame) => {
                    for peer in &sockets {
                        let _ = peer.send(frame.clone());
                    }
                }
                Err(e) => error!(error = %e, "could not encode a presence event"),
            }
        }
        let Some(newcomer) = self.newcomer else {
            return;
        };
        let frames: Vec<Frame> = self
            .roster
            .into_iter()
            .filter_map(|(id, other)| {
                let event = ServerEvent::Online(PresenceEvent { user_id: other });
                messages::event_frame(id, timestamp, &event)
                    .map_err(|e| error!(error = %e, "could not encode a presence event"))
                    .ok()
            })
            .collect();
        if !frames.is_empty() {
            let _ = newcomer.send_batch(frames);
        }
    }
}

#[derive(Debug)]
pub(crate) struct State {
    config: Config,
    budget: Arc<MemoryBudget>,
    users: HashMap<String, User>,
    /// Bytes charged for `users` (without outboxes).
    users_bytes: usize,
    /// Users with at least one socket: presence fans out over this, not the whole table.
    online: HashSet<String>,
    /// Users that never connected and have events waiting, keyed by the creation time of their
    /// oldest event: expiry pops from the front.
    expiry: BTreeSet<(Instant, String)>,
    /// Per-client shares, for clients holding anything (removed when back to zero).
    clients: HashMap<ClientKey, ClientUsage>,
    /// Per-client rate buckets, at most `max_clients`.
    rates: HashMap<ClientKey, ClientRate>,
    /// The lowest first event id for a user created from now on: the highest counter of any user
    /// forgotten so far, so ids keep growing even for a user that was forgotten and comes back.
    id_floor: u64,
    pending_total: usize,
    pending_bytes: usize,
    /// Some user may have become idle since the last fruitless sweep of the user table.
    maybe_idle: bool,
    messages: Messages,
    calls: Calls,
    cache: IdempotencyCache,
}

impl State {
    pub(crate) fn new(config: Config, budget: Arc<MemoryBudget>) -> Self {
        Self {
            users: HashMap::new(),
            users_bytes: 0,
            online: HashSet::new(),
            expiry: BTreeSet::new(),
            clients: HashMap::new(),
            rates: HashMap::new(),
            id_floor: 1,
            pending_total: 0,
            pending_bytes: 0,
            maybe_idle: false,
            messages: Messages::new(
                config.max_messages,
                config.max_message_store_bytes,
                Share {
                    items: config.max_messages_per_client,
                    bytes: config.max_message_store_bytes_per_client,
                },
                budget.clone(),
            ),
            calls: Calls::new(
                config.max_open_calls,
                config.max_open_calls_bytes,
                Share {
                    items: config.max_open_calls_per_client,
                    bytes: config.max_open_calls_bytes_per_client,
                },
                budget.clone(),
            ),
            cache: IdempotencyCache::new(
                config.idempotency_cache,
                config.idempotency_cache_bytes,
                Share {
                    items: config.idempotency_cache_per_client,
                    bytes: config.idempotency_cache_bytes_per_client,
                },
                budget.clone(),
            ),
            budget,
            config,
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        Stats {
            users: self.users.len(),
            online_users: self.online.len(),
            unclaimed_users: self.clients.values().map(|c| c.unclaimed_users).sum(),
            pending_events: self.pending_total,
            pending_bytes: self.pending_bytes,
            messages: self.messages.len(),
            open_calls: self.calls.len(),
            cached_responses: self.cache.len(),
            clients: self.clients.len(),
            rate_keys: self.rates.len(),
        }
    }

    pub(crate) fn memory(&self) -> Memory {
        Memory {
            users: self.users_bytes,
            pending: self.pending_bytes,
            messages: self.messages.bytes(),
            calls: self.calls.bytes(),
            cache: self.cache.bytes(),
            rates: self.rates.len().saturating_mul(RATE_ENTRY),
            total: self.budget.used(),
            limit: self.budget.limit(),
        }
    }

    /// Unacknowledged events of `user`.
    pub(crate) fn pending_for(&self, user: &str) -> usize {
        self.users.get(user).map_or(0, |u| u.outbox.len())
    }

    // -----------------------------------------------------------------------------------------
    // Clients: shares and rate buckets

    fn usage_mut(&mut self, client: ClientKey) -> &mut ClientUsage {
        self.clients.entry(client).or_default()
    }

    fn usage(&self, client: ClientKey) -> ClientUsage {
        self.clients.get(&client).copied().unwrap_or_default()
    }

    /// Drops `client`'s entry once it holds nothing.
    fn tidy_client(&mut self, client: ClientKey) {
        if self.clients.get(&client).is_some_and(ClientUsage::is_empty) {
            self.clients.remove(&client);
        }
    }

    /// Gives back what a pending event held.
    fn release_event(&mut self, charge: Charge) {
        self.pending_total = self.pending_total.saturating_sub(1);
        self.pending_bytes = self.pending_bytes.saturating_sub(charge.bytes);
        self.budget.release(charge.bytes);
        let usage = self.usage_mut(charge.sender);
        usage.pending = usage.pending.saturating_sub(1);
        usage.pending_bytes = usage.pending_bytes.saturating_sub(charge.bytes);
        self.tidy_client(charge.sender);
    }

    /// Spends a token of `client`'s bucket of `kind`; `false` means over the rate (or a new
    /// client while the table is full of clients that are all still limited).
    fn rate_allows(&mut self, client: ClientKey, kind: RateKind, now: Instant) -> bool {
        let (limit, window) = match kind {
            RateKind::Requests => (self.config.client_rate_limit, self.config.rate_window),
            RateKind::Connects => (self.config.connect_rate_limit, self.config.rate_window),
        };
        if limit == 0 {
            return true;
        }
        if !self.rates.contains_key(&client) {
            if self.rates.len() >= self.config.max_clients.max(1) {
                // Forget clients whose buckets refilled: a new bucket would be the same.
                let before = self.rates.len();
                self.rates
                    .retain(|_, r| !(r.requests.is_full(now) && r.connects.is_full(now)));
                let forgotten = before.saturating_sub(self.rates.len());
                self.budget.release(forgotten.saturating_mul(RATE_ENTRY));
                if self.rates.len() >= self.config.max_clients.max(1) {
                    return false;
                }
            }
            if self.budget.try_reserve(RATE_ENTRY).is_err() {
                return false;
            }
            self.rates.insert(
                client,
                ClientRate {
                    requests: TokenBucket::full(now),
                    connects: TokenBucket::full(now),
                },
            );
        }
        let Some(rate) = self.rates.get_mut(&client) else {
            return false;
        };
        match kind {
            RateKind::Requests => rate.requests.try_take(cost::rate(limit, window), now),
            RateKind::Connects => rate.connects.try_take(cost::rate(limit, window), now),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Users

    fn check_id(&self, field: &str, value: &str) -> Result<(), ApiError> {
        if value.is_empty() || value.len() > self.config.max_id_bytes {
            return Err(ApiError::bad_request(format!(
                "`{field}` must be a non-empty string of at most {} bytes",
                self.config.max_id_bytes
            )));
        }
        Ok(())
    }

    /// Makes sure every user in `names` exists, forgetting idle users if the table is full, and
    /// returns the ones it created. Users created by writing to them (`creator` is the writing
    /// client) count against that client's share of unclaimed users until they connect.
    fn ensure_users(
        &mut self,
        names: &[&str],
        creator: Option<ClientKey>,
    ) -> Result<Vec<String>, ApiError> {
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !self.users.contains_key(*n))
            .collect();
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        if self.users.len().saturating_add(missing.len()) > self.config.max_users {
            self.forget_idle_users(names);
        }
        if self.users.len().saturating_add(missing.len()) > self.config.max_users {
            return Err(ApiError::new(
                ErrorCode::LimitReached,
                format!(
                    "the server tracks at most {} users and none can be forgotten now; retry later",
                    self.config.max_users
                ),
            ));
        }
        if let Some(client) = creator {
            let held = self.usage(client).unclaimed_users;
            if held.saturating_add(missing.len()) > self.config.max_unclaimed_users_per_client {
                return Err(ApiError::new(
                    ErrorCode::LimitReached,
                    format!(
                        "your client already has {held} users waiting that never connected (at most {}); retry later",
                        self.config.max_unclaimed_users_per_client
                    ),
                ));
            }
        }
        let bytes: Vec<usize> = missing.iter().map(|n| cost::user_bytes(n)).collect();
        let total = bytes.iter().copied().fold(0usize, usize::saturating_add);
        if self.budget.try_reserve(total).is_err() {
            return Err(budget_error());
        }
        self.users_bytes = self.users_bytes.saturating_add(total);
        let now = Instant::now();
        for (name, charge) in missing.iter().zip(bytes) {
            self.users.insert(
                (*name).to_owned(),
                User {
                    next_event_id: self.id_floor,
                    outbox: Outbox::default(),
                    sockets: Vec::new(),
                    creator,
                    rate: TokenBucket::full(now),
                    charge,
                },
            );
        }
        if let Some(client) = creator {
            let usage = self.usage_mut(client);
            usage.unclaimed_users = usage.unclaimed_users.saturating_add(missing.len());
        }
        Ok(missing.into_iter().map(str::to_owned).collect())
    }

    /// Forgets `name` (it must be idle): gives back its charge and share, and raises the id
    /// floor so a re-created user continues above its old ids.
    fn forget_user(&mut self, name: &str) {
        let Some(user) = self.users.remove(name) else {
            return;
        };
        self.id_floor = self.id_floor.max(user.next_event_id);
        self.users_bytes = self.users_bytes.saturating_sub(user.charge);
        self.budget.release(user.charge);
        if let Some(client) = user.creator {
            let usage = self.usage_mut(client);
            usage.unclaimed_users = usage.unclaimed_users.saturating_sub(1);
            self.tidy_client(client);
        }
    }

    /// Forgets users created by a request that then failed (they are idle and never connected).
    fn rollback_users(&mut self, created: &[String]) {
        for name in created {
            if self.users.get(name).is_some_and(User::is_idle) {
                self.forget_user(name);
            }
        }
    }

    /// Forgets every user that is offline with an empty outbox, except those in `keep`. Skipped
    /// when no user became idle since the last sweep that found nobody (so a full table of
    /// active users does not cost a full scan per request).
    fn forget_idle_users(&mut self, keep: &[&str]) {
        if !self.maybe_idle {
            return;
        }
        let idle: Vec<String> = self
            .users
            .iter()
            .filter(|(name, user)| user.is_idle() && !keep.contains(&name.as_str()))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &idle {
            self.forget_user(name);
        }
        debug!(forgotten = idle.len(), "forgot idle users");
        // Users kept only because of `keep` may still be idle.
        self.maybe_idle = self.users.values().any(User::is_idle);
    }

    /// Drops events that waited `unclaimed_ttl` for a user that never connected, and forgets
    /// such users once nothing is left for them. Cheap when nothing is due (one look at the
    /// oldest entry).
    pub(crate) fn expire_unclaimed(&mut self, now: Instant) {
        let Some(cutoff) = now.checked_sub(self.config.unclaimed_ttl) else {
            return;
        };
        while let Some((oldest, _)) = self.expiry.first() {
            if *oldest > cutoff {
                return;
            }
            let Some((_, name)) = self.expiry.pop_first() else {
                return;
            };
            let Some(user) = self.users.get_mut(&name) else {
                continue;
            };
            if !user.is_unclaimed() {
                continue;
            }
            let expired = user.outbox.expire(cutoff);
            let next = user.outbox.oldest_created();
            let count = expired.len();
            for charge in expired {
                self.release_event(charge);
            }
            debug!(user = %name, count, "dropped events that waited too long for a user that never connected");
            match next {
                Some(created) => {
                    self.expiry.insert((created, name));
                }
                None => self.forget_user(&name),
            }
        }
    }

    /// Admission for an upgrade by `user` from `client`.
    pub(crate) fn admit(
        &mut self,
        user: &str,
        client: ClientKey,
        now: Instant,
    ) -> Result<(), Reject> {
        self.check_id("userId", user)
            .map_err(|e| Reject::BadRequest(e.message))?;
        self.expire_unclaimed(now);
        if !self.rate_allows(client, RateKind::Connects, now) {
            return Err(Reject::TooMany(format!(
                "more than {} connects from your address in {:?}; retry later",
                self.config.connect_rate_limit, self.config.rate_window
            )));
        }
        self.ensure_users(&[user], None)
            .map_err(|e| Reject::Unavailable(e.message))?;
        let sockets = self.users.get(user).map_or(0, |u| u.sockets.len());
        if sockets >= self.config.max_sockets_per_user {
            return Err(Reject::Unavailable(format!(
                "user already has {sockets} sockets open (at most {})",
                self.config.max_sockets_per_user
            )));
        }
        // Until its socket opens the user may look idle; that is fine: `open` recreates it.
        self.maybe_idle = true;
        Ok(())
    }

    /// A socket of `user` opened: register it, send it every unacked event in id order, and
    /// decide the presence fan-out if this is its first socket (sent by the caller without the
    /// lock).
    pub(crate) fn open(&mut self, user: &str, peer: &Peer, now: Instant) -> Option<PresenceFanout> {
        if let Err(error) = self.ensure_users(&[user], None) {
            peer.close(CloseReason::new(1013, error.message));
            return None;
        }
        let timeout = self.config.redelivery_timeout;
        let max_sockets = self.config.max_sockets_per_user;
        let entry = self.users.get_mut(user)?;
        if entry.sockets.len() >= max_sockets {
            peer.close(CloseReason::new(
                CloseReason::POLICY,
                "too many sockets for this user",
            ));
            return None;
        }
        entry.sockets.push(peer.clone());
        let frames = entry.outbox.resend_all(now, timeout);
        let first = entry.sockets.len() == 1;
        // The user connected: it is claimed. Its events are kept until acked from now on, and it
        // no longer counts against its creator's share.
        let oldest = entry.outbox.oldest_created();
        if let Some(creator) = entry.creator.take() {
            if let Some(created) = oldest {
                self.expiry.remove(&(created, user.to_owned()));
            }
            let usage = self.usage_mut(creator);
            usage.unclaimed_users = usage.unclaimed_users.saturating_sub(1);
            self.tidy_client(creator);
        }
        if !frames.is_empty() {
            let _ = peer.send_batch(frames);
        }
        if !first {
            return None;
        }
        self.online.insert(user.to_owned());
        let mut fanout = self.presence(user, true);
        // The newcomer learns who is online now, after its redelivered events.
        let names = self.online_others(user);
        if let Some(entry) = self.users.get_mut(user) {
            for other in names {
                let id = entry.next_event_id;
                entry.next_event_id = id.saturating_add(1);
                fanout.roster.push((id, other));
            }
        }
        fanout.newcomer = Some(peer.clone());
        Some(fanout)
    }

    /// A socket of `user` closed: forget it, and decide the offline fan-out if it was the last.
    pub(crate) fn close(&mut self, user: &str, conn: ConnId) -> Option<PresenceFanout> {
        let entry = self.users.get_mut(user)?;
        let before = entry.sockets.len();
        entry.sockets.retain(|p| p.id() != conn);
        let last = before > 0 && entry.sockets.is_empty();
        if entry.is_idle() {
            self.maybe_idle = true;
        }
        if !last {
            return None;
        }
        self.online.remove(user);
        Some(self.presence(user, false))
    }

    /// Other online users, at most `max_presence_fanout`.
    fn online_others(&self, user: &str) -> Vec<String> {
        self.online
            .iter()
            .filter(|name| name.as_str() != user)
            .take(self.config.max_presence_fanout)
            .cloned()
            .collect()
    }

    /// Allocates one presence event id in each other online user's counter (at most
    /// `max_presence_fanout`) and collects their sockets.
    fn presence(&mut self, user: &str, online: bool) -> PresenceFanout {
        let names = self.online_others(user);
        let mut announce = Vec::with_capacity(names.len());
        for name in names {
            if let Some(other) = self.users.get_mut(&name) {
                let id = other.next_event_id;
                other.next_event_id = id.saturating_add(1);
                announce.push((id, other.sockets.clone()));
            }
        }
        PresenceFanout {
            user: user.to_owned(),
            online,
            announce,
            roster: Vec::new(),
            newcomer: None,
        }
    }

    /// An ack from any socket of `user` removes the event from its outbox.
    pub(crate) fn ack(&mut self, user: &str, id: u64) {
        let Some(entry) = self.users.get_mut(user) else {
            return;
        };
        let Some(charge) = entry.outbox.ack(id) else {
            return;
        };
        if entry.is_idle() {
            self.maybe_idle = true;
        }
        self.release_event(charge);
    }

    /// Sends `user`'s overdue events again, to every socket it has open.
    pub(crate) fn redeliver_overdue(&mut self, user: &str, now: Instant) {
        let timeout = self.config.redelivery_timeout;
        let Some(entry) = self.users.get_mut(user) else {
            return;
        };
        if entry.sockets.is_empty() {
            return;
        }
        let frames = entry.outbox.take_overdue(now, timeout);
        if frames.is_empty() {
            return;
        }
        debug!(user, count = frames.len(), "redelivering unacked events");
        for peer in &entry.sockets {
            let _ = peer.send_batch(frames.clone());
        }
    }

    // -----------------------------------------------------------------------------------------
    // Events

    /// Encodes `event` for each recipient (with the id it will get), checks every limit the
    /// events must fit (each outbox in items and bytes, the smaller outbox of users that never
    /// connected, the server's totals, the sender client's share) and charges their bytes to the
    /// budget. Nothing else changes: [`State::commit_events`] stores and sends them, or
    /// [`State::cancel_events`] gives the charge back.
    fn prepare_events(
        &self,
        recipients: &[&str],
        event: &ServerEvent,
        sender: ClientKey,
    ) -> Result<Vec<Prepared>, ApiError> {
        if event.is_ephemeral() {
            return Err(ApiError::new(
                ErrorCode::Internal,
                "an ephemeral event cannot be queued (bug)",
            ));
        }
        // Item limits first: they need no encoding, so a flood of refused requests stays cheap.
        let count = recipients.len();
        if self.pending_total.saturating_add(count) > self.config.max_pending_events {
            return Err(self.pending_full());
        }
        let usage = self.usage(sender);
        if usage.pending.saturating_add(count) > self.config.max_pending_per_client {
            return Err(self.client_share_full(usage));
        }
        let timestamp = now_ms();
        let mut prepared = Vec::with_capacity(recipients.len());
        for name in recipients {
            let Some(user) = self.users.get(*name) else {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    format!("{name:?} is not known (bug)"),
                ));
            };
            let id = user.next_event_id;
            let frame = messages::event_frame(id, timestamp, event).map_err(|e| {
                ApiError::new(ErrorCode::Internal, format!("could not encode: {e}"))
            })?;
            let bytes = cost::event_bytes(frame.as_str().len());
            let (limit, limit_bytes, whose) = if user.is_unclaimed() {
                (
                    self.config
                        .unclaimed_outbox_limit
                        .min(self.config.outbox_limit),
                    self.config
                        .unclaimed_outbox_bytes
                        .min(self.config.outbox_limit_bytes),
                    "a user that never connected may have",
                )
            } else {
                (
                    self.config.outbox_limit,
                    self.config.outbox_limit_bytes,
                    "a user may have",
                )
            };
            let waiting = user.outbox.len();
            if waiting >= limit || user.outbox.bytes().saturating_add(bytes) > limit_bytes {
                return Err(ApiError::new(
                    ErrorCode::OutboxFull,
                    format!(
                        "{name:?} has {waiting} unacknowledged events ({} bytes; {whose} {limit} events, {limit_bytes} bytes); nothing was sent, retry later",
                        user.outbox.bytes()
                    ),
                ));
            }
            prepared.push(Prepared {
                to: (*name).to_owned(),
                id,
                frame,
                bytes,
            });
        }
        let bytes = prepared
            .iter()
            .map(|p| p.bytes)
            .fold(0usize, usize::saturating_add);
        if self.pending_bytes.saturating_add(bytes) > self.config.max_pending_bytes {
            return Err(self.pending_full());
        }
        if usage.pending_bytes.saturating_add(bytes) > self.config.max_pending_bytes_per_client {
            return Err(self.client_share_full(usage));
        }
        if self.budget.try_reserve(bytes).is_err() {
            return Err(budget_error());
        }
        Ok(prepared)
    }

    fn pending_full(&self) -> ApiError {
        ApiError::new(
            ErrorCode::OutboxFull,
            format!(
                "the server holds {} unacknowledged events ({} bytes; the limit is {} events, {} bytes); nothing was sent, retry later",
                self.pending_total,
                self.pending_bytes,
                self.config.max_pending_events,
                self.config.max_pending_bytes
            ),
        )
    }

    fn client_share_full(&self, usage: ClientUsage) -> ApiError {
        ApiError::new(
            ErrorCode::OutboxFull,
            format!(
                "events your client sent are waiting unacknowledged: {} ({} bytes; at most {} events, {} bytes); nothing was sent, retry later",
                usage.pending,
                usage.pending_bytes,
                self.config.max_pending_per_client,
                self.config.max_pending_bytes_per_client
            ),
        )
    }

    /// Gives back the budget charge of events that will not be committed.
    fn cancel_events(&self, prepared: &[Prepared]) {
        let bytes = prepared
            .iter()
            .map(|p| p.bytes)
            .fold(0usize, usize::saturating_add);
        self.budget.release(bytes);
    }

    /// Stores each prepared event in its recipient's outbox (charged to `sender`) and sends it
    /// to every socket of the recipient.
    fn commit_events(&mut self, prepared: Vec<Prepared>, sender: ClientKey, now: Instant) {
        let timeout = self.config.redelivery_timeout;
        for event in prepared {
            let Some(user) = self.users.get_mut(&event.to) else {
                // Cannot happen (checked in prepare under the same lock); keep the books right.
                self.budget.release(event.bytes);
                error!(to = %event.to, "durable event for an unknown user dropped (bug)");
                continue;
            };
            user.next_event_id = event.id.saturating_add(1);
            let was_empty = user.outbox.is_empty();
            let charge = Charge {
                sender,
                bytes: event.bytes,
            };
            user.outbox
                .push(event.id, event.frame.clone(), charge, now, timeout);
            for peer in &user.sockets {
                let _ = peer.send(event.frame.clone());
            }
            if was_empty && user.is_unclaimed() {
                self.expiry.insert((now, event.to));
            }
            self.pending_total = self.pending_total.saturating_add(1);
            self.pending_bytes = self.pending_bytes.saturating_add(charge.bytes);
            let usage = self.usage_mut(sender);
            usage.pending = usage.pending.saturating_add(1);
            usage.pending_bytes = usage.pending_bytes.saturating_add(charge.bytes);
        }
    }

    /// Sends an ephemeral event (`typing`) to the sockets of `to` open now, with the next id of
    /// `to`; nothing is stored, and a user without sockets gets nothing (and uses no id).
    fn emit_ephemeral(&mut self, to: &str, event: &ServerEvent) {
        let Some(entry) = self.users.get_mut(to) else {
            return;
        };
        if entry.sockets.is_empty() {
            return;
        }
        let id = entry.next_event_id;
        entry.next_event_id = id.saturating_add(1);
        match messages::event_frame(id, now_ms(), event) {
            Ok(frame) => {
                for peer in &entry.sockets {
                    let _ = peer.send(frame.clone());
                }
            }
            Err(e) => error!(error = %e, "could not encode an event"),
        }
    }

    /// Makes sure the recipients exist (created users charged to `sender` until they connect)
    /// and that one `event` fits for each of them; on success the events are ready to commit.
    /// On failure users created here are forgotten again and nothing is charged.
    fn prepare(
        &mut self,
        recipients: &[&str],
        event: &ServerEvent,
        sender: ClientKey,
    ) -> Result<(Vec<Prepared>, Vec<String>), ApiError> {
        let created = self.ensure_users(recipients, Some(sender))?;
        match self.prepare_events(recipients, event, sender) {
            Ok(prepared) => Ok((prepared, created)),
            Err(error) => {
                self.rollback_users(&created);
                Err(error)
            }
        }
    }

    /// Undoes a successful [`State::prepare`] whose request then failed.
    fn abandon(&mut self, prepared: &[Prepared], created: &[String]) {
        self.cancel_events(prepared);
        self.rollback_users(created);
    }

    // -----------------------------------------------------------------------------------------
    // Requests

    /// Answers request `id` of `user`: from the idempotency cache if it was answered before,
    /// else by running it (rate limit first). Returns the response frame.
    pub(crate) fn request(
        &mut self,
        user: &str,
        client: ClientKey,
        id: &str,
        payload_type: Option<&str>,
        payload: Value,
        now: Instant,
    ) -> Option<Frame> {
        self.expire_unclaimed(now);
        if let Some(cached) = self.cache.get(user, id) {
            debug!(user, id, "idempotent retry answered from the cache");
            return Some(cached);
        }
        let answer = match self.rate_check(user, client, now) {
            Ok(()) => self.dispatch(user, client, payload_type, payload, now),
            Err(error) => Err(error),
        };
        let (payload, cache) = match answer {
            Ok(answer) => (answer.payload, answer.cache),
            Err(error) => (messages::error_payload(&error), false),
        };
        match messages::response_frame(id, now_ms(), &payload) {
            Ok(frame) => {
                if cache {
                    self.cache.insert(user, id, client, frame.clone());
                }
                Some(frame)
            }
            Err(e) => {
                error!(error = %e, "could not encode a response");
                None
            }
        }
    }

    /// Spends a token of `user`'s bucket and of `client`'s; `RATE_LIMITED` if either is empty.
    fn rate_check(&mut self, user: &str, client: ClientKey, now: Instant) -> Result<(), ApiError> {
        let (limit, window) = (self.config.rate_limit, self.config.rate_window);
        let user_ok = self
            .users
            .get_mut(user)
            .is_none_or(|u| u.rate.try_take(cost::rate(limit, window), now));
        if !user_ok {
            return Err(ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "more than {limit} requests and events in {window:?}; retry later with the same id"
                ),
            ));
        }
        if !self.rate_allows(client, RateKind::Requests, now) {
            return Err(ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "more than {} requests and events from your address in {window:?}, whatever the userId; retry later with the same id",
                    self.config.client_rate_limit
                ),
            ));
        }
        Ok(())
    }

    fn dispatch(
        &mut self,
        user: &str,
        client: ClientKey,
        payload_type: Option<&str>,
        payload: Value,
        now: Instant,
    ) -> Result<Answer, ApiError> {
        let Some(kind) = payload_type else {
            return Err(ApiError::bad_request(
                "a request needs a string `payloadType`",
            ));
        };
        match kind {
            "new" => self.new_message(user, client, messages::payload(kind, payload)?, now),
            "edit" => self.edit(user, client, messages::payload(kind, payload)?, now),
            "delete" => self.delete(user, client, messages::payload(kind, payload)?, now),
            "dlvrd" => self.receipt(
                user,
                client,
                messages::payload(kind, payload)?,
                Receipt::Delivered,
                now,
            ),
            "read" => self.receipt(
                user,
                client,
                messages::payload(kind, payload)?,
                Receipt::Read,
                now,
            ),
            "call" => self.call(user, client, messages::payload(kind, payload)?, now),
            "newCall" => self.new_call(user, client, messages::payload(kind, payload)?, now),
            "closeCall" => self.close_call(user, client, messages::payload(kind, payload)?, now),
            "history" => self.history(user, messages::payload(kind, payload)?),
            other => Err(ApiError::new(
                ErrorCode::UnknownPayloadType,
                format!(
                    "unknown payloadType {other:?}; expected new, edit, delete, dlvrd, read, call, newCall, closeCall or history"
                ),
            )),
        }
    }

    fn check_text(&self, text: &str) -> Result<(), ApiError> {
        if text.trim().is_empty() {
            return Err(ApiError::bad_request("`message` must not be empty"));
        }
        if text.len() > self.config.max_message_bytes {
            return Err(ApiError::bad_request(format!(
                "`message` is longer than {} bytes",
                self.config.max_message_bytes
            )));
        }
        Ok(())
    }

    fn new_message(
        &mut self,
        user: &str,
        client: ClientKey,
        request: NewRequest,
        now: Instant,
    ) -> Result<Answer, ApiError> {
        self.check_id("chatId", &request.chat_id)?;
        self.check_text(&request.message)?;
        if let Some(client_id) = &request.client_message_id {
            self.check_id("clientMessageId", client_id)?;
        }
        let to = request.chat_id;
        let timestamp = now_ms();
        let message_id = self.messages.next_id();
        let event = ServerEvent::New(NewEvent {
            message_id,
            from: user.to_owned(),
            chat_id: user.to_owned(),
            message: request.message.clone(),
            client_message_id: request.client_message_id.clone(),
            timestamp,
        });
        let (prepared, created) = self.prepare(&[&to], &event, client)?;
        let body = Body::Text {
            message: request.message,
            client_message_id: request.client_message_id,
            edited: false,
        };
        if self
            .messages
            .insert(user, &to, timestamp, body, client)
            .is_err()
        {
            self.abandon(&prepared, &created);
            return Err(budget_error());
        }
        self.commit_events(prepared, client, now);
        Ok(Answer::done(json!({ "messageId": message_id })))
    }

    /// The live message `id` authored by `user`.
    fn own_message(&self, user: &str, id: u64) -> Result<(String, Option<String>), ApiError> {
        let message = self
            .messages
            .live(id)
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no message {id}")))?;
        if message.from != user {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("message {id} was not sent by you"),
            ));
        }
        Ok((message.to.clone(), message.body.client_message_id()))
    }

    fn edit(
        &mut self,
        user: &str,
        client: ClientKey,
        request: EditRequest,
        now: Instant,
    ) -> Result<Answer, ApiError> {
        let id = request.message_id;
        let (to, client_message_id) = self.own_message(user, id)?;
        if matches!(
            self.messages.live(id).map(|m| &m.body),
            Some(Body::Call { .. })
        ) {
            return Err(ApiError::bad_request(format!(
                "message {id} is a call message and cannot be edited"
            )));
        }
        self.check_text(&request.message)?;
        let event = ServerEvent::Edit(EditEvent {
            message_id: id,
            from: user.to_owned(),
            chat_id: user.to_owned(),
            message: request.message.clone(),
            original_message_id: id,
            original_client_message_id: client_message_id,
            timestamp: now_ms(),
        });
        let (prepared, created) = self.prepare(&[&to], &event, client)?;
        if self.messages.edit(id, &request.message).is_err() {
            self.abandon(&prepared, &created);
            return Err(budget_error());
        }
        self.commit_events(prepared, client, now);
        Ok(Answer::done(json!({ "messageId": id })))
    }

    fn delete(
        &mut self,
        user: &str,
        client: ClientKey,
        request: MessageRef,
        now: Instant,
    ) -> Result<Answer, ApiError> {
        let id = request.message_id;
        let (to, client_message_id) = self.own_message(user, id)?;
        let event = ServerEvent::Delete(DeleteEvent {
            message_id: id,
            from: user.to_owned(),
            chat_id: user.to_owned(),
            original_message_id: id,
            original_client_message_id: client_message_id,
        });
        let (prepared, _) = self.prepare(&[&to], &event, client)?;
        self.messages.delete(id);
        self.commit_events(prepared, client, now);
        Ok(Answer::done(json!({ "messageId": id })))
    }

    fn receipt(
        &mut self,
        user: &str,
        client: ClientKey,
        request: MessageRef,
        receipt: Receipt,
        now: Instant,
    ) -> Result<Answer, ApiError> {
        let id = request.message_id;
        let message = self
            .messages
            .live(id)
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no message {id}")))?;
        if message.to != user {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("message {id} was not sent to you"),
            ));
        }
        let salute = Answer::done(json!("🫡"));
        if message.receipt >= receipt {
            // Receipts only advance: a repeated or older receipt is acknowledged, not re-sent.
            return Ok(salute);
        }
        let author = message.from.clone();
        let payload = ReceiptEvent {
            message_id: id,
            chat_id: user.to_owned(),
        };
        let event = match receipt {
            Receipt::Read => ServerEvent::Read(payload),
            Receipt::Delivered | Receipt::Sent => ServerEvent::Dlvrd(payload),
        };
        let (prepared, _) = self.prepare(&[&author], &event, client)?;
        if let Some(stored) = self.messages.live_mut(id) {
            stored.receipt = receipt;
        }
        self.commit_events(prepared, client, now);
        Ok(salute)
    }

    fn call(
        &mut self,
        user: &str,
        client: ClientKey,
        request: CallRequest,
        now: Instant,
    ) -> Result<Answer, ApiError> {
        self.check_id("chatId", &request.chat_id)?;
        let to = request.chat_id;
        let timestamp = now_ms();
        let message_id = self.messages.next_id();
        let event = ServerEvent::Call(CallEvent {
            message_id,
            from: user.to_owned(),
            chat_id: user.to_owned(),
            call_type: request.call_type,
            direction: request.direction,
            status: request.status,
            timestamp,
        });
        let (prepared, created) = self.prepare(&[&to], &event, client)?;
        let body = Body::Call {
            call_type: request.call_type,
            direction: request.direction,
            status: request.status,
        };
        if self
            .messages
            .insert(user, &to, timestamp, body, client)
            .is_err()
        {
            self.abandon(&prepared, &created);
            return Err(budget_error());
        }
        self.commit_events(prepared, client, now);
        Ok(Answer::done(json!({ "messageId": message_id })))
    }

    fn new_call(
        &mut self,
        user: &str,
        client: ClientKey,
        request: NewCallRequest,
        now: Instant,
    ) -> Result<Answer, ApiError> {
        let mut participants: Vec<String> = Vec::new();
        for participant in request.participants {
            self.check_id("participants[]", &participant)?;
            if participant != user && !participants.contains(&participant) {
                participants.push(participant);
            }
            if participants.len() > self.config.max_call_participants {
                return Err(ApiError::bad_request(format!(
                    "a call has at most {} participants besides the caller",
                    self.config.max_call_participants
                )));
            }
        }
        if participants.is_empty() {
            return Err(ApiError::bad_request(
                "`participants` must name at least one user besides the caller",
            ));
        }
        let call_id = uuid::Uuid::new_v4().to_string();
        let stored = CallStored {
            call_id: call_id.clone(),
            caller: user.to_owned(),
            participants: participants.clone(),
            call_type: request.call_type,
            call_duration: 0,
        };
        let answer = to_value(&stored)?;
        let event = ServerEvent::NewCall(stored);
        let recipients: Vec<&str> = participants.iter().map(String::as_str).collect();
        let (prepared, created) = self.prepare(&recipients, &event, client)?;
        let call = OpenCall {
            caller: user.to_owned(),
            participants,
            call_type: request.call_type,
            started: now,
        };
        if self.calls.insert(call_id, call, client).is_err() {
            self.abandon(&prepared, &created);
            return Err(budget_error());
        }
        self.commit_events(prepared, client, now);
        Ok(Answer::done(answer))
    }

    fn close_call(
        &mut self,
        user: &str,
        client: ClientKey,
        request: CloseCallRequest,
        now: Instant,
    ) -> Result<Answer, ApiError> {
        self.check_id("callId", &request.call_id)?;
        let call = self.calls.get(&request.call_id).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("no open call {:?}", request.call_id),
            )
        })?;
        if !call.involves(user) {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "only the caller or a participant can close a call",
            ));
        }
        let members: Vec<String> = std::iter::once(call.caller.clone())
            .chain(call.participants.iter().cloned())
            .filter(|m| m != user)
            .collect();
        let stored = CallStored {
            call_id: request.call_id.clone(),
            caller: call.caller.clone(),
            participants: call.participants.clone(),
            call_type: call.call_type,
            call_duration: now.saturating_duration_since(call.started).as_secs(),
        };
        let answer = to_value(&stored)?;
        let event = ServerEvent::CloseCall(stored);
        let recipients: Vec<&str> = members.iter().map(String::as_str).collect();
        let (prepared, _) = self.prepare(&recipients, &event, client)?;
        self.calls.remove(&request.call_id);
        self.commit_events(prepared, client, now);
        Ok(Answer::done(answer))
    }

    fn history(&self, user: &str, request: HistoryRequest) -> Result<Answer, ApiError> {
        self.check_id("chatId", &request.chat_id)?;
        let limit = request
            .limit
            .unwrap_or(self.config.history_default_limit)
            .clamp(1, self.config.history_page_limit.max(1));
        let page = self
            .messages
            .history(user, &request.chat_id, request.before, limit);
        Ok(Answer {
            payload: json!({ "messages": page }),
            // Read-only and possibly large: a retry reads again instead of using the cache.
            cache: false,
        })
    }

    // -----------------------------------------------------------------------------------------
    // Client events

    /// A client event from `user`; `Err` is answered with an error frame.
    pub(crate) fn client_event(
        &mut self,
        user: &str,
        client: ClientKey,
        event_type: &str,
        payload: Value,
        now: Instant,
    ) -> Result<(), ApiError> {
        if event_type != "typing" {
            return Err(ApiError::new(
                ErrorCode::UnknownEventType,
                format!("unknown client eventType {event_type:?}; expected typing"),
            ));
        }
        self.rate_check(user, client, now)?;
        let typing: TypingRequest = messages::payload(event_type, payload)?;
        self.check_id("chatId", &typing.chat_id)?;
        let event = ServerEvent::Typing(TypingEvent {
            chat_id: user.to_owned(),
        });
        self.emit_ephemeral(&typing.chat_id, &event);
        Ok(())
    }
}

/// The error for new work refused because the protocol's memory budget is full.
fn budget_error() -> ApiError {
    ApiError::new(
        ErrorCode::LimitReached,
        "the server's memory budget for this protocol is full; nothing was done, retry later",
    )
}

fn to_value<T: serde::Serialize>(value: &T) -> Result<Value, ApiError> {
    serde_json::to_value(value)
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("could not encode: {e}")))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use switchboard_core::{Outgoing, PeerLink, peer_channel};

    use super::*;

    fn peer() -> (Peer, PeerLink) {
        peer_channel(SocketAddr::from(([127, 0, 0, 1], 1)), 64)
    }

    fn drain(link: &mut PeerLink) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(item) = link.try_recv() {
            let frames = match item {
                Outgoing::Frame(frame) => vec![frame],
                Outgoing::Batch(frames) => frames,
                Outgoing::Binary(_) => Vec::new(),
            };
            out.extend(
                frames
                    .iter()
                    .map(|f| serde_json::from_str::<Value>(f.as_str()).unwrap()),
            );
        }
        out
    }

    fn client(last: u8) -> ClientKey {
        ClientKey::from_ip(std::net::IpAddr::from([127, 0, 0, last]))
    }

    fn state(config: Config) -> State {
        let budget = Arc::new(MemoryBudget::new(config.max_state_bytes));
        State::new(config, budget)
    }

    fn send(state: &mut State, user: &str, id: &str, kind: &str, payload: Value) -> Value {
        send_from(state, client(1), user, id, kind, payload)
    }

    fn send_from(
        state: &mut State,
        from: ClientKey,
        user: &str,
        id: &str,
        kind: &str,
        payload: Value,
    ) -> Value {
        let frame = state
            .request(user, from, id, Some(kind), payload, Instant::now())
            .unwrap();
        serde_json::from_str(frame.as_str()).unwrap()
    }

    fn open(state: &mut State, user: &str, peer: &Peer, now: Instant) {
        if let Some(fanout) = state.open(user, peer, now) {
            fanout.send();
        }
    }

    #[test]
    fn offline_events_wait_and_ids_survive_forgetting_idle_users() {
        let mut state = state(Config {
            max_users: 2,
            ..Config::default()
        });
        let now = Instant::now();
        let (a, mut a_link) = peer();
        state.admit("a", client(1), now).unwrap();
        open(&mut state, "a", &a, now);
        let r = send(
            &mut state,
            "a",
            "1",
            "new",
            json!({"chatId":"b","message":"hi"}),
        );
        assert_eq!(r["payload"]["messageId"], 1);
        assert_eq!(state.pending_for("b"), 1);
        // b connects, gets the event with id 1, acks it and leaves: b is idle now.
        let (b, mut b_link) = peer();
        open(&mut state, "b", &b, now);
        let events = drain(&mut b_link);
        assert_eq!(events[0]["id"], 1);
        assert_eq!(events[0]["eventType"], "new");
        state.ack("b", 1);
        state.close("b", b.id());
        assert_eq!(state.stats().pending_events, 0);
        drain(&mut a_link);
        // A third user needs b's slot: b is forgotten, and its ids still grow when it returns.
        send(
            &mut state,
            "a",
            "2",
            "new",
            json!({"chatId":"c","message":"hi"}),
        );
        assert_eq!(state.stats().users, 2);
        let (b2, mut b2_link) = peer();
        state.admit("b", client(1), now).unwrap_err();
        // c was created after b was forgotten: its ids start above b's (the floor), not at 1.
        state.ack("c", 1);
        assert_eq!(state.pending_for("c"), 1);
        for id in 2..10 {
            state.ack("c", id);
        }
        assert_eq!(state.pending_for("c"), 0);
        state.admit("b", client(1), now).unwrap();
        open(&mut state, "b", &b2, now);
        let ids: Vec<u64> = drain(&mut b2_link)
            .iter()
            .map(|e| e["id"].as_u64().unwrap())
            .collect();
        assert!(ids.iter().all(|id| *id > 1), "{ids:?}");
    }

    #[test]
    fn a_full_outbox_fails_the_request_and_stores_nothing() {
        let mut state = state(Config {
            outbox_limit: 2,
            ..Config::default()
        });
        for i in 0..2 {
            let r = send(
                &mut state,
                "a",
                &i.to_string(),
                "new",
                json!({"chatId":"b","message":"x"}),
            );
            assert!(r["payload"]["messageId"].is_u64());
        }
        let r = send(
            &mut state,
            "a",
            "3",
            "new",
            json!({"chatId":"b","message":"x"}),
        );
        assert_eq!(r["payload"]["error"]["code"], "OUTBOX_FULL");
        assert_eq!(state.stats().messages, 2);
        // The failure is not cached: once b acks, the same request id goes through.
        state.ack("b", 1);
        let r = send(
            &mut state,
            "a",
            "3",
            "new",
            json!({"chatId":"b","message":"x"}),
        );
        assert_eq!(r["payload"]["messageId"], 3);
    }

    #[test]
    fn the_server_wide_pending_bound_applies_too() {
        let mut state = state(Config {
            max_pending_events: 1,
            ..Config::default()
        });
        send(
            &mut state,
            "a",
            "1",
            "new",
            json!({"chatId":"b","message":"x"}),
        );
        let r = send(
            &mut state,
            "a",
            "2",
            "new",
            json!({"chatId":"c","message":"x"}),
        );
        assert_eq!(r["payload"]["error"]["code"], "OUTBOX_FULL");
    }

    #[test]
    fn retries_are_answered_from_the_cache() {
        let mut state = state(Config::default());
        let first = send(
            &mut state,
            "a",
            "r",
            "new",
            json!({"chatId":"b","message":"x"}),
        );
        let again = send(
            &mut state,
            "a",
            "r",
            "new",
            json!({"chatId":"b","message":"x"}),
        );
        assert_eq!(first, again);
        assert_eq!(state.pending_for("b"), 1);
        assert_eq!(state.stats().messages, 1);
    }

    #[test]
    fn overdue_events_go_to_every_socket_of_the_user() {
        let mut state = state(Config {
            redelivery_timeout: Duration::from_secs(1),
            ..Config::default()
        });
        let t0 = Instant::now();
        let (b1, mut l1) = peer();
        let (b2, mut l2) = peer();
        open(&mut state, "b", &b1, t0);
        open(&mut state, "b", &b2, t0);
        send(
            &mut state,
            "a",
            "1",
            "new",
            json!({"chatId":"b","message":"x"}),
        );
        assert_eq!(drain(&mut l1).len(), 1);
        assert_eq!(drain(&mut l2).len(), 1);
        state.redeliver_overdue("b", t0 + Duration::from_millis(500));
        assert!(drain(&mut l1).is_empty());
        state.redeliver_overdue("b", t0 + Duration::from_secs(5));
        assert_eq!(drain(&mut l1)[0]["id"], 1);
        assert_eq!(drain(&mut l2)[0]["id"], 1);
        state.ack("b", 1);
        state.redeliver_overdue("b", t0 + Duration::from_secs(60));
        assert!(drain(&mut l1).is_empty());
    }

    #[test]
    fn receipts_only_advance() {
        let mut state = state(Config::default());
        send(
            &mut state,
            "a",
            "1",
            "new",
            json!({"chatId":"b","message":"x"}),
        );
        let r = send(&mut state, "b", "1", "read", json!({"messageId":1}));
        assert_eq!(r["payload"], "🫡");
        let r = send(&mut state, "b", "2", "dlvrd", json!({"messageId":1}));
        assert_eq!(r["payload"], "🫡");
        assert_eq!(
            state.pending_for("a"),
            1,
            "only the read receipt became an event"
        );
        let r = send(&mut state, "a", "2", "read", json!({"messageId":1}));
        assert_eq!(r["payload"]["error"]["code"], "FORBIDDEN");
    }

    fn name(prefix: &str, i: usize, len: usize) -> String {
        let mut name = format!("{prefix}{i}-");
        while name.len() < len {
            name.push('x');
        }
        name
    }

    /// Acks every pending event of every user (makes room in the pending pool).
    fn ack_everything(state: &mut State) {
        let names: Vec<(String, u64)> = state
            .users
            .iter()
            .map(|(n, u)| (n.clone(), u.next_event_id))
            .collect();
        for (n, next) in names {
            for id in 0..next {
                state.ack(&n, id);
            }
        }
    }

    /// Fills every pool through requests with maximal ids and texts; returns the error codes
    /// seen.
    fn fill_every_pool(state: &mut State) -> HashSet<String> {
        let config = state.config.clone();
        let id_len = config.max_id_bytes;
        let text = "\"".repeat(config.max_message_bytes);
        let mut codes = HashSet::new();
        let mut note = |r: &Value| {
            if let Some(code) = r["payload"]["error"]["code"].as_str() {
                codes.insert(code.to_owned());
            }
        };
        let clients = config.max_clients + 2;
        let recipients: Vec<String> = (0..config.max_users)
            .map(|i| name("r", i, id_len))
            .collect();
        for i in 0..(config.max_messages * 3) {
            let from = name("s", i % clients, id_len);
            let to = &recipients[i % recipients.len()];
            let request_id = name("q", i, id_len);
            let key = client(u8::try_from(i % clients).unwrap());
            let r = send_from(
                state,
                key,
                &from,
                &request_id,
                "new",
                json!({"chatId": to, "message": text, "clientMessageId": name("c", i, id_len)}),
            );
            note(&r);
            if i % 7 == 0 {
                ack_everything(state);
            }
        }
        for i in 0..(config.max_open_calls * 2) {
            ack_everything(state);
            let participants: Vec<&String> = recipients
                .iter()
                .skip(i % 3)
                .take(config.max_call_participants)
                .collect();
            let r = send(
                state,
                &recipients[recipients.len() - 1],
                &name("call", i, id_len),
                "newCall",
                json!({"participants": participants, "callType": "video"}),
            );
            note(&r);
        }
        // Leave the pending pool full: events nobody acks.
        for i in 0..(config.max_pending_events * 2) {
            let r = send(
                state,
                &recipients[0],
                &name("p", i, id_len),
                "new",
                json!({"chatId": recipients[1 + i % (recipients.len() - 1)], "message": text}),
            );
            note(&r);
        }
        codes
    }

    fn assert_within_formula(state: &State) -> Memory {
        let config = &state.config;
        let memory = state.memory();
        let sum = memory.users
            + memory.pending
            + memory.messages
            + memory.calls
            + memory.cache
            + memory.rates;
        assert_eq!(
            memory.total, sum,
            "the budget holds exactly the pools' charges"
        );
        let users_bound =
            config.max_users * (cost::USER_OVERHEAD + cost::USER_NAME_COPIES * config.max_id_bytes);
        assert!(memory.users <= users_bound, "{memory:?}");
        assert!(memory.pending <= config.max_pending_bytes, "{memory:?}");
        assert!(
            memory.messages <= config.max_message_store_bytes,
            "{memory:?}"
        );
        assert!(memory.calls <= config.max_open_calls_bytes, "{memory:?}");
        assert!(memory.cache <= config.idempotency_cache_bytes, "{memory:?}");
        assert!(
            memory.rates <= config.max_clients * RATE_ENTRY,
            "{memory:?}"
        );
        assert!(memory.total <= cost::worst_case_bytes(config), "{memory:?}");
        assert!(memory.total <= config.max_state_bytes, "{memory:?}");
        memory
    }

    fn small_pools() -> Config {
        Config {
            max_users: 40,
            max_pending_events: 60,
            max_pending_bytes: 200_000,
            max_messages: 30,
            max_message_store_bytes: 60_000,
            max_open_calls: 10,
            max_open_calls_bytes: 25_000,
            idempotency_cache: 25,
            idempotency_cache_bytes: 30_000,
            max_clients: 8,
            // Buckets refill slowly, so the client table stays full; no per-user limit.
            rate_limit: 0,
            rate_window: Duration::from_secs(3600),
            ..Config::default()
        }
    }

    /// A rate-table entry (two core `TokenBucket`s and its client key) and its hash-table
    /// control byte fit in the `RATE_ENTRY` bytes each client address is charged.
    #[test]
    fn a_rate_table_slot_fits_its_charge() {
        let slot = std::mem::size_of::<(ClientKey, ClientRate)>() + 1;
        assert!(slot <= RATE_ENTRY, "{slot} > {RATE_ENTRY}");
        #[cfg(target_pointer_width = "64")]
        assert_eq!(slot, 57, "the figure in docs/protocols/reqack.md");
    }

    #[test]
    fn every_pool_filled_to_its_limit_stays_within_the_documented_formula() {
        let mut state = state(small_pools());
        let codes = fill_every_pool(&mut state);
        let memory = assert_within_formula(&state);
        let stats = state.stats();
        // The pools really were full.
        assert!(stats.users >= 35, "{stats:?}");
        assert_eq!(stats.rate_keys, 8);
        assert!(
            stats.messages > 0 && memory.messages > 60_000 - 10_000,
            "{memory:?}"
        );
        assert!(memory.cache > 30_000 - 10_000, "{memory:?}");
        assert!(memory.calls > 25_000 - 6_000, "{memory:?}");
        assert!(
            stats.pending_events == 60 || memory.pending > 200_000 - 10_000,
            "{stats:?} {memory:?}"
        );
        assert!(codes.contains("OUTBOX_FULL"), "{codes:?}");
        assert!(
            codes.contains("RATE_LIMITED"),
            "the client table filled: {codes:?}"
        );
    }

    #[test]
    fn the_state_budget_caps_everything_and_refuses_new_work() {
        let mut state = state(Config {
            max_state_bytes: 120_000,
            ..small_pools()
        });
        let codes = fill_every_pool(&mut state);
        let memory = assert_within_formula(&state);
        assert!(memory.total <= 120_000);
        assert!(codes.contains("LIMIT_REACHED"), "{codes:?}");
    }

    #[test]
    fn events_for_a_user_that_never_connected_expire_and_free_the_senders_share() {
        let ttl = Duration::from_secs(60);
        let mut state = state(Config {
            unclaimed_ttl: ttl,
            unclaimed_outbox_limit: 2,
            ..Config::default()
        });
        let t0 = Instant::now();
        let new = |state: &mut State, id: &str, to: &str, at: Instant| -> Value {
            let frame = state
                .request(
                    "a",
                    client(1),
                    id,
                    Some("new"),
                    json!({"chatId": to, "message": "x"}),
                    at,
                )
                .unwrap();
            serde_json::from_str(frame.as_str()).unwrap()
        };
        assert!(new(&mut state, "1", "ghost", t0)["payload"]["messageId"].is_u64());
        let later = t0 + Duration::from_secs(30);
        assert!(new(&mut state, "2", "ghost", later)["payload"]["messageId"].is_u64());
        let r = new(&mut state, "3", "ghost", later);
        assert_eq!(r["payload"]["error"]["code"], "OUTBOX_FULL", "{r}");
        assert_eq!(state.stats().unclaimed_users, 1);
        // The first event expires at t0 + ttl, the second 30 s later; then ghost is forgotten.
        state.expire_unclaimed(t0 + ttl);
        assert_eq!(state.pending_for("ghost"), 1);
        state.expire_unclaimed(later + ttl);
        assert_eq!(state.pending_for("ghost"), 0);
        let stats = state.stats();
        assert_eq!(
            (stats.users, stats.unclaimed_users, stats.clients),
            (0, 0, 0),
            "{stats:?}"
        );
        assert_eq!(state.memory().pending, 0);
        // A user that connects is claimed: its events are kept until acked, however old.
        new(&mut state, "4", "bob", later + ttl);
        let (bob, mut link) = peer();
        open(&mut state, "bob", &bob, later + ttl);
        assert_eq!(drain(&mut link).len(), 1);
        state.expire_unclaimed(later + ttl * 10);
        assert_eq!(state.pending_for("bob"), 1);
    }

    #[test]
    fn unclaimed_users_and_pending_events_are_limited_per_client_not_per_user_id() {
        let mut state = state(Config {
            max_unclaimed_users_per_client: 3,
            max_pending_per_client: 5,
            ..Config::default()
        });
        // One client, changing its userId, may create 3 users that never connect.
        for (i, sender) in ["a", "b", "c"].iter().enumerate() {
            let r = send(
                &mut state,
                sender,
                "1",
                "new",
                json!({"chatId": format!("g{i}"), "message": "x"}),
            );
            assert!(r["payload"]["messageId"].is_u64(), "{r}");
        }
        let r = send(
            &mut state,
            "d",
            "1",
            "new",
            json!({"chatId": "g3", "message": "x"}),
        );
        assert_eq!(r["payload"]["error"]["code"], "LIMIT_REACHED", "{r}");
        assert!(
            !state.users.contains_key("g3"),
            "the refused request created nobody"
        );
        // Another client is not affected.
        let r = send_from(
            &mut state,
            client(2),
            "e",
            "1",
            "new",
            json!({"chatId": "g3", "message": "x"}),
        );
        assert!(r["payload"]["messageId"].is_u64(), "{r}");
        // Pending events are counted per sending client too, whoever the recipients are.
        send(
            &mut state,
            "a",
            "2",
            "new",
            json!({"chatId": "g0", "message": "x"}),
        );
        send(
            &mut state,
            "b",
            "2",
            "new",
            json!({"chatId": "g1", "message": "x"}),
        );
        let r = send(
            &mut state,
            "c",
            "2",
            "new",
            json!({"chatId": "g2", "message": "x"}),
        );
        assert_eq!(r["payload"]["error"]["code"], "OUTBOX_FULL", "{r}");
        assert_eq!(state.stats().pending_events, 6);
    }

    #[test]
    fn presence_is_bounded_and_leaves_the_lock_to_the_caller() {
        let mut state = state(Config {
            max_presence_fanout: 3,
            ..Config::default()
        });
        let now = Instant::now();
        let mut links = Vec::new();
        for i in 0..6 {
            let (p, link) = peer();
            open(&mut state, &format!("u{i}"), &p, now);
            links.push((p, link));
        }
        for (_, link) in &mut links {
            drain(link);
        }
        let (newcomer, _link) = peer();
        let fanout = state.open("new", &newcomer, now).unwrap();
        assert_eq!(fanout.announce.len(), 3);
        assert_eq!(fanout.roster.len(), 3);
        // Nothing was sent yet: the frames go out when the caller sends them (without the lock).
        let before: usize = links.iter_mut().map(|(_, l)| drain(l).len()).sum();
        fanout.send();
        let after: usize = links.iter_mut().map(|(_, l)| drain(l).len()).sum();
        assert_eq!((before, after), (0, 3));
        let offline = state.close("new", newcomer.id()).unwrap();
        assert_eq!(offline.announce.len(), 3);
        assert!(offline.newcomer.is_none());
    }
}
