//! The PROXY protocol (v1 text and v2 binary, as HAProxy and cloud load balancers send it): the
//! header a TCP load balancer puts in front of a connection to say whose it is.
//!
//! With `server.proxy_protocol` on, every connection to the main listener must come from one of
//! `server.trusted_proxies` and start with a header; anything else is closed before a byte of HTTP
//! or TLS is read, because a header from anyone else would let a client pick its own address.
//! Only the header's bytes are consumed (peeked first, then read exactly), so what follows reaches
//! TLS or HTTP untouched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, with its CRLF.
const V1_MAX: usize = 107;
/// The longest v2 header accepted (addresses of an IPv6 pair plus room for TLVs).
const V2_MAX: usize = 16 + 512;

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The connection did not start with a well-formed header.
    #[error("no valid PROXY protocol header")]
    Malformed,
    /// The connection closed or failed before its header was complete.
    #[error("connection ended before its PROXY protocol header")]
    Closed,
}

/// Reads the header off `stream`: the client's address, or `None` when the header says the
/// connection is the proxy's own (v2 `LOCAL`, v1 `UNKNOWN`, e.g. health checks).
pub async fn read_header(stream: &mut TcpStream) -> Result<Option<IpAddr>, ProxyError> {
    let mut buf = [0u8; V2_MAX];
    loop {
        let n = stream
            .peek(&mut buf)
            .await
            .map_err(|_| ProxyError::Closed)?;
        if n == 0 {
            return Err(ProxyError::Closed);
        }
        match parse(&buf[..n])? {
            Parsed::Incomplete if n < buf.len() => {
                // Wait for more bytes: peek returns at once while data is buffered, so yield a
                // little instead of spinning on the same bytes.
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Parsed::Incomplete => return Err(ProxyError::Malformed),
            Parsed::Done { len, client } => {
                let mut header = vec![0u8; len];
                stream
                    .read_exact(&mut header)
                    .await
                    .map_err(|_| ProxyError::Closed)?;
                return Ok(client);
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Incomplete,
    Done { len: usize, client: Option<IpAddr> },
}

fn parse(b: &[u8]) -> Result<Parsed, ProxyError> {
    let prefix = b.len().min(V2_SIGNATURE.len());
    if b[..prefix] == V2_SIGNATURE[..prefix] {
        return parse_v2(b);
    }
    let v1 = b"PROXY ";
    let prefix = b.len().min(v1.len());
    if b[..prefix] != v1[..prefix] {
        return Err(ProxyError::Malformed);
    }
    let Some(end) = b.windows(2).position(|w| w == b"\r\n") else {
        return if b.len() >= V1_MAX {
            Err(ProxyError::Malformed)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    if end + 2 > V1_MAX {
        return Err(ProxyError::Malformed);
    }
    let line = std::str::from_utf8(&b[..end]).map_err(|_| ProxyError::Malformed)?;
    let fields: Vec<&str> = line.split(' ').collect();
    let client = match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", "TCP4" | "TCP6", src, _dst, sport, dport] => {
            let ip: IpAddr = src.parse().map_err(|_| ProxyError::Malformed)?;
            sport.parse::<u16>().map_err(|_| ProxyError::Malformed)?;
            dport.parse::<u16>().map_err(|_| ProxyError::Malformed)?;
            Some(ip)
        }
        _ => return Err(ProxyError::Malformed),
    };
    Ok(Parsed::Done {
        len: end + 2,
        client,
    })
}

fn parse_v2(b: &[u8]) -> Result<Parsed, ProxyError> {
    if b.len() < 16 {
        return Ok(Parsed::Incomplete);
    }
    let (ver_cmd, family) = (b[12], b[13]);
    let len = 16 + usize::from(u16::from_be_bytes([b[14], b[15]]));
    if ver_cmd >> 4 != 2 || len > V2_MAX {
        return Err(ProxyError::Malformed);
    }
    if b.len() < len {
        return Ok(Parsed::Incomplete);
    }
    let body = &b[16..len];
    let client = match (ver_cmd & 0x0f, family) {
        (0, _) => None,
        (1, 0x11 | 0x12) if body.len() >= 12 => Some(IpAddr::V4(Ipv4Addr::new(
            body[0], body[1], body[2], body[3],
        ))),
        (1, 0x21 | 0x22) if body.len() >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[..16]);
            Some(IpAddr::V6(Ipv6Addr::from(a)))
        }
        (1, 0x00) => None,
        _ => return Err(ProxyError::Malformed),
    };
    Ok(Parsed::Done { len, client })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1() {
        let h = b"PROXY TCP4 1.2.3.4 10.0.0.1 5555 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(h),
            Ok(Parsed::Done {
                len: 38,
                client: Some("1.2.3.4".parse().unwrap())
            })
        );
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PRO"), Ok(Parsed::Incomplete));
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Parsed::Done {
                len: 15,
                client: None
            })
        );
        assert!(parse(b"GET / HTTP/1.1\r\n").is_err());
        assert!(parse(b"PROXY TCP4 nope 10.0.0.1 1 2\r\n").is_err());
        assert!(parse(&[b'P'; 200]).is_err());
    }

    #[test]
    fn v2() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend([
            0x21, 0x11, 0, 12, 9, 8, 7, 6, 10, 0, 0, 1, 0x15, 0xb3, 1, 187,
        ]);
        assert_eq!(
            parse(&h),
            Ok(Parsed::Done {
                len: 28,
                client: Some("9.8.7.6".parse().unwrap())
            })
        );
        assert_eq!(parse(&h[..20]), Ok(Parsed::Incomplete));
        let mut local = V2_SIGNATURE.to_vec();
        local.extend([0x20, 0x00, 0, 0]);
        assert_eq!(
            parse(&local),
            Ok(Parsed::Done {
                len: 16,
                client: None
            })
        );
        let mut bad = V2_SIGNATURE.to_vec();
        bad.extend([0x11, 0x11, 0, 0]);
        assert!(parse(&bad).is_err());
    }
}
