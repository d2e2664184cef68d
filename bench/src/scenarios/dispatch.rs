//! Dispatch latency: `Queued` to `Running` of each attempt.

use crate::measure::*;
use crate::stack::*;
use crate::{AGENTS, Figure, Opts, ScenarioResult};
use anyhow::{Result, ensure};
use futures::StreamExt;
use std::time::Duration;

/// Dispatch latency at a steady rate: `Queued` to `Running` of each attempt.
pub(crate) async fn dispatch(opts: &Opts) -> Result<ScenarioResult> {
    let (rate, secs) = (opts.counts.dispatch_rate, opts.counts.dispatch_secs);
    let n = (rate * secs) as usize;
    let stack = stack_with_agents(AGENTS, &[]).await?;
    let db = stack.db().await;
    let body = true_process("bench-dispatch", 1, None)?;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut sent = 0;
    while sent < n {
        tokio::select! {
            _ = ticker.tick() => {
                in_flight.push(post_task(&stack, &body));
                sent += 1;
            }
            Some(r) = in_flight.next() => { r?; }
        }
    }
    while let Some(r) = in_flight.next().await {
        r?;
    }
    wait_all_success(&db, n, opts.limit(Duration::from_millis(n as u64 * 100))).await?;
    let all: Vec<(f64, Option<f64>)> = sqlx::query_as(
        "SELECT extract(epoch FROM a.created_at - (SELECT min(created_at) FROM attempts))::float8,
                extract(epoch FROM a.started_at - a.queued_at)::float8 * 1000
         FROM attempts a ORDER BY a.created_at",
    )
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
    Ok(ScenarioResult {
        name: "dispatch".into(),
        figures: vec![
            Figure::at_most(
                &format!("Queued→Running p50 at {rate} steps/s"),
                percentile(&ms, 50.0),
                "ms",
                3.0,
            ),
            Figure::at_most(
                &format!("Queued→Running p99 at {rate} steps/s"),
                percentile(&ms, 99.0),
                "ms",
                15.0,
            ),
        ],
        checked: format!(
            "{n}/{n} tasks Success, submitted at {rate}/s for {secs} s; {unqueued} attempts were claimed before their Queued state was recorded and are left out of the percentiles"
        ),
        samples: Some(write_csv(
            opts,
            "dispatch.csv",
            "created_at_s,queued_to_running_ms",
            &rows,
        )?),
        series: vec![("Queued→Running (ms) vs time (s)".into(), lat)],
        notes: vec![
            "Queued is stamped by the dispatcher once the broker confirmed the job; Running is the agent's `StepStarted` time, on the agent's clock (the same machine here).".into(),
        ],
        ..Default::default()
    })
}
