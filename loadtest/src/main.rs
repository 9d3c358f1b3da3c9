//! `pubgate-loadtest`: see `--help` and docs/benchmarks.md.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use loadtest::{chart, churn, connect, fanout, procfs, report, shards, step, ticker};

#[derive(Parser)]
#[command(
    name = "pubgate-loadtest",
    version,
    about = "Load generator for pubgate: many real WebSocket subscribers, HTTP (or raw Redis) publishers, and a report of throughput, latency, loss and memory per connection.",
    after_help = "Targets loopback addresses only. Every run is bounded in connections and time and stops by itself.\nResults: --json FILE (see docs/benchmarks.md); charts: pubgate-loadtest chart --input FILE..."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Ramp up N idle subscribed connections, hold them, and measure the server's memory per connection.
    Connect(connect::ConnectArgs),
    /// S subscribers over T topics, publishers at R messages/s: delivered/s, loss, latency, CPU per delivery.
    Fanout(fanout::FanoutArgs),
    /// Raise the delivery rate step by step until loss appears or p99 passes a limit.
    Step(step::StepArgs),
    /// Connections joining and leaving continuously while fan-out runs.
    Churn(churn::ChurnArgs),
    /// A price ticker: T topics at R ticks/s, dashboards on one wildcard each, some slow (conflated):
    /// order, loss, lag to the latest value, catch-up time, CPU per delivery.
    Ticker(ticker::TickerArgs),
    /// Draw SVG charts from JSON results.
    Chart(chart::ChartArgs),
    /// (internal) one worker process of `connect --procs`.
    #[command(hide = true)]
    ConnectWorker {
        #[arg(long)]
        spec: String,
    },
}

fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.unwrap_or_else(procfs::cores).max(1))
        .enable_all()
        .build()
}

/// The runtime a scenario is run from, with its connections on `receive_threads` threads of their
/// own (default: one per core; see `shards`).
fn scenario_runtime(receive_threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    shards::start(receive_threads.unwrap_or_else(procfs::cores))?;
    runtime(Some(1))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    procfs::raise_nofile_limit();
    let result: anyhow::Result<Option<(report::Report, Option<std::path::PathBuf>)>> =
        match cli.command {
            Command::Chart(args) => chart::run(&args).map(|written| {
                for p in written {
                    println!("wrote {}", p.display());
                }
                None
            }),
            Command::ConnectWorker { spec } => runtime(Some(1))
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(connect::worker(&spec)))
                .map(|()| None),
            Command::Connect(args) => {
                let json = args.target.json.clone();
                scenario_runtime(None)
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(connect::run(args)))
                    .map(|r| Some((r, json)))
            }
            Command::Fanout(args) => {
                let json = args.target.json.clone();
                scenario_runtime(args.threads)
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(fanout::run_fanout(args)))
                    .map(|r| Some((r, json)))
            }
            Command::Step(args) => {
                let json = args.fanout.target.json.clone();
                scenario_runtime(args.fanout.threads)
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(step::run_step(args)))
                    .map(|r| Some((r, json)))
            }
            Command::Ticker(args) if args.print_config => {
                print!("{}", ticker::CONFIG);
                Ok(None)
            }
            Command::Ticker(args) => {
                let json = args.json.clone();
                scenario_runtime(args.threads)
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(ticker::run_ticker(args)))
                    .map(|r| Some((r, json)))
            }
            Command::Churn(args) => {
                let json = args.fanout.target.json.clone();
                scenario_runtime(args.fanout.threads)
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(churn::run_churn(args)))
                    .map(|r| Some((r, json)))
            }
        };
    match result {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some((report, json))) => match report::write(&report, json.as_deref()) {
            Ok(text) => {
                println!("{text}");
                if report.failures.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    for f in &report.failures {
                        eprintln!("pubgate-loadtest: FAILED: {f}");
                    }
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("pubgate-loadtest: writing the result: {e:#}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("pubgate-loadtest: {e:#}");
            ExitCode::from(2)
        }
    }
}
