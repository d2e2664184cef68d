//! # gantry-bench: Gantry beside the limits beneath it, measured in the same run
//!
//! Every scenario starts its own stack through the end-to-end harness (`gantry-tests`): a
//! dispatcher process and real agent processes in a fresh namespace and database against the
//! local services. Dropping the stack kills the processes and removes the database, queues
//! and Redis keys, and every scenario runs under a time limit, so a stuck scenario is dropped
//! (and cleaned up) rather than left running.
//!
//! References are measured in the same run: raw AMQP round trips through a quorum queue,
//! the bare spawn rate of `bash -c true`, sqlx `COPY` into the `log_lines` layout, and the
//! durable skeleton of a step without Gantry's code (`floor`).
//! Every scenario checks that nothing was lost (every task `Success`, every line present once
//! and in order) and fails otherwise: a figure from a run that lost work is not a figure.
//!
//! Layout: this file holds the counts, the options and the runner; `figures` what a scenario
//! returns; `stack` the stack and the requests every scenario makes; `measure` the `/proc`
//! readings; `references` the three raw references; `floor` the durable skeleton; `raw` the raw clients both are made of; `scenarios/` one file per scenario;
//! `report` and `plot` the generated document.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub mod costs;
mod cpu;
mod figures;
mod floor;
pub mod measure;
pub mod meter;
pub mod plot;
mod raw;
mod references;
pub mod report;
mod scenarios;
mod stack;

pub use figures::{Figure, Outcome, References, ScenarioResult};
pub use measure::{percentile, proc_kib, rollup_kib};
use references::{amqp, copy, spawn};
use scenarios::*;

/// Every scenario, references first, in the order `all` runs them.
pub const SCENARIOS: &[&str] = &[
    "amqp",
    "spawn",
    "copy",
    "floor",
    "throughput",
    "dispatch",
    "sequential",
    "lines",
    "api",
    "queued-rss",
    "idle-agent",
];

/// Slots per agent and agents per stack, as the issue sets them.
pub const SLOTS: u32 = 4;
pub const AGENTS: usize = 2;
/// Concurrent API clients.
pub const CLIENTS: usize = 20;

/// How big each scenario is.
#[derive(Clone, Debug)]
pub struct Counts {
    pub amqp_round_trips: usize,
    pub spawns: usize,
    pub throughput_tasks: usize,
    /// Tasks of the dispatch scenario's first phase, which measures the maximum rate.
    pub dispatch_max_tasks: usize,
    /// How long the dispatch scenario submits at half that rate.
    pub dispatch_secs: u32,
    pub sequential_steps: usize,
    /// Closed-loop steps of the floor (the durable skeleton), and its lone commits.
    pub floor_steps: usize,
    pub floor_commits: usize,
    /// Submissions of `api_steps`-step tasks in the floor, from `CLIENTS` clients.
    pub floor_posts: usize,
    pub lines: usize,
    pub api_tasks: usize,
    pub api_steps: usize,
    pub queued_steps: usize,
    /// Idle agents started at once beside the first one's measurement.
    pub idle_agents: usize,
}

impl Counts {
    /// The counts, multiplied by `scale` (1.0 for a full run).
    pub fn full(scale: f64) -> Self {
        let s = |n: usize| ((n as f64 * scale).round() as usize).max(1);
        Self {
            amqp_round_trips: s(5_000),
            spawns: s(4_000),
            throughput_tasks: s(20_000),
            dispatch_max_tasks: s(4_000),
            dispatch_secs: (60.0 * scale).round().max(2.0) as u32,
            sequential_steps: 50,
            floor_steps: s(4_000),
            floor_commits: 500,
            floor_posts: 1_000,
            lines: s(1_000_000),
            api_tasks: 100,
            api_steps: 10,
            queued_steps: s(10_000),
            idle_agents: s(200),
        }
    }

    /// Small counts: every scenario in a few seconds, for the smoke test.
    pub fn quick() -> Self {
        Self {
            amqp_round_trips: 50,
            spawns: 40,
            throughput_tasks: 24,
            dispatch_max_tasks: 24,
            dispatch_secs: 1,
            sequential_steps: 5,
            floor_steps: 40,
            floor_commits: 20,
            floor_posts: 20,
            lines: 5_000,
            api_tasks: 10,
            api_steps: 2,
            queued_steps: 40,
            idle_agents: 3,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Opts {
    pub quick: bool,
    /// The multiplier of the full counts.
    pub scale: f64,
    pub counts: Counts,
    /// Where `docs/BENCHMARKS.md` and `docs/bench/` are written (the workspace root).
    pub root: PathBuf,
}

impl Opts {
    pub fn new(quick: bool, scale: f64, root: PathBuf) -> Self {
        Self {
            quick,
            scale,
            counts: if quick {
                Counts::quick()
            } else {
                Counts::full(scale)
            },
            root,
        }
    }

    pub fn samples_dir(&self) -> PathBuf {
        self.root.join("docs").join("bench")
    }

    /// How long PostgreSQL may take to publish a backend's counters: an idle backend's wait
    /// up to 10 s. The quick mode waits less and may miss a few transactions.
    pub fn settle(&self) -> Duration {
        Duration::from_secs(if self.quick { 2 } else { 11 })
    }

    /// A scenario's time limit: generous, but finite (a measured window's settles included).
    fn limit(&self, work: Duration) -> Duration {
        Duration::from_secs(if self.quick { 60 } else { 120 }) + self.settle() * 4 + work
    }
}

/// The workspace root, where `docs/` lives.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Run the scenarios named, in order, each bounded in time and cleaned up after. A scenario
/// that needs a reference not yet measured measures it first.
pub async fn run(names: &[&str], opts: &Opts) -> Vec<Outcome> {
    std::fs::create_dir_all(opts.samples_dir()).ok();
    let mut refs = References::default();
    let mut out = Vec::new();
    // The harness builds missing or stale binaries on first use; do that before any
    // scenario's clock starts, so a build (which may wait for cargo's lock) is never timed.
    let _ = tokio::task::spawn_blocking(|| gantry_tests::bin("gantry-dispatcher")).await;
    for name in names {
        eprintln!("gantry-bench: {name} ...");
        let started = Instant::now();
        let result = run_one(name, opts, &mut refs).await;
        let result = match result {
            Ok(mut r) => {
                r.elapsed = started.elapsed();
                eprintln!("gantry-bench: {name} done in {:.1?}", r.elapsed);
                eprintln!("    checked: {}", r.checked);
                for f in &r.figures {
                    eprintln!("    {}", report::figure_line(f));
                }
                for c in &r.costs {
                    eprintln!("    {}", report::costs_line(c));
                }
                Ok(r)
            }
            Err(e) => {
                eprintln!("gantry-bench: {name} FAILED: {e:#}");
                Err(format!("{e:#}"))
            }
        };
        out.push(Outcome {
            name: name.to_string(),
            result,
        });
    }
    out
}

async fn run_one(name: &str, opts: &Opts, refs: &mut References) -> Result<ScenarioResult> {
    let c = &opts.counts;
    // Each scenario's time limit grows with its work; the stack is dropped (and cleaned up)
    // when the limit strikes.
    let (limit, fut): (Duration, std::pin::Pin<Box<dyn Future<Output = _> + '_>>) = match name {
        "amqp" => (
            opts.limit(Duration::from_millis(c.amqp_round_trips as u64 * 20)),
            Box::pin(amqp(opts)),
        ),
        "spawn" => (
            opts.limit(Duration::from_millis(c.spawns as u64 * 20)),
            Box::pin(spawn(opts)),
        ),
        "copy" => (
            opts.limit(Duration::from_micros(c.lines as u64 * 100)),
            Box::pin(copy(opts)),
        ),
        "floor" => (
            opts.limit(Duration::from_millis(c.floor_steps as u64 * 50)),
            Box::pin(floor::floor(opts)),
        ),
        "throughput" => {
            let spawn_rate = match refs.spawn_per_sec {
                Some(r) => r,
                None => reference_value(&spawn(opts).await?)?,
            };
            refs.spawn_per_sec = Some(spawn_rate);
            (
                opts.limit(Duration::from_millis(c.throughput_tasks as u64 * 100)),
                Box::pin(throughput(opts, spawn_rate)),
            )
        }
        "dispatch" => (
            opts.limit(
                Duration::from_millis(c.dispatch_max_tasks as u64 * 100)
                    + Duration::from_secs(c.dispatch_secs as u64 * 4),
            ),
            Box::pin(dispatch(opts)),
        ),
        "sequential" => (
            opts.limit(Duration::from_secs(c.sequential_steps as u64)),
            Box::pin(sequential(opts)),
        ),
        "lines" => {
            let copy_rate = match refs.copy_lines_per_sec {
                Some(r) => r,
                None => reference_value(&copy(opts).await?)?,
            };
            refs.copy_lines_per_sec = Some(copy_rate);
            (
                opts.limit(Duration::from_millis(c.lines as u64)),
                Box::pin(lines(opts, copy_rate)),
            )
        }
        "api" => (
            opts.limit(Duration::from_millis(
                (c.api_tasks * c.api_steps) as u64 * 200,
            )),
            Box::pin(api(opts)),
        ),
        "queued-rss" => (
            opts.limit(Duration::from_millis(c.queued_steps as u64 * 50)),
            Box::pin(queued_rss(opts)),
        ),
        "idle-agent" => (
            opts.limit(Duration::from_millis(c.idle_agents as u64 * 500)),
            Box::pin(idle_agent(opts)),
        ),
        other => bail!(
            "no scenario {other:?}; the scenarios: {}",
            SCENARIOS.join(", ")
        ),
    };
    // The scenario's own waits use `limit` and say what they waited for; this is the
    // backstop for anything else that could hang.
    let limit = limit + Duration::from_secs(30);
    let r = tokio::time::timeout(limit, fut).await.map_err(|_| {
        anyhow::anyhow!("{name}: not done within {limit:?} (stopped and cleaned up)")
    })??;
    match name {
        "spawn" => refs.spawn_per_sec = Some(reference_value(&r)?),
        "copy" => refs.copy_lines_per_sec = Some(reference_value(&r)?),
        _ => {}
    }
    Ok(r)
}

fn reference_value(r: &ScenarioResult) -> Result<f64> {
    r.figures
        .first()
        .map(|f| f.value)
        .context("a reference without a figure")
}
