//! # Who a step runs as
//!
//! Three ways, chosen at the agent's start:
//!
//! - as the agent's own user (the default; the built-in worker's `builtin_worker.user` is one
//!   fixed user too);
//! - `agent.step_user = "NAME"`: every step as that OS user, so no step can read what belongs
//!   to the agent (its `identity.json`, its working files), but concurrent steps share it;
//! - `agent.step_uid_range = "61000-61999"`: every running step gets a uid of its own from
//!   the range (and the gid of the same number), freed when the step ends; concurrent steps
//!   cannot read each other's files, scripts or `/proc/<pid>/environ`. Such a uid has no
//!   account: `HOME` is the step's working directory, `USER` and `LOGNAME` are
//!   `gantry-step-<uid>`.
//!
//! A health-check script runs as the fixed user, or as a uid of the range of its own
//! ([`StepUsers::for_health`]).
//!
//! Both settings need the agent to run as root ([`from_settings`] refuses otherwise). Uids
//! are handed out in turn, so the one a step just gave back is the last to be used again;
//! a uid or gid that has an account or group on the machine is skipped. When a step ends,
//! every process still running under its uid (a `setsid` helper, say) is killed before the
//! uid is freed, and at the agent's start every process under a uid of the range is killed
//! (leftovers of an agent that was killed): each agent on a machine needs a range of its own.

use gantry_shared::config::{ConfigError, Settings};
use gantry_shared::uid_range::UidRange;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// An OS user that scripts run as.
#[derive(Clone, Debug)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// This process's effective user id.
pub fn effective_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

impl RunAs {
    /// Look a user up by name.
    pub fn lookup(name: &str) -> Result<Self, String> {
        match nix::unistd::User::from_name(name) {
            Ok(Some(u)) => Ok(Self {
                name: u.name,
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
                home: u.dir,
            }),
            Ok(None) => Err(format!("there is no OS user {name:?}")),
            Err(e) => Err(format!("cannot look up OS user {name:?}: {e}")),
        }
    }
}

/// The name a step with a uid from the range runs under.
pub fn synthetic_name(uid: u32) -> String {
    format!("gantry-step-{uid}")
}

/// How this agent's steps get their OS user.
#[derive(Debug)]
pub enum StepUsers {
    /// All as the agent's own user (`None`) or as one fixed user.
    Fixed(Option<RunAs>),
    /// Each running step a uid of its own.
    Range(Arc<UidPool>),
}

impl StepUsers {
    /// Whether steps run as a user other than the agent's (so what they need of the work root
    /// must be reachable by others).
    pub fn other_users(&self) -> bool {
        match self {
            Self::Fixed(u) => u.is_some(),
            Self::Range(_) => true,
        }
    }

    /// The user for one step whose working directory is `work_dir`; `Err` if no uid of the
    /// range is free.
    pub fn for_step(&self, work_dir: &Path) -> Result<StepUser, String> {
        match self {
            Self::Fixed(u) => Ok(StepUser {
                run_as: u.clone(),
                lease: None,
            }),
            Self::Range(pool) => {
                let uid = pool.acquire()?;
                Ok(StepUser {
                    run_as: Some(RunAs {
                        name: synthetic_name(uid),
                        uid,
                        gid: uid,
                        home: work_dir.to_path_buf(),
                    }),
                    lease: Some(UidLease {
                        pool: pool.clone(),
                        uid,
                    }),
                })
            }
        }
    }

    /// The user a health-check script runs as: the fixed one, or a uid of the range of its
    /// own whose home is `/`; `Err` while running steps hold every uid.
    pub fn for_health(&self) -> Result<StepUser, String> {
        self.for_step(Path::new("/"))
    }

    /// Refuse a range too narrow for the agent's concurrency.
    pub fn check_capacity(&self, max_concurrent_steps: u32) -> Result<(), ConfigError> {
        if let Self::Range(pool) = self
            && pool.range.len() < u64::from(max_concurrent_steps)
        {
            return Err(ConfigError {
                key: Some("agent.step_uid_range".into()),
                message: format!(
                    "{} holds {} uids, fewer than this worker's max_concurrent_steps ({max_concurrent_steps}): every running step needs a uid of its own",
                    pool.range,
                    pool.range.len()
                ),
            });
        }
        Ok(())
    }
}

/// The users of a registered agent, from `agent.step_user` / `agent.step_uid_range`; `None`
/// of both is the agent's own user. A setting the agent cannot honour is a [`ConfigError`]
/// (exit 64).
pub fn from_settings(settings: &Settings) -> Result<StepUsers, ConfigError> {
    let euid = effective_uid();
    let need_root = |key: &str| ConfigError {
        key: Some(key.into()),
        message: format!(
            "running steps as other users needs the agent to run as root, and it runs as uid {euid}"
        ),
    };
    if let Some(name) = &settings.agent.step_user {
        if euid != 0 {
            return Err(need_root("agent.step_user"));
        }
        let user = RunAs::lookup(name).map_err(|message| ConfigError {
            key: Some("agent.step_user".into()),
            message,
        })?;
        if user.uid == 0 {
            return Err(ConfigError {
                key: Some("agent.step_user".into()),
                message: format!("{name} is root (uid 0): steps would run as the agent's own user"),
            });
        }
        return Ok(StepUsers::Fixed(Some(user)));
    }
    if let Some(range) = settings.step_uid_range() {
        if euid != 0 {
            return Err(need_root("agent.step_uid_range"));
        }
        let killed = kill_processes(|uid| range.contains(uid));
        if killed > 0 {
            tracing::warn!(
                killed,
                range = %range,
                "killed processes left running under agent.step_uid_range by an earlier run"
            );
        }
        return Ok(StepUsers::Range(Arc::new(UidPool::new(range))));
    }
    Ok(StepUsers::Fixed(None))
}

/// The uids of a range and which are in use.
#[derive(Debug)]
pub struct UidPool {
    range: UidRange,
    state: Mutex<PoolState>,
}

#[derive(Debug)]
struct PoolState {
    used: BTreeSet<u32>,
    /// Where the next search starts.
    next: u32,
}

impl UidPool {
    pub fn new(range: UidRange) -> Self {
        Self {
            range,
            state: Mutex::new(PoolState {
                used: BTreeSet::new(),
                next: range.start,
            }),
        }
    }

    /// Uids in use now.
    pub fn in_use(&self) -> usize {
        self.state.lock().map(|s| s.used.len()).unwrap_or(0)
    }

    fn acquire(&self) -> Result<u32, String> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| "the uid pool is unusable".to_string())?;
        let mut uid = st.next;
        for _ in 0..self.range.len() {
            let candidate = uid;
            uid = if candidate >= self.range.end {
                self.range.start
            } else {
                candidate + 1
            };
            if st.used.contains(&candidate) || has_account(candidate) {
                continue;
            }
            st.used.insert(candidate);
            st.next = uid;
            return Ok(candidate);
        }
        Err(format!(
            "no uid of agent.step_uid_range = {} is free ({} in use by running steps; uids with an account or group on this machine are skipped)",
            self.range,
            st.used.len()
        ))
    }

    fn release(&self, uid: u32) {
        if let Ok(mut st) = self.state.lock() {
            st.used.remove(&uid);
        }
    }
}

/// A uid or gid of that number has an entry on this machine (it belongs to someone).
fn has_account(id: u32) -> bool {
    use nix::unistd::{Gid, Group, Uid, User};
    !matches!(User::from_uid(Uid::from_raw(id)), Ok(None))
        || !matches!(Group::from_gid(Gid::from_raw(id)), Ok(None))
}

/// The user one step runs as; a uid from the range goes back when this is dropped, after
/// every process left under it was killed.
#[derive(Debug)]
pub struct StepUser {
    pub run_as: Option<RunAs>,
    lease: Option<UidLease>,
}

impl StepUser {
    /// Kill whatever still runs under the step's own uid (nothing for a shared user: its
    /// processes may belong to other steps).
    pub fn stop_leftovers(&self) -> usize {
        match &self.lease {
            Some(l) => {
                let uid = l.uid;
                kill_processes(|u| u == uid)
            }
            None => 0,
        }
    }

    /// Whether the uid is this step's alone (and goes to another step later).
    pub fn is_leased(&self) -> bool {
        self.lease.is_some()
    }
}

#[derive(Debug)]
struct UidLease {
    pool: Arc<UidPool>,
    uid: u32,
}

impl Drop for UidLease {
    fn drop(&mut self) {
        let uid = self.uid;
        kill_processes(|u| u == uid);
        self.pool.release(uid);
    }
}

/// SIGKILL every process any of whose uids (real, effective, saved, filesystem) matches,
/// until none is left (a process may fork meanwhile); returns how many were killed.
/// Reads `/proc` only.
pub fn kill_processes(matches: impl Fn(u32) -> bool) -> usize {
    use nix::sys::signal::{Signal, kill};
    let me = std::process::id();
    let mut killed = 0usize;
    for _round in 0..50 {
        let victims: Vec<u32> = processes()
            .into_iter()
            .filter(|(pid, uids)| *pid != me && *pid > 1 && uids.iter().any(|u| matches(*u)))
            .map(|(pid, _)| pid)
            .collect();
        if victims.is_empty() {
            break;
        }
        for pid in victims {
            let Ok(raw) = i32::try_from(pid) else {
                continue;
            };
            if kill(nix::unistd::Pid::from_raw(raw), Signal::SIGKILL).is_ok() {
                killed = killed.saturating_add(1);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    killed
}

/// Every live process (not a zombie) with its four uids.
fn processes() -> Vec<(u32, Vec<u32>)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let mut uids = Vec::new();
        let mut zombie = false;
        for line in status.lines() {
            if let Some(rest) = line.strip_prefix("Uid:") {
                uids = rest
                    .split_whitespace()
                    .filter_map(|u| u.parse().ok())
                    .collect();
            } else if let Some(rest) = line.strip_prefix("State:") {
                zombie = rest.trim_start().starts_with('Z');
            }
        }
        if !zombie && !uids.is_empty() {
            out.push((pid, uids));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(a: u32, b: u32) -> Arc<UidPool> {
        Arc::new(UidPool::new(UidRange { start: a, end: b }))
    }

    #[test]
    fn uids_are_unique_while_held_and_reused_last() {
        // High uids: no account on a test machine.
        let users = StepUsers::Range(pool(3_900_000_000, 3_900_000_002));
        let w = Path::new("/w");
        let a = users.for_step(w).unwrap();
        let b = users.for_step(w).unwrap();
        let c = users.for_step(w).unwrap();
        let ids: BTreeSet<u32> = [&a, &b, &c]
            .iter()
            .map(|s| s.run_as.as_ref().unwrap().uid)
            .collect();
        assert_eq!(ids.len(), 3);
        let err = users.for_step(w).unwrap_err();
        assert!(err.contains("no uid"), "{err}");
        let freed = b.run_as.as_ref().unwrap().uid;
        drop(b);
        let d = users.for_step(w).unwrap();
        let u = d.run_as.as_ref().unwrap();
        assert_eq!(u.uid, freed);
        assert_eq!((u.gid, u.name.as_str()), (freed, &*synthetic_name(freed)));
        assert_eq!(u.home, w);
    }

    #[test]
    fn a_narrow_range_is_refused_for_the_concurrency() {
        let users = StepUsers::Range(pool(3_900_000_000, 3_900_000_001));
        assert!(users.check_capacity(2).is_ok());
        let e = users.check_capacity(3).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("agent.step_uid_range"));
        assert!(StepUsers::Fixed(None).check_capacity(1000).is_ok());
    }

    #[test]
    fn uids_with_an_account_are_skipped() {
        // uid 0 always has one.
        let p = pool(1, 1);
        let taken = has_account(1);
        assert!(has_account(0));
        assert_eq!(p.acquire().is_err(), taken);
    }
}
