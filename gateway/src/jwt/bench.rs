//! The cost of one token check, the work an upgrade with a JWT adds. Ignored by default; run with
//! `cargo test --release -p gateway --lib jwt::bench -- --ignored --nocapture`.

use std::time::Instant;

use jsonwebtoken::{EncodingKey, Header};

use super::*;

const N: u32 = 2000;

fn claims() -> serde_json::Value {
    serde_json::json!({"sub": "user-1", "exp": 4_000_000_000u64,
                       "subscribe": ["scores.*", "user.1.>"], "publish": ["chat.r1"]})
}

fn verifier(alg: Algorithm, key: DecodingKey) -> Verifier {
    Verifier {
        keys: vec![Key {
            kid: None,
            alg,
            key,
        }],
        remote: RwLock::new(Arc::new(Vec::new())),
        audience: None,
        issuer: None,
        leeway: Duration::from_secs(5),
    }
}

fn time(what: &str, v: &Verifier, token: &str) {
    assert!(v.verify(token).is_ok(), "{what}: the token verifies");
    let start = Instant::now();
    for _ in 0..N {
        std::hint::black_box(v.verify(std::hint::black_box(token)).is_ok());
    }
    let per = start.elapsed().as_secs_f64() * 1e6 / f64::from(N);
    println!("{what}: {per:.1} µs per token check ({N} checks)");
}

#[test]
#[ignore = "a measurement, not a check; run in release mode"]
fn token_check_cost() {
    let secret = "bench-secret-bench-secret-bench-secret";
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    time(
        "HS256",
        &verifier(
            Algorithm::HS256,
            DecodingKey::from_secret(secret.as_bytes()),
        ),
        &hs,
    );
    for (name, alg, sig) in [
        (
            "RS256 (2048-bit)",
            Algorithm::RS256,
            &rcgen::PKCS_RSA_SHA256,
        ),
        ("ES256", Algorithm::ES256, &rcgen::PKCS_ECDSA_P256_SHA256),
    ] {
        let pair = rcgen::KeyPair::generate_for(sig).unwrap();
        let private = pair.serialize_pem();
        let public = pair.public_key_pem();
        let (enc, dec) = if alg == Algorithm::RS256 {
            (
                EncodingKey::from_rsa_pem(private.as_bytes()).unwrap(),
                DecodingKey::from_rsa_pem(public.as_bytes()).unwrap(),
            )
        } else {
            (
                EncodingKey::from_ec_pem(private.as_bytes()).unwrap(),
                DecodingKey::from_ec_pem(public.as_bytes()).unwrap(),
            )
        };
        let token = jsonwebtoken::encode(&Header::new(alg), &claims(), &enc).unwrap();
        time(name, &verifier(alg, dec), &token);
    }
}
