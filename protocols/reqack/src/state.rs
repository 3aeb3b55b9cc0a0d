//! The shared state behind one lock: users (event counter, outbox, sockets), stored messages,
//! open calls, the idempotency cache and the rate limiter.
//!
//! Everything that decides an event id, puts an event in an outbox and hands it to sockets
//! happens under the one lock, so a user's sockets see events in id order and a socket that
//! connects while events are created misses none of them: it registers, then gets the outbox.
//! Nothing here waits: [`Peer::send`] never blocks.

use std::collections::HashMap;
use std::time::Instant;

use serde_json::{Value, json};
use switchboard_core::{CloseReason, ConnId, Frame, Peer, RateLimiter, Reject};
use tracing::{debug, error};

use crate::Config;
use crate::idempotency::IdempotencyCache;
use crate::messages::{
    self, ApiError, CallEvent, CallRequest, CallStored, CloseCallRequest, DeleteEvent, EditEvent,
    EditRequest, ErrorCode, HistoryRequest, MessageRef, NewCallRequest, NewEvent, NewRequest,
    PresenceEvent, ReceiptEvent, ServerEvent, TypingEvent, TypingRequest, now_ms,
};
use crate::outbox::Outbox;
use crate::store::{Body, Calls, Messages, OpenCall, Receipt};

/// One user: known implicitly from the first time it connects or is written to.
#[derive(Debug)]
struct User {
    /// The next event id for this user; only grows.
    next_event_id: u64,
    outbox: Outbox,
    sockets: Vec<Peer>,
}

impl User {
    fn is_idle(&self) -> bool {
        self.sockets.is_empty() && self.outbox.is_empty()
    }
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

/// Counters for tests and status output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Users tracked.
    pub users: usize,
    /// Users with at least one open socket.
    pub online_users: usize,
    /// Unacknowledged events across all outboxes.
    pub pending_events: usize,
    /// Stored messages (deleted ones included until forgotten).
    pub messages: usize,
    /// Open calls.
    pub open_calls: usize,
    /// Remembered responses.
    pub cached_responses: usize,
}

#[derive(Debug)]
pub(crate) struct State {
    config: Config,
    users: HashMap<String, User>,
    /// The lowest first event id for a user created from now on: the highest counter of any user
    /// forgotten so far, so ids keep growing even for a user that was forgotten and comes back.
    id_floor: u64,
    pending_total: usize,
    /// Some user may have become idle since the last fruitless sweep of the user table.
    maybe_idle: bool,
    messages: Messages,
    calls: Calls,
    cache: IdempotencyCache,
    limiter: RateLimiter,
}

impl State {
    pub(crate) fn new(config: Config) -> Self {
        let limiter =
            RateLimiter::new(config.rate_limit, config.rate_window).with_max_keys(config.max_users);
        Self {
            users: HashMap::new(),
            id_floor: 1,
            pending_total: 0,
            maybe_idle: false,
            messages: Messages::new(config.max_messages),
            calls: Calls::new(config.max_open_calls),
            cache: IdempotencyCache::new(config.idempotency_cache),
            limiter,
            config,
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        Stats {
            users: self.users.len(),
            online_users: self
                .users
                .values()
                .filter(|u| !u.sockets.is_empty())
                .count(),
            pending_events: self.pending_total,
            messages: self.messages.len(),
            open_calls: self.calls.len(),
            cached_responses: self.cache.len(),
        }
    }

    /// Unacknowledged events of `user`.
    pub(crate) fn pending_for(&self, user: &str) -> usize {
        self.users.get(user).map_or(0, |u| u.outbox.len())
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

    /// Makes sure every user in `names` exists, forgetting idle users if the table is full.
    fn ensure_users(&mut self, names: &[&str]) -> Result<(), ApiError> {
        let missing = names
            .iter()
            .filter(|n| !self.users.contains_key(**n))
            .count();
        if missing == 0 {
            return Ok(());
        }
        if self.users.len() + missing > self.config.max_users {
            self.forget_idle_users(names);
        }
        if self.users.len() + missing > self.config.max_users {
            return Err(ApiError::new(
                ErrorCode::LimitReached,
                format!(
                    "the server tracks at most {} users and none can be forgotten now; retry later",
                    self.config.max_users
                ),
            ));
        }
        for name in names {
            if !self.users.contains_key(*name) {
                self.users.insert(
                    (*name).to_owned(),
                    User {
                        next_event_id: self.id_floor,
                        outbox: Outbox::default(),
                        sockets: Vec::new(),
                    },
                );
            }
        }
        Ok(())
    }

    /// Forgets every user that is offline with an empty outbox, except those in `keep`. Skipped
    /// when no user became idle since the last sweep that found nobody (so a full table of
    /// active users does not cost a full scan per request).
    fn forget_idle_users(&mut self, keep: &[&str]) {
        if !self.maybe_idle {
            return;
        }
        let before = self.users.len();
        let mut floor = self.id_floor;
        self.users.retain(|name, user| {
            let forget = user.is_idle() && !keep.contains(&name.as_str());
            if forget {
                floor = floor.max(user.next_event_id);
            }
            !forget
        });
        self.id_floor = floor;
        let forgotten = before - self.users.len();
        debug!(forgotten, "forgot idle users");
        // Users kept only because of `keep` may still be idle.
        self.maybe_idle = self.users.values().any(User::is_idle);
    }

    /// Admission for an upgrade by `user`.
    pub(crate) fn admit(&mut self, user: &str) -> Result<(), Reject> {
        self.check_id("userId", user)
            .map_err(|e| Reject::BadRequest(e.message))?;
        self.ensure_users(&[user])
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
    /// announce the user if this is its first socket.
    pub(crate) fn open(&mut self, user: &str, peer: &Peer, now: Instant) {
        if let Err(error) = self.ensure_users(&[user]) {
            peer.close(CloseReason::new(1013, error.message));
            return;
        }
        let timeout = self.config.redelivery_timeout;
        let max_sockets = self.config.max_sockets_per_user;
        let (mut frames, first) = match self.users.get_mut(user) {
            Some(entry) => {
                if entry.sockets.len() >= max_sockets {
                    peer.close(CloseReason::new(
                        CloseReason::POLICY,
                        "too many sockets for this user",
                    ));
                    return;
                }
                entry.sockets.push(peer.clone());
                (
                    entry.outbox.resend_all(now, timeout),
                    entry.sockets.len() == 1,
                )
            }
            None => return,
        };
        if first {
            let others = self.online_users_except(user);
            for other in &others {
                let event = ServerEvent::Online(PresenceEvent {
                    user_id: user.to_owned(),
                });
                self.emit(other, &event, now);
            }
            // The newcomer learns who is online now, after its redelivered events.
            for other in others {
                let event = ServerEvent::Online(PresenceEvent { user_id: other });
                if let Some(frame) = self.allocate_ephemeral(user, &event) {
                    frames.push(frame);
                }
            }
        }
        let _ = peer.send_batch(frames);
    }

    /// A socket of `user` closed: forget it, and announce the user offline if it was the last.
    pub(crate) fn close(&mut self, user: &str, conn: ConnId, now: Instant) {
        let Some(entry) = self.users.get_mut(user) else {
            return;
        };
        let before = entry.sockets.len();
        entry.sockets.retain(|p| p.id() != conn);
        let last = before > 0 && entry.sockets.is_empty();
        if entry.is_idle() {
            self.maybe_idle = true;
        }
        if last {
            for other in self.online_users_except(user) {
                let event = ServerEvent::Offline(PresenceEvent {
                    user_id: user.to_owned(),
                });
                self.emit(&other, &event, now);
            }
        }
    }

    fn online_users_except(&self, user: &str) -> Vec<String> {
        self.users
            .iter()
            .filter(|(name, u)| name.as_str() != user && !u.sockets.is_empty())
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// An ack from any socket of `user` removes the event from its outbox.
    pub(crate) fn ack(&mut self, user: &str, id: u64) {
        if let Some(entry) = self.users.get_mut(user)
            && entry.outbox.ack(id)
        {
            self.pending_total = self.pending_total.saturating_sub(1);
            if entry.is_idle() {
                self.maybe_idle = true;
            }
        }
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

    /// Fails unless every recipient's outbox (and the server's total) has room for one event.
    fn ensure_room(&self, recipients: &[&str]) -> Result<(), ApiError> {
        for name in recipients {
            let waiting = self.users.get(*name).map_or(0, |u| u.outbox.len());
            if waiting >= self.config.outbox_limit {
                return Err(ApiError::new(
                    ErrorCode::OutboxFull,
                    format!(
                        "{name:?} has {waiting} unacknowledged events (the limit); nothing was sent, retry later"
                    ),
                ));
            }
        }
        if self.pending_total + recipients.len() > self.config.max_pending_events {
            return Err(ApiError::new(
                ErrorCode::OutboxFull,
                format!(
                    "the server holds {} unacknowledged events (the limit); nothing was sent, retry later",
                    self.pending_total
                ),
            ));
        }
        Ok(())
    }

    /// Gives `event` the next id of `to`, keeps it in the outbox unless it is ephemeral, and
    /// sends it to every socket of `to`. Durable events need [`State::ensure_users`] and
    /// [`State::ensure_room`] first; ephemeral events for users without sockets are dropped
    /// without using an id.
    fn emit(&mut self, to: &str, event: &ServerEvent, now: Instant) {
        let timeout = self.config.redelivery_timeout;
        let ephemeral = event.is_ephemeral();
        let Some(entry) = self.users.get_mut(to) else {
            if !ephemeral {
                error!(to, "durable event for an unknown user dropped (bug)");
            }
            return;
        };
        if ephemeral && entry.sockets.is_empty() {
            return;
        }
        let id = entry.next_event_id;
        entry.next_event_id += 1;
        let frame = match messages::event_frame(id, now_ms(), event) {
            Ok(frame) => frame,
            Err(e) => {
                error!(error = %e, "could not encode an event");
                return;
            }
        };
        if !ephemeral {
            entry.outbox.push(id, frame.clone(), now, timeout);
            self.pending_total += 1;
        }
        for peer in &entry.sockets {
            let _ = peer.send(frame.clone());
        }
    }

    /// Allocates an id of `to` for an ephemeral event and returns its frame (not sent).
    fn allocate_ephemeral(&mut self, to: &str, event: &ServerEvent) -> Option<Frame> {
        let entry = self.users.get_mut(to)?;
        let id = entry.next_event_id;
        entry.next_event_id += 1;
        messages::event_frame(id, now_ms(), event)
            .map_err(|e| error!(error = %e, "could not encode an event"))
            .ok()
    }

    // -----------------------------------------------------------------------------------------
    // Requests

    /// Answers request `id` of `user`: from the idempotency cache if it was answered before,
    /// else by running it (rate limit first). Returns the response frame.
    pub(crate) fn request(
        &mut self,
        user: &str,
        id: &str,
        payload_type: Option<&str>,
        payload: Value,
        now: Instant,
    ) -> Option<Frame> {
        if let Some(cached) = self.cache.get(user, id) {
            debug!(user, id, "idempotent retry answered from the cache");
            return Some(cached);
        }
        let answer = if self.limiter.check(user) {
            self.dispatch(user, payload_type, payload, now)
        } else {
            Err(ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "more than {} requests in {:?}; retry later with the same id",
                    self.config.rate_limit, self.config.rate_window
                ),
            ))
        };
        let (payload, cache) = match answer {
            Ok(answer) => (answer.payload, answer.cache),
            Err(error) => (messages::error_payload(&error), false),
        };
        match messages::response_frame(id, now_ms(), &payload) {
            Ok(frame) => {
                if cache {
                    self.cache.insert(user, id, frame.clone());
                }
                Some(frame)
            }
            Err(e) => {
                error!(error = %e, "could not encode a response");
                None
            }
        }
    }

    fn dispatch(
        &mut self,
        user: &str,
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
            "new" => self.new_message(user, messages::payload(kind, payload)?, now),
            "edit" => self.edit(user, messages::payload(kind, payload)?, now),
            "delete" => self.delete(user, messages::payload(kind, payload)?, now),
            "dlvrd" => self.receipt(
                user,
                messages::payload(kind, payload)?,
                Receipt::Delivered,
                now,
            ),
            "read" => self.receipt(user, messages::payload(kind, payload)?, Receipt::Read, now),
            "call" => self.call(user, messages::payload(kind, payload)?, now),
            "newCall" => self.new_call(user, messages::payload(kind, payload)?, now),
            "closeCall" => self.close_call(user, messages::payload(kind, payload)?, now),
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

    /// Makes sure `to` exists and has room for one more event.
    fn prepare(&mut self, recipients: &[&str]) -> Result<(), ApiError> {
        self.ensure_users(recipients)?;
        self.ensure_room(recipients)
    }

    fn new_message(
        &mut self,
        user: &str,
        request: NewRequest,
        now: Instant,
    ) -> Result<Answer, ApiError> {
        self.check_id("chatId", &request.chat_id)?;
        self.check_text(&request.message)?;
        if let Some(client_id) = &request.client_message_id {
            self.check_id("clientMessageId", client_id)?;
        }
        let to = request.chat_id;
        self.prepare(&[&to])?;
        let timestamp = now_ms();
        let message_id = self.messages.insert(
            user,
            &to,
            timestamp,
            Body::Text {
                message: request.message.clone(),
                client_message_id: request.client_message_id.clone(),
                edited: false,
            },
        );
        let event = ServerEvent::New(NewEvent {
            message_id,
            from: user.to_owned(),
            chat_id: user.to_owned(),
            message: request.message,
            client_message_id: request.client_message_id,
            timestamp,
        });
        self.emit(&to, &event, now);
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

    fn edit(&mut self, user: &str, request: EditRequest, now: Instant) -> Result<Answer, ApiError> {
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
        self.prepare(&[&to])?;
        if let Some(stored) = self.messages.live_mut(id)
            && let Body::Text {
                message, edited, ..
            } = &mut stored.body
        {
            message.clone_from(&request.message);
            *edited = true;
        }
        let event = ServerEvent::Edit(EditEvent {
            message_id: id,
            from: user.to_owned(),
            chat_id: user.to_owned(),
            message: request.message,
            original_message_id: id,
            original_client_message_id: client_message_id,
            timestamp: now_ms(),
        });
        self.emit(&to, &event, now);
        Ok(Answer::done(json!({ "messageId": id })))
    }

    fn delete(
        &mut self,
        user: &str,
        request: MessageRef,
        now: Instant,
    ) -> Result<Answer, ApiError> {
        let id = request.message_id;
        let (to, client_message_id) = self.own_message(user, id)?;
        self.prepare(&[&to])?;
        self.messages.delete(id);
        let event = ServerEvent::Delete(DeleteEvent {
            message_id: id,
            from: user.to_owned(),
            chat_id: user.to_owned(),
            original_message_id: id,
            original_client_message_id: client_message_id,
        });
        self.emit(&to, &event, now);
        Ok(Answer::done(json!({ "messageId": id })))
    }

    fn receipt(
        &mut self,
        user: &str,
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
        self.prepare(&[&author])?;
        if let Some(stored) = self.messages.live_mut(id) {
            stored.receipt = receipt;
        }
        let payload = ReceiptEvent {
            message_id: id,
            chat_id: user.to_owned(),
        };
        let event = match receipt {
            Receipt::Read => ServerEvent::Read(payload),
            Receipt::Delivered | Receipt::Sent => ServerEvent::Dlvrd(payload),
        };
        self.emit(&author, &event, now);
        Ok(salute)
    }

    fn call(&mut self, user: &str, request: CallRequest, now: Instant) -> Result<Answer, ApiError> {
        self.check_id("chatId", &request.chat_id)?;
        let to = request.chat_id;
        self.prepare(&[&to])?;
        let timestamp = now_ms();
        let message_id = self.messages.insert(
            user,
            &to,
            timestamp,
            Body::Call {
                call_type: request.call_type,
                direction: request.direction,
                status: request.status,
            },
        );
        let event = ServerEvent::Call(CallEvent {
            message_id,
            from: user.to_owned(),
            chat_id: user.to_owned(),
            call_type: request.call_type,
            direction: request.direction,
            status: request.status,
            timestamp,
        });
        self.emit(&to, &event, now);
        Ok(Answer::done(json!({ "messageId": message_id })))
    }

    fn new_call(
        &mut self,
        user: &str,
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
        let recipients: Vec<&str> = participants.iter().map(String::as_str).collect();
        self.prepare(&recipients)?;
        let call_id = uuid::Uuid::new_v4().to_string();
        let stored = CallStored {
            call_id: call_id.clone(),
            caller: user.to_owned(),
            participants: participants.clone(),
            call_type: request.call_type,
            call_duration: 0,
        };
        self.calls.insert(
            call_id,
            OpenCall {
                caller: user.to_owned(),
                participants: participants.clone(),
                call_type: request.call_type,
                started: now,
            },
        );
        let event = ServerEvent::NewCall(stored.clone());
        for participant in &participants {
            self.emit(participant, &event, now);
        }
        Ok(Answer::done(to_value(&stored)?))
    }

    fn close_call(
        &mut self,
        user: &str,
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
        let recipients: Vec<&str> = members.iter().map(String::as_str).collect();
        self.prepare(&recipients)?;
        let Some(call) = self.calls.remove(&request.call_id) else {
            return Err(ApiError::new(ErrorCode::NotFound, "the call is gone"));
        };
        let stored = CallStored {
            call_id: request.call_id,
            caller: call.caller,
            participants: call.participants,
            call_type: call.call_type,
            call_duration: now.saturating_duration_since(call.started).as_secs(),
        };
        let event = ServerEvent::CloseCall(stored.clone());
        for member in &members {
            self.emit(member, &event, now);
        }
        Ok(Answer::done(to_value(&stored)?))
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
        if !self.limiter.check(user) {
            return Err(ApiError::new(
                ErrorCode::RateLimited,
                "too many requests and events; slow down",
            ));
        }
        let typing: TypingRequest = messages::payload(event_type, payload)?;
        self.check_id("chatId", &typing.chat_id)?;
        let event = ServerEvent::Typing(TypingEvent {
            chat_id: user.to_owned(),
        });
        self.emit(&typing.chat_id, &event, now);
        Ok(())
    }
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

    fn send(state: &mut State, user: &str, id: &str, kind: &str, payload: Value) -> Value {
        let frame = state
            .request(user, id, Some(kind), payload, Instant::now())
            .unwrap();
        serde_json::from_str(frame.as_str()).unwrap()
    }

    #[test]
    fn offline_events_wait_and_ids_survive_forgetting_idle_users() {
        let mut state = State::new(Config {
            max_users: 2,
            ..Config::default()
        });
        let now = Instant::now();
        let (a, mut a_link) = peer();
        state.admit("a").unwrap();
        state.open("a", &a, now);
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
        state.open("b", &b, now);
        let events = drain(&mut b_link);
        assert_eq!(events[0]["id"], 1);
        assert_eq!(events[0]["eventType"], "new");
        state.ack("b", 1);
        state.close("b", b.id(), now);
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
        state.admit("b").unwrap_err();
        // c was created after b was forgotten: its ids start above b's (the floor), not at 1.
        state.ack("c", 1);
        assert_eq!(state.pending_for("c"), 1);
        for id in 2..10 {
            state.ack("c", id);
        }
        assert_eq!(state.pending_for("c"), 0);
        state.admit("b").unwrap();
        state.open("b", &b2, now);
        let ids: Vec<u64> = drain(&mut b2_link)
            .iter()
            .map(|e| e["id"].as_u64().unwrap())
            .collect();
        assert!(ids.iter().all(|id| *id > 1), "{ids:?}");
    }

    #[test]
    fn a_full_outbox_fails_the_request_and_stores_nothing() {
        let mut state = State::new(Config {
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
        let mut state = State::new(Config {
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
        let mut state = State::new(Config::default());
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
        let mut state = State::new(Config {
            redelivery_timeout: Duration::from_secs(1),
            ..Config::default()
        });
        let t0 = Instant::now();
        let (b1, mut l1) = peer();
        let (b2, mut l2) = peer();
        state.open("b", &b1, t0);
        state.open("b", &b2, t0);
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
        let mut state = State::new(Config::default());
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
}
