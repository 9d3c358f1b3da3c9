//! JSON Web Tokens: the keys a node trusts, and checking a token against them.
//!
//! The algorithm of a token is taken from the configured key it names, never from the token: a key
//! is loaded together with the one algorithm it may verify, and a token whose header claims another
//! (`none`, HS256 against an RSA key, …) is refused before any signature check.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::Auth;
use crate::topic::{Pattern, any_matches, grants};

/// Largest token accepted, in bytes: a token is checked before anything else of a connection is
/// known, so its cost must be bounded.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Largest JWKS file read at start.
const MAX_JWKS_BYTES: u64 = 1024 * 1024;

/// Why the JWT settings could not be loaded; names the key.
#[derive(Debug, thiserror::Error)]
pub enum JwtConfigError {
    /// A key file could not be read.
    #[error("config: {key}: cannot read {path}: {source}")]
    Read {
        /// The setting.
        key: &'static str,
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A key or key set is not usable.
    #[error("config: {key}: {message}")]
    Invalid {
        /// The setting.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Why a token was refused. Logged and counted; never sent to the client, whose 401 says only
/// that the token is missing or invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts of JSON, an unknown `alg` (including `none`), or too long.
    #[error("malformed token")]
    Malformed,
    /// The header names a `kid` no configured key has, or none and no key is without one.
    #[error("unknown key id")]
    UnknownKey,
    /// The header's `alg` is not the algorithm of the key it names.
    #[error("algorithm does not match the key")]
    WrongAlgorithm,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `aud` or `iss` is not the configured one.
    #[error("wrong audience or issuer")]
    WrongAudienceOrIssuer,
    /// A required claim is missing or a claim has the wrong type or an invalid topic pattern.
    #[error("invalid claims")]
    InvalidClaims,
}

impl TokenError {
    /// A short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::UnknownKey => "unknown_kid",
            TokenError::WrongAlgorithm => "wrong_alg",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::WrongAudienceOrIssuer => "wrong_aud_iss",
            TokenError::InvalidClaims => "invalid_claims",
        }
    }
}

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The `sub` claim.
    pub sub: String,
    /// The `exp` claim (seconds since the Unix epoch).
    pub exp: u64,
    /// Topics the holder may subscribe to (and read the history of).
    pub subscribe: Vec<Pattern>,
    /// Topics the holder may publish to.
    pub publish: Vec<Pattern>,
}

impl Grant {
    /// Whether the holder may subscribe to `topic` (a topic or a wildcard, see [`grants`]).
    pub fn may_subscribe(&self, topic: &str) -> bool {
        grants(&self.subscribe, topic)
    }

    /// Whether the holder may publish to `topic`.
    pub fn may_publish(&self, topic: &str) -> bool {
        any_matches(&self.publish, topic)
    }
}

/// The claims pubgate reads. Registered claims other than these are checked by `Validation`.
#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

/// One trusted key and the only algorithm it verifies.
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// The keys of a node and the claim rules, built once at start.
pub struct Verifier {
    /// From `auth.jwt_secret`, `auth.jwt_public_key` and `auth.jwks_file`.
    keys: Vec<Key>,
    /// From `auth.jwks_url`, replaced by each successful fetch ([`remote`]).
    remote: RwLock<Arc<Vec<Key>>>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway: Duration,
}

impl Verifier {
    /// Builds the verifier from `[auth]`, or `None` when no JWT key is configured.
    pub fn from_settings(auth: &Auth) -> Result<Option<Arc<Verifier>>, JwtConfigError> {
        let mut keys = Vec::new();
        if let Some(secret) = &auth.jwt_secret {
            keys.push(Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
            });
        }
        if let Some(path) = &auth.jwt_public_key {
            let pem = read("auth.jwt_public_key", path, MAX_JWKS_BYTES)?;
            keys.push(pem_key(&pem)?);
        }
        if let Some(path) = &auth.jwks_file {
            let text = read("auth.jwks_file", path, MAX_JWKS_BYTES)?;
            keys.extend(jwks_keys(&text, "auth.jwks_file")?);
        }
        if keys.is_empty() && auth.jwks_url.is_none() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Verifier {
            keys,
            remote: RwLock::new(Arc::new(Vec::new())),
            audience: auth.jwt_audience.clone(),
            issuer: auth.jwt_issuer.clone(),
            leeway: auth.jwt_leeway,
        })))
    }

    /// The clock-skew allowance applied to `exp` and `nbf`.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// Checks a token and returns what it grants.
    pub fn verify(&self, token: &str) -> Result<Grant, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let remote = self.remote_keys();
        let all = || self.keys.iter().chain(remote.iter());
        let key =
            match &header.kid {
                Some(kid) => all().find(|k| k.kid.as_deref() == Some(kid)),
                // Without a kid: the key configured without one (jwt_secret / jwt_public_key) whose
                // algorithm the token names, or the only key there is.
                None => all().find(|k| k.kid.is_none() && k.alg == header.alg).or(
                    if all().count() == 1 {
                        all().next()
                    } else {
                        None
                    },
                ),
            }
            .ok_or(TokenError::UnknownKey)?;
        if header.alg != key.alg {
            return Err(TokenError::WrongAlgorithm);
        }
        let mut v = Validation::new(key.alg);
        v.leeway = self.leeway.as_secs();
        v.validate_nbf = true;
        // A configured audience or issuer is required, not just checked when present: a token
        // minted for no audience must not pass where one is expected.
        let mut required = vec!["exp", "sub"];
        match &self.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            // Without this, a token that carries `aud` would be refused when none is configured.
            None => v.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        v.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &v).map_err(|e| classify(&e))?;
        let patterns = |list: &[String]| -> Result<Vec<Pattern>, TokenError> {
            list.iter()
                .map(|p| Pattern::parse(p).map_err(|_| TokenError::InvalidClaims))
                .collect()
        };
        Ok(Grant {
            sub: data.claims.sub,
            exp: data.claims.exp,
            subscribe: patterns(&data.claims.subscribe)?,
            publish: patterns(&data.claims.publish)?,
        })
    }
}

impl Verifier {
    fn remote_keys(&self) -> Arc<Vec<Key>> {
        // A poisoned lock only means a panic while swapping an Arc; the value is whole.
        self.remote
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the keys from `auth.jwks_url`.
    fn set_remote(&self, keys: Vec<Key>) {
        *self.remote.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
    }
}

fn classify(e: &jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => TokenError::BadSignature,
        K::ExpiredSignature => TokenError::Expired,
        K::ImmatureSignature => TokenError::NotYetValid,
        K::InvalidAudience | K::InvalidIssuer => TokenError::WrongAudienceOrIssuer,
        K::InvalidAlgorithm | K::InvalidAlgorithmName => TokenError::WrongAlgorithm,
        K::MissingRequiredClaim(_) | K::InvalidClaimFormat(_) | K::Json(_) => {
            TokenError::InvalidClaims
        }
        _ => TokenError::Malformed,
    }
}

fn read(key: &'static str, path: &Path, max: u64) -> Result<String, JwtConfigError> {
    let err = |source| JwtConfigError::Read {
        key,
        path: path.display().to_string(),
        source,
    };
    let len = std::fs::metadata(path).map_err(err)?.len();
    if len > max {
        return Err(JwtConfigError::Invalid {
            key,
            message: format!("{} is larger than {max} bytes", path.display()),
        });
    }
    std::fs::read_to_string(path).map_err(err)
}

/// An RSA public key verifies RS256 only, an EC P-256 key ES256 only.
fn pem_key(pem: &str) -> Result<Key, JwtConfigError> {
    let (alg, key) = if let Ok(k) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
        (Algorithm::RS256, k)
    } else if let Ok(k) = DecodingKey::from_ec_pem(pem.as_bytes()) {
        (Algorithm::ES256, k)
    } else {
        return Err(JwtConfigError::Invalid {
            key: "auth.jwt_public_key",
            message: "not a PEM RSA or EC (P-256) public key".into(),
        });
    };
    Ok(Key {
        kid: None,
        alg,
        key,
    })
}

/// Reads a JWKS (`{"keys":[…]}`). Every key needs a `kid` (that is how tokens choose it); its
/// algorithm is the one its `alg` names, or the one its type implies (RSA → RS256, EC P-256 →
/// ES256, oct → HS256), and the two must agree.
fn jwks_keys(text: &str, setting: &'static str) -> Result<Vec<Key>, JwtConfigError> {
    let bad = |message: String| JwtConfigError::Invalid {
        key: setting,
        message,
    };
    let set: JwkSet =
        serde_json::from_str(text).map_err(|e| bad(format!("not a JWKS document: {e}")))?;
    let mut keys: Vec<Key> = Vec::with_capacity(set.keys.len());
    for (i, jwk) in set.keys.iter().enumerate() {
        let kid = jwk
            .common
            .key_id
            .clone()
            .ok_or_else(|| bad(format!("keys[{i}] has no \"kid\"")))?;
        if keys.iter().any(|k| k.kid.as_deref() == Some(&kid)) {
            return Err(bad(format!("keys[{i}]: kid {kid:?} appears twice")));
        }
        let alg = jwk_algorithm(jwk).ok_or_else(|| {
            bad(format!(
                "keys[{i}] ({kid}): only RSA (RS256), EC P-256 (ES256) and oct (HS256) keys are supported, with a matching \"alg\""
            ))
        })?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(format!("keys[{i}] ({kid}): {e}")))?;
        keys.push(Key {
            kid: Some(kid),
            alg,
            key,
        });
    }
    Ok(keys)
}

fn jwk_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
        _ => return None,
    };
    let named = match jwk.common.key_algorithm {
        None => return Some(implied),
        Some(KeyAlgorithm::RS256) => Algorithm::RS256,
        Some(KeyAlgorithm::ES256) => Algorithm::ES256,
        Some(KeyAlgorithm::HS256) => Algorithm::HS256,
        Some(_) => return None,
    };
    (named == implied).then_some(implied)
}

pub mod remote;

#[cfg(test)]
mod bench;
