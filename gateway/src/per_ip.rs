//! Connections per client address, and which address a connection is from when the node sits
//! behind a load balancer.
//!
//! One address holding thousands of idle WebSockets can exhaust a node's file descriptors for
//! everyone else; `server.max_connections_per_ip` bounds that. Behind a proxy every connection
//! comes from the proxy, so the client's address is read from `X-Forwarded-For`, but only when the
//! connection comes from one of `server.trusted_proxies`: anyone else could write that header.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// An address range (`10.0.0.0/8`, `::1/128`, or one address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a `server.trusted_proxies` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or CIDR range (e.g. 10.0.0.0/8)")]
pub struct CidrError(String);

impl Cidr {
    /// Parses `ip` or `ip/prefix`.
    pub fn parse(text: &str) -> Result<Cidr, CidrError> {
        let err = || CidrError(text.to_string());
        let (ip, prefix) = match text.split_once('/') {
            Some((ip, p)) => (ip, Some(p.parse::<u8>().map_err(|_| err())?)),
            None => (text, None),
        };
        let addr: IpAddr = ip.trim().parse().map_err(|_| err())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(err());
        }
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is in the range (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The client's address: the peer's, or, when the peer is a trusted proxy, the right-most address
/// of `X-Forwarded-For` that is not itself a trusted proxy (addresses further left were written by
/// the client and prove nothing).
pub fn client_ip(peer: IpAddr, headers: &http::HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer.to_canonical();
    }
    let mut client = peer;
    let entries = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect::<Vec<_>>();
    for entry in entries.iter().rev() {
        let Some(ip) = forwarded_ip(entry) else {
            break;
        };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    client.to_canonical()
}

/// One `X-Forwarded-For` entry as an address: `1.2.3.4`, `2001:db8::1`, and the forms some proxies
/// write with a port (`1.2.3.4:5678`, `[2001:db8::1]:443`) or brackets (`[2001:db8::1]`).
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<IpAddr>()
                .ok()
        })
}

/// Open WebSocket connections per client address.
pub struct PerIp {
    max: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in [`PerIp`], given back when dropped.
pub struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// A table allowing `max` connections per address; 0 means no limit (nothing is tracked).
    pub fn new(max: usize) -> Arc<PerIp> {
        Arc::new(PerIp {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// Claims a slot for `ip`: `Ok(None)` without a limit, [`AtLimit`] when `ip` is at its limit.
    pub fn claim(self: &Arc<Self>, ip: IpAddr) -> Result<Option<IpSlot>, AtLimit> {
        if self.max == 0 {
            return Ok(None);
        }
        // A poisoned lock only means a panic elsewhere while counting; the counts are still whole.
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= self.max {
            return Err(AtLimit);
        }
        *n += 1;
        Ok(Some(IpSlot {
            table: self.clone(),
            ip,
        }))
    }
}

/// The address has `server.max_connections_per_ip` connections already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many connections from this address")]
pub struct AtLimit;

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.1.2.3")));
        assert!(c.contains(ip("::ffff:10.1.2.3")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("1.2.3.4")));
        assert!(Cidr::parse("::1").unwrap().contains(ip("::1")));
        assert!(!Cidr::parse("::1").unwrap().contains(ip("127.0.0.1")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
    }

    #[test]
    fn forwarded_for_is_read_only_from_trusted_peers() {
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
        let mut h = http::HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "6.6.6.6, 1.2.3.4, 10.0.0.7".parse().unwrap(),
        );
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("1.2.3.4"));
        assert_eq!(client_ip(ip("9.9.9.9"), &h, &trusted), ip("9.9.9.9"));
        assert_eq!(
            client_ip(ip("10.0.0.1"), &http::HeaderMap::new(), &trusted),
            ip("10.0.0.1")
        );
        h.insert("x-forwarded-for", "garbage".parse().unwrap());
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip("10.0.0.1"));
        // Proxies that write a port, or brackets around IPv6 (Azure Application Gateway does).
        for (xff, want) in [
            ("1.2.3.4:5678", "1.2.3.4"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
        ] {
            h.insert("x-forwarded-for", xff.parse().unwrap());
            assert_eq!(client_ip(ip("10.0.0.1"), &h, &trusted), ip(want), "{xff}");
        }
    }

    #[test]
    fn slots_are_counted_and_given_back() {
        let t = PerIp::new(2);
        let a = t.claim(ip("1.1.1.1")).unwrap();
        let _b = t.claim(ip("1.1.1.1")).unwrap();
        assert!(t.claim(ip("1.1.1.1")).is_err());
        assert!(t.claim(ip("2.2.2.2")).is_ok());
        drop(a);
        assert!(t.claim(ip("1.1.1.1")).is_ok());
        assert!(PerIp::new(0).claim(ip("1.1.1.1")).unwrap().is_none());
    }
}
