//! `pubgate`: flags → settings → run.

use std::process::ExitCode;

use clap::Parser;
use gateway::Error;
use gateway::config::{Cli, Settings};

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pubgate: {e}");
            e.exit_code()
        }
    }
}

fn run(cli: Cli) -> Result<(), Error> {
    let settings = Settings::load(&cli).map_err(Error::config)?;
    gateway::logging::init(&settings.log).map_err(Error::config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Runtime(anyhow::anyhow!("cannot start the runtime: {e}")))?;
    runtime.block_on(gateway::server::run(settings))?;
    Ok(())
}
