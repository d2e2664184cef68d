//! # gantry-tests: the end-to-end harness
//!
//! Every test gets its own [`Stack`]: a fresh PostgreSQL database, a fresh namespace for its
//! queues and Redis keys, and its own dispatcher process listening on port 0, so the whole
//! suite runs in parallel against one set of services. Agents are real `gantry-agent`
//! processes, registered through their own CLI. When a `Stack` is dropped its processes are
//! killed and its database, queues and keys are removed; if the test failed, the tail of
//! every process log is printed.
//!
//! The binaries are the ones cargo built next to the test executable; when they are missing
//! or older than the test, the harness builds them (`cargo build --bins`) once.

use anyhow::{Context, Result, bail};
use gantry_shared::api::{API_KEY_HEADER, ErrorBody, LogPage, Pool, PoolCreate, Task, TaskCreated};
use gantry_shared::ids::TaskId;
use lapin::{Connection, ConnectionProperties};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::PgPool;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

pub use gantry_dispatcher;
pub use gantry_shared;

pub mod broker;
mod proxies;
pub mod tls;

pub use proxies::{CutProxy, SmtpSink};

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// RabbitMQ's management API, as `.ci/run` enables it: every stack gives its workers broker
/// users of their own unless a test asks for development mode ([`DEV_MODE`]).
pub const MANAGEMENT_URL: &str = "http://guest:guest@127.0.0.1:15672";
/// Extra dispatcher setting for a stack in development mode (shared broker credentials).
pub const DEV_MODE: (&str, &str) = ("GANTRY__AMQP__MANAGEMENT_URL", "");
pub const PG_ADMIN_URL: &str = "postgres://root@127.0.0.1:5432/postgres";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const API_KEY: &str = "API-TEST-0123456789abcdef";

/// Where the binaries live: next to the test executable's `deps` folder, or next to the
/// running binary itself (`gantry-bench` uses this harness too).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn bin(name: &str) -> PathBuf {
    ensure_binaries();
    bin_dir().join(name)
}

fn ensure_binaries() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = bin_dir();
        let stamp = dir.join(".gantry-tests-bins");
        let exe_time = std::fs::metadata(std::env::current_exe().expect("exe"))
            .and_then(|m| m.modified())
            .ok();
        let fresh = [
            "gantry-dispatcher",
            "gantry-agent",
            "gantry",
            "gantry-guard",
        ]
        .iter()
        .all(|b| dir.join(b).exists())
            && std::fs::metadata(&stamp)
                .and_then(|m| m.modified())
                .ok()
                .zip(exe_time)
                .is_some_and(|(s, e)| s >= e);
        if fresh {
            return;
        }
        let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        // The whole workspace, as `cargo nextest run --workspace` and the quick start build
        // it: the same feature set, so nothing is rebuilt back and forth.
        cmd.args(["build", "--workspace", "--bins"]);
        // Into the target directory the binaries are looked for in, whatever CARGO_TARGET_DIR
        // says (a binary such as gantry-bench may run outside cargo).
        if let Some(target) = dir.parent() {
            cmd.arg("--target-dir").arg(target);
        }
        if profile == "release" {
            cmd.arg("--release");
        }
        // `cargo run` and `cargo nextest` describe the package they started in these; a build
        // script that tracks them (ring's does) would see them differ from a build in a plain
        // shell and rebuild, back and forth, on every run.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_BIN_",
                "CARGO_CRATE_",
                "CARGO_PRIMARY_",
            ]
            .iter()
            .any(|p| k.starts_with(p))
                || k == "CARGO_TARGET_TMPDIR"
            {
                cmd.env_remove(k.as_ref());
            }
        }
        let status = cmd
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build for the binaries");
        assert!(status.success(), "building the binaries failed");
        std::fs::write(&stamp, b"").expect("stamp");
    });
}

/// A child process whose output goes to a log file.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> Option<i32> {
        self.child.id().map(|p| p as i32)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Wait for the process to exit, for at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .and_then(|r| r.ok())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Spawn a process with a clean Gantry environment, logging to `log`. Returns it with a
/// receiver of its stdout lines.
async fn spawn(
    name: &str,
    program: &Path,
    args: &[&str],
    env: &[(String, String)],
    cwd: &Path,
    log: PathBuf,
) -> Result<(Proc, tokio::sync::mpsc::UnboundedReceiver<String>)> {
    let mut cmd = Command::new(program);
    cmd.args(args).current_dir(cwd);
    for (k, _) in std::env::vars() {
        if k.starts_with("GANTRY") {
            cmd.env_remove(k);
        }
    }
    cmd.env(
        "RUST_LOG",
        "info,gantry_dispatcher=debug,gantry_agent=debug",
    );
    for (k, v) in env {
        cmd.env(k, v);
    }
    let err_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::from(err_file))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let log2 = log.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log2)
            .await
            .ok();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(f) = file.as_mut() {
                let _ = f.write_all(format!("[stdout] {line}\n").as_bytes()).await;
            }
            let _ = tx.send(line);
        }
    });
    Ok((
        Proc {
            name: name.to_owned(),
            child,
            log,
        },
        rx,
    ))
}

async fn wait_for_line(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    needle: &str,
    limit: Duration,
) -> Result<String> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(line)) if line.contains(needle) => return Ok(line),
            Ok(Some(_)) => continue,
            Ok(None) => bail!("process exited before printing {needle:?}"),
            Err(_) => bail!("no {needle:?} within {limit:?}"),
        }
    }
}

/// An agent process and its home.
pub struct Agent {
    pub name: String,
    pub home: PathBuf,
    pub proc: Option<Proc>,
    pub env: Vec<(String, String)>,
}

/// Options for a new agent.
#[derive(Clone, Debug)]
pub struct AgentOpts {
    pub pools: Vec<String>,
    pub max_concurrent_steps: u32,
    pub env: Vec<(String, String)>,
    /// The agent's `--server` (may list several nodes, comma-separated); default: the
    /// stack's dispatcher.
    pub server: Option<String>,
}

impl Default for AgentOpts {
    fn default() -> Self {
        Self {
            pools: Vec::new(),
            max_concurrent_steps: 4,
            env: Vec::new(),
            server: None,
        }
    }
}

/// A further dispatcher node of a stack.
pub struct Node {
    pub proc: Option<Proc>,
    /// Its base URL, `http://127.0.0.1:PORT`.
    pub url: String,
}

/// One isolated Gantry installation for one test.
pub struct Stack {
    pub ns: String,
    pub db_name: String,
    pub db_url: String,
    pub url: String,
    pub http_bind: String,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    pub dispatcher: Option<Proc>,
    /// More dispatcher nodes on the same database and namespace ([`Stack::start_node`]).
    pub nodes: Vec<Node>,
    pub agents: Vec<Agent>,
    pub extra_env: Vec<(String, String)>,
    db: OnceLock<PgPool>,
    dead_procs: Mutex<Vec<(String, PathBuf)>>,
}

impl Stack {
    /// A new database and namespace, and a dispatcher serving them.
    pub async fn start() -> Result<Self> {
        Self::start_with(Vec::new()).await
    }

    /// As [`Stack::start`], with extra `GANTRY__...` settings for the dispatcher.
    pub async fn start_with(extra_env: Vec<(String, String)>) -> Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let ns = format!("t{}", &id[..12]);
        let db_name = format!("gantry_{ns}");
        let mut stack = Stack {
            db_url: format!("postgres://root@127.0.0.1:5432/{db_name}"),
            ns,
            db_name,
            url: String::new(),
            http_bind: "127.0.0.1:0".into(),
            dir: tempfile::Builder::new().prefix("gantry-test-").tempdir()?,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?,
            dispatcher: None,
            nodes: Vec::new(),
            agents: Vec::new(),
            extra_env,
            db: OnceLock::new(),
            dead_procs: Mutex::new(Vec::new()),
        };
        stack.start_dispatcher().await?;
        Ok(stack)
    }

    pub fn dispatcher_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("GANTRY__NAMESPACE".to_owned(), self.ns.clone()),
            ("GANTRY__POSTGRES__URL".into(), self.db_url.clone()),
            ("GANTRY__POSTGRES__MAX_CONNECTIONS".into(), "8".into()),
            ("GANTRY__AMQP__URL".into(), AMQP_URL.into()),
            ("GANTRY__AMQP__MANAGEMENT_URL".into(), MANAGEMENT_URL.into()),
            ("GANTRY__REDIS__URL".into(), REDIS_URL.into()),
            ("GANTRY__HTTP__BIND".into(), self.http_bind.clone()),
            ("GANTRY__API__BOOTSTRAP_KEY".into(), API_KEY.into()),
            ("GANTRY__DISPATCHER__SWEEP_INTERVAL_SECS".into(), "1".into()),
            ("GANTRY__DISPATCHER__RETRY_BACKOFF_MS".into(), "200".into()),
            // The generated secrets key (no secrets.key) lands in the stack's own directory,
            // shared by its nodes and restarts, never in the home of the user running tests.
            (
                "XDG_STATE_HOME".into(),
                self.dir.path().join("state").display().to_string(),
            ),
        ];
        env.extend(self.extra_env.clone());
        env
    }

    /// Start (or restart) the dispatcher. A restart binds the same port as before.
    pub async fn start_dispatcher(&mut self) -> Result<()> {
        let n = self.dead_procs.lock().expect("lock").len();
        let log = self.dir.path().join(format!("dispatcher-{n}.log"));
        let (proc, mut rx) = spawn(
            "dispatcher",
            &bin("gantry-dispatcher"),
            &["serve"],
            &self.dispatcher_env(),
            self.dir.path(),
            log,
        )
        .await?;
        let line =
            match wait_for_line(&mut rx, "listening on http://", Duration::from_secs(60)).await {
                Ok(l) => l,
                Err(e) => {
                    let text = proc.log_text();
                    bail!("dispatcher did not start: {e}\n{text}");
                }
            };
        let addr = line
            .rsplit("http://")
            .next()
            .expect("address")
            .trim()
            .to_owned();
        self.url = format!("http://{addr}");
        self.http_bind = addr;
        self.dispatcher = Some(proc);
        // Ready means PostgreSQL, RabbitMQ (with the topology declared) and Redis answer.
        let health = format!("{}/api/health", self.url);
        eventually(Duration::from_secs(30), "dispatcher healthy", || async {
            let r = self.http.get(&health).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await?;
        Ok(())
    }

    /// Start another dispatcher node of this stack (same database, namespace and services, its
    /// own port and log), with extra `GANTRY__...` settings; returns its index in `nodes`.
    pub async fn start_node(&mut self, extra_env: Vec<(String, String)>) -> Result<usize> {
        let idx = self.nodes.len();
        let log = self
            .dir
            .path()
            .join(format!("dispatcher-node{}.log", idx + 1));
        let mut env = self.dispatcher_env();
        env.retain(|(k, _)| k != "GANTRY__HTTP__BIND");
        env.push(("GANTRY__HTTP__BIND".into(), "127.0.0.1:0".into()));
        env.extend(extra_env);
        let (proc, mut rx) = spawn(
            &format!("dispatcher node {}", idx + 1),
            &bin("gantry-dispatcher"),
            &["serve"],
            &env,
            self.dir.path(),
            log,
        )
        .await?;
        let line =
            match wait_for_line(&mut rx, "listening on http://", Duration::from_secs(60)).await {
                Ok(l) => l,
                Err(e) => bail!("dispatcher node did not start: {e}\n{}", proc.log_text()),
            };
        let addr = line.rsplit("http://").next().expect("address").trim();
        let url = format!("http://{addr}");
        let health = format!("{url}/api/health");
        eventually(
            Duration::from_secs(30),
            "dispatcher node healthy",
            || async {
                let r = self.http.get(&health).send().await.ok()?;
                (r.status() == 200).then_some(())
            },
        )
        .await?;
        self.nodes.push(Node {
            proc: Some(proc),
            url,
        });
        Ok(idx)
    }

    /// Kill a node started by [`Stack::start_node`] with SIGKILL.
    pub async fn kill_node(&mut self, idx: usize) {
        if let Some(mut p) = self.nodes[idx].proc.take() {
            p.kill().await;
            self.dead_procs
                .lock()
                .expect("lock")
                .push((p.name.clone(), p.log.clone()));
        }
    }

    /// Kill the dispatcher with SIGKILL (no graceful shutdown).
    pub async fn kill_dispatcher(&mut self) {
        if let Some(mut p) = self.dispatcher.take() {
            p.kill().await;
            self.dead_procs
                .lock()
                .expect("lock")
                .push((p.name.clone(), p.log.clone()));
        }
    }

    /// This stack's database.
    pub async fn db(&self) -> PgPool {
        if let Some(p) = self.db.get() {
            return p.clone();
        }
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.db_url)
            .await
            .expect("test database");
        let _ = self.db.set(pool);
        self.db.get().expect("set").clone()
    }

    /// A connection as the broker's administrator (`guest`), for a test's own look around.
    pub async fn amqp(&self) -> Connection {
        Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .expect("RabbitMQ")
    }

    pub fn topology(&self) -> gantry_shared::topology::Topology {
        gantry_shared::topology::Topology::new(&self.ns)
    }

    // ---- HTTP ----

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(k) = key {
            req = req.header(API_KEY_HEADER, k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let json = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
        };
        Ok((status, json))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let (status, body) = self
            .request(reqwest::Method::GET, path, Some(API_KEY), None)
            .await?;
        if status != 200 {
            bail!("GET {path}: {status} {body}");
        }
        Ok(serde_json::from_value(body)?)
    }

    /// Create an API key with these permissions (`"TaskView"`, ...); the key itself.
    pub async fn create_key(&self, name: &str, permissions: &[&str]) -> Result<String> {
        let created: gantry_shared::api::ApiKeyCreated = self
            .post(
                "/api/keys",
                &serde_json::json!({ "name": name, "permissions": permissions }),
            )
            .await?;
        Ok(created.key)
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let (status, body) = self
            .request(
                reqwest::Method::POST,
                path,
                Some(API_KEY),
                Some(serde_json::to_value(body)?),
            )
            .await?;
        if !(200..300).contains(&status) {
            let err: Option<ErrorBody> = serde_json::from_value(body.clone()).ok();
            bail!("POST {path}: {status} {err:?} {body}");
        }
        Ok(serde_json::from_value(body)?)
    }

    pub async fn add_pool(&self, name: &str) -> Result<Pool> {
        self.post(
            "/api/pools",
            &PoolCreate {
                name: name.into(),
                description: None,
                is_default: false,
            },
        )
        .await
    }

    /// Submit a process given as TOML.
    pub async fn submit(&self, process_toml: &str) -> Result<TaskId> {
        let body =
            gantry_dispatcher::cli::process_json(process_toml).map_err(anyhow::Error::msg)?;
        let created: TaskCreated = self.post("/api/tasks", &body).await?;
        Ok(created.id)
    }

    pub async fn task(&self, id: TaskId) -> Result<Task> {
        self.get(&format!("/api/tasks/{id}")).await
    }

    /// Wait until the task has ended.
    pub async fn wait_task(&self, id: TaskId, limit: Duration) -> Result<Task> {
        let deadline = Instant::now() + limit;
        loop {
            let t = self.task(id).await;
            if let Ok(t) = &t
                && matches!(t.summary.state.as_str(), "Success" | "Failed" | "Cancelled")
            {
                return Ok(t.clone());
            }
            if Instant::now() > deadline {
                bail!("task {id} did not end within {limit:?}: {t:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until `check` holds for the task.
    pub async fn wait_task_until(
        &self,
        id: TaskId,
        limit: Duration,
        check: impl Fn(&Task) -> bool,
    ) -> Result<Task> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(t) = self.task(id).await
                && check(&t)
            {
                return Ok(t);
            }
            if Instant::now() > deadline {
                bail!("condition on task {id} not met within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every line of a task's log through the API, in order.
    pub async fn log(&self, id: TaskId) -> Result<Vec<gantry_shared::api::LogEntry>> {
        let mut all = Vec::new();
        let mut after = String::new();
        loop {
            let page: LogPage = self
                .get(&format!("/api/tasks/{id}/log?after={after}&limit=100000"))
                .await?;
            if page.lines.is_empty() {
                return Ok(all);
            }
            after = page.next.clone();
            all.extend(page.lines);
        }
    }

    // ---- agents ----

    /// Register an agent through its CLI and start it; returns its index.
    pub async fn add_agent(&mut self, name: &str, opts: AgentOpts) -> Result<usize> {
        let agent = self.register_agent(name, &opts).await?;
        self.agents.push(agent);
        let idx = self.agents.len() - 1;
        self.start_agent(idx).await?;
        Ok(idx)
    }

    /// Register and start several agents, up to `concurrency` at a time, and wait until the
    /// dispatcher has a heartbeat from each; returns their indexes. An agent that started is
    /// kept (and killed with the stack) even when another one failed.
    pub async fn add_agents(
        &mut self,
        names: &[String],
        opts: AgentOpts,
        concurrency: usize,
    ) -> Result<Vec<usize>> {
        use futures::{StreamExt, TryStreamExt};
        let concurrency = concurrency.max(1);
        let registered: Vec<Agent> = futures::stream::iter(names)
            .map(|n| self.register_agent(n, &opts))
            .buffered(concurrency)
            .try_collect()
            .await?;
        let first = self.agents.len();
        self.agents.extend(registered);
        let idxs: Vec<usize> = (first..self.agents.len()).collect();
        let started: Vec<Result<Proc>> = futures::stream::iter(&idxs)
            .map(|&i| self.launch_agent(i))
            .buffered(concurrency)
            .collect()
            .await;
        let mut failed = None;
        for (&i, p) in idxs.iter().zip(started) {
            match p {
                Ok(p) => self.agents[i].proc = Some(p),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.wait_heartbeats(
            &names,
            Duration::from_secs(15) + Duration::from_millis(50) * names.len() as u32,
        )
        .await?;
        Ok(idxs)
    }

    /// Register an agent through its CLI, without starting it.
    async fn register_agent(&self, name: &str, opts: &AgentOpts) -> Result<Agent> {
        let home = self.dir.path().join(format!("agent-{name}"));
        std::fs::create_dir_all(&home)?;
        let mut args: Vec<String> = vec![
            "--home".into(),
            home.display().to_string(),
            "register".into(),
            "--server".into(),
            opts.server.clone().unwrap_or_else(|| self.url.clone()),
            "--api-key".into(),
            API_KEY.into(),
            "--name".into(),
            name.into(),
            "--max-concurrent-steps".into(),
            opts.max_concurrent_steps.to_string(),
        ];
        for p in &opts.pools {
            args.push("--pool".into());
            args.push(p.clone());
        }
        let out = Command::new(bin("gantry-agent"))
            .args(&args)
            .current_dir(self.dir.path())
            .env_remove("GANTRY_SERVER")
            .env_remove("GANTRY_API_KEY")
            // What the agent is configured with (its CA, say) applies to its registration too.
            .envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .kill_on_drop(true)
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "registering agent {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut env = vec![
            ("GANTRY__AMQP__URL".to_owned(), AMQP_URL.to_owned()),
            ("GANTRY__AGENT__HEARTBEAT_SECS".into(), "1".into()),
        ];
        env.extend(opts.env.clone());
        Ok(Agent {
            name: name.into(),
            home,
            proc: None,
            env,
        })
    }

    /// (Re)start a registered agent and wait until it runs.
    pub async fn start_agent(&mut self, idx: usize) -> Result<()> {
        let proc = self.launch_agent(idx).await?;
        self.agents[idx].proc = Some(proc);
        // Its first heartbeat makes it available to the orchestrator.
        let name = self.agents[idx].name.clone();
        if let Err(e) = self
            .wait_heartbeats(&[&name], Duration::from_secs(15))
            .await
        {
            bail!("{e}\n{}", self.agent(idx).log_text());
        }
        Ok(())
    }

    /// Start a registered agent's process and wait until it says it runs.
    async fn launch_agent(&self, idx: usize) -> Result<Proc> {
        let Agent {
            name, home, env, ..
        } = &self.agents[idx];
        let n = self.dead_procs.lock().expect("lock").len();
        let log = self.dir.path().join(format!("agent-{name}-{n}.log"));
        let home_s = home.display().to_string();
        let (proc, mut rx) = spawn(
            &format!("agent {name}"),
            &bin("gantry-agent"),
            &["--home", &home_s, "run"],
            env,
            self.dir.path(),
            log,
        )
        .await?;
        if let Err(e) = wait_for_line(&mut rx, "running", Duration::from_secs(30)).await {
            bail!("agent {name} did not start: {e}\n{}", proc.log_text());
        }
        Ok(proc)
    }

    /// Wait until the dispatcher lists every named worker as available, i.e. it had a
    /// heartbeat from each.
    pub async fn wait_heartbeats(&self, names: &[&str], limit: Duration) -> Result<()> {
        use gantry_shared::api::Worker;
        let missing = |workers: &[Worker]| -> Vec<String> {
            names
                .iter()
                .filter(|n| {
                    !workers
                        .iter()
                        .any(|w| w.name == **n && w.health != "Unavailable")
                })
                .map(|n| n.to_string())
                .collect()
        };
        let seen = eventually(limit, "agent heartbeat", || async {
            let workers: Vec<Worker> = self.get("/api/workers").await.ok()?;
            missing(&workers).is_empty().then_some(())
        })
        .await;
        if let Err(e) = seen {
            let workers: Vec<Worker> = self.get("/api/workers").await.unwrap_or_default();
            let missing = missing(&workers);
            let shown = missing
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            let more = if missing.len() > 10 { ", ..." } else { "" };
            bail!(
                "{} of {} agents sent no heartbeat ({shown}{more}): {e}",
                missing.len(),
                names.len(),
            );
        }
        Ok(())
    }

    pub fn agent(&self, idx: usize) -> &Proc {
        self.agents[idx].proc.as_ref().expect("agent running")
    }

    /// Kill an agent with SIGKILL.
    pub async fn kill_agent(&mut self, idx: usize) {
        if let Some(mut p) = self.agents[idx].proc.take() {
            p.kill().await;
            self.dead_procs
                .lock()
                .expect("lock")
                .push((p.name.clone(), p.log.clone()));
        }
    }

    /// Every log file of this stack, concatenated with headers (for assertions and failures).
    pub fn all_logs(&self) -> String {
        let mut out = String::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "log"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        for f in files {
            out.push_str(&format!("===== {} =====\n", f.display()));
            out.push_str(&std::fs::read_to_string(&f).unwrap_or_default());
        }
        out
    }
}

/// What is left to remove once a test is over.
struct Leftovers {
    ns: String,
    db_name: String,
    db_url: String,
}

impl Leftovers {
    /// Names of the queues the stack may have created.
    async fn queue_names(&self) -> Vec<String> {
        let t = gantry_shared::topology::Topology::new(&self.ns);
        let mut names = vec![
            t.results_queue(),
            t.server_queue(),
            t.dead_queue(),
            t.heartbeats_queue(),
        ];
        if let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&self.db_url)
            .await
        {
            let slugs: Vec<String> = sqlx::query_scalar("SELECT slug FROM pools")
                .fetch_all(&pool)
                .await
                .unwrap_or_default();
            names.extend(slugs.iter().map(|s| t.pool_queue(s)));
            let workers: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM workers")
                .fetch_all(&pool)
                .await
                .unwrap_or_default();
            names.extend(workers.iter().map(|w| t.worker_queue(w)));
            names.extend(workers.iter().map(|w| t.control_queue(w)));
            pool.close().await;
        }
        names
    }

    /// Delete the broker users the stack's dispatcher created (`<ns>.worker.*`), and every
    /// queue and exchange of its namespace that the broker lists (whatever database the test
    /// pointed the dispatcher at, and whatever it declared after the first cleanup pass).
    async fn remove_broker_leftovers(&self) {
        let http = reqwest::Client::new();
        let list = |what: &'static str| {
            let http = http.clone();
            async move {
                let resp = http
                    .get(format!("http://127.0.0.1:15672/api/{what}"))
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await
                    .ok()?;
                resp.json::<Vec<serde_json::Value>>().await.ok()
            }
        };
        let names = |rows: Option<Vec<serde_json::Value>>, prefix: &str| -> Vec<String> {
            rows.unwrap_or_default()
                .iter()
                .filter_map(|r| r["name"].as_str())
                .filter(|n| n.starts_with(prefix))
                .map(str::to_owned)
                .collect()
        };
        let users = names(list("users").await, &format!("{}.worker.", self.ns));
        let queues = names(list("queues/%2F").await, &format!("{}.", self.ns));
        let exchanges = names(list("exchanges/%2F").await, &format!("{}.", self.ns));
        for (kind, items) in [
            ("users", users),
            ("queues/%2F", queues),
            ("exchanges/%2F", exchanges),
        ] {
            for name in items {
                let _ = http
                    .delete(format!("http://127.0.0.1:15672/api/{kind}/{name}"))
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await;
            }
        }
    }

    async fn remove(self) {
        let queues = self.queue_names().await;
        if let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
            let t = gantry_shared::topology::Topology::new(&self.ns);
            for q in queues {
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch
                        .queue_delete(q.into(), lapin::options::QueueDeleteOptions::default())
                        .await;
                }
            }
            for ex in [
                t.jobs_exchange(),
                t.control_exchange(),
                t.dead_exchange(),
                t.results_exchange(),
                t.heartbeats_exchange(),
            ] {
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch
                        .exchange_delete(
                            ex.into(),
                            lapin::options::ExchangeDeleteOptions::default(),
                        )
                        .await;
                }
            }
            let _ = conn.close(200, "test cleanup".into()).await;
        }
        self.remove_broker_leftovers().await;
        if let Ok(client) = redis::Client::open(REDIS_URL)
            && let Ok(mut c) = client.get_multiplexed_async_connection().await
        {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}.*", self.ns))
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> =
                    redis::cmd("DEL").arg(keys).query_async(&mut c).await;
            }
        }
        if let Ok(admin) = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(PG_ADMIN_URL)
            .await
        {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.db_name
            ))
            .execute(&admin)
            .await;
            admin.close().await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.all_logs();
            let lines: Vec<&str> = logs.lines().collect();
            let start = lines.len().saturating_sub(400);
            eprintln!(
                "---- logs of stack {} (last 400 lines) ----\n{}",
                self.ns,
                lines[start..].join("\n")
            );
        }
        // Kill synchronously: a tokio child can only be awaited on the runtime that spawned
        // it, and that runtime is blocked in this Drop. The runtime reaps them later.
        let procs = self
            .dispatcher
            .iter()
            .chain(self.nodes.iter().filter_map(|n| n.proc.as_ref()))
            .chain(self.agents.iter().filter_map(|a| a.proc.as_ref()));
        for p in procs {
            p.signal(nix::sys::signal::Signal::SIGKILL);
        }
        if std::env::var_os("GANTRY_TEST_KEEP").is_some() {
            // Keep everything for a post-mortem: the logs, the database, the queues.
            let dir = std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("a placeholder tempdir"),
            );
            eprintln!(
                "GANTRY_TEST_KEEP: kept {} and database {}",
                dir.keep().display(),
                self.db_name
            );
            return;
        }
        let left = Leftovers {
            ns: self.ns.clone(),
            db_name: self.db_name.clone(),
            db_url: self.db_url.clone(),
        };
        // Drop cannot await, and the test's runtime may be shutting down: clean up on a
        // thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(left.remove());
        })
        .join();
    }
}

/// Poll `check` until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The largest number of intervals open at the same moment.
pub fn max_overlap(
    intervals: &[(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)],
) -> usize {
    let mut points: Vec<(chrono::DateTime<chrono::Utc>, i32)> = Vec::new();
    for (a, b) in intervals {
        points.push((*a, 1));
        points.push((*b, -1));
    }
    // Ends sort before starts at the same instant: touching intervals do not overlap.
    points.sort_by(|x, y| x.0.cmp(&y.0).then(x.1.cmp(&y.1)));
    let mut cur = 0;
    let mut best = 0;
    for (_, d) in points {
        cur += d;
        best = best.max(cur);
    }
    best as usize
}
