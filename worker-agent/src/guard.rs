//! # The step guard: a step's processes never outlive their agent
//!
//! The agent does not start a script directly: it starts `gantry-agent guard -- <interpreter>
//! <script>` as the leader of a new process group, with a pipe on its stdin that only the
//! agent holds. The guard starts the script in the same group (stdout and stderr go straight
//! to the agent's pipes) and waits for it. If the agent dies, even by SIGKILL, the kernel
//! closes the pipe; the guard sees end-of-file and kills the whole group, script,
//! grandchildren and itself. This needs no `unsafe` (no `prctl` in a `pre_exec` hook), and
//! unlike a parent-death signal it reaches grandchildren too.
//!
//! The guard ignores SIGTERM and SIGINT sent to the group, so that when the agent stops a step
//! it is the script that decides how to end; the guard then exits with the script's exit
//! code, or 128 + the signal number if the script was killed by a signal.

use std::io::Read;
use std::process::ExitCode;

/// Run the guard (the `guard` subcommand). `command` is the program and its arguments. It
/// ends the process itself (`std::process::exit`), so that the thread blocked reading stdin
/// cannot hold it open.
pub fn run(command: Vec<String>, user: Option<(u32, u32)>) -> ExitCode {
    let code = guard(command, user);
    std::process::exit(code)
}

fn guard(command: Vec<String>, user: Option<(u32, u32)>) -> i32 {
    let Some((program, args)) = command.split_first() else {
        eprintln!("gantry-agent guard: nothing to run");
        return 2;
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gantry-agent guard: {e}");
            return 2;
        }
    };
    rt.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        // Listening replaces the default action (terminate): the guard outlives a SIGTERM
        // to the group and reports how the script ended.
        let mut term = signal(SignalKind::terminate()).ok();
        let mut int = signal(SignalKind::interrupt()).ok();
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args).stdin(std::process::Stdio::null());
        if let Some((uid, gid)) = user {
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
        // The agent never writes to this pipe: a read returns only at end-of-file (the agent
        // is gone) or on an error.
        let (gone_tx, mut gone) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
            let _ = gone_tx.send(());
        });
        loop {
            tokio::select! {
                status = child.wait() => {
                    return match status {
                        Ok(s) => {
                            use std::os::unix::process::ExitStatusExt;
                            s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)).clamp(0, 255)
                        }
                        Err(_) => 1,
                    };
                }
                _ = &mut gone => {
                    // The agent is gone: nothing may outlive it.
                    let _ = nix::sys::signal::killpg(nix::unistd::getpgrp(), nix::sys::signal::Signal::SIGKILL);
                    return 137;
                }
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                _ = async { match int.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        }
    })
}
