//! # The step guard: a step's processes never outlive their agent
//!
//! The agent does not start a script directly: it starts `gantry-guard -- <interpreter>
//! <script>` (the small binary installed beside the agent; `gantry-agent guard` is the same
//! code, used when that binary is missing) as the leader of a new process group, with a pipe
//! on its stdin that only the agent holds. The guard starts the script in the same group
//! (stdout and stderr go straight to the agent's pipes) and waits for it. If the agent dies,
//! even by SIGKILL, the kernel closes the pipe; the guard sees end-of-file and kills the whole
//! group, script, grandchildren and itself. This needs no `unsafe` (no `prctl` in a
//! `pre_exec` hook), and unlike a parent-death signal it reaches grandchildren too.
//!
//! The guard ignores SIGTERM and SIGINT sent to the group, so that when the agent stops a step
//! it is the script that decides how to end; the guard then exits with the script's exit
//! code, or 128 + the signal number if the script was killed by a signal.
//!
//! It runs once per step, so it is kept cheap: no async runtime, no configuration, no logging,
//! one blocking `wait` and one thread blocked reading the pipe. Its handlers for SIGTERM and
//! SIGINT only set a flag (`signal-hook`), and `exec` resets handled signals to their default,
//! so the script receives them as usual.

use std::io::Read;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

/// The guard's own binary, installed beside `gantry-agent` and `gantry-dispatcher`.
pub const BINARY: &str = "gantry-guard";

/// What to run, and as which user (uid, gid).
pub type Invocation = (Vec<String>, Option<(u32, u32)>);

/// Parse the guard's arguments: `[--uid N --gid N] -- program [args...]` (the same as the
/// `guard` subcommand's). `Err` is the message to print.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Invocation, String> {
    let mut args = args.into_iter();
    let (mut uid, mut gid) = (None, None);
    loop {
        let Some(a) = args.next() else {
            return Err("usage: gantry-guard [--uid N --gid N] -- PROGRAM [ARGS...]".into());
        };
        match a.as_str() {
            "--" => break,
            "--uid" | "--gid" => {
                let v = args
                    .next()
                    .and_then(|v| v.parse::<u32>().ok())
                    .ok_or_else(|| format!("{a} needs a numeric id"))?;
                if a == "--uid" {
                    uid = Some(v);
                } else {
                    gid = Some(v);
                }
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    let command: Vec<String> = args.collect();
    if command.is_empty() {
        return Err("nothing to run".into());
    }
    if uid.is_some() != gid.is_some() {
        return Err("--uid and --gid go together".into());
    }
    Ok((command, uid.zip(gid)))
}

/// Run the guard. `command` is the program and its arguments. It ends the process itself
/// (`std::process::exit`), so that the thread blocked reading stdin cannot hold it open.
pub fn run(command: Vec<String>, user: Option<(u32, u32)>) -> ExitCode {
    // Its environment holds the step's secrets: no core dump, no reading of its memory or
    // `environ` by the agent's user's other processes (`exec` makes the script dumpable).
    let _ = crate::hardening::disable_core_dumps();
    let _ = crate::hardening::make_undumpable();
    let code = guard(command, user);
    std::process::exit(code)
}

fn guard(command: Vec<String>, user: Option<(u32, u32)>) -> i32 {
    let Some((program, args)) = command.split_first() else {
        eprintln!("gantry-guard: nothing to run");
        return 2;
    };
    // A handler replaces the default action (terminate): the guard outlives a SIGTERM to
    // the group and reports how the script ended. Registered before the script starts, so
    // that no signal to the group can find the guard unprotected.
    let seen = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(sig, seen.clone()) {
            eprintln!("gantry-guard: cannot handle signal {sig}: {e}");
            return 2;
        }
    }
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).stdin(std::process::Stdio::null());
    if let Some((uid, gid)) = user {
        use std::os::unix::process::CommandExt;
        // Dropping root also drops its supplementary groups (std does setgroups(0)).
        cmd.uid(uid).gid(gid);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot start {program}: {e}");
            return 127;
        }
    };
    // The agent never writes to this pipe: a read returns only at end-of-file (the agent is
    // gone) or on an error. Then nothing may outlive it: the whole group dies, this guard too.
    std::thread::spawn(|| {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        let _ = nix::sys::signal::killpg(nix::unistd::getpgrp(), nix::sys::signal::Signal::SIGKILL);
        std::process::exit(137);
    });
    // std's wait retries when a handled signal interrupts it.
    match child.wait() {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            s.code()
                .unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
                .clamp(0, 255)
        }
        Err(e) => {
            eprintln!("gantry-guard: waiting for {program}: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_args;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_the_guard_arguments() {
        assert_eq!(
            parse_args(args(&["--", "bash", "-c", "true"])).unwrap(),
            (args(&["bash", "-c", "true"]), None)
        );
        assert_eq!(
            parse_args(args(&["--uid", "65534", "--gid", "65534", "--", "sh"])).unwrap(),
            (args(&["sh"]), Some((65534, 65534)))
        );
        // Everything after `--` belongs to the script, flags included.
        assert_eq!(
            parse_args(args(&["--", "bash", "--uid", "x"])).unwrap().0,
            args(&["bash", "--uid", "x"])
        );
        assert!(parse_args(args(&["--"])).is_err());
        assert!(parse_args(args(&["bash"])).is_err());
        assert!(parse_args(args(&["--uid", "x", "--", "sh"])).is_err());
        assert!(parse_args(args(&["--uid", "1", "--", "sh"])).is_err());
    }
}
