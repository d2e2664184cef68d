//! Dispatcher memory with many queued steps and no agent.

use crate::measure::{mib, proc_kib, write_csv};
use crate::stack::{dispatcher_pid, stack_with, submit_many, true_process};
use crate::{CLIENTS, Figure, Opts, ScenarioResult};
use anyhow::{Result, bail};
use std::time::{Duration, Instant};

/// Dispatcher RSS with N queued steps and no agent running: a pool whose only worker's agent
/// was stopped after it registered.
pub(crate) async fn queued_rss(opts: &Opts) -> Result<ScenarioResult> {
    let n = opts.counts.queued_steps;
    // A task cap above the count, so that the dispatcher itself holds every queued task (with
    // the default cap of 1,000 the rest would wait, unowned, for room).
    let cap = (n + 1000).to_string();
    let mut stack = stack_with(1, &["parked"], &[("GANTRY__DISPATCHER__TASK_CAP", &cap)]).await?;
    stack.kill_agent(0).await;
    let pid = dispatcher_pid(&stack)?;
    let db = stack.db().await;
    let body = true_process("bench-parked", 1, Some("parked"))?;
    let before = proc_kib(pid, "VmRSS")?;
    let mut curve = vec![(0.0, mib(before))];
    let chunk = (n / 20).max(1);
    let mut done = 0;
    while done < n {
        let k = chunk.min(n - done);
        submit_many(&stack, &body, k, CLIENTS).await?;
        done += k;
        curve.push((done as f64, mib(proc_kib(pid, "VmRSS")?)));
    }
    // Every step must be queued (published) or waiting (unpublished, no healthy worker).
    let deadline = Instant::now() + opts.limit(Duration::from_millis(n as u64 * 10));
    let states = loop {
        let states: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM step_runs GROUP BY state ORDER BY state")
                .fetch_all(&db)
                .await?;
        let parked: i64 = states
            .iter()
            .filter(|s| matches!(s.0.as_str(), "Queued" | "Waiting"))
            .map(|s| s.1)
            .sum();
        if parked as usize == n {
            break states;
        }
        if Instant::now() > deadline {
            bail!("LOST WORK: {parked}/{n} steps queued or waiting; states: {states:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = proc_kib(pid, "VmRSS")?;
    let hwm = proc_kib(pid, "VmHWM")?;
    curve.push((n as f64, mib(rss)));
    let rows: Vec<String> = curve.iter().map(|(k, m)| format!("{k},{m:.2}")).collect();
    Ok(ScenarioResult {
        name: "queued-rss".into(),
        figures: vec![
            Figure::at_most(
                &format!("dispatcher RSS with {n} queued steps, no agent"),
                mib(rss),
                "MiB",
                150.0,
            ),
            Figure::plain("dispatcher peak RSS (VmHWM) meanwhile", mib(hwm), "MiB"),
            Figure::plain("dispatcher RSS before", mib(before), "MiB"),
        ],
        checked: format!("{n}/{n} steps queued or waiting: {states:?}"),
        samples: Some(write_csv(opts, "queued-rss.csv", "queued_steps,rss_mib", &rows)?),
        series: vec![("dispatcher RSS (MiB) vs queued steps".into(), curve)],
        notes: vec![
            "The pool's only worker registered and was then stopped (SIGKILL): steps submitted before the dispatcher notices are published and sit in RabbitMQ; those after wait unpublished (`Waiting`, no healthy worker). Both count as queued here.".into(),
        ],
        ..Default::default()
    })
}
