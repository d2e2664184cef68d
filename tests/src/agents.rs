//! Agents of a stack: real `gantry-agent` processes, registered through their own CLI.

use crate::{AMQP_URL, API_KEY, Proc, Stack, bin, eventually};
use crate::{spawn, wait_for_line};
use anyhow::{Result, bail};
use std::path::PathBuf;
use std::time::Duration;
use tokio::process::Command;

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

impl Stack {
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
}
