//! The protocol's handlers: each request is a short sequence of engine calls (see
//! [`crate::store`]); nothing shared lives in the protocol value but node-local caches and the
//! per-client token buckets.

use serde_json::{Value, json};
use switchboard_core::engine::{
    Appended, ConnRef, EngineError, EngineEvent, EngineResult, Expect, Position, Read, ReadFrom,
};
use switchboard_core::{
    ClientKey, Context, Engine, Frame, Handshake, HttpRequest, HttpResponse, Keepalive, Peer,
    Protocol, Reject,
};
use tracing::{debug, warn};
use uuid::Uuid;

use crate::messages::{self, ClientMessage, ErrorCode, Kind, PresenceUser, frame, now_iso8601};
use crate::state::{
    Bounds, MessageRecord, Refused, Status, UserRecord, longest_offline, presence_list,
};
use crate::store::{
    ONLINE_ROOM, PRESENCE_LOG, QueueRefused, Store, presence_append, rate_key, user_topic,
};
use crate::telemetry::{self, MsgOutcome, Scope};
use crate::{Conn, FastChat, WS_PATH, web};

/// How often a `PRESENCE` delta is appended with compare-and-set before it is appended
/// unconditionally (a flood of changes must not starve one announcement).
const ANNOUNCE_ATTEMPTS: usize = 16;
/// How often a HELLO retries registering against concurrent writers of the same user.
const REGISTER_ATTEMPTS: usize = 8;

/// The outcome of a HELLO for the user table.
#[derive(Debug, Default)]
struct Registered {
    /// The user was not known before.
    new: bool,
    /// The user was known under another display name.
    renamed: bool,
    /// Users forgotten to make room (id and last display name), for the `PRESENCE` delta.
    forgotten: Vec<(Uuid, String)>,
}

/// Why a HELLO from a new user could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RegisterError {
    /// The user table is full and every known user is online.
    TableFull,
    /// The creating client holds its whole share of users and all of them are online.
    ClientShareFull,
    /// The budget has no room for another user.
    NoMemory,
}

fn position_of(read: &Read) -> Position {
    match read {
        Read::Entries { top, .. } | Read::Gone { top } => *top,
    }
}

fn limit_u32(limit: usize) -> u32 {
    u32::try_from(limit).unwrap_or(u32::MAX)
}

impl FastChat {
    fn bounds(&self) -> Bounds {
        Bounds {
            fixed: self.config.fixed_state_bytes(),
            limit: self.config.max_state_bytes,
            max_users: self.config.max_users,
            max_queued_total: self.config.max_queued_total,
            max_tracked_messages: self.config.max_tracked_messages,
        }
    }

    fn store<'a>(&'a self, engine: &'a Engine) -> Store<'a> {
        Store {
            engine,
            bounds: self.bounds(),
            seen: &self.seen,
            max_queued_per_user: self.config.max_queued_per_user,
            max_queued_per_client: self.config.max_queued_per_client,
        }
    }

    fn send(peer: &Peer, frame: Option<Frame>) {
        if let Some(frame) = frame {
            // A full queue closes the peer (the runtime's policy); nothing else to do here.
            let _ = peer.send(frame);
        }
    }

    fn error(peer: &Peer, code: ErrorCode, message: &str, details: Value) {
        telemetry::error(code);
        Self::send(peer, messages::error_frame(code, message, details));
    }

    fn rate_limited(
        peer: &Peer,
        kind: Kind,
        message: &str,
        limit: usize,
        per_client: bool,
        mut details: Value,
    ) {
        telemetry::rate_limited(
            kind,
            if per_client {
                Scope::Client
            } else {
                Scope::User
            },
        );
        details["limit"] = json!(limit);
        if per_client {
            details["window_secs"] = json!(60);
            details["per"] = json!("client");
        }
        Self::error(peer, ErrorCode::RateLimited, message, details);
    }

    /// Counts one `kind` event of user `id` against its cluster-wide sliding window; `true` if
    /// allowed. A limit of 0 is unlimited.
    async fn user_rate(
        &self,
        engine: &Engine,
        kind: &str,
        id: Uuid,
        limit: usize,
    ) -> EngineResult<bool> {
        if limit == 0 {
            return Ok(true);
        }
        let decision = engine
            .rate_limit(
                &rate_key(kind, id),
                limit_u32(limit),
                self.config.rate_window,
            )
            .await?;
        Ok(decision.is_allowed())
    }

    async fn publish(engine: &Engine, topic: &str, frame: Option<Frame>) -> EngineResult<()> {
        match frame {
            Some(frame) => engine.publish(topic, frame, None).await,
            None => Ok(()),
        }
    }

    /// The full `PRESENCE` list for a socket that joined the delta log at `top`: reused from
    /// the node's cache while no delta was appended since it was built.
    async fn full_presence(&self, store: &Store<'_>, top: Position) -> EngineResult<Frame> {
        if let Some(cached) = self.cached_presence(top) {
            return Ok(cached);
        }
        let users = store.users().await?;
        let online = store.online().await?;
        let full = frame(
            "PRESENCE",
            &messages::Presence {
                users: presence_list(users, &online),
                delta: false,
            },
        )
        .ok_or_else(|| EngineError::Corrupt("cannot encode the presence list".into()))?;
        self.cache_presence(top, full.clone());
        Ok(full)
    }

    /// Appends a `PRESENCE` delta with the current entries of `users` (and `removed` entries for
    /// `forgotten`) for every identified socket but `except`.
    ///
    /// The entries are read after the log's top and the delta is appended only if the top did
    /// not move meanwhile (retried otherwise), so the last delta about a user in log order
    /// always carries that user's latest state, whatever order concurrent changes on several
    /// nodes finished in.
    async fn announce(
        store: &Store<'_>,
        users: &[Uuid],
        forgotten: &[(Uuid, String)],
        except: Option<ConnRef>,
    ) -> EngineResult<()> {
        for attempt in 1..=ANNOUNCE_ATTEMPTS {
            let top = position_of(
                &store
                    .engine
                    .read(PRESENCE_LOG, ReadFrom::Latest(0), 0)
                    .await?,
            );
            let mut changed: Vec<PresenceUser> = forgotten
                .iter()
                .map(|(id, display_name)| PresenceUser {
                    user_id: id.to_string(),
                    display_name: display_name.clone(),
                    online: false,
                    removed: true,
                })
                .collect();
            for id in users {
                if let Some((record, _)) = store.user(*id).await? {
                    changed.push(PresenceUser {
                        user_id: id.to_string(),
                        display_name: record.name,
                        online: store.is_online(*id).await?,
                        removed: false,
                    });
                }
            }
            if changed.is_empty() {
                return Ok(());
            }
            let Some(delta) = frame(
                "PRESENCE",
                &messages::Presence {
                    users: changed,
                    delta: true,
                },
            ) else {
                return Ok(());
            };
            let guard = (attempt < ANNOUNCE_ATTEMPTS).then_some(top.offset);
            let mut append = presence_append(guard);
            if let Some(conn) = except {
                append = append.except(conn);
            }
            if let Appended::Done(_) = store.engine.append(PRESENCE_LOG, delta, append).await? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Registers user `id` (new or known) under `display_name`.
    async fn register(
        &self,
        store: &Store<'_>,
        id: Uuid,
        display_name: &str,
        client: ClientKey,
        mut known: Option<(UserRecord, u64)>,
    ) -> EngineResult<Result<Registered, RegisterError>> {
        let mut forgotten = Vec::new();
        for _ in 0..REGISTER_ATTEMPTS {
            if let Some((mut record, version)) = known.take() {
                let renamed = record.name != display_name;
                display_name.clone_into(&mut record.name);
                record.seen = store.tick().await?;
                if store
                    .put_user(id, &record, Expect::Version(version))
                    .await?
                {
                    return Ok(Ok(Registered {
                        new: false,
                        renamed,
                        forgotten,
                    }));
                }
                known = store.user(id).await?;
                continue;
            }
            if let Err(refused) = self.make_room(store, client, &mut forgotten).await? {
                return Ok(Err(refused));
            }
            let seq = store.tick().await?;
            let record = UserRecord {
                name: display_name.to_owned(),
                seq,
                created_ms: chrono::Utc::now().timestamp_millis(),
                seen: seq,
                creator: client.to_string(),
            };
            let created = store.put_user(id, &record, Expect::Absent).await;
            if !matches!(created, Ok(true)) {
                // Give the units back: the put failed, or another socket registered this id
                // first and it is updated as a known user instead.
                store.release_user().await?;
                store.release_client_user(&record.creator).await?;
                created?;
                known = store.user(id).await?;
                continue;
            }
            return Ok(Ok(Registered {
                new: true,
                renamed: false,
                forgotten,
            }));
        }
        Err(EngineError::Unavailable(
            "the user record keeps changing".into(),
        ))
    }

    /// Takes one unit of the user table and of `client`'s share for a new user: when the
    /// client's share is full its own longest-offline user is forgotten, when the table is full
    /// anyone's; with nobody offline to forget, or no room in the budget, it is refused. Both
    /// units are bounded counters, so racing HELLOs on several nodes never overshoot them.
    async fn make_room(
        &self,
        store: &Store<'_>,
        client: ClientKey,
        forgotten: &mut Vec<(Uuid, String)>,
    ) -> EngineResult<Result<(), RegisterError>> {
        let creator = client.to_string();
        let share = self.config.max_users_per_client;
        for _ in 0..REGISTER_ATTEMPTS {
            if !store.charge_client_user(&creator, share).await? {
                let users = store.users().await?;
                let online = store.online().await?;
                let Some((victim, _)) = longest_offline(&users, &online, |u| u.creator == creator)
                else {
                    return Ok(Err(RegisterError::ClientShareFull));
                };
                if let Some(name) = store.forget(*victim).await? {
                    forgotten.push((*victim, name));
                }
                continue;
            }
            let charged = store.charge_user().await;
            if !matches!(charged, Ok(Ok(()))) {
                store.release_client_user(&creator).await?;
            }
            match charged? {
                Ok(()) => {
                    self.fit_cache();
                    return Ok(Ok(()));
                }
                Err(Refused::NoMemory) => return Ok(Err(RegisterError::NoMemory)),
                Err(Refused::Full) => {
                    let users = store.users().await?;
                    let online = store.online().await?;
                    let Some((victim, _)) = longest_offline(&users, &online, |_| true) else {
                        return Ok(Err(RegisterError::TableFull));
                    };
                    if let Some(name) = store.forget(*victim).await? {
                        forgotten.push((*victim, name));
                    }
                }
            }
        }
        Ok(Err(RegisterError::TableFull))
    }

    async fn hello(&self, conn: &mut Conn, cx: &Context<'_>, user_id: Uuid, display_name: &str) {
        let peer = cx.peer();
        // With signed identity the token's subject is the only user this socket may be; the
        // socket stays open so that the client can say HELLO again with it.
        if let Some(signed) = conn.signed
            && signed != user_id
        {
            Self::error(
                peer,
                ErrorCode::Unauthorized,
                "user_id: this connection is signed in as another user; say HELLO with the token's sub",
                json!({"field": "user_id"}),
            );
            return;
        }
        if let Some(current) = conn.user
            && current != user_id
        {
            let message = format!("user_id: this connection already said HELLO as {current}");
            Self::error(
                peer,
                ErrorCode::Validation,
                &message,
                json!({"field": "user_id"}),
            );
            return;
        }
        // HELLO rewrites presence for everyone, so it is rate-limited per client (switching
        // user_id does not dodge that) and per user.
        if !self.client_hello.check(&conn.client) {
            let limit = usize::try_from(self.config.client_hello_per_minute).unwrap_or(usize::MAX);
            Self::rate_limited(
                peer,
                Kind::Hello,
                "too many HELLOs from this client",
                limit,
                true,
                json!({}),
            );
            return;
        }
        if let Err(error) = self.hello_in_engine(conn, cx, user_id, display_name).await {
            warn!(%error, user = %user_id, "HELLO failed on the state engine");
            Self::error(
                peer,
                ErrorCode::Unauthorized,
                "the server cannot register users now",
                json!({}),
            );
        }
    }

    async fn hello_in_engine(
        &self,
        conn: &mut Conn,
        cx: &Context<'_>,
        user_id: Uuid,
        display_name: &str,
    ) -> EngineResult<()> {
        let (peer, engine) = (cx.peer(), cx.engine());
        let store = self.store(engine);
        let id = user_id.to_string();
        let known = store.user(user_id).await?;
        // Per user only for known users (reconnects and renames): new users are bounded by the
        // client's bucket and share.
        if known.is_some()
            && !self
                .user_rate(engine, "hello", user_id, self.config.hello_rate_limit)
                .await?
        {
            let details = json!({"window_secs": self.config.rate_window.as_secs_f64()});
            let limit = self.config.hello_rate_limit;
            Self::rate_limited(
                peer,
                Kind::Hello,
                "too many HELLOs for this user",
                limit,
                false,
                details,
            );
            return Ok(());
        }
        let registered = match self
            .register(&store, user_id, display_name, conn.client, known)
            .await?
        {
            Ok(registered) => registered,
            Err(RegisterError::ClientShareFull) => {
                Self::rate_limited(
                    peer,
                    Kind::Hello,
                    "this client has created the most users allowed, and all are online",
                    self.config.max_users_per_client,
                    true,
                    json!({}),
                );
                return Ok(());
            }
            Err(RegisterError::TableFull | RegisterError::NoMemory) => {
                Self::error(
                    peer,
                    ErrorCode::Unauthorized,
                    "the server has no room for another user",
                    json!({}),
                );
                return Ok(());
            }
        };
        let ack = frame(
            "HELLO_ACK",
            &messages::HelloAck {
                user_id: &id,
                status: "connected",
            },
        );
        if conn.user.is_some() {
            // A repeated HELLO: this socket already holds the list, so it gets a delta with its
            // own entry; everyone else hears of a rename.
            Self::send(peer, ack);
            telemetry::hello();
            let me = PresenceUser {
                user_id: id.clone(),
                display_name: display_name.to_owned(),
                online: true,
                removed: false,
            };
            let own = frame(
                "PRESENCE",
                &messages::Presence {
                    users: vec![me],
                    delta: true,
                },
            );
            Self::send(peer, own);
            if registered.renamed || !registered.forgotten.is_empty() {
                Self::announce(&store, &[user_id], &registered.forgotten, Some(cx.me())).await?;
            }
            return Ok(());
        }

        // The socket's first HELLO. Subscribe to the user's topic, reading the inbox, before
        // joining presence: a sender that sees this user online after appending knows this
        // socket either had the message live or read it (the ordering argument in the docs).
        let topic = user_topic(user_id);
        let inbox = engine
            .join(
                &topic,
                peer,
                ReadFrom::After(Position {
                    offset: 0,
                    epoch: 0,
                }),
                self.config.max_queued_per_user.max(1),
            )
            .await?;
        let joined = async {
            // A join that failed may still have been applied (a timeout after the engine did
            // it): it is undone like the joins below, or the user would stay online for good.
            let came_online = match engine.presence_join(ONLINE_ROOM, &id, cx.me()).await {
                Ok(came_online) => came_online,
                Err(error) => {
                    self.leave_presence(engine, user_id, cx.me()).await;
                    return Err(error);
                }
            };
            let deltas = engine
                .join(PRESENCE_LOG, peer, ReadFrom::Latest(0), 0)
                .await;
            let deltas = match deltas {
                Ok(deltas) => deltas,
                Err(error) => {
                    self.leave_presence(engine, user_id, cx.me()).await;
                    return Err(error);
                }
            };
            let full = self.full_presence(&store, position_of(deltas.read())).await;
            match full {
                Ok(full) => Ok((came_online, deltas, full)),
                Err(error) => {
                    drop(deltas);
                    engine.unsubscribe(PRESENCE_LOG, peer.id());
                    self.leave_presence(engine, user_id, cx.me()).await;
                    Err(error)
                }
            }
        }
        .await;
        let (came_online, deltas, full) = match joined {
            Ok(joined) => joined,
            Err(error) => {
                drop(inbox);
                engine.unsubscribe(&topic, peer.id());
                return Err(error);
            }
        };
        conn.user = Some(user_id);
        Self::send(peer, ack);
        telemetry::hello();
        deltas.go_live(vec![full]);

        // From here the socket is identified; what fails is logged, not answered.
        let changed =
            registered.new || registered.renamed || came_online || !registered.forgotten.is_empty();
        if changed
            && let Err(error) =
                Self::announce(&store, &[user_id], &registered.forgotten, Some(cx.me())).await
        {
            warn!(%error, user = %id, "could not announce a presence change");
        }
        // Queued messages go to the socket that brought the user online, after the list (and
        // after everyone else heard that the user is online, so acks follow that news).
        let (queued, inbox_top) = match inbox.read() {
            Read::Entries { entries, top } => (entries.clone(), *top),
            Read::Gone { top } => (Vec::new(), *top),
        };
        let replay: Vec<Frame> = if came_online {
            queued.iter().map(|entry| entry.frame.clone()).collect()
        } else {
            Vec::new()
        };
        if !replay.is_empty() {
            debug!(user = %id, count = replay.len(), "delivering queued messages");
        }
        inbox.go_live(replay);
        let taken = async {
            if came_online {
                for entry in &queued {
                    store.take_entry(user_id, entry.offset).await?;
                }
            }
            // Whatever was appended after the read reached this socket live.
            store.take_after(user_id, inbox_top).await
        }
        .await;
        if let Err(error) = taken {
            warn!(%error, user = %id, "could not clear delivered messages");
        }
        Ok(())
    }

    async fn open_chat(&self, me: Uuid, cx: &Context<'_>, target: Uuid) {
        let peer = cx.peer();
        let details = json!({"target_user_id": target.to_string()});
        if target == me {
            let mut details = details;
            details["field"] = json!("target_user_id");
            Self::error(
                peer,
                ErrorCode::Validation,
                "target_user_id: cannot open a chat with yourself",
                details,
            );
            return;
        }
        if let Err(error) = self.open_chat_in_engine(me, cx, target, &details).await {
            warn!(%error, "OPEN_CHAT failed on the state engine");
            Self::error(
                peer,
                ErrorCode::RateLimited,
                "the server cannot open chats now",
                details,
            );
        }
    }

    async fn open_chat_in_engine(
        &self,
        me: Uuid,
        cx: &Context<'_>,
        target: Uuid,
        details: &Value,
    ) -> EngineResult<()> {
        let (peer, engine) = (cx.peer(), cx.engine());
        let store = self.store(engine);
        let Some((target_record, _)) = store.user(target).await? else {
            Self::error(
                peer,
                ErrorCode::UserNotFound,
                "target user not found",
                details.clone(),
            );
            return Ok(());
        };
        let mut newly = false;
        if !store.chat_open(me, target).await? {
            let most = self.config.max_chats_per_user;
            for (who, opener) in [(me, true), (target, false)] {
                if store.chat_count(who, most).await? >= most {
                    let message = if opener {
                        "you have too many open chats"
                    } else {
                        "the target user has too many open chats"
                    };
                    let mut details = details.clone();
                    details["limit"] = json!(most);
                    Self::error(peer, ErrorCode::RateLimited, message, details);
                    return Ok(());
                }
            }
            if !store.charge_chat().await? {
                Self::error(
                    peer,
                    ErrorCode::RateLimited,
                    "the server has no room for another chat",
                    details.clone(),
                );
                return Ok(());
            }
            self.fit_cache();
            let opened = store.open_chat(me, target).await;
            newly = matches!(opened, Ok(true));
            if !newly {
                // Opened by someone else meanwhile (or the write failed): give the unit back.
                store.release_chat().await?;
                opened?;
            }
        }
        let my_name = store
            .user(me)
            .await?
            .map(|(record, _)| record.name)
            .unwrap_or_default();
        let chat = crate::state::chat_id(me, target).to_string();
        let (me_s, target_s) = (me.to_string(), target.to_string());
        let participants = if me <= target {
            [me_s.as_str(), target_s.as_str()]
        } else {
            [target_s.as_str(), me_s.as_str()]
        };
        let opened_for = |other: &str, other_name: &str| {
            frame(
                "CHAT_OPENED",
                &messages::ChatOpened {
                    chat_id: &chat,
                    participants,
                    target_user_id: other,
                    target_display_name: other_name,
                },
            )
        };
        Self::publish(
            engine,
            &user_topic(me),
            opened_for(&target_s, &target_record.name),
        )
        .await?;
        if newly {
            Self::publish(engine, &user_topic(target), opened_for(&me_s, &my_name)).await?;
        }
        Ok(())
    }

    async fn msg(
        &self,
        (me, client): (Uuid, ClientKey),
        cx: &Context<'_>,
        to: Uuid,
        content: &str,
        client_id: Option<String>,
    ) {
        let peer = cx.peer();
        let details = match &client_id {
            Some(id) => json!({"message_id": id, "to": to.to_string()}),
            None => json!({"to": to.to_string()}),
        };
        let message_id = client_id
            .clone()
            .unwrap_or_else(|| Uuid::new_v4().to_string());
        let sent = self
            .msg_in_engine(
                (me, client),
                cx,
                to,
                content,
                (client_id, &message_id),
                &details,
            )
            .await;
        let outcome = match sent {
            Ok(outcome) => outcome,
            Err(error) => {
                warn!(%error, "MSG failed on the state engine");
                let mut details = details;
                details["message_id"] = json!(message_id);
                Self::error(
                    peer,
                    ErrorCode::MessageFailed,
                    "the server cannot take messages now",
                    details,
                );
                MsgOutcome::Refused(ErrorCode::MessageFailed)
            }
        };
        telemetry::msg(outcome);
    }

    /// Answers a `MSG` whose id is already taken: the sender's own retry gets the current
    /// status, another sender `VALIDATION`.
    fn answer_taken(
        peer: &Peer,
        me: Uuid,
        message_id: &str,
        record: &MessageRecord,
        details: &Value,
    ) -> MsgOutcome {
        if record.from == me {
            Self::send(
                peer,
                frame(
                    "MSG_ACK",
                    &messages::MsgAck {
                        message_id,
                        status: record.status.as_str(),
                    },
                ),
            );
            MsgOutcome::Retried
        } else {
            let mut details = details.clone();
            details["field"] = json!("message_id");
            Self::error(
                peer,
                ErrorCode::Validation,
                "message_id: already used by another sender",
                details,
            );
            MsgOutcome::Refused(ErrorCode::Validation)
        }
    }

    async fn msg_in_engine(
        &self,
        (me, client): (Uuid, ClientKey),
        cx: &Context<'_>,
        to: Uuid,
        content: &str,
        (client_id, message_id): (Option<String>, &str),
        details: &Value,
    ) -> EngineResult<MsgOutcome> {
        let (peer, engine) = (cx.peer(), cx.engine());
        let store = self.store(engine);
        // The version of this sender's own `pending` record for this id: its first attempt was
        // never answered (the node died between claiming the id and queueing the message), so
        // this retry sends it again rather than answer `sent` for a message never queued.
        let mut resumed = None;
        if let Some(id) = &client_id
            && let Some((record, version)) = store.message(id).await?
        {
            if record.status == Status::Pending && record.from == me && record.to == to {
                resumed = Some(version);
            } else {
                return Ok(Self::answer_taken(peer, me, id, &record, details));
            }
        }
        // An open chat implies a known recipient (forgetting a user closes their chats), so the
        // hot path reads one small key.
        if !store.chat_open(me, to).await? {
            let (code, message) = if store.user(to).await?.is_none() {
                (ErrorCode::UserNotFound, "recipient not found")
            } else {
                (
                    ErrorCode::ChatNotOpened,
                    "open a chat with the recipient first",
                )
            };
            Self::error(peer, code, message, details.clone());
            return Ok(MsgOutcome::Refused(code));
        }
        if !self
            .user_rate(engine, "msg", me, self.config.msg_rate_limit)
            .await?
        {
            let mut details = details.clone();
            details["window_secs"] = json!(self.config.rate_window.as_secs_f64());
            let limit = self.config.msg_rate_limit;
            Self::rate_limited(peer, Kind::Msg, "too many messages", limit, false, details);
            return Ok(MsgOutcome::Refused(ErrorCode::RateLimited));
        }
        if !self.client_msg.check(&client) {
            let limit = usize::try_from(self.config.client_msg_per_minute).unwrap_or(usize::MAX);
            let message = "too many messages from this client";
            Self::rate_limited(peer, Kind::Msg, message, limit, true, details.clone());
            return Ok(MsgOutcome::Refused(ErrorCode::RateLimited));
        }
        let (me_s, to_s) = (me.to_string(), to.to_string());
        let timestamp = now_iso8601();
        let Some(incoming) = frame(
            "MSG",
            &messages::Msg {
                from: &me_s,
                to: &to_s,
                content,
                message_id,
                timestamp: &timestamp,
            },
        ) else {
            return Ok(MsgOutcome::Dropped);
        };
        let failed = |why: &str| {
            let mut details = details.clone();
            details["message_id"] = json!(message_id);
            Self::error(peer, ErrorCode::MessageFailed, why, details);
            MsgOutcome::Refused(ErrorCode::MessageFailed)
        };
        // The record comes first: a message is only delivered once the server can remember it
        // (for retries and the delivered tick).
        // It is `pending` until the message is queued or delivered, then confirmed `sent`.
        let record = MessageRecord {
            from: me,
            to,
            status: Status::Pending,
        };
        let order = if let Some(version) = resumed {
            // Of retries racing to resume it, the one whose compare-and-set lands sends it; the
            // others answer as retries. Its charge and age entry are the first attempt's.
            if !store.update_message(message_id, &record, version).await? {
                return Ok(match store.message(message_id).await? {
                    Some((taken, _)) => Self::answer_taken(peer, me, message_id, &taken, details),
                    None => MsgOutcome::Dropped,
                });
            }
            None
        } else {
            match store.record(message_id, &record).await? {
                Ok(order) => Some(order),
                Err(Some(taken)) => {
                    return Ok(Self::answer_taken(peer, me, message_id, &taken, details));
                }
                Err(None) => {
                    return Ok(failed("the server has no room to track another message"));
                }
            }
        };
        let delivered = self.deliver(&store, client, to, incoming).await;
        let (refused, queued) = match delivered {
            Ok(Ok(queued)) => (None, queued),
            Ok(Err(refused)) => (Some(refused), false),
            Err(error) => {
                if let Some(order) = order {
                    store.unrecord(message_id, order).await?;
                }
                return Err(error);
            }
        };
        if let Some(refused) = refused {
            // A resumed record stays `pending` (charged as before): a later retry tries again.
            if let Some(order) = order {
                store.unrecord(message_id, order).await?;
            }
            return Ok(failed(match refused {
                QueueRefused::User => "the recipient's offline queue is full",
                QueueRefused::Server => "the server's offline queue is full",
                QueueRefused::Client => {
                    "this client has the most messages waiting in offline queues allowed"
                }
                QueueRefused::NoMemory => "the server has no room to queue another message",
            }));
        }
        store.confirm_message(message_id).await?;
        // The account's counters returned their values as they changed: no read of it here.
        self.fit_cache();
        Self::send(
            peer,
            frame(
                "MSG_ACK",
                &messages::MsgAck {
                    message_id,
                    status: "sent",
                },
            ),
        );
        Ok(MsgOutcome::Sent { queued })
    }

    /// Delivers `frame` to `to`: appended to their inbox and published to their sockets on
    /// every node. It stays queued (charged to `client`) unless the recipient is online after
    /// the append, which means one of their sockets had it (see the ordering argument in the
    /// docs). `Ok(true)` when it stays queued.
    async fn deliver(
        &self,
        store: &Store<'_>,
        client: ClientKey,
        to: Uuid,
        frame: Frame,
    ) -> EngineResult<Result<bool, QueueRefused>> {
        let len = frame.len();
        let client = client.to_string();
        let online_before = store.is_online(to).await?;
        if !online_before {
            if self.config.max_queued_per_user == 0 {
                return Ok(Err(QueueRefused::User));
            }
            if let Err(refused) = store.charge_queued(&client, len).await? {
                return Ok(Err(refused));
            }
        }
        let charged = !online_before;
        let position = match store.append_inbox(to, frame).await {
            Ok(Ok(position)) => position,
            other => {
                if charged {
                    store.release_queued(&client, len).await?;
                }
                return other.map(|refused| refused.map(|_| false));
            }
        };
        if store.is_online(to).await? {
            // A socket of the recipient had it, live or in its replay: nothing stays queued.
            if charged {
                store.release_queued(&client, len).await?;
            }
            store
                .engine
                .remove(&user_topic(to), position.offset)
                .await?;
            return Ok(Ok(false));
        }
        if !charged {
            // The recipient went offline between the two checks: the message stays queued.
            let charge = if self.config.max_queued_per_user == 0 {
                Err(QueueRefused::User)
            } else {
                store.charge_queued(&client, len).await?
            };
            if let Err(refused) = charge {
                if store
                    .engine
                    .remove(&user_topic(to), position.offset)
                    .await?
                {
                    return Ok(Err(refused));
                }
                // Someone took it meanwhile: it was delivered after all.
                return Ok(Ok(false));
            }
        }
        store.mark_queued(to, position, &client, len).await?;
        Ok(Ok(true))
    }

    async fn msg_ack(&self, me: Uuid, cx: &Context<'_>, message_id: &str) {
        if let Err(error) = self.msg_ack_in_engine(me, cx.engine(), message_id).await {
            warn!(%error, "MSG_ACK failed on the state engine");
            Self::error(
                cx.peer(),
                ErrorCode::MessageFailed,
                "the server cannot take acknowledgements now",
                json!({"message_id": message_id}),
            );
        }
    }

    async fn msg_ack_in_engine(
        &self,
        me: Uuid,
        engine: &Engine,
        message_id: &str,
    ) -> EngineResult<()> {
        let store = self.store(engine);
        for _ in 0..REGISTER_ATTEMPTS {
            let Some((record, version)) = store.message(message_id).await? else {
                return Ok(());
            };
            let Some(acked) = record.acked_by(me) else {
                return Ok(());
            };
            if store.update_message(message_id, &acked, version).await? {
                // Delivered once the record says so; the tick to the sender may still fail.
                telemetry::delivered();
                let ack = frame(
                    "MSG_ACK",
                    &messages::MsgAck {
                        message_id,
                        status: "delivered",
                    },
                );
                return Self::publish(engine, &user_topic(record.from), ack).await;
            }
        }
        Ok(())
    }

    async fn typing(&self, (me, client): (Uuid, ClientKey), cx: &Context<'_>, is_typing: bool) {
        let peer = cx.peer();
        let allowed = self
            .user_rate(cx.engine(), "typing", me, self.config.typing_rate_limit)
            .await;
        match allowed {
            Ok(true) => {}
            Ok(false) => {
                let details = json!({"window_secs": self.config.rate_window.as_secs_f64()});
                let limit = self.config.typing_rate_limit;
                Self::rate_limited(
                    peer,
                    Kind::Typing,
                    "too many typing indicators",
                    limit,
                    false,
                    details,
                );
                return;
            }
            Err(error) => {
                Self::typing_failed(peer, &error);
                return;
            }
        }
        if !self.client_typing.check(&client) {
            let limit = usize::try_from(self.config.client_typing_per_minute).unwrap_or(usize::MAX);
            let message = "too many typing indicators from this client";
            Self::rate_limited(peer, Kind::Typing, message, limit, true, json!({}));
            return;
        }
        let me_s = me.to_string();
        let typing = frame(
            "TYPING",
            &messages::Typing {
                user_id: &me_s,
                is_typing,
            },
        );
        let sent = async {
            let store = self.store(cx.engine());
            for partner in store.partners(me, self.config.max_chats_per_user).await? {
                Self::publish(cx.engine(), &user_topic(partner), typing.clone()).await?;
            }
            Ok::<_, EngineError>(())
        }
        .await;
        if let Err(error) = sent {
            Self::typing_failed(peer, &error);
        }
    }

    fn typing_failed(peer: &Peer, error: &EngineError) {
        warn!(%error, "TYPING failed on the state engine");
        Self::error(
            peer,
            ErrorCode::RateLimited,
            "the server cannot relay typing indicators now",
            json!({}),
        );
    }

    /// Removes socket `me` of `user` from presence; `true` if that was the user's last socket
    /// anywhere (the caller announces it). When the engine cannot take the leave now, it keeps
    /// it and does it once it can, announcing the user with `EngineEvent::MemberExpired` if that
    /// was their last socket (handled like a lost node's member): `false` here then.
    async fn leave_presence(&self, engine: &Engine, user: Uuid, me: ConnRef) -> bool {
        match engine
            .presence_leave(ONLINE_ROOM, &user.to_string(), me)
            .await
        {
            Ok(last) => last,
            Err(error) => {
                warn!(%error, user = %user, conn = %me, "could not leave presence now; the engine does it when it can");
                false
            }
        }
    }

    /// User `user`'s last socket is gone (closed here, or its node disappeared): remember when,
    /// and tell everyone else.
    async fn went_offline(store: &Store<'_>, user: Uuid, except: Option<ConnRef>) {
        let announced = async {
            store.touch(user).await?;
            Self::announce(store, &[user], &[], except).await
        }
        .await;
        match announced {
            Ok(()) => debug!(user = %user, "user went offline"),
            Err(error) => {
                warn!(%error, user = %user, "could not announce that a user went offline")
            }
        }
    }
}

impl Protocol for FastChat {
    type Conn = Conn;

    fn name(&self) -> &'static str {
        "fastchat"
    }

    fn admit(&self, handshake: &Handshake<'_>) -> Result<Conn, Reject> {
        if handshake.path != WS_PATH {
            return Err(Reject::NotFound);
        }
        // A token whose subject can never be a fastchat user is refused now rather than
        // letting every HELLO of the socket fail.
        let signed = match handshake.identity {
            None => None,
            Some(identity) => Some(
                crate::sanitize::parse_user_id("sub", identity.subject()).map_err(|_| {
                    Reject::Forbidden(
                        "the token's `sub` is not a fastchat user id (a UUID v4)".into(),
                    )
                })?,
            ),
        };
        Ok(Conn {
            client: ClientKey::from_ip(handshake.client_ip),
            user: None,
            signed,
        })
    }

    async fn on_open(&self, _conn: &mut Conn, cx: &Context<'_>) {
        let peer = cx.peer();
        debug!(conn = %peer.id(), remote = %peer.remote(), "fastchat socket open");
    }

    async fn on_text(&self, conn: &mut Conn, cx: &Context<'_>, text: &str) {
        let peer = cx.peer();
        let (kind, data) = match messages::parse_envelope(text) {
            Ok(parsed) => parsed,
            Err(invalid) => {
                let details = invalid
                    .field
                    .map_or_else(|| json!({}), |f| json!({"field": f}));
                Self::error(peer, ErrorCode::Validation, &invalid.message, details);
                return;
            }
        };
        if conn.user.is_none() && !kind.allowed_before_hello() {
            if kind == Kind::Msg {
                telemetry::msg_failed(ErrorCode::Unauthorized);
            }
            Self::error(peer, ErrorCode::Unauthorized, "send HELLO first", json!({}));
            return;
        }
        let message = match messages::parse_body(kind, &data) {
            Ok(message) => message,
            Err(invalid) => {
                let mut details = invalid
                    .field
                    .map_or_else(|| json!({}), |f| json!({"field": f}));
                if kind == Kind::Msg {
                    telemetry::msg_failed(ErrorCode::Validation);
                    if let Some(Value::String(id)) = data.get("message_id") {
                        details["message_id"] = json!(id);
                    }
                }
                Self::error(peer, ErrorCode::Validation, &invalid.message, details);
                return;
            }
        };
        match (message, conn.user) {
            (ClientMessage::Ping, _) => {
                let timestamp = now_iso8601();
                Self::send(
                    peer,
                    frame(
                        "PONG",
                        &messages::Pong {
                            timestamp: &timestamp,
                        },
                    ),
                );
            }
            (
                ClientMessage::Hello {
                    user_id,
                    display_name,
                },
                _,
            ) => self.hello(conn, cx, user_id, &display_name).await,
            (_, None) => Self::error(peer, ErrorCode::Unauthorized, "send HELLO first", json!({})),
            (ClientMessage::OpenChat { target }, Some(me)) => self.open_chat(me, cx, target).await,
            (
                ClientMessage::Msg {
                    to,
                    content,
                    message_id,
                },
                Some(me),
            ) => {
                self.msg((me, conn.client), cx, to, &content, message_id)
                    .await;
            }
            (ClientMessage::MsgAck { message_id }, Some(me)) => {
                self.msg_ack(me, cx, &message_id).await;
            }
            (ClientMessage::Typing { is_typing }, Some(me)) => {
                self.typing((me, conn.client), cx, is_typing).await;
            }
        }
    }

    async fn on_close(&self, conn: Conn, cx: &Context<'_>) {
        let Some(user) = conn.user else {
            return;
        };
        let (peer, engine) = (cx.peer(), cx.engine());
        // Presence is left before the topics: while a socket counts as online it is still
        // subscribed, which is what a sender's "online after the append" check relies on.
        // (A leave the engine could not take now is retried in the background, which then
        // announces the user offline itself.)
        let last = self.leave_presence(engine, user, cx.me()).await;
        engine.unsubscribe(&user_topic(user), peer.id());
        engine.unsubscribe(PRESENCE_LOG, peer.id());
        if last {
            Self::went_offline(&self.store(engine), user, Some(cx.me())).await;
        }
    }

    fn keepalive(&self) -> Option<Keepalive> {
        Some(Keepalive {
            ping_interval: None,
            idle_timeout: self.config.idle_timeout(),
        })
    }

    fn default_max_frame_bytes(&self) -> usize {
        self.config.max_frame_bytes
    }

    async fn http(&self, _engine: &Engine, request: HttpRequest) -> Option<HttpResponse> {
        web::serve(&request)
    }

    async fn on_engine_event(&self, engine: &Engine, event: EngineEvent) {
        let EngineEvent::MemberExpired { room, member } = event;
        if room != ONLINE_ROOM {
            return;
        }
        let Ok(user) = Uuid::parse_str(&member) else {
            return;
        };
        // The user's last socket was on a node that disappeared: announced exactly as if that
        // socket had closed here.
        Self::went_offline(&self.store(engine), user, None).await;
    }
}
