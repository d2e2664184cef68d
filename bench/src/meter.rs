//! The meter: reads a stack's database counters and its processes' CPU at the edges of a
//! window of work, and turns them into [`Costs`].
//!
//! PostgreSQL publishes a backend's counters in `pg_stat_database` when it goes idle, and at
//! most once a second; an idle backend's last counts can wait up to 10 s. So a window starts
//! after the stack has been idle for [`Opts::settle`] (the stack's start-up is published by
//! then), measures the idle background over a second settle, and its counters are read a
//! settle after the work ended, less that background over the settle. In quick mode the
//! settles are short and the background is neither measured nor taken out: its counts are
//! rough (and higher). CPU is read at the
//! window's edges themselves. Every read goes through a connection to the `postgres`
//! database, so none counts in the stack's; the harness's own polls of the stack's database
//! (one transaction each, [`Watcher`]) are subtracted.

use crate::Opts;
use crate::costs::{CPU_GROUPS, Costs, DbCounters};
use crate::cpu::{ProcTable, machine_cpu};
use crate::stack::Watcher;
use anyhow::{Context, Result};
use gantry_tests::{PG_ADMIN_URL, Stack};
use sqlx::PgPool;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What the meter reads at one edge of a window.
struct Reading {
    at: Instant,
    /// CPU seconds by group, as [`CPU_GROUPS`], except the stack's backends (below).
    cpu: HashMap<&'static str, f64>,
    /// Own CPU of each backend serving the stack's dispatchers.
    backends: HashMap<i32, f64>,
    machine: (f64, f64),
    wal: f64,
    statements: Option<f64>,
    /// `pg_stat_statements_info.dealloc`: entries evicted so far (`pg_stat_statements.max`).
    evicted: Option<f64>,
    polls: u64,
}

/// A window opened by [`Meter::start`].
pub struct Window {
    start: Reading,
    db: DbCounters,
    /// The idle stack's counts per second (sweeps, heartbeats, leases); not measured in
    /// quick mode.
    background: Option<DbCounters>,
}

/// Reads the counters of one stack's database and the CPU of its processes.
pub struct Meter {
    admin: PgPool,
    db_name: String,
    db_oid: i64,
    /// Why statements are not counted, if they are not.
    pub statements_missing: Option<String>,
    settle: Duration,
    /// Whether to measure the idle background (not in quick mode: a 2 s settle is shorter
    /// than PostgreSQL's delay, so the estimate would be mostly noise).
    background: bool,
}

impl Meter {
    pub async fn new(stack: &Stack, opts: &Opts) -> Result<Self> {
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(PG_ADMIN_URL)
            .await?;
        let db_oid: i64 =
            sqlx::query_scalar("SELECT oid::int8 FROM pg_database WHERE datname = $1")
                .bind(&stack.db_name)
                .fetch_one(&admin)
                .await
                .with_context(|| format!("the stack's database {}", stack.db_name))?;
        let statements_missing = statements_missing(&admin).await;
        Ok(Self {
            admin,
            db_name: stack.db_name.clone(),
            db_oid,
            statements_missing,
            settle: opts.settle(),
            background: !opts.quick,
        })
    }

    async fn db_counters(&self) -> Result<DbCounters> {
        let r: (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
            "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated, tup_deleted, tup_fetched
             FROM pg_stat_database WHERE datname = $1",
        )
        .bind(&self.db_name)
        .fetch_one(&self.admin)
        .await?;
        Ok(DbCounters {
            commits: r.0 as f64,
            rollbacks: r.1 as f64,
            rows_inserted: r.2 as f64,
            rows_updated: r.3 as f64,
            rows_deleted: r.4 as f64,
            rows_fetched: r.5 as f64,
        })
    }

    /// This database's statement count, and how many entries the server has evicted so far
    /// (an eviction drops counts, other databases' activity can cause it).
    async fn statements(&self) -> Result<(Option<f64>, Option<f64>)> {
        if self.statements_missing.is_some() {
            return Ok((None, None));
        }
        let (n, evicted): (f64, f64) = sqlx::query_as(
            "SELECT (SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE dbid = $1::oid)::float8,
                    (SELECT dealloc FROM pg_stat_statements_info)::float8",
        )
        .bind(self.db_oid)
        .fetch_one(&self.admin)
        .await?;
        Ok((Some(n), Some(evicted)))
    }

    async fn read(&self, stack: &Stack, watch: &Watcher) -> Result<Reading> {
        let backends: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = $1 AND application_name = 'gantry-dispatcher'",
        )
        .bind(&self.db_name)
        .fetch_all(&self.admin)
        .await?;
        let wal: f64 =
            sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8")
                .fetch_one(&self.admin)
                .await?;
        let (statements, evicted) = self.statements().await?;
        let at = Instant::now();
        let t = ProcTable::read();
        let machine = machine_cpu();
        let dispatchers: Vec<i32> = stack
            .dispatcher
            .iter()
            .chain(stack.nodes.iter().filter_map(|n| n.proc.as_ref()))
            .filter_map(|p| p.pid())
            .collect();
        let agents: Vec<i32> = stack
            .agents
            .iter()
            .filter_map(|a| a.proc.as_ref().and_then(|p| p.pid()))
            .collect();
        let own = |pids: &[i32]| pids.iter().map(|p| t.own(*p)).sum::<f64>();
        let below = |pids: &[i32]| pids.iter().map(|p| t.below(*p)).sum::<f64>();
        let cpu = HashMap::from([
            ("dispatcher", own(&dispatchers)),
            ("agents", own(&agents)),
            ("steps", below(&agents) + below(&dispatchers)),
            ("postgres (all)", t.family("postgres")),
            ("rabbitmq", t.family("beam.smp")),
            ("redis", t.family("redis-server")),
            ("harness", t.own(std::process::id() as i32)),
        ]);
        Ok(Reading {
            at,
            cpu,
            backends: backends.iter().map(|p| (*p, t.own(*p))).collect(),
            machine,
            wal,
            statements,
            evicted,
            polls: watch.transactions,
        })
    }

    /// Open a window: wait until the stack's earlier counts are published, measure the idle
    /// background over one settle, then read the start.
    pub async fn start(&self, stack: &Stack, watch: &Watcher) -> Result<Window> {
        tokio::time::sleep(self.settle).await;
        let mut idle = None;
        if self.background {
            idle = Some((self.db_counters().await?, Instant::now()));
            tokio::time::sleep(self.settle).await;
        }
        let start = self.read(stack, watch).await?;
        let db = self.db_counters().await?;
        let background = idle.map(|(c, at)| db.minus(c).scaled(1.0 / at.elapsed().as_secs_f64()));
        Ok(Window {
            background,
            start,
            db,
        })
    }

    /// Close a window now: what it cost for `units` of work.
    pub async fn finish(
        &self,
        stack: &Stack,
        watch: &Watcher,
        w: Window,
        label: &str,
        units: usize,
        unit: &str,
    ) -> Result<Costs> {
        let end = self.read(stack, watch).await?;
        let secs = end.at.duration_since(w.start.at).as_secs_f64();
        tokio::time::sleep(self.settle).await;
        let settled_for = end.at.elapsed().as_secs_f64();
        let polls = end.polls - w.start.polls;
        // The counters read a settle late hold the idle background of that settle too.
        let mut db = self.db_counters().await?.minus(w.db);
        if let Some(b) = w.background {
            db = db.minus(b.scaled(settled_for));
        }
        db.commits -= polls as f64;
        // pg_stat_statements has no delay: its end is the window's end.
        // Entries evicted meanwhile (pg_stat_statements.max, with other databases busy) took
        // counts with them: then the window's statements are not known.
        let evicted = end.evicted != w.start.evicted;
        let statements = end
            .statements
            .zip(w.start.statements)
            .filter(|_| !evicted)
            .map(|(b, a)| b - a - polls as f64);
        let backends: f64 = end
            .backends
            .iter()
            .map(|(pid, s)| s - w.start.backends.get(pid).copied().unwrap_or(0.0))
            .sum();
        let busy = end.machine.0 - w.start.machine.0;
        let cpu = CPU_GROUPS
            .iter()
            .map(|g| {
                let v = match *g {
                    "postgres (stack)" => backends,
                    "machine busy" => busy,
                    g => end.cpu[g] - w.start.cpu[g],
                };
                (g.to_string(), v)
            })
            .collect();
        Ok(Costs {
            label: label.into(),
            unit: unit.into(),
            units,
            secs,
            db,
            statements,
            background_commits_per_sec: w.background.map(|b| b.commits),
            wal_bytes: end.wal - w.start.wal,
            cpu,
            machine_total: end.machine.1 - w.start.machine.1,
            polls,
            settle: self.settle,
            statements_missing: self.statements_missing.clone().or_else(|| {
                evicted.then(|| {
                    "pg_stat_statements evicted entries during the window (pg_stat_statements.max): its counts are incomplete".to_owned()
                })
            }),
        })
    }

    /// CPU only, between two moments of a window (the api scenario's POSTs): a sentence.
    pub async fn cpu_mark(&self, stack: &Stack, watch: &Watcher) -> Result<CpuMark> {
        Ok(CpuMark(self.read(stack, watch).await?))
    }
}

/// A CPU reading without the database's counters ([`Meter::cpu_mark`]).
pub struct CpuMark(Reading);

impl CpuMark {
    /// CPU per `unit` between `self` and `later`, by group, in ms.
    pub fn note(&self, later: &CpuMark, count: usize, unit: &str) -> String {
        let per = |x: f64| x / count.max(1) as f64 * 1000.0;
        let (a, b) = (&self.0, &later.0);
        let mut parts: Vec<String> = [
            "dispatcher",
            "agents",
            "steps",
            "postgres (all)",
            "rabbitmq",
        ]
        .iter()
        .map(|g| format!("{g} {:.2} ms", per(b.cpu[g] - a.cpu[g])))
        .collect();
        let backends: f64 = b
            .backends
            .iter()
            .map(|(pid, s)| s - a.backends.get(pid).copied().unwrap_or(0.0))
            .sum();
        parts.insert(3, format!("postgres (stack) {:.2} ms", per(backends)));
        let busy = b.machine.0 - a.machine.0;
        let total = b.machine.1 - a.machine.1;
        format!(
            "CPU per {unit}: {}; machine {:.0} % busy ({:.1} of {:.1} CPU-seconds).",
            parts.join(", "),
            busy / total.max(1e-9) * 100.0,
            busy,
            total
        )
    }
}

/// Why `pg_stat_statements` cannot be read, or `None` if it can. It must be loaded by the
/// server (`shared_preload_libraries`, a restart); then its view is created in `postgres`.
async fn statements_missing(admin: &PgPool) -> Option<String> {
    let loaded: String =
        match sqlx::query_scalar("SELECT current_setting('shared_preload_libraries')")
            .fetch_one(admin)
            .await
        {
            Ok(s) => s,
            Err(e) => return Some(format!("shared_preload_libraries unreadable: {e}")),
        };
    if !loaded.contains("pg_stat_statements") {
        return Some(format!(
            "pg_stat_statements is not loaded by this server (shared_preload_libraries = {loaded:?}; see bench/profile.sh)"
        ));
    }
    if let Err(e) = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(admin)
        .await
    {
        return Some(format!("CREATE EXTENSION pg_stat_statements failed: {e}"));
    }
    None
}
