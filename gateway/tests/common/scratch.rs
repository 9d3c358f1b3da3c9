//! What a test sets up around a process: temp dirs and files, free ports.

use std::path::{Path, PathBuf};

/// A fresh directory under the system temp dir, removed (with everything in it) on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `pubgate-TAG-PID-RANDOM`.
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "pubgate-{tag}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file in a fresh [`TempDir`], removed on drop.
pub struct TempFile {
    _dir: TempDir,
    path: PathBuf,
}

impl TempFile {
    /// Writes `contents` to a new file named `name`.
    pub fn new(name: &str, contents: &str) -> TempFile {
        let dir = TempDir::new("test");
        let path = dir.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        TempFile { _dir: dir, path }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as a string, for command-line arguments.
    pub fn arg(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }
}

/// A free loopback port for a server a test starts with a fixed address (a node restarted on the
/// same port, Redis, HAProxy). Taken below the kernel's ephemeral range (and checked by binding
/// it), so an outgoing connection cannot grab it before the server binds it.
pub fn free_port() -> u16 {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .filter(|low| *low > 12_000)
        .unwrap_or(32_768);
    for _ in 0..1000 {
        let port = 10_000 + rand::random::<u16>() % (low - 10_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}
