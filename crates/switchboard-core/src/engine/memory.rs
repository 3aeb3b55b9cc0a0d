//! [`MemoryEngine`]: the in-process state engine, and [`MemoryCluster`], several in-process
//! nodes sharing one memory engine (for tests of node-aware behaviour without an external store).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;
use uuid::Uuid;

use super::{
    Append, Appended, ConnRef, Engine, EngineError, EngineEvent, EngineResult, Entry, Expect, Hub,
    NodeId, Position, Put, RateDecision, Read, ReadFrom, StateEngine, Versioned, WhenFull,
};
use crate::sync::{lock, read, write};
use crate::{Frame, MemoryBudget};

/// Bookkeeping bytes charged per stored item besides its payload (map slots, headers).
const ITEM_OVERHEAD: usize = 96;
/// Expired keys and logs are swept at most this often (and when the budget is full).
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Bytes charged per remembered rate-limit hit.
const HIT_BYTES: usize = 16;

/// Bounds of a memory engine, over everything it stores (log entries, keys, presence members,
/// rate-limit windows), in items and in bytes. Over either, new state is refused with
/// [`EngineError::Full`]; nothing stored is evicted to make room (logs with
/// [`WhenFull::TrimOldest`] still trim themselves within their own retention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLimits {
    /// Most items stored.
    pub max_items: usize,
    /// Most bytes stored (payloads plus a fixed overhead per item).
    pub max_bytes: usize,
}

impl Default for MemoryLimits {
    fn default() -> Self {
        Self {
            max_items: 4_000_000,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

#[derive(Debug)]
struct Log {
    epoch: u64,
    top: u64,
    entries: VecDeque<Entry>,
    bytes: usize,
    last_append: Instant,
    ttl: Option<Duration>,
}

impl Log {
    fn position(&self) -> Position {
        Position {
            offset: self.top,
            epoch: self.epoch,
        }
    }

    /// Whether the log's time-to-live passed without an append.
    fn expired(&self, now: Instant) -> bool {
        self.ttl
            .and_then(|ttl| self.last_append.checked_add(ttl))
            .is_some_and(|deadline| deadline <= now)
    }

    /// The offset of the oldest entry still readable by position: everything after
    /// `trimmed_to` is here unless removed on purpose.
    fn trimmed_to(&self) -> u64 {
        self.entries
            .front()
            .map_or(self.top, |first| first.offset.saturating_sub(1))
    }
}

#[derive(Debug)]
struct Stored {
    versioned: Versioned,
    expires_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct Room {
    next_seq: u64,
    members: HashMap<String, (u64, Vec<ConnRef>)>,
}

#[derive(Debug, Default)]
struct NodeEvents {
    queue: Mutex<VecDeque<EngineEvent>>,
    ready: Notify,
}

#[derive(Debug)]
struct Node {
    id: NodeId,
    hub: Arc<Hub>,
    events: Arc<NodeEvents>,
}

/// What every node of one memory cluster shares.
#[derive(Debug)]
struct Shared {
    cluster_id: Uuid,
    limits: MemoryLimits,
    bytes: MemoryBudget,
    items: MemoryBudget,
    next_epoch: AtomicU64,
    nodes: RwLock<Vec<Node>>,
    /// Each log behind its own lock: an append and its delivery to every node happen under it,
    /// which is what puts a topic's entries in one order everywhere.
    logs: RwLock<HashMap<String, Arc<Mutex<Option<Log>>>>>,
    kv: Mutex<BTreeMap<String, Stored>>,
    presence: Mutex<HashMap<String, Room>>,
    rates: Mutex<HashMap<String, (Duration, VecDeque<Instant>)>>,
    /// When the engine was made; sweeps are timed in milliseconds since.
    started: Instant,
    /// Milliseconds since `started` of the last sweep (`u64::MAX`: never). An atomic, because
    /// every append and write checks it.
    last_sweep_ms: AtomicU64,
}

/// Locks `mutex` unless another thread holds it (a poisoned lock is recovered, as everywhere).
fn try_lock<T>(mutex: &Mutex<T>) -> Option<std::sync::MutexGuard<'_, T>> {
    match mutex.try_lock() {
        Ok(guard) => Some(guard),
        Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// Runs `undo` on drop unless defused: gives a charge back on every early return.
struct Undo<F: FnMut()> {
    undo: Option<F>,
}

impl<F: FnMut()> Undo<F> {
    fn defuse(mut self) {
        self.undo = None;
    }
}

impl<F: FnMut()> Drop for Undo<F> {
    fn drop(&mut self) {
        if let Some(undo) = self.undo.as_mut() {
            undo();
        }
    }
}

fn scopeguard<F: FnMut()>(undo: F) -> Undo<F> {
    Undo { undo: Some(undo) }
}

fn cost(len: usize) -> usize {
    len.saturating_add(ITEM_OVERHEAD)
}

fn full() -> EngineError {
    EngineError::Full("memory engine limit")
}

impl Shared {
    fn new(limits: MemoryLimits) -> Self {
        Self {
            cluster_id: Uuid::from_u128(rand::random()),
            limits,
            bytes: MemoryBudget::new(limits.max_bytes),
            items: MemoryBudget::new(limits.max_items),
            next_epoch: AtomicU64::new(1),
            nodes: RwLock::new(Vec::new()),
            logs: RwLock::new(HashMap::new()),
            kv: Mutex::new(BTreeMap::new()),
            presence: Mutex::new(HashMap::new()),
            rates: Mutex::new(HashMap::new()),
            started: Instant::now(),
            last_sweep_ms: AtomicU64::new(u64::MAX),
        }
    }

    /// Charges one item of `bytes`, sweeping expired state once if that makes it fit.
    fn charge(&self, bytes: usize) -> EngineResult<()> {
        if self.try_charge(bytes) {
            return Ok(());
        }
        self.sweep(true);
        if self.try_charge(bytes) {
            Ok(())
        } else {
            Err(full())
        }
    }

    fn try_charge(&self, bytes: usize) -> bool {
        if self.items.try_reserve(1).is_err() {
            return false;
        }
        if self.bytes.try_reserve(bytes).is_err() {
            self.items.release(1);
            return false;
        }
        true
    }

    /// Gives back a charge of one item of `bytes` taken ahead of time, if any (`0`: none).
    fn uncharge_if(&self, bytes: usize) {
        if bytes > 0 {
            self.uncharge(bytes);
        }
    }

    fn uncharge(&self, bytes: usize) {
        self.items.release(1);
        self.bytes.release(bytes);
    }

    /// Changes the bytes charged for an item that stays stored (never refused).
    fn recharge(&self, old: usize, new: usize) {
        self.bytes.release(old);
        self.bytes.force_reserve(new);
    }

    fn new_epoch(&self) -> u64 {
        self.next_epoch.fetch_add(1, Ordering::Relaxed)
    }

    fn log(&self, topic: &str) -> Arc<Mutex<Option<Log>>> {
        if let Some(log) = read(&self.logs).get(topic) {
            return log.clone();
        }
        write(&self.logs)
            .entry(topic.to_owned())
            .or_insert_with(|| Arc::new(Mutex::new(None)))
            .clone()
    }

    fn existing_log(&self, topic: &str) -> Option<Arc<Mutex<Option<Log>>>> {
        read(&self.logs).get(topic).cloned()
    }

    fn deliver(
        &self,
        topic: &str,
        offset: Option<u64>,
        frame: &Frame,
        except: Option<ConnRef>,
        reply: Option<&Frame>,
    ) {
        for node in read(&self.nodes).iter() {
            node.hub.deliver(topic, offset, frame, except, reply);
        }
    }

    /// Forgets expired keys, logs and empty rate windows; at most once per [`SWEEP_EVERY`]
    /// unless `force`d by a full budget.
    fn sweep(&self, force: bool) {
        let now = Instant::now();
        let now_ms = u64::try_from(now.saturating_duration_since(self.started).as_millis())
            .unwrap_or(u64::MAX);
        let last = self.last_sweep_ms.load(Ordering::Relaxed);
        let every = u64::try_from(SWEEP_EVERY.as_millis()).unwrap_or(u64::MAX);
        if !force && last != u64::MAX && now_ms.saturating_sub(last) < every {
            return;
        }
        // One sweeper at a time; a concurrent caller skips (a forced one sweeps regardless).
        if self
            .last_sweep_ms
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
            && !force
        {
            return;
        }
        let mut kv = lock(&self.kv);
        kv.retain(|key, stored| {
            let live = stored.expires_at.is_none_or(|at| at > now);
            if !live {
                self.uncharge(cost(key.len().saturating_add(stored.versioned.value.len())));
            }
            live
        });
        drop(kv);
        let logs: Vec<_> = read(&self.logs)
            .iter()
            .map(|(topic, log)| (topic.len(), log.clone()))
            .collect();
        for (topic_len, log) in logs {
            // A log locked right now is in use (possibly by the append that is charging and
            // made this sweep run): it is not idle, so skip it rather than wait for it.
            let Some(mut slot) = try_lock(&log) else {
                continue;
            };
            if slot.as_ref().is_some_and(|log| log.expired(now))
                && let Some(log) = slot.take()
            {
                self.free_log(topic_len, &log);
            }
        }
        write(&self.logs).retain(|_, log| {
            Arc::strong_count(log) > 1 || try_lock(log).is_none_or(|slot| slot.is_some())
        });
        let mut rates = lock(&self.rates);
        rates.retain(|key, (window, hits)| {
            while hits
                .front()
                .is_some_and(|at| now.saturating_duration_since(*at) >= *window)
            {
                hits.pop_front();
                self.bytes.release(HIT_BYTES);
            }
            let keep = !hits.is_empty();
            if !keep {
                self.uncharge(cost(key.len()));
            }
            keep
        });
    }

    /// Gives back everything a forgotten log was charged: its entries and its own bookkeeping.
    fn free_log(&self, topic_len: usize, log: &Log) {
        self.free_entries(log.entries.iter());
        self.uncharge(cost(topic_len));
    }

    fn free_entries<'a>(&self, entries: impl Iterator<Item = &'a Entry>) {
        for entry in entries {
            self.uncharge(cost(entry.frame.len()));
        }
    }

    fn expire_node(&self, dead: NodeId) {
        let mut expired = Vec::new();
        let mut presence = lock(&self.presence);
        presence.retain(|room_name, room| {
            room.members.retain(|member, (_, conns)| {
                let before = conns.len();
                conns.retain(|c| c.node != dead);
                for _ in conns.len()..before {
                    self.uncharge(cost(room_name.len().saturating_add(member.len())));
                }
                if conns.is_empty() && before > 0 {
                    expired.push(EngineEvent::MemberExpired {
                        room: room_name.clone(),
                        member: member.clone(),
                    });
                    false
                } else {
                    true
                }
            });
            !room.members.is_empty()
        });
        drop(presence);
        // Exactly one live node hears of each expired member: the first one still registered.
        let nodes = read(&self.nodes);
        if let Some(node) = nodes.iter().find(|n| n.id != dead) {
            lock(&node.events.queue).extend(expired);
            node.events.ready.notify_one();
        }
    }
}

/// The in-process [`StateEngine`]: everything in this process's memory, nothing survives a
/// restart. Bounded by [`MemoryLimits`].
///
/// One `MemoryEngine` is one node; [`MemoryCluster`] makes several nodes that share state, to
/// test node-aware protocol behaviour (presence across nodes, a node's expiry) in one process.
#[derive(Debug)]
pub struct MemoryEngine {
    shared: Arc<Shared>,
    node: NodeId,
    events: Arc<NodeEvents>,
}

impl MemoryEngine {
    /// A single node with its own state, and the hub it delivers to.
    pub fn single(limits: MemoryLimits) -> (Self, Arc<Hub>) {
        MemoryCluster::new(limits).add_node()
    }

    /// Bytes stored now (payloads plus per-item overhead), for reports and tests.
    pub fn bytes_used(&self) -> usize {
        self.shared.bytes.used()
    }

    /// Removes `key` if `expect` holds, returning its live value.
    fn take_now(&self, key: &str, expect: Expect) -> Option<Versioned> {
        let now = Instant::now();
        let mut kv = lock(&self.shared.kv);
        let stored = kv.get(key)?;
        let live = stored.expires_at.is_none_or(|at| at > now);
        let matches = match expect {
            Expect::Any => true,
            Expect::Absent => false,
            Expect::Version(version) => live && stored.versioned.version == version,
        };
        if !matches {
            return None;
        }
        let stored = kv.remove(key)?;
        self.shared
            .uncharge(cost(key.len().saturating_add(stored.versioned.value.len())));
        live.then_some(stored.versioned)
    }

    /// The limits this engine was built with.
    pub fn limits(&self) -> MemoryLimits {
        self.shared.limits
    }
}

/// Several in-process nodes sharing one memory engine: a cluster without an external store, for
/// tests. Each [`MemoryCluster::node`] is a separate node with its own hub; [`MemoryCluster::kill`]
/// makes one disappear as if its process died.
#[derive(Debug, Clone)]
pub struct MemoryCluster {
    shared: Arc<Shared>,
}

impl MemoryCluster {
    /// An empty cluster.
    pub fn new(limits: MemoryLimits) -> Self {
        Self {
            shared: Arc::new(Shared::new(limits)),
        }
    }

    fn add_node(&self) -> (MemoryEngine, Arc<Hub>) {
        let id = NodeId::random();
        let hub = Hub::new(id);
        let events = Arc::new(NodeEvents::default());
        write(&self.shared.nodes).push(Node {
            id,
            hub: hub.clone(),
            events: events.clone(),
        });
        (
            MemoryEngine {
                shared: self.shared.clone(),
                node: id,
                events,
            },
            hub,
        )
    }

    /// A new node of this cluster.
    pub fn node(&self) -> Engine {
        let (backend, hub) = self.add_node();
        Engine::new(backend, hub)
    }

    /// Makes `node` disappear: it receives nothing more, and the presence of its connections
    /// expires (one [`EngineEvent::MemberExpired`] per member whose last connection it held, to
    /// one live node).
    pub fn kill(&self, node: NodeId) {
        write(&self.shared.nodes).retain(|n| n.id != node);
        self.shared.expire_node(node);
    }
}

impl StateEngine for MemoryEngine {
    fn node(&self) -> NodeId {
        self.node
    }

    async fn cluster_id(&self) -> EngineResult<Uuid> {
        Ok(self.shared.cluster_id)
    }

    async fn ready(&self) -> bool {
        true
    }

    async fn subscribe_node(&self, _topic: &str) -> EngineResult<()> {
        // Every publication reaches every hub of the cluster synchronously; the hub keeps only
        // the topics it has subscribers for.
        Ok(())
    }

    fn unsubscribe_node(&self, _topic: &str) {}

    async fn publish(
        &self,
        topic: &str,
        frame: Frame,
        except: Option<ConnRef>,
    ) -> EngineResult<()> {
        self.shared.deliver(topic, None, &frame, except, None);
        Ok(())
    }

    async fn append(
        &self,
        topic: &str,
        frame: Frame,
        options: Append,
        reply: Option<Frame>,
    ) -> EngineResult<Appended> {
        self.shared.sweep(false);
        let retention = options.retention;
        let keep = options.keep;
        let size = frame.len();
        options.check_size(size)?;
        // Charged before the log is locked: charging may sweep, and the sweep locks logs. A
        // transient entry is never stored, so it costs nothing.
        let stored_cost = if keep { cost(size) } else { 0 };
        if keep {
            self.shared.charge(stored_cost)?;
        }
        let charged = scopeguard(|| self.shared.uncharge_if(stored_cost));
        let log = self.shared.log(topic);
        let mut slot = lock(&log);
        let now = Instant::now();
        if slot.as_ref().is_some_and(|log| log.expired(now))
            && let Some(old) = slot.take()
        {
            self.shared.free_log(topic.len(), &old);
        }
        let current = slot.as_ref().map_or(0, |log| log.top);
        if let Some(expected) = options.expect_top
            && expected != current
        {
            {
                let top = slot.as_ref().map_or(
                    Position {
                        offset: 0,
                        epoch: 0,
                    },
                    Log::position,
                );
                return Ok(Appended::Conflict(top));
            }
        }
        if slot.is_none() {
            // A log costs its bookkeeping for as long as it exists, even when empty: it keeps
            // its top offset so ids never go back.
            self.shared.charge(cost(topic.len()))?;
        }
        let log = match slot.as_mut() {
            Some(log) => log,
            None => slot.insert(Log {
                epoch: self.shared.new_epoch(),
                top: 0,
                entries: VecDeque::new(),
                bytes: 0,
                last_append: now,
                ttl: retention.ttl,
            }),
        };
        let at_bound = |log: &Log| {
            log.entries.len() >= retention.max_entries
                || log.bytes.saturating_add(size) > retention.max_bytes
        };
        match retention.when_full {
            _ if !keep => {}
            WhenFull::Refuse if at_bound(log) => return Err(EngineError::Full("log is full")),
            WhenFull::Refuse => {}
            WhenFull::TrimOldest => {
                while at_bound(log) {
                    let Some(old) = log.entries.pop_front() else {
                        break;
                    };
                    log.bytes = log.bytes.saturating_sub(old.frame.len());
                    self.shared.uncharge(cost(old.frame.len()));
                }
            }
        }
        charged.defuse();
        log.top = log.top.saturating_add(1);
        log.last_append = now;
        if keep {
            log.bytes = log.bytes.saturating_add(size);
            log.ttl = retention.ttl;
        }
        let offset = log.top;
        let position = log.position();
        if options.publish {
            // Delivered under the log's lock: every node sees this topic's entries in one order.
            self.shared
                .deliver(topic, Some(offset), &frame, options.except, reply.as_ref());
        }
        if keep {
            log.entries.push_back(Entry { offset, frame });
        }
        Ok(Appended::Done(position))
    }

    async fn read(&self, topic: &str, from: ReadFrom, limit: usize) -> EngineResult<Read> {
        // A log that does not exist reads as empty; a position in it cannot be continued.
        let absent = || {
            let empty = Position {
                offset: 0,
                epoch: 0,
            };
            Ok(match from {
                ReadFrom::After(position) if position.offset > 0 => Read::Gone { top: empty },
                _ => Read::Entries {
                    entries: Vec::new(),
                    top: empty,
                },
            })
        };
        let Some(log) = self.shared.existing_log(topic) else {
            return absent();
        };
        let slot = lock(&log);
        let Some(log) = slot.as_ref() else {
            return absent();
        };
        let top = log.position();
        let entries: Vec<Entry> = match from {
            ReadFrom::Latest(n) => {
                let n = n.min(limit);
                let skip = log.entries.len().saturating_sub(n);
                log.entries.iter().skip(skip).cloned().collect()
            }
            ReadFrom::After(position) => {
                let continues = position.offset == 0
                    || (position.epoch == log.epoch
                        && position.offset >= log.trimmed_to()
                        && position.offset <= log.top);
                if !continues {
                    return Ok(Read::Gone { top });
                }
                log.entries
                    .iter()
                    .filter(|entry| entry.offset > position.offset)
                    .take(limit)
                    .cloned()
                    .collect()
            }
        };
        Ok(Read::Entries { entries, top })
    }

    async fn remove(&self, topic: &str, offset: u64) -> EngineResult<bool> {
        let Some(log) = self.shared.existing_log(topic) else {
            return Ok(false);
        };
        let mut slot = lock(&log);
        let Some(log) = slot.as_mut() else {
            return Ok(false);
        };
        let Ok(index) = log
            .entries
            .binary_search_by_key(&offset, |entry| entry.offset)
        else {
            return Ok(false);
        };
        if let Some(entry) = log.entries.remove(index) {
            log.bytes = log.bytes.saturating_sub(entry.frame.len());
            self.shared.uncharge(cost(entry.frame.len()));
        }
        Ok(true)
    }

    async fn drop_log(&self, topic: &str) -> EngineResult<()> {
        let Some(log) = self.shared.existing_log(topic) else {
            return Ok(());
        };
        if let Some(old) = lock(&log).take() {
            self.shared.free_log(topic.len(), &old);
        }
        Ok(())
    }

    async fn presence_join(&self, room: &str, member: &str, conn: ConnRef) -> EngineResult<bool> {
        // Charging under the presence lock is fine: the sweep never touches presence.
        let mut presence = lock(&self.shared.presence);
        let entry = presence.entry(room.to_owned()).or_default();
        let seq = entry.next_seq;
        if let Some((_, conns)) = entry.members.get_mut(member) {
            if !conns.contains(&conn) {
                self.shared
                    .charge(cost(room.len().saturating_add(member.len())))?;
                conns.push(conn);
            }
            return Ok(false);
        }
        if let Err(error) = self
            .shared
            .charge(cost(room.len().saturating_add(member.len())))
        {
            if entry.members.is_empty() {
                presence.remove(room);
            }
            return Err(error);
        }
        entry.members.insert(member.to_owned(), (seq, vec![conn]));
        entry.next_seq = seq.saturating_add(1);
        Ok(true)
    }

    async fn presence_leave(&self, room: &str, member: &str, conn: ConnRef) -> EngineResult<bool> {
        let mut presence = lock(&self.shared.presence);
        let Some(entry) = presence.get_mut(room) else {
            return Ok(false);
        };
        let Some((_, conns)) = entry.members.get_mut(member) else {
            return Ok(false);
        };
        let before = conns.len();
        conns.retain(|c| *c != conn);
        if conns.len() == before {
            return Ok(false);
        }
        self.shared
            .uncharge(cost(room.len().saturating_add(member.len())));
        let last = conns.is_empty();
        if last {
            entry.members.remove(member);
            if entry.members.is_empty() {
                presence.remove(room);
            }
        }
        Ok(last)
    }

    async fn presence_members(&self, room: &str) -> EngineResult<Vec<String>> {
        let presence = lock(&self.shared.presence);
        let Some(entry) = presence.get(room) else {
            return Ok(Vec::new());
        };
        let mut members: Vec<_> = entry
            .members
            .iter()
            .map(|(member, (seq, _))| (*seq, member))
            .collect();
        members.sort_unstable();
        Ok(members.into_iter().map(|(_, m)| m.clone()).collect())
    }

    async fn presence_contains(&self, room: &str, member: &str) -> EngineResult<bool> {
        Ok(lock(&self.shared.presence)
            .get(room)
            .is_some_and(|entry| entry.members.contains_key(member)))
    }

    async fn get(&self, key: &str) -> EngineResult<Option<Versioned>> {
        let now = Instant::now();
        Ok(lock(&self.shared.kv)
            .get(key)
            .filter(|stored| stored.expires_at.is_none_or(|at| at > now))
            .map(|stored| stored.versioned.clone()))
    }

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        expect: Expect,
        ttl: Option<Duration>,
    ) -> EngineResult<Put> {
        self.shared.sweep(false);
        let new_cost = cost(key.len().saturating_add(value.len()));
        // A new key is charged before the map is locked again (charging may sweep the map), so
        // the condition is checked afresh after charging.
        let mut precharged = false;
        let release = |precharged: bool| {
            if precharged {
                self.shared.uncharge(new_cost);
            }
        };
        loop {
            let now = Instant::now();
            let mut kv = lock(&self.shared.kv);
            let current = kv
                .get(key)
                .filter(|stored| stored.expires_at.is_none_or(|at| at > now));
            let matches = match (expect, current) {
                (Expect::Any, _) | (Expect::Absent, None) => true,
                (Expect::Version(version), Some(stored)) => stored.versioned.version == version,
                _ => false,
            };
            if !matches {
                let current = current.map(|stored| stored.versioned.clone());
                drop(kv);
                release(precharged);
                return Ok(Put::Conflict(current));
            }
            let expires_at = ttl.and_then(|ttl| now.checked_add(ttl));
            if let Some(stored) = kv.get_mut(key) {
                // An expired value is replaced like a fresh key, reusing its charge.
                let version = if stored.expires_at.is_none_or(|at| at > now) {
                    stored.versioned.version.saturating_add(1)
                } else {
                    1
                };
                let old_cost = cost(key.len().saturating_add(stored.versioned.value.len()));
                if new_cost > old_cost
                    && self
                        .shared
                        .bytes
                        .try_reserve(new_cost.saturating_sub(old_cost))
                        .is_err()
                {
                    drop(kv);
                    release(precharged);
                    return Err(full());
                }
                if new_cost <= old_cost {
                    self.shared.recharge(old_cost, new_cost);
                }
                stored.versioned = Versioned { version, value };
                stored.expires_at = expires_at;
                drop(kv);
                release(precharged);
                return Ok(Put::Stored(version));
            }
            if precharged {
                kv.insert(
                    key.to_owned(),
                    Stored {
                        versioned: Versioned { version: 1, value },
                        expires_at,
                    },
                );
                return Ok(Put::Stored(1));
            }
            drop(kv);
            self.shared.charge(new_cost)?;
            precharged = true;
        }
    }

    async fn delete(&self, key: &str, expect: Expect) -> EngineResult<bool> {
        Ok(self.take_now(key, expect).is_some())
    }

    async fn take(&self, key: &str, expect: Expect) -> EngineResult<Option<Versioned>> {
        Ok(self.take_now(key, expect))
    }

    async fn add(
        &self,
        key: &str,
        delta: i64,
        min: i64,
        max: i64,
    ) -> EngineResult<Result<i64, i64>> {
        let now = Instant::now();
        let mut precharged = 0usize;
        loop {
            let mut kv = lock(&self.shared.kv);
            let current = match kv
                .get(key)
                .filter(|stored| stored.expires_at.is_none_or(|at| at > now))
            {
                None => 0,
                Some(stored) => std::str::from_utf8(&stored.versioned.value)
                    .ok()
                    .and_then(|text| text.parse::<i64>().ok())
                    .ok_or_else(|| EngineError::Corrupt(format!("{key} is not a counter")))?,
            };
            let Some(next) = current
                .checked_add(delta)
                .filter(|n| (min..=max).contains(n))
            else {
                drop(kv);
                self.shared.uncharge_if(precharged);
                return Ok(Err(current));
            };
            let value = Bytes::from(next.to_string());
            let new_cost = cost(key.len().saturating_add(value.len()));
            if next == 0 {
                if let Some(stored) = kv.remove(key) {
                    self.shared
                        .uncharge(cost(key.len().saturating_add(stored.versioned.value.len())));
                }
                drop(kv);
                self.shared.uncharge_if(precharged);
                return Ok(Ok(0));
            }
            if let Some(stored) = kv.get_mut(key) {
                let old_cost = cost(key.len().saturating_add(stored.versioned.value.len()));
                // A counter's size varies by a few digits: kept, never refused.
                self.shared.recharge(old_cost, new_cost);
                stored.versioned = Versioned {
                    version: stored.versioned.version.saturating_add(1),
                    value,
                };
                stored.expires_at = None;
                drop(kv);
                self.shared.uncharge_if(precharged);
                return Ok(Ok(next));
            }
            if precharged > 0 {
                self.shared.recharge(precharged, new_cost);
                kv.insert(
                    key.to_owned(),
                    Stored {
                        versioned: Versioned { version: 1, value },
                        expires_at: None,
                    },
                );
                return Ok(Ok(next));
            }
            drop(kv);
            self.shared.charge(new_cost)?;
            precharged = new_cost;
        }
    }

    async fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> EngineResult<Vec<(String, Versioned)>> {
        let now = Instant::now();
        let kv = lock(&self.shared.kv);
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded(after.to_owned()),
            _ => Bound::Included(prefix.to_owned()),
        };
        Ok(kv
            .range((start, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .filter(|(_, stored)| stored.expires_at.is_none_or(|at| at > now))
            .take(limit)
            .map(|(key, stored)| (key.clone(), stored.versioned.clone()))
            .collect())
    }

    async fn rate_limit(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> EngineResult<RateDecision> {
        let now = Instant::now();
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        if limit == 0 {
            return Ok(RateDecision::Limited {
                retry_after: window,
            });
        }
        let known = lock(&self.shared.rates).contains_key(key);
        if !known {
            // Charged before the table is locked again: charging may sweep it.
            self.shared.charge(cost(key.len()))?;
        }
        let mut rates = lock(&self.shared.rates);
        if !known {
            if rates.contains_key(key) {
                self.shared.uncharge(cost(key.len()));
            } else {
                rates.insert(key.to_owned(), (window, VecDeque::new()));
            }
        }
        let Some((remembered_window, hits)) = rates.get_mut(key) else {
            return Err(full());
        };
        *remembered_window = window;
        while hits
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= window)
        {
            hits.pop_front();
            self.shared.bytes.release(HIT_BYTES);
        }
        if hits.len() >= limit {
            let retry_after = hits.front().map_or(window, |oldest| {
                window.saturating_sub(now.saturating_duration_since(*oldest))
            });
            return Ok(RateDecision::Limited { retry_after });
        }
        // Each remembered hit costs a few bytes; the window holds at most `limit` of them.
        self.shared.bytes.force_reserve(HIT_BYTES);
        hits.push_back(now);
        Ok(RateDecision::Allowed)
    }

    async fn next_event(&self) -> Option<EngineEvent> {
        loop {
            let notified = self.events.ready.notified();
            if let Some(event) = lock(&self.events.queue).pop_front() {
                return Some(event);
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Retention;

    fn engine(max_items: usize, max_bytes: usize) -> MemoryEngine {
        MemoryEngine::single(MemoryLimits {
            max_items,
            max_bytes,
        })
        .0
    }

    const LOG: Retention = Retention::trim(1000, 1 << 20);

    #[tokio::test]
    async fn a_full_engine_refuses_new_state_and_keeps_what_it_has() {
        // Three entries and the log itself.
        let engine = engine(4, 1 << 20);
        for text in ["a", "b", "c"] {
            engine
                .append("t", Frame::text(text), Append::store(LOG), None)
                .await
                .unwrap();
        }
        assert_eq!(
            engine
                .append("t", Frame::text("d"), Append::store(LOG), None)
                .await,
            Err(full())
        );
        assert_eq!(
            engine
                .put("k", Bytes::from_static(b"v"), Expect::Any, None)
                .await,
            Err(full())
        );
        match engine.read("t", ReadFrom::Latest(10), 10).await.unwrap() {
            Read::Entries { entries, .. } => assert_eq!(entries.len(), 3),
            Read::Gone { .. } => panic!("gone"),
        }
    }

    #[tokio::test]
    async fn every_byte_comes_back_when_state_goes() {
        let engine = engine(1000, 1 << 20);
        engine
            .append("t", Frame::text("hello"), Append::store(LOG), None)
            .await
            .unwrap();
        engine
            .put("k", Bytes::from_static(b"value"), Expect::Any, None)
            .await
            .unwrap();
        engine
            .put(
                "k",
                Bytes::from_static(b"a longer value"),
                Expect::Any,
                None,
            )
            .await
            .unwrap();
        let conn = ConnRef {
            node: engine.node,
            conn: crate::ConnId::next(),
        };
        engine.presence_join("room", "m", conn).await.unwrap();
        engine
            .rate_limit("r", 5, Duration::from_secs(60))
            .await
            .unwrap();
        assert!(engine.bytes_used() > 0);
        engine.drop_log("t").await.unwrap();
        engine.delete("k", Expect::Any).await.unwrap();
        engine.presence_leave("room", "m", conn).await.unwrap();
        // The rate window empties once its hits age out.
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(61)).await;
        engine.shared.sweep(true);
        assert_eq!(engine.bytes_used(), 0);
        assert_eq!(engine.shared.items.used(), 0);
    }

    #[tokio::test]
    async fn a_trimming_log_gives_back_what_it_trims() {
        let engine = engine(1000, 1 << 20);
        let small = Retention::trim(2, 1 << 20);
        for text in ["one", "two", "three", "four"] {
            engine
                .append("t", Frame::text(text), Append::store(small), None)
                .await
                .unwrap();
        }
        // Two entries and the log's own bookkeeping.
        assert_eq!(engine.shared.items.used(), 3);
        assert_eq!(engine.bytes_used(), cost(5) + cost(4) + cost(1));
    }

    #[tokio::test]
    async fn a_held_subscriber_that_falls_too_far_behind_is_closed() {
        let (engine, hub) = MemoryEngine::single(MemoryLimits::default());
        let engine = Engine::new(engine, hub);
        let (peer, _link) = crate::peer_channel(([127, 0, 0, 1], 1).into(), 8);
        let joining = engine
            .join("t", &peer, ReadFrom::Latest(0), 0)
            .await
            .unwrap();
        let big = Frame::text("x".repeat(64 * 1024));
        for _ in 0..100 {
            engine.publish("t", big.clone(), None).await.unwrap();
        }
        assert!(peer.is_closing(), "held publications are bounded in bytes");
        drop(joining);
    }
}
