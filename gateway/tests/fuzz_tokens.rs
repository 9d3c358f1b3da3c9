//! Property tests of token checking: any input is refused or accepted without a panic, and a
//! correctly signed token is accepted exactly when its claims are what DESIGN.md asks for.

mod jwt_support;

use clap::Parser;
use gateway::config::{Cli, Settings};
use gateway::jwt::{TokenError, Verifier};
use jwt_support::{SECRET, alg_none, hs256, now};
use proptest::prelude::*;
use serde_json::{Value, json};

fn verifier() -> std::sync::Arc<Verifier> {
    let cli = Cli::parse_from(["pubgate"]);
    let env = [
        ("PUBGATE__AUTH__JWT_SECRET", SECRET),
        ("PUBGATE__AUTH__JWT_LEEWAY", "0s"),
    ]
    .map(|(k, v)| (k.into(), v.into()));
    let settings = Settings::load_with_env(&cli, env).expect("settings");
    Verifier::from_settings(&settings.auth)
        .expect("verifier")
        .expect("a key is configured")
}

/// A JSON value of any shape, for claims that should not be there.
fn any_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::from),
    ]
}

fn pattern_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(">".to_string()),
        Just("scores.*".to_string()),
        Just("a.>.b".to_string()),
        Just("".to_string()),
        "[a-z*>. ]{1,8}",
    ]
}

/// Claims with each field present, absent, or of the wrong type.
fn claims() -> impl Strategy<Value = Value> {
    let t = now();
    (
        prop_oneof![Just(json!("u1")), any_json(), Just(Value::Null)],
        prop_oneof![
            Just(json!(t + 3600)),
            Just(json!(t - 3600)),
            (0u64..u64::MAX).prop_map(Value::from),
            any_json()
        ],
        prop_oneof![
            Just(Value::Null),
            Just(json!(t - 10)),
            Just(json!(t + 3600)),
            any_json()
        ],
        prop_oneof![
            Just(Value::Null),
            prop::collection::vec(pattern_text(), 0..3).prop_map(Value::from),
            any_json()
        ],
    )
        .prop_map(|(sub, exp, nbf, subscribe)| {
            let mut c = serde_json::Map::new();
            for (k, v) in [
                ("sub", sub),
                ("exp", exp),
                ("nbf", nbf),
                ("subscribe", subscribe),
            ] {
                if !v.is_null() {
                    c.insert(k.to_string(), v);
                }
            }
            Value::Object(c)
        })
}

/// What DESIGN.md and docs/security.md say about these claims.
fn should_pass(c: &Value) -> bool {
    let t = now();
    let sub = c.get("sub").is_some_and(Value::is_string);
    let exp = c.get("exp").and_then(Value::as_u64).is_some_and(|e| e > t);
    let nbf = match c.get("nbf") {
        None => true,
        Some(v) => v.as_u64().is_some_and(|n| n <= t),
    };
    let subscribe = match c.get("subscribe") {
        None => true,
        Some(Value::Array(list)) => list.iter().all(|p| {
            p.as_str()
                .is_some_and(|p| gateway::topic::Pattern::parse(p).is_ok())
        }),
        Some(_) => false,
    };
    sub && exp && nbf && subscribe
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_is_refused_as_a_token(text in "[ -~]{0,300}") {
        prop_assert!(verifier().verify(&text).is_err());
    }

    #[test]
    fn three_base64ish_parts_are_refused(a in "[A-Za-z0-9_-]{0,60}", b in "[A-Za-z0-9_-]{0,60}", c in "[A-Za-z0-9_-]{0,60}") {
        let token = format!("{a}.{b}.{c}");
        prop_assert!(verifier().verify(&token).is_err());
    }

    #[test]
    fn signed_tokens_pass_exactly_when_their_claims_are_valid(c in claims()) {
        let v = verifier();
        let signed = v.verify(&hs256(SECRET, None, &c));
        prop_assert_eq!(signed.is_ok(), should_pass(&c), "claims {}: {:?}", c, signed);
        if let Ok(grant) = signed {
            prop_assert_eq!(Some(grant.sub.as_str()), c["sub"].as_str());
        }
        // The same claims without a valid signature never pass.
        prop_assert!(v.verify(&alg_none(&c)).is_err());
        let forged = v.verify(&hs256("not-the-secret-not-the-secret-000", None, &c));
        prop_assert!(forged.is_err());
        if should_pass(&c) {
            prop_assert_eq!(forged.err(), Some(TokenError::BadSignature));
        }
    }
}
