//! # Health checks
//!
//! On every heartbeat interval of the machine policy the agent judges its own health and
//! reports the verdict in its heartbeats:
//!
//! - the built-in check: less free disk than the policy's `min_free_disk_mb` in the work
//!   directory is a warning (`HasWarnings`);
//! - the policy's optional bash script, with these functions defined for it, as in Octopus:
//!   `echo_warning MSG` (`HasWarnings`), `echo_error MSG` (`Unhealthy`), and
//!   `fail_healthcheck MSG` (`Unhealthy`, and the script stops). A non-zero exit code, or a
//!   script still running after [`SCRIPT_TIMEOUT`], is `Unhealthy` too.
//!
//! The worst finding wins. While `Unhealthy` the agent takes no new steps (running ones go
//! on); the dispatcher also refuses its claims.
//!
//! The script is user code like a step's: it runs as the user steps run as
//! (`agent.step_user`, the built-in worker's `builtin_worker.user`), or with
//! `agent.step_uid_range` as a uid of the range of its own, taken like a step's (waiting
//! while running steps hold every one) and given back, every process left under it killed,
//! when the script ends. Its environment is built from scratch (`gantry_shared::stepenv`),
//! never the agent's own.

use crate::slots::Slots;
use crate::step_users::StepUsers;
use gantry_shared::api::MachinePolicy;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A health-check script still running after this long makes the worker `Unhealthy`.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);

const MARK: &str = "##gantry-health ";

/// Defined for the health-check script, like Octopus's bash helpers.
const PRELUDE: &str = r#"echo_warning() { printf '##gantry-health warning %s\n' "$*"; }
echo_error() { printf '##gantry-health error %s\n' "$*"; }
fail_healthcheck() { printf '##gantry-health fail %s\n' "$*"; exit 1; }
"#;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Healthy,
    HasWarnings,
    Unhealthy,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Healthy => "Healthy",
            Level::HasWarnings => "HasWarnings",
            Level::Unhealthy => "Unhealthy",
        }
    }
}

/// A health check's result: the level and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub level: Level,
    pub reasons: Vec<String>,
}

impl Verdict {
    pub fn healthy() -> Self {
        Self {
            level: Level::Healthy,
            reasons: Vec::new(),
        }
    }
    fn add(&mut self, level: Level, reason: String) {
        self.level = self.level.max(level);
        self.reasons.push(reason);
    }
    pub fn reason(&self) -> Option<String> {
        (!self.reasons.is_empty()).then(|| self.reasons.join("; "))
    }
}

/// The latest verdict, read by the heartbeats.
pub type Shared = Arc<Mutex<Verdict>>;

/// Free bytes for unprivileged users on the file system holding `path`.
pub fn disk_free_bytes(path: &Path) -> Option<u64> {
    nix::sys::statvfs::statvfs(path)
        .ok()
        .map(|s| s.blocks_available() * s.fragment_size())
}

/// Run every check once; the script as a user of `users` (see the module's doc).
pub async fn check(policy: &MachinePolicy, work_root: &Path, users: &StepUsers) -> Verdict {
    let mut v = Verdict::healthy();
    if policy.min_free_disk_mb > 0
        && let Some(free) = disk_free_bytes(work_root)
    {
        let min = policy.min_free_disk_mb.saturating_mul(1024 * 1024);
        if free < min {
            v.add(
                Level::HasWarnings,
                format!(
                    "only {:.1} GB free in {} (the policy warns under {:.1} GB)",
                    free as f64 / 1e9,
                    work_root.display(),
                    min as f64 / 1e9
                ),
            );
        }
    }
    if let Some(script) = policy
        .health_check_script
        .as_deref()
        .filter(|s| !s.trim().is_empty())
    {
        let user = loop {
            match users.for_health() {
                Ok(u) => break u,
                // Every uid of the range is held by a running step: wait for one to end.
                Err(_) => tokio::time::sleep(UID_WAIT).await,
            }
        };
        run_script(script, work_root, user.run_as.as_ref(), &mut v).await;
        // Giving a uid back kills what is left under it (reads /proc).
        let _ = tokio::task::spawn_blocking(move || drop(user)).await;
    }
    v
}

/// How often a check waiting for a free uid of the range looks again.
const UID_WAIT: Duration = Duration::from_millis(500);

async fn run_script(
    script: &str,
    dir: &Path,
    run_as: Option<&crate::runner::RunAs>,
    v: &mut Verdict,
) {
    let mut cmd = tokio::process::Command::new("bash");
    cmd.arg("--noprofile")
        .arg("--norc")
        .arg("-c")
        .arg(format!("{PRELUDE}{script}"))
        .env_clear()
        .envs(gantry_shared::stepenv::base(
            std::env::vars_os(),
            run_as.map(|u| gantry_shared::stepenv::User {
                name: &u.name,
                home: &u.home,
            }),
        ))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .process_group(0);
    match run_as {
        Some(u) => {
            // Its own home, or `/`: the agent's work directory is not the step user's.
            let home = if u.home.is_dir() {
                u.home.as_path()
            } else {
                Path::new("/")
            };
            cmd.uid(u.uid).gid(u.gid).current_dir(home);
        }
        None => {
            cmd.current_dir(dir);
        }
    }
    let out = match tokio::time::timeout(SCRIPT_TIMEOUT, cmd.output()).await {
        Err(_) => {
            v.add(
                Level::Unhealthy,
                format!(
                    "the health-check script ran longer than {} s",
                    SCRIPT_TIMEOUT.as_secs()
                ),
            );
            return;
        }
        Ok(Err(e)) => {
            v.add(
                Level::Unhealthy,
                format!("the health-check script could not start: {e}"),
            );
            return;
        }
        Ok(Ok(out)) => out,
    };
    let mut failed = false;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(rest) = line.strip_prefix(MARK) else {
            continue;
        };
        let (kind, msg) = rest.split_once(' ').unwrap_or((rest, ""));
        let msg = msg.trim().to_owned();
        match kind {
            "warning" => v.add(Level::HasWarnings, msg),
            "error" => v.add(Level::Unhealthy, msg),
            "fail" => {
                failed = true;
                v.add(
                    Level::Unhealthy,
                    if msg.is_empty() {
                        "fail_healthcheck".into()
                    } else {
                        msg
                    },
                )
            }
            _ => {}
        }
    }
    if !out.status.success() && !failed {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        let code = out
            .status
            .code()
            .map(|c| c.to_string())
            .unwrap_or_else(|| "a signal".into());
        v.add(
            Level::Unhealthy,
            match last {
                Some(l) => format!("the health-check script exited with {code}: {}", l.trim()),
                None => format!("the health-check script exited with {code}"),
            },
        );
    }
}

/// How often to beat and check: the agent's own override, else the policy's interval.
pub fn interval(policy: &MachinePolicy, override_secs: Option<u64>) -> Duration {
    Duration::from_secs(
        override_secs
            .unwrap_or(u64::from(policy.heartbeat_interval_secs))
            .max(1),
    )
}

/// Check on every interval, publish the verdict to `shared`, pause the slots while
/// `Unhealthy`. A script that outlasts the interval delays the next check, never overlaps it.
pub async fn run(
    mut policy: watch::Receiver<MachinePolicy>,
    override_secs: Option<u64>,
    work_root: PathBuf,
    users: Arc<StepUsers>,
    slots: Arc<Slots>,
    shared: Shared,
    cancel: CancellationToken,
) {
    // The caller judged once at start.
    let mut current = policy.borrow_and_update().clone();
    tokio::select! {
        _ = tokio::time::sleep(interval(&current, override_secs)) => {}
        r = policy.changed() => if r.is_err() { return },
        _ = cancel.cancelled() => return,
    }
    loop {
        current = policy.borrow_and_update().clone();
        let verdict = tokio::select! {
            v = check(&current, &work_root, &users) => v,
            _ = cancel.cancelled() => return,
        };
        let changed = {
            let mut s = shared.lock().expect("health lock");
            let changed = *s != verdict;
            *s = verdict.clone();
            changed
        };
        if changed {
            match verdict.level {
                Level::Healthy => tracing::info!("health check: Healthy"),
                level => tracing::warn!(
                    health = level.as_str(),
                    reason = verdict.reason().unwrap_or_default(),
                    "health check"
                ),
            }
            slots.set_unhealthy(verdict.level == Level::Unhealthy);
        }
        tokio::select! {
            _ = tokio::time::sleep(interval(&current, override_secs)) => {}
            // A new policy is checked at once.
            r = policy.changed() => if r.is_err() { return },
            _ = cancel.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(script: &str) -> MachinePolicy {
        MachinePolicy {
            health_check_script: Some(script.into()),
            min_free_disk_mb: 0,
            ..MachinePolicy::default()
        }
    }

    async fn judge(script: &str) -> Verdict {
        check(
            &policy(script),
            &std::env::temp_dir(),
            &StepUsers::Fixed(None),
        )
        .await
    }

    #[tokio::test]
    async fn scripts_report_with_the_octopus_helpers_and_exit_codes() {
        assert_eq!(judge("true").await, Verdict::healthy());
        let v = judge("echo_warning 'disk is slow'; echo fine").await;
        assert_eq!(v.level, Level::HasWarnings);
        assert_eq!(v.reason().as_deref(), Some("disk is slow"));
        let v = judge("echo_warning a; echo_error 'db unreachable'").await;
        assert_eq!(v.level, Level::Unhealthy);
        assert_eq!(v.reason().as_deref(), Some("a; db unreachable"));
        let v = judge("fail_healthcheck 'no docker'; echo_warning never").await;
        assert_eq!(v.level, Level::Unhealthy);
        assert_eq!(v.reason().as_deref(), Some("no docker"));
        let v = judge("echo oops >&2; exit 3").await;
        assert_eq!(v.level, Level::Unhealthy);
        assert_eq!(
            v.reason().as_deref(),
            Some("the health-check script exited with 3: oops")
        );
    }

    #[tokio::test]
    async fn low_disk_is_a_warning_by_default() {
        let p = MachinePolicy {
            min_free_disk_mb: u64::MAX / (2 * 1024 * 1024),
            ..MachinePolicy::default()
        };
        let v = check(&p, &std::env::temp_dir(), &StepUsers::Fixed(None)).await;
        assert_eq!(v.level, Level::HasWarnings);
        assert!(v.reason().unwrap().contains("free in"), "{v:?}");
        assert_eq!(
            MachinePolicy::default().min_free_disk_mb,
            5 * 1024,
            "5 GB by default"
        );
    }
}
