//! # gantry-bench: Gantry beside the limits beneath it, measured in the same run
//!
//! Every scenario starts its own stack through the end-to-end harness (`gantry-tests`): a
//! dispatcher process and real agent processes in a fresh namespace and database against the
//! local services. Dropping the stack kills the processes and removes the database, queues
//! and Redis keys, and every scenario runs under a time limit, so a stuck scenario is dropped
//! (and cleaned up) rather than left running.
//!
//! References are measured in the same run: raw AMQP round trips through a quorum queue,
//! the bare spawn rate of `bash -c true`, and sqlx `COPY` into the `log_lines` layout.
//! Every scenario checks that nothing was lost (every task `Success`, every line present once
//! and in order) and fails otherwise: a figure from a run that lost work is not a figure.

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use gantry_tests::{AgentOpts, PG_ADMIN_URL, Stack};
use sqlx::PgPool;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub mod plot;
pub mod report;

/// Every scenario, references first, in the order `all` runs them.
pub const SCENARIOS: &[&str] = &[
    "amqp",
    "spawn",
    "copy",
    "throughput",
    "dispatch",
    "sequential",
    "lines",
    "api",
    "queued-rss",
    "idle-agent",
];

/// Slots per agent and agents per stack, as the issue sets them.
pub const SLOTS: u32 = 4;
pub const AGENTS: usize = 2;
/// Concurrent API clients.
pub const CLIENTS: usize = 20;

/// How big each scenario is.
#[derive(Clone, Debug)]
pub struct Counts {
    pub amqp_round_trips: usize,
    pub spawns: usize,
    pub throughput_tasks: usize,
    pub dispatch_rate: u32,
    pub dispatch_secs: u32,
    pub sequential_steps: usize,
    pub lines: usize,
    pub api_tasks: usize,
    pub api_steps: usize,
    pub queued_steps: usize,
    /// Idle agents started at once beside the first one's measurement.
    pub idle_agents: usize,
}

impl Counts {
    /// The issue's counts, multiplied by `scale` (1.0 for a full run).
    pub fn full(scale: f64) -> Self {
        let s = |n: usize| ((n as f64 * scale).round() as usize).max(1);
        Self {
            amqp_round_trips: s(5_000),
            spawns: s(4_000),
            throughput_tasks: s(20_000),
            dispatch_rate: 100,
            dispatch_secs: (60.0 * scale).round().max(2.0) as u32,
            sequential_steps: 50,
            lines: s(1_000_000),
            api_tasks: 100,
            api_steps: 10,
            queued_steps: s(10_000),
            idle_agents: s(200),
        }
    }

    /// Small counts: every scenario in a few seconds, for the smoke test.
    pub fn quick() -> Self {
        Self {
            amqp_round_trips: 50,
            spawns: 40,
            throughput_tasks: 24,
            dispatch_rate: 20,
            dispatch_secs: 1,
            sequential_steps: 5,
            lines: 5_000,
            api_tasks: 10,
            api_steps: 2,
            queued_steps: 40,
            idle_agents: 3,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Opts {
    pub quick: bool,
    /// The multiplier of the full counts.
    pub scale: f64,
    pub counts: Counts,
    /// Where `docs/BENCHMARKS.md` and `docs/bench/` are written (the workspace root).
    pub root: PathBuf,
}

impl Opts {
    pub fn new(quick: bool, scale: f64, root: PathBuf) -> Self {
        Self {
            quick,
            scale,
            counts: if quick {
                Counts::quick()
            } else {
                Counts::full(scale)
            },
            root,
        }
    }

    pub fn samples_dir(&self) -> PathBuf {
        self.root.join("docs").join("bench")
    }

    /// A scenario's time limit: generous, but finite.
    fn limit(&self, work: Duration) -> Duration {
        Duration::from_secs(if self.quick { 60 } else { 120 }) + work
    }
}

/// The workspace root, where `docs/` lives.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// One measured figure, with its reference and target where it has them.
#[derive(Clone, Debug)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
    /// (what, value): the reference this figure is a ratio of.
    pub reference: Option<(String, f64)>,
    /// The target, in words ("≥ 50 % of bare spawn").
    pub target: String,
    /// Whether the target is met; `None` when there is no target.
    pub met: Option<bool>,
}

impl Figure {
    fn plain(name: &str, value: f64, unit: &str) -> Self {
        Self {
            name: name.into(),
            value,
            unit: unit.into(),
            reference: None,
            target: "reported, no target".into(),
            met: None,
        }
    }

    /// A figure that must stay at or under `max`.
    fn at_most(name: &str, value: f64, unit: &str, max: f64) -> Self {
        Self {
            target: format!("≤ {max} {unit}"),
            met: Some(value <= max),
            ..Self::plain(name, value, unit)
        }
    }

    /// A rate that must reach `share` of a reference rate.
    fn share_of(name: &str, value: f64, unit: &str, reference: (&str, f64), share: f64) -> Self {
        let ratio = value / reference.1;
        Self {
            reference: Some((reference.0.into(), reference.1)),
            target: format!("≥ {:.0} % of {}", share * 100.0, reference.0),
            met: Some(ratio >= share),
            ..Self::plain(name, value, unit)
        }
    }

    pub fn ratio(&self) -> Option<f64> {
        self.reference.as_ref().map(|(_, r)| self.value / r)
    }
}

/// What one scenario measured and checked.
#[derive(Clone, Debug, Default)]
pub struct ScenarioResult {
    pub name: String,
    pub figures: Vec<Figure>,
    /// What was verified to be complete ("24/24 tasks Success").
    pub checked: String,
    /// The raw samples file, relative to the samples dir.
    pub samples: Option<String>,
    /// Series for the plot: (label, [(load, value)]).
    pub series: Vec<(String, Vec<(f64, f64)>)>,
    pub elapsed: Duration,
    pub notes: Vec<String>,
}

/// The outcome of one scenario: measured, or failed with the reason.
#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    pub result: Result<ScenarioResult, String>,
}

/// The measured values of the references, which later scenarios divide by.
#[derive(Clone, Debug, Default)]
pub struct References {
    pub spawn_per_sec: Option<f64>,
    pub copy_lines_per_sec: Option<f64>,
}

/// Run the scenarios named, in order, each bounded in time and cleaned up after. A scenario
/// that needs a reference not yet measured measures it first.
pub async fn run(names: &[&str], opts: &Opts) -> Vec<Outcome> {
    std::fs::create_dir_all(opts.samples_dir()).ok();
    let mut refs = References::default();
    let mut out = Vec::new();
    // The harness builds missing or stale binaries on first use; do that before any
    // scenario's clock starts, so a build (which may wait for cargo's lock) is never timed.
    let _ = tokio::task::spawn_blocking(|| gantry_tests::bin("gantry-dispatcher")).await;
    for name in names {
        eprintln!("gantry-bench: {name} ...");
        let started = Instant::now();
        let result = run_one(name, opts, &mut refs).await;
        let result = match result {
            Ok(mut r) => {
                r.elapsed = started.elapsed();
                eprintln!("gantry-bench: {name} done in {:.1?}", r.elapsed);
                for f in &r.figures {
                    eprintln!("    {} = {:.3} {}", f.name, f.value, f.unit);
                }
                Ok(r)
            }
            Err(e) => {
                eprintln!("gantry-bench: {name} FAILED: {e:#}");
                Err(format!("{e:#}"))
            }
        };
        out.push(Outcome {
            name: name.to_string(),
            result,
        });
    }
    out
}

async fn run_one(name: &str, opts: &Opts, refs: &mut References) -> Result<ScenarioResult> {
    let c = &opts.counts;
    // Each scenario's time limit grows with its work; the stack is dropped (and cleaned up)
    // when the limit strikes.
    let (limit, fut): (Duration, std::pin::Pin<Box<dyn Future<Output = _> + '_>>) = match name {
        "amqp" => (
            opts.limit(Duration::from_millis(c.amqp_round_trips as u64 * 20)),
            Box::pin(amqp(opts)),
        ),
        "spawn" => (
            opts.limit(Duration::from_millis(c.spawns as u64 * 20)),
            Box::pin(spawn(opts)),
        ),
        "copy" => (
            opts.limit(Duration::from_micros(c.lines as u64 * 100)),
            Box::pin(copy(opts)),
        ),
        "throughput" => {
            let spawn_rate = match refs.spawn_per_sec {
                Some(r) => r,
                None => reference_value(&spawn(opts).await?)?,
            };
            refs.spawn_per_sec = Some(spawn_rate);
            (
                opts.limit(Duration::from_millis(c.throughput_tasks as u64 * 100)),
                Box::pin(throughput(opts, spawn_rate)),
            )
        }
        "dispatch" => (
            opts.limit(Duration::from_secs(c.dispatch_secs as u64 * 4)),
            Box::pin(dispatch(opts)),
        ),
        "sequential" => (
            opts.limit(Duration::from_secs(c.sequential_steps as u64)),
            Box::pin(sequential(opts)),
        ),
        "lines" => {
            let copy_rate = match refs.copy_lines_per_sec {
                Some(r) => r,
                None => reference_value(&copy(opts).await?)?,
            };
            refs.copy_lines_per_sec = Some(copy_rate);
            (
                opts.limit(Duration::from_millis(c.lines as u64)),
                Box::pin(lines(opts, copy_rate)),
            )
        }
        "api" => (
            opts.limit(Duration::from_millis(
                (c.api_tasks * c.api_steps) as u64 * 200,
            )),
            Box::pin(api(opts)),
        ),
        "queued-rss" => (
            opts.limit(Duration::from_millis(c.queued_steps as u64 * 50)),
            Box::pin(queued_rss(opts)),
        ),
        "idle-agent" => (
            opts.limit(Duration::from_millis(c.idle_agents as u64 * 500)),
            Box::pin(idle_agent(opts)),
        ),
        other => bail!(
            "no scenario {other:?}; the scenarios: {}",
            SCENARIOS.join(", ")
        ),
    };
    // The scenario's own waits use `limit` and say what they waited for; this is the
    // backstop for anything else that could hang.
    let limit = limit + Duration::from_secs(30);
    let r = tokio::time::timeout(limit, fut).await.map_err(|_| {
        anyhow::anyhow!("{name}: not done within {limit:?} (stopped and cleaned up)")
    })??;
    match name {
        "spawn" => refs.spawn_per_sec = Some(reference_value(&r)?),
        "copy" => refs.copy_lines_per_sec = Some(reference_value(&r)?),
        _ => {}
    }
    Ok(r)
}

fn reference_value(r: &ScenarioResult) -> Result<f64> {
    r.figures
        .first()
        .map(|f| f.value)
        .context("a reference without a figure")
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// A field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn proc_kib(pid: i32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{field} in /proc/{pid}/status"))
}

/// A field of `/proc/<pid>/smaps_rollup` (`Pss`, `Private_Clean`), in KiB.
pub fn rollup_kib(pid: i32, field: &str) -> Result<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
    rollup
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{field} in /proc/{pid}/smaps_rollup"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The `p`-th percentile (0..=100) of `samples`, nearest rank.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn write_csv(opts: &Opts, file: &str, header: &str, rows: &[String]) -> Result<String> {
    let path = opts.samples_dir().join(file);
    let mut text = String::with_capacity(rows.len() * 24);
    text.push_str(header);
    text.push('\n');
    for r in rows {
        text.push_str(r);
        text.push('\n');
    }
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(file.to_owned())
}

/// A stack with a dispatcher and `agents` agents of 4 slots each in the given pools. Logging
/// is at `warn` so that the figures measure the work, not debug output.
async fn stack_with_agents(agents: usize, pools: &[&str]) -> Result<Stack> {
    stack_with(agents, pools, &[]).await
}

/// As [`stack_with_agents`], with more environment for the dispatcher.
async fn stack_with(
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

fn dispatcher_pid(stack: &Stack) -> Result<i32> {
    stack
        .dispatcher
        .as_ref()
        .and_then(|p| p.pid())
        .context("dispatcher pid")
}

/// A process with `steps` sequential `true` steps, as the JSON the API takes.
fn true_process(name: &str, steps: usize, pool: Option<&str>) -> Result<serde_json::Value> {
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
async fn post_task(stack: &Stack, body: &serde_json::Value) -> Result<(uuid::Uuid, Duration)> {
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

/// Submit `n` copies of `body` from `clients` concurrent clients; every latency, in order
/// of completion, with the number of tasks already accepted when it completed.
async fn submit_many(
    stack: &Stack,
    body: &serde_json::Value,
    n: usize,
    clients: usize,
) -> Result<Vec<(usize, Duration)>> {
    let mut stream = futures::stream::iter(0..n)
        .map(|_| post_task(stack, body))
        .buffer_unordered(clients);
    let mut out = Vec::with_capacity(n);
    while let Some(r) = stream.next().await {
        let (_, latency) = r?;
        out.push((out.len() + 1, latency));
    }
    Ok(out)
}

/// Wait until every task in the stack's database has ended, then check they all succeeded.
async fn wait_all_success(db: &PgPool, n: usize, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM tasks GROUP BY state")
                .fetch_all(db)
                .await?;
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
                .fetch_all(db)
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

/// CPU time of a process and of its reaped children, in seconds (`/proc/<pid>/stat`).
fn cpu_secs(pid: i32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(')').map(|r| r.1).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime, stime, cutime, cstime are fields 14..=17, i.e. 11..=14 after the name; /proc
    // counts in USER_HZ, 100 on Linux.
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0) / 100.0;
    (get(11) + get(12), get(13) + get(14))
}

/// Machine-wide (busy, total) CPU seconds from `/proc/stat`.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let total: f64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    ((total - idle) / 100.0, total / 100.0)
}

/// Where the CPU went during a scenario: a poor man's profile, measured on every run.
struct Usage {
    dispatcher: (f64, f64),
    agents: Vec<(f64, f64)>,
    machine: (f64, f64),
    wal: f64,
}

impl Usage {
    async fn sample(stack: &Stack, db: &PgPool) -> Result<Self> {
        let dispatcher = cpu_secs(dispatcher_pid(stack)?);
        let agents = stack
            .agents
            .iter()
            .filter_map(|a| a.proc.as_ref().and_then(|p| p.pid()))
            .map(cpu_secs)
            .collect();
        let wal: f64 =
            sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8")
                .fetch_one(db)
                .await?;
        Ok(Self {
            dispatcher,
            agents,
            machine: machine_cpu(),
            wal,
        })
    }

    /// What was spent between `self` and `after`, per `unit` (`step`, `line`, `POST`), in ms,
    /// or in µs where a figure would print as 0.00 ms.
    fn note(&self, after: &Usage, count: usize, unit: &str) -> String {
        let per = |x: f64| x / count as f64 * 1000.0;
        let d = after.dispatcher.0 - self.dispatcher.0;
        let (mut a, mut c) = (0.0, 0.0);
        for (x, y) in self.agents.iter().zip(&after.agents) {
            a += y.0 - x.0;
            c += y.1 - x.1;
        }
        let small = [per(d), per(a), per(c)].iter().all(|v| *v < 0.1);
        let time = |ms: f64| {
            if small {
                format!("{:.2} µs", ms * 1000.0)
            } else {
                format!("{ms:.2} ms")
            }
        };
        let busy = after.machine.0 - self.machine.0;
        let total = after.machine.1 - self.machine.1;
        format!(
            "CPU per {unit}: dispatcher {}, agents {}, their children (guard + script) {}; machine {:.0} % busy over the scenario ({:.1} of {:.1} CPU-seconds, the rest of the busy time is PostgreSQL, RabbitMQ, Redis, this harness and anything else on the machine); {:.0} bytes of PostgreSQL WAL per {unit} (cluster-wide: other databases' writes count too).",
            time(per(d)),
            time(per(a)),
            time(per(c)),
            busy / total.max(1e-9) * 100.0,
            busy,
            total,
            (after.wal - self.wal) / count as f64
        )
    }
}

// ---------------------------------------------------------------------------------------------
// References

/// Raw AMQP: one persistent message per round trip through a quorum queue, published with
/// confirms and consumed with a manual ack.
async fn amqp(opts: &Opts) -> Result<ScenarioResult> {
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
    let n = opts.counts.amqp_round_trips;
    let conn = lapin::Connection::connect(
        gantry_tests::AMQP_URL,
        lapin::ConnectionProperties::default(),
    )
    .await?;
    let queue = format!(
        "bench-{}.amqp",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let result = async {
        let publisher = conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        publisher
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await?;
        let consumer_ch = conn.create_channel().await?;
        let mut consumer = consumer_ch
            .basic_consume(
                queue.as_str().into(),
                "bench".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let body = vec![b'x'; 256];
        let mut samples = Vec::with_capacity(n);
        let started = Instant::now();
        for i in 0..n {
            let t = Instant::now();
            let confirm = publisher
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &body,
                    lapin::BasicProperties::default().with_delivery_mode(2),
                )
                .await?
                .await?;
            ensure!(
                confirm.is_ack() && confirm.take_message().is_none(),
                "message {i} not confirmed as queued"
            );
            let delivery = consumer
                .next()
                .await
                .context("consumer ended")?
                .context("consumer error")?;
            ensure!(delivery.data == body, "message {i} came back changed");
            ensure!(
                delivery.ack(BasicAckOptions::default()).await?,
                "ack {i} not sent"
            );
            samples.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let elapsed = started.elapsed().as_secs_f64();
        let _ = publisher
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        Ok::<_, anyhow::Error>((samples, elapsed))
    }
    .await;
    if result.is_err()
        && let Ok(ch) = conn.create_channel().await
    {
        let _ = ch
            .queue_delete(
                queue.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = conn.close(200, "bench done".into()).await;
    let (samples, elapsed) = result?;
    let rows: Vec<String> = samples
        .iter()
        .enumerate()
        .map(|(i, ms)| format!("{i},{ms:.3}"))
        .collect();
    Ok(ScenarioResult {
        name: "amqp".into(),
        figures: vec![
            Figure::plain(
                "raw AMQP round trips per second",
                n as f64 / elapsed,
                "msg/s",
            ),
            Figure::plain("raw AMQP round trip p50", percentile(&samples, 50.0), "ms"),
            Figure::plain("raw AMQP round trip p99", percentile(&samples, 99.0), "ms"),
        ],
        checked: format!("{n}/{n} messages confirmed, received intact and acked"),
        samples: Some(write_csv(opts, "amqp.csv", "round_trip,ms", &rows)?),
        ..Default::default()
    })
}

/// Bare spawn: `bash -c true` started and reaped at the agents' total parallelism.
async fn spawn(opts: &Opts) -> Result<ScenarioResult> {
    let n = opts.counts.spawns;
    let parallelism = AGENTS * SLOTS as usize;
    let started = Instant::now();
    let mut stream = futures::stream::iter(0..n)
        .map(|_| async {
            let status = tokio::process::Command::new("bash")
                .args(["-c", "true"])
                .stdin(std::process::Stdio::null())
                .status()
                .await?;
            ensure!(status.success(), "bash -c true failed: {status}");
            Ok::<_, anyhow::Error>(())
        })
        .buffer_unordered(parallelism);
    let mut done = 0;
    while let Some(r) = stream.next().await {
        r?;
        done += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(ScenarioResult {
        name: "spawn".into(),
        figures: vec![Figure::plain(
            &format!("bare spawn of bash -c true at parallelism {parallelism}"),
            done as f64 / elapsed,
            "spawns/s",
        )],
        checked: format!("{done}/{n} processes exited 0"),
        ..Default::default()
    })
}

/// The log line that the lines scenario prints: 80 bytes, numbered.
fn line_text(i: usize) -> String {
    format!("{i:08} {}", "x".repeat(71))
}

/// Direct COPY: the same rows as the lines scenario into a table of `log_lines`' layout
/// (primary key and unique index included), in a scratch database, one COPY.
async fn copy(opts: &Opts) -> Result<ScenarioResult> {
    use sqlx::postgres::PgPoolCopyExt;
    let n = opts.counts.lines;
    let db_name = format!(
        "gantry_bench_copy_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(PG_ADMIN_URL)
        .await?;
    sqlx::query(&format!("CREATE DATABASE \"{db_name}\""))
        .execute(&admin)
        .await?;
    let result = async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&format!("postgres://root@127.0.0.1:5432/{db_name}"))
            .await?;
        sqlx::query(
            "CREATE TABLE log_lines (
                task_id uuid NOT NULL, pos bigint NOT NULL, step_run_id uuid, attempt integer,
                seq bigint, ts timestamptz NOT NULL, stream smallint NOT NULL, text text NOT NULL,
                PRIMARY KEY (task_id, pos))",
        )
        .execute(&pool)
        .await?;
        sqlx::query(
            "CREATE UNIQUE INDEX log_lines_attempt_seq ON log_lines (step_run_id, attempt, seq)",
        )
        .execute(&pool)
        .await?;
        let task = uuid::Uuid::new_v4();
        let run = uuid::Uuid::new_v4();
        let ts = chrono::Utc::now().to_rfc3339();
        let started = Instant::now();
        let mut copy = pool
            .copy_in_raw(
                "COPY log_lines (task_id, pos, step_run_id, attempt, seq, ts, stream, text) \
                 FROM STDIN WITH (FORMAT csv)",
            )
            .await?;
        let mut buf = String::with_capacity(1 << 20);
        for i in 0..n {
            let _ = writeln!(buf, "{task},{i},{run},1,{i},{ts},1,{}", line_text(i));
            if buf.len() >= 1 << 20 {
                copy.send(buf.as_bytes()).await?;
                buf.clear();
            }
        }
        if !buf.is_empty() {
            copy.send(buf.as_bytes()).await?;
        }
        let rows = copy.finish().await?;
        let elapsed = started.elapsed().as_secs_f64();
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM log_lines")
            .fetch_one(&pool)
            .await?;
        pool.close().await;
        ensure!(
            rows as usize == n && count as usize == n,
            "COPY stored {count}/{n} rows"
        );
        Ok::<_, anyhow::Error>(elapsed)
    }
    .await;
    let _ = sqlx::query(&format!(
        "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
    ))
    .execute(&admin)
    .await;
    admin.close().await;
    let elapsed = result?;
    Ok(ScenarioResult {
        name: "copy".into(),
        figures: vec![Figure::plain(
            "direct sqlx COPY into the log_lines layout",
            n as f64 / elapsed,
            "lines/s",
        )],
        checked: format!("{n}/{n} rows stored"),
        ..Default::default()
    })
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// One-step `true` tasks: steps completed per second, first submit to last `Success`.
async fn throughput(opts: &Opts, spawn_rate: f64) -> Result<ScenarioResult> {
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

/// Dispatch latency at a steady rate: `Queued` to `Running` of each attempt.
async fn dispatch(opts: &Opts) -> Result<ScenarioResult> {
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

/// 50 sequential steps in one task: the gap between one step's end and the next's start.
async fn sequential(opts: &Opts) -> Result<ScenarioResult> {
    let steps = opts.counts.sequential_steps;
    let stack = stack_with_agents(AGENTS, &[]).await?;
    let db = stack.db().await;
    let body = true_process("bench-sequential", steps, None)?;
    post_task(&stack, &body).await?;
    wait_all_success(&db, 1, opts.limit(Duration::from_secs(steps as u64))).await?;
    type At = chrono::DateTime<chrono::Utc>;
    // started_at and finished_at are the agent's clock; created_at (the advance's
    // transaction) and queued_at (the confirm's) are PostgreSQL's, on the same machine.
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
    // the broker's confirm (the advance, the publish), and the confirm to the agent's start
    // (the delivery, the claim, the spawn). A claim can beat the Queued mark; those gaps
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
                "of which: Queued to the agent's start (delivery, claim, spawn), p50",
                percentile(&to_started, 50.0),
                "ms",
            ),
        ],
        checked: format!("{steps}/{steps} steps Success, in order"),
        samples: Some(write_csv(opts, "sequential.csv", "step,gap_ms", &rows)?),
        ..Default::default()
    })
}

/// One step printing N lines of 80 bytes: lines persisted per second, all present, in order,
/// once; and the peak RSS of the dispatcher and agents meanwhile.
async fn lines(opts: &Opts, copy_rate: f64) -> Result<ScenarioResult> {
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
    let usage = Usage::sample(&stack, &db).await?;
    let (task, _) = post_task(&stack, &body).await?;
    wait_all_success(&db, 1, opts.limit(Duration::from_millis(n as u64))).await?;
    let profile = usage.note(&Usage::sample(&stack, &db).await?, n, "line");
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
            profile,
        ],
        ..Default::default()
    })
}

/// API `POST /api/tasks` latency from 20 concurrent clients.
async fn api(opts: &Opts) -> Result<ScenarioResult> {
    let (n, steps) = (opts.counts.api_tasks, opts.counts.api_steps);
    let stack = stack_with_agents(AGENTS, &[]).await?;
    let db = stack.db().await;
    let body = true_process("bench-api", steps, None)?;
    let usage = Usage::sample(&stack, &db).await?;
    let samples = submit_many(&stack, &body, n, CLIENTS).await?;
    let profile = format!(
        "While the {n} POSTs were answered: {}",
        usage.note(&Usage::sample(&stack, &db).await?, n, "POST")
    );
    wait_all_success(
        &db,
        n,
        opts.limit(Duration::from_millis((n * steps) as u64 * 200)),
    )
    .await?;
    let ms: Vec<f64> = samples.iter().map(|s| s.1.as_secs_f64() * 1000.0).collect();
    let rows: Vec<String> = samples
        .iter()
        .map(|(k, d)| format!("{k},{:.3}", d.as_secs_f64() * 1000.0))
        .collect();
    Ok(ScenarioResult {
        name: "api".into(),
        figures: vec![
            Figure::plain("POST /api/tasks p50", percentile(&ms, 50.0), "ms"),
            Figure::at_most(
                &format!("POST /api/tasks p99 ({n} tasks × {steps} steps, {CLIENTS} clients)"),
                percentile(&ms, 99.0),
                "ms",
                20.0,
            ),
        ],
        checked: format!("{n}/{n} tasks of {steps} steps Success"),
        samples: Some(write_csv(opts, "api.csv", "accepted,latency_ms", &rows)?),
        series: vec![(
            "POST /api/tasks latency (ms) vs tasks accepted".into(),
            samples
                .iter()
                .map(|(k, d)| (*k as f64, d.as_secs_f64() * 1000.0))
                .collect(),
        )],
        notes: vec![profile],
        ..Default::default()
    })
}

/// Dispatcher RSS with N queued steps and no agent running: a pool whose only worker's agent
/// was stopped after it registered.
async fn queued_rss(opts: &Opts) -> Result<ScenarioResult> {
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

/// The stack's workers (not the built-in ones), by name.
async fn workers_by_name(
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
fn agent_memory(pid: i32) -> Result<(u64, u64, u64)> {
    Ok((
        proc_kib(pid, "VmRSS")?,
        rollup_kib(pid, "Pss")?,
        rollup_kib(pid, "Private_Clean")? + rollup_kib(pid, "Private_Dirty")?,
    ))
}

/// The RSS of one idle agent, a few seconds after it started and heartbeated; then of N
/// idle agents connected to the same dispatcher at once.
async fn idle_agent(opts: &Opts) -> Result<ScenarioResult> {
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
