//! Signed identity: which sessions a verified token may use.
//!
//! The token's optional `sessions` claim restricts the session ids it may join or create: the
//! string `"*"` (or no claim at all) allows any session, an array of strings allows exactly
//! those ids. Anything else is not a grant this server understands and allows nothing (a
//! typo in the issuer must not open every session).

use serde_json::Value;
use switchboard_core::{Caller, HttpResponse, Identity};

/// The claim naming the sessions a token may use.
pub(crate) const CLAIM: &str = "sessions";

/// What a token's `sessions` claim allows.
#[derive(Debug, PartialEq, Eq)]
enum Grant<'a> {
    /// Every session (no claim, or `"*"`).
    Any,
    /// Exactly these session ids.
    Only(Vec<&'a str>),
    /// A claim of another shape: nothing.
    Malformed,
}

fn grant(identity: &Identity) -> Grant<'_> {
    match identity.claim(CLAIM) {
        None => Grant::Any,
        Some(Value::String(any)) if any == "*" => Grant::Any,
        Some(Value::Array(ids)) => ids
            .iter()
            .map(Value::as_str)
            .collect::<Option<Vec<_>>>()
            .map_or(Grant::Malformed, Grant::Only),
        Some(_) => Grant::Malformed,
    }
}

/// Whether `identity` may join or create session `id`; the reason for a 403 otherwise.
pub(crate) fn check(identity: &Identity, id: &str) -> Result<(), String> {
    match grant(identity) {
        Grant::Any => Ok(()),
        Grant::Only(ids) if ids.contains(&id) => Ok(()),
        Grant::Only(_) => Err(format!(
            "the token's \"{CLAIM}\" claim does not include this session"
        )),
        Grant::Malformed => Err(format!(
            "the token's \"{CLAIM}\" claim must be \"*\" or an array of session ids"
        )),
    }
}

/// Whether `caller` may use the REST API on session `id` (`None`: create a session, whose id
/// the server picks, so only a token allowed any session may). The response to send otherwise:
/// 401 without a token when the server requires them, 403 when the claim does not allow it.
pub(crate) fn rest(caller: &Caller, id: Option<&str>) -> Result<(), HttpResponse> {
    let identity = match caller {
        Caller::Open => return Ok(()),
        Caller::Anonymous => {
            return Err(HttpResponse::json_error(
                401,
                "a signed token is required (Authorization: Bearer or ?token=)",
            ));
        }
        Caller::Verified(identity) => identity,
    };
    let allowed = match id {
        Some(id) => check(identity, id),
        None if grant(identity) == Grant::Any => Ok(()),
        None => Err(format!(
            "creating a session needs a token allowed every session (no \"{CLAIM}\" claim, or \"*\")"
        )),
    };
    allowed.map_err(|reason| HttpResponse::json_error(403, &reason))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use serde_json::{Map, json};

    use super::*;

    fn token(claim: Option<Value>) -> Identity {
        let mut claims = Map::new();
        if let Some(claim) = claim {
            claims.insert(CLAIM.to_owned(), claim);
        }
        Identity::new("alice", None, claims)
    }

    #[test]
    fn the_claim_allows_any_session_the_listed_ones_or_none() {
        for any in [None, Some(json!("*"))] {
            assert_eq!(check(&token(any.clone()), "abc"), Ok(()), "{any:?}");
        }
        let listed = token(Some(json!(["abc", "def"])));
        assert_eq!(check(&listed, "abc"), Ok(()));
        assert_eq!(check(&listed, "def"), Ok(()));
        assert!(check(&listed, "ABC").is_err(), "ids are compared exactly");
        assert!(check(&listed, "xyz").is_err());
        assert!(check(&token(Some(json!([]))), "abc").is_err());
        // Only "*" itself, an array of strings, or nothing is understood; an array holding "*"
        // lists a session id no session can have.
        for nothing in [
            json!("abc"),
            json!(null),
            json!(1),
            json!({"abc": true}),
            json!(["abc", 1]),
            json!(["*"]),
        ] {
            let refused = check(&token(Some(nothing.clone())), "abc");
            assert!(refused.is_err(), "{nothing}");
        }
    }

    #[test]
    fn rest_needs_a_token_and_creation_needs_every_session() {
        assert!(rest(&Caller::Open, None).is_ok());
        assert!(rest(&Caller::Open, Some("abc")).is_ok());
        for id in [None, Some("abc")] {
            let refused = rest(&Caller::Anonymous, id).unwrap_err();
            assert_eq!(refused.status, 401);
        }
        let any = Caller::Verified(token(None));
        assert!(rest(&any, None).is_ok());
        assert!(rest(&any, Some("abc")).is_ok());
        let listed = Caller::Verified(token(Some(json!(["abc"]))));
        assert_eq!(rest(&listed, None).unwrap_err().status, 403);
        assert!(rest(&listed, Some("abc")).is_ok());
        assert_eq!(rest(&listed, Some("def")).unwrap_err().status, 403);
    }
}
