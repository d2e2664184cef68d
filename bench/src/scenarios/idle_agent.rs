//! Memory of idle agents, one and many.

use crate::measure::{mib, proc_kib, rollup_kib};
use crate::stack::{dispatcher_pid, stack_with_agents};
use crate::{Figure, Opts, SLOTS, ScenarioResult};
use anyhow::{Context, Result, ensure};
use gantry_tests::{AgentOpts, Stack};
use std::time::{Duration, Instant};

/// The stack's workers (not the built-in ones), by name.
pub(crate) async fn workers_by_name(
    stack: &Stack,
) -> Result<std::collections::HashMap<String, gantry_shared::api::Worker>> {
    let all: Vec<gantry_shared::api::Worker> = stack.get("/api/workers").await?;
    Ok(all
        .into_iter()
        .filter(|w| !w.builtin)
        .map(|w| (w.name.clone(), w))
        .collect())
}

/// What one agent process holds: (VmRSS, Pss, private) in KiB. Pss shares each page among
/// the processes mapping it (the agents' common binary text); private is what only this
/// agent holds, i.e. what one more agent costs the machine.
pub(crate) fn agent_memory(pid: i32) -> Result<(u64, u64, u64)> {
    Ok((
        proc_kib(pid, "VmRSS")?,
        rollup_kib(pid, "Pss")?,
        rollup_kib(pid, "Private_Clean")? + rollup_kib(pid, "Private_Dirty")?,
    ))
}

/// The RSS of one idle agent, a few seconds after it started and heartbeated; then of N
/// idle agents connected to the same dispatcher at once.
pub(crate) async fn idle_agent(opts: &Opts) -> Result<ScenarioResult> {
    let n = opts.counts.idle_agents.max(1);
    let settle = Duration::from_secs(if opts.quick { 1 } else { 5 });
    let mut stack = stack_with_agents(1, &[]).await?;
    tokio::time::sleep(settle).await;
    let pid = stack.agent(0).pid().context("agent pid")?;
    let rss = proc_kib(pid, "VmRSS")?;
    let hwm = proc_kib(pid, "VmHWM")?;
    let (_, pss, private) = agent_memory(pid)?;
    let dispatcher = dispatcher_pid(&stack)?;
    let dispatcher_before = proc_kib(dispatcher, "VmRSS")?;

    // The other N-1, started 16 at a time, like the first: quiet, 4 slots, 1 s heartbeats.
    let started = Instant::now();
    let names: Vec<String> = (2..=n).map(|i| format!("bench-{i}")).collect();
    let quiet = vec![("RUST_LOG".to_owned(), "warn".to_owned())];
    stack
        .add_agents(
            &names,
            AgentOpts {
                pools: Vec::new(),
                max_concurrent_steps: SLOTS,
                env: quiet,
                server: None,
            },
            16,
        )
        .await?;
    let start_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(settle).await;

    // Nothing lost: every agent is registered, still running, and still heartbeating (each
    // worker's last heartbeat moves on over a few intervals).
    let before = workers_by_name(&stack).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = workers_by_name(&stack).await?;
    ensure!(
        after.len() == n,
        "LOST AGENTS: {} workers registered for {n} agents",
        after.len()
    );
    let none_lost = |lost: Vec<String>, how: &str| {
        ensure!(
            lost.is_empty(),
            "LOST AGENTS: {} of {n} {how}: {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
        Ok(())
    };
    let silent = stack
        .agents
        .iter()
        .filter(|a| match (before.get(&a.name), after.get(&a.name)) {
            (Some(b), Some(w)) => {
                w.health == "Unavailable"
                    || w.last_heartbeat_at.is_none()
                    || w.last_heartbeat_at <= b.last_heartbeat_at
            }
            _ => true,
        })
        .map(|a| a.name.clone())
        .collect();
    none_lost(silent, "stopped heartbeating")?;
    let exited = stack
        .agents
        .iter_mut()
        .filter_map(|a| {
            let alive = a
                .proc
                .as_mut()
                .is_some_and(|p| matches!(p.child.try_wait(), Ok(None)));
            (!alive).then(|| a.name.clone())
        })
        .collect();
    none_lost(exited, "exited")?;

    let mut fleet = Vec::with_capacity(n);
    for a in &stack.agents {
        let pid = a.proc.as_ref().and_then(|p| p.pid()).context("agent pid")?;
        fleet.push(agent_memory(pid)?);
    }
    let mean = |f: fn(&(u64, u64, u64)) -> u64| {
        fleet.iter().map(f).sum::<u64>() as f64 / fleet.len() as f64 / 1024.0
    };
    let max_rss = fleet.iter().map(|m| m.0).max().unwrap_or(0);
    let dispatcher_rss = proc_kib(dispatcher, "VmRSS")?;
    Ok(ScenarioResult {
        name: "idle-agent".into(),
        figures: vec![
            Figure::at_most("idle agent RSS", mib(rss), "MiB", 10.0),
            Figure::plain("idle agent peak RSS (VmHWM)", mib(hwm), "MiB"),
            Figure::plain("idle agent PSS", mib(pss), "MiB"),
            Figure::at_most(
                &format!("mean RSS per agent, {n} idle agents"),
                mean(|m| m.0),
                "MiB",
                10.0,
            ),
            Figure::at_most(
                &format!("max RSS per agent, {n} idle agents"),
                mib(max_rss),
                "MiB",
                10.0,
            ),
            Figure::plain(
                &format!("mean PSS per agent, {n} idle agents"),
                mean(|m| m.1),
                "MiB",
            ),
            Figure::plain(
                &format!("mean private memory per agent, {n} idle agents"),
                mean(|m| m.2),
                "MiB",
            ),
            Figure::plain(
                &format!("time to register and start {} agents (16 at a time)", n - 1),
                start_secs,
                "s",
            ),
            Figure::plain(
                &format!("dispatcher RSS with {n} idle agents connected"),
                mib(dispatcher_rss),
                "MiB",
            ),
            Figure::plain(
                "dispatcher RSS with 1 idle agent",
                mib(dispatcher_before),
                "MiB",
            ),
        ],
        checked: format!(
            "the first agent registered, heartbeated and stayed up; then all {n} agents were registered, running, and every one heartbeated again within 3 s"
        ),
        notes: vec![format!(
            "The single agent's private memory (not shared with any other process) is {:.1} MiB. RSS counts every page an agent maps, including the binary's code, which N agents share in the page cache; PSS divides each shared page among the processes that map it, so the mean PSS of N agents is nearer what each one costs the machine. Agents heartbeat every second here (the harness's setting).",
            mib(private)
        )],
        ..Default::default()
    })
}
