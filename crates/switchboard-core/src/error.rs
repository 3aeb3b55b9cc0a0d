//! Core error type.

/// Errors from core helpers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A value could not be encoded as JSON.
    #[error("could not encode a frame as JSON: {0}")]
    Encode(#[source] serde_json::Error),
}
