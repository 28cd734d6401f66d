//! `chaos`: the chaos run of issue 14 (see `newsroom_tests::chaos`). Needs the local
//! infrastructure (`infra/local.sh up`) and the `newsroom` binary built beside this one;
//! starts the three-node Kafka cluster itself.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use newsroom_tests::chaos::{self, Options};

/// Runs every newsroom role as its own process against a three-node Kafka cluster, drives
/// a mixed workload, injects faults at random (kill -9, SIGSTOP, broker kill, PostgreSQL,
/// Redis and SMTP restarts), then checks that nothing acknowledged was lost or doubled and
/// that every read model equals a fresh build. Prints a JSON report; exits 1 if the
/// checker found anything.
#[derive(Parser)]
#[command(name = "chaos")]
struct Args {
    /// Seconds of workload and faults.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Mean seconds between faults (per lane).
    #[arg(long, default_value_t = 8.0)]
    fault_every: f64,
    /// Faults that may be under way at once.
    #[arg(long, default_value_t = 2)]
    overlap: usize,
    /// The short pass CI runs: 90 s, 4 clients, a fault every 6 s, one at a time.
    #[arg(long)]
    quick: bool,
    /// Where to write the report (JSON).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The fault kinds to inject, comma-separated (every kind by default).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(chaos::KINDS))]
    faults: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let options = if args.quick {
        Options {
            duration: Duration::from_secs(90),
            clients: 4,
            fault_every: Duration::from_secs(6),
            overlap: 1,
            out: args.out,
            kinds: args.faults,
        }
    } else {
        Options {
            duration: Duration::from_secs(args.seconds),
            clients: args.clients.max(1),
            fault_every: Duration::from_secs_f64(args.fault_every.max(0.5)),
            overlap: args.overlap.max(1),
            out: args.out,
            kinds: args.faults,
        }
    };
    let report = chaos::run(options).await?;
    eprintln!(
        "[chaos] {} commands ({} acknowledged), {} faults: lost {}, doubled {}, read-model differences {}",
        report.commands,
        report.acknowledged,
        report.faults.values().sum::<u64>(),
        report.lost,
        report.doubled,
        report.read_model_differences.values().sum::<u64>()
    );
    if !report.clean() {
        std::process::exit(1);
    }
    Ok(())
}
