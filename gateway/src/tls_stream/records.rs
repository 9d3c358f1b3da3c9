//! The TLS record layer after the handshake: what an established connection needs and nothing
//! more.
//!
//! rustls runs the handshake; once it is done, `dangerous_into_kernel_connection` hands over the
//! traffic keys and sequence numbers and keeps only the key schedule (for TLS 1.3 key updates).
//! Everything else rustls kept for the connection's life (its connection object, its handshake
//! deframer's span list, its message queues, a second expanded key) is dropped. What stays per
//! connection is the expanded sealing key (used for every delivery) and the raw opening key: the
//! opening key is expanded only while a batch of received records is decrypted, because clients
//! of a pub/sub node rarely send.
//!
//! The record formats are RFC 8446 §5 (TLS 1.3) and RFC 5246 §6.2.3.3 with RFC 5288 / RFC 7905
//! (TLS 1.2 AES-GCM and ChaCha20-Poly1305); the AEAD itself is the provider's (aws-lc-rs), the
//! same code rustls calls. A record that fails authentication, or breaks any rule below, fails
//! the connection with a fatal alert and delivers none of its bytes.

use std::io::IoSlice;

use aws_lc_rs::aead::{
    AES_128_GCM, AES_256_GCM, Aad, Algorithm, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey,
};
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion, SupportedCipherSuite};
use zeroize::Zeroizing;

/// Largest plaintext in one record (RFC 8446 §5.1, RFC 5246 §6.2.1).
pub(super) const MAX_PLAINTEXT: usize = 1 << 14;
const HEADER: usize = 5;
const TAG: usize = 16;
const NONCE: usize = 12;
/// TLS 1.2 AES-GCM carries the last 8 bytes of the nonce in each record (RFC 5288 §3).
const EXPLICIT_NONCE: usize = 8;

const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;
const HANDSHAKE_KEY_UPDATE: u8 = 24;
const ALERT_WARNING: u8 = 1;
const ALERT_FATAL: u8 = 2;
const ALERT_CLOSE_NOTIFY: u8 = 0;

/// Key updates the peer may send in a row without application data between them: more is a
/// peer making us derive keys for nothing (rustls has the same guard).
const MAX_KEY_UPDATES_IN_ROW: u8 = 32;

/// Why the record layer failed the connection.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub(super) enum RecordError {
    /// A record did not authenticate: corrupted, forged, replayed or out of order.
    #[error("TLS record failed authentication")]
    BadRecordMac,
    /// A record longer than the protocol allows, before or after decryption.
    #[error("TLS record too large")]
    RecordOverflow,
    /// A record or message that has no place after the handshake.
    #[error("unexpected TLS message: {0}")]
    UnexpectedMessage(&'static str),
    /// A message that does not parse.
    #[error("malformed TLS message: {0}")]
    Decode(&'static str),
    /// A message that parses but carries a value the protocol forbids.
    #[error("illegal TLS parameter: {0}")]
    IllegalParameter(&'static str),
    /// The stream ended inside a record.
    #[error("TLS stream ended inside a record")]
    Truncated,
    /// The peer sent a fatal alert (its description code).
    #[error("peer sent TLS alert {0}")]
    PeerAlert(u8),
    /// The peer keeps asking for key updates.
    #[error("too many TLS key updates in a row")]
    TooManyKeyUpdates,
    /// A TLS 1.2 session reached the number of records its keys may protect (TLS 1.2 cannot
    /// renew them), or a sequence number would wrap.
    #[error("TLS record limit reached")]
    RecordLimit,
    /// rustls could not derive the next keys.
    #[error("TLS key update failed: {0}")]
    KeyUpdate(rustls::Error),
    /// The negotiated cipher suite is not one this layer implements.
    #[error("TLS cipher suite not supported by the record layer")]
    UnsupportedSuite,
    /// The connection has no record layer: the handshake is not done, or handing it over failed.
    #[error("TLS connection not established")]
    NotEstablished,
    /// The provider refused a key or an encryption (never expected with valid keys).
    #[error("TLS record encryption failed")]
    Crypto,
}

impl RecordError {
    /// The alert description sent before closing, when one is owed.
    fn alert(&self) -> Option<u8> {
        match self {
            RecordError::BadRecordMac => Some(20),
            RecordError::RecordOverflow => Some(22),
            RecordError::UnexpectedMessage(_) => Some(10),
            RecordError::Decode(_) => Some(50),
            RecordError::IllegalParameter(_) => Some(47),
            RecordError::PeerAlert(_) | RecordError::Truncated => None,
            RecordError::TooManyKeyUpdates => Some(10),
            RecordError::RecordLimit
            | RecordError::KeyUpdate(_)
            | RecordError::UnsupportedSuite
            | RecordError::NotEstablished
            | RecordError::Crypto => Some(80),
        }
    }
}

/// Raw key bytes and IV of one direction; wiped when dropped.
struct Secret {
    alg: &'static Algorithm,
    key: Zeroizing<[u8; 32]>,
    key_len: usize,
    iv: [u8; NONCE],
}

impl Secret {
    fn new(secrets: ConnectionTrafficSecrets) -> Result<Secret, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => return Err(RecordError::UnsupportedSuite),
        };
        let raw = key.as_ref();
        let iv: [u8; NONCE] = iv
            .as_ref()
            .try_into()
            .map_err(|_| RecordError::UnsupportedSuite)?;
        if raw.len() != alg.key_len() || raw.len() > 32 {
            return Err(RecordError::UnsupportedSuite);
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        bytes[..raw.len()].copy_from_slice(raw);
        Ok(Secret {
            alg,
            key: bytes,
            key_len: raw.len(),
            iv,
        })
    }

    fn expand(&self) -> Result<LessSafeKey, RecordError> {
        UnboundKey::new(self.alg, &self.key[..self.key_len])
            .map(LessSafeKey::new)
            .map_err(|_| RecordError::Crypto)
    }

    /// The per-record nonce: the IV XORed with the sequence number (RFC 8446 §5.3; TLS 1.2
    /// ChaCha20 does the same, and rustls derives the TLS 1.2 GCM explicit part this way too).
    fn nonce(&self, seq: u64) -> [u8; NONCE] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    fn is_gcm(&self) -> bool {
        self.alg != &CHACHA20_POLY1305
    }
}

/// The sending direction. The key is expanded per write (see [`RecordLayer::seal_data`]), not
/// kept: an expanded AEAD key is 592 bytes in aws-lc, a tenth of an idle connection's budget.
struct Sealer {
    secret: Secret,
    seq: u64,
}

/// What a round of [`RecordLayer::open`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Opened {
    /// The peer sent close_notify: nothing more will be read.
    pub closed: bool,
}

/// An established connection's record protection in both directions.
pub(super) struct RecordLayer {
    kernel: KernelConnection<ServerConnectionData>,
    tls13: bool,
    tx: Sealer,
    rx: Secret,
    rx_seq: u64,
    /// Records the sending key may protect before it must be renewed (TLS 1.3) or the connection
    /// closed (TLS 1.2): the suite's confidentiality limit.
    tx_limit: u64,
    /// The peer asked for our key update; it goes out before our next record.
    update_owed: bool,
    updates_in_row: u8,
}

impl RecordLayer {
    /// Takes over from rustls once the handshake is done and everything rustls queued was sent.
    pub(super) fn new(
        secrets: ExtractedSecrets,
        kernel: KernelConnection<ServerConnectionData>,
    ) -> Result<RecordLayer, RecordError> {
        let tls13 = match kernel.protocol_version() {
            ProtocolVersion::TLSv1_3 => true,
            ProtocolVersion::TLSv1_2 => false,
            _ => return Err(RecordError::UnsupportedSuite),
        };
        let tx_limit = match kernel.negotiated_cipher_suite() {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        };
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        let tx = Secret::new(tx)?;
        Ok(RecordLayer {
            tls13,
            tx: Sealer {
                secret: tx,
                seq: tx_seq,
            },
            rx: Secret::new(rx)?,
            rx_seq,
            // Short of the point where a sequence number could wrap, whatever the suite says.
            tx_limit: tx_limit.min(u64::MAX >> 16),
            kernel,
            update_owed: false,
            updates_in_row: 0,
        })
    }

    /// Lowers the sending limit (tests: reach it without sending millions of records).
    #[cfg(test)]
    pub(super) fn set_tx_limit(&mut self, limit: u64) {
        self.tx_limit = limit;
    }

    /// Decrypts every complete record at the front of `incoming`, appending application data to
    /// `plaintext` and removing the records from `incoming`. An incomplete record stays for the
    /// next call. On error nothing of the failing record reaches `plaintext`.
    pub(super) fn open(
        &mut self,
        incoming: &mut Vec<u8>,
        plaintext: &mut Vec<u8>,
    ) -> Result<Opened, RecordError> {
        let mut key: Option<LessSafeKey> = None;
        let mut pos = 0;
        let mut opened = Opened::default();
        let result = loop {
            let Some(header) = incoming.get(pos..pos + HEADER) else {
                break Ok(());
            };
            let (typ, version) = (header[0], [header[1], header[2]]);
            let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
            if version[0] != 3 {
                break Err(RecordError::Decode("record version"));
            }
            let max = if self.tls13 {
                MAX_PLAINTEXT + 256
            } else {
                MAX_PLAINTEXT + 2048
            };
            if len > max {
                break Err(RecordError::RecordOverflow);
            }
            let end = pos + HEADER + len;
            if incoming.len() < end {
                break Ok(());
            }
            if key.is_none() {
                match self.rx.expand() {
                    Ok(k) => key = Some(k),
                    Err(e) => break Err(e),
                }
            }
            let Some(k) = key.as_ref() else {
                break Err(RecordError::Crypto);
            };
            let body = &mut incoming[pos + HEADER..end];
            pos = end;
            let (inner, content) = match self.decrypt(k, typ, version, body) {
                Ok(r) => r,
                Err(e) => break Err(e),
            };
            match self.dispatch(inner, content, plaintext) {
                Ok(Dispatched::Data) => {}
                Ok(Dispatched::Closed) => {
                    opened.closed = true;
                    // Anything after close_notify is ignored (RFC 8446 §6.1).
                    pos = incoming.len();
                    break Ok(());
                }
                Ok(Dispatched::NewKey) => key = None,
                Err(e) => break Err(e),
            }
        };
        incoming.drain(..pos.min(incoming.len()));
        result.map(|()| opened)
    }

    /// Authenticates and decrypts one record in place; returns its real content type and the
    /// range of `body` that holds its content.
    fn decrypt<'a>(
        &mut self,
        key: &LessSafeKey,
        typ: u8,
        version: [u8; 2],
        body: &'a mut [u8],
    ) -> Result<(u8, &'a [u8]), RecordError> {
        let seq = self.rx_seq;
        self.rx_seq = seq.checked_add(1).ok_or(RecordError::RecordLimit)?;
        if self.tls13 {
            if typ != CONTENT_APPLICATION_DATA {
                return Err(RecordError::UnexpectedMessage("unprotected record"));
            }
            if body.len() < TAG {
                return Err(RecordError::BadRecordMac);
            }
            let aad = tls13_header(body.len());
            let nonce = Nonce::assume_unique_for_key(self.rx.nonce(seq));
            let plain = key
                .open_in_place(nonce, Aad::from(aad), body)
                .map_err(|_| RecordError::BadRecordMac)?;
            // Strip the padding; the last non-zero byte is the content type (RFC 8446 §5.2).
            let Some(type_at) = plain.iter().rposition(|&b| b != 0) else {
                return Err(RecordError::UnexpectedMessage(
                    "record without content type",
                ));
            };
            // The inner plaintext, padding included, is at most 2^14 + 1 bytes (RFC 8446 §5.4).
            if plain.len() > MAX_PLAINTEXT + 1 {
                return Err(RecordError::RecordOverflow);
            }
            let inner = plain[type_at];
            return Ok((inner, &plain[..type_at]));
        }
        if !matches!(
            typ,
            CONTENT_APPLICATION_DATA | CONTENT_ALERT | CONTENT_HANDSHAKE
        ) {
            return Err(RecordError::UnexpectedMessage("record type"));
        }
        let (nonce, sealed) = if self.rx.is_gcm() {
            if body.len() < EXPLICIT_NONCE + TAG {
                return Err(RecordError::BadRecordMac);
            }
            let mut nonce = [0u8; NONCE];
            nonce[..4].copy_from_slice(&self.rx.iv[..4]);
            nonce[4..].copy_from_slice(&body[..EXPLICIT_NONCE]);
            (nonce, &mut body[EXPLICIT_NONCE..])
        } else {
            if body.len() < TAG {
                return Err(RecordError::BadRecordMac);
            }
            (self.rx.nonce(seq), body)
        };
        let aad = tls12_aad(seq, typ, version, sealed.len() - TAG);
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), sealed)
            .map_err(|_| RecordError::BadRecordMac)?;
        if plain.len() > MAX_PLAINTEXT {
            return Err(RecordError::RecordOverflow);
        }
        Ok((typ, plain))
    }

    /// Acts on one decrypted record.
    fn dispatch(
        &mut self,
        typ: u8,
        content: &[u8],
        plaintext: &mut Vec<u8>,
    ) -> Result<Dispatched, RecordError> {
        match typ {
            CONTENT_APPLICATION_DATA => {
                self.updates_in_row = 0;
                plaintext.extend_from_slice(content);
                Ok(Dispatched::Data)
            }
            CONTENT_ALERT => match content {
                [ALERT_WARNING, ALERT_CLOSE_NOTIFY] => Ok(Dispatched::Closed),
                // Fatal, or a warning other than close_notify: TLS 1.3 treats all of them as
                // fatal, and no client of ours sends TLS 1.2 warnings.
                [_, description] => Err(RecordError::PeerAlert(*description)),
                _ => Err(RecordError::Decode("alert")),
            },
            CONTENT_HANDSHAKE if self.tls13 => self.key_update(content),
            // TLS 1.2 renegotiation, or anything after the handshake: refused.
            _ => Err(RecordError::UnexpectedMessage("post-handshake message")),
        }
    }

    /// A handshake record after the handshake: only KeyUpdate is welcome from a client (no
    /// post-handshake authentication is ever requested), alone and whole in its record.
    fn key_update(&mut self, content: &[u8]) -> Result<Dispatched, RecordError> {
        let request = match content {
            [HANDSHAKE_KEY_UPDATE, 0, 0, 1, request] => *request,
            [HANDSHAKE_KEY_UPDATE, ..] => return Err(RecordError::Decode("key update")),
            [] => return Err(RecordError::Decode("empty handshake record")),
            _ => return Err(RecordError::UnexpectedMessage("post-handshake message")),
        };
        if request > 1 {
            // RFC 8446 §4.6.3: any other value is an illegal_parameter.
            return Err(RecordError::IllegalParameter("key update request"));
        }
        self.updates_in_row += 1;
        if self.updates_in_row > MAX_KEY_UPDATES_IN_ROW {
            return Err(RecordError::TooManyKeyUpdates);
        }
        let (seq, secrets) = self
            .kernel
            .update_rx_secret()
            .map_err(RecordError::KeyUpdate)?;
        self.rx = Secret::new(secrets)?;
        self.rx_seq = seq;
        if request == 1 {
            self.update_owed = true;
        }
        Ok(Dispatched::NewKey)
    }

    /// Whether a key update the peer asked for is still to be sent.
    pub(super) fn owes_key_update(&self) -> bool {
        self.update_owed
    }

    /// Sends what is owed before data: our key update, when the peer asked for one or when the
    /// sending key reached its limit (TLS 1.3); a TLS 1.2 connection at its limit fails.
    pub(super) fn prepare(&mut self, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let at_limit = self.tx.seq.saturating_add(1) >= self.tx_limit;
        if !(self.update_owed || at_limit) {
            return Ok(());
        }
        if !self.tls13 {
            return Err(RecordError::RecordLimit);
        }
        // KeyUpdate(update_not_requested), under the old key; everything after under the new.
        let update = [HANDSHAKE_KEY_UPDATE, 0, 0, 1, 0];
        let key = self.tx.secret.expand()?;
        self.seal_one(&key, CONTENT_HANDSHAKE, &[IoSlice::new(&update)], out)?;
        let (seq, secrets) = self
            .kernel
            .update_tx_secret()
            .map_err(RecordError::KeyUpdate)?;
        self.tx = Sealer {
            secret: Secret::new(secrets)?,
            seq,
        };
        self.update_owed = false;
        Ok(())
    }

    /// Encrypts application data from the front of `bufs` into one record (gathering slices, up
    /// to [`MAX_PLAINTEXT`]) appended to `out`; returns the plaintext bytes taken. When the first
    /// slice alone fills a record, up to `max_records` records are made of it.
    ///
    /// The key is expanded here, once per write: a write carries everything a connection's queue
    /// held, and the expansion (an AES key schedule and GHASH table, a few hundred nanoseconds)
    /// is small beside the system call that follows.
    pub(super) fn seal_data(
        &mut self,
        bufs: &[IoSlice<'_>],
        max_records: usize,
        out: &mut Vec<u8>,
    ) -> Result<usize, RecordError> {
        self.prepare(out)?;
        let key = self.tx.secret.expand()?;
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        if first.len() < MAX_PLAINTEXT {
            return self.seal_one(&key, CONTENT_APPLICATION_DATA, bufs, out);
        }
        let plain = &first[..first.len().min(max_records.max(1) * MAX_PLAINTEXT)];
        for chunk in plain.chunks(MAX_PLAINTEXT) {
            self.seal_one(&key, CONTENT_APPLICATION_DATA, &[IoSlice::new(chunk)], out)?;
        }
        Ok(plain.len())
    }

    /// Appends an alert record (close_notify, or the fatal alert `error` owes) to `out`.
    pub(super) fn seal_alert(
        &mut self,
        error: Option<&RecordError>,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        let alert = match error {
            None => [ALERT_WARNING, ALERT_CLOSE_NOTIFY],
            Some(e) => match e.alert() {
                Some(description) => [ALERT_FATAL, description],
                None => return Ok(()),
            },
        };
        if self.tx.seq.saturating_add(1) >= u64::MAX >> 8 {
            return Err(RecordError::RecordLimit);
        }
        let key = self.tx.secret.expand()?;
        self.seal_one(&key, CONTENT_ALERT, &[IoSlice::new(&alert)], out)
            .map(|_| ())
    }

    fn seal_one(
        &mut self,
        key: &LessSafeKey,
        typ: u8,
        bufs: &[IoSlice<'_>],
        out: &mut Vec<u8>,
    ) -> Result<usize, RecordError> {
        let plain_len = bufs
            .iter()
            .map(|b| b.len())
            .sum::<usize>()
            .min(MAX_PLAINTEXT);
        let seq = self.tx.seq;
        let next = seq.checked_add(1).ok_or(RecordError::RecordLimit)?;
        let explicit = if !self.tls13 && self.tx.secret.is_gcm() {
            EXPLICIT_NONCE
        } else {
            0
        };
        let inner_type = usize::from(self.tls13);
        let body_len = explicit + plain_len + inner_type + TAG;
        let start = out.len();
        out.reserve(HEADER + body_len);
        let outer = if self.tls13 {
            CONTENT_APPLICATION_DATA
        } else {
            typ
        };
        let header = match u16::try_from(body_len) {
            Ok(l) => {
                let [hi, lo] = l.to_be_bytes();
                [outer, 3, 3, hi, lo]
            }
            Err(_) => return Err(RecordError::RecordOverflow),
        };
        out.extend_from_slice(&header);
        let nonce = self.tx.secret.nonce(seq);
        out.extend_from_slice(&nonce[NONCE - explicit..]);
        let mut left = plain_len;
        for b in bufs {
            let n = b.len().min(left);
            out.extend_from_slice(&b[..n]);
            left -= n;
            if left == 0 {
                break;
            }
        }
        if self.tls13 {
            out.push(typ);
        }
        let aad = if self.tls13 {
            Aad::from(AadBytes::Tls13(tls13_header(body_len)))
        } else {
            Aad::from(AadBytes::Tls12(tls12_aad(seq, typ, [3, 3], plain_len)))
        };
        let sealed_from = start + HEADER + explicit;
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                aad,
                &mut out[sealed_from..],
            )
            .map_err(|_| {
                out.truncate(start);
                RecordError::Crypto
            })?;
        out.extend_from_slice(tag.as_ref());
        self.tx.seq = next;
        Ok(plain_len)
    }
}

/// What one decrypted record did.
enum Dispatched {
    Data,
    Closed,
    /// The receiving key changed: later records need the new one.
    NewKey,
}

/// The additional data of either version, without allocating.
enum AadBytes {
    Tls13([u8; HEADER]),
    Tls12([u8; 13]),
}

impl AsRef<[u8]> for AadBytes {
    fn as_ref(&self) -> &[u8] {
        match self {
            AadBytes::Tls13(a) => a,
            AadBytes::Tls12(a) => a,
        }
    }
}

/// TLS 1.3's additional data: the record header, with the fixed legacy type and version.
fn tls13_header(body_len: usize) -> [u8; HEADER] {
    let [hi, lo] = (body_len as u16).to_be_bytes();
    [CONTENT_APPLICATION_DATA, 3, 3, hi, lo]
}

/// TLS 1.2's additional data: sequence number, type, version and plaintext length.
fn tls12_aad(seq: u64, typ: u8, version: [u8; 2], plain_len: usize) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = typ;
    aad[9..11].copy_from_slice(&version);
    aad[11..].copy_from_slice(&(plain_len as u16).to_be_bytes());
    aad
}
