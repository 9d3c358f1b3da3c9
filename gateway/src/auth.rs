//! Who may connect, subscribe and publish.
//!
//! Three kinds of callers: anonymous clients (with the topic patterns of `auth.anonymous_*`),
//! backends holding one of `auth.api_keys` (HTTP API), and holders of a JWT whose `subscribe` and
//! `publish` claims list their topic patterns ([`crate::jwt`]).

use std::sync::Arc;

use subtle::ConstantTimeEq;

use crate::config::Settings;
use crate::jwt::remote::JwksSource;
use crate::jwt::{Grant, TokenError, Verifier};
use crate::topic::{Pattern, any_matches, grants};

/// What the node allows, built once from settings.
pub struct Access {
    anonymous: bool,
    anonymous_subscribe: Vec<Pattern>,
    anonymous_publish: Vec<Pattern>,
    /// Every API key, with the topics it is limited to (`None`: every topic).
    api_keys: Vec<(Vec<u8>, Option<Arc<KeyScope>>)>,
    jwt: Option<Arc<Verifier>>,
    jwks: Option<Arc<JwksSource>>,
}

/// Who is on a connection, or sent an HTTP request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// No credentials.
    Anonymous,
    /// A backend with one of `auth.api_keys` (HTTP API only): it may publish to and read every
    /// topic.
    ApiKey,
    /// The holder of a valid JWT, with what it grants.
    Token(Arc<Grant>),
    /// A backend with one of `auth.scoped_api_keys` (HTTP API only): the topics of its patterns.
    ScopedKey(Arc<KeyScope>),
}

/// The topics a scoped API key may publish to and read.
#[derive(Debug, PartialEq, Eq)]
pub struct KeyScope {
    publish: Vec<Pattern>,
    subscribe: Vec<Pattern>,
}

/// A refused request, with the reason to report. The text goes to the client, so it never says
/// why a token failed (that is logged instead, see [`Denied::token`]).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Denied {
    /// What the client is told.
    pub message: &'static str,
    /// Why a presented token was refused, for logs and metrics.
    pub token: Option<TokenError>,
}

impl Denied {
    fn missing(message: &'static str) -> Denied {
        Denied {
            message,
            token: None,
        }
    }

    fn bad_token(e: TokenError) -> Denied {
        Denied {
            message: "missing or invalid credentials",
            token: Some(e),
        }
    }
}

impl Access {
    /// Whether any credential can be presented to this node (API keys or JWTs): then an anonymous
    /// request that is refused is told to authenticate (401), not that it may never (403).
    pub fn takes_credentials(&self) -> bool {
        !self.api_keys.is_empty() || self.jwt.is_some() || self.jwks.is_some()
    }

    /// Applies the defaults of DESIGN.md: anonymous access to everything while no credential is
    /// configured, none once one is.
    pub fn from_settings(s: &Settings) -> anyhow::Result<Access> {
        let jwt = Verifier::from_settings(&s.auth)?;
        let jwks = match &jwt {
            Some(v) => JwksSource::new(&s.auth, v.clone())?,
            None => None,
        };
        if let Some(source) = &jwks {
            source.spawn();
        }
        let open = !s.has_credentials();
        let patterns = |key: &str, list: &Option<Vec<String>>| -> anyhow::Result<Vec<Pattern>> {
            let default = if open { vec![">".to_string()] } else { vec![] };
            list.as_ref()
                .unwrap_or(&default)
                .iter()
                .map(|p| Pattern::parse(p).map_err(|e| anyhow::anyhow!("config: {key}: {e}")))
                .collect()
        };
        Ok(Access {
            anonymous: s.auth.anonymous.unwrap_or(open),
            anonymous_subscribe: patterns("auth.anonymous_subscribe", &s.auth.anonymous_subscribe)?,
            anonymous_publish: patterns("auth.anonymous_publish", &s.auth.anonymous_publish)?,
            api_keys: s
                .auth
                .api_keys
                .iter()
                .map(|k| Ok((k.as_bytes().to_vec(), None)))
                .chain(s.auth.scoped_api_keys.iter().enumerate().map(|(i, k)| {
                    let scope = KeyScope {
                        publish: patterns(
                            &format!("auth.scoped_api_keys[{i}].publish"),
                            &Some(k.publish.clone()),
                        )?,
                        subscribe: patterns(
                            &format!("auth.scoped_api_keys[{i}].subscribe"),
                            &Some(k.subscribe.clone()),
                        )?,
                    };
                    Ok((k.key.as_bytes().to_vec(), Some(Arc::new(scope))))
                }))
                .collect::<anyhow::Result<_>>()?,
            jwt,
            jwks,
        })
    }

    /// Runs a check again after fetching `auth.jwks_url` when it failed only because the token
    /// named an unknown `kid` (the provider may have rotated its keys); the fetch is rate limited
    /// ([`JwksSource::refetch`]).
    pub async fn with_fresh_keys<T>(
        &self,
        check: impl Fn() -> Result<T, Denied>,
    ) -> Result<T, Denied> {
        let first = check();
        match (&first, &self.jwks) {
            (
                Err(Denied {
                    token: Some(TokenError::UnknownKey),
                    ..
                }),
                Some(source),
            ) => {
                // Boxed: a fetch's state (TLS, HTTP client) is large and rare, and every HTTP
                // connection's request future would otherwise reserve room for it.
                Box::pin(source.refetch()).await;
                check()
            }
            _ => first,
        }
    }

    /// Whether anyone may connect and do everything without a credential: the out-of-the-box
    /// node for local use, which start-up warns about.
    pub fn is_open(&self) -> bool {
        self.anonymous
            && self.jwt.is_none()
            && self.api_keys.is_empty()
            && any_matches(&self.anonymous_subscribe, "any")
            && any_matches(&self.anonymous_publish, "any")
    }

    /// The JWT verifier, when JWTs are configured.
    pub fn jwt(&self) -> Option<&Verifier> {
        self.jwt.as_deref()
    }

    /// Checks a JWT (a WebSocket `refresh`).
    pub fn verify_token(&self, token: &str) -> Result<Identity, Denied> {
        let Some(jwt) = &self.jwt else {
            return Err(Denied::missing("this node does not take tokens"));
        };
        jwt.verify(token)
            .map(|g| Identity::Token(Arc::new(g)))
            .map_err(Denied::bad_token)
    }

    /// Identifies a WebSocket client from its upgrade request: a JWT from `Authorization: Bearer`
    /// or the `access_token` query parameter (browsers cannot set headers on a WebSocket), else
    /// anonymous where allowed. A token that is presented but invalid is refused even where
    /// anonymous clients are allowed, so that a client is never silently given fewer rights than
    /// it asked for. Without JWT keys configured a token is ignored.
    pub fn identify(&self, req: &http::request::Parts) -> Result<Identity, Denied> {
        let header = req
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        let token = header.or_else(|| req.uri.query().and_then(access_token));
        match (&self.jwt, token) {
            (Some(_), Some(token)) => self.verify_token(token),
            _ if self.anonymous => Ok(Identity::Anonymous),
            _ => Err(Denied::missing("missing or invalid credentials")),
        }
    }

    /// Identifies the sender of an HTTP read (`GET /v1/history`) from its `Authorization` header:
    /// a configured API key, or an anonymous client where those are allowed (`auth.anonymous`).
    /// Refused (401) when a credential is required and missing, or when one is sent but is not a
    /// configured key. Without configured keys a bearer token means nothing and is not checked.
    pub fn identify_http(&self, authorization: Option<&str>) -> Result<Identity, Denied> {
        if (self.api_keys.is_empty() && self.jwt.is_none()) || authorization.is_none() {
            return if self.anonymous {
                Ok(Identity::Anonymous)
            } else {
                Err(Denied::missing(
                    "missing Authorization: Bearer <api key or token>",
                ))
            };
        }
        self.credential(authorization)
    }

    /// Identifies the sender of an HTTP publish: an API key (any topic) or a JWT (the topics of
    /// its `publish` claim). Without keys or JWTs configured anyone may publish over HTTP (the node
    /// is then meant for a trusted network).
    pub fn identify_publisher(&self, authorization: Option<&str>) -> Result<Identity, Denied> {
        if self.api_keys.is_empty() && self.jwt.is_none() {
            return Ok(Identity::ApiKey);
        }
        self.credential(authorization)
    }

    /// An API key, else a JWT, from `Authorization: Bearer`.
    fn credential(&self, authorization: Option<&str>) -> Result<Identity, Denied> {
        let Some(token) = authorization.and_then(bearer) else {
            return Err(Denied::missing(
                "missing Authorization: Bearer <api key or token>",
            ));
        };
        let bytes = token.as_bytes();
        // Every key is compared, in constant time, so the time taken says nothing about a key.
        let mut matched = None;
        for (key, scope) in &self.api_keys {
            if bool::from(key.as_slice().ct_eq(bytes)) {
                matched = Some(scope);
            }
        }
        match matched {
            Some(None) => return Ok(Identity::ApiKey),
            Some(Some(scope)) => return Ok(Identity::ScopedKey(scope.clone())),
            None => {}
        }
        match &self.jwt {
            Some(_) => self.verify_token(token),
            None => Err(Denied::missing("unknown api key")),
        }
    }

    /// Whether `who` may read `topic`: subscribe to it over WebSocket (live, or resuming with
    /// `since`), or read its history over HTTP. One rule for both, so that no path shows a topic's
    /// messages to a client the other refuses.
    pub fn may_subscribe(&self, who: &Identity, topic: &str) -> bool {
        match who {
            Identity::Anonymous => grants(&self.anonymous_subscribe, topic),
            Identity::ApiKey => true,
            // A token adds to what anyone may do where anonymous clients are let in: a signed-in
            // client need not open a second, anonymous connection for the public topics.
            Identity::Token(g) => {
                g.may_subscribe(topic)
                    || (self.anonymous && grants(&self.anonymous_subscribe, topic))
            }
            Identity::ScopedKey(k) => grants(&k.subscribe, topic),
        }
    }

    /// Whether `who` may publish to `topic` (WebSocket or HTTP).
    pub fn may_publish(&self, who: &Identity, topic: &str) -> bool {
        match who {
            Identity::Anonymous => any_matches(&self.anonymous_publish, topic),
            Identity::ApiKey => true,
            Identity::Token(g) => {
                g.may_publish(topic)
                    || (self.anonymous && any_matches(&self.anonymous_publish, topic))
            }
            Identity::ScopedKey(k) => any_matches(&k.publish, topic),
        }
    }
}

/// The token of an `Authorization: Bearer …` header.
fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The `access_token` query parameter. Tokens are base64url and dots, so they need no
/// percent-decoding; one that was encoded anyway fails verification like any other bad token.
fn access_token(query: &str) -> Option<&str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("access_token="))
        .filter(|t| !t.is_empty())
}
