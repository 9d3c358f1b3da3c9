//! The synchronous core of a lean TLS connection: rustls' unbuffered state machine for the
//! handshake, then pubgate's own record layer ([`super::records`]), and the three buffers they
//! need (ciphertext in, plaintext in, ciphertext out), each empty and unallocated whenever it
//! holds nothing, so an idle connection keeps only the session's keys.
//!
//! Nothing here waits: every call either makes progress now or says `WouldBlock`. The async
//! wrappers in [`super`] decide when to wait for the socket.

use std::io::{self, IoSlice};

use rustls::Error as TlsError;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError};
use tokio::net::TcpStream;

use super::records::{MAX_PLAINTEXT, RecordError, RecordLayer};

/// Most records one write makes of a single large slice.
const MAX_WRITE_RECORDS: usize = 4;
/// Bytes taken from the socket per read: one full record with its header and tag.
pub(super) const READ_CHUNK: usize = MAX_PLAINTEXT + 512;
/// Most ciphertext kept waiting for the rest of a message: rustls refuses handshake messages over
/// 64 KiB and records over 16 KiB, so more than this is a peer that does not speak TLS.
const MAX_INCOMING: usize = 64 * 1024 + READ_CHUNK;
/// Ciphertext waiting to be sent past which a requested key update is refused: only a peer that
/// floods key update requests without reading the answers gets there (writes wait for the socket).
const MAX_UNSENT_KEY_UPDATES: usize = 256 * 1024;

/// Who protects records: rustls during the handshake, pubgate's record layer after it.
// The record layer is what the connection keeps for its life: inline, it costs no allocation of
// its own; the handshake state is the one boxed (and freed after the handshake).
#[allow(clippy::large_enum_variant)]
enum State {
    /// Boxed: rustls' connection object is about 1 KB and is dropped once the handshake is done;
    /// inline it would size the shared allocation for the connection's life.
    Handshake(Box<UnbufferedServerConnection>),
    Traffic(RecordLayer),
    /// Between the two, or after a switch that failed.
    Gone,
}

/// Why a connection failed: during the handshake (rustls) or after it (the record layer).
#[derive(Clone, Debug, thiserror::Error)]
pub(super) enum Failure {
    /// rustls refused the handshake.
    #[error(transparent)]
    Handshake(#[from] TlsError),
    /// The record layer failed the connection.
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// One TLS connection's state, without the socket.
pub(super) struct Engine {
    state: State,
    /// Ciphertext read but not yet processed: part of a record or of a handshake flight.
    incoming: Vec<u8>,
    /// During the handshake, how much of `incoming` rustls has been given: whole records, one
    /// more each time it needs more. Records behind the client's Finished are never shown to it,
    /// so everything after the handshake (a coalesced KeyUpdate, say) is the record layer's.
    offered: usize,
    /// Where the last record given to rustls starts: after a failure its alert is collected
    /// against the buffer as rustls knew it before that record (see [`Engine::collect_alerts`]).
    last_offered: usize,
    /// Decrypted bytes the reader has not taken yet, from `plain_taken` on.
    plaintext: Vec<u8>,
    plain_taken: usize,
    /// Ciphertext the socket has not taken yet, from `out_sent` on.
    outgoing: Vec<u8>,
    out_sent: usize,
    /// Plaintext bytes already encrypted into `outgoing` that a direct write reported as not
    /// written (see [`Engine::write_some`]); the next write that offers them only flushes.
    owed: usize,
    /// The handshake is done: application data may flow.
    traffic: bool,
    /// No more plaintext will come: the peer sent close_notify, or closed TCP.
    read_closed: bool,
    /// We sent close_notify.
    close_sent: bool,
    /// The connection failed; every later call reports it.
    failed: Option<Failure>,
}

/// Turns a TLS failure into the I/O error the stream reports.
pub(super) fn io_error(e: impl Into<Failure>) -> io::Error {
    let e = e.into();
    let kind = match e {
        Failure::Record(RecordError::Truncated) => io::ErrorKind::UnexpectedEof,
        _ => io::ErrorKind::InvalidData,
    };
    io::Error::new(kind, e)
}

fn total_len(bufs: &[IoSlice<'_>]) -> usize {
    bufs.iter().map(|b| b.len()).sum()
}

fn would_block() -> io::Error {
    io::ErrorKind::WouldBlock.into()
}

/// Appends what `write` produces to `out`, growing it to the size the callee asks for when the
/// first guess was short. `required` extracts that size from the callee's error.
fn append<E>(
    out: &mut Vec<u8>,
    guess: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
    required: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let start = out.len();
    out.resize(start + guess, 0);
    let result = match write(&mut out[start..]) {
        Err(e) => match required(&e) {
            Some(size) => {
                out.resize(start + size, 0);
                write(&mut out[start..])
            }
            None => Err(e),
        },
        ok => ok,
    };
    match result {
        Ok(n) => {
            out.truncate(start + n);
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

fn encode_required(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

/// How far rustls may look into `buf` when it has used everything up to `from` (a record
/// boundary): to the end of the next record when it is all there; to the end of `buf` when that
/// record's header cannot be TLS (so rustls refuses it with its alert now, rather than after
/// waiting for a length that will never come); `None` while the next record is still arriving.
fn next_record_end(buf: &[u8], from: usize) -> Option<usize> {
    let header = buf.get(from..from + 5)?;
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let plausible = matches!(header[0], 20..=23) && header[1] == 3 && len <= (1 << 14) + 2048;
    if !plausible {
        return (buf.len() > from).then_some(buf.len());
    }
    let end = from + 5 + len;
    (end <= buf.len()).then_some(end)
}

/// Where a round of handshake record processing stopped.
enum Stop {
    /// Every complete record is processed; more must be read (or the handshake is done).
    Idle,
    /// Both sides closed.
    Closed,
}

impl Engine {
    pub(super) fn new(conn: UnbufferedServerConnection) -> Self {
        Engine {
            state: State::Handshake(Box::new(conn)),
            incoming: Vec::new(),
            offered: 0,
            last_offered: 0,
            plaintext: Vec::new(),
            plain_taken: 0,
            outgoing: Vec::new(),
            out_sent: 0,
            owed: 0,
            traffic: false,
            read_closed: false,
            close_sent: false,
            failed: None,
        }
    }

    /// Whether the handshake is done.
    pub(super) fn is_traffic(&self) -> bool {
        self.traffic
    }

    /// Whether the peer will send nothing more.
    pub(super) fn is_read_closed(&self) -> bool {
        self.read_closed
    }

    /// Bytes held in buffers right now (capacity, not length): what an idle connection should
    /// not keep (tests).
    #[cfg(test)]
    pub(super) fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.plaintext.capacity() + self.outgoing.capacity()
    }

    /// The record layer (tests).
    #[cfg(test)]
    pub(super) fn records_mut(&mut self) -> Option<&mut RecordLayer> {
        match &mut self.state {
            State::Traffic(r) => Some(r),
            _ => None,
        }
    }

    /// Hands the established connection from rustls to the record layer. Called once the
    /// handshake is done and everything rustls produced was sent.
    pub(super) fn switch_to_records(&mut self) -> Result<(), Failure> {
        let State::Handshake(conn) = std::mem::replace(&mut self.state, State::Gone) else {
            return Err(self.fail(RecordError::NotEstablished.into()));
        };
        let records = conn
            .dangerous_into_kernel_connection()
            .map_err(Failure::from)
            .and_then(|(secrets, kernel)| Ok(RecordLayer::new(secrets, kernel)?));
        match records {
            Ok(r) => {
                self.state = State::Traffic(r);
                // What rustls was given is its own (it processed the client's Finished); the
                // records after it were never shown to it.
                self.incoming.drain(..self.offered);
                self.offered = 0;
                self.last_offered = 0;
                // Records that arrived behind the client's Finished.
                self.process()
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Takes ciphertext read from the socket and processes every complete record in it.
    pub(super) fn receive(&mut self, data: &[u8]) -> Result<(), Failure> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.read_closed {
            // After close_notify nothing the peer sends counts (RFC 8446 §6.1).
            return Ok(());
        }
        if self.incoming.len() + data.len() > MAX_INCOMING {
            return Err(self.fail(TlsError::General("TLS message too large".into()).into()));
        }
        self.incoming.extend_from_slice(data);
        let result = self.process();
        if self.incoming.is_empty() {
            // What an idle connection holds: nothing.
            self.incoming = Vec::new();
        }
        result
    }

    /// Notes that TCP reached end of file: reads end once the plaintext is taken. A record
    /// left incomplete is an error, not a clean end: its bytes were never authenticated.
    pub(super) fn receive_eof(&mut self) {
        if !self.read_closed && self.traffic && !self.incoming.is_empty() && self.failed.is_none() {
            self.incoming = Vec::new();
            self.fail(RecordError::Truncated.into());
        }
        self.read_closed = true;
    }

    /// Processes complete records until more ciphertext is needed, queuing what must be sent
    /// and keeping the plaintext decrypted.
    pub(super) fn process(&mut self) -> Result<(), Failure> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = match &mut self.state {
            State::Handshake(_) => self.run_records().map(|_| ()).map_err(Failure::from),
            State::Traffic(records) => {
                match records.open(&mut self.incoming, &mut self.plaintext) {
                    Ok(opened) => {
                        if opened.closed {
                            self.read_closed = true;
                        }
                        // The peer asked for our key update: it goes out now rather than with
                        // the next delivery, which may be long in coming.
                        if records.owes_key_update() && !self.close_sent {
                            if self.outgoing.len() - self.out_sent > MAX_UNSENT_KEY_UPDATES {
                                // A peer that asks for key updates and reads none of them.
                                return Err(self.fail(
                                    TlsError::General("peer does not read its key updates".into())
                                        .into(),
                                ));
                            }
                            records.prepare(&mut self.outgoing).map_err(Failure::from)
                        } else {
                            Ok(())
                        }
                    }
                    Err(e) => {
                        // The peer learns why before the connection closes; best effort.
                        let _ = records.seal_alert(Some(&e), &mut self.outgoing);
                        Err(e.into())
                    }
                }
            }
            State::Gone => Err(RecordError::NotEstablished.into()),
        };
        result.map_err(|e| {
            // rustls queues its alert against the buffer as it last saw it (its deframer keeps
            // offsets into it): collect first, then drop the rest, which also keeps it from being
            // parsed (and alerted on) again.
            if matches!(self.state, State::Handshake(_)) {
                self.collect_alerts();
            }
            self.incoming = Vec::new();
            self.offered = 0;
            self.last_offered = 0;
            self.fail(e)
        })
    }

    fn fail(&mut self, e: Failure) -> Failure {
        self.failed = Some(e.clone());
        e
    }

    fn run_records(&mut self) -> Result<Stop, TlsError> {
        let State::Handshake(conn) = &mut self.state else {
            return Err(TlsError::General("TLS handshake already done".into()));
        };
        loop {
            let status = conn.process_tls_records(&mut self.incoming[..self.offered]);
            let mut discard = status.discard;
            let stop = match status.state? {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record?;
                        discard += record.discard;
                        self.plaintext.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut data) => {
                    append(&mut self.outgoing, 0, |b| data.encode(b), encode_required)
                        .map_err(|e| TlsError::General(e.to_string()))?;
                    None
                }
                ConnectionState::TransmitTlsData(data) => {
                    // Sent by whoever flushes `outgoing` next, in order.
                    data.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    self.read_closed = true;
                    None
                }
                ConnectionState::Closed => {
                    self.read_closed = true;
                    Some(Stop::Closed)
                }
                ConnectionState::BlockedHandshake => {
                    match next_record_end(&self.incoming, self.offered) {
                        // One more whole record for rustls (never a partial one: the bytes past
                        // `offered` stay exactly as they came).
                        Some(end) => {
                            self.last_offered = self.offered;
                            self.offered = end;
                            None
                        }
                        None => Some(Stop::Idle),
                    }
                }
                ConnectionState::WriteTraffic(_) => {
                    self.traffic = true;
                    Some(Stop::Idle)
                }
                // 0-RTT is not enabled (`max_early_data_size` stays 0), and later states are
                // unknown to this code: refuse rather than guess.
                _ => return Err(TlsError::General("unexpected TLS state".into())),
            };
            self.incoming.drain(..discard);
            self.offered -= discard;
            self.last_offered = self.last_offered.saturating_sub(discard);
            if let Some(stop) = stop {
                return Ok(stop);
            }
        }
    }

    /// After a handshake failure, moves the alert rustls queued into `outgoing` (best effort).
    fn collect_alerts(&mut self) {
        let State::Handshake(conn) = &mut self.state else {
            return;
        };
        // The buffer as rustls knew it before the record that failed: its deframer may still
        // point into what it kept of an unfinished handshake message there (an empty buffer made
        // it slice out of range), and the failed record must not be parsed (and alerted on)
        // twice.
        let known = self.last_offered.min(self.offered);
        for _ in 0..4 {
            // The alert is handed over before any record is looked at: nothing to discard.
            let status = conn.process_tls_records(&mut self.incoming[..known]);
            let Ok(ConnectionState::EncodeTlsData(mut data)) = status.state else {
                return;
            };
            if append(&mut self.outgoing, 0, |b| data.encode(b), encode_required).is_err() {
                return;
            }
        }
    }

    /// Copies decrypted bytes into `buf`; returns how many.
    pub(super) fn read_plaintext(&mut self, buf: &mut [u8]) -> usize {
        let available = &self.plaintext[self.plain_taken..];
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.plain_taken += n;
        if self.plain_taken == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.plain_taken = 0;
        }
        n
    }

    /// Whether decrypted bytes are waiting for the reader.
    pub(super) fn has_plaintext(&self) -> bool {
        self.plain_taken < self.plaintext.len()
    }

    /// The failure, if the connection failed.
    pub(super) fn failure(&self) -> Option<io::Error> {
        self.failed.clone().map(io_error)
    }

    /// Writes queued ciphertext without waiting. `Ok(true)` once none is left.
    pub(super) fn flush_to(&mut self, tcp: &TcpStream) -> io::Result<bool> {
        while self.out_sent < self.outgoing.len() {
            match tcp.try_write(&self.outgoing[self.out_sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        // Given back at once: a connection between writes holds no output buffer.
        self.outgoing = Vec::new();
        self.out_sent = 0;
        Ok(true)
    }

    /// Encrypts plaintext from the front of `bufs` and writes it without waiting. Returns how many
    /// plaintext bytes it took, or `WouldBlock` when earlier ciphertext still waits for the socket.
    ///
    /// Frames from several slices share one TLS record (up to 16 KiB), so a batch of deliveries
    /// costs one record header, one tag and one system call.
    ///
    /// What the socket does not take stays queued for [`Engine::flush_to`]. A `direct` write (the
    /// fan-out path, see [`crate::send_queue::DirectWrite`]) has nobody to flush for it later: it
    /// then reports one byte fewer than it took, so the send queue keeps that byte and hands the
    /// connection to its writer task, whose next write of that byte waits for the socket, flushes
    /// the queued ciphertext and reports the byte written. A frame is never encrypted twice.
    pub(super) fn write_some(
        &mut self,
        tcp: &TcpStream,
        bufs: &[IoSlice<'_>],
        direct: bool,
    ) -> io::Result<usize> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        if !self.flush_to(tcp)? {
            return Err(would_block());
        }
        if self.owed > 0 {
            let offered = total_len(bufs);
            debug_assert!(offered >= self.owed, "owed bytes not offered again");
            return Ok(std::mem::take(&mut self.owed).min(offered));
        }
        let total = total_len(bufs);
        if total == 0 {
            return Ok(0);
        }
        if direct && total < 2 {
            // Too short to hold a byte back (see above): the writer task writes it.
            return Err(would_block());
        }
        if !self.traffic || self.close_sent {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "TLS connection not open for writing",
            ));
        }
        let taken = self.encrypt(bufs).map_err(|e| {
            let e = self.fail(e.into());
            io_error(e)
        })?;
        if self.flush_to(tcp)? || !direct {
            return Ok(taken);
        }
        self.owed = 1;
        Ok(taken - 1)
    }

    /// Encrypts up to one record's worth of `bufs` (or a few records of one large slice) into
    /// `outgoing`; returns the plaintext bytes taken. Frames are gathered straight into the
    /// record: no intermediate copy.
    fn encrypt(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, RecordError> {
        let State::Traffic(records) = &mut self.state else {
            return Err(RecordError::NotEstablished);
        };
        records.seal_data(bufs, MAX_WRITE_RECORDS, &mut self.outgoing)
    }

    /// Queues a close_notify alert (once); the caller flushes it.
    pub(super) fn close_notify(&mut self) -> Result<(), Failure> {
        if self.close_sent || !self.traffic || self.failed.is_some() {
            return Ok(());
        }
        if let State::Traffic(records) = &mut self.state {
            records
                .seal_alert(None, &mut self.outgoing)
                .map_err(Failure::from)?;
        }
        self.close_sent = true;
        Ok(())
    }
}
