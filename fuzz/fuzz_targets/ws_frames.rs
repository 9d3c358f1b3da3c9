//! The WebSocket frame reader on any byte stream, delivered in chunks of a fuzzed size.
//! It must never panic or hang, never yield a message over its cap, and end only with a close
//! code that fits (1002, 1007, 1009), an allowed peer close code, or the stream's end.
#![no_main]

use gateway::ws_read::{Incoming, ReadError, WsReader};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

const CAP: usize = 1024;

/// One runtime for all inputs: building one per input would cost more than the input itself.
static RUNTIME: std::sync::LazyLock<tokio::runtime::Runtime> = std::sync::LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
});

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk % 64) + 1;
    let stream = stream.to_vec();
    RUNTIME.block_on(async move {
        let (mut client, server) = tokio::io::duplex(chunk);
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&stream).await;
        });
        let mut reader = WsReader::new(server, CAP);
        loop {
            let next = tokio::time::timeout(std::time::Duration::from_secs(5), reader.next())
                .await
                .expect("reader hung on a finished stream");
            match next {
                Ok(Incoming::Text(t)) => {
                    assert!(t.len() <= CAP);
                    assert!(std::str::from_utf8(&t).is_ok());
                }
                Ok(Incoming::Binary(b)) => assert!(b.len() <= CAP),
                Ok(Incoming::Ping(p)) => assert!(p.len() <= 125),
                Ok(Incoming::Pong) => {}
                Ok(Incoming::Close(code)) => {
                    assert!(matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999));
                    break;
                }
                Err(ReadError::Violation(code, _)) => {
                    assert!(matches!(code, 1002 | 1007 | 1009));
                    break;
                }
                Err(ReadError::Gone) => break,
            }
        }
        drop(reader);
        let _ = writer.await;
    });
});
