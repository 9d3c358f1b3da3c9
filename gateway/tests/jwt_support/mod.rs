//! Keys and tokens for the JWT tests: fresh RSA and EC keys from rcgen, tokens minted with
//! jsonwebtoken, and hand-made tokens the library would never produce (`alg: none`).

#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The HS256 secret test servers are started with (at least 32 bytes, as config requires).
pub const SECRET: &str = "test-secret-test-secret-test-secret";

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Claims that pass every check: `sub`, `exp` an hour ahead, and the given permissions.
pub fn claims(subscribe: &[&str], publish: &[&str]) -> Value {
    json!({"sub": "user-1", "exp": now() + 3600, "subscribe": subscribe, "publish": publish})
}

/// An asymmetric key pair: the private key to sign with, the public key PEM to configure.
pub struct KeyPair {
    /// PKCS#8 private key PEM.
    pub private_pem: String,
    /// SubjectPublicKeyInfo PEM.
    pub public_pem: String,
    raw_public: Vec<u8>,
}

impl KeyPair {
    /// A fresh RSA 2048 key.
    pub fn rsa() -> KeyPair {
        KeyPair::generate(&rcgen::PKCS_RSA_SHA256)
    }

    /// A fresh EC P-256 key.
    pub fn ec() -> KeyPair {
        KeyPair::generate(&rcgen::PKCS_ECDSA_P256_SHA256)
    }

    fn generate(alg: &'static rcgen::SignatureAlgorithm) -> KeyPair {
        let k = rcgen::KeyPair::generate_for(alg).expect("generate key");
        KeyPair {
            private_pem: k.serialize_pem(),
            public_pem: k.public_key_pem(),
            raw_public: k.public_key_raw().to_vec(),
        }
    }

    /// The JWK of an EC P-256 public key, with a `kid`.
    pub fn ec_jwk(&self, kid: &str) -> Value {
        // public_key_raw of an EC key is the uncompressed point: 0x04, x (32 bytes), y (32 bytes).
        let (x, y) = self.raw_public[1..].split_at(32);
        json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
               "x": B64.encode(x), "y": B64.encode(y)})
    }

    /// Signs `claims` with this key.
    pub fn sign(&self, alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
        let key = match alg {
            Algorithm::ES256 | Algorithm::ES384 => {
                EncodingKey::from_ec_pem(self.private_pem.as_bytes())
            }
            _ => EncodingKey::from_rsa_pem(self.private_pem.as_bytes()),
        }
        .expect("encoding key");
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&header, claims, &key).expect("sign")
    }
}

/// An HS256 token signed with `secret`.
pub fn hs256(secret: &str, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign")
}

/// A token whose header says `alg: none` and whose signature is empty.
pub fn alg_none(claims: &Value) -> String {
    let header = B64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = B64.encode(claims.to_string());
    format!("{header}.{payload}.")
}
