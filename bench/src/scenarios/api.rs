//! `POST /api/tasks` latency from concurrent clients.

use crate::measure::*;
use crate::stack::*;
use crate::{AGENTS, CLIENTS, Figure, Opts, ScenarioResult};
use anyhow::Result;
use std::time::Duration;

/// API `POST /api/tasks` latency from 20 concurrent clients.
pub(crate) async fn api(opts: &Opts) -> Result<ScenarioResult> {
    let (n, steps) = (opts.counts.api_tasks, opts.counts.api_steps);
    let stack = stack_with_agents(AGENTS, &[]).await?;
    let db = stack.db().await;
    let body = true_process("bench-api", steps, None)?;
    let usage = Usage::sample(&stack, &db).await?;
    let samples = submit_many(&stack, &body, n, CLIENTS).await?;
    let profile = format!(
        "While the {n} POSTs were answered: {}",
        usage.note(&Usage::sample(&stack, &db).await?, n, "POST")
    );
    wait_all_success(
        &db,
        n,
        opts.limit(Duration::from_millis((n * steps) as u64 * 200)),
    )
    .await?;
    let ms: Vec<f64> = samples.iter().map(|s| s.1.as_secs_f64() * 1000.0).collect();
    let rows: Vec<String> = samples
        .iter()
        .map(|(k, d)| format!("{k},{:.3}", d.as_secs_f64() * 1000.0))
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
            samples
                .iter()
                .map(|(k, d)| (*k as f64, d.as_secs_f64() * 1000.0))
                .collect(),
        )],
        notes: vec![profile],
        ..Default::default()
    })
}
