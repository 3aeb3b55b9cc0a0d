//! The server's copy of one session's document: text, version and a bounded log of the
//! operations applied most recently, against which late operations are transformed. Sans-IO.

use std::collections::VecDeque;

use crate::ot::{Operation, OtError, transform};

/// Limits of one [`Document`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocumentLimits {
    /// Largest document, in UTF-8 bytes.
    pub max_bytes: usize,
    /// Operations kept for transforming late edits (0 accepts only edits on the latest version).
    pub max_log_ops: usize,
    /// Approximate bytes the operation log may hold; the oldest entries go first. The newest
    /// entry is always kept when `max_log_ops > 0`.
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
    /// The operation does not fit the document it claims to be based on.
    #[error(
        "the operation spans {spans} characters but the document at version {base} has {length}"
    )]
    TooLong {
        /// Characters the operation retains or deletes.
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

/// One document with its version and operation log.
#[derive(Debug, Clone)]
pub struct Document {
    text: String,
    chars: usize,
    version: u64,
    /// `log[i]` took the document from version `version - log.len() + i` to the next one.
    log: VecDeque<Operation>,
    log_bytes: usize,
    limits: DocumentLimits,
}

impl Document {
    /// A document at version 0. The caller checks `text` against the size limit.
    pub fn new(text: String, limits: DocumentLimits) -> Self {
        Self {
            chars: text.chars().count(),
            text,
            version: 0,
            log: VecDeque::new(),
            log_bytes: 0,
            limits,
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
        self.version - self.log.len() as u64
    }

    /// Applies `op`, made on version `base`, transforming it against every operation applied
    /// since. An operation shorter than the document at `base` is padded with a trailing retain.
    pub fn apply_operation(&mut self, base: u64, op: Operation) -> Result<Applied, EditError> {
        let current = self.version;
        if base > current {
            return Err(EditError::FutureVersion { base, current });
        }
        let oldest = self.oldest_version();
        if base < oldest {
            return Err(EditError::StaleVersion {
                base,
                oldest,
                current,
            });
        }
        // Lossless: base lies within [oldest, current] and the log length fits in memory.
        let skip = usize::try_from(base - oldest).unwrap_or(usize::MAX);
        let length = self.log.get(skip).map_or(self.chars, Operation::base_len);
        let mut op = op;
        if op.base_len() > length {
            return Err(EditError::TooLong {
                spans: op.base_len(),
                length,
                base,
            });
        }
        let pad = length - op.base_len();
        op = op.retain(pad);
        for applied in self.log.iter().skip(skip) {
            op = transform(&op, applied)?.0;
        }
        self.commit(op)
    }

    /// Replaces the whole text (a full-text `code-change`), as an operation on the latest version.
    pub fn replace(&mut self, text: &str) -> Result<Applied, EditError> {
        self.check_size(text.len())?;
        self.commit(Operation::diff(&self.text, text))
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

    fn commit(&mut self, op: Operation) -> Result<Applied, EditError> {
        let text = op.apply(&self.text)?;
        self.check_size(text.len())?;
        self.text = text;
        self.chars = op.target_len();
        self.version += 1;
        self.log_bytes += op.weight();
        self.log.push_back(op.clone());
        self.trim_log();
        Ok(Applied {
            op,
            version: self.version,
        })
    }

    fn trim_log(&mut self) {
        while self.log.len() > self.limits.max_log_ops
            || (self.log.len() > 1 && self.log_bytes > self.limits.max_log_bytes)
        {
            match self.log.pop_front() {
                Some(old) => self.log_bytes = self.log_bytes.saturating_sub(old.weight()),
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_log_is_bounded_by_bytes_but_keeps_the_newest_entry() {
        let mut doc = Document::new(
            String::new(),
            DocumentLimits {
                max_bytes: 1000,
                max_log_ops: 10,
                max_log_bytes: 1,
            },
        );
        doc.replace("abc").unwrap();
        doc.replace("abcd").unwrap();
        assert_eq!(doc.oldest_version(), 1);
        let zero = Document::new(
            String::new(),
            DocumentLimits {
                max_log_ops: 0,
                ..limits()
            },
        );
        let mut zero = zero;
        zero.replace("x").unwrap();
        assert_eq!(zero.oldest_version(), 1);
        assert!(zero.apply_operation(0, Operation::new()).is_err());
    }
}
