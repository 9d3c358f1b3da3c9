//! The lean TLS stream against a real rustls client over loopback TCP: handshakes on both
//! versions, data both ways, buffers given back when idle, direct writes into a full socket handed
//! over to the write half without losing, repeating or reordering a byte, and closes.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::*;

pub(super) struct Pki {
    pub(super) server: Arc<ServerConfig>,
    pub(super) cert: CertificateDer<'static>,
}

pub(super) fn pki() -> Pki {
    crate::tls::install_default_provider();
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    let cert = c.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.signing_key.serialize_der()));
    let mut server = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    server.enable_secret_extraction = true;
    Pki {
        server: Arc::new(server),
        cert,
    }
}

fn client(pki: &Pki, versions: &[&'static SupportedProtocolVersion]) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(pki.cert.clone()).expect("root");
    let config = ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// A handshaken pair: (server side, client side).
async fn pair(versions: &[&'static SupportedProtocolVersion]) -> (TlsConn, TlsStream<TcpStream>) {
    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connector = client(&pki, versions);
    let client = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("name");
        connector
            .connect(name, tcp)
            .await
            .expect("client handshake")
    });
    let (tcp, _) = listener.accept().await.expect("accept");
    let server = accept(tcp, pki.server.clone())
        .await
        .expect("server handshake");
    (server, client.await.expect("client task"))
}

#[tokio::test]
async fn data_flows_both_ways_and_idle_connections_hold_no_buffers() {
    for versions in [&[&rustls::version::TLS13][..], &[&rustls::version::TLS12]] {
        let (mut server, mut client) = pair(versions).await;
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut got = [0u8; 18];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n\r\n");

        // Several slices in one write: one record, read back whole and in order.
        let n = server
            .write_vectored(&[
                IoSlice::new(b"one,"),
                IoSlice::new(b"two,"),
                IoSlice::new(b"3"),
            ])
            .await
            .unwrap();
        assert_eq!(n, 9);
        server.flush().await.unwrap();
        let mut got = [0u8; 9];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"one,two,3");

        // Larger than a record, both ways.
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let sent = big.clone();
        let (mut r, mut w, _direct) = server.split();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.flush().await.unwrap();
            w
        });
        let mut echo = vec![0u8; big.len()];
        client.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, big);
        client.write_all(&big).await.unwrap();
        let mut back = vec![0u8; big.len()];
        r.read_exact(&mut back).await.unwrap();
        assert_eq!(back, big);
        let _w = writer.await.unwrap();
        assert_eq!(
            r.0.lock().buffered_capacity(),
            0,
            "{versions:?}: buffers given back once everything is read and written"
        );
    }
}

#[tokio::test]
async fn a_fresh_connection_holds_no_buffers_after_the_handshake() {
    let (server, _client) = pair(&[&rustls::version::TLS13]).await;
    assert_eq!(server.buffered_capacity(), 0);
}

/// Writes `frames` the way the send queue does: direct writes while the socket takes them, then
/// the write half for the rest (the owed byte included).
#[tokio::test]
async fn direct_writes_into_a_full_socket_hand_over_without_loss_or_repeat() {
    let (server, mut client) = pair(&[&rustls::version::TLS13]).await;
    let (_r, mut w, direct) = server.split();
    let mut frames: VecDeque<Bytes> = (0..40_000u32)
        .map(|i| Bytes::from(format!("frame {i:05} {}|", "p".repeat(300))))
        .collect();
    let expected: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();

    // The client reads nothing yet, so the socket fills and a direct write must stop.
    let mut handed_over = false;
    while !frames.is_empty() {
        let slices: Vec<IoSlice<'_>> = frames.iter().take(16).map(|f| IoSlice::new(f)).collect();
        match direct.try_write_vectored(&slices) {
            Ok(0) | Err(_) => {
                handed_over = true;
                break;
            }
            Ok(n) => {
                crate::send_queue::drop_written(&mut frames, n);
            }
        }
    }
    assert!(handed_over, "the socket never filled up");

    let reader = tokio::spawn(async move {
        let mut got = vec![0u8; expected.len()];
        client.read_exact(&mut got).await.unwrap();
        (got, expected)
    });
    while !frames.is_empty() {
        let slices: Vec<IoSlice<'_>> = frames.iter().take(16).map(|f| IoSlice::new(f)).collect();
        let n = w.write_vectored(&slices).await.unwrap();
        assert!(n > 0);
        let mut left = n;
        while left > 0 {
            let front = frames.front_mut().unwrap();
            let k = left.min(front.len());
            front.advance(k);
            left -= k;
            if front.is_empty() {
                frames.pop_front();
            }
        }
    }
    w.flush().await.unwrap();
    let (got, expected) = reader.await.unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "the stream was altered");
}

#[tokio::test]
async fn shutdown_sends_close_notify_and_a_client_close_ends_reads() {
    let (server, mut client) = pair(&[&rustls::version::TLS13]).await;
    let (mut r, mut w, _direct) = server.split();
    w.write_all(b"bye").await.unwrap();
    w.shutdown().await.unwrap();
    let mut got = Vec::new();
    // A clean end of stream: rustls reports a truncation without close_notify as an error.
    client.read_to_end(&mut got).await.expect("clean close");
    assert_eq!(got, b"bye");

    client.write_all(b"last").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.expect("clean close");
    assert_eq!(got, b"last");
}

#[tokio::test]
async fn a_client_that_does_not_speak_tls_is_refused() {
    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (server_tcp, _) = listener.accept().await.expect("accept");
    let err = accept(server_tcp, pki.server.clone())
        .await
        .err()
        .expect("plaintext HTTP is not a handshake");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    // The client is told: rustls answers garbage with an alert (type 21) before closing.
    let mut reply = Vec::new();
    tcp.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply.first(), Some(&21), "{reply:?}");
}

/// A client's KeyUpdate asking for ours: the server's next record must follow its own KeyUpdate,
/// from the write half and from a direct write alike. A wrong order fails the client's decryption.
#[tokio::test]
async fn a_key_update_requested_by_the_client_is_answered_in_order() {
    let (server, mut client) = pair(&[&rustls::version::TLS13]).await;
    let (mut r, mut w, direct) = server.split();
    for round in 0..3u8 {
        client
            .get_mut()
            .1
            .refresh_traffic_keys()
            .expect("key update");
        client.write_all(&[round]).await.unwrap();
        client.flush().await.unwrap();
        let mut got = [0u8; 1];
        r.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [round]);
        // Alternate the write half and the direct path: both must send the update first.
        if round % 2 == 0 {
            w.write_all(b"ok").await.unwrap();
            w.flush().await.unwrap();
        } else {
            assert_eq!(
                direct.try_write_vectored(&[IoSlice::new(b"ok")]).unwrap(),
                2
            );
        }
        let mut got = [0u8; 2];
        client
            .read_exact(&mut got)
            .await
            .expect("decrypts after the key update");
        assert_eq!(&got, b"ok");
    }
}

/// The start of a ClientHello (a handshake message rustls keeps unfinished) followed by a record
/// that is not TLS: refused with an alert. The alert used to be collected against an emptied
/// buffer while rustls still pointed into the unfinished message: a panic.
#[tokio::test]
async fn an_unfinished_hello_then_garbage_is_refused_without_a_panic() {
    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    for garbage in [
        &[0x63, 3, 3, 0, 1, 0][..],
        &[0x17, 3, 3, 0, 1, 0],
        &[0x15, 3, 3, 0, 2, 2, 40],
    ] {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        let mut bytes = vec![0x16, 3, 1, 0, 4, 1, 0, 0, 0xc8];
        bytes.extend_from_slice(garbage);
        tcp.write_all(&bytes).await.unwrap();
        let (server_tcp, _) = listener.accept().await.expect("accept");
        let accepted = tokio::spawn(accept(server_tcp, pki.server.clone()));
        let result = accepted.await.expect("the handshake task must not panic");
        assert!(result.is_err(), "{garbage:?} is not a handshake");
        let mut reply = Vec::new();
        let _ = tcp.read_to_end(&mut reply).await;
        assert!(
            reply.first().is_none_or(|b| *b == 21),
            "an alert or nothing: {reply:?}"
        );
    }
}

/// A client that asks for a key update in the same write as its Finished: the record layer
/// answers it (rustls, which would otherwise have taken the KeyUpdate during the handshake, queued
/// its answer where the switch to the record layer dropped it, and the client could not decrypt
/// anything after).
#[tokio::test]
async fn a_key_update_coalesced_with_the_finished_is_answered() {
    use std::io::{Read, Write};
    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut roots = RootCertStore::empty();
    roots.add(pki.cert.clone()).expect("root");
    let config = ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("localhost").expect("name");
    let mut client = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let server_config = pki.server.clone();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut conn = accept(tcp, server_config).await.expect("server handshake");
        let mut got = [0u8; 4];
        conn.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"ping");
        conn.write_all(b"pong").await.expect("write");
        conn.flush().await.expect("flush");
        conn
    });
    // Drive the client by hand over a blocking socket, so its Finished and the KeyUpdate leave
    // in one write.
    let tcp = tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        loop {
            if client.wants_write() {
                client.write_tls(&mut tcp).expect("send");
                continue;
            }
            client.read_tls(&mut tcp).expect("read_tls");
            client.process_new_packets().expect("handshake");
            if !client.is_handshaking() {
                break;
            }
        }
        // The Finished is queued, not sent: a key update request and data go in the same write.
        client.refresh_traffic_keys().expect("key update");
        client.writer().write_all(b"ping").expect("ping");
        let mut out = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut out).expect("write_tls");
        }
        tcp.write_all(&out).expect("send");
        let mut pong = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            client.read_tls(&mut tcp).expect("read_tls");
            client
                .process_new_packets()
                .expect("the server's records decrypt");
            got += client.reader().read(&mut pong[got..]).unwrap_or(0);
        }
        assert_eq!(&pong, b"pong");
        tcp
    });
    let limit = std::time::Duration::from_secs(20);
    let _tcp = tokio::time::timeout(limit, tcp)
        .await
        .expect("in time")
        .expect("client");
    let _server = tokio::time::timeout(limit, server)
        .await
        .expect("in time")
        .expect("server");
}
