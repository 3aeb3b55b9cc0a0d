//! Signed tokens for tests: HS256, RS256 and ES256 keys generated in the test, and tokens
//! minted with them (also deliberately broken ones).
//!
//! ```no_run
//! use switchboard_testkit::jwt::{Keys, claims};
//! let keys = Keys::hs256();
//! let token = keys.token(&claims("alice", 3600));
//! let verifier = keys.verifier();
//! ```

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use serde_json::{Value, json};
use switchboard_server::{JwtOptions, JwtVerifier};

/// Unix seconds now.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `{"sub": sub, "exp": now + expires_in}` (a negative `expires_in` is already expired).
pub fn claims(sub: &str, expires_in: i64) -> Value {
    json!({ "sub": sub, "exp": now() + expires_in })
}

/// A signing key and the matching verification key, for one algorithm.
#[derive(Clone)]
pub struct Keys {
    algorithm: Algorithm,
    encoding: Arc<EncodingKey>,
    /// What the server is given: the shared secret (HS256) or the public key in PEM.
    verifying: Vec<u8>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// A fresh random 32-byte HS256 secret.
    pub fn hs256() -> Self {
        let mut secret = vec![0u8; 32];
        rsa::rand_core::RngCore::fill_bytes(&mut rsa::rand_core::OsRng, &mut secret);
        Self {
            algorithm: Algorithm::HS256,
            encoding: Arc::new(EncodingKey::from_secret(&secret)),
            verifying: secret,
        }
    }

    /// A fresh 2048-bit RSA key pair (RS256).
    pub fn rs256() -> Self {
        let private =
            rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("generate an RSA key");
        let private_pem = private
            .to_pkcs8_pem(LineEnding::LF)
            .expect("encode the RSA private key");
        let public_pem = private
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("encode the RSA public key");
        Self {
            algorithm: Algorithm::RS256,
            encoding: Arc::new(
                EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("RSA signing key"),
            ),
            verifying: public_pem.into_bytes(),
        }
    }

    /// One RS256 key pair shared by every caller in this process: generating one takes a
    /// while, and tests only need a key that is not the HS256 one.
    pub fn rs256_shared() -> Self {
        static KEYS: std::sync::OnceLock<Keys> = std::sync::OnceLock::new();
        KEYS.get_or_init(Self::rs256).clone()
    }

    /// A fresh P-256 key pair (ES256).
    pub fn es256() -> Self {
        let pair = rcgen::KeyPair::generate().expect("generate a P-256 key");
        Self {
            algorithm: Algorithm::ES256,
            encoding: Arc::new(
                EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).expect("EC signing key"),
            ),
            verifying: pair.public_key_pem().into_bytes(),
        }
    }

    /// The algorithm these keys sign with.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// What the server verifies with: the HS256 secret, or the public key PEM. Write it to a
    /// file for `--auth-jwt-secret-file` / `--auth-jwt-public-key`.
    pub fn verifying_key(&self) -> &[u8] {
        &self.verifying
    }

    /// A verifier for these keys with default options.
    pub fn verifier(&self) -> Arc<JwtVerifier> {
        self.verifier_with(JwtOptions::default())
    }

    /// A verifier for these keys with `options`.
    pub fn verifier_with(&self, options: JwtOptions) -> Arc<JwtVerifier> {
        let verifier = match self.algorithm {
            Algorithm::HS256 => JwtVerifier::hs256(&self.verifying, options),
            _ => JwtVerifier::public_key_pem(&self.verifying, options),
        };
        Arc::new(verifier.expect("a verifier for generated keys"))
    }

    /// A token with `claims`, signed by these keys.
    pub fn token(&self, claims: &Value) -> String {
        jsonwebtoken::encode(&Header::new(self.algorithm), claims, &self.encoding)
            .expect("sign a token")
    }
}

/// Tokens for `sub` that a server verifying with `keys` must refuse (401), each with what is
/// wrong with it: expired, not yet valid, signed by another key, unsigned (`alg: none`), and a
/// good token whose payload was changed to another subject.
pub fn refused_tokens(keys: &Keys, sub: &str) -> Vec<(&'static str, String)> {
    let other_key = match keys.algorithm {
        Algorithm::HS256 => Keys::hs256(),
        _ => Keys::es256(),
    };
    let good = keys.token(&claims(sub, 60));
    vec![
        ("expired", keys.token(&claims(sub, -120))),
        (
            "not yet valid",
            keys.token(&json!({"sub": sub, "exp": now() + 600, "nbf": now() + 300})),
        ),
        ("another key", other_key.token(&claims(sub, 60))),
        ("alg none", alg_none(&claims(sub, 60))),
        ("tampered", tampered(&good, &claims("someone-else", 60))),
    ]
}

/// An unsigned token (`"alg": "none"`) with `claims`.
pub fn alg_none(claims: &Value) -> String {
    let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    format!("{header}.{}.", b64(claims.to_string().as_bytes()))
}

/// `token` with its payload replaced by `claims`, the signature kept (so it no longer matches).
pub fn tampered(token: &str, claims: &Value) -> String {
    let mut parts = token.split('.');
    let header = parts.next().unwrap_or_default();
    let _payload = parts.next();
    let signature = parts.next().unwrap_or_default();
    format!(
        "{header}.{}.{signature}",
        b64(claims.to_string().as_bytes())
    )
}

fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len() * 4 / 3 + 3);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_without_padding() {
        assert_eq!(b64(b""), "");
        assert_eq!(b64(b"f"), "Zg");
        assert_eq!(b64(b"fo"), "Zm8");
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn minted_tokens_verify_and_broken_ones_do_not() {
        for keys in [Keys::hs256(), Keys::es256()] {
            let verifier = keys.verifier();
            let token = keys.token(&claims("alice", 60));
            assert_eq!(verifier.verify(&token).unwrap().subject(), "alice");
            assert!(
                verifier
                    .verify(&tampered(&token, &claims("mallory", 60)))
                    .is_err()
            );
            assert!(verifier.verify(&alg_none(&claims("alice", 60))).is_err());
        }
    }
}
