//! One-step `true` tasks at full load: steps per second against bare spawn.

use crate::measure::*;
use crate::stack::*;
use crate::{AGENTS, CLIENTS, Figure, Opts, ScenarioResult};
use anyhow::Result;
use std::time::Duration;

/// One-step `true` tasks: steps completed per second, first submit to last `Success`.
pub(crate) async fn throughput(opts: &Opts, spawn_rate: f64) -> Result<ScenarioResult> {
    let n = opts.counts.throughput_tasks;
    let stack = stack_with_agents(AGENTS, &[]).await?;
    let db = stack.db().await;
    let body = true_process("bench-true", 1, None)?;
    let usage = Usage::sample(&stack, &db).await?;
    let submitted = submit_many(&stack, &body, n, CLIENTS).await?;
    wait_all_success(&db, n, opts.limit(Duration::from_millis(n as u64 * 100))).await?;
    let profile = usage.note(&Usage::sample(&stack, &db).await?, n, "step");
    let secs: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(finished_at) - min(created_at))::float8 FROM tasks",
    )
    .fetch_one(&db)
    .await?;
    let per_task: Vec<(f64, f64)> = sqlx::query_as(
        "SELECT extract(epoch FROM created_at - (SELECT min(created_at) FROM tasks))::float8,
                extract(epoch FROM finished_at - created_at)::float8 * 1000
         FROM tasks ORDER BY created_at",
    )
    .fetch_all(&db)
    .await?;
    let rows: Vec<String> = per_task
        .iter()
        .map(|(at, ms)| format!("{at:.4},{ms:.3}"))
        .collect();
    let rate = n as f64 / secs;
    let post: Vec<f64> = submitted
        .iter()
        .map(|s| s.1.as_secs_f64() * 1000.0)
        .collect();
    Ok(ScenarioResult {
        name: "throughput".into(),
        figures: vec![
            Figure::share_of(
                "one-step true tasks completed per second",
                rate,
                "steps/s",
                ("bare spawn", spawn_rate),
                0.5,
            ),
            Figure::plain(
                "submit to Success p50 (under full load)",
                percentile(&per_task.iter().map(|p| p.1).collect::<Vec<_>>(), 50.0),
                "ms",
            ),
            Figure::plain(
                "POST /api/tasks p99 during the run",
                percentile(&post, 99.0),
                "ms",
            ),
        ],
        checked: format!("{n}/{n} tasks Success"),
        samples: Some(write_csv(
            opts,
            "throughput.csv",
            "submitted_at_s,submit_to_success_ms",
            &rows,
        )?),
        notes: vec![profile],
        ..Default::default()
    })
}
