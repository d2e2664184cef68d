//! The step guard, run directly: both the small `gantry-guard` binary the agents use and the
//! agent's `gantry-agent guard` fallback keep the same promises (see `worker-agent/src/guard.rs`).

use gantry_tests::bin;
use std::io::{BufRead, BufReader};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The two ways to start a guard: `gantry-guard ...` and `gantry-agent guard ...`.
fn guards() -> [Command; 2] {
    let small = Command::new(bin("gantry-guard"));
    let mut fallback = Command::new(bin("gantry-agent"));
    fallback.arg("guard");
    [small, fallback]
}

/// Start a guard as the agent does: leading its own process group, its stdin a pipe held by us.
fn start(mut guard: Command, script: &str) -> Child {
    guard
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start the guard")
}

/// Wait for a guard while still holding its stdin (closing it means "the agent is gone").
fn wait_holding_stdin(mut child: Child) -> std::process::ExitStatus {
    let _lifeline = child.stdin.take();
    child.wait().unwrap()
}

fn alive(pid: i32) -> bool {
    // A zombie has been killed already; only a running process counts.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn the_guard_reports_the_scripts_exit_code() {
    for guard in guards() {
        // Arrange
        let child = start(guard, "exit 7");

        // Act
        let status = wait_holding_stdin(child);

        // Assert
        assert_eq!(status.code(), Some(7), "{status:?}");
    }
}

#[test]
fn a_script_killed_by_a_signal_ends_with_128_plus_its_number() {
    for guard in guards() {
        let status = wait_holding_stdin(start(guard, "kill -KILL $$"));
        assert_eq!(status.code(), Some(137), "{status:?}");
    }
}

#[test]
fn sigterm_to_the_group_lets_the_script_decide_how_to_end() {
    for guard in guards() {
        // Arrange: a script that ends with 5 on SIGTERM.
        let mut child = start(
            guard,
            "trap 'exit 5' TERM\necho ready\nwhile :; do sleep 0.05; done",
        );
        let mut ready = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "ready");

        // Act: as the agent stops a step.
        nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = wait_holding_stdin(child);

        // Assert: the guard outlived the signal and passed on the script's own exit code.
        assert_eq!(status.code(), Some(5), "{status:?}");
    }
}

#[test]
fn when_its_agent_is_gone_the_guard_kills_the_whole_group() {
    for guard in guards() {
        // Arrange: a script with a grandchild in the background.
        let mut child = start(guard, "sleep 300 &\necho $!\nwait");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let grandchild: i32 = line.trim().parse().unwrap();
        assert!(alive(grandchild));

        // Act: the pipe closes, as when the agent dies (even by SIGKILL).
        drop(child.stdin.take());
        let status = child.wait().unwrap();

        // Assert: the guard killed its group, itself included, and the grandchild with it.
        assert_eq!(status.signal(), Some(9), "{status:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(grandchild) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !alive(grandchild),
            "the script's background process outlived its guard"
        );
    }
}

#[test]
fn bad_arguments_are_refused_with_usage() {
    let out = Command::new(bin("gantry-guard"))
        .args(["--uid", "x", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--uid needs a numeric id"));
    let out = Command::new(bin("gantry-guard")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: gantry-guard"));
}
