//! The synchronous core of a lean TLS connection: rustls' unbuffered state machine and the three
//! buffers it needs (ciphertext in, plaintext in, ciphertext out), each empty and unallocated
//! whenever it holds nothing, so an idle connection keeps only the session's keys.
//!
//! Nothing here waits: every call either makes progress now or says `WouldBlock`. The async
//! wrappers in [`super`] decide when to wait for the socket.

use std::io::{self, IoSlice};

use rustls::Error as TlsError;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};
use tokio::net::TcpStream;

/// Most plaintext gathered from several slices into one TLS record: the record size limit.
const MAX_RECORD_PLAINTEXT: usize = 16 * 1024;
/// Most plaintext one write encrypts from a single large slice (a few records).
const MAX_WRITE_PLAINTEXT: usize = 4 * MAX_RECORD_PLAINTEXT;
/// Room per record for the header, the AEAD tag, TLS 1.3's content type or TLS 1.2's explicit
/// nonce: a first guess at the ciphertext size (a short guess costs one retry, never an error).
const RECORD_OVERHEAD: usize = 64;
/// Bytes taken from the socket per read: one full record with its header and tag.
pub(super) const READ_CHUNK: usize = MAX_RECORD_PLAINTEXT + 512;
/// Most ciphertext kept waiting for the rest of a message: rustls refuses handshake messages over
/// 64 KiB and records over 16 KiB, so more than this is a peer that does not speak TLS.
const MAX_INCOMING: usize = 64 * 1024 + READ_CHUNK;

/// One TLS connection's state, without the socket.
pub(super) struct Engine {
    conn: UnbufferedServerConnection,
    /// Ciphertext read but not yet processed: part of a record or of a handshake flight.
    incoming: Vec<u8>,
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
    failed: Option<TlsError>,
}

/// Turns a rustls error into the I/O error the stream reports.
pub(super) fn io_error(e: TlsError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
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

fn encrypt_required(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

/// Where a round of record processing stopped.
enum Stop {
    /// Every complete record is processed; more must be read (or the handshake is done).
    Idle,
    /// Both sides closed.
    Closed,
}

impl Engine {
    pub(super) fn new(conn: UnbufferedServerConnection) -> Self {
        Engine {
            conn,
            incoming: Vec::new(),
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

    /// Takes ciphertext read from the socket and processes every complete record in it.
    pub(super) fn receive(&mut self, data: &[u8]) -> Result<(), TlsError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.incoming.len() + data.len() > MAX_INCOMING {
            return Err(self.fail(TlsError::General("TLS message too large".into())));
        }
        self.incoming.extend_from_slice(data);
        let result = self.process();
        if self.incoming.is_empty() {
            // What an idle connection holds: nothing.
            self.incoming = Vec::new();
        }
        result
    }

    /// Notes that TCP reached end of file: reads end once the plaintext is taken.
    pub(super) fn receive_eof(&mut self) {
        self.read_closed = true;
    }

    /// Processes complete records until rustls needs more ciphertext, queuing what it wants sent
    /// and keeping the plaintext it decrypted.
    pub(super) fn process(&mut self) -> Result<(), TlsError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.run_records() {
            Ok(_) => Ok(()),
            Err(e) => {
                // Nothing more will be read: dropping the rest also keeps rustls from parsing it
                // (and alerting) again. rustls queued an alert for the peer; send it along.
                self.incoming = Vec::new();
                self.collect_alerts();
                Err(self.fail(e))
            }
        }
    }

    fn fail(&mut self, e: TlsError) -> TlsError {
        self.failed = Some(e.clone());
        e
    }

    fn run_records(&mut self) -> Result<Stop, TlsError> {
        loop {
            let status = self.conn.process_tls_records(&mut self.incoming);
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
                ConnectionState::BlockedHandshake => Some(Stop::Idle),
                ConnectionState::WriteTraffic(_) => {
                    self.traffic = true;
                    Some(Stop::Idle)
                }
                // 0-RTT is not enabled (`max_early_data_size` stays 0), and later states are
                // unknown to this code: refuse rather than guess.
                _ => return Err(TlsError::General("unexpected TLS state".into())),
            };
            self.incoming.drain(..discard);
            if let Some(stop) = stop {
                return Ok(stop);
            }
        }
    }

    /// After a failure, moves the alert rustls queued into `outgoing` (best effort).
    fn collect_alerts(&mut self) {
        for _ in 0..4 {
            // The alert is handed over before any record is looked at: nothing to discard.
            let status = self.conn.process_tls_records(&mut self.incoming);
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
            let e = self.fail(e);
            io_error(e)
        })?;
        if self.flush_to(tcp)? || !direct {
            return Ok(taken);
        }
        self.owed = 1;
        Ok(taken - 1)
    }

    /// Encrypts up to one record's worth of `bufs` (or a few records of one large slice) into
    /// `outgoing`; returns the plaintext bytes taken.
    fn encrypt(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize, TlsError> {
        // Anything rustls queued (an alert, the key update answering the peer's) goes out first.
        self.run_records()?;
        let mut slices = bufs.iter().filter(|b| !b.is_empty());
        let first = slices.next().map_or(&[][..], |b| &b[..]);
        let gathered;
        let plain: &[u8] = if first.len() >= MAX_RECORD_PLAINTEXT {
            &first[..first.len().min(MAX_WRITE_PLAINTEXT)]
        } else if slices.clone().next().is_none() {
            // One frame (the usual direct write): encrypted from where it is.
            first
        } else {
            let mut all = Vec::with_capacity(MAX_RECORD_PLAINTEXT.min(total_len(bufs)));
            for b in bufs {
                let n = b.len().min(MAX_RECORD_PLAINTEXT - all.len());
                all.extend_from_slice(&b[..n]);
                if all.len() == MAX_RECORD_PLAINTEXT {
                    break;
                }
            }
            gathered = all;
            &gathered
        };
        let start = self.outgoing.len();
        let guess = plain.len() + RECORD_OVERHEAD * (plain.len() / MAX_RECORD_PLAINTEXT + 1);
        let status = self.conn.process_tls_records(&mut self.incoming);
        let discard = status.discard;
        match status.state? {
            ConnectionState::WriteTraffic(mut traffic) => {
                append(
                    &mut self.outgoing,
                    guess,
                    |out| traffic.encrypt(plain, out),
                    encrypt_required,
                )
                .map_err(|e| TlsError::General(e.to_string()))?;
            }
            _ => return Err(TlsError::General("TLS connection not writable".into())),
        }
        self.incoming.drain(..discard);
        // A key update that this encryption itself started (rustls renews the keys before they
        // reach their usage limit) is handed over only after the data was encrypted under the new
        // key; the peer must see the update first.
        let mut before = Vec::new();
        loop {
            // Queued messages are handed over before any record is looked at: nothing to discard.
            let status = self.conn.process_tls_records(&mut self.incoming);
            let Ok(ConnectionState::EncodeTlsData(mut data)) = status.state else {
                break;
            };
            append(&mut before, 0, |b| data.encode(b), encode_required)
                .map_err(|e| TlsError::General(e.to_string()))?;
        }
        if !before.is_empty() {
            self.outgoing.splice(start..start, before);
        }
        Ok(plain.len())
    }

    /// Queues a close_notify alert (once); the caller flushes it.
    pub(super) fn close_notify(&mut self) -> Result<(), TlsError> {
        if self.close_sent || !self.traffic || self.failed.is_some() {
            return Ok(());
        }
        self.run_records()?;
        let status = self.conn.process_tls_records(&mut self.incoming);
        let discard = status.discard;
        if let Ok(ConnectionState::WriteTraffic(mut traffic)) = status.state {
            append(
                &mut self.outgoing,
                RECORD_OVERHEAD,
                |out| traffic.queue_close_notify(out),
                encrypt_required,
            )
            .map_err(|e| TlsError::General(e.to_string()))?;
        }
        self.incoming.drain(..discard);
        self.close_sent = true;
        Ok(())
    }
}
