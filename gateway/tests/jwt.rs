//! JWT auth against the real binary: which tokens pass the upgrade, what their claims allow on
//! WebSocket and HTTP, refresh and expiry.

mod common;
mod jwt_support;

use std::time::Duration;

use common::{HttpClient, RawWs, Server, TempFile, WsClient, tcp_connect};
use jsonwebtoken::Algorithm;
use jwt_support::{KeyPair, SECRET, alg_none, claims, hs256, now};
use serde_json::{Value, json};

const AUD: &str = "pubgate-test";
const ISS: &str = "https://idp.test";

/// Claims valid for the audience/issuer server, with `changes` merged in.
fn full_claims(changes: Value) -> Value {
    let mut c = claims(&[">"], &[]);
    c["aud"] = json!(AUD);
    c["iss"] = json!(ISS);
    for (k, v) in changes.as_object().expect("object") {
        if v.is_null() {
            c.as_object_mut().expect("object").remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

/// The upgrade's status and body with `headers`.
async fn upgrade(server: &Server, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    match RawWs::handshake_with(tcp_connect(server.addr).await, server.addr, path, headers).await {
        Ok(_) => (101, String::new()),
        Err(r) => (r.status, r.body.clone()),
    }
}

async fn ws_with_token(server: &Server, token: &str) -> WsClient {
    WsClient::try_connect(&format!("ws://{}/ws?access_token={token}", server.addr))
        .await
        .expect("connect with token")
}

#[tokio::test]
async fn valid_tokens_connect_and_every_bad_token_gets_the_same_401() {
    let rsa = KeyPair::rsa();
    let pem = TempFile::new("rsa.pub.pem", &rsa.public_pem);
    let server = Server::builder()
        .env("PUBGATE__AUTH__JWT_SECRET", SECRET)
        .env("PUBGATE__AUTH__JWT_PUBLIC_KEY", pem.arg())
        .env("PUBGATE__AUTH__JWT_AUDIENCE", AUD)
        .env("PUBGATE__AUTH__JWT_ISSUER", ISS)
        .env("PUBGATE__AUTH__JWT_LEEWAY", "0s")
        .start()
        .await;
    let ok = full_claims(json!({}));
    let good_hs = hs256(SECRET, None, &ok);
    let good_rs = rsa.sign(Algorithm::RS256, None, &ok);
    for (what, token) in [("HS256", &good_hs), ("RS256", &good_rs)] {
        let bearer = format!("Bearer {token}");
        assert_eq!(
            upgrade(&server, "/ws", &[("Authorization", &bearer)])
                .await
                .0,
            101,
            "{what} in the Authorization header"
        );
        let path = format!("/ws?x=1&access_token={token}");
        assert_eq!(
            upgrade(&server, &path, &[]).await.0,
            101,
            "{what} in the query"
        );
    }

    let other_rsa = KeyPair::rsa();
    let bad: Vec<(&str, String)> = vec![
        (
            "expired",
            hs256(SECRET, None, &full_claims(json!({"exp": now() - 30}))),
        ),
        (
            "not yet valid",
            hs256(SECRET, None, &full_claims(json!({"nbf": now() + 600}))),
        ),
        (
            "wrong HS256 secret",
            hs256("another-secret-another-secret-0000", None, &ok),
        ),
        ("wrong RSA key", other_rsa.sign(Algorithm::RS256, None, &ok)),
        ("alg none", alg_none(&ok)),
        // HS/RS confusion: the RSA public key (which an attacker knows) used as an HMAC secret.
        (
            "HS256 keyed with the public key",
            hs256(&rsa.public_pem, None, &ok),
        ),
        (
            "RS384 (not the key's algorithm)",
            rsa.sign(Algorithm::RS384, None, &ok),
        ),
        (
            "wrong aud",
            hs256(SECRET, None, &full_claims(json!({"aud": "someone-else"}))),
        ),
        (
            "no aud",
            hs256(SECRET, None, &full_claims(json!({"aud": null}))),
        ),
        (
            "wrong iss",
            hs256(
                SECRET,
                None,
                &full_claims(json!({"iss": "https://evil.test"})),
            ),
        ),
        (
            "no iss",
            hs256(SECRET, None, &full_claims(json!({"iss": null}))),
        ),
        (
            "no sub",
            hs256(SECRET, None, &full_claims(json!({"sub": null}))),
        ),
        (
            "no exp",
            hs256(SECRET, None, &full_claims(json!({"exp": null}))),
        ),
        ("unknown kid", hs256(SECRET, Some("nope"), &ok)),
        (
            "bad pattern in claims",
            hs256(SECRET, None, &full_claims(json!({"subscribe": ["a.>.b"]}))),
        ),
        ("malformed", "not.a.token".to_string()),
        ("garbage", "%%%".to_string()),
        ("truncated", good_hs[..good_hs.len() - 5].to_string()),
        ("oversized", format!("{good_hs}{}", "A".repeat(9000))),
    ];
    let (_, first_body) = upgrade(&server, "/ws", &[]).await;
    let body: Value = serde_json::from_str(&first_body).expect("401 body is JSON");
    assert_eq!(body["code"], "forbidden", "{first_body}");
    for (what, token) in &bad {
        let bearer = format!("Bearer {token}");
        let (status, body) = upgrade(&server, "/ws", &[("Authorization", &bearer)]).await;
        assert_eq!(status, 401, "{what}: {body}");
        // Every refusal reads the same: nothing tells an attacker which check failed.
        assert_eq!(body, first_body, "{what}");
        if token.len() < 4000 {
            let (status, _) = upgrade(&server, &format!("/ws?access_token={token}"), &[]).await;
            assert_eq!(status, 401, "{what} in the query");
        }
    }
    for word in [
        "expire",
        "signature",
        "kid",
        "audience",
        "issuer",
        "algorithm",
        "nbf",
    ] {
        assert!(
            !first_body.contains(word),
            "401 body mentions {word}: {first_body}"
        );
    }
    let rejected = server
        .metric("pubgate_token_rejections_total{reason=\"expired\"}")
        .await;
    assert!(rejected >= 1.0, "expired tokens are counted");
}

#[tokio::test]
async fn es256_keys_and_a_jwks_file_choose_the_key_by_kid() {
    let ec = KeyPair::ec();
    let (k1, k2) = (KeyPair::ec(), KeyPair::ec());
    let pem = TempFile::new("ec.pub.pem", &ec.public_pem);
    let jwks = json!({"keys": [k1.ec_jwk("k1"), k2.ec_jwk("k2"),
                               {"kty": "oct", "kid": "shared", "alg": "HS256",
                                "k": "c2hhcmVkLXNlY3JldC1zaGFyZWQtc2VjcmV0LXNoYXJlZA"}]});
    let jwks = TempFile::new("jwks.json", &jwks.to_string());
    let server = Server::builder()
        .env("PUBGATE__AUTH__JWT_PUBLIC_KEY", pem.arg())
        .env("PUBGATE__AUTH__JWKS_FILE", jwks.arg())
        .start()
        .await;
    let ok = claims(&[">"], &[]);
    let cases = [
        (
            "ES256 public key",
            ec.sign(Algorithm::ES256, None, &ok),
            101,
        ),
        ("jwks k1", k1.sign(Algorithm::ES256, Some("k1"), &ok), 101),
        ("jwks k2", k2.sign(Algorithm::ES256, Some("k2"), &ok), 101),
        (
            "jwks oct",
            hs256("shared-secret-shared-secret-shared", Some("shared"), &ok),
            101,
        ),
        (
            "k2 signed, k1 named",
            k2.sign(Algorithm::ES256, Some("k1"), &ok),
            401,
        ),
        (
            "unknown kid",
            k1.sign(Algorithm::ES256, Some("k3"), &ok),
            401,
        ),
        (
            "HS256 named k1",
            hs256(&k1.public_pem, Some("k1"), &ok),
            401,
        ),
        ("alg none", alg_none(&ok), 401),
    ];
    for (what, token, status) in cases {
        let bearer = format!("Bearer {token}");
        let (got, body) = upgrade(&server, "/ws", &[("Authorization", &bearer)]).await;
        assert_eq!(got, status, "{what}: {body}");
    }
}

#[tokio::test]
async fn claims_limit_subscribe_publish_and_history_on_websocket_and_http() {
    let server = Server::builder()
        .env("PUBGATE__AUTH__JWT_SECRET", SECRET)
        .start()
        .await;
    let token = hs256(
        SECRET,
        None,
        &claims(&["scores.*", "user.42.>"], &["chat.r1"]),
    );
    let mut c = ws_with_token(&server, &token).await;
    c.subscribe("scores.nba", 1).await;
    c.subscribe("user.42.inbox", 2).await;
    c.subscribe("user.42.a.b", 3).await;
    for (id, topic) in [
        (4, "scores.nba.live"),
        (5, "news"),
        (6, "user.43.inbox"),
        (7, "user.42"),
    ] {
        let r = c
            .request(&json!({"op":"subscribe","topic":topic,"id":id}))
            .await;
        assert_eq!(r["op"], "error", "subscribe {topic}: {r}");
        assert_eq!(r["code"], "forbidden", "subscribe {topic}: {r}");
        assert_eq!(r["id"], id, "subscribe {topic}: {r}");
    }
    let r = c
        .request(&json!({"op":"publish","topic":"chat.r1","data":{"t":"hi"},"id":8}))
        .await;
    assert_eq!(r["op"], "ack", "{r}");
    let r = c
        .request(&json!({"op":"publish","topic":"chat.r2","data":1,"id":9}))
        .await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{r}"
    );
    // Refusals leave the connection open.
    c.ping_pong(10).await;

    let mut http = HttpClient::connect(server.addr).await;
    let bearer = format!("Bearer {token}");
    let auth: &[(&str, &str)] = &[("authorization", &bearer)];
    let r = http.request("POST", "/v1/publish/chat.r1", auth, "2").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http.request("POST", "/v1/publish/chat.r2", auth, "2").await;
    assert_eq!(
        (r.status, r.json()["code"].clone()),
        (403, json!("forbidden")),
        "{}",
        r.body
    );
    let batch = r#"{"messages":[{"topic":"chat.r1","data":1},{"topic":"chat.r2","data":2}]}"#;
    let r = http.request("POST", "/v1/publish", auth, batch).await;
    assert_eq!(
        r.status, 403,
        "a batch with one forbidden topic is refused whole: {}",
        r.body
    );
    let r = http.request("POST", "/v1/publish/chat.r1", &[], "2").await;
    assert_eq!(r.status, 401, "no token: {}", r.body);
    let bad = format!(
        "Bearer {}",
        hs256(
            "wrong-secret-wrong-secret-wrong-secret",
            None,
            &claims(&[], &[">"])
        )
    );
    let r = http
        .request(
            "POST",
            "/v1/publish/chat.r1",
            &[("authorization", &bad)],
            "2",
        )
        .await;
    assert_eq!(r.status, 401, "bad token: {}", r.body);
    let r = http
        .request("GET", "/v1/history/scores.nba", auth, "")
        .await;
    assert_eq!(r.status, 200, "history of an allowed topic: {}", r.body);
    let r = http.request("GET", "/v1/history/news", auth, "").await;
    assert_eq!(
        r.status, 403,
        "history of a topic outside subscribe: {}",
        r.body
    );

    // The WebSocket subscriber got the HTTP publish of a topic it may read.
    let sub_token = hs256(SECRET, None, &claims(&["chat.>"], &[]));
    let mut s = ws_with_token(&server, &sub_token).await;
    s.subscribe("chat.r1", 1).await;
    let r = http
        .request("POST", "/v1/publish/chat.r1", auth, r#"{"n":3}"#)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let m = s.recv().await;
    assert_eq!(
        (m["op"].clone(), m["data"].clone()),
        (json!("message"), json!({"n":3})),
        "{m}"
    );
}

#[tokio::test]
async fn refresh_extends_and_narrows_and_expiry_closes_with_4001() {
    let server = Server::builder()
        .env("PUBGATE__AUTH__JWT_SECRET", SECRET)
        .env("PUBGATE__AUTH__JWT_LEEWAY", "0s")
        .env("PUBGATE__AUTH__API_KEYS", "backend-key")
        .start()
        .await;
    let short = |subscribe: &[&str], secs: u64| {
        let mut c = claims(subscribe, &[]);
        c["exp"] = json!(now() + secs);
        hs256(SECRET, None, &c)
    };
    let first_exp = now() + 2;
    let mut c = ws_with_token(&server, &short(&["scores.>"], 2)).await;
    c.subscribe("scores.nba", 1).await;
    c.subscribe("scores.nhl", 2).await;

    // A bad token, or one for someone else, changes nothing.
    let r = c
        .request(&json!({"op":"refresh","token":"x.y.z","id":3}))
        .await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str()),
        (Some("error"), Some("invalid_token")),
        "{r}"
    );
    let mut other = claims(&[">"], &[]);
    other["sub"] = json!("user-2");
    let r = c
        .request(&json!({"op":"refresh","token":hs256(SECRET, None, &other),"id":4}))
        .await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str()),
        (Some("error"), Some("forbidden")),
        "{r}"
    );
    let r = c.request(&json!({"op":"refresh","id":5})).await;
    assert_eq!(r["code"], "bad_request", "{r}");

    // Narrower and longer: scores.nhl ends with a frame, then the ack names the new expiry.
    let long = short(&["scores.nba"], 3600);
    c.send_json(&json!({"op":"refresh","token":long,"id":6}))
        .await;
    let ended = c.recv().await;
    assert_eq!(
        ended,
        json!({"op":"unsubscribed","topic":"scores.nhl","reason":"forbidden"}),
        "{ended}"
    );
    let ack = c.recv().await;
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(ack["id"], 6, "{ack}");
    assert!(
        ack["exp"].as_u64().is_some_and(|e| e > now() + 3000),
        "{ack}"
    );
    let r = c
        .request(&json!({"op":"subscribe","topic":"scores.nhl","id":7}))
        .await;
    assert_eq!(r["code"], "forbidden", "{r}");

    // A client without refresh is closed with 4001 once its token expires.
    let mut e = ws_with_token(&server, &short(&[">"], 1)).await;
    e.subscribe("scores.nba", 1).await;
    let reason = e.expect_close(4001, Duration::from_secs(10)).await;
    assert_eq!(reason, "token expired");

    // The refreshed client outlives its first token's expiry and still gets messages.
    while now() <= first_exp {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.ping_pong(8).await;
    let mut http = HttpClient::connect(server.addr).await;
    let r = http
        .request(
            "POST",
            "/v1/publish/scores.nba",
            &[("authorization", "Bearer backend-key")],
            "5",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let m = c.recv().await;
    assert_eq!(
        (m["topic"].clone(), m["data"].clone()),
        (json!("scores.nba"), json!(5)),
        "{m}"
    );
    assert_eq!(server.metric("pubgate_token_expiries_total").await, 1.0);
}

/// A signed token may carry an `exp` too far out to add to the clock (2^64 - 1). That overflowed and
/// killed the connection's expiry task, so a later refresh to a short token never closed it.
#[tokio::test]
async fn an_exp_beyond_the_clock_does_not_disarm_later_expiries() {
    let server = Server::builder()
        .env("PUBGATE__AUTH__JWT_SECRET", SECRET)
        .env("PUBGATE__AUTH__JWT_LEEWAY", "0s")
        .start()
        .await;
    let with_exp = |exp: u64| {
        let mut c = claims(&[">"], &[]);
        c["exp"] = json!(exp);
        hs256(SECRET, None, &c)
    };
    let mut c = ws_with_token(&server, &with_exp(now() + 60)).await;
    let r = c
        .request(&json!({"op":"refresh","token":with_exp(u64::MAX),"id":1}))
        .await;
    assert_eq!(
        (&r["op"], &r["exp"]),
        (&json!("ack"), &json!(u64::MAX)),
        "{r}"
    );
    let r = c
        .request(&json!({"op":"refresh","token":with_exp(now() + 1),"id":2}))
        .await;
    assert_eq!(r["op"], "ack", "{r}");
    let reason = c.expect_close(4001, Duration::from_secs(10)).await;
    assert_eq!(reason, "token expired");
    assert!(
        !server.stderr().contains("panicked"),
        "{}",
        server.stderr_tail(20)
    );
}

/// A refresh verifies a signature: it shares the subscribe budget, so a client cannot spend a core
/// on refreshes while staying inside the message rate.
#[tokio::test]
async fn refreshes_share_the_subscribe_budget() {
    let server = Server::builder()
        .env("PUBGATE__AUTH__JWT_SECRET", SECRET)
        .env("PUBGATE__LIMITS__SUBSCRIBE_RATE", "1")
        .env("PUBGATE__LIMITS__SUBSCRIBE_BURST", "3")
        .start()
        .await;
    let token = hs256(SECRET, None, &claims(&[">"], &[]));
    let mut c = ws_with_token(&server, &token).await;
    let mut replies = Vec::new();
    for id in 0..5 {
        let r = c
            .request(&json!({"op":"refresh","token":token,"id":id}))
            .await;
        replies.push((r["op"].clone(), r["code"].clone()));
    }
    assert_eq!(
        replies[..3],
        [
            (json!("ack"), Value::Null),
            (json!("ack"), Value::Null),
            (json!("ack"), Value::Null)
        ]
    );
    assert_eq!(replies[3], (json!("error"), json!("rate_limited")));
    assert_eq!(replies[4], (json!("error"), json!("rate_limited")));
    c.ping_pong(9).await;
}

#[tokio::test]
async fn an_anonymous_node_ignores_tokens_and_a_disallowed_origin_is_refused() {
    let server = Server::builder()
        .env("PUBGATE__SERVER__ALLOWED_ORIGINS", "https://app.example")
        .start()
        .await;
    let (status, body) = upgrade(&server, "/ws", &[("Origin", "https://evil.example")]).await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = upgrade(&server, "/ws", &[]).await;
    assert_eq!(status, 403, "no Origin while an allowlist is set");
    let (status, _) = upgrade(&server, "/ws", &[("Origin", "https://app.example")]).await;
    assert_eq!(status, 101);
    let (status, _) = upgrade(
        &server,
        "/ws?access_token=whatever",
        &[("Origin", "https://app.example")],
    )
    .await;
    assert_eq!(status, 101, "without JWT keys a token is not checked");
    assert!(
        server.stderr().contains("NO AUTHENTICATION CONFIGURED"),
        "an open node says so at start"
    );
}

#[tokio::test]
async fn anonymous_clients_get_the_public_topics_and_a_refresh_adds_a_token() {
    let server = Server::builder()
        .env("PUBGATE__AUTH__JWT_SECRET", SECRET)
        .env("PUBGATE__AUTH__ANONYMOUS", "true")
        .env("PUBGATE__AUTH__ANONYMOUS_SUBSCRIBE", "public.>")
        .start()
        .await;
    // Without a token: the public topics only, and no publishing (a credential is configured).
    let mut c = server.ws().await;
    c.subscribe("public.news", 1).await;
    let r = c
        .request(&json!({"op":"subscribe","topic":"private.x","id":2}))
        .await;
    assert_eq!(r["code"], "forbidden", "{r}");
    let r = c
        .request(&json!({"op":"publish","topic":"public.news","data":1,"id":3}))
        .await;
    assert_eq!(r["code"], "forbidden", "{r}");
    // A token presented at the upgrade must verify, even where anonymous clients are let in.
    let (status, _) = upgrade(&server, "/ws?access_token=not.a.token", &[]).await;
    assert_eq!(status, 401);

    // Refreshing into a token keeps the public topics and adds the token's.
    let token = hs256(SECRET, None, &claims(&["private.>"], &["private.>"]));
    let ack = c
        .request(&json!({"op":"refresh","token":token,"id":4}))
        .await;
    assert_eq!(
        (ack["op"].as_str(), ack["id"].as_u64()),
        (Some("ack"), Some(4)),
        "{ack}"
    );
    c.subscribe("private.x", 5).await;
    let r = c
        .request(&json!({"op":"publish","topic":"private.y","data":2,"id":6}))
        .await;
    assert_eq!(r["op"], "ack", "{r}");
    c.ping_pong(7).await;
}
