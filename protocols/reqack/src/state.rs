//! One reqack node: requests, acks, presence and redelivery on the state engine, and the
//! node-local bounds that protect this node.
//!
//! Everything shared lives in the engine (see `docs/protocols/reqack.md`, "State and the
//! engine"): each user's outbox is a log whose offsets are the user's event ids, messages and
//! calls are keyed records changed by compare-and-set, idempotent responses are engine records,
//! presence is the engine's. Nothing here holds a lock across an engine call: the node-local
//! [`Local`] tables are locked only between awaits, and every ordering the protocol promises
//! comes from log order or compare-and-set.
//!
//! What stays node-local (in [`Local`]): the books of what this node queued and stored, by
//! sending client (per-client shares, the node's totals, expiry of events for users that never
//! connected), the per-address rate buckets, the sockets each user has open here, and caches
//! (a user's newest outbox offset, whether it ever connected) that are rebuilt on a miss.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};
use switchboard_core::engine::{
    Append, Appended, ConnRef, EngineError, Entry, Expect, Position, Put, RateDecision, Read,
    ReadFrom, Retention,
};
use switchboard_core::{
    ClientKey, CloseReason, Engine, Frame, MemoryBudget, Peer, Reject, TokenBucket,
};
use tracing::{debug, error, warn};

use crate::cost::{self, RATE_ENTRY, Share};
use crate::idempotency::IdempotencyCache;
use crate::ledger::{Ledger, Limits, Refusal, Reservation};
use crate::messages::{
    self, ApiError, CallEvent, CallRequest, CallStored, CallType, CloseCallRequest, DeleteEvent,
    EditEvent, EditRequest, ErrorCode, EventTemplate, HistoryRequest, MessageRef, NewCallRequest,
    NewEvent, NewRequest, PresenceEvent, ReceiptEvent, RosterTemplate, ServerEvent, TypingEvent,
    TypingRequest, now_ms,
};
use crate::outbox;
use crate::store::{self, Body, Evictions, OpenCall, Receipt, StoredMessage};
use crate::telemetry::{self, Outcome};
use crate::{Config, Conn};

/// The presence room of every connected user (member = user id, one entry per socket).
pub(crate) const ONLINE_ROOM: &str = "reqack:online";

/// How long a remembered response answers retries of its request id (on any node), unless
/// the node that remembered it forgets it earlier to stay within its bounds.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);
/// A request id being answered is claimed for at most this long (the claim outlives a node
/// that dies while answering by no more than this).
const CLAIM_TTL: Duration = Duration::from_secs(30);
/// How long a retry waits for the answer of the same request id being answered elsewhere.
const CLAIM_WAIT: Duration = Duration::from_secs(5);
/// How often such a retry looks for that answer.
const CLAIM_POLL: Duration = Duration::from_millis(10);
/// Compare-and-set attempts before an append or a record update gives up (`UNAVAILABLE`).
const CAS_ATTEMPTS: usize = 64;
/// The node's books are checked against the logs (for acks that arrived on other nodes) at
/// most this often, and only when a bound is reached.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// Presence fan-outs that settle a race with an opposite fan-out, at most.
const PRESENCE_ROUNDS: usize = 3;
/// Recipients of a fan-out whose cached outbox offsets are read, and then updated, under one
/// lock of the node's table.
const CACHE_SLICE: usize = 32;
/// Outbox entries read at once beyond the outbox limit (ephemeral events in passing).
const READ_SLACK: usize = 64;

const START: Position = Position {
    offset: 0,
    epoch: 0,
};

/// Names of everything the protocol keeps in the engine.
pub(crate) mod keys {
    /// A user's outbox log, and the topic its sockets subscribe to.
    pub(crate) fn outbox(user: &str) -> String {
        // Built by hand, not with `format!`: a presence fan-out names one outbox per recipient.
        const PREFIX: &str = "reqack:outbox:";
        let mut name = String::with_capacity(PREFIX.len().saturating_add(user.len()));
        name.push_str(PREFIX);
        name.push_str(user);
        name
    }

    /// Present once a user has connected at least once (it is then *claimed*).
    pub(crate) fn claimed(user: &str) -> String {
        format!("reqack:claimed:{user}")
    }

    /// Prefix of message records.
    pub(crate) const MESSAGE_PREFIX: &str = "reqack:msg:";

    /// Message `id`'s record.
    pub(crate) fn message(id: u64) -> String {
        format!("{MESSAGE_PREFIX}{id}")
    }

    /// Prefix of open-call records.
    pub(crate) const CALL_PREFIX: &str = "reqack:call:";

    /// Open call `id`'s record.
    pub(crate) fn call(id: &str) -> String {
        format!("{CALL_PREFIX}{id}")
    }

    /// The log whose offsets are message ids (cluster-wide, only growing).
    pub(crate) const MESSAGE_IDS: &str = "reqack:message-ids";

    /// The message-id index of the conversation of `a` and `b` (either order). The first name
    /// is length-prefixed so no two pairs share a name.
    pub(crate) fn conversation(a: &str, b: &str) -> String {
        let (a, b) = if a <= b { (a, b) } else { (b, a) };
        format!("reqack:conv:{}:{a}:{b}", a.len())
    }

    /// The idempotency record of request `id` of `user` (the engine adds its own prefix).
    pub(crate) fn request(user: &str, id: &str) -> String {
        format!("reqack:{}:{user}:{id}", user.len())
    }

    /// The engine's own key of the idempotency record `request` (documented by `Engine`).
    pub(crate) fn remembered(request: &str) -> String {
        format!("idem:{request}")
    }

    /// Claimed while request `id` of `user` is being answered.
    pub(crate) fn inflight(user: &str, id: &str) -> String {
        format!("reqack:inflight:{}:{user}:{id}", user.len())
    }

    /// The per-user request rate (cluster-wide sliding window).
    pub(crate) fn rate(user: &str) -> String {
        format!("reqack:rate:{user}")
    }
}

/// Counters for tests and status output. Which are cluster-wide and which count this node
/// only is said per field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Users in this node's table (sockets open here, or cached).
    pub users: usize,
    /// Users with at least one open socket on any node (cluster-wide).
    pub online_users: usize,
    /// Users that never connected holding events this node queued.
    pub unclaimed_users: usize,
    /// Events this node queued that are not known to be acknowledged.
    pub pending_events: usize,
    /// Charged bytes of those events.
    pub pending_bytes: usize,
    /// Stored messages, deleted ones included until forgotten (cluster-wide).
    pub messages: usize,
    /// Open calls (cluster-wide).
    pub open_calls: usize,
    /// Responses this node remembers for retries.
    pub cached_responses: usize,
    /// Client keys holding a share of this node's books.
    pub clients: usize,
    /// Client keys with rate buckets on this node.
    pub rate_keys: usize,
}

/// Bytes charged per node-local pool; their sum is what the [`MemoryBudget`] holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// The node's user table.
    pub users: usize,
    /// Pending events on the node's books.
    pub pending: usize,
    /// The index of messages this node stored.
    pub messages: usize,
    /// The index of calls this node opened.
    pub calls: usize,
    /// The index of responses this node remembered.
    pub cache: usize,
    /// Rate buckets.
    pub rates: usize,
    /// What the budget holds now (the sum of the above).
    pub total: usize,
    /// The budget's limit (`Config::max_state_bytes`).
    pub limit: usize,
}

/// One user in this node's table.
#[derive(Debug)]
struct LocalUser {
    /// Sockets of the user open on this node.
    sockets: usize,
    /// The newest offset of its outbox this node saw (a guess for the next append).
    top: Option<u64>,
    /// It has connected at least once (never reverts, so a cached `true` is always right).
    claimed: bool,
    charge: usize,
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

/// This node's own tables. Locked only between engine calls, never across one.
#[derive(Debug)]
struct Local {
    users: HashMap<String, LocalUser>,
    users_bytes: usize,
    /// Entries of `users` without sockets here (forgettable when the table is full).
    idle: usize,
    rates: HashMap<ClientKey, ClientRate>,
    ledger: Ledger,
    messages: Evictions<u64>,
    calls: Evictions<String>,
    cache: IdempotencyCache,
    next_sweep: Option<Instant>,
    last_prune: Option<Instant>,
}

impl Local {
    /// Makes sure `name` has an entry, forgetting idle entries if the table is full; `false`
    /// if there is no room.
    fn ensure_user(&mut self, name: &str, max_users: usize, budget: &MemoryBudget) -> bool {
        if self.users.contains_key(name) {
            return true;
        }
        if self.users.len() >= max_users && self.idle > 0 {
            let mut freed = 0usize;
            self.users.retain(|_, user| {
                let keep = user.sockets > 0;
                if !keep {
                    freed = freed.saturating_add(user.charge);
                }
                keep
            });
            self.users_bytes = self.users_bytes.saturating_sub(freed);
            budget.release(freed);
            self.idle = 0;
            debug!(
                kept = self.users.len(),
                "forgot idle users of the node's table"
            );
        }
        if self.users.len() >= max_users {
            return false;
        }
        let charge = cost::user_bytes(name);
        if budget.try_reserve(charge).is_err() {
            return false;
        }
        self.users_bytes = self.users_bytes.saturating_add(charge);
        self.idle = self.idle.saturating_add(1);
        self.users.insert(
            name.to_owned(),
            LocalUser {
                sockets: 0,
                top: None,
                claimed: false,
                charge,
            },
        );
        true
    }

    fn usage_error(&self, refusal: Refusal, config: &Config) -> ApiError {
        match refusal {
            Refusal::Total {
                pending,
                pending_bytes,
            } => ApiError::new(
                ErrorCode::OutboxFull,
                format!(
                    "the server holds {pending} unacknowledged events ({pending_bytes} bytes; the limit is {} events, {} bytes); nothing was sent, retry later",
                    config.max_pending_events, config.max_pending_bytes
                ),
            ),
            Refusal::ClientShare {
                pending,
                pending_bytes,
            } => ApiError::new(
                ErrorCode::OutboxFull,
                format!(
                    "events your client sent are waiting unacknowledged: {pending} ({pending_bytes} bytes; at most {} events, {} bytes); nothing was sent, retry later",
                    config.max_pending_per_client, config.max_pending_bytes_per_client
                ),
            ),
            Refusal::Unclaimed { held } => ApiError::new(
                ErrorCode::LimitReached,
                format!(
                    "your client already has {held} users waiting that never connected (at most {}); retry later",
                    config.max_unclaimed_users_per_client
                ),
            ),
            Refusal::Budget => budget_error(),
        }
    }
}

/// What a request produced: the response payload, and whether a retry should get it again.
pub(crate) struct Answer {
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

/// A request, validated: everything a client sent that can be checked without stored state.
#[derive(Debug, Clone)]
pub(crate) enum Command {
    New(NewRequest),
    Edit(EditRequest),
    Delete(MessageRef),
    Receipt(MessageRef, Receipt),
    Call(CallRequest),
    NewCall {
        participants: Vec<String>,
        call_type: CallType,
    },
    CloseCall(CloseCallRequest),
    History {
        chat_id: String,
        before: Option<u64>,
        limit: usize,
    },
}

impl Command {
    /// Whether the request only reads (never claimed, never remembered).
    pub(crate) fn is_read_only(payload_type: Option<&str>) -> bool {
        payload_type == Some("history")
    }
}

fn check_id(config: &Config, field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() || value.len() > config.max_id_bytes {
        return Err(ApiError::bad_request(format!(
            "`{field}` must be a non-empty string of at most {} bytes",
            config.max_id_bytes
        )));
    }
    Ok(())
}

fn check_text(config: &Config, text: &str) -> Result<(), ApiError> {
    if text.trim().is_empty() {
        return Err(ApiError::bad_request("`message` must not be empty"));
    }
    if text.len() > config.max_message_bytes {
        return Err(ApiError::bad_request(format!(
            "`message` is longer than {} bytes",
            config.max_message_bytes
        )));
    }
    Ok(())
}

/// Checks request `payload_type` of `user` with `payload` against `config` (sans-IO): the
/// command to run, or the error to answer. Nothing stored is consulted.
pub(crate) fn validate(
    config: &Config,
    user: &str,
    payload_type: Option<&str>,
    payload: Value,
) -> Result<Command, ApiError> {
    let Some(kind) = payload_type else {
        return Err(ApiError::bad_request(
            "a request needs a string `payloadType`",
        ));
    };
    match kind {
        "new" => {
            let request: NewRequest = messages::payload(kind, payload)?;
            check_id(config, "chatId", &request.chat_id)?;
            check_text(config, &request.message)?;
            if let Some(client_id) = &request.client_message_id {
                check_id(config, "clientMessageId", client_id)?;
            }
            Ok(Command::New(request))
        }
        "edit" => {
            let request: EditRequest = messages::payload(kind, payload)?;
            check_text(config, &request.message)?;
            Ok(Command::Edit(request))
        }
        "delete" => Ok(Command::Delete(messages::payload(kind, payload)?)),
        "dlvrd" => Ok(Command::Receipt(
            messages::payload(kind, payload)?,
            Receipt::Delivered,
        )),
        "read" => Ok(Command::Receipt(
            messages::payload(kind, payload)?,
            Receipt::Read,
        )),
        "call" => {
            let request: CallRequest = messages::payload(kind, payload)?;
            check_id(config, "chatId", &request.chat_id)?;
            Ok(Command::Call(request))
        }
        "newCall" => {
            let request: NewCallRequest = messages::payload(kind, payload)?;
            let mut participants: Vec<String> = Vec::new();
            for participant in request.participants {
                check_id(config, "participants[]", &participant)?;
                if participant != user && !participants.contains(&participant) {
                    participants.push(participant);
                }
                if participants.len() > config.max_call_participants {
                    return Err(ApiError::bad_request(format!(
                        "a call has at most {} participants besides the caller",
                        config.max_call_participants
                    )));
                }
            }
            if participants.is_empty() {
                return Err(ApiError::bad_request(
                    "`participants` must name at least one user besides the caller",
                ));
            }
            Ok(Command::NewCall {
                participants,
                call_type: request.call_type,
            })
        }
        "closeCall" => {
            let request: CloseCallRequest = messages::payload(kind, payload)?;
            check_id(config, "callId", &request.call_id)?;
            Ok(Command::CloseCall(request))
        }
        "history" => {
            let request: HistoryRequest = messages::payload(kind, payload)?;
            check_id(config, "chatId", &request.chat_id)?;
            let limit = request
                .limit
                .unwrap_or(config.history_default_limit)
                .clamp(1, config.history_page_limit.max(1));
            Ok(Command::History {
                chat_id: request.chat_id,
                before: request.before,
                limit,
            })
        }
        other => Err(ApiError::new(
            ErrorCode::UnknownPayloadType,
            format!(
                "unknown payloadType {other:?}; expected new, edit, delete, dlvrd, read, call, newCall, closeCall or history"
            ),
        )),
    }
}

/// The outcome of claiming a request id.
enum Claim {
    /// This socket answers it; the claim is released under this key.
    Mine(String),
    /// It was answered meanwhile: the remembered response.
    Answered(Frame),
    /// It cannot be answered now.
    Refused(ApiError),
}

/// The protocol's node: configuration, budget and node-local tables.
#[derive(Debug)]
pub(crate) struct Node {
    config: Config,
    budget: Arc<MemoryBudget>,
    local: Mutex<Local>,
}

impl Node {
    pub(crate) fn new(config: Config, budget: Arc<MemoryBudget>) -> Self {
        let local = Local {
            users: HashMap::new(),
            users_bytes: 0,
            idle: 0,
            rates: HashMap::new(),
            ledger: Ledger::new(
                Limits {
                    max_pending: config.max_pending_events,
                    max_pending_bytes: config.max_pending_bytes,
                    share: Share {
                        items: config.max_pending_per_client,
                        bytes: config.max_pending_bytes_per_client,
                    },
                    max_unclaimed_users_per_client: config.max_unclaimed_users_per_client,
                },
                budget.clone(),
            ),
            messages: Evictions::new(
                config.max_messages,
                config.max_message_store_bytes,
                Share {
                    items: config.max_messages_per_client,
                    bytes: config.max_message_store_bytes_per_client,
                },
                budget.clone(),
            ),
            calls: Evictions::new(
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
            next_sweep: None,
            last_prune: None,
        };
        Self {
            config,
            budget,
            local: Mutex::new(local),
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    pub(crate) fn budget(&self) -> &MemoryBudget {
        &self.budget
    }

    fn local(&self) -> MutexGuard<'_, Local> {
        switchboard_core::sync::lock(&self.local)
    }

    // -----------------------------------------------------------------------------------------
    // Status

    pub(crate) fn memory(&self) -> Memory {
        let local = self.local();
        Memory {
            users: local.users_bytes,
            pending: local.ledger.pending_bytes(),
            messages: local.messages.bytes(),
            calls: local.calls.bytes(),
            cache: local.cache.bytes(),
            rates: local.rates.len().saturating_mul(RATE_ENTRY),
            total: self.budget.used(),
            limit: self.budget.limit(),
        }
    }

    /// The node-local counters (the cluster-wide ones are 0).
    pub(crate) fn local_stats(&self) -> Stats {
        let local = self.local();
        let (_, unclaimed) = local.ledger.recipients();
        Stats {
            users: local.users.len(),
            online_users: 0,
            unclaimed_users: unclaimed,
            pending_events: local.ledger.pending(),
            pending_bytes: local.ledger.pending_bytes(),
            messages: 0,
            open_calls: 0,
            cached_responses: local.cache.len(),
            clients: local.ledger.clients(),
            rate_keys: local.rates.len(),
        }
    }

    /// Every counter, the cluster-wide ones read from `engine`.
    pub(crate) async fn stats(&self, engine: &Engine) -> Stats {
        let mut stats = self.local_stats();
        stats.online_users = engine
            .presence_members(ONLINE_ROOM)
            .await
            .map_or(0, |members| members.len());
        stats.messages = count_keys(engine, keys::MESSAGE_PREFIX).await;
        stats.open_calls = count_keys(engine, keys::CALL_PREFIX).await;
        stats
    }

    /// Unacknowledged events waiting for `user` (cluster-wide: its outbox log).
    pub(crate) async fn pending_for(&self, engine: &Engine, user: &str) -> usize {
        match engine
            .read(
                &keys::outbox(user),
                ReadFrom::After(START),
                self.read_limit(),
            )
            .await
        {
            Ok(Read::Entries { entries, .. }) => outbox::durable(&entries).len(),
            Ok(Read::Gone { .. }) => 0,
            Err(e) => {
                warn!(error = %e, "could not read an outbox");
                0
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Node-local: rates and the user table

    fn read_limit(&self) -> usize {
        self.config.outbox_limit.saturating_add(READ_SLACK)
    }

    /// Spends a token of `client`'s bucket of `kind`; `false` means over the rate (or a new
    /// client while the table is full of clients that are all still limited).
    fn rate_allows(&self, client: ClientKey, kind: RateKind, now: Instant) -> bool {
        let (limit, window) = match kind {
            RateKind::Requests => (self.config.client_rate_limit, self.config.rate_window),
            RateKind::Connects => (self.config.connect_rate_limit, self.config.rate_window),
        };
        if limit == 0 {
            return true;
        }
        let mut local = self.local();
        if !local.rates.contains_key(&client) {
            if local.rates.len() >= self.config.max_clients.max(1) {
                // Forget clients whose buckets refilled: a new bucket would be the same.
                let before = local.rates.len();
                local
                    .rates
                    .retain(|_, r| !(r.requests.is_full(now) && r.connects.is_full(now)));
                let forgotten = before.saturating_sub(local.rates.len());
                self.budget.release(forgotten.saturating_mul(RATE_ENTRY));
                if local.rates.len() >= self.config.max_clients.max(1) {
                    return false;
                }
            }
            if self.budget.try_reserve(RATE_ENTRY).is_err() {
                return false;
            }
            local.rates.insert(
                client,
                ClientRate {
                    requests: TokenBucket::full(now),
                    connects: TokenBucket::full(now),
                },
            );
        }
        let Some(rate) = local.rates.get_mut(&client) else {
            return false;
        };
        match kind {
            RateKind::Requests => rate.requests.try_take(cost::rate(limit, window), now),
            RateKind::Connects => rate.connects.try_take(cost::rate(limit, window), now),
        }
    }

    fn cached_top(&self, user: &str) -> Option<u64> {
        self.local().users.get(user).and_then(|u| u.top)
    }

    fn cache_top(&self, user: &str, offset: u64) {
        self.cache_tops([(user, offset)]);
    }

    /// The cached newest offsets of many outboxes (0 if unknown), under one lock.
    fn cached_tops<'a>(&self, users: impl IntoIterator<Item = &'a String>) -> Vec<u64> {
        let local = self.local();
        users
            .into_iter()
            .map(|user| local.users.get(user).and_then(|u| u.top).unwrap_or(0))
            .collect()
    }

    /// Caches the newest offsets of many outboxes, under one lock.
    fn cache_tops<'a>(&self, tops: impl IntoIterator<Item = (&'a str, u64)>) {
        let mut local = self.local();
        for (user, offset) in tops {
            if local.ensure_user(user, self.config.max_users, &self.budget)
                && let Some(entry) = local.users.get_mut(user)
            {
                entry.top = Some(entry.top.map_or(offset, |top| top.max(offset)));
            }
        }
    }

    fn cache_claimed(&self, user: &str) {
        let mut local = self.local();
        local.ledger.claimed(user);
        if local.ensure_user(user, self.config.max_users, &self.budget)
            && let Some(entry) = local.users.get_mut(user)
        {
            entry.claimed = true;
        }
    }

    /// Admission for an upgrade by `user` from `client` (node-local checks only: the connect
    /// rate of the address and the sockets the user has open on this node).
    pub(crate) fn admit(&self, user: &str, client: ClientKey, now: Instant) -> Result<(), Reject> {
        check_id(&self.config, "userId", user).map_err(|e| Reject::BadRequest(e.message))?;
        if !self.rate_allows(client, RateKind::Connects, now) {
            return Err(Reject::TooMany(format!(
                "more than {} connects from your address in {:?}; retry later",
                self.config.connect_rate_limit, self.config.rate_window
            )));
        }
        let mut local = self.local();
        if !local.ensure_user(user, self.config.max_users, &self.budget) {
            return Err(Reject::Unavailable(format!(
                "the server tracks at most {} users and none can be forgotten now; retry later",
                self.config.max_users
            )));
        }
        let sockets = local.users.get(user).map_or(0, |u| u.sockets);
        if sockets >= self.config.max_sockets_per_user {
            return Err(Reject::Unavailable(format!(
                "user already has {sockets} sockets open (at most {})",
                self.config.max_sockets_per_user
            )));
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Outboxes

    /// The bounds of `user`'s outbox: smaller for a user that never connected.
    fn retention(&self, claimed: bool) -> Retention {
        if claimed {
            Retention::refuse(self.config.outbox_limit, self.config.outbox_limit_bytes)
        } else {
            Retention::refuse(
                self.config
                    .unclaimed_outbox_limit
                    .min(self.config.outbox_limit),
                self.config
                    .unclaimed_outbox_bytes
                    .min(self.config.outbox_limit_bytes),
            )
        }
    }

    /// Whether `user` ever connected (cached once true).
    async fn is_claimed(&self, engine: &Engine, user: &str) -> Result<bool, EngineError> {
        if self.local().users.get(user).is_some_and(|u| u.claimed) {
            return Ok(true);
        }
        let claimed = engine.get(&keys::claimed(user)).await?.is_some();
        if claimed {
            self.cache_claimed(user);
        }
        Ok(claimed)
    }

    /// Appends an event (`encode` makes its frame for an id) to `user`'s outbox and publishes it
    /// to the user's sockets on every node. The event id is the log offset: the frame is made for
    /// the offset the append expects and appended only if the log is still there (compare-and-set),
    /// so ids are unique per user across nodes, only grow, and sockets see them in id order.
    /// `append` says how (kept under a retention, or transient).
    async fn append_event(
        &self,
        engine: &Engine,
        user: &str,
        encode: impl Fn(u64) -> Result<Frame, switchboard_core::Error>,
        append: Append,
    ) -> Result<(u64, Frame), EngineError> {
        let guess = self.cached_top(user).unwrap_or(0);
        let appended = self
            .append_guessing(engine, user, guess, encode, append)
            .await?;
        self.cache_top(user, appended.0);
        Ok(appended)
    }

    /// [`Self::append_event`] starting from `guess` as the outbox's newest offset, leaving the
    /// node's cache of it to the caller (a fan-out reads and updates it once for all).
    async fn append_guessing(
        &self,
        engine: &Engine,
        user: &str,
        guess: u64,
        encode: impl Fn(u64) -> Result<Frame, switchboard_core::Error>,
        append: Append,
    ) -> Result<(u64, Frame), EngineError> {
        let topic = keys::outbox(user);
        let mut top = guess;
        for _ in 0..CAS_ATTEMPTS {
            let id = top.saturating_add(1);
            let frame = encode(id)
                .map_err(|e| EngineError::Corrupt(format!("could not encode an event: {e}")))?;
            match engine
                .append(&topic, frame.clone(), append.if_top(top))
                .await?
            {
                Appended::Done(position) => {
                    if position.offset != id {
                        // An engine that ignored the condition: the frame names another id.
                        error!(
                            user,
                            id,
                            offset = position.offset,
                            "outbox offset is not the event id"
                        );
                    }
                    return Ok((position.offset, frame));
                }
                Appended::Conflict(position) => top = position.offset,
            }
        }
        Err(EngineError::Unavailable(format!(
            "{user:?}'s outbox changed {CAS_ATTEMPTS} times during one append"
        )))
    }

    /// Sends an ephemeral event (`encode` makes its frame for an id) to the sockets `to` has
    /// open now, on any node: it takes the next id of `to`'s outbox as a transient entry,
    /// published in the outbox's order but never stored (nothing to remove; a full outbox does
    /// not stop it). Best effort. `guess` is the outbox's newest offset as far as the caller
    /// knows; the id it took comes back (for the caller's cache), `None` if it was dropped.
    async fn emit_ephemeral(
        &self,
        engine: &Engine,
        to: &str,
        guess: u64,
        encode: impl Fn(u64) -> Result<Frame, switchboard_core::Error>,
    ) -> Option<u64> {
        match self
            .append_guessing(engine, to, guess, encode, Append::transient())
            .await
        {
            Ok((id, _)) => Some(id),
            Err(e) => {
                debug!(error = %e, to, "ephemeral event dropped");
                None
            }
        }
    }

    fn outbox_full(&self, user: &str, claimed: bool) -> ApiError {
        let retention = self.retention(claimed);
        let whose = if claimed {
            "a user may have"
        } else {
            "a user that never connected may have"
        };
        ApiError::new(
            ErrorCode::OutboxFull,
            format!(
                "{user:?} has too many unacknowledged events ({whose} {} events, {} bytes); nothing was sent, retry later",
                retention.max_entries, retention.max_bytes
            ),
        )
    }

    /// Takes room on the node's books for one event to each of `targets`, checking the books
    /// against the logs once first if a pending bound is reached (acks on other nodes).
    async fn reserve(
        &self,
        engine: &Engine,
        client: ClientKey,
        targets: &[(&str, bool)],
        each: usize,
        now: Instant,
    ) -> Result<Reservation, ApiError> {
        let first = self.local().ledger.reserve(client, targets, each);
        let scope = match first {
            Ok(reservation) => return Ok(reservation),
            Err(Refusal::Total { .. }) => None,
            Err(Refusal::ClientShare { .. }) => Some(client),
            Err(refusal) => return Err(self.local().usage_error(refusal, &self.config)),
        };
        let may_prune = {
            let mut local = self.local();
            let due = local
                .last_prune
                .is_none_or(|at| now.saturating_duration_since(at) >= PRUNE_EVERY);
            if due {
                local.last_prune = Some(now);
            }
            due
        };
        if may_prune {
            self.prune(engine, scope).await;
        }
        let mut local = self.local();
        local
            .ledger
            .reserve(client, targets, each)
            .map_err(|refusal| local.usage_error(refusal, &self.config))
    }

    /// Settles the books' events (of `client`, or all) that are no longer in their outbox:
    /// acknowledged on another node.
    async fn prune(&self, engine: &Engine, client: Option<ClientKey>) {
        let queued = self.local().ledger.queued_by(client);
        let mut settled = 0usize;
        for (user, ids) in queued {
            let present: HashSet<u64> = match engine
                .read(
                    &keys::outbox(&user),
                    ReadFrom::After(START),
                    self.read_limit(),
                )
                .await
            {
                Ok(Read::Entries { entries, .. }) => entries.iter().map(|e| e.offset).collect(),
                Ok(Read::Gone { .. }) => HashSet::new(),
                Err(e) => {
                    debug!(error = %e, "could not check an outbox");
                    continue;
                }
            };
            let mut local = self.local();
            for id in ids.into_iter().filter(|id| !present.contains(id)) {
                if local.ledger.settle(&user, id) {
                    settled = settled.saturating_add(1);
                }
            }
        }
        self.observe_pending();
        debug!(settled, "checked the node's books against the outboxes");
    }

    /// Queues `event` for each of `recipients` (created implicitly; those that never connected
    /// get the smaller outbox and count against `client`'s share), or for none: if one outbox
    /// refuses, the events already appended are removed again and the request fails.
    async fn deliver(
        &self,
        engine: &Engine,
        recipients: &[&str],
        event: &ServerEvent,
        client: ClientKey,
        now: Instant,
    ) -> Result<(), ApiError> {
        if event.is_ephemeral() {
            return Err(internal("an ephemeral event cannot be queued (bug)"));
        }
        let mut targets = Vec::with_capacity(recipients.len());
        for name in recipients {
            let claimed = self
                .is_claimed(engine, name)
                .await
                .map_err(|e| engine_error(&e))?;
            targets.push((*name, !claimed));
        }
        let template = EventTemplate::new(now_ms(), event)
            .map_err(|e| internal(format!("could not encode: {e}")))?;
        // An upper bound of every recipient's frame: the widest id, the longest name.
        let estimate = template.max_len();
        let each = targets
            .iter()
            .map(|(name, _)| cost::event_bytes(estimate, name))
            .max()
            .unwrap_or(0);
        let mut reservation = self.reserve(engine, client, &targets, each, now).await?;
        let mut appended: Vec<(&str, u64)> = Vec::with_capacity(targets.len());
        for (name, unclaimed) in &targets {
            match self
                .append_event(
                    engine,
                    name,
                    |id| template.frame(id),
                    Append::publish(self.retention(!unclaimed)),
                )
                .await
            {
                Ok((id, frame)) => {
                    self.local().ledger.commit(
                        &mut reservation,
                        name,
                        id,
                        frame.len(),
                        *unclaimed,
                        now,
                    );
                    appended.push((name, id));
                }
                Err(e) => {
                    for (done, id) in appended {
                        if let Err(e) = engine.remove(&keys::outbox(done), id).await {
                            warn!(error = %e, to = done, id, "could not take back an event");
                        }
                        self.local().ledger.settle(done, id);
                    }
                    self.local().ledger.cancel(reservation);
                    self.observe_pending();
                    return Err(match e {
                        EngineError::Full(_) => self.outbox_full(name, !unclaimed),
                        other => engine_error(&other),
                    });
                }
            }
        }
        self.local().ledger.cancel(reservation);
        telemetry::events(event, appended.len());
        self.observe_pending();
        Ok(())
    }

    /// Sets the pending-event gauge from the node's books.
    fn observe_pending(&self) {
        let pending = self.local().ledger.pending();
        telemetry::pending(pending);
    }

    // -----------------------------------------------------------------------------------------
    // Sockets

    /// A socket of `conn.user` opened: count it, mark the user claimed, send it every unacked
    /// event in id order and make it live on the outbox, then join presence (announcing
    /// `online` if it is the user's first socket anywhere).
    pub(crate) async fn open(
        &self,
        engine: &Engine,
        conn: &mut Conn,
        peer: &Peer,
        me: ConnRef,
        now: Instant,
    ) {
        let user = conn.user.clone();
        {
            let mut local = self.local();
            if !local.ensure_user(&user, self.config.max_users, &self.budget) {
                peer.close(CloseReason::new(
                    1013,
                    "the user table is full; retry later",
                ));
                return;
            }
            let Some(entry) = local.users.get_mut(&user) else {
                return;
            };
            if entry.sockets >= self.config.max_sockets_per_user {
                peer.close(CloseReason::new(
                    CloseReason::POLICY,
                    "too many sockets for this user",
                ));
                return;
            }
            entry.sockets = entry.sockets.saturating_add(1);
            if entry.sockets == 1 {
                local.idle = local.idle.saturating_sub(1);
            }
            conn.registered = true;
        }
        // The user connected: it is claimed. Its events are kept until acked from now on.
        let claim = engine
            .put(
                &keys::claimed(&user),
                Bytes::from_static(b"1"),
                Expect::Absent,
                None,
            )
            .await;
        if let Err(e) = claim {
            peer.close(CloseReason::new(1013, format!("state unavailable: {e}")));
            return;
        }
        self.cache_claimed(&user);
        match engine
            .join(&conn.topic, peer, ReadFrom::After(START), self.read_limit())
            .await
        {
            Ok(joining) => {
                let entries = match joining.read() {
                    Read::Entries { entries, .. } => outbox::durable(entries),
                    Read::Gone { .. } => Vec::new(),
                };
                if let Some(last) = entries.last() {
                    self.cache_top(&user, last.offset);
                }
                conn.redelivery.sent(&entries, now);
                telemetry::redelivered("connect", entries.len());
                joining.go_live(entries.into_iter().map(|entry| entry.frame).collect());
                conn.joined = true;
            }
            Err(e) => {
                peer.close(CloseReason::new(1013, format!("state unavailable: {e}")));
                return;
            }
        }
        match engine.presence_join(ONLINE_ROOM, &user, me).await {
            Ok(first) => {
                conn.present = true;
                if first {
                    self.announce(engine, &user, true).await;
                }
            }
            Err(e) => warn!(error = %e, user, "presence unavailable; not announced"),
        }
    }

    /// A socket closed: leave the outbox topic and presence (announcing `offline` if it was the
    /// user's last socket anywhere).
    pub(crate) async fn close(&self, engine: &Engine, conn: Conn, me: ConnRef) {
        if conn.joined {
            engine.unsubscribe(&conn.topic, me.conn);
        }
        if conn.registered {
            let mut local = self.local();
            let mut now_idle = false;
            if let Some(entry) = local.users.get_mut(&conn.user) {
                entry.sockets = entry.sockets.saturating_sub(1);
                now_idle = entry.sockets == 0;
            }
            if now_idle {
                local.idle = local.idle.saturating_add(1);
            }
        }
        if conn.present {
            match engine.presence_leave(ONLINE_ROOM, &conn.user, me).await {
                Ok(true) => self.announce(engine, &conn.user, false).await,
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %e, user = %conn.user, "presence unavailable; not announced")
                }
            }
        }
    }

    /// A member of the online room expired with its node: announced like a last close.
    pub(crate) async fn member_expired(&self, engine: &Engine, user: &str) {
        self.announce(engine, user, false).await;
    }

    /// Tells every other online user (at most `max_presence_fanout`) that `user` came online or
    /// went offline, each in its own outbox order; a newcomer also learns who is online. Two
    /// opposite fan-outs of one user may run at once (its last socket closing on one node while
    /// a new one opens on another): the one that finds the user's state changed when it is done
    /// announces the state again, so every recipient's last word is the user's real state.
    async fn announce(&self, engine: &Engine, user: &str, online: bool) {
        let mut state = online;
        for round in 0..PRESENCE_ROUNDS {
            let members = match engine.presence_members(ONLINE_ROOM).await {
                Ok(members) => members,
                Err(e) => {
                    warn!(error = %e, user, "presence unavailable; not announced");
                    return;
                }
            };
            // In place: the engine's copy of the room is the only list of names a fan-out holds.
            let mut others = members;
            others.retain(|member| member != user);
            others.truncate(self.config.max_presence_fanout);
            let payload = PresenceEvent {
                user_id: user.to_owned(),
            };
            let event = if state {
                ServerEvent::Online(payload)
            } else {
                ServerEvent::Offline(payload)
            };
            // Encoded once; each recipient's frame differs only in its id.
            let template = match EventTemplate::new(now_ms(), &event) {
                Ok(template) => template,
                Err(e) => {
                    warn!(error = %e, user, "could not encode a presence event; not announced");
                    return;
                }
            };
            // The node's cache of the recipients' newest offsets is read and updated once per
            // slice of recipients, not locked twice per recipient; slices are short so that a
            // fan-out running at the same time over the same users rarely guesses stale.
            let mut sent = 0usize;
            for slice in others.chunks(CACHE_SLICE) {
                let guesses = self.cached_tops(slice);
                let mut tops = Vec::with_capacity(slice.len());
                for (other, guess) in slice.iter().zip(guesses) {
                    if let Some(id) = self
                        .emit_ephemeral(engine, other, guess, |id| template.frame(id))
                        .await
                    {
                        tops.push((other.as_str(), id));
                    }
                }
                sent = sent.saturating_add(tops.len());
                self.cache_tops(tops);
            }
            telemetry::events(&event, sent);
            if round == 0 && online {
                // The newcomer learns who is online now, after its redelivered events: one
                // template, and each event's id is a guess from the one before.
                match RosterTemplate::new(now_ms()) {
                    Ok(roster) => {
                        let mut top = self.cached_top(user).unwrap_or(0);
                        let mut sent = 0usize;
                        for other in &others {
                            if let Some(id) = self
                                .emit_ephemeral(engine, user, top, |id| roster.frame(id, other))
                                .await
                            {
                                top = id;
                                sent = sent.saturating_add(1);
                            }
                        }
                        self.cache_top(user, top);
                        telemetry::events(&event, sent);
                    }
                    Err(e) => warn!(error = %e, user, "could not encode the roster; not sent"),
                }
            }
            match engine.presence_contains(ONLINE_ROOM, user).await {
                Ok(now_online) if now_online != state => state = now_online,
                _ => return,
            }
        }
    }

    /// An ack from any socket of `user`, on any node, removes the event from its outbox.
    pub(crate) async fn ack(&self, engine: &Engine, user: &str, id: u64) {
        match engine.remove(&keys::outbox(user), id).await {
            Ok(true) => {
                self.local().ledger.settle(user, id);
                telemetry::acked();
                self.observe_pending();
            }
            Ok(false) => {}
            Err(e) => warn!(error = %e, user, id, "ack not applied; the event will come again"),
        }
    }

    /// Periodic work of one socket: the node's expiry of events for users that never
    /// connected (at most every `expiry_interval`), and this socket's overdue events.
    pub(crate) async fn tick(&self, engine: &Engine, conn: &mut Conn, peer: &Peer, now: Instant) {
        self.expire_unclaimed(engine, now).await;
        if !conn.joined {
            return;
        }
        let entries: Vec<Entry> = match engine
            .read(&conn.topic, ReadFrom::After(START), self.read_limit())
            .await
        {
            Ok(Read::Entries { entries, .. }) => entries,
            Ok(Read::Gone { .. }) => Vec::new(),
            Err(e) => {
                debug!(error = %e, "could not read the outbox for redelivery");
                return;
            }
        };
        let frames = conn
            .redelivery
            .overdue(&entries, now, self.config.redelivery_timeout);
        if !frames.is_empty() {
            debug!(user = %conn.user, count = frames.len(), "redelivering unacked events");
            telemetry::redelivered("timeout", frames.len());
            let _ = peer.send_batch(frames);
        }
    }

    /// Drops the events this node queued that waited `unclaimed_ttl` for a user that never
    /// connected. At most every `expiry_interval`; cheap when nothing is due.
    pub(crate) async fn expire_unclaimed(&self, engine: &Engine, now: Instant) {
        let due = {
            let mut local = self.local();
            if local.next_sweep.is_some_and(|at| now < at) {
                return;
            }
            local.next_sweep = now.checked_add(self.config.expiry_interval());
            let Some(cutoff) = now.checked_sub(self.config.unclaimed_ttl) else {
                return;
            };
            local.ledger.expired(cutoff)
        };
        for (user, ids) in due {
            match engine.get(&keys::claimed(&user)).await {
                Ok(Some(_)) => {
                    // It connected on another node meanwhile: its events are kept.
                    self.cache_claimed(&user);
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    debug!(error = %e, "expiry postponed");
                    continue;
                }
            }
            let count = ids.len();
            for id in ids {
                match engine.remove(&keys::outbox(&user), id).await {
                    Ok(_) => {
                        self.local().ledger.settle(&user, id);
                    }
                    Err(e) => debug!(error = %e, "expiry postponed"),
                }
            }
            debug!(user = %user, count, "dropped events that waited too long for a user that never connected");
        }
        self.observe_pending();
    }

    // -----------------------------------------------------------------------------------------
    // Requests

    /// Answers request `id` of `user`: with the remembered response if it was answered before
    /// (on any node), else by running it (rate limits first). Returns the response frame.
    #[allow(
        clippy::too_many_arguments,
        reason = "one request's parts, passed through"
    )]
    pub(crate) async fn request(
        &self,
        engine: &Engine,
        user: &str,
        client: ClientKey,
        id: &str,
        payload_type: Option<&str>,
        payload: Value,
        now: Instant,
    ) -> Option<Frame> {
        let (frame, outcome) = self
            .answer(engine, user, client, id, payload_type, payload, now)
            .await;
        telemetry::request(payload_type, outcome);
        frame
    }

    /// [`Self::request`], also saying how the request was answered (for its metric).
    #[allow(
        clippy::too_many_arguments,
        reason = "one request's parts, passed through"
    )]
    async fn answer(
        &self,
        engine: &Engine,
        user: &str,
        client: ClientKey,
        id: &str,
        payload_type: Option<&str>,
        payload: Value,
        now: Instant,
    ) -> (Option<Frame>, Outcome) {
        let record = keys::request(user, id);
        match engine.recall(&record).await {
            Ok(Some(stored)) => {
                if let Some(frame) = frame_of(&stored) {
                    debug!(user, id, "idempotent retry answered from the engine");
                    return (Some(frame), Outcome::Retry);
                }
            }
            Ok(None) => {}
            Err(e) => return failed(id, engine_error(&e)),
        }
        let claim = if Command::is_read_only(payload_type) {
            None
        } else {
            match self.claim(engine, &record, user, id).await {
                Claim::Mine(key) => Some(key),
                Claim::Answered(frame) => return (Some(frame), Outcome::Retry),
                Claim::Refused(error) => return failed(id, error),
            }
        };
        let answer = match self.rate_check(engine, user, client, now).await {
            Ok(()) => match validate(&self.config, user, payload_type, payload) {
                Ok(command) => self.execute(engine, user, client, command, now).await,
                Err(error) => Err(error),
            },
            Err(error) => Err(error),
        };
        let cache = answer.as_ref().is_ok_and(|a| a.cache);
        let outcome = match &answer {
            Ok(_) => Outcome::Ok,
            Err(error) => Outcome::Failed(error.code),
        };
        let frame = respond(id, &answer.map(|a| a.payload));
        let frame = match frame {
            Some(frame) if cache => Some(
                self.remember(engine, user, id, client, &record, frame)
                    .await,
            ),
            other => other,
        };
        if let Some(key) = claim
            && let Err(e) = engine.delete(&key, Expect::Any).await
        {
            debug!(error = %e, "a request claim stays until it expires");
        }
        (frame, outcome)
    }

    /// Claims request id `record` so only one socket answers it; a retry that finds it claimed
    /// waits (bounded) for the answer.
    async fn claim(&self, engine: &Engine, record: &str, user: &str, id: &str) -> Claim {
        let key = keys::inflight(user, id);
        let deadline = tokio::time::Instant::now() + CLAIM_WAIT;
        loop {
            match engine
                .put(&key, Bytes::new(), Expect::Absent, Some(CLAIM_TTL))
                .await
            {
                Ok(Put::Stored(_)) => {
                    // Answered between the first look and the claim: that answer stands.
                    return match engine.recall(record).await {
                        Ok(Some(stored)) => {
                            let _ = engine.delete(&key, Expect::Any).await;
                            frame_of(&stored).map_or(Claim::Mine(key), Claim::Answered)
                        }
                        Ok(None) => Claim::Mine(key),
                        Err(e) => {
                            let _ = engine.delete(&key, Expect::Any).await;
                            Claim::Refused(engine_error(&e))
                        }
                    };
                }
                Ok(Put::Conflict(_)) => {}
                Err(e) => return Claim::Refused(engine_error(&e)),
            }
            if tokio::time::Instant::now() >= deadline {
                return Claim::Refused(ApiError::new(
                    ErrorCode::Unavailable,
                    format!("request {id:?} is still being answered; retry later with the same id"),
                ));
            }
            tokio::time::sleep(CLAIM_POLL).await;
            match engine.recall(record).await {
                Ok(Some(stored)) => {
                    if let Some(frame) = frame_of(&stored) {
                        return Claim::Answered(frame);
                    }
                }
                Ok(None) => {}
                Err(e) => return Claim::Refused(engine_error(&e)),
            }
        }
    }

    /// Remembers `frame` as the answer to request `id` of `user`, within this node's bounds;
    /// returns the answer to give (an earlier one if another node remembered first).
    async fn remember(
        &self,
        engine: &Engine,
        user: &str,
        id: &str,
        client: ClientKey,
        record: &str,
        frame: Frame,
    ) -> Frame {
        let (keep, forgotten) = match self.local().cache.insert(user, id, client, frame.len()) {
            Ok(forgotten) => (true, forgotten),
            Err(forgotten) => (false, forgotten),
        };
        for (user, id) in forgotten {
            let key = keys::remembered(&keys::request(&user, &id));
            if let Err(e) = engine.delete(&key, Expect::Any).await {
                debug!(error = %e, "a forgotten response stays until it expires");
            }
        }
        if !keep {
            return frame;
        }
        let bytes = Bytes::from(frame.as_str().to_owned());
        match engine.remember(record, bytes, IDEMPOTENCY_TTL).await {
            Ok(None) => frame,
            Ok(Some(earlier)) => frame_of(&earlier).unwrap_or(frame),
            Err(e) => {
                warn!(error = %e, user, id, "response not remembered; a retry runs the request again");
                frame
            }
        }
    }

    /// Spends one request of `user` (cluster-wide) and one of `client` (this node);
    /// `RATE_LIMITED` if either is used up.
    async fn rate_check(
        &self,
        engine: &Engine,
        user: &str,
        client: ClientKey,
        now: Instant,
    ) -> Result<(), ApiError> {
        let (limit, window) = (self.config.rate_limit, self.config.rate_window);
        if limit > 0 && !window.is_zero() {
            let per_window = u32::try_from(limit).unwrap_or(u32::MAX);
            match engine
                .rate_limit(&keys::rate(user), per_window, window)
                .await
            {
                Ok(RateDecision::Allowed) => {}
                Ok(RateDecision::Limited { .. }) => {
                    return Err(ApiError::new(
                        ErrorCode::RateLimited,
                        format!(
                            "more than {limit} requests and events in {window:?}; retry later with the same id"
                        ),
                    ));
                }
                Err(e) => return Err(engine_error(&e)),
            }
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

    async fn execute(
        &self,
        engine: &Engine,
        user: &str,
        client: ClientKey,
        command: Command,
        now: Instant,
    ) -> Result<Answer, ApiError> {
        match command {
            Command::New(request) => {
                let body = Body::Text {
                    message: request.message,
                    client_message_id: request.client_message_id,
                    edited: false,
                };
                self.new_message(engine, user, client, request.chat_id, body, now)
                    .await
            }
            Command::Call(request) => {
                let body = Body::Call {
                    call_type: request.call_type,
                    direction: request.direction,
                    status: request.status,
                };
                self.new_message(engine, user, client, request.chat_id, body, now)
                    .await
            }
            Command::Edit(request) => self.edit(engine, user, client, request, now).await,
            Command::Delete(request) => self.delete(engine, user, client, request, now).await,
            Command::Receipt(request, receipt) => {
                self.receipt(engine, user, client, request, receipt, now)
                    .await
            }
            Command::NewCall {
                participants,
                call_type,
            } => {
                self.new_call(engine, user, client, participants, call_type, now)
                    .await
            }
            Command::CloseCall(request) => {
                self.close_call(engine, user, client, request, now).await
            }
            Command::History {
                chat_id,
                before,
                limit,
            } => self.history(engine, user, &chat_id, before, limit).await,
        }
    }

    /// The next message id: the offset of a tiny log appended to by every node.
    async fn next_message_id(&self, engine: &Engine) -> Result<u64, ApiError> {
        let append = Append::store(Retention::trim(1, 16));
        match engine
            .append(keys::MESSAGE_IDS, Frame::from_static(""), append)
            .await
        {
            Ok(Appended::Done(position)) => Ok(position.offset),
            Ok(Appended::Conflict(_)) => Err(internal("message ids could not be allocated")),
            Err(e) => Err(engine_error(&e)),
        }
    }

    /// A message record with its version, if it exists.
    async fn load_message(
        &self,
        engine: &Engine,
        id: u64,
    ) -> Result<Option<(u64, StoredMessage)>, ApiError> {
        let Some(stored) = engine
            .get(&keys::message(id))
            .await
            .map_err(|e| engine_error(&e))?
        else {
            return Ok(None);
        };
        let message: StoredMessage = serde_json::from_slice(&stored.value)
            .map_err(|e| internal(format!("stored message {id} is unreadable: {e}")))?;
        Ok(Some((stored.version, message)))
    }

    /// The live message `id`, or `NOT_FOUND`.
    async fn live_message(
        &self,
        engine: &Engine,
        id: u64,
    ) -> Result<(u64, StoredMessage), ApiError> {
        match self.load_message(engine, id).await? {
            Some((version, message)) if message.is_live() => Ok((version, message)),
            _ => Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no message {id}"),
            )),
        }
    }

    /// Changes live message `id` by compare-and-set: `change` returns `false` when there is
    /// nothing to change. Returns the record as written (or as found, unchanged) and its
    /// version.
    async fn update_message(
        &self,
        engine: &Engine,
        id: u64,
        change: impl Fn(&mut StoredMessage) -> Result<bool, ApiError>,
    ) -> Result<(u64, StoredMessage), ApiError> {
        let key = keys::message(id);
        for _ in 0..CAS_ATTEMPTS {
            let (version, mut message) = self.live_message(engine, id).await?;
            if !change(&mut message)? {
                return Ok((version, message));
            }
            let value = to_bytes(&message)?;
            match engine
                .put(&key, value, Expect::Version(version), None)
                .await
                .map_err(|e| engine_error(&e))?
            {
                Put::Stored(version) => return Ok((version, message)),
                Put::Conflict(_) => continue,
            }
        }
        Err(ApiError::new(
            ErrorCode::Unavailable,
            format!("message {id} changed too often meanwhile; retry later with the same id"),
        ))
    }

    /// Forgets the message records this node's index gave up (oldest first).
    async fn forget_messages(&self, engine: &Engine, ids: Vec<u64>) {
        for id in ids {
            if let Err(e) = engine.delete(&keys::message(id), Expect::Any).await {
                debug!(error = %e, id, "a forgotten message stays");
            }
        }
    }

    /// `new` and `call`: stores a message from `user` to `to` and queues its event.
    async fn new_message(
        &self,
        engine: &Engine,
        user: &str,
        client: ClientKey,
        to: String,
        body: Body,
        now: Instant,
    ) -> Result<Answer, ApiError> {
        let message_id = self.next_message_id(engine).await?;
        let timestamp = now_ms();
        let event = match &body {
            Body::Text {
                message,
                client_message_id,
                ..
            } => ServerEvent::New(NewEvent {
                message_id,
                from: user.to_owned(),
                chat_id: user.to_owned(),
                message: message.clone(),
                client_message_id: client_message_id.clone(),
                timestamp,
            }),
            Body::Call {
                call_type,
                direction,
                status,
            } => ServerEvent::Call(CallEvent {
                message_id,
                from: user.to_owned(),
                chat_id: user.to_owned(),
                call_type: *call_type,
                direction: *direction,
                status: *status,
                timestamp,
            }),
        };
        let stored = StoredMessage {
            message_id,
            from: user.to_owned(),
            to: to.clone(),
            timestamp,
            body,
            receipt: Receipt::Sent,
            deleted: false,
        };
        let bytes = stored.bytes();
        // Room on this node's index first, so a refused request forgets nobody's message.
        if self.budget.try_reserve(bytes).is_err() {
            return Err(budget_error());
        }
        let key = keys::message(message_id);
        let stored_ok = async {
            match engine
                .put(&key, to_bytes(&stored)?, Expect::Absent, None)
                .await
                .map_err(|e| engine_error(&e))?
            {
                Put::Stored(_) => {}
                Put::Conflict(_) => {
                    return Err(internal(format!("message id {message_id} is taken")));
                }
            }
            let index = Append::store(self.conversation_retention());
            let entry = Frame::text(message_id.to_string());
            let indexed = engine
                .append(&keys::conversation(user, &to), entry, index)
                .await
                .map_err(|e| engine_error(&e));
            match indexed {
                Ok(_) => self.deliver(engine, &[&to], &event, client, now).await,
                Err(error) => Err(error),
            }
        }
        .await;
        if let Err(error) = stored_ok {
            self.budget.release(bytes);
            if let Err(e) = engine.delete(&key, Expect::Any).await {
                warn!(error = %e, message_id, "a refused message's record stays");
            }
            return Err(error);
        }
        let forgotten = self
            .local()
            .messages
            .insert_reserved(message_id, bytes, client);
        self.forget_messages(engine, forgotten).await;
        Ok(Answer::done(json!({ "messageId": message_id })))
    }

    fn conversation_retention(&self) -> Retention {
        // Message ids are at most 20 digits.
        let entries = self.config.max_messages.max(1);
        Retention::trim(entries, entries.saturating_mul(20))
    }

    async fn edit(
        &self,
        engine: &Engine,
        user: &str,
        client: ClientKey,
        request: EditRequest,
        now: Instant,
    ) -> Result<Answer, ApiError> {
        let id = request.message_id;
        let (_, before) = self.live_message(engine, id).await?;
        let text = request.message;
        let (version, edited) = self
            .update_message(engine, id, |message| {
                if message.from != user {
                    return Err(ApiError::new(
                        ErrorCode::Forbidden,
                        format!("message {id} was not sent by you"),
                    ));
                }
                match &mut message.body {
                    Body::Text {
                        message: current,
                        edited,
                        ..
                    } => {
                        current.clone_from(&text);
                        *edited = true;
                        Ok(true)
                    }
                    Body::Call { .. } => Err(ApiError::bad_request(format!(
                        "message {id} is a call message and cannot be edited"
                    ))),
                }
            })
            .await?;
        let event = ServerEvent::Edit(EditEvent {
            message_id: id,
            from: user.to_owned(),
            chat_id: user.to_owned(),
            message: text,
            original_message_id: id,
            original_client_message_id: edited.body.client_message_id(),
            timestamp: now_ms(),
        });
        if let Err(error) = self
            .deliver(engine, &[&edited.to], &event, client, now)
            .await
        {
            // Nothing happens on failure: the old text comes back unless someone changed the
            // message since.
            if let Ok(value) = to_bytes(&before) {
                let _ = engine
                    .put(&keys::message(id), value, Expect::Version(version), None)
                    .await;
            }
            return Err(error);
        }
        self.local().messages.resize(&id, edited.bytes());
        Ok(Answer::done(json!({ "messageId": id })))
    }

    async fn delete(
        &self,
        engine: &Engine,
        user: &str,
        client: ClientKey,
        request: MessageRef,
        now: Instant,
    ) -> Result<Answer, ApiError> {
        let id = request.message_id;
        let (_, message) = self.live_message(engine, id).await?;
        if message.from != user {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("message {id} was not sent by you"),
            ));
        }
        let event = ServerEvent::Delete(DeleteEvent {
            message_id: id,
            from: user.to_owned(),
            chat_id: user.to_owned(),
            original_message_id: id,
            original_client_message_id: message.body.client_message_id(),
        });
        self.deliver(engine, &[&message.to], &event, client, now)
            .await?;
        // A tombstone: the id stays taken, the text goes.
        let deleted = self
            .update_message(engine, id, |message| {
                message.deleted = true;
                if let Body::Text { message, .. } = &mut message.body {
                    *message = String::new();
                }
                Ok(true)
            })
            .await;
        match deleted {
            Ok((_, tombstone)) => self.local().messages.resize(&id, tombstone.bytes()),
            // Deleted meanwhile by a retry on another socket: the same outcome.
            Err(error) if error.code == ErrorCode::NotFound => {}
            Err(error) => return Err(error),
        }
        Ok(Answer::done(json!({ "messageId": id })))
    }

    async fn receipt(
        &self,
        engine: &Engine,
        user: &str,
        client: ClientKey,
        request: MessageRef,
        receipt: Receipt,
        now: Instant,
    ) -> Result<Answer, ApiError> {
        let id = request.message_id;
        let (_, message) = self.live_message(engine, id).await?;
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
        let payload = ReceiptEvent {
            message_id: id,
            chat_id: user.to_owned(),
        };
        let event = match receipt {
            Receipt::Read => ServerEvent::Read(payload),
            Receipt::Delivered | Receipt::Sent => ServerEvent::Dlvrd(payload),
        };
        self.deliver(engine, &[&message.from], &event, client, now)
            .await?;
        let advanced = self
            .update_message(engine, id, |message| {
                if message.receipt >= receipt {
                    return Ok(false);
                }
                message.receipt = receipt;
                Ok(true)
            })
            .await;
        match advanced {
            Ok(_) => Ok(salute),
            Err(error) if error.code == ErrorCode::NotFound => Ok(salute),
            Err(error) => Err(error),
        }
    }

    async fn new_call(
        &self,
        engine: &Engine,
        user: &str,
        client: ClientKey,
        participants: Vec<String>,
        call_type: CallType,
        now: Instant,
    ) -> Result<Answer, ApiError> {
        let call_id = uuid::Uuid::new_v4().to_string();
        let stored = CallStored {
            call_id: call_id.clone(),
            caller: user.to_owned(),
            participants: participants.clone(),
            call_type,
            call_duration: 0,
        };
        let answer = to_value(&stored)?;
        let event = ServerEvent::NewCall(stored);
        let call = OpenCall {
            caller: user.to_owned(),
            participants,
            call_type,
            started_ms: now_ms(),
        };
        let bytes = call.bytes(&call_id);
        if self.budget.try_reserve(bytes).is_err() {
            return Err(budget_error());
        }
        let key = keys::call(&call_id);
        let opened = async {
            match engine
                .put(&key, to_bytes(&call)?, Expect::Absent, None)
                .await
                .map_err(|e| engine_error(&e))?
            {
                Put::Stored(_) => {}
                Put::Conflict(_) => return Err(internal("a fresh call id is taken")),
            }
            let recipients: Vec<&str> = call.participants.iter().map(String::as_str).collect();
            self.deliver(engine, &recipients, &event, client, now).await
        }
        .await;
        if let Err(error) = opened {
            self.budget.release(bytes);
            let _ = engine.delete(&key, Expect::Any).await;
            return Err(error);
        }
        let forgotten = self.local().calls.insert_reserved(call_id, bytes, client);
        for id in forgotten {
            if let Err(e) = engine.delete(&keys::call(&id), Expect::Any).await {
                debug!(error = %e, "a forgotten call stays");
            }
        }
        Ok(Answer::done(answer))
    }

    async fn close_call(
        &self,
        engine: &Engine,
        user: &str,
        client: ClientKey,
        request: CloseCallRequest,
        now: Instant,
    ) -> Result<Answer, ApiError> {
        let call_id = request.call_id;
        let key = keys::call(&call_id);
        let not_found = || ApiError::new(ErrorCode::NotFound, format!("no open call {call_id:?}"));
        let stored = engine
            .get(&key)
            .await
            .map_err(|e| engine_error(&e))?
            .ok_or_else(not_found)?;
        let call: OpenCall = serde_json::from_slice(&stored.value)
            .map_err(|e| internal(format!("stored call is unreadable: {e}")))?;
        if !call.involves(user) {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "only the caller or a participant can close a call",
            ));
        }
        // Closing is taking the record: of two closes on two nodes, one wins.
        if !engine
            .delete(&key, Expect::Version(stored.version))
            .await
            .map_err(|e| engine_error(&e))?
        {
            return Err(not_found());
        }
        let members: Vec<String> = std::iter::once(call.caller.clone())
            .chain(call.participants.iter().cloned())
            .filter(|m| m != user)
            .collect();
        let elapsed_ms = now_ms().saturating_sub(call.started_ms);
        let closed = CallStored {
            call_id: call_id.clone(),
            caller: call.caller.clone(),
            participants: call.participants.clone(),
            call_type: call.call_type,
            call_duration: elapsed_ms / 1000,
        };
        let answer = to_value(&closed)?;
        let event = ServerEvent::CloseCall(closed);
        let recipients: Vec<&str> = members.iter().map(String::as_str).collect();
        if let Err(error) = self.deliver(engine, &recipients, &event, client, now).await {
            // Nothing happens on failure: the call is open again.
            let _ = engine.put(&key, stored.value, Expect::Absent, None).await;
            return Err(error);
        }
        self.local().calls.remove(&call_id);
        Ok(Answer::done(answer))
    }

    async fn history(
        &self,
        engine: &Engine,
        user: &str,
        chat_id: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Answer, ApiError> {
        let topic = keys::conversation(user, chat_id);
        let most = self.conversation_retention().max_entries;
        let mut want = limit.saturating_mul(2).clamp(16, most.max(16));
        loop {
            let entries = match engine
                .read(&topic, ReadFrom::Latest(want), want)
                .await
                .map_err(|e| engine_error(&e))?
            {
                Read::Entries { entries, .. } => entries,
                Read::Gone { .. } => Vec::new(),
            };
            let index: Vec<u64> = entries
                .iter()
                .filter_map(|entry| entry.frame.as_str().parse().ok())
                .collect();
            let mut page = Vec::new();
            for id in store::page_candidates(&index, before) {
                if page.len() >= limit {
                    break;
                }
                if let Some((_, message)) = self.load_message(engine, id).await?
                    && message.is_live()
                {
                    page.push(message.history_item());
                }
            }
            if page.len() >= limit || entries.len() < want || want >= most {
                page.reverse();
                return Ok(Answer {
                    payload: json!({ "messages": page }),
                    // Read-only and possibly large: a retry reads again instead.
                    cache: false,
                });
            }
            want = want.saturating_mul(4).min(most);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Client events

    /// A client event from `user`; `Err` is answered with an error frame.
    pub(crate) async fn client_event(
        &self,
        engine: &Engine,
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
        self.rate_check(engine, user, client, now).await?;
        let typing: TypingRequest = messages::payload(event_type, payload)?;
        check_id(&self.config, "chatId", &typing.chat_id)?;
        // Nothing is queued for a user without sockets (and it uses no id).
        let online = engine
            .presence_contains(ONLINE_ROOM, &typing.chat_id)
            .await
            .map_err(|e| engine_error(&e))?;
        if online {
            let event = ServerEvent::Typing(TypingEvent {
                chat_id: user.to_owned(),
            });
            let timestamp = now_ms();
            let guess = self.cached_top(&typing.chat_id).unwrap_or(0);
            if let Some(id) = self
                .emit_ephemeral(engine, &typing.chat_id, guess, |id| {
                    messages::event_frame(id, timestamp, &event)
                })
                .await
            {
                self.cache_top(&typing.chat_id, id);
                telemetry::events(&event, 1);
            }
        }
        Ok(())
    }
}

/// Counts the keys under `prefix` (for status output).
async fn count_keys(engine: &Engine, prefix: &str) -> usize {
    const PAGE: usize = 1024;
    let mut count = 0usize;
    let mut after: Option<String> = None;
    loop {
        let page = match engine.scan(prefix, after.as_deref(), PAGE).await {
            Ok(page) => page,
            Err(e) => {
                warn!(error = %e, "could not count stored records");
                return count;
            }
        };
        count = count.saturating_add(page.len());
        match page.last() {
            Some((key, _)) if page.len() == PAGE => after = Some(key.clone()),
            _ => return count,
        }
    }
}

/// The response frame for request `id`, or `None` (logged) if it cannot be encoded.
fn respond(id: &str, answer: &Result<Value, ApiError>) -> Option<Frame> {
    let payload = match answer {
        Ok(payload) => payload.clone(),
        Err(error) => messages::error_payload(error),
    };
    match messages::response_frame(id, now_ms(), &payload) {
        Ok(frame) => Some(frame),
        Err(e) => {
            error!(error = %e, "could not encode a response");
            None
        }
    }
}

/// A remembered response as a frame.
/// The answer to request `id` refused with `error`, and its outcome.
fn failed(id: &str, error: ApiError) -> (Option<Frame>, Outcome) {
    let outcome = Outcome::Failed(error.code);
    (respond(id, &Err(error)), outcome)
}

fn frame_of(stored: &[u8]) -> Option<Frame> {
    match std::str::from_utf8(stored) {
        Ok(text) => Some(Frame::text(text)),
        Err(e) => {
            error!(error = %e, "a remembered response is not UTF-8");
            None
        }
    }
}

/// The error for new work refused because the protocol's memory budget is full.
fn budget_error() -> ApiError {
    ApiError::new(
        ErrorCode::LimitReached,
        "the server's memory budget for this protocol is full; nothing was done, retry later",
    )
}

fn internal(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Internal, message)
}

/// The protocol's answer to an engine failure (nothing was done).
fn engine_error(error: &EngineError) -> ApiError {
    match error {
        EngineError::Unavailable(why) => ApiError::new(
            ErrorCode::Unavailable,
            format!(
                "the state engine is unavailable ({why}); nothing was done, retry later with the same id"
            ),
        ),
        EngineError::Full(what) => ApiError::new(
            ErrorCode::LimitReached,
            format!("the state engine is full ({what}); nothing was done, retry later"),
        ),
        other => internal(format!("{other}")),
    }
}

fn to_value<T: serde::Serialize>(value: &T) -> Result<Value, ApiError> {
    serde_json::to_value(value).map_err(|e| internal(format!("could not encode: {e}")))
}

fn to_bytes<T: serde::Serialize>(value: &T) -> Result<Bytes, ApiError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| internal(format!("could not encode: {e}")))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use switchboard_core::engine::{MemoryCluster, MemoryLimits};
    use switchboard_core::{Outgoing, PeerLink, peer_channel};

    use super::*;

    fn peer() -> (Peer, PeerLink) {
        peer_channel(SocketAddr::from(([127, 0, 0, 1], 1)), 256)
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

    /// One node on its own in-memory engine.
    struct Rig {
        node: Node,
        engine: Engine,
    }

    fn rig(config: Config) -> Rig {
        rig_on(config, Engine::memory(MemoryLimits::default()))
    }

    fn rig_on(config: Config, engine: Engine) -> Rig {
        let budget = Arc::new(MemoryBudget::new(config.max_state_bytes));
        Rig {
            node: Node::new(config, budget),
            engine,
        }
    }

    impl Rig {
        async fn send_from(
            &self,
            from: ClientKey,
            user: &str,
            id: &str,
            kind: &str,
            payload: Value,
            now: Instant,
        ) -> Value {
            let frame = self
                .node
                .request(&self.engine, user, from, id, Some(kind), payload, now)
                .await
                .unwrap();
            serde_json::from_str(frame.as_str()).unwrap()
        }

        async fn send(&self, user: &str, id: &str, kind: &str, payload: Value) -> Value {
            self.send_from(client(1), user, id, kind, payload, Instant::now())
                .await
        }

        async fn open(&self, user: &str, peer: &Peer, now: Instant) -> Conn {
            let mut conn = Conn::new(user.to_owned(), client(1));
            let me = self.engine.conn_ref(peer.id());
            self.node.open(&self.engine, &mut conn, peer, me, now).await;
            conn
        }

        async fn close(&self, conn: Conn, peer: &Peer) {
            let me = self.engine.conn_ref(peer.id());
            self.node.close(&self.engine, conn, me).await;
        }

        async fn pending(&self, user: &str) -> usize {
            self.node.pending_for(&self.engine, user).await
        }

        async fn stats(&self) -> Stats {
            self.node.stats(&self.engine).await
        }

        /// Acks every pending event of `users` (makes room in the pending pool).
        async fn ack_everything(&self, users: &[String]) {
            for user in users {
                if let Ok(Read::Entries { entries, .. }) = self
                    .engine
                    .read(&keys::outbox(user), ReadFrom::After(START), usize::MAX)
                    .await
                {
                    for entry in entries {
                        self.node.ack(&self.engine, user, entry.offset).await;
                    }
                }
            }
        }
    }

    fn new(to: &str, text: &str) -> Value {
        json!({"chatId": to, "message": text})
    }

    #[test]
    fn validation_needs_no_stored_state() {
        let config = Config {
            max_call_participants: 2,
            ..Config::default()
        };
        let code = |kind: Option<&str>, payload: Value| {
            validate(&config, "me", kind, payload).unwrap_err().code
        };
        assert_eq!(code(None, json!({})), ErrorCode::BadRequest);
        assert_eq!(
            code(Some("teleport"), json!({})),
            ErrorCode::UnknownPayloadType
        );
        assert_eq!(code(Some("new"), new("b", " ")), ErrorCode::BadRequest);
        assert_eq!(code(Some("new"), new("", "x")), ErrorCode::BadRequest);
        assert_eq!(
            code(Some("new"), new("b", &"x".repeat(5_000))),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(Some("edit"), json!({"messageId": 1, "message": ""})),
            ErrorCode::BadRequest
        );
        assert_eq!(code(Some("history"), json!({})), ErrorCode::BadRequest);
        let participants = |list: Value| {
            validate(
                &config,
                "me",
                Some("newCall"),
                json!({"participants": list, "callType": "video"}),
            )
        };
        match participants(json!(["a", "me", "a", "b"])).unwrap() {
            Command::NewCall { participants, .. } => assert_eq!(participants, ["a", "b"]),
            other => panic!("{other:?}"),
        }
        assert!(participants(json!(["me"])).is_err());
        assert!(participants(json!(["a", "b", "c"])).is_err());
        match validate(
            &config,
            "me",
            Some("history"),
            json!({"chatId": "b", "limit": 100_000}),
        )
        .unwrap()
        {
            Command::History { limit, .. } => assert_eq!(limit, config.history_page_limit),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn offline_events_wait_and_ids_survive_forgetting_idle_users() {
        let rig = rig(Config {
            max_users: 2,
            ..Config::default()
        });
        let now = Instant::now();
        let (a, mut a_link) = peer();
        rig.node.admit("a", client(1), now).unwrap();
        let a_conn = rig.open("a", &a, now).await;
        let r = rig.send("a", "1", "new", new("b", "hi")).await;
        assert!(r["payload"]["messageId"].is_u64(), "{r}");
        assert_eq!(rig.pending("b").await, 1);
        // b connects, gets the event with id 1, acks it and leaves.
        let (b, mut b_link) = peer();
        let b_conn = rig.open("b", &b, now).await;
        let events = drain(&mut b_link);
        assert_eq!(events[0]["id"], 1);
        assert_eq!(events[0]["eventType"], "new");
        rig.node.ack(&rig.engine, "b", 1).await;
        rig.close(b_conn, &b).await;
        assert_eq!(rig.stats().await.pending_events, 0);
        drain(&mut a_link);
        // Writing to c needs room in the node's table: b (idle) is forgotten there. Its ids
        // are its outbox's offsets, in the engine: they keep growing when it comes back.
        rig.send("a", "2", "new", new("c", "hi")).await;
        assert!(rig.stats().await.users <= 2);
        let (b2, mut b2_link) = peer();
        rig.node.admit("b", client(1), now).unwrap();
        let _b2_conn = rig.open("b", &b2, now).await;
        rig.send("a", "3", "new", new("b", "again")).await;
        let ids: Vec<u64> = drain(&mut b2_link)
            .iter()
            .filter(|e| e["eventType"] == "new")
            .map(|e| e["id"].as_u64().unwrap())
            .collect();
        assert!(!ids.is_empty() && ids.iter().all(|id| *id > 1), "{ids:?}");
        drop(a_conn);
    }

    #[tokio::test]
    async fn a_full_outbox_fails_the_request_and_stores_nothing() {
        let rig = rig(Config {
            outbox_limit: 2,
            ..Config::default()
        });
        for i in 0..2 {
            let r = rig.send("a", &i.to_string(), "new", new("b", "x")).await;
            assert!(r["payload"]["messageId"].is_u64());
        }
        let r = rig.send("a", "3", "new", new("b", "x")).await;
        assert_eq!(r["payload"]["error"]["code"], "OUTBOX_FULL");
        let stats = rig.stats().await;
        assert_eq!((stats.messages, stats.pending_events), (2, 2));
        // The failure is not remembered: once b acks, the same request id goes through.
        rig.node.ack(&rig.engine, "b", 1).await;
        let r = rig.send("a", "3", "new", new("b", "x")).await;
        assert!(r["payload"]["messageId"].as_u64().unwrap() > 2, "{r}");
        assert_eq!(rig.stats().await.messages, 3);
    }

    #[tokio::test]
    async fn the_server_wide_pending_bound_applies_too() {
        let rig = rig(Config {
            max_pending_events: 1,
            ..Config::default()
        });
        rig.send("a", "1", "new", new("b", "x")).await;
        let r = rig.send("a", "2", "new", new("c", "x")).await;
        assert_eq!(r["payload"]["error"]["code"], "OUTBOX_FULL");
        assert_eq!(
            rig.stats().await.messages,
            1,
            "the refused message is not kept"
        );
    }

    #[tokio::test]
    async fn retries_are_answered_from_the_engine() {
        let rig = rig(Config::default());
        let first = rig.send("a", "r", "new", new("b", "x")).await;
        let again = rig.send("a", "r", "new", new("b", "x")).await;
        assert_eq!(first, again);
        assert_eq!(rig.pending("b").await, 1);
        assert_eq!(rig.stats().await.messages, 1);
        // Another node of the same engine answers it the same way.
        let other = rig_on(Config::default(), rig.engine.clone());
        assert_eq!(other.send("a", "r", "new", new("b", "x")).await, first);
        assert_eq!(rig.pending("b").await, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_of_a_request_being_answered_waits_for_that_answer() {
        let rig = rig(Config::default());
        // Another socket is answering request "r" of a right now.
        let claimed = rig
            .engine
            .put(
                &keys::inflight("a", "r"),
                Bytes::new(),
                Expect::Absent,
                None,
            )
            .await
            .unwrap();
        assert!(matches!(claimed, Put::Stored(_)));
        let answer = Frame::text(r#"{"type":"response","id":"r","payload":{"messageId":7}}"#);
        let engine = rig.engine.clone();
        let record = keys::request("a", "r");
        let remembered = answer.clone();
        let answering = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            engine
                .remember(
                    &record,
                    Bytes::from(remembered.as_str().to_owned()),
                    IDEMPOTENCY_TTL,
                )
                .await
        });
        let retry = rig
            .node
            .request(
                &rig.engine,
                "a",
                client(1),
                "r",
                Some("new"),
                new("b", "x"),
                Instant::now(),
            )
            .await;
        assert_eq!(retry, Some(answer));
        assert_eq!(answering.await.unwrap(), Ok(None));
        assert_eq!(rig.pending("b").await, 0, "the retry ran nothing");
        // An answer that never comes ends the wait with UNAVAILABLE, bounded.
        rig.engine
            .put(
                &keys::inflight("a", "s"),
                Bytes::new(),
                Expect::Absent,
                None,
            )
            .await
            .unwrap();
        let r = rig.send("a", "s", "new", new("b", "x")).await;
        assert_eq!(r["payload"]["error"]["code"], "UNAVAILABLE", "{r}");
    }

    #[tokio::test]
    async fn overdue_events_go_to_every_socket_of_the_user() {
        let rig = rig(Config {
            redelivery_timeout: Duration::from_secs(1),
            ..Config::default()
        });
        let t0 = Instant::now();
        let (b1, mut l1) = peer();
        let (b2, mut l2) = peer();
        let mut c1 = rig.open("b", &b1, t0).await;
        let mut c2 = rig.open("b", &b2, t0).await;
        drain(&mut l1);
        drain(&mut l2);
        rig.send("a", "1", "new", new("b", "x")).await;
        assert_eq!(drain(&mut l1).len(), 1, "live on both sockets");
        assert_eq!(drain(&mut l2).len(), 1);
        for at in [
            Duration::from_millis(500),
            Duration::from_secs(5),
            Duration::from_secs(60),
        ] {
            rig.node.tick(&rig.engine, &mut c1, &b1, t0 + at).await;
            rig.node.tick(&rig.engine, &mut c2, &b2, t0 + at).await;
            let (one, two) = (drain(&mut l1), drain(&mut l2));
            if at == Duration::from_millis(500) {
                // First seen on this tick: not overdue yet.
                assert!(one.is_empty() && two.is_empty());
            } else if at == Duration::from_secs(5) {
                assert_eq!(one[0]["id"], 1);
                assert_eq!(two[0]["id"], 1);
                rig.node.ack(&rig.engine, "b", 1).await;
            } else {
                assert!(one.is_empty() && two.is_empty(), "acked: never again");
            }
        }
    }

    #[tokio::test]
    async fn receipts_only_advance() {
        let rig = rig(Config::default());
        let sent = rig.send("a", "1", "new", new("b", "x")).await;
        let id = sent["payload"]["messageId"].clone();
        let r = rig.send("b", "1", "read", json!({"messageId": id})).await;
        assert_eq!(r["payload"], "🫡");
        let r = rig.send("b", "2", "dlvrd", json!({"messageId": id})).await;
        assert_eq!(r["payload"], "🫡");
        assert_eq!(
            rig.pending("a").await,
            1,
            "only the read receipt became an event"
        );
        let r = rig.send("a", "2", "read", json!({"messageId": id})).await;
        assert_eq!(r["payload"]["error"]["code"], "FORBIDDEN");
    }

    #[tokio::test]
    async fn two_nodes_never_lose_each_others_updates() {
        let cluster = MemoryCluster::new(MemoryLimits::default());
        let a = rig_on(Config::default(), cluster.node());
        let b = rig_on(Config::default(), cluster.node());
        let sent = a.send("alice", "1", "new", new("bob", "hi")).await;
        let id = sent["payload"]["messageId"].clone();
        // The receipt through node B, the edit through node A: both stick.
        b.send("bob", "1", "dlvrd", json!({"messageId": id})).await;
        a.send(
            "alice",
            "2",
            "edit",
            json!({"messageId": id, "message": "hello"}),
        )
        .await;
        let page = b
            .send("bob", "h", "history", json!({"chatId": "alice"}))
            .await;
        let item = &page["payload"]["messages"][0];
        assert_eq!(
            (item["message"].as_str(), item["receipt"].as_str()),
            (Some("hello"), Some("delivered"))
        );
        assert_eq!(item["edited"], true);
        // Message ids only grow across nodes.
        let next = b.send("bob", "2", "new", new("alice", "yo")).await;
        assert!(next["payload"]["messageId"].as_u64() > id.as_u64());
        // Of two closes of one call, on two nodes, exactly one wins.
        let call = a
            .send(
                "alice",
                "c",
                "newCall",
                json!({"participants": ["bob"], "callType": "audio"}),
            )
            .await;
        let call_id = call["payload"]["callId"].clone();
        let first = a
            .send("alice", "x", "closeCall", json!({"callId": call_id}))
            .await;
        let second = b
            .send("bob", "x", "closeCall", json!({"callId": call_id}))
            .await;
        assert!(first["payload"]["callId"].is_string(), "{first}");
        assert_eq!(second["payload"]["error"]["code"], "NOT_FOUND");
    }

    #[tokio::test]
    async fn acks_on_another_node_free_this_nodes_share_once_it_checks() {
        let cluster = MemoryCluster::new(MemoryLimits::default());
        let config = Config {
            max_pending_per_client: 2,
            ..Config::default()
        };
        let a = rig_on(config.clone(), cluster.node());
        let b = rig_on(config, cluster.node());
        a.send("alice", "1", "new", new("bob", "1")).await;
        a.send("alice", "2", "new", new("bob", "2")).await;
        // bob acks both through node B: A's books still count them until A looks.
        b.node.ack(&b.engine, "bob", 1).await;
        b.node.ack(&b.engine, "bob", 2).await;
        assert_eq!(a.stats().await.pending_events, 2);
        let r = a.send("alice", "3", "new", new("bob", "3")).await;
        assert!(
            r["payload"]["messageId"].is_u64(),
            "the share was checked: {r}"
        );
        assert_eq!(a.stats().await.pending_events, 1);
    }

    fn name(prefix: &str, i: usize, len: usize) -> String {
        let mut name = format!("{prefix}{i}-");
        while name.len() < len {
            name.push('x');
        }
        name
    }

    /// Fills every pool through requests with maximal ids and texts; returns the error codes
    /// seen.
    async fn fill_every_pool(rig: &Rig) -> HashSet<String> {
        let config = rig.node.config.clone();
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
        let now = Instant::now();
        for i in 0..(config.max_messages * 3) {
            let from = name("s", i % clients, id_len);
            let to = &recipients[i % recipients.len()];
            let key = client(u8::try_from(i % clients).unwrap());
            let payload =
                json!({"chatId": to, "message": text, "clientMessageId": name("c", i, id_len)});
            let r = rig
                .send_from(key, &from, &name("q", i, id_len), "new", payload, now)
                .await;
            note(&r);
            if i % 7 == 0 {
                rig.ack_everything(&recipients).await;
            }
        }
        for i in 0..(config.max_open_calls * 2) {
            rig.ack_everything(&recipients).await;
            let participants: Vec<&String> = recipients
                .iter()
                .skip(i % 3)
                .take(config.max_call_participants)
                .collect();
            let r = rig
                .send(
                    &recipients[recipients.len() - 1],
                    &name("call", i, id_len),
                    "newCall",
                    json!({"participants": participants, "callType": "video"}),
                )
                .await;
            note(&r);
        }
        // Leave the pending pool full: events nobody acks.
        for i in 0..(config.max_pending_events * 2) {
            let to = &recipients[1 + i % (recipients.len() - 1)];
            let r = rig
                .send(&recipients[0], &name("p", i, id_len), "new", new(to, &text))
                .await;
            note(&r);
        }
        codes
    }

    fn assert_within_formula(node: &Node) -> Memory {
        let config = &node.config;
        let memory = node.memory();
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

    #[tokio::test]
    async fn every_pool_filled_to_its_limit_stays_within_the_documented_formula() {
        let rig = rig(small_pools());
        let codes = fill_every_pool(&rig).await;
        let memory = assert_within_formula(&rig.node);
        let stats = rig.stats().await;
        // The pools really were full.
        assert!(stats.users >= 35, "{stats:?}");
        assert_eq!(stats.rate_keys, 8);
        assert!(memory.messages > 60_000 - 10_000, "{memory:?}");
        assert!(memory.cache > 30_000 - 10_000, "{memory:?}");
        assert!(memory.calls > 25_000 - 6_000, "{memory:?}");
        assert!(
            stats.pending_events == 60 || memory.pending > 200_000 - 10_000,
            "{stats:?} {memory:?}"
        );
        // What the node's indexes gave up is gone from the engine too.
        assert!(stats.messages <= 30, "{stats:?}");
        assert!(stats.open_calls <= 10, "{stats:?}");
        assert!(codes.contains("OUTBOX_FULL"), "{codes:?}");
        assert!(
            codes.contains("RATE_LIMITED"),
            "the client table filled: {codes:?}"
        );
    }

    #[tokio::test]
    async fn the_state_budget_caps_everything_and_refuses_new_work() {
        let rig = rig(Config {
            max_state_bytes: 120_000,
            ..small_pools()
        });
        let codes = fill_every_pool(&rig).await;
        let memory = assert_within_formula(&rig.node);
        assert!(memory.total <= 120_000);
        assert!(codes.contains("LIMIT_REACHED"), "{codes:?}");
    }

    #[tokio::test]
    async fn events_for_a_user_that_never_connected_expire_and_free_the_senders_share() {
        let ttl = Duration::from_secs(60);
        let rig = rig(Config {
            unclaimed_ttl: ttl,
            unclaimed_outbox_limit: 2,
            ..Config::default()
        });
        let t0 = Instant::now();
        let send = |id: &'static str, to: &'static str, at: Instant| {
            rig.send_from(client(1), "a", id, "new", new(to, "x"), at)
        };
        assert!(send("1", "ghost", t0).await["payload"]["messageId"].is_u64());
        let later = t0 + Duration::from_secs(30);
        assert!(send("2", "ghost", later).await["payload"]["messageId"].is_u64());
        let r = send("3", "ghost", later).await;
        assert_eq!(r["payload"]["error"]["code"], "OUTBOX_FULL", "{r}");
        assert_eq!(rig.stats().await.unclaimed_users, 1);
        // The first event expires at t0 + ttl, the second 30 s later.
        rig.node.expire_unclaimed(&rig.engine, t0 + ttl).await;
        assert_eq!(rig.pending("ghost").await, 1);
        rig.node.expire_unclaimed(&rig.engine, later + ttl).await;
        assert_eq!(rig.pending("ghost").await, 0);
        let stats = rig.stats().await;
        assert_eq!((stats.unclaimed_users, stats.clients), (0, 0), "{stats:?}");
        assert_eq!(rig.node.memory().pending, 0);
        // A user that connects is claimed: its events are kept until acked, however old.
        send("4", "bob", later + ttl).await;
        let (bob, mut link) = peer();
        let _conn = rig.open("bob", &bob, later + ttl).await;
        assert_eq!(drain(&mut link).len(), 1);
        rig.node
            .expire_unclaimed(&rig.engine, later + ttl * 10)
            .await;
        assert_eq!(rig.pending("bob").await, 1);
    }

    #[tokio::test]
    async fn unclaimed_users_and_pending_events_are_limited_per_client_not_per_user_id() {
        let rig = rig(Config {
            max_unclaimed_users_per_client: 3,
            max_pending_per_client: 5,
            ..Config::default()
        });
        // One client, changing its userId, may create 3 users that never connect.
        for (i, sender) in ["a", "b", "c"].iter().enumerate() {
            let r = rig
                .send(sender, "1", "new", new(&format!("g{i}"), "x"))
                .await;
            assert!(r["payload"]["messageId"].is_u64(), "{r}");
        }
        let r = rig.send("d", "1", "new", new("g3", "x")).await;
        assert_eq!(r["payload"]["error"]["code"], "LIMIT_REACHED", "{r}");
        assert_eq!(
            rig.pending("g3").await,
            0,
            "the refused request queued nothing"
        );
        // Another client is not affected.
        let r = rig
            .send_from(client(2), "e", "1", "new", new("g3", "x"), Instant::now())
            .await;
        assert!(r["payload"]["messageId"].is_u64(), "{r}");
        // Pending events are counted per sending client too, whoever the recipients are.
        rig.send("a", "2", "new", new("g0", "x")).await;
        rig.send("b", "2", "new", new("g1", "x")).await;
        let r = rig.send("c", "2", "new", new("g2", "x")).await;
        assert_eq!(r["payload"]["error"]["code"], "OUTBOX_FULL", "{r}");
        assert_eq!(rig.stats().await.pending_events, 6);
    }

    #[tokio::test]
    async fn presence_is_bounded_both_ways() {
        let rig = rig(Config {
            max_presence_fanout: 3,
            ..Config::default()
        });
        let now = Instant::now();
        let mut links = Vec::new();
        for i in 0..6 {
            let (p, link) = peer();
            let conn = rig.open(&format!("u{i}"), &p, now).await;
            links.push((p, link, conn));
        }
        for (_, link, _) in &mut links {
            drain(link);
        }
        let presence = |events: Vec<Value>, kind: &str| {
            events.iter().filter(|e| e["eventType"] == kind).count()
        };
        let (newcomer, mut own) = peer();
        let conn = rig.open("new", &newcomer, now).await;
        let told: usize = links
            .iter_mut()
            .map(|(_, link, _)| presence(drain(link), "online"))
            .sum();
        assert_eq!(told, 3, "at most max_presence_fanout are told");
        assert_eq!(
            presence(drain(&mut own), "online"),
            3,
            "the roster is bounded too"
        );
        assert_eq!(rig.stats().await.online_users, 7);
        rig.close(conn, &newcomer).await;
        let told: usize = links
            .iter_mut()
            .map(|(_, link, _)| presence(drain(link), "offline"))
            .sum();
        assert_eq!(told, 3);
        assert_eq!(rig.stats().await.online_users, 6);
    }
}
