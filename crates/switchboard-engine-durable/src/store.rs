//! The on-disk half: the data directory, the redb file, loading it and committing batches.
//!
//! Layout of a data directory:
//! - `FORMAT`: one line naming the format version, written once after the store's first
//!   commit (a directory without it holds no acknowledged state yet);
//! - `state.redb`: the redb database, whose tables are `meta` (format version, cluster id,
//!   next epoch), `logs` (per topic: epoch, top offset, last append, time-to-live), `entries`
//!   (per topic and offset: the frame) and `kv` (per key: version, expiry, value).

use std::fs;
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, StorageError,
    TableDefinition,
};
use switchboard_core::Frame;
use uuid::Uuid;

use crate::OpenError;
use crate::state::{LogMeta, Mutation, State, Stored};

/// The data directory format this build writes and reads (older ones would be migrated at open).
pub const FORMAT_VERSION: u64 = 1;
/// The marker file in a data directory naming its format, e.g.
/// `switchboard durable engine format 1`.
pub const FORMAT_FILE: &str = "FORMAT";
/// The redb database file in a data directory.
pub const STORE_FILE: &str = "state.redb";
const FORMAT_PREFIX: &str = "switchboard durable engine format ";
/// redb's page cache: the engine keeps its own index in memory and reads the file only when it
/// opens, so a small cache is enough.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
const LOGS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("logs");
const ENTRIES: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("entries");
const KV: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("kv");

const META_FORMAT: &str = "format";
const META_CLUSTER: &str = "cluster_id";
const META_NEXT_EPOCH: &str = "next_epoch";

/// "No time-to-live / no expiry" on disk.
const NONE: u64 = u64::MAX;

/// Why a commit failed (the batch is answered with `EngineError::Unavailable`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct CommitError(String);

impl CommitError {
    pub(crate) fn new(why: &str) -> Self {
        Self(why.to_owned())
    }
}

fn commit_error(error: impl std::fmt::Display) -> CommitError {
    CommitError(error.to_string())
}

/// An open store: the database and where it lives.
#[derive(Debug)]
pub(crate) struct Store {
    pub(crate) dir: PathBuf,
    db: Database,
}

/// What the store held when it was opened.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub(crate) state: State,
    pub(crate) cluster_id: Uuid,
}

fn corrupt(dir: &Path, detail: impl std::fmt::Display) -> OpenError {
    OpenError::Corrupt {
        path: dir.to_path_buf(),
        detail: detail.to_string(),
    }
}

fn io(dir: &Path, source: std::io::Error) -> OpenError {
    OpenError::Io {
        path: dir.to_path_buf(),
        source,
    }
}

fn u64_at(bytes: &[u8], index: usize) -> Option<u64> {
    let start = index.checked_mul(8)?;
    let chunk = bytes.get(start..start.checked_add(8)?)?;
    Some(u64::from_le_bytes(chunk.try_into().ok()?))
}

fn encode_log(meta: &LogMeta) -> [u8; 32] {
    let mut out = [0u8; 32];
    let fields = [
        meta.epoch,
        meta.top,
        meta.last_append_ms,
        meta.ttl_ms.unwrap_or(NONE),
    ];
    for (chunk, field) in out.chunks_exact_mut(8).zip(fields) {
        chunk.copy_from_slice(&field.to_le_bytes());
    }
    out
}

fn decode_log(bytes: &[u8]) -> Option<LogMeta> {
    if bytes.len() != 32 {
        return None;
    }
    let ttl = u64_at(bytes, 3)?;
    Some(LogMeta {
        epoch: u64_at(bytes, 0)?,
        top: u64_at(bytes, 1)?,
        last_append_ms: u64_at(bytes, 2)?,
        ttl_ms: (ttl != NONE).then_some(ttl),
    })
}

fn encode_kv(stored: &Stored) -> Vec<u8> {
    let mut out = Vec::with_capacity(stored.value.len().saturating_add(16));
    out.extend_from_slice(&stored.version.to_le_bytes());
    out.extend_from_slice(&stored.expires_ms.unwrap_or(NONE).to_le_bytes());
    out.extend_from_slice(&stored.value);
    out
}

fn decode_kv(bytes: &[u8]) -> Option<Stored> {
    let expires = u64_at(bytes, 1)?;
    Some(Stored {
        version: u64_at(bytes, 0)?,
        expires_ms: (expires != NONE).then_some(expires),
        value: Bytes::copy_from_slice(bytes.get(16..)?),
    })
}

/// Reads the `FORMAT` marker: `Some(version)` when present.
fn read_format(dir: &Path) -> Result<Option<u64>, OpenError> {
    let path = dir.join(FORMAT_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io(dir, error)),
    };
    text.trim()
        .strip_prefix(FORMAT_PREFIX)
        .and_then(|version| version.parse().ok())
        .map(Some)
        .ok_or_else(|| {
            corrupt(
                dir,
                format!("{FORMAT_FILE} does not name a format: {text:?}"),
            )
        })
}

/// Writes the `FORMAT` marker durably (a temporary file renamed into place, then the
/// directory synced).
fn write_format(dir: &Path) -> Result<(), OpenError> {
    let temporary = dir.join(format!("{FORMAT_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut file = fs::File::create(&temporary)?;
        writeln!(file, "{FORMAT_PREFIX}{FORMAT_VERSION}")?;
        file.sync_all()?;
        fs::rename(&temporary, dir.join(FORMAT_FILE))?;
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(|error| io(dir, error))
}

fn open_database(dir: &Path) -> Result<Database, OpenError> {
    let path = dir.join(STORE_FILE);
    let mut builder = Database::builder();
    // Verify every page's checksum at open: a damaged file is refused instead of trusted.
    builder
        .set_cache_size(CACHE_BYTES)
        .set_check_integrity_on_open(true);
    // redb reports damage as errors, but some checks on a file altered behind its back panic in
    // debug builds; either way the answer is the same clean refusal.
    #[cfg(not(test))]
    let create = || builder.create(&path);
    // Unit tests put a backend between redb and the file that can be made to fail.
    #[cfg(test)]
    let create = || {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        builder.create_with_backend(fault::Faulty(
            redb::backends::FileBackend::new(file)?,
            dir.to_path_buf(),
        ))
    };
    let opened = catch_unwind(AssertUnwindSafe(create))
        .map_err(|_| corrupt(dir, format!("{STORE_FILE} could not be read")))?;
    opened.map_err(|error| match error {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            OpenError::Locked {
                path: dir.to_path_buf(),
            }
        }
        DatabaseError::UpgradeRequired(version) => corrupt(
            dir,
            format!("{STORE_FILE} is in an old redb file format ({version})"),
        ),
        // redb reads a file that is not (or no longer) a database as "invalid data".
        DatabaseError::Storage(StorageError::Io(source))
            if matches!(
                source.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            corrupt(dir, source)
        }
        DatabaseError::Storage(StorageError::Io(source)) => io(dir, source),
        other => corrupt(dir, other),
    })
}

impl Store {
    /// Opens (creating if needed) the store in `dir` and loads it.
    pub(crate) fn open(dir: &Path) -> Result<(Self, Loaded), OpenError> {
        if dir.exists() && !dir.is_dir() {
            return Err(io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            ));
        }
        fs::create_dir_all(dir).map_err(|error| io(dir, error))?;
        let marked = read_format(dir)?;
        if let Some(found) = marked
            && found > FORMAT_VERSION
        {
            return Err(OpenError::NewerFormat {
                path: dir.to_path_buf(),
                found,
                supported: FORMAT_VERSION,
            });
        }
        let file = dir.join(STORE_FILE);
        let file_len = fs::metadata(&file).map(|m| m.len()).ok();
        if marked.is_some() && file_len.is_none_or(|len| len == 0) {
            // The marker says state was committed here: a missing or empty store is damage,
            // never a reason to start over silently.
            return Err(corrupt(
                dir,
                format!(
                    "{STORE_FILE} is missing or empty, yet {FORMAT_FILE} says state was stored"
                ),
            ));
        }
        let db = open_database(dir)?;
        let store = Self {
            dir: dir.to_path_buf(),
            db,
        };
        let loaded = match store.load()? {
            Some(loaded) => loaded,
            None if marked.is_some() => {
                return Err(corrupt(dir, "the store has no format record"));
            }
            None => store.initialize()?,
        };
        if marked.is_none() {
            write_format(dir)?;
        }
        Ok((store, loaded))
    }

    /// A fresh store: a new cluster id, epochs from 1.
    fn initialize(&self) -> Result<Loaded, OpenError> {
        let cluster_id = Uuid::new_v4();
        let dir = &self.dir;
        let write = || -> Result<(), CommitError> {
            let mut txn = self.db.begin_write().map_err(commit_error)?;
            txn.set_durability(Durability::Immediate)
                .map_err(commit_error)?;
            {
                let mut meta = txn.open_table(META).map_err(commit_error)?;
                meta.insert(META_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())
                    .map_err(commit_error)?;
                meta.insert(META_CLUSTER, cluster_id.as_bytes().as_slice())
                    .map_err(commit_error)?;
                meta.insert(META_NEXT_EPOCH, 1u64.to_le_bytes().as_slice())
                    .map_err(commit_error)?;
                // The other tables exist from the start, so a reader never misses one.
                txn.open_table(LOGS).map_err(commit_error)?;
                txn.open_table(ENTRIES).map_err(commit_error)?;
                txn.open_table(KV).map_err(commit_error)?;
            }
            txn.commit().map_err(commit_error)
        };
        write().map_err(|error| corrupt(dir, format!("cannot initialise the store: {error}")))?;
        Ok(Loaded {
            state: {
                let mut state = State::default();
                state.apply(&Mutation::NextEpoch(1));
                state
            },
            cluster_id,
        })
    }

    /// Everything the store holds; `None` for a store never initialised.
    fn load(&self) -> Result<Option<Loaded>, OpenError> {
        let dir = &self.dir;
        let bad = |error: &dyn std::fmt::Display| corrupt(dir, error);
        let txn = self.db.begin_read().map_err(|e| bad(&e))?;
        let meta = match txn.open_table(META) {
            Ok(meta) => meta,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(error) => return Err(bad(&error)),
        };
        let read_u64 = |key: &str| -> Result<Option<u64>, OpenError> {
            match meta.get(key).map_err(|e| bad(&e))? {
                None => Ok(None),
                Some(value) => u64_at(value.value(), 0)
                    .map(Some)
                    .ok_or_else(|| corrupt(dir, format!("bad {key} record"))),
            }
        };
        let Some(format) = read_u64(META_FORMAT)? else {
            return Ok(None);
        };
        if format > FORMAT_VERSION {
            return Err(OpenError::NewerFormat {
                path: dir.to_path_buf(),
                found: format,
                supported: FORMAT_VERSION,
            });
        }
        let next_epoch =
            read_u64(META_NEXT_EPOCH)?.ok_or_else(|| corrupt(dir, "no next_epoch record"))?;
        let cluster_id = meta
            .get(META_CLUSTER)
            .map_err(|e| bad(&e))?
            .and_then(|value| Uuid::from_slice(value.value()).ok())
            .ok_or_else(|| corrupt(dir, "no cluster id record"))?;
        let mut mutations = vec![Mutation::NextEpoch(next_epoch)];
        let logs = txn.open_table(LOGS).map_err(|e| bad(&e))?;
        for row in logs.iter().map_err(|e| bad(&e))? {
            let (topic, value) = row.map_err(|e| bad(&e))?;
            let meta = decode_log(value.value())
                .ok_or_else(|| corrupt(dir, format!("bad log record for {}", topic.value())))?;
            mutations.push(Mutation::Log {
                topic: topic.value().to_owned(),
                meta: Some(meta),
            });
        }
        let mut state = State::default();
        for mutation in &mutations {
            state.apply(mutation);
        }
        let entries = txn.open_table(ENTRIES).map_err(|e| bad(&e))?;
        // Rows come in (topic, offset) order, so each log's entries are pushed in offset order.
        for row in entries.iter().map_err(|e| bad(&e))? {
            let (key, value) = row.map_err(|e| bad(&e))?;
            let (topic, offset) = key.value();
            let text = std::str::from_utf8(value.value())
                .map_err(|_| corrupt(dir, format!("entry {topic}/{offset} is not UTF-8")))?;
            if !state.logs.contains_key(topic) {
                return Err(corrupt(dir, format!("entry {topic}/{offset} has no log")));
            }
            state.apply(&Mutation::EntryPut {
                topic: topic.to_owned(),
                offset,
                frame: Frame::text(text),
            });
        }
        let kv = txn.open_table(KV).map_err(|e| bad(&e))?;
        for row in kv.iter().map_err(|e| bad(&e))? {
            let (key, value) = row.map_err(|e| bad(&e))?;
            let stored = decode_kv(value.value())
                .ok_or_else(|| corrupt(dir, format!("bad record for key {}", key.value())))?;
            state.apply(&Mutation::KvPut {
                key: key.value().to_owned(),
                stored,
            });
        }
        Ok(Some(Loaded { state, cluster_id }))
    }

    /// Writes `mutations` in one transaction and waits until they are on disk.
    pub(crate) fn commit(&self, mutations: &[Mutation]) -> Result<(), CommitError> {
        let mut txn = self.db.begin_write().map_err(commit_error)?;
        txn.set_durability(Durability::Immediate)
            .map_err(commit_error)?;
        {
            let mut meta = txn.open_table(META).map_err(commit_error)?;
            let mut logs = txn.open_table(LOGS).map_err(commit_error)?;
            let mut entries = txn.open_table(ENTRIES).map_err(commit_error)?;
            let mut kv = txn.open_table(KV).map_err(commit_error)?;
            for mutation in mutations {
                match mutation {
                    Mutation::NextEpoch(next) => {
                        meta.insert(META_NEXT_EPOCH, next.to_le_bytes().as_slice())
                            .map_err(commit_error)?;
                    }
                    Mutation::Log {
                        topic,
                        meta: Some(log),
                    } => {
                        logs.insert(topic.as_str(), encode_log(log).as_slice())
                            .map_err(commit_error)?;
                    }
                    Mutation::Log { topic, meta: None } => {
                        logs.remove(topic.as_str()).map_err(commit_error)?;
                    }
                    Mutation::EntryPut {
                        topic,
                        offset,
                        frame,
                    } => {
                        entries
                            .insert((topic.as_str(), *offset), frame.as_str().as_bytes())
                            .map_err(commit_error)?;
                    }
                    Mutation::EntryDel { topic, offset } => {
                        entries
                            .remove((topic.as_str(), *offset))
                            .map_err(commit_error)?;
                    }
                    Mutation::KvPut { key, stored } => {
                        kv.insert(key.as_str(), encode_kv(stored).as_slice())
                            .map_err(commit_error)?;
                    }
                    Mutation::KvDel { key } => {
                        kv.remove(key.as_str()).map_err(commit_error)?;
                    }
                }
            }
        }
        txn.commit().map_err(commit_error)
    }
}

/// A storage backend that fails every write while its data directory is marked failing (a
/// full or broken disk), for the unit tests of commit failures. Marked per directory, so tests
/// running at the same time do not disturb each other.
#[cfg(test)]
pub(crate) mod fault {
    use std::ops::Bound;
    use std::path::{Path, PathBuf};
    use std::sync::{Mutex, PoisonError};

    use redb::backends::FileBackend;
    use redb::{BackendError, StorageBackend};

    type BackendIoError = std::io::Error;

    static FAILING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    /// Makes writes to the store in `dir` fail (`true`) or work again.
    pub(crate) fn fail_writes(dir: &Path, fail: bool) {
        let mut failing = FAILING.lock().unwrap_or_else(PoisonError::into_inner);
        failing.retain(|d| d != dir);
        if fail {
            failing.push(dir.to_path_buf());
        }
    }

    #[derive(Debug)]
    pub(crate) struct Faulty(pub(crate) FileBackend, pub(crate) PathBuf);

    impl Faulty {
        fn check(&self) -> Result<(), BackendIoError> {
            let failing = FAILING.lock().unwrap_or_else(PoisonError::into_inner);
            if failing.contains(&self.1) {
                return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
            }
            Ok(())
        }
    }

    impl StorageBackend for Faulty {
        fn len(&self) -> Result<u64, BackendIoError> {
            self.0.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendIoError> {
            self.0.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), BackendIoError> {
            self.check()?;
            self.0.set_len(len)
        }
        fn sync_data(&self) -> Result<(), BackendIoError> {
            self.check()?;
            self.0.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendIoError> {
            self.check()?;
            self.0.write(offset, data)
        }
        fn close(&self) -> Result<(), BackendIoError> {
            self.0.close()
        }
        fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
            self.0.try_lock_range(start, end)
        }
        fn try_lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.0.try_lock_shared_range(start, end)
        }
        fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.0.lock_range(start, end)
        }
        fn lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<(), BackendError> {
            self.0.lock_shared_range(start, end)
        }
        fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.0.unlock_range(start, end)
        }
    }
}
