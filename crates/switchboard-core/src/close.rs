//! Why a connection ends, and the WebSocket close code that says so.

use std::borrow::Cow;

/// A WebSocket close code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// RFC 6455 close code.
    pub code: u16,
    /// Human-readable reason (at most 123 bytes on the wire; longer reasons are cut).
    pub reason: Cow<'static, str>,
}

impl CloseReason {
    /// 1000: the purpose of the connection is fulfilled.
    pub const NORMAL: u16 = 1000;
    /// 1001: the server is going away (shutdown) or the peer went silent.
    pub const GOING_AWAY: u16 = 1001;
    /// 1002: the peer broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// 1007: a text message was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// 1008: the peer violated a policy (slow consumer, too many sessions, ...).
    pub const POLICY: u16 = 1008;
    /// 1009: a message was larger than the configured limit.
    pub const TOO_BIG: u16 = 1009;
    /// 1011: the server hit an internal error.
    pub const INTERNAL: u16 = 1011;
    /// 1013: the server is temporarily out of a shared resource; try again later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// 4401 (private use, after HTTP 401): the signed token the connection was opened with has
    /// expired; reconnect with a fresh one.
    pub const TOKEN_EXPIRED: u16 = 4401;

    /// A close with any code and reason.
    pub fn new(code: u16, reason: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }

    /// 1000 with the given reason.
    pub fn normal(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(Self::NORMAL, reason)
    }

    /// 4401 "token expired": the connection's signed token is no longer valid.
    pub fn token_expired() -> Self {
        Self::new(Self::TOKEN_EXPIRED, "token expired")
    }

    /// 1008 "slow consumer": the peer's outbound queue overflowed.
    pub fn slow_consumer() -> Self {
        Self::new(Self::POLICY, "slow consumer")
    }

    /// 1008 "write timeout": the socket accepted no bytes for the write timeout.
    pub fn write_timeout() -> Self {
        Self::new(Self::POLICY, "write timeout")
    }

    /// 1008 "message timeout": an inbound message was not completed in time.
    pub fn message_timeout() -> Self {
        Self::new(Self::POLICY, "message timeout")
    }

    /// 1013 "try again later": the server-wide budget for messages in flight is spent.
    pub fn try_again_later() -> Self {
        Self::new(Self::TRY_AGAIN_LATER, "server busy, try again later")
    }

    /// 1007 "invalid UTF-8": a text message was not valid UTF-8.
    pub fn invalid_utf8() -> Self {
        Self::new(Self::INVALID_PAYLOAD, "invalid UTF-8")
    }

    /// 1001 "server shutting down".
    pub fn shutdown() -> Self {
        Self::new(Self::GOING_AWAY, "server shutting down")
    }

    /// 1001 "idle timeout": nothing was heard from the peer for too long.
    pub fn idle_timeout() -> Self {
        Self::new(Self::GOING_AWAY, "idle timeout")
    }

    /// 1009 "message too big".
    pub fn too_big() -> Self {
        Self::new(Self::TOO_BIG, "message too big")
    }

    /// The reason trimmed to the 123 bytes a close frame can carry, on a character boundary.
    pub fn wire_reason(&self) -> &str {
        let mut end = self.reason.len().min(123);
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        &self.reason[..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_reason_is_cut_on_a_char_boundary() {
        let long = "é".repeat(100);
        let reason = CloseReason::normal(long);
        assert!(reason.wire_reason().len() <= 123);
        assert_eq!(reason.wire_reason().chars().count(), 61);
    }
}
