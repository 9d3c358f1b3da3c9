//! `[compression]`: permessage-deflate (RFC 7692) toward clients that offer it.

use serde::Deserialize;

use crate::deflate::Outbound;

/// `[compression]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    /// Negotiate permessage-deflate with clients that offer it. On by default: browsers always
    /// offer it, JSON shrinks 3–5×, and the node compresses a message once for all its deflate
    /// subscribers (not once per subscriber), keeping no deflate state per connection.
    pub enabled: bool,
    /// Messages whose payload is shorter than this many bytes go out uncompressed.
    pub min_size: usize,
    /// DEFLATE level, 0 (no compression, stored blocks) to 9 (smallest, slowest).
    pub level: u32,
}

impl Compression {
    /// The most a level may be.
    pub const MAX_LEVEL: u32 = 9;

    /// What the node compresses outgoing messages with; `None` when compression is off.
    pub fn outbound(&self) -> Option<Outbound> {
        self.enabled.then_some(Outbound {
            min_size: self.min_size,
            level: self.level,
        })
    }
}
