//! [`Stack`]: one isolated Gantry installation (database, namespace, dispatcher nodes) and
//! the ways to start, kill and look into its dispatchers.

use crate::{AMQP_URL, API_KEY, Agent, MANAGEMENT_URL, Proc, REDIS_URL, bin, eventually};
use crate::{spawn, wait_for_line};
use anyhow::{Result, bail};
use lapin::{Connection, ConnectionProperties};
use sqlx::PgPool;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

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
    pub(crate) db: OnceLock<PgPool>,
    pub(crate) dead_procs: Mutex<Vec<(String, PathBuf)>>,
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

    /// The number of messages ready in a queue (a passive declare, as the broker's
    /// administrator); an error if the queue does not exist.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32> {
        let conn = self.amqp().await;
        let ch = conn.create_channel().await?;
        let q = ch
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await;
        let _ = conn.close(200, "done".into()).await;
        Ok(q?.message_count())
    }

    /// Let step users (other uids than the one running the tests) pass through the stack's
    /// directory, a 0700 tempdir, to the agents' work roots; listing it stays refused.
    pub fn open_dir_for_step_users(&self) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod the stack's directory");
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
