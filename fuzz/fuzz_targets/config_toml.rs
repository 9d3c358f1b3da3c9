//! `config::Settings::load` on any TOML text given as `--config`: an error names what is wrong,
//! never a panic.
#![no_main]

use gateway::config::{Cli, Settings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path =
        std::env::temp_dir().join(format!("pubgate-fuzz-config-{}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let cli = Cli {
        config: Some(path),
        ..Cli::default()
    };
    match Settings::load(&cli) {
        Ok(s) => {
            assert!(s.server.max_connections >= 1);
            assert!(s.server.idle_timeout > s.server.ping_interval);
        }
        Err(e) => assert!(e.to_string().starts_with("config: ")),
    }
});
