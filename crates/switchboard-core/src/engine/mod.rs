//! The state engine: where every protocol keeps what outlives one connection.
//!
//! A protocol never holds shared state in its own process memory. It asks the [`Engine`] handle
//! (reachable from every hook through [`crate::Context`]) to append to logs, publish to topics,
//! track presence, keep keyed state with one writer at a time, count rate limits and remember
//! idempotent responses. Every operation is async and may fail with [`EngineError`], because the
//! implementation behind the handle may be another process (Redis) or a disk (a durable store).
//!
//! Three implementations are planned behind one trait, [`StateEngine`]:
//! - [`MemoryEngine`]: this process only, nothing survives a restart (the embedded default);
//! - a durable embedded engine (a single node whose state survives a restart);
//! - a cluster engine (several nodes sharing state through Redis).
//!
//! Every implementation must pass the same engine-conformance suite (in `switchboard-testkit`).
//!
//! ## Node awareness
//! A process is a node ([`NodeId`]); a connection is named across the cluster by [`ConnRef`]
//! (node + connection). Delivery to sockets is always node-local: each node has one [`Hub`]
//! holding its own subscribers, and the engine brings every publication of a topic to every node
//! with a subscriber, where the hub fans the one encoded [`Frame`] out to its peers.
//!
//! ## Ordering without process locks
//! Logged topics ([`Engine::append`]) are delivered to every node in log order, with their
//! offset, and a subscriber that joins with a replay ([`Engine::join`]) sees the replay, then
//! every later entry exactly once. Keyed state is written with compare-and-set
//! ([`Engine::put`] with [`Expect::Version`]) and logs can be appended conditionally
//! ([`Append::expect_top`]), so ordering never depends on a lock held in one process.

mod handle;
mod hub;
mod memory;

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use uuid::Uuid;

use crate::{ConnId, Frame};

pub use handle::{Engine, Joining};
pub use hub::Hub;
pub use memory::{MemoryCluster, MemoryEngine, MemoryLimits};

/// The identity of one node (process) of a cluster; fresh at every start.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Uuid);

impl NodeId {
    /// A fresh random node id.
    pub fn random() -> Self {
        Self(Uuid::from_u128(rand::random()))
    }

    /// The id as a UUID (for keys and logs).
    pub fn as_uuid(self) -> Uuid {
        self.0
    }

    /// Rebuilds an id from its UUID (e.g. read back from a store).
    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.0.simple())
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Short form for logs: the first 8 hex digits tell nodes apart.
        let hex = self.0.simple().to_string();
        f.write_str(hex.get(..8).unwrap_or(&hex))
    }
}

/// One connection, named across the cluster: the node it lives on and its id there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnRef {
    /// The node holding the socket.
    pub node: NodeId,
    /// The connection's id on that node.
    pub conn: ConnId,
}

impl fmt::Display for ConnRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.node, self.conn)
    }
}

/// Where a log stands: how many entries were ever appended (`offset`, the newest entry's offset;
/// 0 for a log never written) and which incarnation of the log this is (`epoch`). A log that is
/// lost and recreated (it expired, a volatile engine restarted) gets a new epoch, so a position
/// from before can be recognised as meaningless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// The offset of the newest entry (entries are numbered from 1).
    pub offset: u64,
    /// The log's incarnation.
    pub epoch: u64,
}

/// One entry of a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its offset in the log, from 1, never reused within an epoch.
    pub offset: u64,
    /// What was appended (and published, for a logged topic).
    pub frame: Frame,
}

/// What a log keeps; older entries beyond these bounds are trimmed or new ones refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Most entries kept.
    pub max_entries: usize,
    /// Most bytes of entries kept (the sum of the frames' lengths).
    pub max_bytes: usize,
    /// The whole log is forgotten after this long without an append (`None`: kept until trimmed).
    pub ttl: Option<Duration>,
    /// What an append does when the log is at a bound.
    pub when_full: WhenFull,
}

impl Retention {
    /// Keeps the newest `max_entries` entries and at most `max_bytes` bytes, trimming the oldest.
    pub const fn trim(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            max_entries,
            max_bytes,
            ttl: None,
            when_full: WhenFull::TrimOldest,
        }
    }

    /// Keeps up to `max_entries` entries and `max_bytes` bytes and refuses appends beyond them
    /// (for logs whose entries must not be lost, e.g. unacknowledged events).
    pub const fn refuse(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            max_entries,
            max_bytes,
            ttl: None,
            when_full: WhenFull::Refuse,
        }
    }

    /// The same retention, forgotten after `ttl` without an append.
    pub const fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

/// The policy of a full log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Drop the oldest entries to make room (history).
    TrimOldest,
    /// Refuse the append with [`EngineError::Full`] (outboxes, queues).
    Refuse,
}

/// How to append to a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Append {
    /// The log's bounds.
    pub retention: Retention,
    /// Append only if the log's newest offset is this one (compare-and-set); otherwise the
    /// append is refused with [`Appended::Conflict`] and nothing is written.
    pub expect_top: Option<u64>,
    /// Also deliver the entry to the topic's subscribers on every node, in log order.
    pub publish: bool,
    /// A connection that does not receive the published entry (e.g. its author).
    pub except: Option<ConnRef>,
    /// Keep the entry in the log. `false` makes a transient entry: it takes the next offset and
    /// is published in its place in the log's order, but is not stored (nothing to read back,
    /// trim or remove; the retention's bounds do not count it).
    pub keep: bool,
}

impl Append {
    /// Append and publish, under `retention`.
    pub const fn publish(retention: Retention) -> Self {
        Self {
            retention,
            expect_top: None,
            publish: true,
            except: None,
            keep: true,
        }
    }

    /// Publish in the log's order with the log's next offset, without storing the entry: an
    /// event that is numbered like the others but never redelivered (presence, typing).
    pub const fn transient() -> Self {
        Self {
            retention: Retention::trim(1, usize::MAX),
            expect_top: None,
            publish: true,
            except: None,
            keep: false,
        }
    }

    /// Append without publishing (a queue or an outbox read back later).
    pub const fn store(retention: Retention) -> Self {
        Self {
            retention,
            expect_top: None,
            publish: false,
            except: None,
            keep: true,
        }
    }

    /// Only if the newest offset is `top`.
    pub const fn if_top(mut self, top: u64) -> Self {
        self.expect_top = Some(top);
        self
    }

    /// Not delivered to `conn`.
    pub const fn except(mut self, conn: ConnRef) -> Self {
        self.except = Some(conn);
        self
    }

    /// Refuses, as every engine does, an entry of `size` bytes to be kept that the retention
    /// could never hold (larger than its byte bound, or a bound of no entries).
    pub fn check_size(&self, size: usize) -> EngineResult<()> {
        if self.keep && (size > self.retention.max_bytes || self.retention.max_entries == 0) {
            return Err(EngineError::Full("entry larger than the log's retention"));
        }
        Ok(())
    }
}

/// The result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Appended at this position.
    Done(Position),
    /// [`Append::expect_top`] did not match; nothing was written. The log's position now.
    Conflict(Position),
}

/// Where a read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReadFrom {
    /// The newest `n` entries.
    Latest(usize),
    /// Everything after this position (a reconnecting reader's last seen entry).
    After(Position),
}

/// The result of a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read {
    /// Entries in log order (at most the read's limit; more may follow when the last offset is
    /// below `top.offset`), and the log's position.
    Entries {
        /// The entries.
        entries: Vec<Entry>,
        /// The log's position at the time of the read.
        top: Position,
    },
    /// The position asked for cannot be continued: entries after it were trimmed, or the epoch
    /// changed. The reader must start over (e.g. from [`ReadFrom::Latest`]).
    Gone {
        /// The log's position now.
        top: Position,
    },
}

/// A value of keyed state with its version (incremented by every write, from 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The version; a compare-and-set names it.
    pub version: u64,
    /// The value.
    pub value: Bytes,
}

/// The condition of a keyed write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Write whatever is there.
    Any,
    /// Write only if the key holds nothing.
    Absent,
    /// Write only if the key holds this version.
    Version(u64),
}

/// The result of a keyed write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Put {
    /// Written; the new version.
    Stored(u64),
    /// The condition failed; what the key holds now.
    Conflict(Option<Versioned>),
}

/// The answer of a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateDecision {
    /// Allowed and counted.
    Allowed,
    /// Over the limit; not counted. The earliest moment another one would be allowed.
    Limited {
        /// How long until a slot frees up.
        retry_after: Duration,
    },
}

impl RateDecision {
    /// Whether the action was allowed.
    pub fn is_allowed(self) -> bool {
        self == Self::Allowed
    }
}

/// Something the engine tells the node about state it did not change itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    /// `member` left `room` because the node holding its last connection disappeared (crashed,
    /// was killed, lost the engine for longer than the stale threshold). Delivered to exactly one
    /// live node, which announces the departure as if the member's last socket had closed.
    MemberExpired {
        /// The presence room.
        room: String,
        /// The member that left.
        member: String,
    },
}

/// Why an engine operation failed. Protocols answer with their own error frame and keep the
/// socket open; nothing is half-done (an operation either happened or did not).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The engine cannot be reached now (a remote store is down); retrying later may work.
    #[error("state engine unavailable: {0}")]
    Unavailable(String),
    /// A bound of the engine or of the log/key is reached; the new work is refused.
    #[error("state engine full: {0}")]
    Full(&'static str),
    /// The stored data cannot be read (corrupt, or written by a newer version).
    #[error("stored state is unreadable: {0}")]
    Corrupt(String),
}

/// Result of an engine operation.
pub type EngineResult<T> = Result<T, EngineError>;

/// The interface every state engine implements: logs, publish/subscribe, presence, keyed state
/// and rate limits, each cluster-wide for engines that span nodes.
///
/// Protocols do not call this trait directly; they use the [`Engine`] handle, which adds the
/// node's [`Hub`] (subscriptions of local sockets) on top. An implementation is built with the
/// hub of its node and delivers every publication of a subscribed topic to it with
/// [`Hub::deliver`]: for logged topics in log order, each entry once.
pub trait StateEngine: Send + Sync + 'static {
    /// This node.
    fn node(&self) -> NodeId;

    /// The cluster's identity: the same on every node of a cluster and, for a durable engine,
    /// after every restart. Protocols derive stable ids from it (e.g. UUIDv5 namespaces).
    fn cluster_id(&self) -> impl Future<Output = EngineResult<uuid::Uuid>> + Send;

    /// Whether the engine can serve requests now (for readiness checks).
    fn ready(&self) -> impl Future<Output = bool> + Send;

    /// Starts bringing `topic`'s publications to this node's hub. Resolves once every later
    /// publication is certain to arrive; called before the node's first local subscriber reads
    /// the topic's log.
    fn subscribe_node(&self, topic: &str) -> impl Future<Output = EngineResult<()>> + Send;

    /// Stops bringing `topic`'s publications here (the node's last local subscriber left).
    fn unsubscribe_node(&self, topic: &str);

    /// Delivers `frame` to `topic`'s subscribers on every node, without a log (typing, cursors).
    fn publish(
        &self,
        topic: &str,
        frame: Frame,
        except: Option<ConnRef>,
    ) -> impl Future<Output = EngineResult<()>> + Send;

    /// Appends `frame` to `topic`'s log (and publishes it, see [`Append`]). When published,
    /// [`Append::except`] receives `reply` instead of `frame` at the entry's place in the
    /// topic's order (e.g. the author's acknowledgement), or nothing without a reply.
    fn append(
        &self,
        topic: &str,
        frame: Frame,
        options: Append,
        reply: Option<Frame>,
    ) -> impl Future<Output = EngineResult<Appended>> + Send;

    /// Reads `topic`'s log, at most `limit` entries.
    fn read(
        &self,
        topic: &str,
        from: ReadFrom,
        limit: usize,
    ) -> impl Future<Output = EngineResult<Read>> + Send;

    /// Removes one entry (e.g. an acknowledged event). Returns whether it was there. Offsets are
    /// never reused, so the log's position does not move back.
    fn remove(&self, topic: &str, offset: u64) -> impl Future<Output = EngineResult<bool>> + Send;

    /// Forgets `topic`'s whole log; its next append starts a new epoch.
    fn drop_log(&self, topic: &str) -> impl Future<Output = EngineResult<()>> + Send;

    /// Records that `conn` of `member` is in `room`; `true` if it is the member's first
    /// connection there on any node.
    fn presence_join(
        &self,
        room: &str,
        member: &str,
        conn: ConnRef,
    ) -> impl Future<Output = EngineResult<bool>> + Send;

    /// Removes `conn` of `member` from `room`; `true` if it was the member's last connection
    /// there on any node.
    fn presence_leave(
        &self,
        room: &str,
        member: &str,
        conn: ConnRef,
    ) -> impl Future<Output = EngineResult<bool>> + Send;

    /// The members of `room` with at least one connection, in the order they (first) joined.
    fn presence_members(
        &self,
        room: &str,
    ) -> impl Future<Output = EngineResult<Vec<String>>> + Send;

    /// Whether `member` has a connection in `room`.
    fn presence_contains(
        &self,
        room: &str,
        member: &str,
    ) -> impl Future<Output = EngineResult<bool>> + Send;

    /// Reads keyed state.
    fn get(&self, key: &str) -> impl Future<Output = EngineResult<Option<Versioned>>> + Send;

    /// Writes keyed state if `expect` holds; `ttl` forgets the key after that long without a
    /// write.
    fn put(
        &self,
        key: &str,
        value: Bytes,
        expect: Expect,
        ttl: Option<Duration>,
    ) -> impl Future<Output = EngineResult<Put>> + Send;

    /// Deletes keyed state if `expect` holds; returns whether something was deleted.
    fn delete(&self, key: &str, expect: Expect) -> impl Future<Output = EngineResult<bool>> + Send;

    /// Deletes keyed state if `expect` holds and returns what it held: of several concurrent
    /// takers exactly one gets the value (e.g. whoever releases a charge does it once).
    fn take(
        &self,
        key: &str,
        expect: Expect,
    ) -> impl Future<Output = EngineResult<Option<Versioned>>> + Send;

    /// Adds `delta` to the counter at `key` (absent counts as 0) if the result stays within
    /// `min..=max`: `Ok(new)`, or `Err(current)` with nothing changed. A counter that reaches 0
    /// is deleted, so counters cost nothing at rest. The value is stored as keyed state holding
    /// the decimal number, so `get` reads it too.
    fn add(
        &self,
        key: &str,
        delta: i64,
        min: i64,
        max: i64,
    ) -> impl Future<Output = EngineResult<Result<i64, i64>>> + Send;

    /// Keys starting with `prefix` and their values, in key order, at most `limit`, starting
    /// after `after` (for paging).
    fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = EngineResult<Vec<(String, Versioned)>>> + Send;

    /// Counts one action under `key` if fewer than `limit` were counted in the sliding `window`
    /// that ends now.
    fn rate_limit(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> impl Future<Output = EngineResult<RateDecision>> + Send;

    /// Takes the next event about state this node did not change (see [`EngineEvent`]); `None`
    /// once the engine is shut down. Only one caller (the runtime) takes events.
    fn next_event(&self) -> impl Future<Output = Option<EngineEvent>> + Send;
}
