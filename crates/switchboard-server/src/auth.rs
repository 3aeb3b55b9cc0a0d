//! Signed identity: the runtime verifies a JSON Web Token before a protocol sees the request.
//!
//! Opt-in: a [`crate::ServerConfig`] with an `auth` verifier refuses every WebSocket upgrade
//! without a valid token with HTTP 401, and hands the verified [`Identity`] to the protocol's
//! admission. The token comes from the `Authorization: Bearer` header or, because browsers cannot
//! set headers on a WebSocket, from the `token` query parameter.
//!
//! What is checked: the signature with the one configured algorithm (HS256 with a shared secret,
//! RS256 or ES256 with a PEM public key; a token naming any other algorithm, `none` included, is
//! refused); `exp` (required) and `nbf` (when present), with [`JwtOptions::leeway`] for clock
//! skew; `sub` (required, non-empty): the identity; `aud` and `iss` when configured. The
//! cryptography is the `jsonwebtoken` crate's, on RustCrypto primitives.
//!
//! Nothing here logs a token or a key; refusals carry a short reason that names no secret.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use switchboard_core::Identity;

/// Leeway on `exp` and `nbf` when none is configured: tolerates this much clock skew between
/// the token issuer and this server.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// Shortest HS256 secret accepted: RFC 7518 section 3.2 asks for a key at least as long as the
/// hash output (256 bits).
pub const MIN_SECRET_BYTES: usize = 32;

/// Checks besides the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtOptions {
    /// Required `aud` (the token's `aud`, a string or an array, must contain it).
    pub audience: Option<String>,
    /// Required `iss`.
    pub issuer: Option<String>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
}

impl Default for JwtOptions {
    fn default() -> Self {
        Self {
            audience: None,
            issuer: None,
            leeway: DEFAULT_LEEWAY,
        }
    }
}

/// Why a verifier could not be built (a start-up error: the server should not run).
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// The key or secret file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// The HS256 secret is shorter than [`MIN_SECRET_BYTES`].
    #[error("the HS256 secret has {0} bytes; at least {MIN_SECRET_BYTES} are required")]
    ShortSecret(usize),
    /// The public key is neither an RSA nor a P-256 EC public key in PEM.
    #[error("not an RSA or P-256 EC public key in PEM (\"-----BEGIN PUBLIC KEY-----\")")]
    BadPublicKey,
}

/// Why a token was refused. Each becomes an HTTP 401 with [`AuthError::reason`] as its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in the request.
    #[error("missing token")]
    Missing,
    /// Not a JWT, or claims that are not a JSON object.
    #[error("malformed token")]
    Malformed,
    /// The token names another algorithm than the configured one (`none` included).
    #[error("wrong token algorithm")]
    WrongAlgorithm,
    /// The signature does not verify with the configured key.
    #[error("bad token signature")]
    BadSignature,
    /// `exp` has passed (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is still ahead (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// A required claim (`exp`, `sub`) is missing or of the wrong type.
    #[error("token lacks a required claim")]
    MissingClaim,
    /// `aud` does not contain the configured audience.
    #[error("wrong token audience")]
    WrongAudience,
    /// `iss` is not the configured issuer.
    #[error("wrong token issuer")]
    WrongIssuer,
}

impl AuthError {
    /// A short reason for the 401 body and logs; it reveals nothing about the key.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "missing token",
            Self::Malformed => "malformed token",
            Self::WrongAlgorithm => "wrong token algorithm",
            Self::BadSignature => "bad token signature",
            Self::Expired => "token expired",
            Self::NotYetValid => "token not yet valid",
            Self::MissingClaim => "token lacks a required claim",
            Self::WrongAudience => "wrong token audience",
            Self::WrongIssuer => "wrong token issuer",
        }
    }
}

/// Verifies tokens with one key and one algorithm. Cheap to share behind an `Arc`.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    leeway: Duration,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.validation.algorithms)
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// HS256 with a shared `secret` of at least [`MIN_SECRET_BYTES`].
    pub fn hs256(secret: &[u8], options: JwtOptions) -> Result<Self, AuthConfigError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(AuthConfigError::ShortSecret(secret.len()));
        }
        Ok(Self::new(
            DecodingKey::from_secret(secret),
            Algorithm::HS256,
            options,
        ))
    }

    /// HS256 with the secret in `path`. One trailing line ending (`\n` or `\r\n`, as editors
    /// and `echo` write) is not part of the secret; every other byte is, whitespace included, so
    /// a random binary secret is read exactly as written.
    pub fn hs256_file(path: &Path, options: JwtOptions) -> Result<Self, AuthConfigError> {
        let bytes = read(path)?;
        Self::hs256(without_line_ending(&bytes), options)
    }

    /// RS256 for an RSA public key, ES256 for a P-256 EC public key, in PEM.
    pub fn public_key_pem(pem: &[u8], options: JwtOptions) -> Result<Self, AuthConfigError> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Self::new(key, Algorithm::RS256, options));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            return Ok(Self::new(key, Algorithm::ES256, options));
        }
        Err(AuthConfigError::BadPublicKey)
    }

    /// [`JwtVerifier::public_key_pem`] with the key in `path`.
    pub fn public_key_file(path: &Path, options: JwtOptions) -> Result<Self, AuthConfigError> {
        Self::public_key_pem(&read(path)?, options)
    }

    fn new(key: DecodingKey, algorithm: Algorithm, options: JwtOptions) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.leeway = options.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &options.audience {
            Some(audience) => validation.set_audience(&[audience]),
            // A token may carry an `aud` meant for others; without a configured audience it
            // is not checked.
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &options.issuer {
            validation.set_issuer(&[issuer]);
        }
        Self {
            key,
            validation,
            leeway: options.leeway,
        }
    }

    /// The algorithm tokens must use.
    pub fn algorithm(&self) -> Algorithm {
        self.validation
            .algorithms
            .first()
            .copied()
            .unwrap_or(Algorithm::HS256)
    }

    /// Verifies `token` and returns its identity.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|error| classify(error.kind()))?;
        let mut claims = data.claims;
        let subject = match claims.remove("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub,
            _ => return Err(AuthError::MissingClaim),
        };
        let expires_at = claims.get("exp").and_then(Value::as_u64);
        Ok(Identity::new(subject, expires_at, claims))
    }

    /// How long a connection made with `identity` may stay open: until its `exp` plus the
    /// leeway. `None` when the token has no usable `exp` (cannot happen: `exp` is required).
    pub fn remaining(&self, identity: &Identity, now: SystemTime) -> Option<Duration> {
        let exp = UNIX_EPOCH.checked_add(Duration::from_secs(identity.expires_at()?))?;
        let until = exp.checked_add(self.leeway)?;
        Some(until.duration_since(now).unwrap_or(Duration::ZERO))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AuthConfigError> {
    std::fs::read(path).map_err(|source| AuthConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn classify(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => AuthError::WrongAlgorithm,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => {
            AuthError::MissingClaim
        }
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        _ => AuthError::Malformed,
    }
}

/// The token of a request: the `Authorization: Bearer` header, else the `token` query
/// parameter.
pub(crate) fn token_from(authorization: Option<&str>, query: Option<&str>) -> Option<String> {
    if let Some(value) = authorization {
        let mut parts = value.splitn(2, ' ');
        if let (Some(scheme), Some(token)) = (parts.next(), parts.next())
            && scheme.eq_ignore_ascii_case("bearer")
        {
            let token = token.trim();
            if !token.is_empty() {
                return Some(token.to_owned());
            }
        }
    }
    switchboard_core::query::param(query?, "token").filter(|token| !token.is_empty())
}

/// `bytes` without one trailing `\n` or `\r\n`.
fn without_line_ending(bytes: &[u8]) -> &[u8] {
    match bytes.strip_suffix(b"\n") {
        Some(line) => line.strip_suffix(b"\r").unwrap_or(line),
        None => bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_loses_one_line_ending_and_nothing_else() {
        assert_eq!(without_line_ending(b" key \n"), b" key ");
        assert_eq!(without_line_ending(b"key\r\n"), b"key");
        assert_eq!(without_line_ending(b"key\n\n"), b"key\n");
        assert_eq!(without_line_ending(b"\tkey"), b"\tkey");
        assert_eq!(without_line_ending(b""), b"");
    }

    #[test]
    fn the_header_wins_over_the_query() {
        assert_eq!(
            token_from(Some("Bearer abc"), Some("token=def")).as_deref(),
            Some("abc")
        );
        assert_eq!(
            token_from(Some("bearer  abc "), None).as_deref(),
            Some("abc")
        );
        assert_eq!(
            token_from(Some("Basic abc"), Some("x=1&token=d%2Ee")).as_deref(),
            Some("d.e")
        );
        assert_eq!(token_from(None, Some("token=")), None);
        assert_eq!(token_from(None, None), None);
    }

    #[test]
    fn a_short_secret_is_refused() {
        assert!(matches!(
            JwtVerifier::hs256(b"short", JwtOptions::default()),
            Err(AuthConfigError::ShortSecret(5))
        ));
        assert!(matches!(
            JwtVerifier::public_key_pem(b"not a key", JwtOptions::default()),
            Err(AuthConfigError::BadPublicKey)
        ));
    }

    #[test]
    fn the_connection_may_stay_until_exp_plus_leeway() {
        let verifier = JwtVerifier::hs256(&[7; 32], JwtOptions::default()).unwrap();
        let identity = Identity::new("a", Some(1_000), Map::new());
        let now = UNIX_EPOCH + Duration::from_secs(990);
        assert_eq!(
            verifier.remaining(&identity, now),
            Some(Duration::from_secs(40))
        );
        let later = UNIX_EPOCH + Duration::from_secs(2_000);
        assert_eq!(verifier.remaining(&identity, later), Some(Duration::ZERO));
        assert_eq!(
            verifier.remaining(&Identity::new("a", None, Map::new()), now),
            None
        );
    }
}
