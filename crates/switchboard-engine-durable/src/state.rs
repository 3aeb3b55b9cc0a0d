//! The engine's state in memory, and the [`Mutation`]s that change it.
//!
//! The same [`State`] type serves twice: the writer's working copy, on which operations are
//! decided (each one sees the effects of the operations before it in its batch), and the
//! readers' view, which holds exactly the last committed state. Every change is a
//! [`Mutation`]: the writer applies it to its working copy at once, writes it to the store in
//! the batch's transaction, and applies it to the view after the commit. One vocabulary for the
//! three places keeps them from drifting apart. Payloads are reference-counted ([`Frame`],
//! [`Bytes`]), so the two copies share them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::time::Duration;

use bytes::Bytes;
use switchboard_core::Frame;
use switchboard_core::engine::{
    Append, Appended, ConnRef, EngineError, EngineResult, Entry, Expect, Position, Put, Read,
    ReadFrom, Versioned, WhenFull,
};

use crate::DurableLimits;

/// Bookkeeping bytes charged per stored item besides its payload (the memory engine's figure:
/// the in-memory index costs about that much per item, and the store a little less).
pub(crate) const ITEM_OVERHEAD: usize = 96;

/// What is charged against [`DurableLimits::max_bytes`] for an item of `len` payload bytes.
pub(crate) fn cost(len: usize) -> usize {
    len.saturating_add(ITEM_OVERHEAD)
}

/// A duration in whole milliseconds (saturating).
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// The stored bookkeeping of one log (its entries are stored one by one beside it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogMeta {
    pub(crate) epoch: u64,
    pub(crate) top: u64,
    /// Wall-clock milliseconds since the Unix epoch of the last append.
    pub(crate) last_append_ms: u64,
    pub(crate) ttl_ms: Option<u64>,
}

impl LogMeta {
    fn expired(&self, now_ms: u64) -> bool {
        self.ttl_ms
            .is_some_and(|ttl| self.last_append_ms.saturating_add(ttl) <= now_ms)
    }

    fn position(&self) -> Position {
        Position {
            offset: self.top,
            epoch: self.epoch,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Log {
    pub(crate) meta: LogMeta,
    pub(crate) entries: VecDeque<Entry>,
    bytes: usize,
}

impl Log {
    /// Everything after this offset is here unless removed on purpose.
    fn trimmed_to(&self) -> u64 {
        self.entries
            .front()
            .map_or(self.meta.top, |first| first.offset.saturating_sub(1))
    }
}

/// One value of keyed state as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub(crate) version: u64,
    pub(crate) value: Bytes,
    /// Wall-clock milliseconds since the Unix epoch after which the value is gone.
    pub(crate) expires_ms: Option<u64>,
}

impl Stored {
    fn live(&self, now_ms: u64) -> bool {
        self.expires_ms.is_none_or(|at| at > now_ms)
    }
}

/// One change of state, applied to the working copy, the store and the view alike.
#[derive(Debug, Clone)]
pub(crate) enum Mutation {
    /// The next log epoch to hand out.
    NextEpoch(u64),
    /// A log's bookkeeping is created or changed (`Some`), or the log is forgotten (`None`,
    /// after its entries were deleted one by one).
    Log {
        topic: String,
        meta: Option<LogMeta>,
    },
    /// An entry is stored.
    EntryPut {
        topic: String,
        offset: u64,
        frame: Frame,
    },
    /// An entry is deleted (trimmed, removed, or its log forgotten).
    EntryDel { topic: String, offset: u64 },
    /// A key is written.
    KvPut { key: String, stored: Stored },
    /// A key is deleted.
    KvDel { key: String },
}

/// A logged publication, delivered once its batch is durable.
#[derive(Debug)]
pub(crate) struct Publication {
    pub(crate) topic: String,
    pub(crate) offset: u64,
    pub(crate) frame: Frame,
    pub(crate) except: Option<ConnRef>,
    pub(crate) reply: Option<Frame>,
}

/// Logs and keyed state, with what they cost against the limits.
#[derive(Debug, Clone, Default)]
pub(crate) struct State {
    pub(crate) logs: HashMap<String, Log>,
    pub(crate) kv: BTreeMap<String, Stored>,
    pub(crate) next_epoch: u64,
    items: usize,
    bytes: usize,
}

fn full() -> EngineError {
    EngineError::Full("durable engine limit")
}

impl State {
    /// Items stored now.
    pub(crate) fn items(&self) -> usize {
        self.items
    }

    /// Bytes charged now (payloads plus a fixed overhead per item).
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    fn charge(&mut self, items: usize, bytes: usize) {
        self.items = self.items.saturating_add(items);
        self.bytes = self.bytes.saturating_add(bytes);
    }

    fn uncharge(&mut self, items: usize, bytes: usize) {
        self.items = self.items.saturating_sub(items);
        self.bytes = self.bytes.saturating_sub(bytes);
    }

    /// Applies one change. Never fails: the writer decided it against the same state.
    pub(crate) fn apply(&mut self, mutation: &Mutation) {
        match mutation {
            Mutation::NextEpoch(next) => self.next_epoch = *next,
            Mutation::Log {
                topic,
                meta: Some(meta),
            } => {
                if let Some(log) = self.logs.get_mut(topic) {
                    log.meta = *meta;
                } else {
                    self.logs.insert(
                        topic.clone(),
                        Log {
                            meta: *meta,
                            entries: VecDeque::new(),
                            bytes: 0,
                        },
                    );
                    self.charge(1, cost(topic.len()));
                }
            }
            Mutation::Log { topic, meta: None } => {
                if let Some(log) = self.logs.remove(topic) {
                    // The writer deletes the entries first; any left are given back here too.
                    let left = log.entries.len();
                    let bytes = log
                        .entries
                        .iter()
                        .fold(0usize, |sum, e| sum.saturating_add(cost(e.frame.len())));
                    self.uncharge(
                        left.saturating_add(1),
                        bytes.saturating_add(cost(topic.len())),
                    );
                }
            }
            Mutation::EntryPut {
                topic,
                offset,
                frame,
            } => {
                if let Some(log) = self.logs.get_mut(topic) {
                    log.bytes = log.bytes.saturating_add(frame.len());
                    log.entries.push_back(Entry {
                        offset: *offset,
                        frame: frame.clone(),
                    });
                    self.charge(1, cost(frame.len()));
                }
            }
            Mutation::EntryDel { topic, offset } => {
                let Some(log) = self.logs.get_mut(topic) else {
                    return;
                };
                let Ok(index) = log.entries.binary_search_by_key(offset, |e| e.offset) else {
                    return;
                };
                if let Some(entry) = log.entries.remove(index) {
                    log.bytes = log.bytes.saturating_sub(entry.frame.len());
                    self.uncharge(1, cost(entry.frame.len()));
                }
            }
            Mutation::KvPut { key, stored } => {
                let new_cost = cost(key.len().saturating_add(stored.value.len()));
                match self.kv.insert(key.clone(), stored.clone()) {
                    Some(old) => {
                        self.uncharge(0, cost(key.len().saturating_add(old.value.len())));
                        self.charge(0, new_cost);
                    }
                    None => self.charge(1, new_cost),
                }
            }
            Mutation::KvDel { key } => {
                if let Some(old) = self.kv.remove(key) {
                    self.uncharge(1, cost(key.len().saturating_add(old.value.len())));
                }
            }
        }
    }

    /// Applies `mutation` and records it for the store and the view.
    fn emit(&mut self, out: &mut Vec<Mutation>, mutation: Mutation) {
        self.apply(&mutation);
        out.push(mutation);
    }

    /// Deletes a log and its entries.
    fn forget_log(&mut self, topic: &str, out: &mut Vec<Mutation>) {
        let Some(log) = self.logs.get(topic) else {
            return;
        };
        let offsets: Vec<u64> = log.entries.iter().map(|e| e.offset).collect();
        for offset in offsets {
            self.emit(
                out,
                Mutation::EntryDel {
                    topic: topic.to_owned(),
                    offset,
                },
            );
        }
        self.emit(
            out,
            Mutation::Log {
                topic: topic.to_owned(),
                meta: None,
            },
        );
    }

    /// Deletes every expired key and log.
    pub(crate) fn sweep(&mut self, now_ms: u64, out: &mut Vec<Mutation>) {
        let keys: Vec<String> = self
            .kv
            .iter()
            .filter(|(_, stored)| !stored.live(now_ms))
            .map(|(key, _)| key.clone())
            .collect();
        for key in keys {
            self.emit(out, Mutation::KvDel { key });
        }
        let topics: Vec<String> = self
            .logs
            .iter()
            .filter(|(_, log)| log.meta.expired(now_ms))
            .map(|(topic, _)| topic.clone())
            .collect();
        for topic in topics {
            self.forget_log(&topic, out);
        }
    }

    fn fits(&self, limits: DurableLimits, items: usize, bytes: usize) -> bool {
        self.items.saturating_add(items) <= limits.max_items
            && self.bytes.saturating_add(bytes) <= limits.max_bytes
    }

    /// Makes room for `items` more items and `bytes` more bytes, sweeping expired state once if
    /// that makes them fit.
    fn make_room(
        &mut self,
        limits: DurableLimits,
        items: usize,
        bytes: usize,
        now_ms: u64,
        out: &mut Vec<Mutation>,
    ) -> EngineResult<()> {
        if self.fits(limits, items, bytes) {
            return Ok(());
        }
        self.sweep(now_ms, out);
        if self.fits(limits, items, bytes) {
            Ok(())
        } else {
            Err(full())
        }
    }

    fn new_epoch(&mut self, out: &mut Vec<Mutation>) -> u64 {
        let epoch = self.next_epoch.max(1);
        self.emit(out, Mutation::NextEpoch(epoch.saturating_add(1)));
        epoch
    }

    /// Appends (see `StateEngine::append`); the publication to deliver once durable, if any.
    #[allow(clippy::too_many_arguments, reason = "one append's parts")]
    pub(crate) fn append(
        &mut self,
        limits: DurableLimits,
        now_ms: u64,
        topic: &str,
        frame: Frame,
        options: Append,
        reply: Option<Frame>,
        out: &mut Vec<Mutation>,
    ) -> EngineResult<(Appended, Option<Publication>)> {
        let retention = options.retention;
        let keep = options.keep;
        let size = frame.len();
        options.check_size(size)?;
        if self
            .logs
            .get(topic)
            .is_some_and(|log| log.meta.expired(now_ms))
        {
            self.forget_log(topic, out);
        }
        let existing = self.logs.get(topic).map(|log| log.meta);
        if let Some(expected) = options.expect_top
            && expected != existing.map_or(0, |meta| meta.top)
        {
            let top = existing.map_or(
                Position {
                    offset: 0,
                    epoch: 0,
                },
                |meta| meta.position(),
            );
            return Ok((Appended::Conflict(top), None));
        }
        // Charged like the memory engine: the new entry, and the log's own bookkeeping when it
        // is new (a log keeps its top offset while it exists, so ids never go back).
        let (items, bytes) = match (keep, existing.is_some()) {
            (true, true) => (1, cost(size)),
            (true, false) => (2, cost(size).saturating_add(cost(topic.len()))),
            (false, true) => (0, 0),
            (false, false) => (1, cost(topic.len())),
        };
        self.make_room(limits, items, bytes, now_ms, out)?;
        let mut meta = match self.logs.get(topic) {
            Some(log) => log.meta,
            None => {
                let meta = LogMeta {
                    epoch: self.new_epoch(out),
                    top: 0,
                    last_append_ms: now_ms,
                    ttl_ms: retention.ttl.map(millis),
                };
                self.emit(
                    out,
                    Mutation::Log {
                        topic: topic.to_owned(),
                        meta: Some(meta),
                    },
                );
                meta
            }
        };
        if keep {
            let at_bound = |log: &Log| {
                log.entries.len() >= retention.max_entries
                    || log.bytes.saturating_add(size) > retention.max_bytes
            };
            while let Some(log) = self.logs.get(topic).filter(|log| at_bound(log)) {
                if retention.when_full == WhenFull::Refuse {
                    return Err(EngineError::Full("log is full"));
                }
                let Some(oldest) = log.entries.front().map(|e| e.offset) else {
                    break;
                };
                self.emit(
                    out,
                    Mutation::EntryDel {
                        topic: topic.to_owned(),
                        offset: oldest,
                    },
                );
            }
        }
        meta.top = meta.top.saturating_add(1);
        meta.last_append_ms = now_ms;
        if keep {
            meta.ttl_ms = retention.ttl.map(millis);
        }
        self.emit(
            out,
            Mutation::Log {
                topic: topic.to_owned(),
                meta: Some(meta),
            },
        );
        if keep {
            self.emit(
                out,
                Mutation::EntryPut {
                    topic: topic.to_owned(),
                    offset: meta.top,
                    frame: frame.clone(),
                },
            );
        }
        let publication = options.publish.then(|| Publication {
            topic: topic.to_owned(),
            offset: meta.top,
            frame,
            except: options.except,
            reply,
        });
        Ok((Appended::Done(meta.position()), publication))
    }

    /// Removes one entry; whether it was there.
    pub(crate) fn remove(&mut self, topic: &str, offset: u64, out: &mut Vec<Mutation>) -> bool {
        let present = self.logs.get(topic).is_some_and(|log| {
            log.entries
                .binary_search_by_key(&offset, |e| e.offset)
                .is_ok()
        });
        if present {
            self.emit(
                out,
                Mutation::EntryDel {
                    topic: topic.to_owned(),
                    offset,
                },
            );
        }
        present
    }

    /// Forgets a whole log.
    pub(crate) fn drop_log(&mut self, topic: &str, out: &mut Vec<Mutation>) {
        self.forget_log(topic, out);
    }

    /// Writes `key` if `expect` holds.
    #[allow(clippy::too_many_arguments, reason = "one write's parts")]
    pub(crate) fn put(
        &mut self,
        limits: DurableLimits,
        now_ms: u64,
        key: &str,
        value: Bytes,
        expect: Expect,
        ttl: Option<Duration>,
        out: &mut Vec<Mutation>,
    ) -> EngineResult<Put> {
        let current = self.kv.get(key).filter(|stored| stored.live(now_ms));
        let matches = match (expect, current) {
            (Expect::Any, _) | (Expect::Absent, None) => true,
            (Expect::Version(version), Some(stored)) => stored.version == version,
            _ => false,
        };
        if !matches {
            return Ok(Put::Conflict(current.map(|stored| Versioned {
                version: stored.version,
                value: stored.value.clone(),
            })));
        }
        // An expired value is replaced like a fresh key (version 1), reusing its charge.
        let version = current.map_or(1, |stored| stored.version.saturating_add(1));
        let new_cost = cost(key.len().saturating_add(value.len()));
        let (items, bytes) = match self.kv.get(key) {
            Some(old) => (
                0,
                new_cost.saturating_sub(cost(key.len().saturating_add(old.value.len()))),
            ),
            None => (1, new_cost),
        };
        self.make_room(limits, items, bytes, now_ms, out)?;
        let expires_ms = ttl.map(|ttl| now_ms.saturating_add(millis(ttl)));
        self.emit(
            out,
            Mutation::KvPut {
                key: key.to_owned(),
                stored: Stored {
                    version,
                    value,
                    expires_ms,
                },
            },
        );
        Ok(Put::Stored(version))
    }

    /// Deletes `key` if `expect` holds; its live value, if it had one.
    pub(crate) fn take(
        &mut self,
        now_ms: u64,
        key: &str,
        expect: Expect,
        out: &mut Vec<Mutation>,
    ) -> Option<Versioned> {
        let stored = self.kv.get(key)?;
        let live = stored.live(now_ms);
        let matches = match expect {
            Expect::Any => true,
            Expect::Absent => false,
            Expect::Version(version) => live && stored.version == version,
        };
        if !matches {
            return None;
        }
        let taken = live.then(|| Versioned {
            version: stored.version,
            value: stored.value.clone(),
        });
        self.emit(
            out,
            Mutation::KvDel {
                key: key.to_owned(),
            },
        );
        taken
    }

    /// Adds `delta` to the counter at `key` within `min..=max`.
    #[allow(clippy::too_many_arguments, reason = "one addition's parts")]
    pub(crate) fn add(
        &mut self,
        limits: DurableLimits,
        now_ms: u64,
        key: &str,
        delta: i64,
        min: i64,
        max: i64,
        out: &mut Vec<Mutation>,
    ) -> EngineResult<Result<i64, i64>> {
        let current = match self.kv.get(key).filter(|stored| stored.live(now_ms)) {
            None => 0,
            Some(stored) => std::str::from_utf8(&stored.value)
                .ok()
                .and_then(|text| text.parse::<i64>().ok())
                .ok_or_else(|| EngineError::Corrupt(format!("{key} is not a counter")))?,
        };
        let Some(next) = current
            .checked_add(delta)
            .filter(|n| (min..=max).contains(n))
        else {
            return Ok(Err(current));
        };
        if next == 0 {
            if self.kv.contains_key(key) {
                self.emit(
                    out,
                    Mutation::KvDel {
                        key: key.to_owned(),
                    },
                );
            }
            return Ok(Ok(0));
        }
        let value = Bytes::from(next.to_string());
        let version = match self.kv.get(key) {
            // A counter's size varies by a few digits: an existing one is kept, never refused.
            Some(stored) => stored.version.saturating_add(1),
            None => {
                let new_cost = cost(key.len().saturating_add(value.len()));
                self.make_room(limits, 1, new_cost, now_ms, out)?;
                1
            }
        };
        self.emit(
            out,
            Mutation::KvPut {
                key: key.to_owned(),
                stored: Stored {
                    version,
                    value,
                    expires_ms: None,
                },
            },
        );
        Ok(Ok(next))
    }

    /// Reads a log (the view's side).
    pub(crate) fn read(&self, now_ms: u64, topic: &str, from: ReadFrom, limit: usize) -> Read {
        let empty = Position {
            offset: 0,
            epoch: 0,
        };
        let Some(log) = self.logs.get(topic).filter(|log| !log.meta.expired(now_ms)) else {
            // A log that does not exist reads as empty; a position in it cannot be continued.
            return match from {
                ReadFrom::After(position) if position.offset > 0 => Read::Gone { top: empty },
                _ => Read::Entries {
                    entries: Vec::new(),
                    top: empty,
                },
            };
        };
        let top = log.meta.position();
        let entries = match from {
            ReadFrom::Latest(n) => {
                let n = n.min(limit);
                let skip = log.entries.len().saturating_sub(n);
                log.entries.iter().skip(skip).cloned().collect()
            }
            ReadFrom::After(position) => {
                let continues = position.offset == 0
                    || (position.epoch == log.meta.epoch
                        && position.offset >= log.trimmed_to()
                        && position.offset <= log.meta.top);
                if !continues {
                    return Read::Gone { top };
                }
                let start = log
                    .entries
                    .partition_point(|entry| entry.offset <= position.offset);
                log.entries
                    .iter()
                    .skip(start)
                    .take(limit)
                    .cloned()
                    .collect()
            }
        };
        Read::Entries { entries, top }
    }

    /// Reads a key (the view's side).
    pub(crate) fn get(&self, now_ms: u64, key: &str) -> Option<Versioned> {
        self.kv
            .get(key)
            .filter(|stored| stored.live(now_ms))
            .map(|stored| Versioned {
                version: stored.version,
                value: stored.value.clone(),
            })
    }

    /// Lists keys by prefix (the view's side).
    pub(crate) fn scan(
        &self,
        now_ms: u64,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Vec<(String, Versioned)> {
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded(after.to_owned()),
            _ => Bound::Included(prefix.to_owned()),
        };
        self.kv
            .range((start, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .filter(|(_, stored)| stored.live(now_ms))
            .take(limit)
            .map(|(key, stored)| {
                (
                    key.clone(),
                    Versioned {
                        version: stored.version,
                        value: stored.value.clone(),
                    },
                )
            })
            .collect()
    }
}
