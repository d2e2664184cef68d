//! The stack each scenario starts, and the requests and waits every scenario makes of it.

use crate::SLOTS;
use anyhow::{Context, Result, bail};
use futures::StreamExt;
use gantry_tests::{AgentOpts, Stack};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// A stack with a dispatcher and `agents` agents of 4 slots each in the given pools. Logging
/// is at `warn` so that the figures measure the work, not debug output.
pub(crate) async fn stack_with_agents(agents: usize, pools: &[&str]) -> Result<Stack> {
    stack_with(agents, pools, &[]).await
}

/// As [`stack_with_agents`], with more environment for the dispatcher.
pub(crate) async fn stack_with(
    agents: usize,
    pools: &[&str],
    dispatcher_env: &[(&str, &str)],
) -> Result<Stack> {
    let quiet = vec![("RUST_LOG".to_owned(), "warn".to_owned())];
    let mut env = quiet.clone();
    env.extend(
        dispatcher_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let mut stack = Stack::start_with(env).await?;
    for p in pools {
        stack.add_pool(p).await?;
    }
    for i in 0..agents {
        stack
            .add_agent(
                &format!("bench-{}", i + 1),
                AgentOpts {
                    pools: pools.iter().map(|p| p.to_string()).collect(),
                    max_concurrent_steps: SLOTS,
                    env: quiet.clone(),
                    server: None,
                },
            )
            .await?;
    }
    Ok(stack)
}

pub(crate) fn dispatcher_pid(stack: &Stack) -> Result<i32> {
    stack
        .dispatcher
        .as_ref()
        .and_then(|p| p.pid())
        .context("dispatcher pid")
}

/// A process with `steps` sequential `true` steps, as the JSON the API takes.
pub(crate) fn true_process(
    name: &str,
    steps: usize,
    pool: Option<&str>,
) -> Result<serde_json::Value> {
    let mut toml = format!("name = \"{name}\"\n");
    for i in 0..steps {
        let _ = write!(toml, "[[steps]]\nname = \"s{i}\"\nscript = \"true\"\n");
        if let Some(p) = pool {
            let _ = writeln!(toml, "pool = \"{p}\"");
        }
    }
    gantry_tests::gantry_dispatcher::cli::process_json(&toml).map_err(anyhow::Error::msg)
}

/// POST one task; its id and the request's latency.
pub(crate) async fn post_task(
    stack: &Stack,
    body: &serde_json::Value,
) -> Result<(uuid::Uuid, Duration)> {
    let t = Instant::now();
    let resp = stack
        .http
        .post(format!("{}/api/tasks", stack.url))
        .header(gantry_shared::api::API_KEY_HEADER, gantry_tests::API_KEY)
        .json(body)
        .send()
        .await?;
    let status = resp.status();
    let bytes = resp.bytes().await?;
    let latency = t.elapsed();
    if !status.is_success() {
        bail!(
            "POST /api/tasks: {status} {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    let created: gantry_shared::api::TaskCreated = serde_json::from_slice(&bytes)?;
    Ok((created.id.0, latency))
}

/// Submit `n` copies of `body` from `clients` concurrent clients (closed loop); each task's
/// id and its POST's latency, in order of completion.
pub(crate) async fn submit_many(
    stack: &Stack,
    body: &serde_json::Value,
    n: usize,
    clients: usize,
) -> Result<Vec<(uuid::Uuid, Duration)>> {
    let mut stream = futures::stream::iter(0..n)
        .map(|_| post_task(stack, body))
        .buffer_unordered(clients);
    let mut out = Vec::with_capacity(n);
    while let Some(r) = stream.next().await {
        out.push(r?);
    }
    Ok(out)
}

/// Submit `n` copies of `body` at `rate` a second on a fixed schedule, whatever the answers
/// (open loop: a slow answer delays no later submission); each task's id and its POST's
/// latency, and the seconds from the first submission to the last answer.
pub(crate) async fn submit_paced(
    stack: &Stack,
    body: &serde_json::Value,
    rate: f64,
    n: usize,
) -> Result<(Vec<(uuid::Uuid, Duration)>, f64)> {
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut out = Vec::with_capacity(n);
    let mut sent = 0;
    while sent < n {
        tokio::select! {
            _ = ticker.tick() => {
                in_flight.push(post_task(stack, body));
                sent += 1;
            }
            Some(r) = in_flight.next() => out.push(r?),
        }
    }
    while let Some(r) = in_flight.next().await {
        out.push(r?);
    }
    Ok((out, started.elapsed().as_secs_f64()))
}

/// The harness's own connection to the stack's database for the waits inside a measured
/// window: plain queries (the simple protocol: one statement, one transaction each),
/// counted, so that the meter can take them out of the stack's counts.
pub struct Watcher {
    conn: sqlx::PgConnection,
    /// Transactions this connection ran in the stack's database.
    pub transactions: u64,
}

impl Watcher {
    pub(crate) async fn connect(stack: &Stack) -> Result<Self> {
        use sqlx::Connection as _;
        Ok(Self {
            conn: sqlx::PgConnection::connect(&stack.db_url).await?,
            transactions: 0,
        })
    }

    /// `SELECT state, count(*) FROM tasks GROUP BY state`.
    async fn task_states(&mut self) -> Result<Vec<(String, i64)>> {
        use sqlx::Row as _;
        let rows = sqlx::raw_sql("SELECT state, count(*) FROM tasks GROUP BY state")
            .fetch_all(&mut self.conn)
            .await?;
        self.transactions += 1;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }
}

/// Wait until `n` tasks are in the stack's database and all have ended, then check they all
/// succeeded.
pub(crate) async fn wait_all_success(watch: &mut Watcher, n: usize, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let rows = watch.task_states().await?;
        let total: i64 = rows.iter().map(|r| r.1).sum();
        let ended: i64 = rows
            .iter()
            .filter(|r| matches!(r.0.as_str(), "Success" | "Failed" | "Cancelled"))
            .map(|r| r.1)
            .sum();
        let success: i64 = rows.iter().filter(|r| r.0 == "Success").map(|r| r.1).sum();
        if total as usize == n && ended == total {
            if success as usize != n {
                let why: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
                    "SELECT s.state, s.reason, a.error FROM step_runs s
                     LEFT JOIN attempts a ON a.step_run_id = s.id AND a.attempt = s.attempt
                     WHERE s.state NOT IN ('Success', 'Skipped') LIMIT 3",
                )
                .fetch_all(&mut watch.conn)
                .await?;
                bail!("LOST WORK: {success}/{n} tasks Success; states: {rows:?}; {why:?}");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("LOST WORK: not all {n} tasks ended within {limit:?}; states: {rows:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
