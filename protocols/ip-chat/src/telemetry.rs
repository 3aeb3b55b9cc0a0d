//! ip-chat's Prometheus series, recorded through the `metrics` facade: a no-op until the binary
//! installs a recorder. `docs/protocols/ip-chat.md` ("Metrics") lists every series. Labels take
//! only the fixed values written here, never a user, address or message.

use crate::errors;
use crate::messages::ReactionAction;

/// Messages stored (or, with no history, broadcast) by the engine.
pub const MESSAGES: &str = "switchboard_ip_chat_messages_total";
/// Reaction toggles applied and broadcast, by `action` (`added`, `removed`).
pub const REACTIONS: &str = "switchboard_ip_chat_reactions_total";
/// Requests refused with an `error` frame, by `reason`.
pub const REFUSALS: &str = "switchboard_ip_chat_refusals_total";
/// History replays sent to joining clients.
pub const HISTORY_REPLAYS: &str = "switchboard_ip_chat_history_replays_total";

/// One message was accepted: the engine stored or published it.
pub(crate) fn message_accepted() {
    metrics::counter!(MESSAGES).increment(1);
}

/// One reaction toggle was applied and its `reaction_updated` ordered.
pub(crate) fn reaction_accepted(action: ReactionAction) {
    let action = match action {
        ReactionAction::Added => "added",
        ReactionAction::Removed => "removed",
    };
    metrics::counter!(REACTIONS, "action" => action).increment(1);
}

/// One request was refused with the error text `text`.
pub(crate) fn refused(text: &str) {
    metrics::counter!(REFUSALS, "reason" => refusal_reason(text)).increment(1);
}

/// One joining client was given the history replay.
pub(crate) fn history_replayed() {
    metrics::counter!(HISTORY_REPLAYS).increment(1);
}

/// The `reason` label of a refusal, from its text: the texts are the fixed set of
/// [`errors`] plus three formatted ones with fixed openings, so the label set stays fixed too
/// (anything unforeseen is `other`).
pub(crate) fn refusal_reason(text: &str) -> &'static str {
    match text {
        errors::INVALID_FORMAT | errors::EMPTY => "invalid",
        errors::NOT_FOUND => "not_found",
        errors::TOO_LARGE => "too_large",
        errors::TOO_MANY_REACTIONS => "too_many_reactions",
        errors::STATE_FULL => "state_full",
        errors::UNAVAILABLE => "unavailable",
        _ if text.starts_with("Rate limit exceeded") => "rate_limited",
        _ if text.starts_with("message too long") => "too_large",
        _ if text.starts_with("too many ") => "too_many_reactions",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every refusal text ip-chat sends maps to a named reason, not `other`.
    #[test]
    fn every_refusal_text_has_a_reason() {
        let cases = [
            (errors::INVALID_FORMAT, "invalid"),
            (errors::EMPTY, "invalid"),
            (errors::NOT_FOUND, "not_found"),
            (errors::TOO_LARGE, "too_large"),
            (errors::TOO_MANY_REACTIONS, "too_many_reactions"),
            (errors::STATE_FULL, "state_full"),
            (errors::UNAVAILABLE, "unavailable"),
            (
                "Rate limit exceeded. Maximum 60 messages per minute.",
                "rate_limited",
            ),
            (
                "Rate limit exceeded. Maximum 60 reactions per minute.",
                "rate_limited",
            ),
            ("message too long (max 500 characters)", "too_large"),
            (
                "too many different reactions on this message (max 16)",
                "too_many_reactions",
            ),
            (
                "too many reactions with this emoji on this message (max 100)",
                "too_many_reactions",
            ),
            ("something new", "other"),
        ];
        for (text, reason) in cases {
            assert_eq!(refusal_reason(text), reason, "{text}");
        }
    }
}
