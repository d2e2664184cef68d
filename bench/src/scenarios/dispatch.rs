//! Dispatch latency: `Queued` to `Running` of each attempt, at half of the maximum one-step
//! rate measured a moment before in the same stack, so that the figure is the path's and not
//! a queue's.

use super::throughput::{completed, ids, post_ms};
use crate::measure::{percentile, write_csv};
use crate::meter::Meter;
use crate::stack::{
    Watcher, stack_with_agents, submit_many, submit_paced, true_process, wait_all_success,
};
use crate::{AGENTS, CLIENTS, Figure, Opts, ScenarioResult};
use anyhow::{Result, ensure};
use std::time::Duration;

/// First the maximum: `dispatch_max_tasks` one-step tasks from 20 clients as fast as they
/// are answered (closed loop). Then `dispatch_secs` of submissions at half that rate on a
/// fixed schedule (open loop), and the `Queued`→`Running` time of each of those attempts.
pub(crate) async fn dispatch(opts: &Opts) -> Result<ScenarioResult> {
    let (max_n, secs) = (opts.counts.dispatch_max_tasks, opts.counts.dispatch_secs);
    let stack = stack_with_agents(AGENTS, &[]).await?;
    let db = stack.db().await;
    let mut watch = Watcher::connect(&stack).await?;
    let meter = Meter::new(&stack, opts).await?;
    let body = true_process("bench-dispatch", 1, None)?;

    // The maximum, in this stack.
    let first = submit_many(&stack, &body, max_n, CLIENTS).await?;
    let limit = opts.limit(Duration::from_millis(max_n as u64 * 100));
    wait_all_success(&mut watch, max_n, limit).await?;
    let max = completed(&db, &ids(&first)).await?.rate;
    ensure!(
        max.is_finite() && max > 0.0,
        "no maximum rate measured: {max}"
    );

    // Half of it, paced.
    let rate = max / 2.0;
    let n = ((rate * secs as f64).round() as usize).max(2);
    let window = meter.start(&stack, &watch).await?;
    let (paced, submit_secs) = submit_paced(&stack, &body, rate, n).await?;
    let limit = opts.limit(Duration::from_millis(n as u64 * 100));
    wait_all_success(&mut watch, max_n + n, limit).await?;
    let label = "one-step tasks paced at half of the maximum";
    let costs = meter
        .finish(&stack, &watch, window, label, n, "step")
        .await?;
    let done = completed(&db, &ids(&paced)).await?;
    let all: Vec<(f64, Option<f64>)> = sqlx::query_as(
        "SELECT extract(epoch FROM a.created_at - min(a.created_at) OVER ())::float8,
                extract(epoch FROM a.started_at - a.queued_at)::float8 * 1000
         FROM attempts a JOIN step_runs s ON s.id = a.step_run_id
         WHERE s.task_id = ANY($1) ORDER BY a.created_at",
    )
    .bind(ids(&paced))
    .fetch_all(&db)
    .await?;
    ensure!(all.len() == n, "{} attempts for {n} steps", all.len());
    // An attempt whose claim overtook the recording of the broker's confirmation never was
    // `Queued` in the table; it has no Queued time to measure from.
    let lat: Vec<(f64, f64)> = all
        .iter()
        .filter_map(|(at, ms)| ms.map(|m| (*at, m)))
        .collect();
    let unqueued = n - lat.len();
    let ms: Vec<f64> = lat.iter().map(|l| l.1).collect();
    let rows: Vec<String> = lat
        .iter()
        .map(|(at, ms)| format!("{at:.4},{ms:.3}"))
        .collect();
    let at = format!("at {rate:.1} steps/s, half of the maximum");
    let mut figures = vec![
        Figure::plain(
            &format!("maximum one-step rate ({max_n} tasks, {CLIENTS} clients, closed loop)"),
            max,
            "steps/s",
        ),
        Figure::plain(
            "paced phase: tasks completed per second",
            done.rate,
            "steps/s",
        ),
        Figure::at_most(
            &format!("Queued→Running p50 {at}"),
            percentile(&ms, 50.0),
            "ms",
            3.0,
        ),
        Figure::at_most(
            &format!("Queued→Running p99 {at}"),
            percentile(&ms, 99.0),
            "ms",
            15.0,
        ),
        Figure::plain(
            "POST /api/tasks p99 in the paced phase",
            percentile(&post_ms(&paced), 99.0),
            "ms",
        ),
    ];
    figures.extend(costs.figures("one-step task at half load", Some(4.0)));
    Ok(ScenarioResult {
        name: "dispatch".into(),
        figures,
        checked: format!(
            "{max_n}/{max_n} tasks Success at full load, then {n}/{n} submitted at {rate:.1}/s over {submit_secs:.1} s, all Success; {unqueued} attempts were claimed before their Queued state was recorded and are left out of the percentiles"
        ),
        samples: Some(write_csv(
            opts,
            "dispatch.csv",
            "created_at_s,queued_to_running_ms",
            &rows,
        )?),
        series: vec![("Queued→Running (ms) vs time (s), half load".into(), lat)],
        notes: vec![
            "Queued is stamped by the dispatcher once the broker confirmed the job; Running is the claim's time, on the dispatcher's clock (PostgreSQL's `now()` in the claim's transaction). The maximum is measured in the same stack just before, so the paced phase stays under what this machine sustains.".into(),
            costs.note(),
        ],
        costs: vec![costs],
        ..Default::default()
    })
}
