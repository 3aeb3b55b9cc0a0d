//! reqack's Prometheus series, recorded through the `metrics` facade: a no-op until the binary
//! installs a recorder. `docs/protocols/reqack.md` ("Metrics") lists every series. Labels take
//! only the fixed values written here (payload types, outcomes, event types), never a user,
//! request id, message or address.

use crate::messages::{ErrorCode, ServerEvent};

/// Requests answered, by `payload_type` and `outcome`.
pub const REQUESTS: &str = "switchboard_reqack_requests_total";
/// Events put in outboxes (durable) or sent to the sockets open now (ephemeral), by `event_type`.
pub const EVENTS: &str = "switchboard_reqack_events_total";
/// Acks that removed an event from its outbox.
pub const ACKS: &str = "switchboard_reqack_acks_total";
/// Events sent again, by `trigger` (`reconnect`, `timeout`).
pub const REDELIVERED: &str = "switchboard_reqack_redelivered_total";
/// Events this node queued that are not known to be acknowledged.
pub const PENDING_EVENTS: &str = "switchboard_reqack_pending_events";

/// How a request was answered, for [`REQUESTS`]'s `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Run, and answered with its result.
    Ok,
    /// A retry of a request id already answered: the remembered response, nothing run.
    Retry,
    /// Answered with this error.
    Failed(ErrorCode),
}

/// Counts one answered request.
pub(crate) fn request(payload_type: Option<&str>, outcome: Outcome) {
    let outcome = match outcome {
        Outcome::Ok => "ok",
        Outcome::Retry => "retry",
        Outcome::Failed(code) => code_label(code),
    };
    metrics::counter!(
        REQUESTS,
        "payload_type" => payload_type_label(payload_type),
        "outcome" => outcome
    )
    .increment(1);
}

/// Counts `count` events of `event`'s type (one recorder call for a whole fan-out).
pub(crate) fn events(event: &ServerEvent, count: usize) {
    if count > 0 {
        metrics::counter!(EVENTS, "event_type" => event_type_label(event)).increment(as_u64(count));
    }
}

/// Counts one ack that removed its event.
pub(crate) fn acked() {
    metrics::counter!(ACKS).increment(1);
}

/// Counts `count` events sent again because a socket opened (`reconnect`) or they stayed
/// unacked for the redelivery timeout (`timeout`).
pub(crate) fn redelivered(trigger: &'static str, count: usize) {
    if count > 0 {
        metrics::counter!(REDELIVERED, "trigger" => trigger).increment(as_u64(count));
    }
}

/// Sets the node's pending-event gauge.
pub(crate) fn pending(events: usize) {
    // Exact up to 2^53 events, far beyond any configurable bound.
    metrics::gauge!(PENDING_EVENTS).set(events as f64);
}

fn as_u64(count: usize) -> u64 {
    u64::try_from(count).unwrap_or(u64::MAX)
}

/// The `payload_type` label: one of the nine request types, or `other` (unknown or missing), so
/// a client cannot mint label values.
fn payload_type_label(payload_type: Option<&str>) -> &'static str {
    match payload_type {
        Some("new") => "new",
        Some("edit") => "edit",
        Some("delete") => "delete",
        Some("dlvrd") => "dlvrd",
        Some("read") => "read",
        Some("call") => "call",
        Some("newCall") => "newCall",
        Some("closeCall") => "closeCall",
        Some("history") => "history",
        _ => "other",
    }
}

/// The `outcome` label of a failed request: its error code in lower case.
fn code_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::InvalidJson => "invalid_json",
        ErrorCode::UnknownType => "unknown_type",
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::NotFound => "not_found",
        ErrorCode::Forbidden => "forbidden",
        ErrorCode::UnknownPayloadType => "unknown_payload_type",
        ErrorCode::UnknownEventType => "unknown_event_type",
        ErrorCode::RateLimited => "rate_limited",
        ErrorCode::OutboxFull => "outbox_full",
        ErrorCode::LimitReached => "limit_reached",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::Internal => "internal",
    }
}

/// The `event_type` label: the event's `eventType` on the wire.
fn event_type_label(event: &ServerEvent) -> &'static str {
    match event {
        ServerEvent::New(_) => "new",
        ServerEvent::Edit(_) => "edit",
        ServerEvent::Delete(_) => "delete",
        ServerEvent::Dlvrd(_) => "dlvrd",
        ServerEvent::Read(_) => "read",
        ServerEvent::Call(_) => "call",
        ServerEvent::NewCall(_) => "newCall",
        ServerEvent::CloseCall(_) => "closeCall",
        ServerEvent::Typing(_) => "typing",
        ServerEvent::Online(_) => "online",
        ServerEvent::Offline(_) => "offline",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unknown payload types collapse to `other`: a client cannot mint label values.
    #[test]
    fn payload_type_labels_are_a_fixed_set() {
        assert_eq!(payload_type_label(Some("newCall")), "newCall");
        assert_eq!(payload_type_label(Some("anything")), "other");
        assert_eq!(payload_type_label(Some("NEW")), "other");
        assert_eq!(payload_type_label(None), "other");
    }
}
