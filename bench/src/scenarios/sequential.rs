//! Sequential steps in one task: the gap between one step's end and the next's start.

use crate::measure::{percentile, write_csv};
use crate::meter::Meter;
use crate::stack::{Watcher, post_task, stack_with_agents, true_process, wait_all_success};
use crate::{AGENTS, Figure, Opts, ScenarioResult};
use anyhow::{Result, ensure};
use std::time::Duration;

/// 50 sequential steps in one task: the gap between one step's end and the next's start.
pub(crate) async fn sequential(opts: &Opts) -> Result<ScenarioResult> {
    let steps = opts.counts.sequential_steps;
    let stack = stack_with_agents(AGENTS, &[]).await?;
    let db = stack.db().await;
    let mut watch = Watcher::connect(&stack).await?;
    let meter = Meter::new(&stack, opts).await?;
    let body = true_process("bench-sequential", steps, None)?;
    let window = meter.start(&stack, &watch).await?;
    post_task(&stack, &body).await?;
    let limit = opts.limit(Duration::from_secs(steps as u64));
    wait_all_success(&mut watch, 1, limit).await?;
    let label = "steps of one sequential task";
    let costs = meter
        .finish(&stack, &watch, window, label, steps, "step")
        .await?;
    type At = chrono::DateTime<chrono::Utc>;
    // started_at is the claim's transaction start, created_at the advance's and queued_at
    // the confirm's (PostgreSQL's and the dispatcher's clocks); finished_at is the agent's
    // clock when it reports the end, after the step's directory is gone (same machine).
    let times: Vec<(At, At, At, Option<At>)> = sqlx::query_as(
        "SELECT a.started_at, a.finished_at, a.created_at, a.queued_at FROM step_runs s
         JOIN attempts a ON a.step_run_id = s.id AND a.attempt = s.attempt
         WHERE s.state = 'Success' ORDER BY s.idx",
    )
    .fetch_all(&db)
    .await?;
    ensure!(
        times.len() == steps,
        "LOST WORK: {}/{steps} steps Success",
        times.len()
    );
    let ms = |d: chrono::TimeDelta| d.num_microseconds().unwrap_or(0) as f64 / 1000.0;
    let gaps: Vec<f64> = times.windows(2).map(|w| ms(w[1].0 - w[0].1)).collect();
    // Where the gap goes: the previous step's end to the next attempt's creation (the
    // StepFinished event, its transaction, the wake-up, the advance's start), creation to
    // the broker's confirm (the advance, the publish), and the confirm to the claim
    // (the delivery, the claim's transaction). A claim can beat the Queued mark; those gaps
    // are left out of the last two parts.
    let to_created: Vec<f64> = times.windows(2).map(|w| ms(w[1].2 - w[0].1)).collect();
    let (mut to_queued, mut to_started) = (Vec::new(), Vec::new());
    for w in times.windows(2) {
        if let Some(q) = w[1].3.filter(|q| *q <= w[1].0) {
            to_queued.push(ms(q - w[1].2));
            to_started.push(ms(w[1].0 - q));
        }
    }
    let rows: Vec<String> = gaps
        .iter()
        .enumerate()
        .map(|(i, g)| format!("{},{g:.3}", i + 1))
        .collect();
    Ok(ScenarioResult {
        name: "sequential".into(),
        figures: vec![
            Figure::at_most(
                "gap between sequential steps p50",
                percentile(&gaps, 50.0),
                "ms",
                5.0,
            ),
            Figure::plain(
                "gap between sequential steps max",
                percentile(&gaps, 100.0),
                "ms",
            ),
            Figure::plain(
                "of which: step end to next attempt created (result, conclusion, wake-up), p50",
                percentile(&to_created, 50.0),
                "ms",
            ),
            Figure::plain(
                "of which: attempt created to Queued (advance, publish, confirm), p50",
                percentile(&to_queued, 50.0),
                "ms",
            ),
            Figure::plain(
                "of which: Queued to the claim (delivery, the claim's transaction), p50",
                percentile(&to_started, 50.0),
                "ms",
            ),
        ],
        checked: format!("{steps}/{steps} steps Success, in order"),
        samples: Some(write_csv(opts, "sequential.csv", "step,gap_ms", &rows)?),
        notes: vec![costs.note()],
        costs: vec![costs],
        ..Default::default()
    })
}
