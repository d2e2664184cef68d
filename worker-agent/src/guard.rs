//! # The supervisor process: a step's processes never outlive their agent
//!
//! Each agent (and each dispatcher node's built-in worker) starts one supervisor when it
//! starts: `gantry-guard --supervise`, the small binary installed beside the agent (where it
//! is missing, `gantry-agent guard -- --supervise` or `gantry-dispatcher guard --
//! --supervise`, the same code). Its stdin is a pipe whose other end only the agent holds
//! (see [`crate::supervisor`]); on it arrive lines naming the process groups of the agent's
//! running steps:
//!
//! ```text
//! +PGID    a step's process group started (written by the step's own process, before exec)
//! -PGID    it ended and was killed (written by the agent)
//! ```
//!
//! When the agent dies, even by SIGKILL, the kernel closes its end of the pipe; the
//! supervisor reads end-of-file, sends SIGKILL to every group it still knows, and exits. It
//! runs as the agent's user, so it can kill steps that run as other users (`agent.step_user`,
//! `agent.step_uid_range`, the built-in worker's `builtin_worker.user`).
//!
//! A group is counted, not just remembered: a `+` for a group number still counted (a pid
//! reused by a later step before the first one's `-` arrived) keeps it counted until both
//! have ended. Lines that are not one of the two forms, and group numbers below 2, are
//! ignored: nothing read here can make the supervisor signal anything but a group a step
//! announced.
//!
//! Once it is ready it prints one line on stdout ([`READY`]), which the agent waits for
//! before it takes any step. It leads a process group of its own and ignores SIGTERM, SIGINT, SIGHUP and SIGQUIT, so a
//! signal to the agent's group (Ctrl-C) or to every process of a service (`systemctl stop`)
//! does not end it while the agent drains: only the agent's end of the pipe does. It reads a
//! short line per step and is otherwise blocked in `read`: no async runtime, no
//! configuration, no logging.

use std::collections::HashMap;
use std::io::{BufRead, Read};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// The supervisor's own binary, installed beside `gantry-agent` and `gantry-dispatcher`.
pub const BINARY: &str = "gantry-guard";
/// The argument that starts the supervisor.
pub const SUPERVISE: &str = "--supervise";
/// The line the supervisor prints on stdout once it is ready.
pub const READY: &str = "gantry-guard supervising";

const USAGE: &str = "usage: gantry-guard --supervise (started by gantry-agent, one per agent)";

/// Check the arguments of `gantry-guard`: `--supervise` (or `-- --supervise`, the form the
/// agent's and the dispatcher's `guard` subcommands pass on). `Err` is the message to print.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<(), String> {
    let args: Vec<String> = args.into_iter().collect();
    let rest = match args.first().map(String::as_str) {
        Some("--") => &args[1..],
        _ => &args[..],
    };
    match rest {
        [one] if one == SUPERVISE => Ok(()),
        [] => Err(USAGE.into()),
        _ => Err(format!(
            "the per-step guard is gone: this binary only runs as an agent's supervisor\n{USAGE}"
        )),
    }
}

/// The entry of the `guard` subcommands (`gantry-agent guard -- --supervise`, and the
/// dispatcher's, which passes its arguments after `--` as `command`): the supervisor, or
/// exit 2 with the usage for anything else.
pub fn run(command: Vec<String>, user: Option<(u32, u32)>) -> ExitCode {
    if user.is_some() {
        eprintln!(
            "gantry-guard: --uid and --gid are gone: steps are started by the agent\n{USAGE}"
        );
        return ExitCode::from(2);
    }
    match parse_args(command) {
        Ok(()) => supervise(),
        Err(e) => {
            eprintln!("gantry-guard: {e}");
            ExitCode::from(2)
        }
    }
}

/// One line of the pipe: `Some((true, pgid))` for `+PGID`, `Some((false, pgid))` for
/// `-PGID`, `None` for anything else (including groups 0 and 1, which `killpg` would read as
/// "my own group" and init's).
pub fn parse_line(line: &[u8]) -> Option<(bool, i32)> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let (&sign, digits) = line.split_first()?;
    let start = match sign {
        b'+' => true,
        b'-' => false,
        _ => return None,
    };
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let pgid: i32 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    (pgid > 1).then_some((start, pgid))
}

/// The groups a supervisor counts, as lines arrive.
#[derive(Debug, Default)]
pub struct Groups {
    counts: HashMap<i32, u32>,
}

impl Groups {
    /// Apply one line (see [`parse_line`]).
    pub fn apply(&mut self, line: &[u8]) {
        match parse_line(line) {
            Some((true, pg)) => *self.counts.entry(pg).or_default() += 1,
            Some((false, pg)) => {
                if let Some(n) = self.counts.get_mut(&pg) {
                    *n -= 1;
                    if *n == 0 {
                        self.counts.remove(&pg);
                    }
                }
            }
            None => {}
        }
    }

    /// The groups still running, in no particular order.
    pub fn live(&self) -> Vec<i32> {
        self.counts.keys().copied().collect()
    }
}

/// Run the supervisor on this process's stdin until end-of-file, then kill every group still
/// counted. Never returns.
pub fn supervise() -> ExitCode {
    // It holds nothing secret, but is kept as the agent is: no core dump, no reading of it.
    let _ = crate::hardening::disable_core_dumps();
    let _ = crate::hardening::make_undumpable();
    // A handler replaces the default action (terminate): only the pipe ends it.
    let seen = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGQUIT,
    ] {
        if let Err(e) = signal_hook::flag::register(sig, seen.clone()) {
            eprintln!("gantry-guard: cannot handle signal {sig}: {e}");
            std::process::exit(2);
        }
    }
    // Its signals are handled: tell the agent it may go on (an old `gantry-guard`, which
    // knows no `--supervise`, exits instead, and the agent says so).
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{READY}").and_then(|()| out.flush()).is_err() {
            std::process::exit(2);
        }
    }
    let mut groups = Groups::default();
    let mut stdin = std::io::stdin().lock();
    let mut line = Vec::with_capacity(32);
    loop {
        line.clear();
        // Lines are short; one longer than this is not ours and is skipped.
        match (&mut stdin).take(64).read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) if line.ends_with(b"\n") => groups.apply(&line),
            Ok(_) => {
                // Over-long or cut by end-of-file: drop the rest of it.
                let mut rest = Vec::new();
                if matches!(stdin.read_until(b'\n', &mut rest), Ok(0) | Err(_)) {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    // The agent is gone: nothing of its steps may outlive it.
    for pg in groups.live() {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pg),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    std::process::exit(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_the_supervisor_mode_is_accepted() {
        assert!(parse_args(args(&["--supervise"])).is_ok());
        assert!(parse_args(args(&["--", "--supervise"])).is_ok());
        assert!(parse_args(args(&[])).unwrap_err().contains("usage"));
        for bad in [
            &["--", "bash", "-c", "true"][..],
            &["--uid", "1", "--gid", "1", "--", "sh"],
            &["--supervise", "x"],
        ] {
            assert!(
                parse_args(args(bad)).unwrap_err().contains("usage"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn lines_name_groups_above_one_and_nothing_else() {
        assert_eq!(parse_line(b"+1234\n"), Some((true, 1234)));
        assert_eq!(parse_line(b"-1234\n"), Some((false, 1234)));
        assert_eq!(parse_line(b"+2"), Some((true, 2)));
        for bad in [
            &b"+0\n"[..],
            b"+1\n",
            b"+-5\n",
            b"+\n",
            b"1234\n",
            b"+12a\n",
            b"+ 12\n",
            b"+99999999999\n",
            b"",
        ] {
            assert_eq!(parse_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_group_announced_twice_lives_until_both_ended() {
        let mut g = Groups::default();
        g.apply(b"+500\n");
        g.apply(b"+500\n");
        g.apply(b"+600\n");
        g.apply(b"-500\n");
        let mut live = g.live();
        live.sort();
        assert_eq!(live, vec![500, 600]);
        g.apply(b"-500\n");
        g.apply(b"-600\n");
        // An end that was never announced changes nothing.
        g.apply(b"-700\n");
        assert!(g.live().is_empty());
    }
}
