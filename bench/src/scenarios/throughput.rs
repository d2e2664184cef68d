//! One-step `true` tasks at full load: steps per second against bare spawn, and what each
//! step cost the database and every process.

use crate::measure::{percentile, write_csv};
use crate::meter::Meter;
use crate::stack::{Watcher, stack_with_agents, submit_many, true_process, wait_all_success};
use crate::{AGENTS, CLIENTS, Figure, Opts, ScenarioResult};
use anyhow::Result;
use sqlx::PgPool;
use std::time::Duration;

/// How a set of tasks went, from the stack's database.
pub(crate) struct Completed {
    /// Tasks per second, from the first one's creation to the last one's end.
    pub rate: f64,
    /// (created, seconds after the first; submit to `Success`, ms), in order of creation.
    pub per_task: Vec<(f64, f64)>,
}

pub(crate) async fn completed(db: &PgPool, ids: &[uuid::Uuid]) -> Result<Completed> {
    let secs: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(finished_at) - min(created_at))::float8
         FROM tasks WHERE id = ANY($1)",
    )
    .bind(ids)
    .fetch_one(db)
    .await?;
    let per_task: Vec<(f64, f64)> = sqlx::query_as(
        "SELECT extract(epoch FROM created_at - min(created_at) OVER ())::float8,
                extract(epoch FROM finished_at - created_at)::float8 * 1000
         FROM tasks WHERE id = ANY($1) ORDER BY created_at",
    )
    .bind(ids)
    .fetch_all(db)
    .await?;
    Ok(Completed {
        rate: ids.len() as f64 / secs,
        per_task,
    })
}

/// Milliseconds of each POST.
pub(crate) fn post_ms(submitted: &[(uuid::Uuid, Duration)]) -> Vec<f64> {
    submitted
        .iter()
        .map(|s| s.1.as_secs_f64() * 1000.0)
        .collect()
}

pub(crate) fn ids(submitted: &[(uuid::Uuid, Duration)]) -> Vec<uuid::Uuid> {
    submitted.iter().map(|s| s.0).collect()
}

/// One-step `true` tasks: steps completed per second, first submit to last `Success`.
pub(crate) async fn throughput(opts: &Opts, spawn_rate: f64) -> Result<ScenarioResult> {
    let n = opts.counts.throughput_tasks;
    let stack = stack_with_agents(AGENTS, &[]).await?;
    let db = stack.db().await;
    let mut watch = Watcher::connect(&stack).await?;
    let meter = Meter::new(&stack, opts).await?;
    let body = true_process("bench-true", 1, None)?;
    let window = meter.start(&stack, &watch).await?;
    let submitted = submit_many(&stack, &body, n, CLIENTS).await?;
    let limit = opts.limit(Duration::from_millis(n as u64 * 100));
    wait_all_success(&mut watch, n, limit).await?;
    let label = "one-step tasks at full load";
    let costs = meter
        .finish(&stack, &watch, window, label, n, "step")
        .await?;
    let done = completed(&db, &ids(&submitted)).await?;
    let rows: Vec<String> = done
        .per_task
        .iter()
        .map(|(at, ms)| format!("{at:.4},{ms:.3}"))
        .collect();
    let mut figures = vec![
        Figure::share_of(
            "one-step true tasks completed per second",
            done.rate,
            "steps/s",
            ("bare spawn", spawn_rate),
            0.5,
        ),
        Figure::plain(
            "submit to Success p50 (under full load)",
            percentile(&done.per_task.iter().map(|p| p.1).collect::<Vec<_>>(), 50.0),
            "ms",
        ),
        Figure::plain(
            "POST /api/tasks p99 during the run",
            percentile(&post_ms(&submitted), 99.0),
            "ms",
        ),
    ];
    figures.extend(costs.figures("one-step task at full load", Some(4.0)));
    Ok(ScenarioResult {
        name: "throughput".into(),
        figures,
        checked: format!("{n}/{n} tasks Success"),
        samples: Some(write_csv(
            opts,
            "throughput.csv",
            "submitted_at_s,submit_to_success_ms",
            &rows,
        )?),
        notes: vec![costs.note()],
        costs: vec![costs],
        ..Default::default()
    })
}
