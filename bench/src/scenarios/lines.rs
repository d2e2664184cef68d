//! Log lines: persisted per second against direct `COPY`, and peak RSS meanwhile.

use crate::measure::{mib, proc_kib};
use crate::meter::Meter;
use crate::stack::{Watcher, dispatcher_pid, post_task, stack_with_agents, wait_all_success};
use crate::{AGENTS, Figure, Opts, ScenarioResult};
use anyhow::{Context, Result, ensure};
use std::time::Duration;

/// One step printing N lines of 80 bytes: lines persisted per second, all present, in order,
/// once; and the peak RSS of the dispatcher and agents meanwhile.
pub(crate) async fn lines(opts: &Opts, copy_rate: f64) -> Result<ScenarioResult> {
    let n = opts.counts.lines;
    let stack = stack_with_agents(AGENTS, &[]).await?;
    let db = stack.db().await;
    // 8 digits, a space, 71 x: 80 bytes, the same text as the COPY reference.
    let toml = format!(
        r#"name = "bench-lines"
[[steps]]
name = "print"
timeout_secs = 3600
script = '''
awk 'BEGIN {{ p = sprintf("%71s", ""); gsub(/ /, "x", p); for (i = 0; i < {n}; i++) printf "%08d %s\n", i, p }}'
'''
"#
    );
    let body =
        gantry_tests::gantry_dispatcher::cli::process_json(&toml).map_err(anyhow::Error::msg)?;
    let mut watch = Watcher::connect(&stack).await?;
    let meter = Meter::new(&stack, opts).await?;
    let window = meter.start(&stack, &watch).await?;
    let (task, _) = post_task(&stack, &body).await?;
    wait_all_success(&mut watch, 1, opts.limit(Duration::from_millis(n as u64))).await?;
    let label = "lines of one step";
    let costs = meter
        .finish(&stack, &watch, window, label, n, "line")
        .await?;
    // From submission to the task's Success, which needs every line stored (the attempt's
    // own finished_at is the script's end, on the agent's clock, before the lines are in).
    let secs: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM finished_at - created_at)::float8 FROM tasks WHERE id = $1",
    )
    .bind(task)
    .fetch_one(&db)
    .await?;
    // All present, once (the unique index on seq), in order (task positions follow seq),
    // intact (the i-th line in position order is line i). `seq` numbers every line of the
    // attempt, whatever its stream, so stdout need not start at 0.
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM log_lines WHERE task_id = $1 AND stream = 1")
            .bind(task)
            .fetch_one(&db)
            .await?;
    ensure!(count as usize == n, "LOST LINES: {count}/{n} lines stored");
    let bad: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (
            SELECT seq, text, lag(seq) OVER (ORDER BY pos) AS prev,
                   row_number() OVER (ORDER BY pos) - 1 AS i
            FROM log_lines WHERE task_id = $1 AND stream = 1) l
         WHERE (prev IS NOT NULL AND seq <= prev)
            OR text <> lpad(i::text, 8, '0') || ' ' || repeat('x', 71)",
    )
    .bind(task)
    .fetch_one(&db)
    .await?;
    ensure!(bad == 0, "LINES OUT OF ORDER OR CHANGED: {bad} of {n}");
    let d = proc_kib(dispatcher_pid(&stack)?, "VmHWM")?;
    let mut agents = 0;
    for i in 0..AGENTS {
        agents += proc_kib(stack.agent(i).pid().context("agent pid")?, "VmHWM")?;
    }
    let rate = n as f64 / secs;
    Ok(ScenarioResult {
        name: "lines".into(),
        figures: vec![
            Figure::share_of(
                &format!("lines persisted per second ({n} lines of 80 bytes, submit to Success)"),
                rate,
                "lines/s",
                ("direct COPY", copy_rate),
                0.35,
            ),
            Figure::at_most(
                "peak RSS, dispatcher + 2 agents (VmHWM sum)",
                mib(d + agents),
                "MiB",
                200.0,
            ),
            Figure::plain("peak RSS of the dispatcher alone", mib(d), "MiB"),
        ],
        checked: format!("{n}/{n} lines stored once, in order, intact; task Success"),
        notes: vec![
            "Peak RSS counts the dispatcher and both agent processes, not the step's guard or awk."
                .into(),
            costs.note(),
        ],
        costs: vec![costs],
        ..Default::default()
    })
}
