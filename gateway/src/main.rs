//! `pubgate`: flags → settings → run.

use std::process::ExitCode;

use clap::Parser;
use gateway::config::{Cli, Settings};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pubgate: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = gateway::logging::init(&settings.log) {
        eprintln!("pubgate: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pubgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(gateway::server::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pubgate: {e:#}");
            // A certificate that cannot be loaded is a configuration error, like a bad key.
            if e.downcast_ref::<gateway::tls::TlsError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
