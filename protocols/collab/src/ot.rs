//! Operational transformation for plain text, sans-IO and pure.
//!
//! An [`Operation`] walks a document from start to end as a list of [`Component`]s: retain `n`
//! characters, insert a string, or delete `n` characters. Lengths and positions count Unicode
//! scalar values (Rust `char`s), never bytes or UTF-16 code units. An operation has a *base
//! length* (the length of the document it applies to) and a *target length* (the length after).
//!
//! The three functions every OT system needs are here:
//! - [`Operation::apply`] runs an operation on a text;
//! - [`Operation::compose`] merges `a` then `b` into one operation (clients use it to buffer
//!   local edits while one is in flight);
//! - [`transform`] takes two operations made concurrently on the same text and returns
//!   `(a', b')` so that `apply(apply(s, a), b') == apply(apply(s, b), a')`. When both insert at
//!   the same position, `a`'s text comes first.
//!
//! The wire form is the one popularised by ot.js: a positive integer retains, a string inserts,
//! a negative integer deletes, e.g. `[5, "hello", -3, 2]`.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::{SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};

/// Most components an operation may have on the wire. Real edits have a handful (a typed
/// character is `[n, "x", m]`; a client's buffered edits compose into a few per edited place), so
/// this only stops an operation made of millions of tiny components, whose memory (32 bytes per
/// component) would dwarf its text.
pub const MAX_OP_COMPONENTS: usize = 10_000;

/// One step of an [`Operation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Component {
    /// Keep the next `n` characters.
    Retain(usize),
    /// Insert this text at the current position.
    Insert(String),
    /// Remove the next `n` characters.
    Delete(usize),
}

/// Why an operation could not be applied, composed or transformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OtError {
    /// The operation expects a document of `expected` characters but got one of `actual`.
    #[error("the operation spans {expected} characters but the document has {actual}")]
    LengthMismatch {
        /// The operation's base length.
        expected: usize,
        /// The document's (or the other operation's) length.
        actual: usize,
    },
}

/// A sequence of retain/insert/delete components, kept in canonical form: no empty components,
/// no two adjacent components of the same kind, and an insert never directly after a delete
/// (it is moved in front of it; both orders mean the same edit).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Operation {
    components: Vec<Component>,
    base_len: usize,
    target_len: usize,
}

fn char_len(text: &str) -> usize {
    text.chars().count()
}

/// Splits `text` after `n` characters (or at its end).
fn split_at_char(text: &str, n: usize) -> (&str, &str) {
    match text.char_indices().nth(n) {
        Some((byte, _)) => text.split_at(byte),
        None => (text, ""),
    }
}

impl Operation {
    /// The empty operation (applies to the empty document).
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a canonical operation from components in any form (empty components are dropped,
    /// neighbours merged).
    pub fn from_components(components: impl IntoIterator<Item = Component>) -> Self {
        let mut op = Self::new();
        for component in components {
            op.push(component);
        }
        op
    }

    /// An operation that turns `old` into `new`: retain the common prefix and suffix, delete
    /// what lies between in `old`, insert what lies between in `new`.
    pub fn diff(old: &str, new: &str) -> Self {
        let old_chars: Vec<char> = old.chars().collect();
        let new_chars: Vec<char> = new.chars().collect();
        let prefix = old_chars
            .iter()
            .zip(&new_chars)
            .take_while(|(a, b)| a == b)
            .count();
        let old_rest = old_chars.get(prefix..).unwrap_or_default();
        let new_rest = new_chars.get(prefix..).unwrap_or_default();
        let suffix = old_rest
            .iter()
            .rev()
            .zip(new_rest.iter().rev())
            .take_while(|(a, b)| a == b)
            .count();
        // prefix + suffix never exceeds either length (the suffix is taken from what follows the
        // prefix); saturating keeps that an invariant rather than a panic site.
        let inserted: String = new_rest
            .get(..new_rest.len().saturating_sub(suffix))
            .unwrap_or_default()
            .iter()
            .collect();
        Self::new()
            .retain(prefix)
            .delete(old_rest.len().saturating_sub(suffix))
            .insert(&inserted)
            .retain(suffix)
    }

    /// Appends a retain of `n` characters.
    #[must_use]
    pub fn retain(mut self, n: usize) -> Self {
        self.push(Component::Retain(n));
        self
    }

    /// Appends an insert of `text`.
    #[must_use]
    pub fn insert(mut self, text: &str) -> Self {
        self.push(Component::Insert(text.to_owned()));
        self
    }

    /// Appends a delete of `n` characters.
    #[must_use]
    pub fn delete(mut self, n: usize) -> Self {
        self.push(Component::Delete(n));
        self
    }

    /// Appends `component`, keeping the operation canonical.
    pub fn push(&mut self, component: Component) {
        match component {
            Component::Retain(0) | Component::Delete(0) => {}
            Component::Insert(text) if text.is_empty() => {}
            // Lengths saturate instead of wrapping: a saturated length is larger than any real
            // document, so an operation whose counts add up past usize::MAX can never match a
            // document (a wrapped one could: [-2^63, 2^63+11] would "fit" 11 characters).
            Component::Retain(n) => {
                self.base_len = self.base_len.saturating_add(n);
                self.target_len = self.target_len.saturating_add(n);
                if let Some(Component::Retain(last)) = self.components.last_mut() {
                    *last = last.saturating_add(n);
                } else {
                    self.components.push(Component::Retain(n));
                }
            }
            Component::Delete(n) => {
                self.base_len = self.base_len.saturating_add(n);
                if let Some(Component::Delete(last)) = self.components.last_mut() {
                    *last = last.saturating_add(n);
                } else {
                    self.components.push(Component::Delete(n));
                }
            }
            Component::Insert(text) => {
                self.target_len = self.target_len.saturating_add(char_len(&text));
                let len = self.components.len();
                // Find where the insert goes: after the last component, or before a trailing
                // delete (canonical order), merging with an insert already there.
                let at = if matches!(self.components.last(), Some(Component::Delete(_))) {
                    len.saturating_sub(1)
                } else {
                    len
                };
                if let Some(before) = at.checked_sub(1)
                    && let Some(Component::Insert(previous)) = self.components.get_mut(before)
                {
                    previous.push_str(&text);
                } else {
                    self.components.insert(at, Component::Insert(text));
                }
            }
        }
    }

    /// The canonical components.
    pub fn components(&self) -> &[Component] {
        &self.components
    }

    /// The length (in characters) of the documents this operation applies to.
    pub fn base_len(&self) -> usize {
        self.base_len
    }

    /// The length (in characters) of the document after applying this operation.
    pub fn target_len(&self) -> usize {
        self.target_len
    }

    /// Whether the operation changes nothing (only retains).
    pub fn is_noop(&self) -> bool {
        self.components
            .iter()
            .all(|c| matches!(c, Component::Retain(_)))
    }

    /// Bytes of inserted text, for accounting.
    pub fn inserted_bytes(&self) -> usize {
        self.components
            .iter()
            .map(|c| match c {
                Component::Insert(text) => text.len(),
                Component::Retain(_) | Component::Delete(_) => 0,
            })
            .fold(0, usize::saturating_add)
    }

    /// The heap and inline bytes this operation holds: the struct, its component vector's
    /// capacity and every inserted string's capacity. Used to bound operation logs in bytes, so
    /// it counts allocations rather than lengths ([`Operation::shrink_to_fit`] makes them equal).
    pub fn weight(&self) -> usize {
        let strings = self
            .components
            .iter()
            .map(|c| match c {
                Component::Insert(text) => text.capacity(),
                Component::Retain(_) | Component::Delete(_) => 0,
            })
            .fold(0, usize::saturating_add);
        self.components
            .capacity()
            .saturating_mul(std::mem::size_of::<Component>())
            .saturating_add(strings)
            .saturating_add(std::mem::size_of::<Self>())
    }

    /// Drops spare capacity, so that an operation kept in a log holds only what it needs.
    pub fn shrink_to_fit(&mut self) {
        for component in &mut self.components {
            if let Component::Insert(text) = component {
                text.shrink_to_fit();
            }
        }
        self.components.shrink_to_fit();
    }

    /// Applies the operation to `doc`, whose length must be the operation's base length.
    pub fn apply(&self, doc: &str) -> Result<String, OtError> {
        let actual = char_len(doc);
        if actual != self.base_len {
            return Err(OtError::LengthMismatch {
                expected: self.base_len,
                actual,
            });
        }
        let mut out = String::with_capacity(doc.len().saturating_add(self.inserted_bytes()));
        let mut rest = doc;
        for component in &self.components {
            match component {
                Component::Retain(n) => {
                    let (kept, after) = split_at_char(rest, *n);
                    out.push_str(kept);
                    rest = after;
                }
                Component::Insert(text) => out.push_str(text),
                Component::Delete(n) => rest = split_at_char(rest, *n).1,
            }
        }
        Ok(out)
    }

    /// One operation with the effect of `self` followed by `next`.
    pub fn compose(&self, next: &Self) -> Result<Self, OtError> {
        if self.target_len != next.base_len {
            return Err(OtError::LengthMismatch {
                expected: next.base_len,
                actual: self.target_len,
            });
        }
        let mut out = Self::new();
        let mut first = self.components.iter().cloned();
        let mut second = next.components.iter().cloned();
        let mut a = first.next();
        let mut b = second.next();
        loop {
            match (a.take(), b.take()) {
                (None, None) => break,
                (Some(Component::Delete(n)), other) => {
                    out.push(Component::Delete(n));
                    a = first.next();
                    b = other;
                }
                (other, Some(Component::Insert(text))) => {
                    out.push(Component::Insert(text));
                    a = other;
                    b = second.next();
                }
                (None, Some(_)) | (Some(_), None) => {
                    // Unreachable given the length check; report rather than panic.
                    return Err(OtError::LengthMismatch {
                        expected: next.base_len,
                        actual: self.target_len,
                    });
                }
                (Some(Component::Retain(x)), Some(Component::Retain(y))) => {
                    let m = x.min(y);
                    out.push(Component::Retain(m));
                    a = rest(x, m, Component::Retain, &mut first);
                    b = rest(y, m, Component::Retain, &mut second);
                }
                (Some(Component::Retain(x)), Some(Component::Delete(y))) => {
                    let m = x.min(y);
                    out.push(Component::Delete(m));
                    a = rest(x, m, Component::Retain, &mut first);
                    b = rest(y, m, Component::Delete, &mut second);
                }
                (Some(Component::Insert(text)), Some(Component::Retain(y))) => {
                    let len = char_len(&text);
                    let m = len.min(y);
                    let (head, tail) = split_at_char(&text, m);
                    out.push(Component::Insert(head.to_owned()));
                    a = if tail.is_empty() {
                        first.next()
                    } else {
                        Some(Component::Insert(tail.to_owned()))
                    };
                    b = rest(y, m, Component::Retain, &mut second);
                }
                (Some(Component::Insert(text)), Some(Component::Delete(y))) => {
                    let len = char_len(&text);
                    let m = len.min(y);
                    let tail = split_at_char(&text, m).1;
                    a = if tail.is_empty() {
                        first.next()
                    } else {
                        Some(Component::Insert(tail.to_owned()))
                    };
                    b = rest(y, m, Component::Delete, &mut second);
                }
            }
        }
        Ok(out)
    }
}

/// What is left of a retain/delete of `total` after consuming `used`: the remainder, or the
/// iterator's next component.
fn rest(
    total: usize,
    used: usize,
    make: fn(usize) -> Component,
    iter: &mut impl Iterator<Item = Component>,
) -> Option<Component> {
    match total.checked_sub(used) {
        Some(left) if left > 0 => Some(make(left)),
        _ => iter.next(),
    }
}

/// Transforms two operations made concurrently on the same document.
///
/// Returns `(a', b')` with `apply(apply(s, a), b') == apply(apply(s, b), a')`. When both insert
/// at the same position, `a`'s insert ends up first. The server calls it as
/// `transform(incoming, already_applied).0`; a client calls it as
/// `transform(its_pending, incoming).1`, so both sides break ties the same way.
pub fn transform(a: &Operation, b: &Operation) -> Result<(Operation, Operation), OtError> {
    if a.base_len != b.base_len {
        return Err(OtError::LengthMismatch {
            expected: a.base_len,
            actual: b.base_len,
        });
    }
    let mut a_prime = Operation::new();
    let mut b_prime = Operation::new();
    let mut first = a.components.iter().cloned();
    let mut second = b.components.iter().cloned();
    let mut x = first.next();
    let mut y = second.next();
    loop {
        match (x.take(), y.take()) {
            (None, None) => break,
            (Some(Component::Insert(text)), other) => {
                b_prime.push(Component::Retain(char_len(&text)));
                a_prime.push(Component::Insert(text));
                x = first.next();
                y = other;
            }
            (other, Some(Component::Insert(text))) => {
                a_prime.push(Component::Retain(char_len(&text)));
                b_prime.push(Component::Insert(text));
                x = other;
                y = second.next();
            }
            (None, Some(_)) | (Some(_), None) => {
                // Unreachable given the length check; report rather than panic.
                return Err(OtError::LengthMismatch {
                    expected: a.base_len,
                    actual: b.base_len,
                });
            }
            (Some(Component::Retain(p)), Some(Component::Retain(q))) => {
                let m = p.min(q);
                a_prime.push(Component::Retain(m));
                b_prime.push(Component::Retain(m));
                x = rest(p, m, Component::Retain, &mut first);
                y = rest(q, m, Component::Retain, &mut second);
            }
            (Some(Component::Delete(p)), Some(Component::Delete(q))) => {
                let m = p.min(q);
                x = rest(p, m, Component::Delete, &mut first);
                y = rest(q, m, Component::Delete, &mut second);
            }
            (Some(Component::Delete(p)), Some(Component::Retain(q))) => {
                let m = p.min(q);
                a_prime.push(Component::Delete(m));
                x = rest(p, m, Component::Delete, &mut first);
                y = rest(q, m, Component::Retain, &mut second);
            }
            (Some(Component::Retain(p)), Some(Component::Delete(q))) => {
                let m = p.min(q);
                b_prime.push(Component::Delete(m));
                x = rest(p, m, Component::Retain, &mut first);
                y = rest(q, m, Component::Delete, &mut second);
            }
        }
    }
    Ok((a_prime, b_prime))
}

impl Serialize for Component {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Retain(n) => serializer.serialize_u64(*n as u64),
            Self::Insert(text) => serializer.serialize_str(text),
            // Component lengths are bounded by document sizes, far below i64::MAX.
            Self::Delete(n) => {
                serializer.serialize_i64(i64::try_from(*n).unwrap_or(i64::MAX).saturating_neg())
            }
        }
    }
}

const COMPONENT_EXPECTED: &str =
    "a positive integer (retain), a string (insert) or a negative integer (delete)";

impl<'de> Deserialize<'de> for Component {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ComponentVisitor;
        impl Visitor<'_> for ComponentVisitor {
            type Value = Component;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(COMPONENT_EXPECTED)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Component, E> {
                usize::try_from(n)
                    .map(Component::Retain)
                    .map_err(|_| E::custom("retain count is too large"))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Component, E> {
                let count = usize::try_from(n.unsigned_abs())
                    .map_err(|_| E::custom("component count is too large"))?;
                Ok(if n < 0 {
                    Component::Delete(count)
                } else {
                    Component::Retain(count)
                })
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Component, E> {
                Err(E::custom(format!(
                    "operation components must be whole numbers or strings: expected {COMPONENT_EXPECTED}"
                )))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Component, E> {
                Ok(Component::Insert(text.to_owned()))
            }
            fn visit_string<E: de::Error>(self, text: String) -> Result<Component, E> {
                Ok(Component::Insert(text))
            }
        }
        deserializer.deserialize_any(ComponentVisitor)
    }
}

impl Serialize for Operation {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.components.len()))?;
        for component in &self.components {
            seq.serialize_element(component)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Operation {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct OperationVisitor;
        impl<'de> Visitor<'de> for OperationVisitor {
            type Value = Operation;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list whose items are each {COMPONENT_EXPECTED}")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Operation, A::Error> {
                let mut op = Operation::new();
                let mut items = 0usize;
                while let Some(component) = seq.next_element::<Component>()? {
                    // Counted on the wire, before merging: the bound holds for what the parser
                    // has to hold, not only for the canonical result.
                    items = items.saturating_add(1);
                    if items > MAX_OP_COMPONENTS {
                        return Err(de::Error::custom(format!(
                            "an operation may have at most {MAX_OP_COMPONENTS} components"
                        )));
                    }
                    op.push(component);
                }
                Ok(op)
            }
        }
        deserializer.deserialize_seq(OperationVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(json: &str) -> Operation {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn wire_form_round_trips_and_is_canonical() {
        let parsed = op(r#"[2, 3, "ab", 0, "", -1, "c", -2]"#);
        assert_eq!(serde_json::to_string(&parsed).unwrap(), r#"[5,"abc",-3]"#);
        assert_eq!(parsed.base_len(), 8);
        assert_eq!(parsed.target_len(), 8);
    }

    #[test]
    fn bad_components_are_rejected_with_a_clear_message() {
        let err = serde_json::from_str::<Operation>("[1.5]").unwrap_err();
        assert!(err.to_string().contains("whole numbers"), "{err}");
        let err = serde_json::from_str::<Operation>("[true]").unwrap_err();
        assert!(
            err.to_string().contains("positive integer (retain)"),
            "{err}"
        );
        assert!(serde_json::from_str::<Operation>("{}").is_err());
        assert_eq!(
            op(&format!("[{}]", i64::MIN)).components(),
            [Component::Delete(1 << 63)]
        );
    }

    #[test]
    fn applies_counting_unicode_characters() {
        let doc = "héllo 🌍!";
        let edit = Operation::new()
            .retain(6)
            .delete(1)
            .insert("wörld")
            .retain(1);
        assert_eq!(edit.apply(doc).unwrap(), "héllo wörld!");
        assert_eq!(
            Operation::new().retain(3).apply(doc),
            Err(OtError::LengthMismatch {
                expected: 3,
                actual: 8
            })
        );
    }

    #[test]
    fn concurrent_inserts_at_the_same_place_keep_both() {
        let doc = "ab";
        let a = Operation::new().retain(1).insert("X").retain(1);
        let b = Operation::new().retain(1).insert("Y").retain(1);
        let (a2, b2) = transform(&a, &b).unwrap();
        let left = b2.apply(&a.apply(doc).unwrap()).unwrap();
        let right = a2.apply(&b.apply(doc).unwrap()).unwrap();
        assert_eq!(left, "aXYb");
        assert_eq!(left, right);
    }

    #[test]
    fn overlapping_deletes_delete_once() {
        let doc = "abcdef";
        let a = Operation::new().retain(1).delete(3).retain(2);
        let b = Operation::new().retain(2).delete(3).retain(1);
        let (a2, b2) = transform(&a, &b).unwrap();
        assert_eq!(b2.apply(&a.apply(doc).unwrap()).unwrap(), "af");
        assert_eq!(a2.apply(&b.apply(doc).unwrap()).unwrap(), "af");
    }

    #[test]
    fn compose_equals_applying_in_sequence() {
        let doc = "hello";
        let a = Operation::new().retain(5).insert(" world");
        let b = Operation::new().delete(1).insert("J").retain(10);
        let ab = a.compose(&b).unwrap();
        assert_eq!(ab.apply(doc).unwrap(), "Jello world");
        assert!(a.compose(&a).is_err());
    }

    #[test]
    fn diff_keeps_common_prefix_and_suffix() {
        let d = Operation::diff("let x = 1;", "let y = 1;");
        assert_eq!(serde_json::to_string(&d).unwrap(), r#"[4,"y",-1,5]"#);
        assert_eq!(d.apply("let x = 1;").unwrap(), "let y = 1;");
        assert!(Operation::diff("same", "same").is_noop());
        assert_eq!(Operation::diff("aaa", "aa").apply("aaa").unwrap(), "aa");
        assert_eq!(Operation::diff("", "🌍").apply("").unwrap(), "🌍");
    }
}
