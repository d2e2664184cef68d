//! A child process of the harness (a dispatcher, an agent, a proxy), its log file and its
//! stdout lines.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

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
pub(crate) async fn spawn(
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

pub(crate) async fn wait_for_line(
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
