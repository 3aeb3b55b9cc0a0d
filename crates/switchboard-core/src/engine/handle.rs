//! [`Engine`]: the handle protocols use, an erased [`StateEngine`] plus the node's [`Hub`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use uuid::Uuid;

use super::hub::ensure_ready;
use super::{
    Append, Appended, ConnRef, EngineError, EngineEvent, EngineResult, Expect, Hub, MemoryEngine,
    MemoryLimits, NodeId, Put, RateDecision, Read, ReadFrom, StateEngine, Versioned,
};
use crate::{ConnId, Frame, Peer};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// [`StateEngine`] with boxed futures, so one binary can pick its engine at run time and
/// protocols stay free of type parameters. One allocation per operation is noise next to what an
/// operation does (a remote round trip, a fan-out).
trait Erased: Send + Sync {
    fn node(&self) -> NodeId;
    fn cluster_id(&self) -> BoxFuture<'_, EngineResult<Uuid>>;
    fn ready(&self) -> BoxFuture<'_, bool>;
    fn subscribe_node<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, EngineResult<()>>;
    fn unsubscribe_node(&self, topic: &str);
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        frame: Frame,
        except: Option<ConnRef>,
    ) -> BoxFuture<'a, EngineResult<()>>;
    fn append<'a>(
        &'a self,
        topic: &'a str,
        frame: Frame,
        options: Append,
        reply: Option<Frame>,
    ) -> BoxFuture<'a, EngineResult<Appended>>;
    fn read<'a>(
        &'a self,
        topic: &'a str,
        from: ReadFrom,
        limit: usize,
    ) -> BoxFuture<'a, EngineResult<Read>>;
    fn remove<'a>(&'a self, topic: &'a str, offset: u64) -> BoxFuture<'a, EngineResult<bool>>;
    fn drop_log<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, EngineResult<()>>;
    fn presence_join<'a>(
        &'a self,
        room: &'a str,
        member: &'a str,
        conn: ConnRef,
    ) -> BoxFuture<'a, EngineResult<bool>>;
    fn presence_leave<'a>(
        &'a self,
        room: &'a str,
        member: &'a str,
        conn: ConnRef,
    ) -> BoxFuture<'a, EngineResult<bool>>;
    fn presence_members<'a>(&'a self, room: &'a str) -> BoxFuture<'a, EngineResult<Vec<String>>>;
    fn presence_contains<'a>(
        &'a self,
        room: &'a str,
        member: &'a str,
    ) -> BoxFuture<'a, EngineResult<bool>>;
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, EngineResult<Option<Versioned>>>;
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        expect: Expect,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, EngineResult<Put>>;
    fn delete<'a>(&'a self, key: &'a str, expect: Expect) -> BoxFuture<'a, EngineResult<bool>>;
    fn take<'a>(
        &'a self,
        key: &'a str,
        expect: Expect,
    ) -> BoxFuture<'a, EngineResult<Option<Versioned>>>;
    fn add<'a>(
        &'a self,
        key: &'a str,
        delta: i64,
        min: i64,
        max: i64,
    ) -> BoxFuture<'a, EngineResult<Result<i64, i64>>>;
    fn scan<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, EngineResult<Vec<(String, Versioned)>>>;
    fn rate_limit<'a>(
        &'a self,
        key: &'a str,
        limit: u32,
        window: Duration,
    ) -> BoxFuture<'a, EngineResult<RateDecision>>;
    fn next_event(&self) -> BoxFuture<'_, Option<EngineEvent>>;
}

impl<T: StateEngine> Erased for T {
    fn node(&self) -> NodeId {
        StateEngine::node(self)
    }
    fn cluster_id(&self) -> BoxFuture<'_, EngineResult<Uuid>> {
        Box::pin(StateEngine::cluster_id(self))
    }
    fn ready(&self) -> BoxFuture<'_, bool> {
        Box::pin(StateEngine::ready(self))
    }
    fn subscribe_node<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, EngineResult<()>> {
        Box::pin(StateEngine::subscribe_node(self, topic))
    }
    fn unsubscribe_node(&self, topic: &str) {
        StateEngine::unsubscribe_node(self, topic);
    }
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        frame: Frame,
        except: Option<ConnRef>,
    ) -> BoxFuture<'a, EngineResult<()>> {
        Box::pin(StateEngine::publish(self, topic, frame, except))
    }
    fn append<'a>(
        &'a self,
        topic: &'a str,
        frame: Frame,
        options: Append,
        reply: Option<Frame>,
    ) -> BoxFuture<'a, EngineResult<Appended>> {
        Box::pin(StateEngine::append(self, topic, frame, options, reply))
    }
    fn read<'a>(
        &'a self,
        topic: &'a str,
        from: ReadFrom,
        limit: usize,
    ) -> BoxFuture<'a, EngineResult<Read>> {
        Box::pin(StateEngine::read(self, topic, from, limit))
    }
    fn remove<'a>(&'a self, topic: &'a str, offset: u64) -> BoxFuture<'a, EngineResult<bool>> {
        Box::pin(StateEngine::remove(self, topic, offset))
    }
    fn drop_log<'a>(&'a self, topic: &'a str) -> BoxFuture<'a, EngineResult<()>> {
        Box::pin(StateEngine::drop_log(self, topic))
    }
    fn presence_join<'a>(
        &'a self,
        room: &'a str,
        member: &'a str,
        conn: ConnRef,
    ) -> BoxFuture<'a, EngineResult<bool>> {
        Box::pin(StateEngine::presence_join(self, room, member, conn))
    }
    fn presence_leave<'a>(
        &'a self,
        room: &'a str,
        member: &'a str,
        conn: ConnRef,
    ) -> BoxFuture<'a, EngineResult<bool>> {
        Box::pin(StateEngine::presence_leave(self, room, member, conn))
    }
    fn presence_members<'a>(&'a self, room: &'a str) -> BoxFuture<'a, EngineResult<Vec<String>>> {
        Box::pin(StateEngine::presence_members(self, room))
    }
    fn presence_contains<'a>(
        &'a self,
        room: &'a str,
        member: &'a str,
    ) -> BoxFuture<'a, EngineResult<bool>> {
        Box::pin(StateEngine::presence_contains(self, room, member))
    }
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, EngineResult<Option<Versioned>>> {
        Box::pin(StateEngine::get(self, key))
    }
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        expect: Expect,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, EngineResult<Put>> {
        Box::pin(StateEngine::put(self, key, value, expect, ttl))
    }
    fn delete<'a>(&'a self, key: &'a str, expect: Expect) -> BoxFuture<'a, EngineResult<bool>> {
        Box::pin(StateEngine::delete(self, key, expect))
    }
    fn take<'a>(
        &'a self,
        key: &'a str,
        expect: Expect,
    ) -> BoxFuture<'a, EngineResult<Option<Versioned>>> {
        Box::pin(StateEngine::take(self, key, expect))
    }
    fn add<'a>(
        &'a self,
        key: &'a str,
        delta: i64,
        min: i64,
        max: i64,
    ) -> BoxFuture<'a, EngineResult<Result<i64, i64>>> {
        Box::pin(StateEngine::add(self, key, delta, min, max))
    }
    fn scan<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
        limit: usize,
    ) -> BoxFuture<'a, EngineResult<Vec<(String, Versioned)>>> {
        Box::pin(StateEngine::scan(self, prefix, after, limit))
    }
    fn rate_limit<'a>(
        &'a self,
        key: &'a str,
        limit: u32,
        window: Duration,
    ) -> BoxFuture<'a, EngineResult<RateDecision>> {
        Box::pin(StateEngine::rate_limit(self, key, limit, window))
    }
    fn next_event(&self) -> BoxFuture<'_, Option<EngineEvent>> {
        Box::pin(StateEngine::next_event(self))
    }
}

struct Inner {
    backend: Box<dyn Erased>,
    hub: Arc<Hub>,
    /// Latency histograms and error counters, once [`Engine::instrument`] named the protocol.
    metrics: OnceLock<EngineMetrics>,
}

/// An engine operation, as the `operation` label of the engine metrics names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    ClusterId,
    Subscribe,
    Join,
    Publish,
    Append,
    Read,
    Remove,
    DropLog,
    PresenceJoin,
    PresenceLeave,
    PresenceMembers,
    PresenceContains,
    Get,
    Put,
    Delete,
    Take,
    Add,
    Scan,
    RateLimit,
    Recall,
    Remember,
}

impl Op {
    const ALL: [Op; 21] = [
        Op::ClusterId,
        Op::Subscribe,
        Op::Join,
        Op::Publish,
        Op::Append,
        Op::Read,
        Op::Remove,
        Op::DropLog,
        Op::PresenceJoin,
        Op::PresenceLeave,
        Op::PresenceMembers,
        Op::PresenceContains,
        Op::Get,
        Op::Put,
        Op::Delete,
        Op::Take,
        Op::Add,
        Op::Scan,
        Op::RateLimit,
        Op::Recall,
        Op::Remember,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::ClusterId => "cluster_id",
            Op::Subscribe => "subscribe",
            Op::Join => "join",
            Op::Publish => "publish",
            Op::Append => "append",
            Op::Read => "read",
            Op::Remove => "remove",
            Op::DropLog => "drop_log",
            Op::PresenceJoin => "presence_join",
            Op::PresenceLeave => "presence_leave",
            Op::PresenceMembers => "presence_members",
            Op::PresenceContains => "presence_contains",
            Op::Get => "get",
            Op::Put => "put",
            Op::Delete => "delete",
            Op::Take => "take",
            Op::Add => "add",
            Op::Scan => "scan",
            Op::RateLimit => "rate_limit",
            Op::Recall => "recall",
            Op::Remember => "remember",
        }
    }
}

/// The engine's metric handles, registered once (a lookup in the recorder's registry per
/// operation would cost more than the record itself).
struct EngineMetrics {
    protocol: &'static str,
    /// One histogram per [`Op`], in [`Op::ALL`] order.
    durations: Vec<metrics::Histogram>,
}

impl EngineMetrics {
    fn new(protocol: &'static str) -> Self {
        let durations = Op::ALL
            .iter()
            .map(|op| {
                metrics::histogram!(
                    Engine::OPERATION_DURATION_METRIC,
                    "protocol" => protocol,
                    "operation" => op.name()
                )
            })
            .collect();
        Self {
            protocol,
            durations,
        }
    }

    fn record(&self, op: Op, took: Duration, error: Option<&EngineError>) {
        if let Some(histogram) = self.durations.get(op as usize) {
            histogram.record(took.as_secs_f64());
        }
        if let Some(error) = error {
            let kind = match error {
                EngineError::Unavailable(_) => "unavailable",
                EngineError::Full(_) => "full",
                EngineError::Corrupt(_) => "corrupt",
            };
            // Errors are rare: a registry lookup each is fine.
            metrics::counter!(
                Engine::ERRORS_METRIC,
                "protocol" => self.protocol,
                "operation" => op.name(),
                "error" => kind
            )
            .increment(1);
        }
    }
}

/// The state engine as protocols see it: cheap to clone, shared by every connection of a node.
///
/// It wraps one [`StateEngine`] and this node's [`Hub`]: subscribing a socket registers it in the
/// hub (and subscribes the node to the topic the first time); everything else goes to the engine.
/// Idempotency records ([`Engine::recall`], [`Engine::remember`]) are keyed state under the
/// `idem:` prefix.
#[derive(Clone)]
pub struct Engine(Arc<Inner>);

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("node", &self.0.hub.node())
            .finish()
    }
}

impl Default for Engine {
    /// A [`MemoryEngine`] with default limits.
    fn default() -> Self {
        Self::memory(MemoryLimits::default())
    }
}

impl Engine {
    /// Wraps `backend`, which delivers its publications to `hub` (the hub it was built with).
    pub fn new<E: StateEngine>(backend: E, hub: Arc<Hub>) -> Self {
        Self(Arc::new(Inner {
            backend: Box::new(backend),
            hub,
            metrics: OnceLock::new(),
        }))
    }

    /// Histogram of engine operation latencies in seconds, labelled `protocol` and `operation`
    /// (`append`, `publish`, `read`, `presence_join`, `put`, `take`, ...).
    pub const OPERATION_DURATION_METRIC: &'static str =
        "switchboard_engine_operation_duration_seconds";

    /// Counter of failed engine operations, labelled `protocol`, `operation` and `error`
    /// (`unavailable`, `full`, `corrupt`).
    pub const ERRORS_METRIC: &'static str = "switchboard_engine_errors_total";

    /// Starts recording every operation's latency ([`Self::OPERATION_DURATION_METRIC`]) and
    /// failures ([`Self::ERRORS_METRIC`]) through the `metrics` facade, labelled with
    /// `protocol`. The runtime calls it when it serves a protocol on this engine; the first
    /// call wins. Metric handles are taken from the recorder installed at that moment, so
    /// install the recorder first. Until then operations are not timed at all.
    pub fn instrument(&self, protocol: &'static str) {
        let _ = self.0.metrics.get_or_init(|| EngineMetrics::new(protocol));
    }

    /// Runs `work`, timing it when the engine is instrumented: one clock read before and after
    /// and one histogram record per operation.
    async fn timed<T>(
        &self,
        op: Op,
        work: impl Future<Output = EngineResult<T>>,
    ) -> EngineResult<T> {
        let Some(metrics) = self.0.metrics.get() else {
            return work.await;
        };
        let started = Instant::now();
        let result = work.await;
        metrics.record(op, started.elapsed(), result.as_ref().err());
        result
    }

    /// A single-node in-memory engine (the embedded default).
    pub fn memory(limits: MemoryLimits) -> Self {
        let (backend, hub) = MemoryEngine::single(limits);
        Self::new(backend, hub)
    }

    /// This node.
    pub fn node(&self) -> NodeId {
        self.0.backend.node()
    }

    /// This node's subscribers.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.0.hub
    }

    /// The cluster-wide name of connection `conn` of this node.
    pub fn conn_ref(&self, conn: ConnId) -> ConnRef {
        ConnRef {
            node: self.node(),
            conn,
        }
    }

    /// See [`StateEngine::cluster_id`].
    pub async fn cluster_id(&self) -> EngineResult<Uuid> {
        self.timed(Op::ClusterId, self.0.backend.cluster_id()).await
    }

    /// See [`StateEngine::ready`].
    pub async fn ready(&self) -> bool {
        self.0.backend.ready().await
    }

    /// Subscribes `peer` to `topic`: every publication from now on reaches it.
    pub async fn subscribe(&self, topic: &str, peer: &Peer) -> EngineResult<()> {
        let ready = self.0.hub.add(topic, peer, false);
        let result = self
            .timed(
                Op::Subscribe,
                ensure_ready(&ready, || self.0.backend.subscribe_node(topic)),
            )
            .await;
        if result.is_err() {
            self.unsubscribe(topic, peer.id());
        }
        result
    }

    /// Subscribes `peer` to logged `topic` with a replay: reads the log (`from`, at most
    /// `limit` entries) and holds live publications for `peer` until [`Joining::go_live`] queues
    /// the replay, so the peer sees the replay and then every later entry exactly once, in order.
    pub async fn join(
        &self,
        topic: &str,
        peer: &Peer,
        from: ReadFrom,
        limit: usize,
    ) -> EngineResult<Joining> {
        let ready = self.0.hub.add(topic, peer, true);
        let read = async {
            ensure_ready(&ready, || self.0.backend.subscribe_node(topic)).await?;
            self.0.backend.read(topic, from, limit).await
        };
        match self.timed(Op::Join, read).await {
            Ok(read) => Ok(Joining {
                hub: self.0.hub.clone(),
                topic: topic.into(),
                conn: peer.id(),
                read: Some(read),
            }),
            Err(error) => {
                self.unsubscribe(topic, peer.id());
                Err(error)
            }
        }
    }

    /// Unsubscribes connection `conn` of this node from `topic`.
    pub fn unsubscribe(&self, topic: &str, conn: ConnId) {
        if self.0.hub.remove(topic, conn) {
            self.0.backend.unsubscribe_node(topic);
        }
    }

    /// See [`StateEngine::publish`].
    pub async fn publish(
        &self,
        topic: &str,
        frame: Frame,
        except: Option<ConnRef>,
    ) -> EngineResult<()> {
        self.timed(Op::Publish, self.0.backend.publish(topic, frame, except))
            .await
    }

    /// See [`StateEngine::append`] (no reply: [`Append::except`] gets nothing).
    pub async fn append(
        &self,
        topic: &str,
        frame: Frame,
        options: Append,
    ) -> EngineResult<Appended> {
        self.timed(
            Op::Append,
            self.0.backend.append(topic, frame, options, None),
        )
        .await
    }

    /// Appends and publishes `frame` to `topic`; the connection named by `options.except` (the
    /// author) receives `reply` instead, at the entry's place in the topic's order, so its
    /// acknowledgement is never overtaken by a later entry. See [`StateEngine::append`].
    pub async fn append_with_reply(
        &self,
        topic: &str,
        frame: Frame,
        options: Append,
        reply: Frame,
    ) -> EngineResult<Appended> {
        self.timed(
            Op::Append,
            self.0.backend.append(topic, frame, options, Some(reply)),
        )
        .await
    }

    /// See [`StateEngine::read`].
    pub async fn read(&self, topic: &str, from: ReadFrom, limit: usize) -> EngineResult<Read> {
        self.timed(Op::Read, self.0.backend.read(topic, from, limit))
            .await
    }

    /// See [`StateEngine::remove`].
    pub async fn remove(&self, topic: &str, offset: u64) -> EngineResult<bool> {
        self.timed(Op::Remove, self.0.backend.remove(topic, offset))
            .await
    }

    /// See [`StateEngine::drop_log`].
    pub async fn drop_log(&self, topic: &str) -> EngineResult<()> {
        self.timed(Op::DropLog, self.0.backend.drop_log(topic))
            .await
    }

    /// See [`StateEngine::presence_join`].
    pub async fn presence_join(
        &self,
        room: &str,
        member: &str,
        conn: ConnRef,
    ) -> EngineResult<bool> {
        self.timed(
            Op::PresenceJoin,
            self.0.backend.presence_join(room, member, conn),
        )
        .await
    }

    /// See [`StateEngine::presence_leave`].
    pub async fn presence_leave(
        &self,
        room: &str,
        member: &str,
        conn: ConnRef,
    ) -> EngineResult<bool> {
        self.timed(
            Op::PresenceLeave,
            self.0.backend.presence_leave(room, member, conn),
        )
        .await
    }

    /// See [`StateEngine::presence_members`].
    pub async fn presence_members(&self, room: &str) -> EngineResult<Vec<String>> {
        self.timed(Op::PresenceMembers, self.0.backend.presence_members(room))
            .await
    }

    /// See [`StateEngine::presence_contains`].
    pub async fn presence_contains(&self, room: &str, member: &str) -> EngineResult<bool> {
        self.timed(
            Op::PresenceContains,
            self.0.backend.presence_contains(room, member),
        )
        .await
    }

    /// See [`StateEngine::get`].
    pub async fn get(&self, key: &str) -> EngineResult<Option<Versioned>> {
        self.timed(Op::Get, self.0.backend.get(key)).await
    }

    /// See [`StateEngine::put`].
    pub async fn put(
        &self,
        key: &str,
        value: Bytes,
        expect: Expect,
        ttl: Option<Duration>,
    ) -> EngineResult<Put> {
        self.timed(Op::Put, self.0.backend.put(key, value, expect, ttl))
            .await
    }

    /// See [`StateEngine::delete`].
    pub async fn delete(&self, key: &str, expect: Expect) -> EngineResult<bool> {
        self.timed(Op::Delete, self.0.backend.delete(key, expect))
            .await
    }

    /// See [`StateEngine::take`].
    pub async fn take(&self, key: &str, expect: Expect) -> EngineResult<Option<Versioned>> {
        self.timed(Op::Take, self.0.backend.take(key, expect)).await
    }

    /// See [`StateEngine::add`].
    pub async fn add(
        &self,
        key: &str,
        delta: i64,
        min: i64,
        max: i64,
    ) -> EngineResult<Result<i64, i64>> {
        self.timed(Op::Add, self.0.backend.add(key, delta, min, max))
            .await
    }

    /// See [`StateEngine::scan`].
    pub async fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> EngineResult<Vec<(String, Versioned)>> {
        self.timed(Op::Scan, self.0.backend.scan(prefix, after, limit))
            .await
    }

    /// See [`StateEngine::rate_limit`].
    pub async fn rate_limit(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> EngineResult<RateDecision> {
        self.timed(Op::RateLimit, self.0.backend.rate_limit(key, limit, window))
            .await
    }

    /// The response stored for idempotency key `key`, if any (and not expired).
    pub async fn recall(&self, key: &str) -> EngineResult<Option<Bytes>> {
        let key = idempotency_key(key);
        let stored = self.timed(Op::Recall, self.0.backend.get(&key)).await?;
        Ok(stored.map(|stored| stored.value))
    }

    /// Stores `response` under idempotency key `key` for `ttl`, unless a response is already
    /// stored: then that earlier response is returned and must be the answer (two nodes raced
    /// on one retried request; the first one's answer wins everywhere).
    pub async fn remember(
        &self,
        key: &str,
        response: Bytes,
        ttl: Duration,
    ) -> EngineResult<Option<Bytes>> {
        let key = idempotency_key(key);
        let stored = self
            .timed(
                Op::Remember,
                self.0
                    .backend
                    .put(&key, response, Expect::Absent, Some(ttl)),
            )
            .await?;
        match stored {
            Put::Stored(_) => Ok(None),
            Put::Conflict(existing) => Ok(existing.map(|stored| stored.value)),
        }
    }

    /// See [`StateEngine::next_event`].
    pub async fn next_event(&self) -> Option<EngineEvent> {
        self.0.backend.next_event().await
    }
}

fn idempotency_key(key: &str) -> String {
    let mut full = String::with_capacity(key.len().saturating_add(5));
    full.push_str("idem:");
    full.push_str(key);
    full
}

/// A subscriber between its replay read and live delivery; see [`Engine::join`].
///
/// Dropping it without [`Joining::go_live`] makes the subscriber live with an empty replay.
#[derive(Debug)]
pub struct Joining {
    hub: Arc<Hub>,
    topic: Box<str>,
    conn: ConnId,
    read: Option<Read>,
}

impl Joining {
    /// What the log held when the subscriber joined.
    pub fn read(&self) -> &Read {
        // `read` is only taken by `go_live`/drop, which consume the value.
        static EMPTY: Read = Read::Gone {
            top: super::Position {
                offset: 0,
                epoch: 0,
            },
        };
        self.read.as_ref().unwrap_or(&EMPTY)
    }

    /// Queues `replay` (the protocol's frames for the entries it read, in order), then every
    /// publication that arrived since, and makes the subscriber live.
    pub fn go_live(mut self, replay: Vec<Frame>) {
        self.finish(replay);
    }

    fn finish(&mut self, replay: Vec<Frame>) {
        if let Some(read) = self.read.take() {
            let replayed_to = match read {
                Read::Entries { top, .. } | Read::Gone { top } => top.offset,
            };
            self.hub
                .go_live(&self.topic, self.conn, replay, replayed_to);
        }
    }
}

impl Drop for Joining {
    fn drop(&mut self) {
        self.finish(Vec::new());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The latency histograms are indexed by `op as usize` in `Op::ALL` order.
    #[test]
    fn every_operation_indexes_its_own_histogram() {
        for (index, op) in Op::ALL.iter().enumerate() {
            assert_eq!(*op as usize, index, "{}", op.name());
        }
    }
}
