//! `gantry-bench all [--quick]`, or one scenario by name.

use clap::Parser;
use gantry_bench::{Opts, SCENARIOS, run, workspace_root};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "gantry-bench",
    about = "Benchmarks Gantry beside raw AMQP, bare spawn and direct COPY, on the local services"
)]
struct Cli {
    /// `all`, or one of: amqp, spawn, copy, throughput, dispatch, sequential, lines, api,
    /// queued-rss, idle-agent.
    scenario: String,
    /// Small counts: every scenario in seconds (the figures mean nothing).
    #[arg(long)]
    quick: bool,
    /// Multiply the full counts (ignored with --quick).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Where `docs/BENCHMARKS.md` and `docs/bench/` go (default: the workspace root).
    #[arg(long)]
    root: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let opts = Opts::new(
        cli.quick,
        cli.scale,
        cli.root.unwrap_or_else(workspace_root),
    );
    let names: Vec<&str> = if cli.scenario == "all" {
        SCENARIOS.to_vec()
    } else if SCENARIOS.contains(&cli.scenario.as_str()) {
        vec![cli.scenario.as_str()]
    } else {
        anyhow::bail!(
            "no scenario {:?}; the scenarios: all, {}",
            cli.scenario,
            SCENARIOS.join(", ")
        );
    };
    let outcomes = run(&names, &opts).await;
    if cli.scenario == "all" {
        gantry_bench::report::write(&outcomes, &opts)?;
        eprintln!(
            "gantry-bench: wrote {}",
            opts.root.join("docs/BENCHMARKS.md").display()
        );
    }
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.result.is_err())
        .map(|o| o.name.as_str())
        .collect();
    if !failed.is_empty() {
        anyhow::bail!("failed scenarios: {}", failed.join(", "));
    }
    Ok(())
}
