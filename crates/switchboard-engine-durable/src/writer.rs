//! The one writer: batches of mutating operations, one durable commit per batch.
//!
//! The writer is a dedicated OS thread, not a task: a commit waits for `fsync`, which must not
//! hold up a runtime worker. Callers queue [`Request`]s on a bounded channel and await their
//! answer. The writer takes whatever has queued up (at most [`MAX_BATCH`]), decides every
//! operation against its working state, commits all their mutations in one redb transaction
//! (durability `Immediate`: one `fsync` for the whole batch, so throughput holds under
//! concurrency), then applies them to the readers' view, delivers the batch's logged
//! publications in log order and answers every caller. Nothing is acknowledged or delivered
//! before it is on disk.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use switchboard_core::Frame;
use switchboard_core::engine::{
    Append, Appended, EngineError, EngineResult, Expect, Hub, Put, Versioned,
};
use tokio::sync::{mpsc, oneshot};

use crate::DurableLimits;
use crate::state::{Mutation, Publication, State};
use crate::store::{CommitError, Store};

/// Most operations committed together.
pub(crate) const MAX_BATCH: usize = 1024;
/// Expired keys and logs are deleted at most this often (and whenever a limit is reached).
const SWEEP_EVERY_MS: u64 = 1000;

/// Wall-clock milliseconds since the Unix epoch: expiries must mean the same after a restart.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, crate::state::millis)
}

/// A mutating operation.
#[derive(Debug)]
pub(crate) enum Op {
    Append {
        topic: String,
        frame: Frame,
        options: Append,
        reply: Option<Frame>,
    },
    Remove {
        topic: String,
        offset: u64,
    },
    DropLog {
        topic: String,
    },
    Put {
        key: String,
        value: Bytes,
        expect: Expect,
        ttl: Option<Duration>,
    },
    Take {
        key: String,
        expect: Expect,
    },
    Add {
        key: String,
        delta: i64,
        min: i64,
        max: i64,
    },
}

/// The answer to an [`Op`].
#[derive(Debug)]
pub(crate) enum Outcome {
    Appended(Appended),
    Removed(bool),
    Dropped,
    Put(Put),
    Taken(Option<Versioned>),
    Added(Result<i64, i64>),
}

/// An operation and where its answer goes.
#[derive(Debug)]
pub(crate) struct Request {
    pub(crate) op: Op,
    pub(crate) answer: oneshot::Sender<EngineResult<Outcome>>,
}

/// What the writer shares with readers.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Exactly the last committed state.
    pub(crate) view: RwLock<State>,
    /// Whether the store accepts commits (false after a failure it could not recover from).
    pub(crate) ready: AtomicBool,
    /// Batches committed (each one `fsync`), for reports and the group-commit test.
    pub(crate) commits: AtomicU64,
    /// Write operations those batches held (writes per commit = the group-commit batch size).
    pub(crate) writes: AtomicU64,
}

impl Shared {
    pub(crate) fn view(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.view.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn view_mut(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.view.write().unwrap_or_else(PoisonError::into_inner)
    }
}

fn unavailable(why: &str) -> EngineError {
    EngineError::Unavailable(format!("durable engine: {why}"))
}

/// The writer's own state of affairs.
pub(crate) struct Writer {
    pub(crate) dir: PathBuf,
    pub(crate) store: Option<Store>,
    pub(crate) work: State,
    pub(crate) shared: Arc<Shared>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) limits: DurableLimits,
    pub(crate) last_sweep_ms: u64,
}

impl Writer {
    /// Serves requests until every sender is gone, then closes the store.
    pub(crate) fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        while let Some(first) = requests.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.serve(batch);
        }
        // What group commit achieved over the node's life: operators (and `cargo xtask bench`)
        // read the batch size here.
        let commits = self.shared.commits.load(Ordering::Relaxed);
        let writes = self.shared.writes.load(Ordering::Relaxed);
        tracing::info!(
            dir = %self.dir.display(),
            commits,
            writes,
            writes_per_commit = format!("{:.1}", writes as f64 / commits.max(1) as f64),
            "durable engine writer stopped"
        );
    }

    fn serve(&mut self, batch: Vec<Request>) {
        if self.store.is_none() && !self.recover() {
            for request in batch {
                let _ = request
                    .answer
                    .send(Err(unavailable("the store cannot be written")));
            }
            return;
        }
        let now = now_ms();
        let mut mutations = Vec::new();
        if now.saturating_sub(self.last_sweep_ms) >= SWEEP_EVERY_MS {
            self.work.sweep(now, &mut mutations);
            self.last_sweep_ms = now;
        }
        let mut answers = Vec::with_capacity(batch.len());
        let mut publications = Vec::new();
        for request in batch {
            let outcome = self.execute(now, request.op, &mut mutations, &mut publications);
            answers.push((request.answer, outcome));
        }
        if !mutations.is_empty() {
            if let Err(error) = self.commit(&mutations) {
                tracing::error!(
                    dir = %self.dir.display(),
                    %error,
                    operations = answers.len(),
                    "durable engine: commit failed; the batch is refused and the state reloaded \
                     from the last commit"
                );
                self.work = self.shared.view().clone();
                self.store = None;
                self.recover();
                for (answer, _) in answers {
                    let _ = answer.send(Err(unavailable("the write could not be made durable")));
                }
                return;
            }
            self.shared.commits.fetch_add(1, Ordering::Relaxed);
            self.shared
                .writes
                .fetch_add(answers.len() as u64, Ordering::Relaxed);
            let mut view = self.shared.view_mut();
            for mutation in &mutations {
                view.apply(mutation);
            }
        }
        // Only now, with the batch on disk and in the readers' view, does anyone hear of it.
        for publication in publications {
            self.hub.deliver(
                &publication.topic,
                Some(publication.offset),
                &publication.frame,
                publication.except,
                publication.reply.as_ref(),
            );
        }
        for (answer, outcome) in answers {
            let _ = answer.send(outcome);
        }
    }

    fn commit(&self, mutations: &[Mutation]) -> Result<(), CommitError> {
        let Some(store) = self.store.as_ref() else {
            return Err(CommitError::new("the store is closed"));
        };
        // redb reports failures as errors; a panic in it must not take the writer down.
        catch_unwind(AssertUnwindSafe(|| store.commit(mutations)))
            .unwrap_or_else(|_| Err(CommitError::new("the store panicked while committing")))
    }

    /// Reopens the store and reloads both states from what it last committed; whether the
    /// store is usable again.
    fn recover(&mut self) -> bool {
        match Store::open(&self.dir) {
            Ok((store, loaded)) => {
                *self.shared.view_mut() = loaded.state.clone();
                self.work = loaded.state;
                self.store = Some(store);
                self.shared.ready.store(true, Ordering::Relaxed);
                tracing::info!(dir = %self.dir.display(), "durable engine: store reopened");
                true
            }
            Err(error) => {
                self.shared.ready.store(false, Ordering::Relaxed);
                tracing::error!(
                    dir = %self.dir.display(),
                    %error,
                    "durable engine: the store cannot be reopened; writes are refused"
                );
                false
            }
        }
    }

    fn execute(
        &mut self,
        now: u64,
        op: Op,
        mutations: &mut Vec<Mutation>,
        publications: &mut Vec<Publication>,
    ) -> EngineResult<Outcome> {
        let limits = self.limits;
        let work = &mut self.work;
        Ok(match op {
            Op::Append {
                topic,
                frame,
                options,
                reply,
            } => {
                let (appended, publication) =
                    work.append(limits, now, &topic, frame, options, reply, mutations)?;
                publications.extend(publication);
                Outcome::Appended(appended)
            }
            Op::Remove { topic, offset } => {
                Outcome::Removed(work.remove(&topic, offset, mutations))
            }
            Op::DropLog { topic } => {
                work.drop_log(&topic, mutations);
                Outcome::Dropped
            }
            Op::Put {
                key,
                value,
                expect,
                ttl,
            } => Outcome::Put(work.put(limits, now, &key, value, expect, ttl, mutations)?),
            Op::Take { key, expect } => Outcome::Taken(work.take(now, &key, expect, mutations)),
            Op::Add {
                key,
                delta,
                min,
                max,
            } => Outcome::Added(work.add(limits, now, &key, delta, min, max, mutations)?),
        })
    }
}
