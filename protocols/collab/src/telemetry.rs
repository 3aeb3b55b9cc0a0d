//! collab's Prometheus series, recorded through the `metrics` facade: a no-op until the binary
//! installs a recorder. `docs/protocols/collab.md` ("Metrics") lists every series. Labels take
//! only the fixed values written here (change kinds, frame types), never a session, user,
//! document text or address.

/// Edits applied: appended to the session's log, by `kind` (`operation`, `full_text`).
pub const OPERATIONS: &str = "switchboard_collab_operations_total";
/// Operations applied after being transformed against concurrent ones.
pub const TRANSFORMED: &str = "switchboard_collab_operations_transformed_total";
/// `session-state` resyncs sent after a refused edit.
pub const RESYNCS: &str = "switchboard_collab_resyncs_total";
/// `join-session`s accepted.
pub const JOINS: &str = "switchboard_collab_joins_total";
/// Sessions created with `POST /api/sessions`.
pub const SESSIONS_CREATED: &str = "switchboard_collab_sessions_created_total";
/// `error` frames sent, by the `frame` they answer.
pub const ERRORS: &str = "switchboard_collab_errors_total";

/// Counts one applied edit; `concurrent` is the number of operations it was transformed
/// against (0 for a full text or an operation on the newest version).
pub(crate) fn operation_applied(full_text: bool, concurrent: u64) {
    let kind = if full_text { "full_text" } else { "operation" };
    metrics::counter!(OPERATIONS, "kind" => kind).increment(1);
    if concurrent > 0 {
        metrics::counter!(TRANSFORMED).increment(1);
    }
}

/// Counts one `session-state` resync sent.
pub(crate) fn resynced() {
    metrics::counter!(RESYNCS).increment(1);
}

/// Counts one accepted join.
pub(crate) fn joined() {
    metrics::counter!(JOINS).increment(1);
}

/// Counts one session created over REST.
pub(crate) fn session_created() {
    metrics::counter!(SESSIONS_CREATED).increment(1);
}

/// Counts one `error` frame answering a `frame`: a client frame type, `invalid` (not a known
/// frame), `open` (the connection could not be opened) or `resync` (a resync refused).
pub(crate) fn error(frame: &'static str) {
    metrics::counter!(ERRORS, "frame" => frame).increment(1);
}
