//! pubgate-probe: the container image's HEALTHCHECK. The runtime image has no shell, curl or wget, so
//! this std-only program (built with plain `rustc` in the image's build stage; not part of the cargo
//! workspace) sends `GET <path>` to a plain-HTTP address and exits 0 on a 2xx answer, 1 otherwise.
//!
//!   pubgate-probe [http://HOST:PORT/PATH]      (default http://127.0.0.1:8081/healthz)
//!
//! Timeouts are short (2 s to connect, 2 s to read), so a hung node fails the check instead of
//! hanging it.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

const DEFAULT_URL: &str = "http://127.0.0.1:8081/healthz";

fn main() -> ExitCode {
    let url = std::env::args().nth(1).unwrap_or_else(|| DEFAULT_URL.to_string());
    match probe(&url) {
        Ok(status) if (200..300).contains(&status) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("pubgate-probe: {url}: HTTP {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("pubgate-probe: {url}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn probe(url: &str) -> Result<u16, String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("bad address {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("no address for {authority}"))?;
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nUser-Agent: pubgate-probe\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    // The status line is all we need: "HTTP/1.1 200 OK".
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => {
            code.parse().map_err(|_| format!("bad status line {line:?}"))
        }
        _ => Err(format!("bad status line {line:?}")),
    }
}
