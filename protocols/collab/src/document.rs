//! The server's copy of one session's document: text, version and a bounded log of the
//! operations applied most recently, against which late operations are transformed. Sans-IO.

use std::collections::VecDeque;
use std::sync::Arc;

use switchboard_core::MemoryBudget;

use crate::budget::{Budgets, Charge, Refused};
use crate::ot::{Operation, OtError, transform};

/// Spare capacity a document's text may keep after an edit before it is shrunk: small enough to
/// leave out of the worst-case formula's precision, large enough that typing does not reallocate
/// the whole text on every keystroke.
pub const TEXT_SLACK_BYTES: usize = 4096;

/// Limits of one [`Document`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocumentLimits {
    /// Largest document, in UTF-8 bytes.
    pub max_bytes: usize,
    /// Operations kept for transforming late edits (0 accepts only edits on the latest version).
    pub max_log_ops: usize,
    /// Bytes the operation log may hold (as [`Operation::weight`] counts them); the oldest
    /// entries go first, and an operation heavier than this on its own is refused. A hard bound:
    /// it holds for the newest entry too.
    pub max_log_bytes: usize,
}

/// Why an edit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    /// `baseVersion` is newer than anything the server has.
    #[error(
        "baseVersion {base} is ahead of the document (version {current}); resync from the session-state that follows"
    )]
    FutureVersion {
        /// The version the client claimed.
        base: u64,
        /// The server's version.
        current: u64,
    },
    /// `baseVersion` is older than the operation log reaches.
    #[error(
        "baseVersion {base} is too old: the server can only transform edits based on version {oldest} or later (now {current}); resync from the session-state that follows"
    )]
    StaleVersion {
        /// The version the client claimed.
        base: u64,
        /// The oldest version the log can transform from.
        oldest: u64,
        /// The server's version.
        current: u64,
    },
    /// The operation does not fit the document it claims to be based on (this includes
    /// operations whose counts add up past the largest integer).
    #[error(
        "the operation spans {spans} characters but the document at version {base} has {length}"
    )]
    TooLong {
        /// Characters the operation retains or deletes (saturated at `usize::MAX`).
        spans: usize,
        /// The document's length at `base`.
        length: usize,
        /// The version the client claimed.
        base: u64,
    },
    /// The result would exceed the size limit.
    #[error("the document would be {bytes} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Size of the would-be document.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// The operation alone is heavier than the whole operation log may be.
    #[error(
        "the operation takes {bytes} bytes, over the operation log's limit of {limit} bytes; send it as smaller edits"
    )]
    OperationTooLarge {
        /// The operation's weight.
        bytes: usize,
        /// The log's byte limit.
        limit: usize,
    },
    /// The server's memory budget for session state is used up; the document cannot grow.
    #[error(
        "the server's memory for sessions is full ({limit} bytes); the document cannot grow now"
    )]
    OutOfMemory {
        /// The budget's limit in bytes.
        limit: usize,
    },
    /// The sessions created from the creator's address use their whole share of memory.
    #[error(
        "the sessions created from this session's creator's address use their whole share of memory ({limit} bytes); the document cannot grow now"
    )]
    ShareFull {
        /// The share in bytes.
        limit: usize,
    },
    /// The version counter is exhausted (2^64 edits; never expected).
    #[error("the document's version counter is exhausted")]
    VersionExhausted,
    /// An internal inconsistency (never expected): reported instead of panicking.
    #[error("the operation could not be applied: {0}")]
    Ot(#[from] OtError),
}

/// An edit that was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The operation as applied to the latest document (after transformation).
    pub op: Operation,
    /// The document's new version.
    pub version: u64,
}

#[derive(Debug, Clone)]
struct LogEntry {
    op: Operation,
    weight: usize,
}

/// One document with its version and operation log.
///
/// Its text (capacity) and log are charged to a [`MemoryBudget`] while it lives: at most
/// `max_bytes + TEXT_SLACK_BYTES + max_log_bytes`.
#[derive(Debug, Clone)]
pub struct Document {
    text: String,
    chars: usize,
    version: u64,
    /// `log[i]` took the document from version `version - log.len() + i` to the next one.
    log: VecDeque<LogEntry>,
    log_bytes: usize,
    limits: DocumentLimits,
    charge: Charge,
}

fn refused(refused: Refused) -> EditError {
    match refused {
        Refused::Server(limit) => EditError::OutOfMemory { limit },
        Refused::Client(limit) => EditError::ShareFull { limit },
    }
}

/// Shrinks `text` when it keeps more spare capacity than [`TEXT_SLACK_BYTES`].
fn tighten(text: &mut String) {
    if text.capacity().saturating_sub(text.len()) > TEXT_SLACK_BYTES {
        text.shrink_to_fit();
    }
}

impl Document {
    /// A document at version 0, charged to a budget of its own that never refuses. The caller
    /// checks `text` against the size limit.
    pub fn new(text: String, limits: DocumentLimits) -> Self {
        let mut text = text;
        tighten(&mut text);
        let budgets = Budgets::server(&Arc::new(MemoryBudget::unlimited()));
        let charge = Charge::forced(&budgets, text.capacity());
        Self::build(text, limits, charge)
    }

    /// A document at version 0 whose text and log are charged to `budget`; refused with
    /// [`EditError::OutOfMemory`] when the text does not fit. The caller checks `text` against
    /// the size limit.
    pub fn with_budget(
        text: String,
        limits: DocumentLimits,
        budget: &Arc<MemoryBudget>,
    ) -> Result<Self, EditError> {
        Self::charged(text, limits, &Budgets::server(budget))
    }

    /// A document charged to `budgets` (the server's and its creator's share).
    pub(crate) fn charged(
        text: String,
        limits: DocumentLimits,
        budgets: &Budgets,
    ) -> Result<Self, EditError> {
        let mut text = text;
        tighten(&mut text);
        let charge = Charge::try_new(budgets, text.capacity()).map_err(refused)?;
        Ok(Self::build(text, limits, charge))
    }

    /// A document at `version` (loaded from shared state) charged to `budgets`, with an empty
    /// operation log: edits based on older versions are refused and resync.
    pub(crate) fn loaded(
        text: String,
        version: u64,
        limits: DocumentLimits,
        budgets: &Budgets,
    ) -> Result<Self, EditError> {
        let mut document = Self::charged(text, limits, budgets)?;
        document.version = version;
        Ok(document)
    }

    /// Gives a document just [`Document::loaded`] the operations that led to its version, oldest
    /// first (`ops[i]` took the document from version `version - ops.len() + i` to the next), so
    /// that edits based on those older versions are transformed instead of refused. In a
    /// cluster a node loads its copy when it first needs one, possibly after other nodes' edits
    /// that a client had not seen yet when it made its own; the shared log still has their
    /// operations. Keeps the newest that chain onto the text and fit the log's limits and the
    /// budget (the log is an optimization: what does not fit is left out, and edits based on
    /// versions before it resync). Does nothing if the log is not empty. Returns how many were
    /// kept.
    pub(crate) fn seed_log(&mut self, ops: Vec<Operation>) -> usize {
        if !self.log.is_empty() || self.limits.max_log_ops == 0 {
            return 0;
        }
        let most = usize::try_from(self.version)
            .unwrap_or(usize::MAX)
            .min(self.limits.max_log_ops);
        let mut kept = VecDeque::new();
        let mut bytes = 0usize;
        // Each operation must end where the next one (or the text) starts.
        let mut target = self.chars;
        for mut op in ops.into_iter().rev() {
            if kept.len() >= most || op.target_len() != target {
                break;
            }
            op.shrink_to_fit();
            let weight = op.weight();
            let total = bytes.saturating_add(weight);
            if total > self.limits.max_log_bytes || self.charge.try_grow(weight).is_err() {
                break;
            }
            bytes = total;
            target = op.base_len();
            kept.push_front(LogEntry { op, weight });
        }
        self.log = kept;
        self.log_bytes = bytes;
        self.log.len()
    }

    fn build(text: String, limits: DocumentLimits, charge: Charge) -> Self {
        Self {
            chars: text.chars().count(),
            text,
            version: 0,
            log: VecDeque::new(),
            log_bytes: 0,
            limits,
            charge,
        }
    }

    /// The current text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The current version: the number of edits applied since creation.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The oldest version an edit may be based on.
    pub fn oldest_version(&self) -> u64 {
        self.version
            .saturating_sub(u64::try_from(self.log.len()).unwrap_or(u64::MAX))
    }

    /// Bytes of the operation log now (at most `max_log_bytes`).
    pub fn log_bytes(&self) -> usize {
        self.log_bytes
    }

    /// Bytes this document has charged to its budget: text capacity plus operation log.
    pub fn charged_bytes(&self) -> usize {
        self.charge.bytes()
    }

    /// Applies `op`, made on version `base`, transforming it against every operation applied
    /// since. An operation shorter than the document at `base` is padded with a trailing retain.
    pub fn apply_operation(&mut self, base: u64, op: Operation) -> Result<Applied, EditError> {
        let prepared = self.prepare_operation(base, op)?;
        Ok(self.commit(prepared))
    }

    /// Replaces the whole text (a full-text `code-change`), as an operation on the latest version.
    pub fn replace(&mut self, text: &str) -> Result<Applied, EditError> {
        let prepared = self.prepare_replace(text)?;
        Ok(self.commit(prepared))
    }

    /// What [`Document::apply_operation`] would do, without doing it: the transformed operation,
    /// the new text and the budget it needs (reserved until the result is committed or dropped).
    /// The document does not change, so the edit can be offered to a shared log first.
    pub(crate) fn prepare_operation(
        &self,
        base: u64,
        op: Operation,
    ) -> Result<Prepared, EditError> {
        let current = self.version;
        if base > current {
            return Err(EditError::FutureVersion { base, current });
        }
        let oldest = self.oldest_version();
        let Some(skip) = base.checked_sub(oldest) else {
            return Err(EditError::StaleVersion {
                base,
                oldest,
                current,
            });
        };
        // Lossless: base lies within [oldest, current] and the log length fits in memory.
        let skip = usize::try_from(skip).unwrap_or(usize::MAX);
        let length = self
            .log
            .get(skip)
            .map_or(self.chars, |entry| entry.op.base_len());
        let Some(pad) = length.checked_sub(op.base_len()) else {
            return Err(EditError::TooLong {
                spans: op.base_len(),
                length,
                base,
            });
        };
        let mut op = op.retain(pad);
        for applied in self.log.iter().skip(skip) {
            op = transform(&op, &applied.op)?.0;
        }
        self.plan(op)
    }

    /// What [`Document::replace`] would do, without doing it (see
    /// [`Document::prepare_operation`]).
    pub(crate) fn prepare_replace(&self, text: &str) -> Result<Prepared, EditError> {
        self.check_size(text.len())?;
        self.plan(Operation::diff(&self.text, text))
    }

    /// Applies an operation that another writer already applied at `version` (the next one):
    /// `op` is based on this document's latest version, so nothing is transformed. Refused when
    /// it does not fit (the caller then drops this copy of the document).
    pub(crate) fn follow(&mut self, version: u64, op: Operation) -> Result<(), EditError> {
        let current = self.version;
        if current.checked_add(1) != Some(version) {
            return Err(EditError::FutureVersion {
                base: version.saturating_sub(1),
                current,
            });
        }
        let prepared = self.plan(op)?;
        self.commit(prepared);
        Ok(())
    }

    /// Applies a prepared edit. It must have been prepared on this document as it is now (no
    /// other edit committed in between), which [`Prepared::prepared_on`] lets the caller check.
    pub(crate) fn commit(&mut self, prepared: Prepared) -> Applied {
        let Prepared {
            applied,
            text,
            logged,
            drop_count,
            new_log_bytes,
            log_kept,
            target,
            reserved,
            prepared_on: _,
        } = prepared;
        self.charge.absorb(reserved);
        self.charge.resize_forced(target);
        if log_kept {
            self.log.drain(..drop_count.min(self.log.len()));
            if let Some(entry) = logged {
                self.log.push_back(entry);
            }
            self.log_bytes = new_log_bytes;
        } else {
            self.log.clear();
            self.log_bytes = 0;
        }
        self.chars = applied.op.target_len();
        self.text = text;
        self.version = applied.version;
        applied
    }

    fn check_size(&self, bytes: usize) -> Result<(), EditError> {
        if bytes > self.limits.max_bytes {
            return Err(EditError::TooLarge {
                bytes,
                limit: self.limits.max_bytes,
            });
        }
        Ok(())
    }

    /// Computes `op` applied to the latest text, the log after it and the charge it needs, and
    /// reserves that charge; nothing changes on error.
    ///
    /// Budget policy: if the text and the log with this operation do not fit, the operation is
    /// applied with the session's log emptied (edits based on older versions will then resync);
    /// if even the text alone does not fit, the edit is refused.
    fn plan(&self, op: Operation) -> Result<Prepared, EditError> {
        let mut text = op.apply(&self.text)?;
        self.check_size(text.len())?;
        tighten(&mut text);
        let version = self
            .version
            .checked_add(1)
            .ok_or(EditError::VersionExhausted)?;
        let mut logged = op.clone();
        logged.shrink_to_fit();
        let weight = logged.weight();
        let keep = self.limits.max_log_ops > 0;
        if keep && weight > self.limits.max_log_bytes {
            return Err(EditError::OperationTooLarge {
                bytes: weight,
                limit: self.limits.max_log_bytes,
            });
        }
        // Plan which old entries go so that the new one fits both log limits.
        let mut drop_count = 0usize;
        let mut kept_bytes = self.log_bytes;
        if keep {
            let mut kept_ops = self.log.len();
            for entry in &self.log {
                let fits_ops = kept_ops < self.limits.max_log_ops;
                let fits_bytes = kept_bytes.saturating_add(weight) <= self.limits.max_log_bytes;
                if fits_ops && fits_bytes {
                    break;
                }
                kept_bytes = kept_bytes.saturating_sub(entry.weight);
                kept_ops = kept_ops.saturating_sub(1);
                drop_count = drop_count.saturating_add(1);
            }
        } else {
            drop_count = self.log.len();
            kept_bytes = 0;
        }
        let new_log_bytes = if keep {
            kept_bytes.saturating_add(weight)
        } else {
            0
        };
        let current = self.charge.bytes();
        let with_log = text.capacity().saturating_add(new_log_bytes);
        let (target, log_kept, reserved) =
            match self.charge.reserve(with_log.saturating_sub(current)) {
                Ok(reserved) => (with_log, true, reserved),
                Err(_) => {
                    let alone = text.capacity();
                    let reserved = self
                        .charge
                        .reserve(alone.saturating_sub(current))
                        .map_err(refused)?;
                    (alone, false, reserved)
                }
            };
        Ok(Prepared {
            applied: Applied { op, version },
            text,
            logged: keep.then_some(LogEntry { op: logged, weight }),
            drop_count,
            new_log_bytes,
            log_kept,
            target,
            reserved,
            prepared_on: self.version,
        })
    }
}

/// An edit computed by [`Document::prepare_operation`] or [`Document::prepare_replace`], with
/// the budget it needs reserved; applied by [`Document::commit`], or released when dropped.
#[derive(Debug)]
pub(crate) struct Prepared {
    applied: Applied,
    text: String,
    logged: Option<LogEntry>,
    drop_count: usize,
    new_log_bytes: usize,
    log_kept: bool,
    target: usize,
    reserved: Charge,
    prepared_on: u64,
}

impl Prepared {
    /// The operation as it will be applied and the version it will make.
    pub(crate) fn applied(&self) -> &Applied {
        &self.applied
    }

    /// The text after the edit.
    pub(crate) fn text(&self) -> &str {
        &self.text
    }

    /// The document version this edit was prepared on.
    pub(crate) fn prepared_on(&self) -> u64 {
        self.prepared_on
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ot::Component;

    fn limits() -> DocumentLimits {
        DocumentLimits {
            max_bytes: 100,
            max_log_ops: 3,
            max_log_bytes: 10_000,
        }
    }

    fn insert_at(pos: usize, text: &str, len: usize) -> Operation {
        Operation::new().retain(pos).insert(text).retain(len - pos)
    }

    #[test]
    fn concurrent_edits_from_the_same_version_both_land() {
        let mut doc = Document::new("hello".into(), limits());
        let a = doc.apply_operation(0, insert_at(0, ">", 5)).unwrap();
        assert_eq!(a.version, 1);
        let b = doc.apply_operation(0, insert_at(5, "!", 5)).unwrap();
        assert_eq!(b.version, 2);
        assert_eq!(doc.text(), ">hello!");
        assert_eq!(serde_json::to_string(&b.op).unwrap(), r#"[6,"!"]"#);
    }

    #[test]
    fn a_loaded_copy_seeded_with_the_operations_transforms_like_the_original() {
        // The original: four edits; its log (limit 3) keeps the last three.
        let mut original = Document::new("ab".into(), limits());
        let mut ops = Vec::new();
        for (i, piece) in ["1", "2", "3", "4"].into_iter().enumerate() {
            let base = i as u64;
            ops.push(
                original
                    .apply_operation(base, insert_at(1, piece, 2 + i))
                    .unwrap()
                    .op,
            );
        }
        let budgets = Budgets::server(&Arc::new(MemoryBudget::unlimited()));
        let mut copy = Document::loaded(original.text().into(), 4, limits(), &budgets).unwrap();
        assert_eq!(copy.oldest_version(), 4);
        let charged = copy.charged_bytes();
        // All four are offered; the newest three fit the log, as on the original.
        assert_eq!(copy.seed_log(ops.clone()), 3);
        assert_eq!(copy.oldest_version(), 1);
        assert_eq!(copy.log_bytes(), original.log_bytes());
        assert_eq!(copy.charged_bytes(), charged + copy.log_bytes());
        // An edit made on version 1 lands the same way on both.
        let late = Operation::new().retain(3).insert("!");
        let on_original = original.apply_operation(1, late.clone()).unwrap();
        let on_copy = copy.apply_operation(1, late).unwrap();
        assert_eq!(on_copy, on_original);
        assert_eq!(copy.text(), original.text());
        // A second seeding does nothing; a chain that does not end at the text is not kept.
        assert_eq!(copy.seed_log(ops.clone()), 0);
        let mut other = Document::loaded("xyz".into(), 4, limits(), &budgets).unwrap();
        assert_eq!(other.seed_log(ops), 0);
        assert_eq!(other.oldest_version(), 4);
    }

    #[test]
    fn short_operations_are_padded_and_long_ones_refused() {
        let mut doc = Document::new("hello".into(), limits());
        doc.apply_operation(0, Operation::new().insert("¡"))
            .unwrap();
        assert_eq!(doc.text(), "¡hello");
        assert_eq!(
            doc.apply_operation(1, Operation::new().retain(7)),
            Err(EditError::TooLong {
                spans: 7,
                length: 6,
                base: 1
            })
        );
        // Based on version 0 (5 characters) even though the document now has 6.
        doc.apply_operation(0, Operation::new().retain(5).insert("?"))
            .unwrap();
        assert_eq!(doc.text(), "¡hello?");
    }

    #[test]
    fn versions_outside_the_log_are_refused() {
        let mut doc = Document::new(String::new(), limits());
        for i in 0..5 {
            doc.apply_operation(i, Operation::new().retain(i as usize).insert("x"))
                .unwrap();
        }
        assert_eq!(doc.oldest_version(), 2);
        assert!(matches!(
            doc.apply_operation(1, Operation::new()),
            Err(EditError::StaleVersion {
                base: 1,
                oldest: 2,
                current: 5
            })
        ));
        assert!(matches!(
            doc.apply_operation(6, Operation::new()),
            Err(EditError::FutureVersion {
                base: 6,
                current: 5
            })
        ));
        assert!(doc.apply_operation(2, Operation::new()).is_ok());
    }

    #[test]
    fn the_size_limit_holds_for_operations_and_full_text() {
        let mut doc = Document::new(String::new(), limits());
        assert!(matches!(
            doc.replace(&"a".repeat(101)),
            Err(EditError::TooLarge {
                bytes: 101,
                limit: 100
            })
        ));
        doc.replace(&"a".repeat(100)).unwrap();
        assert!(matches!(
            doc.apply_operation(1, Operation::new().insert("é")),
            Err(EditError::TooLarge { bytes: 102, .. })
        ));
        assert_eq!(doc.version(), 1);
    }

    #[test]
    fn the_log_byte_limit_holds_for_the_newest_entry_too() {
        let op_bytes = Operation::new().insert("abc").weight();
        let mut doc = Document::new(
            String::new(),
            DocumentLimits {
                max_bytes: 1000,
                max_log_ops: 10,
                max_log_bytes: op_bytes + 10,
            },
        );
        doc.replace("abc").unwrap();
        assert!(doc.log_bytes() <= op_bytes + 10);
        // The next entry pushes the first one out.
        doc.replace("abcd").unwrap();
        assert_eq!(doc.oldest_version(), 1);
        assert!(doc.log_bytes() <= op_bytes + 10);
        // An entry heavier than the whole log is refused and changes nothing.
        let heavy = doc.replace(&"x".repeat(200));
        assert!(
            matches!(heavy, Err(EditError::OperationTooLarge { limit, .. }) if limit == op_bytes + 10),
            "{heavy:?}"
        );
        assert_eq!((doc.text(), doc.version()), ("abcd", 2));

        let mut zero = Document::new(
            String::new(),
            DocumentLimits {
                max_log_ops: 0,
                ..limits()
            },
        );
        zero.replace("x").unwrap();
        assert_eq!(zero.oldest_version(), 1);
        assert_eq!(zero.log_bytes(), 0);
        assert!(zero.apply_operation(0, Operation::new()).is_err());
    }

    #[test]
    fn overflowing_counts_are_refused_and_change_nothing() {
        let mut doc = Document::new("hello world".into(), limits());
        // [-2^63, 2^63 + 11]: the counts wrap to 11 with unchecked addition.
        let op: Operation =
            serde_json::from_str(&format!("[{}, {}]", i64::MIN, (1u64 << 63) + 11)).unwrap();
        assert_eq!(op.base_len(), usize::MAX);
        assert!(matches!(
            doc.apply_operation(0, op),
            Err(EditError::TooLong {
                spans: usize::MAX,
                length: 11,
                base: 0
            })
        ));
        for extreme in [
            vec![Component::Retain(usize::MAX), Component::Retain(usize::MAX)],
            vec![Component::Delete(usize::MAX), Component::Insert("x".into())],
            vec![Component::Retain(5), Component::Delete(usize::MAX - 2)],
            vec![
                Component::Delete(usize::MAX / 2 + 1),
                Component::Delete(usize::MAX / 2 + 1),
            ],
        ] {
            let op = Operation::from_components(extreme);
            assert!(doc.apply_operation(0, op).is_err());
        }
        assert_eq!((doc.text(), doc.version()), ("hello world", 0));
    }

    #[test]
    fn a_full_budget_empties_the_log_then_refuses_growth() {
        let budget = Arc::new(MemoryBudget::new(300));
        let limits = DocumentLimits {
            max_bytes: 1000,
            ..limits()
        };
        let mut doc = Document::with_budget("ab".into(), limits, &budget).unwrap();
        assert_eq!(budget.used(), doc.charged_bytes());
        // Text and log fit at first.
        doc.replace("abc").unwrap();
        assert_eq!(doc.oldest_version(), 0);
        // Grow until the log no longer fits: the edit still lands, with the log emptied.
        let mut text = "abc".to_owned();
        let mut emptied = false;
        for _ in 0..40 {
            text.push('d');
            match doc.replace(&text) {
                Ok(applied) => {
                    if doc.oldest_version() == applied.version {
                        emptied = true;
                        break;
                    }
                }
                Err(error) => panic!("{error}"),
            }
        }
        assert!(emptied, "the log was never dropped for the budget");
        assert!(budget.used() <= 300);
        // Text that does not fit at all is refused.
        assert!(matches!(
            doc.replace(&"z".repeat(400)),
            Err(EditError::OutOfMemory { limit: 300 })
        ));
        assert!(budget.used() <= 300);
        drop(doc);
        assert_eq!(budget.used(), 0);
    }
}
