//! The client half of the collab OT algorithm, sans-IO: what an editor must do so that its text
//! converges with the server's.
//!
//! A client has at most one operation *in flight* (sent, not yet acknowledged) and buffers
//! further local edits, composed into one operation, until the ack arrives. Every operation the
//! server relays (`code-update`) is concurrent with the client's in-flight and buffered edits,
//! so the client transforms it against them before applying it to its own text:
//!
//! ```text
//! (inflight', incoming')  = transform(inflight, incoming)
//! (buffer',   incoming'') = transform(buffer, incoming')
//! text = apply(text, incoming'')
//! ```
//!
//! This is the ot.js client state machine; the server side is [`crate::Document`].

use crate::ot::{Operation, OtError, transform};

/// An operation to send as `code-change` `{baseVersion, ops}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingEdit {
    /// The version the operation is based on: the last version this client has seen.
    pub base_version: u64,
    /// The operation.
    pub op: Operation,
}

/// One client's view of a collab document.
#[derive(Debug, Clone)]
pub struct ClientDocument {
    text: String,
    version: u64,
    inflight: Option<Operation>,
    buffer: Option<Operation>,
}

impl ClientDocument {
    /// Starts from a `session-state` (`code`, `version`).
    pub fn new(text: impl Into<String>, version: u64) -> Self {
        Self {
            text: text.into(),
            version,
            inflight: None,
            buffer: None,
        }
    }

    /// The local text (including edits the server has not confirmed yet).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The last server version this client has seen.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether every local edit has been acknowledged.
    pub fn is_synchronized(&self) -> bool {
        self.inflight.is_none() && self.buffer.is_none()
    }

    /// The length of the local text in characters (what a local operation's base length must be).
    pub fn len_chars(&self) -> usize {
        self.text.chars().count()
    }

    /// A local edit: applies it to the text and returns what to send now, if anything (nothing
    /// while another operation is in flight; it is buffered instead).
    pub fn edit(&mut self, op: Operation) -> Result<Option<OutgoingEdit>, OtError> {
        self.text = op.apply(&self.text)?;
        if self.inflight.is_none() {
            self.inflight = Some(op.clone());
            return Ok(Some(OutgoingEdit {
                base_version: self.version,
                op,
            }));
        }
        self.buffer = Some(match self.buffer.take() {
            Some(buffer) => buffer.compose(&op)?,
            None => op,
        });
        Ok(None)
    }

    /// A `code-ack {version}`: the in-flight operation became `version`. Returns the buffered
    /// operation to send next, if any.
    pub fn ack(&mut self, version: u64) -> Option<OutgoingEdit> {
        self.version = version;
        self.inflight = self.buffer.take();
        self.inflight.clone().map(|op| OutgoingEdit {
            base_version: version,
            op,
        })
    }

    /// A `code-update {version, ops}` from another client: transforms it against the local
    /// pending edits and applies it.
    pub fn remote(&mut self, version: u64, op: &Operation) -> Result<(), OtError> {
        let mut incoming = op.clone();
        if let Some(inflight) = self.inflight.take() {
            let (inflight, rest) = transform(&inflight, &incoming)?;
            self.inflight = Some(inflight);
            incoming = rest;
        }
        if let Some(buffer) = self.buffer.take() {
            let (buffer, rest) = transform(&buffer, &incoming)?;
            self.buffer = Some(buffer);
            incoming = rest;
        }
        self.text = incoming.apply(&self.text)?;
        self.version = version;
        Ok(())
    }

    /// A fresh `session-state` (after a refused edit): starts over from the server's text and
    /// drops every pending local edit.
    pub fn reset(&mut self, text: impl Into<String>, version: u64) {
        *self = Self::new(text, version);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::{Document, DocumentLimits};

    #[test]
    fn two_clients_editing_at_once_converge_through_the_server() {
        let limits = DocumentLimits {
            max_bytes: 1000,
            max_log_ops: 10,
            max_log_bytes: 10_000,
        };
        let mut server = Document::new("abc".into(), limits);
        let mut alice = ClientDocument::new("abc", 0);
        let mut bob = ClientDocument::new("abc", 0);

        let a = alice
            .edit(Operation::new().insert("A").retain(3))
            .unwrap()
            .unwrap();
        // Alice keeps typing while her first edit is in flight: buffered.
        assert!(
            alice
                .edit(Operation::new().retain(4).insert("!"))
                .unwrap()
                .is_none()
        );
        let b = bob
            .edit(Operation::new().retain(3).insert("B"))
            .unwrap()
            .unwrap();

        // The server applies Alice's edit, then Bob's; each client sees events in that order.
        let applied_a = server.apply_operation(a.base_version, a.op).unwrap();
        let applied_b = server.apply_operation(b.base_version, b.op).unwrap();
        let buffered = alice.ack(applied_a.version).unwrap();
        assert_eq!(buffered.base_version, 1);
        alice.remote(applied_b.version, &applied_b.op).unwrap();
        bob.remote(applied_a.version, &applied_a.op).unwrap();
        assert!(bob.ack(applied_b.version).is_none());

        let applied = server
            .apply_operation(buffered.base_version, buffered.op)
            .unwrap();
        assert!(alice.ack(applied.version).is_none());
        bob.remote(applied.version, &applied.op).unwrap();

        assert_eq!(server.text(), "Aabc!B");
        assert_eq!(alice.text(), server.text());
        assert_eq!(bob.text(), server.text());
        assert!(alice.is_synchronized() && bob.is_synchronized());
    }
}
