//! A cluster [`StateEngine`] on Redis (or Valkey): every node started with the same Redis URL and
//! cluster name shares logs, publications, presence, keyed state and rate limits.
//!
//! The model is Centrifugo's: one atomic script appends an entry to a topic's stream, numbering it
//! (offset + epoch), and publishes it on the topic's channel; each node remembers the last offset
//! it delivered per topic and fills any gap from the stream (after a reconnect, or when an offset
//! jumps). Presence lives in per-room hashes, sorted sets and per-node sets; nodes send heartbeats,
//! and a live node removes the presence of a node whose heartbeat went stale. Every key of one
//! topic, room or key carries the same `{hash tag}`, so each script touches one slot, with one
//! exception: a keyed-state write indexes its key (for prefix scans) in the same script, and the
//! index janitor checks a key and drops its entry in one script, so no interleaving can leave a
//! stored key out of the index. Those scripts also touch the cluster's one key index.
//!
//! Durability is Redis's own: with `appendonly yes` and `appendfsync always`, an acknowledged
//! write survives a Redis crash; with `everysec`, at most the last second may be lost.

mod codec;
mod config;
mod conn;
mod keys;
mod scripts;
mod subs;

pub use config::{ConfigError, RedisConfig, redacted};

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use redis::Value;
use switchboard_core::engine::{
    Append, Appended, ConnRef, EngineError, EngineEvent, EngineResult, Entry, Expect, Hub, NodeId,
    Position, Put, RateDecision, Read, ReadFrom, StateEngine, Versioned, WhenFull,
};
use switchboard_core::sync::lock;
use switchboard_core::{Engine, Frame};
use tokio::sync::{Notify, OnceCell, mpsc, oneshot};
use uuid::Uuid;

use codec::Body;
use conn::Commands;
use keys::Keys;
use subs::{SubCommand, Subscriptions};

/// Most entries one read returns from Redis at a time (a read's `limit` may be larger).
const MAX_COUNT: usize = 1_000_000;
/// Index entries checked per heartbeat for keys that expired or were deleted.
const JANITOR_PAGE: usize = 200;
/// Subscription requests queued for the subscriber connection; beyond it a subscription is
/// refused as unavailable (it waits on one round trip each, so this is only reached in a storm).
const SUB_COMMANDS: usize = 16_384;
/// Presence leaves kept for when Redis answers again; beyond it (a long outage while very many
/// sockets close) a connection stays in presence until its node is lost.
const MAX_DEFERRED_LEAVES: usize = 65_536;
/// How long the one node that removes a lost node's presence holds that job.
const REAPER_LEASE_MS: u64 = 30_000;

/// The Redis state engine of one node. See the crate documentation.
#[derive(Debug)]
pub struct RedisEngine {
    inner: Arc<Inner>,
}

/// What the node's tasks share with the engine.
pub(crate) struct Inner {
    pub(crate) config: RedisConfig,
    pub(crate) keys: Keys,
    pub(crate) node: NodeId,
    pub(crate) hub: Arc<Hub>,
    pub(crate) channel_prefix: String,
    pub(crate) commands: Commands,
    pub(crate) subs: Mutex<Subscriptions>,
    sub_commands: mpsc::Sender<SubCommand>,
    /// Whether the subscriber connection is up (a node without it is not ready).
    pub(crate) pubsub_up: AtomicBool,
    /// Whether it ever was (a later connection is a reconnect).
    pub(crate) was_connected: AtomicBool,
    events: Mutex<VecDeque<EngineEvent>>,
    events_ready: Notify,
    /// This node's presence, to register again if the cluster took the node for lost.
    presence: Mutex<HashSet<(String, String, ConnRef)>>,
    /// Presence leaves Redis did not take (it was unreachable), done again once it answers.
    deferred_leaves: Mutex<HashSet<(String, String, ConnRef)>>,
    cluster_id: OnceCell<Uuid>,
    rate_seq: AtomicU64,
    /// Reads of one log asked for at once, answered together.
    reads: Mutex<HashMap<ReadKey, ReadBatch>>,
    /// Where the key-index janitor resumes.
    janitor_after: Mutex<Option<String>>,
    /// Set by [`RedisEngine::kill`]: the node acts as if its process died.
    killed: AtomicBool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("node", &self.node)
            .field("cluster", &self.config.cluster_name)
            .finish_non_exhaustive()
    }
}

/// A log read with each entry's whole body.
pub(crate) enum Rows {
    Entries {
        rows: Vec<(u64, Body)>,
        top: Position,
    },
    Gone {
        top: Position,
    },
}

impl RedisEngine {
    /// A node of the cluster `config` names, as the [`Engine`] protocols use. Connects in the
    /// background and keeps reconnecting: until Redis answers, [`Engine::ready`] is `false` and
    /// operations fail with `Unavailable`. Must be called within a tokio runtime.
    pub fn engine(config: RedisConfig) -> Result<Engine, ConfigError> {
        let (engine, hub) = Self::start(config)?;
        Ok(Engine::new(engine, hub))
    }

    /// The engine and the hub it delivers to (see [`RedisEngine::engine`]).
    pub fn start(config: RedisConfig) -> Result<(Self, Arc<Hub>), ConfigError> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ConfigError::NoRuntime)?;
        let client =
            redis::Client::open(config.url.as_str()).map_err(|error| ConfigError::InvalidUrl {
                url: redacted(&config.url),
                reason: error.to_string(),
            })?;
        let node = NodeId::random();
        let hub = Hub::new(node);
        let keys = Keys::new(&config.cluster_name);
        let (sub_commands, sub_receiver) = mpsc::channel(SUB_COMMANDS);
        let inner = Arc::new(Inner {
            channel_prefix: keys.channel_prefix(),
            keys,
            node,
            hub: hub.clone(),
            commands: Commands::new(client.clone(), config.command_timeout),
            subs: Mutex::new(Subscriptions::new()),
            sub_commands,
            pubsub_up: AtomicBool::new(false),
            was_connected: AtomicBool::new(false),
            events: Mutex::new(VecDeque::new()),
            events_ready: Notify::new(),
            presence: Mutex::new(HashSet::new()),
            deferred_leaves: Mutex::new(HashSet::new()),
            cluster_id: OnceCell::new(),
            rate_seq: AtomicU64::new(0),
            reads: Mutex::new(HashMap::new()),
            janitor_after: Mutex::new(None),
            killed: AtomicBool::new(false),
            config,
        });
        runtime.spawn(subs::run(Arc::downgrade(&inner), client, sub_receiver));
        runtime.spawn(heartbeat(Arc::downgrade(&inner)));
        tracing::info!(node = %node, cluster = %inner.config.cluster_name, "redis engine started");
        Ok((Self { inner }, hub))
    }

    /// Makes this node behave as if its process died: no more heartbeats or deliveries, every
    /// operation unavailable. Its presence is removed by the other nodes once it is stale (for
    /// tests of node loss in one process).
    pub fn kill(&self) {
        self.inner.kill();
    }

    /// A handle that can [`RedisEngine::kill`] this node after the engine was handed to an
    /// [`Engine`].
    pub fn killer(&self) -> Killer {
        Killer(Arc::downgrade(&self.inner))
    }
}

/// Kills a node; see [`RedisEngine::killer`].
#[derive(Debug, Clone)]
pub struct Killer(Weak<Inner>);

impl Killer {
    /// See [`RedisEngine::kill`].
    pub fn kill(&self) {
        if let Some(inner) = self.0.upgrade() {
            inner.kill();
        }
    }
}

/// Milliseconds of a duration, at least 1 (0 means "none" to the scripts).
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn bulk(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        _ => None,
    }
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        _ => None,
    }
}

fn array(value: &Value) -> Option<&[Value]> {
    match value {
        Value::Array(items) | Value::Set(items) => Some(items),
        Value::Nil => Some(&[]),
        _ => None,
    }
}

fn corrupt(what: &str) -> EngineError {
    EngineError::Corrupt(format!("unexpected reply from redis ({what})"))
}

/// `{status, top, epoch, ...}` as status, position and the rest.
fn status_reply(value: &Value) -> EngineResult<(i64, Position, &[Value])> {
    let items = array(value).ok_or_else(|| corrupt("status reply"))?;
    let status = items
        .first()
        .and_then(int)
        .ok_or_else(|| corrupt("status"))?;
    let top = items.get(1).and_then(int).ok_or_else(|| corrupt("top"))?;
    let epoch = items
        .get(2)
        .and_then(bulk)
        .and_then(codec::parse_u64)
        .ok_or_else(|| corrupt("epoch"))?;
    let top = Position {
        offset: u64::try_from(top).unwrap_or(0),
        epoch,
    };
    Ok((status, top, items.get(3..).unwrap_or(&[])))
}

/// Stream rows `[[id, ['s', size, 'b', body]], ...]` as offsets and bodies.
fn rows(value: Option<&Value>) -> EngineResult<Vec<(u64, Body)>> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let items = array(value).ok_or_else(|| corrupt("rows"))?;
    let mut out = Vec::with_capacity(items.len());
    for row in items {
        let row = array(row).ok_or_else(|| corrupt("row"))?;
        let id = row
            .first()
            .and_then(bulk)
            .ok_or_else(|| corrupt("row id"))?;
        let offset = id
            .split(|&b| b == b'-')
            .next()
            .and_then(codec::parse_u64)
            .ok_or_else(|| corrupt("row offset"))?;
        let fields = row
            .get(1)
            .and_then(array)
            .ok_or_else(|| corrupt("row fields"))?;
        let body = fields
            .chunks(2)
            .find(|pair| pair.first().and_then(bulk) == Some(b"b"))
            .and_then(|pair| pair.get(1))
            .and_then(bulk)
            .and_then(Body::decode)
            .ok_or_else(|| corrupt("row body"))?;
        out.push((offset, body));
    }
    Ok(out)
}

/// A key's hash as `HMGET v d` reads it.
type StoredHash = (Option<u64>, Option<Vec<u8>>);

/// The value a key's hash holds, if it holds one.
fn versioned((version, value): StoredHash) -> Option<Versioned> {
    Some(Versioned {
        version: version?,
        value: Bytes::from(value?),
    })
}

fn expect_args(expect: Expect) -> (&'static str, u64) {
    match expect {
        Expect::Any => ("any", 0),
        Expect::Absent => ("absent", 0),
        Expect::Version(version) => ("version", version),
    }
}

impl Inner {
    fn alive(&self) -> EngineResult<()> {
        if self.killed.load(Ordering::Acquire) {
            Err(EngineError::Unavailable("this node was stopped".into()))
        } else {
            Ok(())
        }
    }

    /// Runs a script, mapping failures.
    async fn script(&self, invocation: &redis::ScriptInvocation<'_>) -> EngineResult<Value> {
        self.alive()?;
        let mut conn = self.commands.get().await?;
        invocation
            .invoke_async::<Value>(&mut conn)
            .await
            .map_err(|error| self.commands.fail(&error))
    }

    /// Runs a command, mapping failures.
    async fn command<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> EngineResult<T> {
        self.alive()?;
        let mut conn = self.commands.get().await?;
        cmd.query_async::<T>(&mut conn)
            .await
            .map_err(|error| self.commands.fail(&error))
    }

    /// Runs a pipeline (one round trip), mapping failures.
    async fn pipeline<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> EngineResult<T> {
        self.alive()?;
        let mut conn = self.commands.get().await?;
        pipe.query_async::<T>(&mut conn)
            .await
            .map_err(|error| self.commands.fail(&error))
    }

    /// Stops heartbeats and deliveries; see [`RedisEngine::kill`].
    fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.pubsub_up.store(false, Ordering::Release);
        lock(&self.subs).clear();
    }

    pub(crate) async fn read_rows(
        &self,
        topic: &str,
        from: ReadFrom,
        limit: usize,
    ) -> EngineResult<Rows> {
        let (mode, offset, epoch, count) = match from {
            ReadFrom::Latest(n) => ("latest", 0, 0, n.min(limit)),
            ReadFrom::After(position) => ("after", position.offset, position.epoch, limit),
        };
        let count = count.min(MAX_COUNT);
        let mut invocation = scripts::READ.prepare_invoke();
        invocation
            .key(self.keys.log_meta(topic))
            .key(self.keys.log_entries(topic))
            .arg(mode)
            .arg(offset)
            .arg(epoch)
            .arg(count.max(1));
        let reply = self.script(&invocation).await?;
        let (status, top, rest) = status_reply(&reply)?;
        if status == 0 {
            return Ok(Rows::Gone { top });
        }
        let mut rows = rows(rest.first())?;
        if mode == "latest" {
            rows.reverse();
        }
        rows.truncate(count);
        Ok(Rows::Entries { rows, top })
    }

    /// Registers one connection's presence (also used to register it again).
    async fn join_room(&self, room: &str, member: &str, conn: ConnRef) -> EngineResult<bool> {
        let keys = self.keys.room(room, conn.node);
        self.command::<()>(
            redis::cmd("SADD")
                .arg(self.keys.node_rooms(conn.node))
                .arg(room),
        )
        .await?;
        let mut invocation = scripts::PRESENCE_JOIN.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation.arg(member).arg(conn.conn.get());
        let reply = self.script(&invocation).await?;
        Ok(int(&reply) == Some(1))
    }

    async fn leave_room(&self, room: &str, member: &str, conn: ConnRef) -> EngineResult<bool> {
        let mut invocation = scripts::PRESENCE_LEAVE.prepare_invoke();
        for key in self.keys.room(room, conn.node) {
            invocation.key(key);
        }
        invocation.arg(member).arg(conn.conn.get());
        Ok(int(&self.script(&invocation).await?) == Some(1))
    }

    /// Does the presence leaves Redis could not take. A member one of them removes is
    /// announced with `MemberExpired`; so is a member already gone from the room, because the
    /// leave that failed may have been applied after its caller gave up (a timeout), and then
    /// nobody announced it.
    async fn retry_leaves(&self) {
        let waiting: Vec<_> = lock(&self.deferred_leaves).iter().cloned().collect();
        for entry in waiting {
            let (room, member, conn) = &entry;
            let gone = match self.leave_room(room, member, *conn).await {
                Ok(true) => true,
                Ok(false) => match self.contains(room, member).await {
                    Ok(present) => !present,
                    Err(_) => return,
                },
                Err(_) => return,
            };
            lock(&self.deferred_leaves).remove(&entry);
            if gone {
                self.push_events([EngineEvent::MemberExpired {
                    room: room.clone(),
                    member: member.clone(),
                }]);
            }
        }
    }

    async fn contains(&self, room: &str, member: &str) -> EngineResult<bool> {
        let members = self.keys.room_members(room);
        let score: Option<f64> = self
            .command(redis::cmd("ZSCORE").arg(members).arg(member))
            .await?;
        Ok(score.is_some())
    }

    fn push_events(&self, events: impl IntoIterator<Item = EngineEvent>) {
        let mut queue = lock(&self.events);
        let before = queue.len();
        queue.extend(events);
        if queue.len() > before {
            drop(queue);
            self.events_ready.notify_one();
        }
    }

    /// Removes the presence of a lost node, if this node wins the job.
    async fn reap(&self, lost: NodeId) -> EngineResult<()> {
        let won: Option<String> = self
            .command(
                redis::cmd("SET")
                    .arg(self.keys.node_reaper(lost))
                    .arg(self.node.as_uuid().simple().to_string())
                    .arg("NX")
                    .arg("PX")
                    .arg(REAPER_LEASE_MS),
            )
            .await?;
        if won.is_none() {
            return Ok(());
        }
        let rooms: Vec<String> = self
            .command(redis::cmd("SMEMBERS").arg(self.keys.node_rooms(lost)))
            .await?;
        let mut expired = 0usize;
        for room in &rooms {
            let mut invocation = scripts::PRESENCE_REAP.prepare_invoke();
            for key in self.keys.room(room, lost) {
                invocation.key(key);
            }
            let reply = self.script(&invocation).await?;
            let gone: Vec<EngineEvent> = array(&reply)
                .unwrap_or(&[])
                .iter()
                .filter_map(bulk)
                .filter_map(|m| std::str::from_utf8(m).ok())
                .map(|member| EngineEvent::MemberExpired {
                    room: room.clone(),
                    member: member.to_owned(),
                })
                .collect();
            expired = expired.saturating_add(gone.len());
            self.push_events(gone);
        }
        self.command::<()>(redis::cmd("DEL").arg(self.keys.node_rooms(lost)))
            .await?;
        self.command::<()>(
            redis::cmd("ZREM")
                .arg(self.keys.nodes())
                .arg(lost.as_uuid().simple().to_string()),
        )
        .await?;
        tracing::warn!(lost = %lost, rooms = rooms.len(), members = expired, "removed the presence of a lost node");
        Ok(())
    }

    /// Drops index entries of keys that no longer exist, a page per call.
    async fn janitor(&self) -> EngineResult<()> {
        let after = lock(&self.janitor_after).clone();
        let min = after.map_or_else(|| "-".to_owned(), |key| format!("({key}"));
        let page: Vec<String> = self
            .command(
                redis::cmd("ZRANGEBYLEX")
                    .arg(self.keys.kv_index())
                    .arg(min)
                    .arg("+")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(JANITOR_PAGE),
            )
            .await?;
        *lock(&self.janitor_after) = if page.len() < JANITOR_PAGE {
            None
        } else {
            page.last().cloned()
        };
        if page.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for key in &page {
            pipe.exists(self.keys.kv(key));
        }
        let exists: Vec<bool> = self.pipeline(&pipe).await?;
        let gone: Vec<&String> = page
            .iter()
            .zip(exists)
            .filter(|(_, exists)| !exists)
            .map(|(key, _)| key)
            .collect();
        if !gone.is_empty() {
            // Looked at again inside the script: a key written since the EXISTS above (its
            // index entry already there, so its write added none) must keep its entry.
            let mut invocation = scripts::UNINDEX_GONE.prepare_invoke();
            invocation.key(self.keys.kv_index());
            for key in &gone {
                invocation.key(self.keys.kv(key)).arg(key.as_str());
            }
            self.script(&invocation).await?;
        }
        Ok(())
    }
}

/// The same read of one log, asked for by several callers at once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ReadKey {
    topic: String,
    from: ReadFrom,
    limit: usize,
}

/// Callers waiting for one [`ReadKey`], and whether a read for them runs.
#[derive(Default)]
pub(crate) struct ReadBatch {
    running: bool,
    waiting: Vec<oneshot::Sender<EngineResult<Read>>>,
}

/// Answers every caller waiting for `key` with reads issued after they asked: each round takes
/// the callers waiting now and makes one read for all of them, so a read never starts before a
/// caller it answers (a subscriber joining with a replay must get everything up to the moment
/// it was registered). A thousand subscribers joining a topic at once cost a few reads, not a
/// thousand.
async fn read_batches(inner: Arc<Inner>, key: ReadKey) {
    loop {
        let waiting = {
            let mut reads = lock(&inner.reads);
            let Some(batch) = reads.get_mut(&key) else {
                return;
            };
            if batch.waiting.is_empty() {
                reads.remove(&key);
                return;
            }
            std::mem::take(&mut batch.waiting)
        };
        let result =
            inner
                .read_rows(&key.topic, key.from, key.limit)
                .await
                .map(|rows| match rows {
                    Rows::Entries { rows, top } => Read::Entries {
                        entries: rows
                            .into_iter()
                            .map(|(offset, body)| Entry {
                                offset,
                                frame: body.frame,
                            })
                            .collect(),
                        top,
                    },
                    Rows::Gone { top } => Read::Gone { top },
                });
        for waiter in waiting {
            let _ = waiter.send(result.clone());
        }
    }
}

/// Heartbeats, lost-node removal and the key-index janitor, until the engine is dropped.
async fn heartbeat(weak: Weak<Inner>) {
    let Some(inner) = weak.upgrade() else {
        return;
    };
    let every = inner.config.heartbeat;
    let stale_ms = millis(inner.config.stale_after);
    drop(inner);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut registered = false;
    let mut healthy_since: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else {
            return;
        };
        if inner.killed.load(Ordering::Acquire) {
            return;
        }
        let mut invocation = scripts::HEARTBEAT.prepare_invoke();
        invocation
            .key(inner.keys.nodes())
            .arg(inner.node.as_uuid().simple().to_string())
            .arg(stale_ms);
        let reply = match inner.script(&invocation).await {
            Ok(reply) => reply,
            Err(error) => {
                if healthy_since.take().is_some() {
                    tracing::warn!(%error, "redis heartbeat failed");
                }
                continue;
            }
        };
        let now = tokio::time::Instant::now();
        let since = *healthy_since.get_or_insert(now);
        let items = array(&reply).unwrap_or(&[]);
        let known = items.first().and_then(int) == Some(1);
        if registered && !known {
            // The cluster took this node for lost (it was cut off longer than the stale
            // threshold) and removed its presence: register it again.
            let entries: Vec<_> = lock(&inner.presence).iter().cloned().collect();
            tracing::warn!(
                connections = entries.len(),
                "this node was taken for lost; registering its presence again"
            );
            for (room, member, conn) in entries {
                if let Err(error) = inner.join_room(&room, &member, conn).await {
                    tracing::warn!(%error, "could not register presence again");
                }
            }
        }
        registered = true;
        inner.retry_leaves().await;
        // After an outage every node's heartbeat is old: reap only once this node has been
        // healthy for a whole stale period, so the others had the time to come back.
        if now.saturating_duration_since(since) >= inner.config.stale_after {
            let stale: Vec<NodeId> = items
                .get(1)
                .and_then(array)
                .unwrap_or(&[])
                .iter()
                .filter_map(bulk)
                .filter_map(|id| std::str::from_utf8(id).ok())
                .filter_map(|id| Uuid::parse_str(id).ok())
                .map(NodeId::from_uuid)
                .filter(|id| *id != inner.node)
                .collect();
            for lost in stale {
                if let Err(error) = inner.reap(lost).await {
                    tracing::warn!(%error, lost = %lost, "could not remove a lost node's presence");
                }
            }
        }
        if let Err(error) = inner.janitor().await {
            tracing::debug!(%error, "key-index janitor failed");
        }
    }
}

impl StateEngine for RedisEngine {
    fn node(&self) -> NodeId {
        self.inner.node
    }

    async fn cluster_id(&self) -> EngineResult<Uuid> {
        let inner = &self.inner;
        inner
            .cluster_id
            .get_or_try_init(|| async {
                let fresh = Uuid::new_v4();
                let key = inner.keys.cluster_id();
                inner
                    .command::<()>(redis::cmd("SET").arg(&key).arg(fresh.to_string()).arg("NX"))
                    .await?;
                let stored: String = inner.command(redis::cmd("GET").arg(&key)).await?;
                Uuid::parse_str(&stored).map_err(|_| corrupt("cluster id"))
            })
            .await
            .copied()
    }

    async fn ready(&self) -> bool {
        if !self.inner.pubsub_up.load(Ordering::Acquire) {
            return false;
        }
        self.inner
            .command::<String>(&redis::cmd("PING"))
            .await
            .is_ok()
    }

    async fn subscribe_node(&self, topic: &str) -> EngineResult<()> {
        let inner = &self.inner;
        inner.alive()?;
        lock(&inner.subs).entry(topic.to_owned()).or_default();
        let (done, confirmed) = oneshot::channel();
        inner
            .sub_commands
            .try_send(SubCommand::Subscribe(topic.to_owned(), done))
            .map_err(|_| EngineError::Unavailable("too many subscriptions at once".into()))?;
        confirmed
            .await
            .map_err(|_| EngineError::Unavailable("the redis engine stopped".into()))??;
        // Everything published from now on arrives on the channel; everything before is in the
        // log up to its top, which a joining subscriber reads.
        let top: (Option<u64>, Option<Vec<u8>>) = inner
            .command(
                redis::cmd("HMGET")
                    .arg(inner.keys.log_meta(topic))
                    .arg("top")
                    .arg("epoch"),
            )
            .await?;
        let position = Position {
            offset: top.0.unwrap_or(0),
            epoch: top.1.as_deref().and_then(codec::parse_u64).unwrap_or(0),
        };
        inner.start_cursor(topic, position);
        Ok(())
    }

    fn unsubscribe_node(&self, topic: &str) {
        // When the queue is full the node stays subscribed to the topic's channel (messages for a
        // topic without local subscribers are ignored) until its next reconnect.
        let _ = self
            .inner
            .sub_commands
            .try_send(SubCommand::Unsubscribe(topic.to_owned()));
    }

    async fn publish(
        &self,
        topic: &str,
        frame: Frame,
        except: Option<ConnRef>,
    ) -> EngineResult<()> {
        let inner = &self.inner;
        let body = Body {
            frame,
            except,
            reply: None,
        };
        let payload = codec::ephemeral(inner.node, &body);
        inner
            .command::<()>(
                redis::cmd("PUBLISH")
                    .arg(inner.keys.channel(topic))
                    .arg(payload),
            )
            .await?;
        // This node's own sockets get it now, in the order of this node's operations; the
        // channel's copy is skipped here.
        if lock(&inner.subs).contains_key(topic) {
            inner.deliver(topic, None, &body);
        }
        Ok(())
    }

    async fn append(
        &self,
        topic: &str,
        frame: Frame,
        options: Append,
        reply: Option<Frame>,
    ) -> EngineResult<Appended> {
        let inner = &self.inner;
        let retention = options.retention;
        let size = frame.len();
        options.check_size(size)?;
        let body = Body {
            frame,
            except: options.except,
            reply: options.except.and(reply),
        };
        let ttl = if options.keep {
            retention.ttl.map_or(0, millis)
        } else {
            0
        };
        let mut invocation = scripts::APPEND.prepare_invoke();
        invocation
            .key(inner.keys.log_meta(topic))
            .key(inner.keys.log_entries(topic))
            .arg(body.encode())
            .arg(u8::from(options.keep))
            .arg(u8::from(options.publish))
            .arg(
                options
                    .expect_top
                    .map(|t| t.to_string())
                    .unwrap_or_default(),
            )
            .arg(retention.max_entries)
            .arg(retention.max_bytes)
            .arg(ttl)
            .arg(u8::from(retention.when_full == WhenFull::Refuse))
            .arg(inner.keys.channel(topic))
            .arg(size);
        let reply = inner.script(&invocation).await?;
        let (status, position, _) = status_reply(&reply)?;
        match status {
            1 => {
                if options.publish {
                    inner.offer(topic, position.epoch, position.offset, body);
                }
                Ok(Appended::Done(position))
            }
            0 => Ok(Appended::Conflict(position)),
            _ => Err(EngineError::Full("log is full")),
        }
    }

    async fn read(&self, topic: &str, from: ReadFrom, limit: usize) -> EngineResult<Read> {
        let key = ReadKey {
            topic: topic.to_owned(),
            from,
            limit,
        };
        let (done, result) = oneshot::channel();
        let lead = {
            let mut reads = lock(&self.inner.reads);
            let batch = reads.entry(key.clone()).or_default();
            batch.waiting.push(done);
            !std::mem::replace(&mut batch.running, true)
        };
        if lead {
            // A task of its own: the readers waiting on it must be answered even if this
            // caller goes away.
            tokio::spawn(read_batches(self.inner.clone(), key));
        }
        result
            .await
            .map_err(|_| EngineError::Unavailable("the redis engine stopped".into()))?
    }

    async fn remove(&self, topic: &str, offset: u64) -> EngineResult<bool> {
        let inner = &self.inner;
        let mut invocation = scripts::REMOVE.prepare_invoke();
        invocation
            .key(inner.keys.log_meta(topic))
            .key(inner.keys.log_entries(topic))
            .arg(offset);
        Ok(int(&inner.script(&invocation).await?) == Some(1))
    }

    async fn drop_log(&self, topic: &str) -> EngineResult<()> {
        let inner = &self.inner;
        inner
            .command::<()>(
                redis::cmd("DEL")
                    .arg(inner.keys.log_meta(topic))
                    .arg(inner.keys.log_entries(topic)),
            )
            .await
    }

    async fn presence_join(&self, room: &str, member: &str, conn: ConnRef) -> EngineResult<bool> {
        let first = self.inner.join_room(room, member, conn).await?;
        lock(&self.inner.presence).insert((room.to_owned(), member.to_owned(), conn));
        Ok(first)
    }

    async fn presence_leave(&self, room: &str, member: &str, conn: ConnRef) -> EngineResult<bool> {
        let inner = &self.inner;
        lock(&inner.presence).remove(&(room.to_owned(), member.to_owned(), conn));
        match inner.leave_room(room, member, conn).await {
            Err(error @ EngineError::Unavailable(_)) => {
                // Left as is, the connection would count as present for good. The leave is done
                // again once Redis answers, and a member it removes is announced then with
                // `MemberExpired`, as if its node had been lost.
                let mut deferred = lock(&inner.deferred_leaves);
                if deferred.len() < MAX_DEFERRED_LEAVES {
                    deferred.insert((room.to_owned(), member.to_owned(), conn));
                } else {
                    tracing::warn!(
                        room,
                        "too many presence leaves wait for redis; one is dropped"
                    );
                }
                Err(error)
            }
            other => other,
        }
    }

    async fn presence_members(&self, room: &str) -> EngineResult<Vec<String>> {
        let members = self.inner.keys.room_members(room);
        self.inner
            .command(redis::cmd("ZRANGE").arg(members).arg(0).arg(-1))
            .await
    }

    async fn presence_contains(&self, room: &str, member: &str) -> EngineResult<bool> {
        self.inner.contains(room, member).await
    }

    async fn get(&self, key: &str) -> EngineResult<Option<Versioned>> {
        let inner = &self.inner;
        let stored: StoredHash = inner
            .command(
                redis::cmd("HMGET")
                    .arg(inner.keys.kv(key))
                    .arg("v")
                    .arg("d"),
            )
            .await?;
        Ok(versioned(stored))
    }

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        expect: Expect,
        ttl: Option<Duration>,
    ) -> EngineResult<Put> {
        let inner = &self.inner;
        let (kind, version) = expect_args(expect);
        let mut invocation = scripts::PUT.prepare_invoke();
        invocation
            .key(inner.keys.kv(key))
            .arg(value.as_ref())
            .arg(kind)
            .arg(version)
            .arg(ttl.map_or(0, millis))
            .key(inner.keys.kv_index())
            .arg(key);
        let reply = inner.script(&invocation).await?;
        let items = array(&reply).ok_or_else(|| corrupt("put"))?;
        let status = items
            .first()
            .and_then(int)
            .ok_or_else(|| corrupt("put status"))?;
        let version = items
            .get(1)
            .and_then(int)
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| corrupt("put version"))?;
        if status == 1 {
            return Ok(Put::Stored(version));
        }
        let current = items.get(2).and_then(bulk).map(|value| Versioned {
            version,
            value: Bytes::copy_from_slice(value),
        });
        Ok(Put::Conflict(current.filter(|_| version > 0)))
    }

    async fn delete(&self, key: &str, expect: Expect) -> EngineResult<bool> {
        Ok(self.take(key, expect).await?.is_some())
    }

    async fn take(&self, key: &str, expect: Expect) -> EngineResult<Option<Versioned>> {
        let inner = &self.inner;
        let (kind, version) = expect_args(expect);
        let mut invocation = scripts::TAKE.prepare_invoke();
        invocation.key(inner.keys.kv(key)).arg(kind).arg(version);
        let reply = inner.script(&invocation).await?;
        let Some(items) = array(&reply).filter(|items| !items.is_empty()) else {
            return Ok(None);
        };
        let version = items
            .first()
            .and_then(int)
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| corrupt("take version"))?;
        let value = items.get(1).and_then(bulk).unwrap_or(&[]);
        Ok(Some(Versioned {
            version,
            value: Bytes::copy_from_slice(value),
        }))
    }

    async fn add(
        &self,
        key: &str,
        delta: i64,
        min: i64,
        max: i64,
    ) -> EngineResult<Result<i64, i64>> {
        let inner = &self.inner;
        let mut invocation = scripts::ADD.prepare_invoke();
        invocation
            .key(inner.keys.kv(key))
            .arg(delta)
            .arg(min)
            .arg(max)
            .key(inner.keys.kv_index())
            .arg(key);
        let reply = inner.script(&invocation).await?;
        let items = array(&reply).ok_or_else(|| corrupt("add"))?;
        let status = items
            .first()
            .and_then(int)
            .ok_or_else(|| corrupt("add status"))?;
        let value = items
            .get(1)
            .and_then(int)
            .ok_or_else(|| corrupt("add value"))?;
        match status {
            1 => Ok(Ok(value)),
            0 => Ok(Err(value)),
            _ => Err(EngineError::Corrupt(format!("{key} is not a counter"))),
        }
    }

    async fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> EngineResult<Vec<(String, Versioned)>> {
        let inner = &self.inner;
        let mut found = Vec::new();
        let mut min = match after {
            Some(after) if after >= prefix => format!("({after}"),
            _ => format!("[{prefix}"),
        };
        // Every byte of a UTF-8 key is below 0xFF: this bound closes the prefix's range.
        let mut max = b"[".to_vec();
        max.extend_from_slice(prefix.as_bytes());
        max.push(0xFF);
        while found.len() < limit {
            let page = limit.saturating_sub(found.len()).clamp(1, 500);
            let keys: Vec<String> = inner
                .command(
                    redis::cmd("ZRANGEBYLEX")
                        .arg(inner.keys.kv_index())
                        .arg(&min)
                        .arg(&max)
                        .arg("LIMIT")
                        .arg(0)
                        .arg(page),
                )
                .await?;
            let Some(last) = keys.last() else {
                break;
            };
            min = format!("({last}");
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("HMGET").arg(inner.keys.kv(key)).arg("v").arg("d");
            }
            let values: Vec<StoredHash> = inner.pipeline(&pipe).await?;
            for (key, value) in keys.iter().zip(values) {
                if let Some(value) = versioned(value) {
                    found.push((key.clone(), value));
                }
            }
            if keys.len() < page {
                break;
            }
        }
        found.truncate(limit);
        Ok(found)
    }

    async fn rate_limit(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> EngineResult<RateDecision> {
        if limit == 0 {
            return Ok(RateDecision::Limited {
                retry_after: window,
            });
        }
        let inner = &self.inner;
        let seq = inner.rate_seq.fetch_add(1, Ordering::Relaxed);
        let member = format!("{}:{seq}", inner.node.as_uuid().simple());
        let mut invocation = scripts::RATE.prepare_invoke();
        invocation
            .key(inner.keys.rate(key))
            .arg(limit)
            .arg(millis(window))
            .arg(member);
        let reply = inner.script(&invocation).await?;
        let items = array(&reply).ok_or_else(|| corrupt("rate"))?;
        if items.first().and_then(int) == Some(1) {
            return Ok(RateDecision::Allowed);
        }
        let retry = items
            .get(1)
            .and_then(int)
            .and_then(|ms| u64::try_from(ms).ok())
            .unwrap_or(0);
        Ok(RateDecision::Limited {
            retry_after: Duration::from_millis(retry),
        })
    }

    async fn next_event(&self) -> Option<EngineEvent> {
        loop {
            let notified = self.inner.events_ready.notified();
            if let Some(event) = lock(&self.inner.events).pop_front() {
                return Some(event);
            }
            notified.await;
        }
    }
}
