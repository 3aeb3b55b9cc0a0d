//! Who a client is, when the server checks: the claims of a signed token verified at connect.
//!
//! The runtime verifies the token (signature, `exp`, `nbf`, and `aud`/`iss` when configured)
//! before a protocol sees the request; a protocol only reads the result. Without signed identity
//! configured there is no [`Identity`], and each protocol keeps the identity its spec describes
//! (an IP, a query parameter, a HELLO frame).

use std::sync::Arc;

use serde_json::{Map, Value};

/// A verified identity: the token's `sub` and its other claims.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity(Arc<Claims>);

#[derive(Debug, PartialEq)]
struct Claims {
    subject: String,
    expires_at: Option<u64>,
    claims: Map<String, Value>,
}

impl Identity {
    /// An identity for `subject`, valid until `expires_at` (Unix seconds; `None`: no expiry),
    /// with the token's other `claims`.
    pub fn new(
        subject: impl Into<String>,
        expires_at: Option<u64>,
        claims: Map<String, Value>,
    ) -> Self {
        Self(Arc::new(Claims {
            subject: subject.into(),
            expires_at,
            claims,
        }))
    }

    /// The token's `sub`: the user this connection acts as.
    pub fn subject(&self) -> &str {
        &self.0.subject
    }

    /// When the token expires (its `exp`, Unix seconds), if it does.
    pub fn expires_at(&self) -> Option<u64> {
        self.0.expires_at
    }

    /// Claim `name` of the token (any claim, registered or private).
    pub fn claim(&self, name: &str) -> Option<&Value> {
        self.0.claims.get(name)
    }
}

/// How an HTTP request (not an upgrade) stands with signed identity.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Caller {
    /// Signed identity is not configured: the protocol's own rules apply.
    #[default]
    Open,
    /// Signed identity is configured and the request carried no token. A valid token was not
    /// required to reach the protocol (a demo page must load before it can pass one on); the
    /// protocol refuses whatever needs an identity with 401.
    Anonymous,
    /// The request carried a valid token.
    Verified(Identity),
}

impl Caller {
    /// The verified identity, if any.
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Self::Verified(identity) => Some(identity),
            Self::Open | Self::Anonymous => None,
        }
    }

    /// Whether signed identity is configured (the request may still be anonymous).
    pub fn auth_enabled(&self) -> bool {
        !matches!(self, Self::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_reads_its_claims() {
        let mut claims = Map::new();
        claims.insert("sessions".into(), serde_json::json!(["a"]));
        let identity = Identity::new("alice", Some(10), claims);
        assert_eq!(identity.subject(), "alice");
        assert_eq!(identity.expires_at(), Some(10));
        assert_eq!(identity.claim("sessions"), Some(&serde_json::json!(["a"])));
        assert!(identity.claim("other").is_none());
        let caller = Caller::Verified(identity.clone());
        assert_eq!(caller.identity(), Some(&identity));
        assert!(caller.auth_enabled());
        assert!(!Caller::Open.auth_enabled());
        assert!(Caller::Anonymous.auth_enabled());
        assert!(Caller::Anonymous.identity().is_none());
    }
}
