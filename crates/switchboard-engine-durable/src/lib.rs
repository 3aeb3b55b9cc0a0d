//! The durable embedded state engine: one Switchboard node whose state survives a restart, a
//! crash or `SIGKILL`.
//!
//! [`DurableEngine`] implements [`StateEngine`] over a data directory holding a
//! [redb](https://docs.rs/redb) database (pure Rust, copy-on-write B-trees with checksummed
//! commits, one `fsync` per committed transaction).
//!
//! ## What is durable
//! Logs (entries, offsets, epochs, retention state), keyed state (values, versions, expiries),
//! idempotency records (keyed state under `idem:`), and the cluster id. Presence, subscriptions
//! and rate-limit windows belong to live connections and this process: they are kept in memory
//! (by a composed [`MemoryEngine`]) and start empty after a restart.
//!
//! ## Acknowledge only what is durable
//! Every mutating operation goes to one writer thread, which takes the operations queued at the
//! time as a batch, commits them in one redb write transaction with `Immediate` durability (one
//! `fsync` per batch: group commit), and only then resolves each caller's future and delivers
//! the batch's logged publications to the node's [`Hub`] in log order. Reads are answered from
//! an in-memory view holding exactly the last committed state, so they never wait for the
//! writer and never see a write that could still be lost.
//!
//! ## When the disk fails
//! A failed commit (disk full, IO error) refuses every operation of its batch with
//! [`EngineError::Unavailable`], logs an error, and reloads the state from the store's last
//! commit; the process keeps running. See `docs/durability.md` for the operator's view.

mod state;
mod store;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use switchboard_core::Frame;
use switchboard_core::engine::{
    Append, Appended, ConnRef, Engine, EngineError, EngineEvent, EngineResult, Expect, Hub,
    MemoryEngine, MemoryLimits, NodeId, Put, RateDecision, Read, ReadFrom, StateEngine, Versioned,
};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::writer::{Op, Outcome, Request, Shared, Writer, now_ms};

pub use crate::store::{FORMAT_FILE, FORMAT_VERSION, STORE_FILE};

/// Operations waiting for the writer at most; further callers wait for room (backpressure).
const QUEUE: usize = 4096;

/// Bounds of a durable engine over what it stores (log entries, logs, keys), in items and in
/// bytes (payloads plus a fixed overhead per item), like [`MemoryLimits`]. Over either, new
/// state is refused with [`EngineError::Full`] after expired state is deleted. The same bounds
/// apply, separately, to what it keeps in memory only (presence and rate-limit windows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurableLimits {
    /// Most items stored.
    pub max_items: usize,
    /// Most bytes stored.
    pub max_bytes: usize,
}

impl Default for DurableLimits {
    fn default() -> Self {
        let memory = MemoryLimits::default();
        Self {
            max_items: memory.max_items,
            max_bytes: memory.max_bytes,
        }
    }
}

/// Why a data directory could not be opened. Nothing is ever wiped to get past one of these.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The directory cannot be created or read.
    #[error("data directory {}: {source}", path.display())]
    Io {
        /// The data directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// Another process (or another engine in this one) has the directory open.
    #[error("data directory {} is in use by another process", path.display())]
    Locked {
        /// The data directory.
        path: PathBuf,
    },
    /// The directory was written by a newer version of this engine.
    #[error(
        "data directory {} has format version {found}; this build reads format {supported} and older",
        path.display()
    )]
    NewerFormat {
        /// The data directory.
        path: PathBuf,
        /// The format found.
        found: u64,
        /// The newest format this build reads.
        supported: u64,
    },
    /// The stored state is damaged (a torn or altered file, a missing store).
    #[error("data directory {} is corrupt: {detail}", path.display())]
    Corrupt {
        /// The data directory.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// The durable embedded [`StateEngine`]: logs, keyed state and idempotency records in a data
/// directory, presence and rate limits in memory. One node; see the crate docs.
#[derive(Debug)]
pub struct DurableEngine {
    node: NodeId,
    cluster_id: Uuid,
    dir: PathBuf,
    /// Presence, rate limits, ephemeral publications and engine events: everything that is
    /// about live connections, delegated to an in-memory engine sharing this node's hub.
    live: MemoryEngine,
    shared: Arc<Shared>,
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

impl DurableEngine {
    /// Opens (creating it if needed) the data directory `dir` and starts the writer. Returns
    /// the engine and the hub it delivers to (give both to [`Engine::new`]).
    ///
    /// Fails, without changing anything on disk, if the directory is unusable, locked by
    /// another process, corrupt, or from a newer format.
    pub fn open(
        dir: impl AsRef<Path>,
        limits: DurableLimits,
    ) -> Result<(Self, Arc<Hub>), OpenError> {
        let dir = dir.as_ref().to_path_buf();
        let (store, loaded) = store::Store::open(&dir)?;
        let (live, hub) = MemoryEngine::single(MemoryLimits {
            max_items: limits.max_items,
            max_bytes: limits.max_bytes,
        });
        let shared = Arc::new(Shared {
            view: RwLock::new(loaded.state.clone()),
            ready: AtomicBool::new(true),
            commits: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        });
        let writer = Writer {
            dir: dir.clone(),
            store: Some(store),
            work: loaded.state,
            shared: shared.clone(),
            hub: hub.clone(),
            limits,
            // The first batch sweeps what expired while the node was down.
            last_sweep_ms: 0,
        };
        let (requests, receiver) = mpsc::channel(QUEUE);
        let writer = std::thread::Builder::new()
            .name("durable-engine-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|source| OpenError::Io {
                path: dir.clone(),
                source,
            })?;
        tracing::info!(
            dir = %dir.display(),
            cluster_id = %loaded.cluster_id,
            "durable engine opened"
        );
        Ok((
            Self {
                node: StateEngine::node(&live),
                cluster_id: loaded.cluster_id,
                dir,
                live,
                shared,
                requests: Some(requests),
                writer: Some(writer),
            },
            hub,
        ))
    }

    /// Opens `dir` (see [`DurableEngine::open`]) and wraps the engine in the [`Engine`] handle
    /// the runtime takes.
    pub fn engine(dir: impl AsRef<Path>, limits: DurableLimits) -> Result<Engine, OpenError> {
        let (engine, hub) = Self::open(dir, limits)?;
        Ok(Engine::new(engine, hub))
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Items stored now (logs, entries, keys), as charged against [`DurableLimits::max_items`].
    pub fn items_used(&self) -> usize {
        self.shared.view().items()
    }

    /// Bytes stored now, as charged against [`DurableLimits::max_bytes`].
    pub fn bytes_used(&self) -> usize {
        self.shared.view().bytes()
    }

    /// Durable commits made since the engine opened: one per batch of concurrent writes, each
    /// one `fsync`.
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Relaxed)
    }

    /// Write operations committed since the engine opened (over [`DurableEngine::commits`]:
    /// the average group-commit batch).
    pub fn writes(&self) -> u64 {
        self.shared.writes.load(Ordering::Relaxed)
    }

    /// Hands `op` to the writer and waits until it is durable (or refused).
    async fn write(&self, op: Op) -> EngineResult<Outcome> {
        let (answer, answered) = oneshot::channel();
        let gone = || EngineError::Unavailable("durable engine is shut down".into());
        let requests = self.requests.as_ref().ok_or_else(gone)?;
        requests
            .send(Request { op, answer })
            .await
            .map_err(|_| gone())?;
        answered.await.map_err(|_| gone())?
    }
}

impl Drop for DurableEngine {
    /// Stops the writer after the operations already queued and waits for it to close the
    /// store, so the directory can be opened again as soon as the engine is gone.
    fn drop(&mut self) {
        drop(self.requests.take());
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(dir = %self.dir.display(), "durable engine writer panicked");
        }
    }
}

fn mismatch() -> EngineError {
    EngineError::Unavailable("durable engine answered the wrong operation".into())
}

impl StateEngine for DurableEngine {
    fn node(&self) -> NodeId {
        self.node
    }

    async fn cluster_id(&self) -> EngineResult<Uuid> {
        Ok(self.cluster_id)
    }

    async fn ready(&self) -> bool {
        self.shared.ready.load(Ordering::Relaxed)
            && self.requests.as_ref().is_some_and(|r| !r.is_closed())
    }

    async fn subscribe_node(&self, _topic: &str) -> EngineResult<()> {
        // One node: every publication is delivered to this node's hub, which keeps only the
        // topics it has subscribers for.
        Ok(())
    }

    fn unsubscribe_node(&self, _topic: &str) {}

    async fn publish(
        &self,
        topic: &str,
        frame: Frame,
        except: Option<ConnRef>,
    ) -> EngineResult<()> {
        // Ephemeral: nothing to make durable, delivered at once.
        StateEngine::publish(&self.live, topic, frame, except).await
    }

    async fn append(
        &self,
        topic: &str,
        frame: Frame,
        options: Append,
        reply: Option<Frame>,
    ) -> EngineResult<Appended> {
        match self
            .write(Op::Append {
                topic: topic.to_owned(),
                frame,
                options,
                reply,
            })
            .await?
        {
            Outcome::Appended(appended) => Ok(appended),
            _ => Err(mismatch()),
        }
    }

    async fn read(&self, topic: &str, from: ReadFrom, limit: usize) -> EngineResult<Read> {
        Ok(self.shared.view().read(now_ms(), topic, from, limit))
    }

    async fn remove(&self, topic: &str, offset: u64) -> EngineResult<bool> {
        match self
            .write(Op::Remove {
                topic: topic.to_owned(),
                offset,
            })
            .await?
        {
            Outcome::Removed(removed) => Ok(removed),
            _ => Err(mismatch()),
        }
    }

    async fn drop_log(&self, topic: &str) -> EngineResult<()> {
        match self
            .write(Op::DropLog {
                topic: topic.to_owned(),
            })
            .await?
        {
            Outcome::Dropped => Ok(()),
            _ => Err(mismatch()),
        }
    }

    async fn presence_join(&self, room: &str, member: &str, conn: ConnRef) -> EngineResult<bool> {
        StateEngine::presence_join(&self.live, room, member, conn).await
    }

    async fn presence_leave(&self, room: &str, member: &str, conn: ConnRef) -> EngineResult<bool> {
        StateEngine::presence_leave(&self.live, room, member, conn).await
    }

    async fn presence_members(&self, room: &str) -> EngineResult<Vec<String>> {
        StateEngine::presence_members(&self.live, room).await
    }

    async fn presence_contains(&self, room: &str, member: &str) -> EngineResult<bool> {
        StateEngine::presence_contains(&self.live, room, member).await
    }

    async fn get(&self, key: &str) -> EngineResult<Option<Versioned>> {
        Ok(self.shared.view().get(now_ms(), key))
    }

    async fn put(
        &self,
        key: &str,
        value: Bytes,
        expect: Expect,
        ttl: Option<Duration>,
    ) -> EngineResult<Put> {
        match self
            .write(Op::Put {
                key: key.to_owned(),
                value,
                expect,
                ttl,
            })
            .await?
        {
            Outcome::Put(put) => Ok(put),
            _ => Err(mismatch()),
        }
    }

    async fn delete(&self, key: &str, expect: Expect) -> EngineResult<bool> {
        // A delete is a take whose value is dropped (an expired value is deleted and reported
        // as absent, as in the memory engine).
        match self
            .write(Op::Take {
                key: key.to_owned(),
                expect,
            })
            .await?
        {
            Outcome::Taken(taken) => Ok(taken.is_some()),
            _ => Err(mismatch()),
        }
    }

    async fn take(&self, key: &str, expect: Expect) -> EngineResult<Option<Versioned>> {
        match self
            .write(Op::Take {
                key: key.to_owned(),
                expect,
            })
            .await?
        {
            Outcome::Taken(taken) => Ok(taken),
            _ => Err(mismatch()),
        }
    }

    async fn add(
        &self,
        key: &str,
        delta: i64,
        min: i64,
        max: i64,
    ) -> EngineResult<Result<i64, i64>> {
        match self
            .write(Op::Add {
                key: key.to_owned(),
                delta,
                min,
                max,
            })
            .await?
        {
            Outcome::Added(added) => Ok(added),
            _ => Err(mismatch()),
        }
    }

    async fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> EngineResult<Vec<(String, Versioned)>> {
        Ok(self.shared.view().scan(now_ms(), prefix, after, limit))
    }

    async fn rate_limit(
        &self,
        key: &str,
        limit: u32,
        window: Duration,
    ) -> EngineResult<RateDecision> {
        // Memory only: a window protects this process now; after a restart it starts empty.
        StateEngine::rate_limit(&self.live, key, limit, window).await
    }

    async fn next_event(&self) -> Option<EngineEvent> {
        StateEngine::next_event(&self.live).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic, reason = "tests fail by panicking")]

    use switchboard_core::engine::{Retention, WhenFull};

    use super::*;
    use crate::store::fault::fail_writes;

    struct TempDir(PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir(name: &str) -> TempDir {
        TempDir(std::env::temp_dir().join(format!(
            "switchboard-durable-unit-{name}-{}-{}",
            std::process::id(),
            now_ms()
        )))
    }

    const LOG: Retention = Retention {
        max_entries: 1000,
        max_bytes: 1 << 20,
        ttl: None,
        when_full: WhenFull::TrimOldest,
    };

    fn offsets(read: Read) -> Vec<(u64, String)> {
        match read {
            Read::Entries { entries, .. } => entries
                .into_iter()
                .map(|e| (e.offset, e.frame.as_str().to_owned()))
                .collect(),
            Read::Gone { top } => panic!("gone at {top:?}"),
        }
    }

    /// A disk that fails (full, broken) refuses the batch with `Unavailable`, keeps serving
    /// reads of the last committed state, and works again once the disk does; nothing refused
    /// ever appears.
    #[tokio::test]
    async fn a_failed_commit_refuses_its_batch_and_the_engine_recovers() {
        let dir = temp_dir("fault");
        let (engine, hub) = DurableEngine::open(&dir.0, DurableLimits::default()).unwrap();
        let engine = Engine::new(engine, hub);
        engine
            .append("t", Frame::text("a"), Append::store(LOG))
            .await
            .unwrap();
        fail_writes(&dir.0, true);
        let refused = engine
            .append("t", Frame::text("b"), Append::store(LOG))
            .await;
        assert!(
            matches!(refused, Err(EngineError::Unavailable(_))),
            "{refused:?}"
        );
        let refused = engine
            .put("k", Bytes::from_static(b"v"), Expect::Any, None)
            .await;
        assert!(
            matches!(refused, Err(EngineError::Unavailable(_))),
            "{refused:?}"
        );
        assert!(!engine.ready().await, "not ready while the disk fails");
        assert_eq!(
            offsets(engine.read("t", ReadFrom::Latest(10), 10).await.unwrap()),
            [(1, "a".to_owned())],
            "reads still answer the last committed state"
        );
        fail_writes(&dir.0, false);
        let appended = engine
            .append("t", Frame::text("c"), Append::store(LOG))
            .await
            .unwrap();
        assert!(
            matches!(appended, Appended::Done(p) if p.offset == 2),
            "the refused append took no offset: {appended:?}"
        );
        assert!(engine.ready().await);
        assert_eq!(engine.get("k").await.unwrap(), None);
        drop(engine);
        let (engine, _hub) = DurableEngine::open(&dir.0, DurableLimits::default()).unwrap();
        assert_eq!(
            offsets(engine.read("t", ReadFrom::Latest(10), 10).await.unwrap()),
            [(1, "a".to_owned()), (2, "c".to_owned())]
        );
    }

    /// Concurrent writers share commits: far fewer fsyncs than writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_one_commit_per_batch() {
        let dir = temp_dir("group");
        let (engine, hub) = DurableEngine::open(&dir.0, DurableLimits::default()).unwrap();
        let engine = Arc::new(engine);
        let before = engine.commits();
        let writers: Vec<_> = (0..200)
            .map(|i| {
                let engine = engine.clone();
                tokio::spawn(async move {
                    engine
                        .append("t", Frame::text(i.to_string()), Append::store(LOG), None)
                        .await
                        .unwrap()
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        let commits = engine.commits() - before;
        assert!(
            commits < 100,
            "{commits} commits for 200 concurrent appends"
        );
        drop(hub);
    }
}
