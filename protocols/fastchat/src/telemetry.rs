//! fastchat's Prometheus series, recorded through the `metrics` facade: a no-op until the binary
//! installs a recorder. `docs/protocols/fastchat.md` ("Metrics") lists every series. Labels take
//! only the fixed values written here (outcomes, error codes, frame types), never a user, chat,
//! message id or address.

use crate::messages::{ErrorCode, Kind};

/// `MSG`s by `outcome`: `sent` (accepted, answered `MSG_ACK sent`), `queued` (accepted for an
/// offline recipient: also counted as `sent`), `delivered` (the recipient's first `MSG_ACK`),
/// `retried` (a retry of an accepted `message_id`, answered with its status).
pub const MESSAGES: &str = "switchboard_fastchat_messages_total";
/// `MSG`s refused with an `ERROR`, by `code`.
pub const MESSAGE_FAILURES: &str = "switchboard_fastchat_message_failures_total";
/// HELLOs accepted (answered `HELLO_ACK`).
pub const HELLOS: &str = "switchboard_fastchat_hellos_total";
/// Requests refused `RATE_LIMITED` for a spent budget, by `frame` and `scope`.
pub const RATE_LIMITED: &str = "switchboard_fastchat_rate_limited_total";
/// Every `ERROR` frame sent, by `code`.
pub const ERRORS: &str = "switchboard_fastchat_errors_total";

/// What became of one `MSG`; its frames are sent already, this only counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MsgOutcome {
    /// Accepted and answered `MSG_ACK sent`; `queued` when the recipient was offline.
    Sent {
        /// The message waits in the recipient's offline queue.
        queued: bool,
    },
    /// A retry of a `message_id` this sender already sent, answered with its status.
    Retried,
    /// Refused with an `ERROR` of this code.
    Refused(ErrorCode),
    /// Dropped without an answer (the frame could not be encoded).
    Dropped,
}

/// Whom a spent budget belongs to, for [`RATE_LIMITED`]'s `scope` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// The user's cluster-wide sliding window.
    User,
    /// The client's node-local token bucket or its share of users.
    Client,
}

/// Counts one `MSG`.
pub(crate) fn msg(outcome: MsgOutcome) {
    match outcome {
        MsgOutcome::Sent { queued } => {
            metrics::counter!(MESSAGES, "outcome" => "sent").increment(1);
            if queued {
                metrics::counter!(MESSAGES, "outcome" => "queued").increment(1);
            }
        }
        MsgOutcome::Retried => metrics::counter!(MESSAGES, "outcome" => "retried").increment(1),
        MsgOutcome::Refused(code) => msg_failed(code),
        MsgOutcome::Dropped => {}
    }
}

/// Counts one `MSG` refused with `code`.
pub(crate) fn msg_failed(code: ErrorCode) {
    metrics::counter!(MESSAGE_FAILURES, "code" => code.as_str()).increment(1);
}

/// Counts one message's first `MSG_ACK` from its recipient.
pub(crate) fn delivered() {
    metrics::counter!(MESSAGES, "outcome" => "delivered").increment(1);
}

/// Counts one accepted HELLO.
pub(crate) fn hello() {
    metrics::counter!(HELLOS).increment(1);
}

/// Counts one `RATE_LIMITED` refusal of a `kind` frame for a spent `scope` budget.
pub(crate) fn rate_limited(kind: Kind, scope: Scope) {
    let scope = match scope {
        Scope::User => "user",
        Scope::Client => "client",
    };
    metrics::counter!(RATE_LIMITED, "frame" => frame_label(kind), "scope" => scope).increment(1);
}

/// Counts one `ERROR` frame.
pub(crate) fn error(code: ErrorCode) {
    metrics::counter!(ERRORS, "code" => code.as_str()).increment(1);
}

/// The `frame` label: the client frame's wire type.
fn frame_label(kind: Kind) -> &'static str {
    match kind {
        Kind::Hello => "HELLO",
        Kind::OpenChat => "OPEN_CHAT",
        Kind::Msg => "MSG",
        Kind::MsgAck => "MSG_ACK",
        Kind::Typing => "TYPING",
        Kind::Ping => "PING",
    }
}
