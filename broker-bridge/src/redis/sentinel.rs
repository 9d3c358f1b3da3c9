//! Redis behind Sentinel: finding the master, and noticing when it changes.
//!
//! Each (re)connect asks the sentinels where the master is and checks with `ROLE` that it is one.
//! After a failover Sentinel kills the clients of both old and new master, which makes the node
//! reconnect; but the old master may keep accepting writes for several seconds before Sentinel
//! demotes it, so the node also listens to Sentinel's `+switch-master` event and drops its
//! connections the moment the master changes, instead of writing into a master about to be demoted.

use std::sync::Mutex;

use futures_util::StreamExt;
use redis::{Client, ConnectionInfo, IntoConnectionInfo, RedisError, RedisResult};

use super::conn::{Target, Timeouts, config_error, connect_single};
use super::retry::backoff;
use crate::BrokerError;

/// The parts of a Sentinel URL.
#[derive(Debug)]
pub struct SentinelTarget {
    /// `redis` or `rediss`: used for the sentinels and the master alike.
    scheme: &'static str,
    /// `user:password@` for the master (and replicas), possibly empty.
    userinfo: String,
    /// The logical database on the master.
    db: i64,
    /// URL fragment/query passed on to the master URL (e.g. `#insecure`).
    suffix: String,
    /// The sentinels.
    sentinels: Vec<ConnectionInfo>,
    /// The monitored master's name.
    master: String,
    /// `host:port` of the master as last resolved.
    current: Mutex<Option<String>>,
}

/// Parses what follows `redis+sentinel://` / `rediss+sentinel://`.
pub fn parse(rest: &str, scheme: &'static str, cluster: bool) -> Result<Target, BrokerError> {
    if cluster {
        return Err(BrokerError::Config(
            "a Sentinel URL cannot be used with broker.kind = \"redis-cluster\"".into(),
        ));
    }
    let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (main, fragment) = main.split_once('#').unwrap_or((main, ""));
    let (authority, path) = main.split_once('/').unwrap_or((main, ""));
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    let mut parts = path.split('/').filter(|s| !s.is_empty());
    let master = parts
        .next()
        .ok_or_else(|| BrokerError::Config("the Sentinel URL needs the master name as its path: redis+sentinel://host:port/mymaster".into()))?
        .to_string();
    let db = match parts.next() {
        Some(db) => db
            .parse()
            .map_err(|e| config_error("invalid database number in the Sentinel URL", e))?,
        None => 0,
    };
    let mut sentinel_userinfo = String::new();
    let (mut s_user, mut s_pass) = (String::new(), String::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sentinel_username", v)) => s_user = v.to_string(),
            Some(("sentinel_password", v)) => s_pass = v.to_string(),
            _ => {
                return Err(BrokerError::Config(format!(
                    "unknown Sentinel URL option {pair:?} (known: sentinel_username, sentinel_password)"
                )));
            }
        }
    }
    if !s_user.is_empty() || !s_pass.is_empty() {
        sentinel_userinfo = format!("{s_user}:{s_pass}@");
    }
    let suffix = if fragment.is_empty() {
        String::new()
    } else {
        format!("#{fragment}")
    };
    let mut sentinels = Vec::new();
    for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
        let url = format!("{scheme}://{sentinel_userinfo}{host}{suffix}");
        sentinels.push(
            url.as_str()
                .into_connection_info()
                .map_err(|e| config_error("invalid sentinel address", e))?,
        );
    }
    if sentinels.is_empty() {
        return Err(BrokerError::Config(
            "the Sentinel URL names no sentinel".into(),
        ));
    }
    Ok(Target::Sentinel(SentinelTarget {
        scheme,
        userinfo,
        db,
        suffix,
        sentinels,
        master,
        current: Mutex::new(None),
    }))
}

impl SentinelTarget {
    /// Asks the sentinels, in turn, where the master is now, and remembers the answer.
    pub async fn resolve_master(&self, timeouts: Timeouts) -> RedisResult<ConnectionInfo> {
        let (host, port) = self.ask(timeouts).await?;
        let addr = format!("{host}:{port}");
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let url = format!(
            "{}://{}{}:{}/{}{}",
            self.scheme, self.userinfo, host, port, self.db, self.suffix
        );
        url.as_str().into_connection_info()
    }

    /// The master's address according to the first sentinel that answers.
    async fn ask(&self, timeouts: Timeouts) -> RedisResult<(String, u16)> {
        let mut last_error = None;
        for info in &self.sentinels {
            let attempt = async {
                let mut conn = connect_single(info.clone(), timeouts, None).await?;
                let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(&self.master)
                    .query_async(&mut conn)
                    .await?;
                Ok::<_, RedisError>(addr)
            };
            match attempt.await {
                Ok(Some(addr)) => return Ok(addr),
                Ok(None) => {
                    last_error = Some(RedisError::from((
                        redis::ErrorKind::MasterNameNotFoundBySentinel,
                        "sentinel does not know the master name",
                    )));
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            RedisError::from((redis::ErrorKind::EmptySentinelList, "no sentinel"))
        }))
    }

    /// Watches the sentinels for a master switch, forever: calls `switched` when the master of our
    /// name changed (a `+switch-master` event, or a different answer after the watch reconnected).
    pub async fn watch(&self, timeouts: Timeouts, switched: impl Fn()) {
        let mut attempt = 0u32;
        let mut next = 0usize;
        loop {
            let info = self.sentinels[next % self.sentinels.len()].clone();
            next = next.wrapping_add(1);
            match self.watch_one(info, timeouts, &switched).await {
                Ok(()) => attempt = 0,
                Err(e) => tracing::debug!(error = %e, "Sentinel watch connection failed"),
            }
            tokio::time::sleep(backoff(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
    }

    /// One watch session on one sentinel; returns when its connection ends.
    async fn watch_one(
        &self,
        info: ConnectionInfo,
        timeouts: Timeouts,
        switched: &impl Fn(),
    ) -> RedisResult<()> {
        let client = Client::open(info)?;
        let mut pubsub = tokio::time::timeout(timeouts.connect, client.get_async_pubsub())
            .await
            .map_err(|_| {
                RedisError::from((redis::ErrorKind::Io, "sentinel connect timed out"))
            })??;
        tokio::time::timeout(timeouts.response, pubsub.subscribe("+switch-master"))
            .await
            .map_err(|_| {
                RedisError::from((redis::ErrorKind::Io, "sentinel subscribe timed out"))
            })??;
        // A switch may have happened while nobody was listening.
        let known = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let (Some(known), Ok((host, port))) = (known, self.ask(timeouts).await)
            && known != format!("{host}:{port}")
        {
            tracing::warn!(old = %known, new = %format!("{host}:{port}"), "Redis master changed");
            switched();
        }
        tracing::debug!("watching Sentinel for +switch-master");
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            // Payload: "<master-name> <old-ip> <old-port> <new-ip> <new-port>".
            let payload: String = msg.get_payload().unwrap_or_default();
            tracing::debug!(%payload, "Sentinel event");
            let mut words = payload.split_whitespace();
            if words.next() == Some(self.master.as_str()) {
                tracing::warn!(event = %payload, "Sentinel switched the Redis master");
                switched();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sentinel_urls() {
        let Ok(Target::Sentinel(s)) = parse(
            ":pw@127.0.0.1:26379,127.0.0.1:26380/mymaster/1?sentinel_password=sp",
            "redis",
            false,
        ) else {
            panic!("sentinel");
        };
        assert_eq!(s.master, "mymaster");
        assert_eq!(s.db, 1);
        assert_eq!(s.userinfo, ":pw@");
        assert_eq!(s.sentinels.len(), 2);
        assert_eq!(s.sentinels[0].redis_settings().password(), Some("sp"));
        assert!(
            parse("127.0.0.1:26379", "redis", false).is_err(),
            "no master name"
        );
        assert!(parse("h:1/m?bogus=1", "redis", false).is_err());
        assert!(parse("/m", "redis", false).is_err(), "no sentinel");
    }
}
