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

/// Who is on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// No credentials.
    Anonymous,
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

    /// Whether `who` may subscribe to `topic`.
    pub fn may_subscribe(&self, who: Identity, topic: &str) -> bool {
        match who {
            Identity::Anonymous => any_matches(&self.anonymous_subscribe, topic),
        }
    }

    /// Whether `who` may publish to `topic` over WebSocket.
    pub fn may_publish(&self, who: Identity, topic: &str) -> bool {
        match who {
            Identity::Anonymous => any_matches(&self.anonymous_publish, topic),
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
