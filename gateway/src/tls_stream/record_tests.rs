//! The record layer against real clients over loopback TCP: every cipher suite of both versions
//! with rustls (`openssl s_client` is in `openssl_tests`), key updates, and the failure paths: corrupted,
//! truncated, oversized, out-of-order and misplaced records, each of which must fail the
//! connection with an alert and deliver none of its bytes.

use std::io::{IoSlice, Write};
use std::sync::Arc;

use aws_lc_rs::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::crypto::{CryptoProvider, aws_lc_rs as provider};
use rustls::pki_types::ServerName;
use rustls::{
    ClientConfig, ConnectionTrafficSecrets, RootCertStore, SupportedCipherSuite,
    SupportedProtocolVersion,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::tests::{Pki, pki};
use super::*;

/// The suites the server enables (rustls' defaults with aws-lc-rs), with their version. The
/// test certificate is ECDSA, so the TLS 1.2 RSA suites (same records) cannot be negotiated.
pub(super) fn suites() -> Vec<(SupportedCipherSuite, &'static SupportedProtocolVersion)> {
    provider::DEFAULT_CIPHER_SUITES
        .iter()
        .filter(|s| !format!("{:?}", s.suite()).contains("_RSA_"))
        .map(|s| {
            let v = match s {
                SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
                SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
            };
            (*s, v)
        })
        .collect()
}

fn connector(
    pki: &Pki,
    suite: SupportedCipherSuite,
    version: &'static SupportedProtocolVersion,
) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(pki.cert.clone()).expect("root");
    let provider = CryptoProvider {
        cipher_suites: vec![suite],
        ..provider::default_provider()
    };
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[version])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.enable_secret_extraction = true;
    TlsConnector::from(Arc::new(config))
}

/// A handshaken pair with the client restricted to `suite`.
async fn pair_with(
    suite: SupportedCipherSuite,
    version: &'static SupportedProtocolVersion,
) -> (TlsConn, TlsStream<TcpStream>) {
    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connector = connector(&pki, suite, version);
    let client = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("name");
        connector
            .connect(name, tcp)
            .await
            .expect("client handshake")
    });
    let (tcp, _) = listener.accept().await.expect("accept");
    let server = accept(tcp, pki.server.clone()).await.expect("handshake");
    let client = client.await.expect("client task");
    assert_eq!(
        client.get_ref().1.negotiated_cipher_suite(),
        Some(suite),
        "the client got the suite it asked for"
    );
    (server, client)
}

fn tls13_aes128() -> SupportedCipherSuite {
    provider::cipher_suite::TLS13_AES_128_GCM_SHA256
}

fn tls12_aes128() -> SupportedCipherSuite {
    provider::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
}

#[tokio::test]
async fn every_suite_carries_data_both_ways_through_the_record_layer() {
    for (suite, version) in suites() {
        let (server, mut client) = pair_with(suite, version).await;
        assert!(
            server.0.lock().records_mut().is_some(),
            "{suite:?}: switched"
        );
        let (mut r, mut w, direct) = server.split();
        let up: Vec<u8> = (0..40_000u32).map(|i| (i % 253) as u8).collect();
        client.write_all(&up).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0u8; up.len()];
        r.read_exact(&mut got).await.unwrap();
        assert!(got == up, "{suite:?}: client to server");

        // Several records from one large write, then frames gathered into one record.
        let down: Vec<u8> = (0..70_000u32).map(|i| (i % 241) as u8).collect();
        w.write_all(&down).await.unwrap();
        w.write_all_vectored_for_test(&[b"a,".as_slice(), b"b,", b"c"])
            .await;
        w.flush().await.unwrap();
        let mut got = vec![0u8; down.len() + 5];
        client.read_exact(&mut got).await.unwrap();
        assert!(got[..down.len()] == down[..], "{suite:?}: server to client");
        assert_eq!(&got[down.len()..], b"a,b,c");

        if version == &rustls::version::TLS13 {
            for round in 0..3u8 {
                client.get_mut().1.refresh_traffic_keys().expect("update");
                client.write_all(&[round]).await.unwrap();
                client.flush().await.unwrap();
                let mut one = [0u8; 1];
                r.read_exact(&mut one).await.unwrap();
                assert_eq!(one, [round], "{suite:?}: after the client's key update");
                assert_eq!(
                    direct.try_write_vectored(&[IoSlice::new(b"ok")]).unwrap(),
                    2
                );
                let mut two = [0u8; 2];
                client
                    .read_exact(&mut two)
                    .await
                    .expect("after our key update");
                assert_eq!(&two, b"ok");
            }
        }
        w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client
            .read_to_end(&mut rest)
            .await
            .expect("clean close_notify");
        assert!(rest.is_empty());
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest)
            .await
            .expect("the client's close_notify");
        assert!(rest.is_empty());
        assert_eq!(r.0.lock().buffered_capacity(), 0, "{suite:?}: idle again");
    }
}

/// A client asking for key updates over and over without sending data is cut off: each costs
/// key derivations on both sides.
#[tokio::test]
async fn endless_key_updates_are_refused() {
    let (server, mut client) = pair_with(tls13_aes128(), &rustls::version::TLS13).await;
    let (mut r, _w, _d) = server.split();
    for _ in 0..32 {
        client.get_mut().1.refresh_traffic_keys().expect("update");
    }
    client.write_all(b"x").await.unwrap();
    client.flush().await.unwrap();
    let mut one = [0u8; 1];
    r.read_exact(&mut one).await.expect("32 in a row are fine");
    for _ in 0..33 {
        client.get_mut().1.refresh_traffic_keys().expect("update");
    }
    client.write_all(b"y").await.unwrap();
    client.flush().await.unwrap();
    expect_refused(&mut r, "too many").await;
}

/// Reaching the sending key's limit renews the key on TLS 1.3 (the client keeps decrypting) and
/// ends a TLS 1.2 connection, which cannot renew it.
#[tokio::test]
async fn the_sending_limit_renews_the_key_or_ends_the_connection() {
    for (suite, version) in [
        (tls13_aes128(), &rustls::version::TLS13),
        (tls12_aes128(), &rustls::version::TLS12),
    ] {
        let (server, mut client) = pair_with(suite, version).await;
        let (_r, mut w, _direct) = server.split();
        let limit = {
            let mut engine = w.0.lock();
            let records = engine.records_mut().expect("switched");
            records.set_tx_limit(0);
            records.owes_key_update()
        };
        assert!(!limit);
        let written = w.write_all(b"after the limit").await;
        if version == &rustls::version::TLS13 {
            written.unwrap();
            w.flush().await.unwrap();
            let mut got = [0u8; 15];
            client
                .read_exact(&mut got)
                .await
                .expect("decrypts under the new key");
            assert_eq!(&got, b"after the limit");
        } else {
            let e = written.expect_err("TLS 1.2 cannot renew its key");
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            assert!(e.to_string().contains("limit"), "{e}");
        }
    }
}

/// Encrypts `plain` the way the client would, so a test can corrupt the ciphertext.
fn client_record(client: &mut TlsStream<TcpStream>, plain: &[u8]) -> Vec<u8> {
    let conn = client.get_mut().1;
    conn.writer().write_all(plain).expect("plaintext");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("ciphertext");
    }
    out
}

/// Reads the client side until the server's alert surfaces as an error naming `alert`.
async fn expect_alert(client: &mut TlsStream<TcpStream>, alert: &str) {
    let mut sink = Vec::new();
    let e = client
        .read_to_end(&mut sink)
        .await
        .expect_err("the server sent a fatal alert");
    assert!(e.to_string().contains(alert), "{e} (wanted {alert})");
    assert!(sink.is_empty(), "no data before the alert: {sink:?}");
}

async fn expect_refused(r: &mut TlsRead, what: &str) {
    let mut buf = [0u8; 64];
    let e = r.read(&mut buf).await.expect_err("the record is refused");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains(what), "{e} (wanted {what})");
    // Every later read reports the same failure; nothing is delivered after it.
    assert!(r.read(&mut buf).await.is_err());
}

#[tokio::test]
async fn a_corrupted_record_fails_the_connection_with_bad_record_mac() {
    for (suite, version) in suites() {
        for flip in [6usize, usize::MAX] {
            let (server, mut client) = pair_with(suite, version).await;
            let (mut r, _w, _d) = server.split();
            let mut record = client_record(&mut client, b"never delivered");
            // A byte of the ciphertext body, or of the tag at its end.
            let at = flip.min(record.len() - 1);
            record[at] ^= 0x40;
            client.get_mut().0.write_all(&record).await.unwrap();
            expect_refused(&mut r, "authentication").await;
            expect_alert(&mut client, "BadRecordMac").await;
        }
    }
}

#[tokio::test]
async fn a_record_over_the_size_limit_fails_with_record_overflow() {
    for (suite, version, len) in [
        (tls13_aes128(), &rustls::version::TLS13, (1 << 14) + 256 + 1),
        (
            tls12_aes128(),
            &rustls::version::TLS12,
            (1 << 14) + 2048 + 1,
        ),
    ] {
        let (server, mut client) = pair_with(suite, version).await;
        let (mut r, _w, _d) = server.split();
        let mut record = vec![23u8, 3, 3];
        record.extend_from_slice(&u16::try_from(len).unwrap().to_be_bytes());
        client.get_mut().0.write_all(&record).await.unwrap();
        expect_refused(&mut r, "too large").await;
        expect_alert(&mut client, "RecordOverflow").await;
    }
}

#[tokio::test]
async fn a_record_cut_short_by_the_end_of_the_stream_is_an_error() {
    for (suite, version) in [
        (tls13_aes128(), &rustls::version::TLS13),
        (tls12_aes128(), &rustls::version::TLS12),
    ] {
        let (server, mut client) = pair_with(suite, version).await;
        let (mut r, _w, _d) = server.split();
        let record = client_record(&mut client, b"cut in half");
        let tcp = client.get_mut().0;
        tcp.write_all(&record[..record.len() / 2]).await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut buf = [0u8; 64];
        let e = r.read(&mut buf).await.expect_err("truncated");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }
}

/// A TLS 1.3 client that seals records by hand with its extracted keys, to send what no real
/// client would: wrong sequence numbers, misplaced messages, oversized plaintext.
struct RawClient {
    tcp: TcpStream,
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    /// The server's sending key, to read its alert.
    server_key: LessSafeKey,
    server_iv: [u8; 12],
    server_seq: u64,
}

fn aes128(secrets: ConnectionTrafficSecrets) -> (LessSafeKey, [u8; 12]) {
    let ConnectionTrafficSecrets::Aes128Gcm { key, iv } = secrets else {
        panic!("negotiated AES-128-GCM");
    };
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, key.as_ref()).expect("key"));
    (key, iv.as_ref().try_into().expect("iv"))
}

fn nonce(iv: [u8; 12], seq: u64) -> Nonce {
    let mut nonce = iv;
    for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
        *n ^= s;
    }
    Nonce::assume_unique_for_key(nonce)
}

impl RawClient {
    async fn connect() -> (TlsRead, RawClient) {
        let (server, client) = pair_with(tls13_aes128(), &rustls::version::TLS13).await;
        let (tcp, conn) = client.into_inner();
        let secrets = conn.dangerous_extract_secrets().expect("client secrets");
        let (seq, tx) = secrets.tx;
        let (server_seq, rx) = secrets.rx;
        let (key, iv) = aes128(tx);
        let (server_key, server_iv) = aes128(rx);
        let (r, _w, _d) = server.split();
        let raw = RawClient {
            tcp,
            key,
            iv,
            seq,
            server_key,
            server_iv,
            server_seq,
        };
        (r, raw)
    }

    /// A protected record: `content` with inner type `typ`, then `padding` zeros.
    fn seal(&mut self, typ: Option<u8>, content: &[u8], padding: usize, seq: u64) -> Vec<u8> {
        let mut inner = content.to_vec();
        inner.extend(typ);
        inner.extend(std::iter::repeat_n(0u8, padding));
        let len = u16::try_from(inner.len() + 16).expect("len");
        let header = [23, 3, 3, len.to_be_bytes()[0], len.to_be_bytes()[1]];
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(self.iv, seq), Aad::from(header), &mut inner)
            .expect("seal");
        let mut record = header.to_vec();
        record.extend_from_slice(&inner);
        record.extend_from_slice(tag.as_ref());
        record
    }

    async fn send(&mut self, typ: Option<u8>, content: &[u8]) {
        let record = self.seal(typ, content, 0, self.seq);
        self.seq += 1;
        self.tcp.write_all(&record).await.unwrap();
    }

    /// The server's last record before it closed the connection is the fatal alert
    /// `description` (its session tickets come first); the server side must be dropped.
    async fn expect_alert(mut self, description: u8) {
        let mut rest = Vec::new();
        // A reset instead of a close is possible when our own bytes were left unread.
        let _ = self.tcp.read_to_end(&mut rest).await;
        let mut last = None;
        let mut records = rest.as_mut_slice();
        while records.len() >= 5 {
            let len = usize::from(u16::from_be_bytes([records[3], records[4]]));
            let (record, more) = records.split_at_mut(5 + len);
            let aad = Aad::from([record[0], record[1], record[2], record[3], record[4]]);
            let plain = self
                .server_key
                .open_in_place(
                    nonce(self.server_iv, self.server_seq),
                    aad,
                    &mut record[5..],
                )
                .expect("the server's records decrypt");
            self.server_seq += 1;
            last = Some(plain.to_vec());
            records = more;
        }
        assert_eq!(last, Some(vec![2, description, 21]), "a fatal alert, last");
    }
}

#[tokio::test]
async fn a_record_out_of_sequence_is_refused() {
    let (mut r, mut c) = RawClient::connect().await;
    c.send(Some(23), b"first").await;
    let mut got = [0u8; 5];
    r.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"first", "the record in sequence is delivered");
    // Replaying the first record, and skipping one, both fail authentication.
    let replay = c.seal(Some(23), b"again", 0, c.seq - 1);
    c.tcp.write_all(&replay).await.unwrap();
    expect_refused(&mut r, "authentication").await;
    drop(r);
    c.expect_alert(20).await;

    let (mut r, mut c) = RawClient::connect().await;
    let skipped = c.seal(Some(23), b"later", 0, c.seq + 1);
    c.tcp.write_all(&skipped).await.unwrap();
    expect_refused(&mut r, "authentication").await;
    drop(r);
    c.expect_alert(20).await;
}

#[tokio::test]
async fn misplaced_and_malformed_records_are_refused() {
    let too_long = vec![b'x'; (1 << 14) + 1];
    type Case<'a> = (&'a str, Option<u8>, &'a [u8], &'a str, Option<u8>);
    let cases: [Case<'_>; 9] = [
        (
            "plaintext over 2^14",
            Some(23),
            &too_long,
            "too large",
            Some(22),
        ),
        (
            "a NewSessionTicket",
            Some(22),
            &[4, 0, 0, 0],
            "unexpected",
            Some(10),
        ),
        (
            "a ClientHello",
            Some(22),
            &[1, 0, 0, 0],
            "unexpected",
            Some(10),
        ),
        (
            "a bad KeyUpdate request",
            Some(22),
            &[24, 0, 0, 1, 2],
            "illegal",
            Some(47),
        ),
        (
            "a long KeyUpdate",
            Some(22),
            &[24, 0, 0, 2, 0, 0],
            "malformed",
            Some(50),
        ),
        (
            "an empty handshake record",
            Some(22),
            &[],
            "malformed",
            Some(50),
        ),
        (
            "a record with no content type",
            None,
            &[],
            "unexpected",
            Some(10),
        ),
        (
            "an unknown content type",
            Some(99),
            b"x",
            "unexpected",
            Some(10),
        ),
        ("a fatal alert", Some(21), &[2, 40], "alert 40", None),
    ];
    for (what, typ, content, error, alert) in cases {
        let (mut r, mut c) = RawClient::connect().await;
        c.send(typ, content).await;
        let mut buf = [0u8; 64];
        let e = r.read(&mut buf).await.expect_err(what);
        assert!(e.to_string().contains(error), "{what}: {e}");
        drop(r);
        if let Some(alert) = alert {
            c.expect_alert(alert).await;
        }
    }
    // An unprotected ChangeCipherSpec after the handshake.
    let (mut r, mut c) = RawClient::connect().await;
    c.tcp.write_all(&[20, 3, 3, 0, 1, 1]).await.unwrap();
    expect_refused(&mut r, "unexpected").await;
    drop(r);
    c.expect_alert(10).await;
}

#[tokio::test]
async fn padding_is_removed_and_close_notify_ends_the_stream() {
    let (mut r, mut c) = RawClient::connect().await;
    let padded = c.seal(Some(23), b"padded", 100, c.seq);
    c.seq += 1;
    c.tcp.write_all(&padded).await.unwrap();
    c.send(Some(23), b"").await;
    c.send(Some(21), &[1, 0]).await;
    // After close_notify nothing counts, not even garbage.
    c.tcp.write_all(b"\x17\x03\x03\x00\x01!").await.unwrap();
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.expect("a clean end");
    assert_eq!(got, b"padded");
}

/// Writes slices with one vectored write, as the send queue does.
trait VectoredForTest {
    async fn write_all_vectored_for_test(&mut self, parts: &[&[u8]]);
}

impl VectoredForTest for TlsWrite {
    async fn write_all_vectored_for_test(&mut self, parts: &[&[u8]]) {
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let n = self.write_vectored(&slices).await.unwrap();
        assert_eq!(n, total, "small slices fit one record");
    }
}

/// Padding counts towards the limit: an inner plaintext of more than 2^14 + 1 bytes is a
/// record_overflow even when the excess is zeros (RFC 8446 §5.4).
#[tokio::test]
async fn padding_past_the_plaintext_limit_is_a_record_overflow() {
    let (mut r, mut c) = RawClient::connect().await;
    let over = c.seal(Some(23), b"x", super::records::MAX_PLAINTEXT, c.seq);
    c.seq += 1;
    c.tcp.write_all(&over).await.unwrap();
    let mut buf = [0u8; 16];
    let e = r.read(&mut buf).await.expect_err("padded past 2^14 + 1");
    assert!(e.to_string().contains("too large"), "{e}");
    drop(r);
    c.expect_alert(22).await;
}
