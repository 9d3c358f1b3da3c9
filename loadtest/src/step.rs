//! `step`: raise the delivery rate step by step, on the same subscribers, until loss appears, p99
//! passes a limit or the delivered rate falls short.

use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cli;
use crate::fanout::{FanoutArgs, Setup, params, print_phase};
use crate::report::{self, MachineWatch, Report};
use crate::stats::r3;

/// Extra flags of `step`.
#[derive(Args, Debug, Clone, Serialize, Deserialize)]
pub struct StepArgs {
    #[command(flatten)]
    pub fanout: FanoutArgs,
    /// First step's delivery rate (deliveries per second).
    #[arg(long, default_value_t = 10_000.0, value_name = "PER_SEC")]
    pub start: f64,
    /// Each step multiplies the rate by this.
    #[arg(long, default_value_t = 1.25, value_name = "X")]
    pub factor: f64,
    /// Highest delivery rate to try.
    #[arg(long, default_value_t = 400_000.0, value_name = "PER_SEC")]
    pub max: f64,
    /// A step fails when p99 end-to-end latency exceeds this.
    #[arg(long, default_value_t = 50.0, value_name = "MS")]
    pub p99_limit_ms: f64,
    /// A step fails when more than this share of deliveries is lost, %.
    #[arg(long, default_value_t = 0.0, value_name = "PCT")]
    pub max_loss_pct: f64,
    /// A step fails when the achieved delivery rate is below this share of the offered one, %.
    #[arg(long, default_value_t = 95.0, value_name = "PCT")]
    pub min_achieved_pct: f64,
}

/// Runs `step`.
pub async fn run_step(args: StepArgs) -> anyhow::Result<Report> {
    let f = &args.fanout;
    let duration = cli::check_secs("duration", f.duration, 3_600.0)?;
    let warmup = cli::check_secs("warmup", f.warmup, 3_600.0)?;
    anyhow::ensure!(args.factor > 1.0, "--factor must be above 1");
    anyhow::ensure!(
        args.start > 0.0 && args.max >= args.start,
        "need 0 < --start <= --max"
    );
    let machine = MachineWatch::start();
    let started_unix = report::unix_now();
    let setup = Setup::start(f, 0).await?;
    let per = setup.subs_per_topic();
    if !warmup.is_zero() {
        setup.phase(args.start / per, warmup, "warmup").await?;
    }
    let mut steps = Vec::new();
    let mut best: Option<f64> = None;
    let mut failed_because = None;
    let mut rate = args.start;
    // Bounded: the rate grows geometrically up to --max.
    for _ in 0..200 {
        if rate > args.max * 1.000_001 {
            break;
        }
        let p = setup
            .phase(rate / per, duration, &format!("{rate:.0}/s"))
            .await?;
        print_phase("step", &p);
        let mut why = Vec::new();
        if p.loss_pct > args.max_loss_pct {
            why.push(format!("loss {}%", p.loss_pct));
        }
        if p.latency.p99_us > args.p99_limit_ms * 1000.0 {
            why.push(format!("p99 {}µs", p.latency.p99_us));
        }
        let published = p.publish.achieved_rate / p.offered_publish_rate.max(1e-9) * 100.0;
        if published < args.min_achieved_pct {
            why.push(format!(
                "publishers reached only {:.0} of {:.0} publishes/s (the tool, not the server, is the limit: add --publishers)",
                p.publish.achieved_rate, p.offered_publish_rate
            ));
        }
        let achieved = p.deliveries_per_s / p.offered_delivery_rate.max(1e-9) * 100.0;
        if achieved < args.min_achieved_pct {
            why.push(format!("achieved only {achieved:.1}% of the offered rate"));
        }
        if p.subscribers_alive < setup.open.established {
            why.push(format!(
                "{} subscribers disconnected",
                setup.open.established - p.subscribers_alive
            ));
        }
        let pass = why.is_empty();
        steps.push(json!({"rate": r3(rate), "pass": pass, "why": why, "phase": p}));
        if !pass {
            failed_because = Some(why);
            break;
        }
        best = Some(p.deliveries_per_s);
        rate *= args.factor;
    }
    let params = json!({
        "fanout": params(f, &setup, args.start / per),
        "start": args.start, "factor": args.factor, "max": args.max,
        "p99_limit_ms": args.p99_limit_ms, "max_loss_pct": args.max_loss_pct,
        "min_achieved_pct": args.min_achieved_pct,
    });
    let open = setup.open.clone();
    let tail = setup.finish().await;
    Ok(Report::new(
        "step",
        started_unix,
        &machine,
        params,
        json!({
            "subscribers_established": open.established,
            "highest_sustained_deliveries_per_s": best,
            "stopped_because": failed_because,
            "steps": steps,
            "end": tail,
        }),
    ))
}
