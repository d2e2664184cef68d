//! `POST /api/tasks` latency from concurrent clients.

use super::throughput::post_ms;
use crate::measure::{percentile, write_csv};
use crate::meter::Meter;
use crate::stack::{Watcher, stack_with_agents, submit_many, true_process, wait_all_success};
use crate::{AGENTS, CLIENTS, Figure, Opts, ScenarioResult};
use anyhow::Result;
use std::time::Duration;

/// API `POST /api/tasks` latency from 20 concurrent clients; the CPU while they were
/// answered, and what each task cost until all of them ran.
pub(crate) async fn api(opts: &Opts) -> Result<ScenarioResult> {
    let (n, steps) = (opts.counts.api_tasks, opts.counts.api_steps);
    let stack = stack_with_agents(AGENTS, &[]).await?;
    let mut watch = Watcher::connect(&stack).await?;
    let meter = Meter::new(&stack, opts).await?;
    let body = true_process("bench-api", steps, None)?;
    let window = meter.start(&stack, &watch).await?;
    let before = meter.cpu_mark(&stack, &watch).await?;
    let samples = submit_many(&stack, &body, n, CLIENTS).await?;
    let posts = format!(
        "While the {n} POSTs were answered: {}",
        before.note(&meter.cpu_mark(&stack, &watch).await?, n, "POST")
    );
    let limit = opts.limit(Duration::from_millis((n * steps) as u64 * 200));
    wait_all_success(&mut watch, n, limit).await?;
    let label = format!("tasks of {steps} steps from {CLIENTS} clients, submitted and run");
    let costs = meter
        .finish(&stack, &watch, window, &label, n, "task")
        .await?;
    let ms = post_ms(&samples);
    let rows: Vec<String> = ms
        .iter()
        .enumerate()
        .map(|(i, ms)| format!("{},{ms:.3}", i + 1))
        .collect();
    Ok(ScenarioResult {
        name: "api".into(),
        figures: vec![
            Figure::plain("POST /api/tasks p50", percentile(&ms, 50.0), "ms"),
            Figure::at_most(
                &format!("POST /api/tasks p99 ({n} tasks × {steps} steps, {CLIENTS} clients)"),
                percentile(&ms, 99.0),
                "ms",
                20.0,
            ),
        ],
        checked: format!("{n}/{n} tasks of {steps} steps Success"),
        samples: Some(write_csv(opts, "api.csv", "accepted,latency_ms", &rows)?),
        series: vec![(
            "POST /api/tasks latency (ms) vs tasks accepted".into(),
            ms.iter()
                .enumerate()
                .map(|(i, ms)| ((i + 1) as f64, *ms))
                .collect(),
        )],
        notes: vec![posts, costs.note()],
        costs: vec![costs],
        ..Default::default()
    })
}
