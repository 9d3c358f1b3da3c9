//! Who may connect, subscribe and publish.
//!
//! This version knows anonymous clients and HTTP API keys. JWTs (with `subscribe`/`publish` topic
//! patterns in their claims) plug in here later as another kind of [`Identity`].

use subtle::ConstantTimeEq;

use crate::config::Settings;
use crate::topic::{Pattern, any_matches};

/// What the node allows, built once from settings.
pub struct Access {
    anonymous: bool,
    anonymous_subscribe: Vec<Pattern>,
    anonymous_publish: Vec<Pattern>,
    api_keys: Vec<Vec<u8>>,
}

/// Who is on a connection, or sent an HTTP request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// No credentials.
    Anonymous,
    /// A backend with one of `auth.api_keys` (HTTP API only): it may publish to and read every
    /// topic.
    ApiKey,
}

/// A refused request, with the reason to report.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub &'static str);

impl Access {
    /// Applies the defaults of DESIGN.md: anonymous access to everything while no credential is
    /// configured, none once one is.
    pub fn from_settings(s: &Settings) -> anyhow::Result<Access> {
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
                .map(|k| k.as_bytes().to_vec())
                .collect(),
        })
    }

    /// Identifies a WebSocket client from its upgrade request.
    pub fn identify(&self, _req: &http::request::Parts) -> Result<Identity, Denied> {
        if self.anonymous {
            Ok(Identity::Anonymous)
        } else {
            Err(Denied("a token is required"))
        }
    }

    /// Identifies the sender of an HTTP read (`GET /v1/history`) from its `Authorization` header:
    /// a configured API key, or an anonymous client where those are allowed (`auth.anonymous`).
    /// Refused (401) when a credential is required and missing, or when one is sent but is not a
    /// configured key. Without configured keys a bearer token means nothing and is not checked.
    pub fn identify_http(&self, authorization: Option<&str>) -> Result<Identity, Denied> {
        if self.api_keys.is_empty() || authorization.is_none() {
            return if self.anonymous {
                Ok(Identity::Anonymous)
            } else {
                Err(Denied("missing Authorization: Bearer <api key>"))
            };
        }
        self.check_api_key(authorization)?;
        Ok(Identity::ApiKey)
    }

    /// Whether `who` may read `topic`: subscribe to it over WebSocket (live, or resuming with
    /// `since`), or read its history over HTTP. One rule for both, so that no path shows a topic's
    /// messages to a client the other refuses.
    pub fn may_subscribe(&self, who: Identity, topic: &str) -> bool {
        match who {
            Identity::Anonymous => any_matches(&self.anonymous_subscribe, topic),
            Identity::ApiKey => true,
        }
    }

    /// Whether `who` may publish to `topic` over WebSocket.
    pub fn may_publish(&self, who: Identity, topic: &str) -> bool {
        match who {
            Identity::Anonymous => any_matches(&self.anonymous_publish, topic),
            Identity::ApiKey => true,
        }
    }

    /// Checks the `Authorization` header of an HTTP publish. Without configured keys, anyone may
    /// publish over HTTP (the node is then meant for a trusted network).
    pub fn check_api_key(&self, authorization: Option<&str>) -> Result<(), Denied> {
        if self.api_keys.is_empty() {
            return Ok(());
        }
        let Some(token) = authorization.and_then(|h| h.strip_prefix("Bearer ")) else {
            return Err(Denied("missing Authorization: Bearer <api key>"));
        };
        let token = token.trim().as_bytes();
        if self
            .api_keys
            .iter()
            .any(|k| bool::from(k.as_slice().ct_eq(token)))
        {
            Ok(())
        } else {
            Err(Denied("unknown api key"))
        }
    }
}
