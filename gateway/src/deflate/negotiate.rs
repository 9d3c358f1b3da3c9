//! permessage-deflate negotiation (RFC 7692 §5 and §7.1): reads the client's offers from
//! `Sec-WebSocket-Extensions` and picks the first one the node can accept.
//!
//! The answer always carries `server_no_context_takeover` (each server message is compressed on its
//! own, so one compressed frame can go to every subscriber that accepted deflate) and
//! `client_no_context_takeover` (each client message inflates on its own, so no connection keeps an
//! inflate window between messages). RFC 7692 §7.1.1.2 lets a server require the latter whether or
//! not the client offered it, and every conforming client must honour it.
//!
//! An offer that breaks §7.1 (an unknown or repeated parameter, a missing or invalid value) is
//! declined, as §7.1 says, and the next offer is tried. A header that does not parse at all (RFC 6455
//! §9.1 grammar) declines the extension: the connection goes on uncompressed.

use std::fmt::Write;

/// The extension's registered name.
pub const EXTENSION: &str = "permessage-deflate";

/// Largest LZ77 window (2^15 bytes), the one the node's shared frames are compressed with.
const FULL_WINDOW_BITS: u8 = 15;

/// What one connection agreed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Agreement {
    /// The `server_max_window_bits` the client asked for, if it did.
    pub server_max_window_bits: Option<u8>,
}

impl Agreement {
    /// Whether frames compressed with the full 32 KiB window (the node's shared frames) may go to
    /// this connection. A client that limited the server's window gets uncompressed messages, which
    /// RFC 7692 §6 always allows: compressing once per node beats a compressor per window size.
    pub fn takes_full_window(&self) -> bool {
        self.server_max_window_bits
            .is_none_or(|bits| bits >= FULL_WINDOW_BITS)
    }

    /// The `Sec-WebSocket-Extensions` value of the 101 response.
    pub fn response(&self) -> String {
        let mut s = format!("{EXTENSION}; server_no_context_takeover; client_no_context_takeover");
        if let Some(bits) = self.server_max_window_bits {
            // §7.1.2.1: accepting an offer with this parameter means echoing it (same or smaller).
            let _ = write!(s, "; server_max_window_bits={bits}");
        }
        s
    }
}

/// Why an offer (or the whole header) was declined.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Decline {
    /// The header does not follow the RFC 6455 §9.1 grammar.
    #[error("Sec-WebSocket-Extensions does not parse: {0}")]
    Malformed(&'static str),
    /// A parameter RFC 7692 does not define for an offer.
    #[error("unknown permessage-deflate parameter {0}")]
    UnknownParameter(String),
    /// The same parameter twice in one offer.
    #[error("permessage-deflate parameter {0} given twice")]
    Duplicate(String),
    /// A parameter with a value it may not have, or without one it needs.
    #[error("invalid value for permessage-deflate parameter {0}")]
    InvalidValue(String),
    /// No permessage-deflate offer at all.
    #[error("no permessage-deflate offer")]
    NotOffered,
}

/// One extension of the header: its name and its parameters.
#[derive(Debug, PartialEq, Eq)]
struct Extension {
    name: String,
    params: Vec<(String, Option<String>)>,
}

/// Picks the first acceptable permessage-deflate offer from every `Sec-WebSocket-Extensions`
/// header value of the request. `Err` says why none was taken (for the debug log and tests).
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Result<Agreement, Decline> {
    let mut all = Vec::new();
    for v in values {
        let text = std::str::from_utf8(v).map_err(|_| Decline::Malformed("not ASCII"))?;
        all.extend(parse(text)?);
    }
    let mut last = Decline::NotOffered;
    for ext in all
        .iter()
        .filter(|e| e.name.eq_ignore_ascii_case(EXTENSION))
    {
        match accept(ext) {
            Ok(agreement) => return Ok(agreement),
            Err(why) => last = why,
        }
    }
    Err(last)
}

/// Checks one offer against RFC 7692 §7.1.
fn accept(offer: &Extension) -> Result<Agreement, Decline> {
    let mut seen: Vec<String> = Vec::new();
    let mut agreement = Agreement {
        server_max_window_bits: None,
    };
    for (name, value) in &offer.params {
        let lower = name.to_ascii_lowercase();
        if seen.contains(&lower) {
            return Err(Decline::Duplicate(lower));
        }
        match (lower.as_str(), value.as_deref()) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            // Whatever window the client compresses with, a 32 KiB inflate window reads it.
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(v)) => {
                window_bits(v).ok_or_else(|| Decline::InvalidValue(lower.clone()))?;
            }
            ("server_max_window_bits", Some(v)) => {
                let bits = window_bits(v).ok_or_else(|| Decline::InvalidValue(lower.clone()))?;
                agreement.server_max_window_bits = Some(bits);
            }
            (
                "server_no_context_takeover"
                | "client_no_context_takeover"
                | "server_max_window_bits",
                _,
            ) => return Err(Decline::InvalidValue(lower)),
            _ => return Err(Decline::UnknownParameter(lower)),
        }
        seen.push(lower);
    }
    Ok(agreement)
}

/// A window size parameter: a decimal 8 to 15 (RFC 7692 §7.1.2.1).
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.len() > 2 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
}

/// RFC 7230 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses `extension-list` (RFC 6455 §9.1): extensions separated by commas, each a token followed
/// by `; param[=value]`, values being tokens or quoted strings that unescape to tokens.
fn parse(text: &str) -> Result<Vec<Extension>, Decline> {
    let mut p = Cursor {
        s: text.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    loop {
        p.skip_ws();
        if p.eat(b',') {
            // Empty list elements are allowed (RFC 7230 §7).
            continue;
        }
        if p.done() {
            return Ok(out);
        }
        let name = p
            .token()
            .ok_or(Decline::Malformed("expected an extension name"))?;
        let mut params = Vec::new();
        loop {
            p.skip_ws();
            if p.done() || p.eat(b',') {
                break;
            }
            if !p.eat(b';') {
                return Err(Decline::Malformed("expected ';' or ','"));
            }
            p.skip_ws();
            let key = p
                .token()
                .ok_or(Decline::Malformed("expected a parameter name"))?;
            p.skip_ws();
            let value = if p.eat(b'=') {
                p.skip_ws();
                Some(p.value()?)
            } else {
                None
            };
            params.push((key, value));
        }
        out.push(Extension { name, params });
    }
}

/// A position in the header being parsed.
struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }

    fn skip_ws(&mut self) {
        while self.s.get(self.i).is_some_and(|&b| b == b' ' || b == b'\t') {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.s.get(self.i) == Some(&b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn token(&mut self) -> Option<String> {
        let start = self.i;
        while self.s.get(self.i).is_some_and(|&b| is_tchar(b)) {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    /// A token, or a quoted string whose unescaped content must be a token (RFC 6455 §9.1).
    fn value(&mut self) -> Result<String, Decline> {
        if !self.eat(b'"') {
            return self.token().ok_or(Decline::Malformed("expected a value"));
        }
        let mut v = Vec::new();
        loop {
            match self.s.get(self.i) {
                None => return Err(Decline::Malformed("unterminated quoted string")),
                Some(b'"') => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => {
                    let &c = self
                        .s
                        .get(self.i + 1)
                        .ok_or(Decline::Malformed("unterminated quoted string"))?;
                    v.push(c);
                    self.i += 2;
                }
                Some(&c) => {
                    v.push(c);
                    self.i += 1;
                }
            }
        }
        if v.is_empty() || !v.iter().all(|&b| is_tchar(b)) {
            return Err(Decline::Malformed("a quoted value must be a token"));
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(h: &str) -> Result<Agreement, Decline> {
        negotiate([h.as_bytes()])
    }

    const PLAIN: Agreement = Agreement {
        server_max_window_bits: None,
    };

    #[test]
    fn browser_offer_is_accepted_without_client_window() {
        let a = one("permessage-deflate; client_max_window_bits").unwrap();
        assert_eq!(a, PLAIN);
        assert!(a.takes_full_window());
        assert_eq!(
            a.response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
    }

    #[test]
    fn server_window_is_echoed_and_limits_sharing() {
        let a = one("permessage-deflate; server_max_window_bits=10").unwrap();
        assert_eq!(a.server_max_window_bits, Some(10));
        assert!(!a.takes_full_window());
        assert!(a.response().ends_with("; server_max_window_bits=10"));
        let a = one("permessage-deflate; server_max_window_bits=\"15\"").unwrap();
        assert!(a.takes_full_window());
    }

    #[test]
    fn invalid_offers_are_declined_and_the_next_one_taken() {
        assert_eq!(
            one("permessage-deflate; server_max_window_bits"),
            Err(Decline::InvalidValue("server_max_window_bits".into()))
        );
        assert_eq!(
            one("permessage-deflate; client_max_window_bits=16"),
            Err(Decline::InvalidValue("client_max_window_bits".into()))
        );
        assert_eq!(
            one("permessage-deflate; server_max_window_bits=7"),
            Err(Decline::InvalidValue("server_max_window_bits".into()))
        );
        assert_eq!(
            one("permessage-deflate; server_no_context_takeover=1"),
            Err(Decline::InvalidValue("server_no_context_takeover".into()))
        );
        assert_eq!(
            one("permessage-deflate; mem_level=8"),
            Err(Decline::UnknownParameter("mem_level".into()))
        );
        assert_eq!(
            one("permessage-deflate; client_no_context_takeover; client_no_context_takeover"),
            Err(Decline::Duplicate("client_no_context_takeover".into()))
        );
        // Autobahn 13.7's shape: several offers, the first acceptable wins.
        let a = one(
            "permessage-deflate; foo, permessage-deflate; server_max_window_bits=9, \
             permessage-deflate",
        )
        .unwrap();
        assert_eq!(a.server_max_window_bits, Some(9));
        // Offers across several header lines count in order.
        let a = negotiate([
            b"x-webkit-deflate-frame".as_slice(),
            b"permessage-deflate; client_max_window_bits=12",
        ])
        .unwrap();
        assert_eq!(a, PLAIN);
    }

    #[test]
    fn malformed_headers_decline_the_extension() {
        for h in [
            "permessage-deflate; ",
            "permessage-deflate;; x",
            "permessage-deflate; server_max_window_bits=\"1 0\"",
            "permessage-deflate; server_max_window_bits=\"10",
            "permessage-deflate server_no_context_takeover",
            "=",
        ] {
            assert!(matches!(one(h), Err(Decline::Malformed(_))), "{h}");
        }
        assert_eq!(one("x-other; a=b"), Err(Decline::NotOffered));
        assert_eq!(negotiate(std::iter::empty()), Err(Decline::NotOffered));
    }

    #[test]
    fn names_are_case_insensitive_and_whitespace_is_allowed() {
        let a = one(" , Permessage-Deflate ;Server_Max_Window_Bits = 12 ,").unwrap();
        assert_eq!(a.server_max_window_bits, Some(12));
    }
}
