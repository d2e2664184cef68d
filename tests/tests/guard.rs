//! The agent's supervisor, run directly: the small `gantry-guard --supervise` binary and the
//! agent's and dispatcher's `guard -- --supervise` fallbacks keep the same promises (see
//! `worker-agent/src/guard.rs`), and steps started through `gantry_agent::supervisor` are
//! known to it before they run (see `worker-agent/src/supervisor.rs`).

use gantry_agent::supervisor::{Program, Supervisor};
use gantry_tests::bin;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The three ways to start a supervisor.
fn supervisors() -> [Program; 3] {
    let fallback = |b: &str| Program {
        path: bin(b),
        args: vec!["guard".into(), "--".into(), "--supervise".into()],
    };
    [
        Program {
            path: bin("gantry-guard"),
            args: vec!["--supervise".into()],
        },
        fallback("gantry-agent"),
        fallback("gantry-dispatcher"),
    ]
}

/// Start a supervisor as the agent does: in a group of its own, its stdin a pipe held by us;
/// once it said it is ready.
fn start_supervisor(p: &Program) -> Child {
    let mut c = Command::new(&p.path)
        .args(&p.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start the supervisor");
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim_end(), gantry_agent::guard::READY, "{p:?}");
    c
}

/// A shell leading a group of its own with two background sleeps, once they have started.
fn start_group(marker: &str) -> (Child, i32) {
    let mut c = Command::new("sh")
        .args([
            "-c",
            &format!("sleep 300 & sleep 300 & echo ready; wait # {marker}"),
        ])
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let pgid = c.id() as i32;
    assert_eq!(members(pgid).len(), 3, "sh and its two sleeps");
    (c, pgid)
}

/// Live (not zombie) processes of process group `pgid`, from `/proc`.
fn members(pgid: i32) -> Vec<i32> {
    gantry_tests::procs::live()
        .into_iter()
        .filter(|p| p.pgid == pgid)
        .map(|p| p.pid)
        .collect()
}

fn gone_within(pgid: i32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if members(pgid).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    members(pgid).is_empty()
}

fn kill_group(pgid: i32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[test]
fn when_its_pipe_closes_the_supervisor_kills_the_groups_still_running_and_only_those() {
    for p in supervisors() {
        // Arrange: two groups announced; the second one also announced ended.
        let mut sup = start_supervisor(&p);
        let (mut running, a) = start_group("guard-test-running");
        let (mut ended, b) = start_group("guard-test-ended");
        let pipe = sup.stdin.as_mut().unwrap();
        write!(pipe, "+{a}\n+{b}\n-{b}\n").unwrap();

        // Act: the agent is gone (even a SIGKILL closes its end).
        drop(sup.stdin.take());
        let status = sup.wait().unwrap();

        // Assert: the running group is dead, grandchildren included; the ended one is not.
        assert_eq!(status.code(), Some(0), "{p:?}: {status:?}");
        assert!(
            gone_within(a, Duration::from_secs(2)),
            "{p:?}: {:?}",
            members(a)
        );
        assert_eq!(running.wait().unwrap().signal(), Some(9));
        assert_eq!(
            members(b).len(),
            3,
            "{p:?}: a group that ended was signalled"
        );
        kill_group(b);
        let _ = ended.wait();
    }
}

#[test]
fn signals_that_reach_a_whole_service_do_not_end_the_supervisor() {
    // Arrange
    let p = &supervisors()[0];
    let mut sup = start_supervisor(p);
    let (mut step, pg) = start_group("guard-test-signals");
    writeln!(sup.stdin.as_mut().unwrap(), "+{pg}").unwrap();

    // Act: what `systemctl stop` or a Ctrl-C sends while the agent drains.
    for sig in ["TERM", "INT", "HUP", "QUIT"] {
        let st = Command::new("kill")
            .args([format!("-{sig}"), sup.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }
    std::thread::sleep(Duration::from_millis(200));

    // Assert: it is still there, and still kills the group once the agent is gone.
    assert!(
        sup.try_wait().unwrap().is_none(),
        "the supervisor died of a signal"
    );
    assert_eq!(members(pg).len(), 3);
    drop(sup.stdin.take());
    assert_eq!(sup.wait().unwrap().code(), Some(0));
    assert!(gone_within(pg, Duration::from_secs(2)));
    let _ = step.wait();
}

#[test]
fn lines_that_name_no_step_group_signal_nothing() {
    // Arrange: `killpg(0)` would be the supervisor's own group, 1 init's.
    let p = &supervisors()[0];
    let mut sup = start_supervisor(p);
    let (mut step, pg) = start_group("guard-test-nonsense");
    let pipe = sup.stdin.as_mut().unwrap();
    pipe.write_all(b"+0\n+1\n+-5\nhello\n+12x\n").unwrap();
    pipe.write_all(&[b'+'; 500]).unwrap();
    pipe.write_all(b"\n").unwrap();

    // Act
    drop(sup.stdin.take());
    let status = sup.wait().unwrap();

    // Assert: it ended by itself, not by a SIGKILL to its own group; the step was untouched.
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(members(pg).len(), 3);
    kill_group(pg);
    let _ = step.wait();
}

#[tokio::test]
async fn an_agent_refuses_to_start_with_a_supervisor_that_is_not_one() {
    // `true` exits at once, as an old gantry-guard does given `--supervise`.
    let e = Supervisor::start_program(Program {
        path: "/bin/true".into(),
        args: vec![],
    })
    .err()
    .expect("refused");
    assert!(e.to_string().contains("did not start"), "{e}");
}

#[test]
fn bad_arguments_are_refused_with_usage() {
    for args in [
        &[][..],
        &["--", "sh", "-c", "true"],
        &["--uid", "1", "--supervise"],
    ] {
        let out = Command::new(bin("gantry-guard"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("usage: gantry-guard --supervise"),
            "{args:?}: {err}"
        );
    }
    let out = Command::new(bin("gantry-agent"))
        .args(["guard", "--", "bash", "-c", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("per-step guard is gone"));
}

/// A step as the runner starts one: leading its own group, its output piped.
fn step_command(script: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("sh");
    c.args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    c
}

async fn first_line(child: &mut tokio::process::Child) -> String {
    use tokio::io::AsyncBufReadExt;
    let mut line = String::new();
    tokio::io::BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .await
        .unwrap();
    line.trim().to_owned()
}

#[tokio::test]
async fn steps_started_through_the_supervisor_die_with_it_even_after_it_was_replaced() {
    // Arrange: a step with background children, then the supervisor killed from outside
    // (the agent starts another and tells it the running groups), then a second step.
    let sup = Supervisor::start_program(supervisors()[0].clone()).unwrap();
    let mut first = sup
        .spawn(step_command("sleep 300 & sleep 300 & echo ready; wait"))
        .await
        .unwrap();
    assert_eq!(first_line(&mut first).await, "ready");
    let a = first.id().unwrap() as i32;
    let old = sup.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut second = sup
        .spawn(step_command("sleep 300 & echo ready; wait"))
        .await
        .unwrap();
    assert_eq!(first_line(&mut second).await, "ready");
    let b = second.id().unwrap() as i32;
    assert_ne!(sup.pid(), old, "a new supervisor was started");
    assert_eq!((members(a).len(), members(b).len()), (3, 2));

    // Act: the agent's side goes away without saying either step ended.
    drop(sup);

    // Assert: both groups, grandchildren included, are gone.
    let (ok_a, ok_b) = tokio::task::spawn_blocking(move || {
        (
            gone_within(a, Duration::from_secs(2)),
            gone_within(b, Duration::from_secs(2)),
        )
    })
    .await
    .unwrap();
    assert!(ok_a && ok_b, "{:?} {:?}", members(a), members(b));
    assert_eq!(first.wait().await.unwrap().signal(), Some(9));
}

#[tokio::test]
async fn a_step_that_ended_is_not_killed_when_the_agent_goes() {
    // Arrange: the group's leader exits at once; its background child stays behind, as a
    // step's would until the runner kills the group.
    let sup = Supervisor::start_program(supervisors()[0].clone()).unwrap();
    let mut step = sup
        .spawn(step_command("sleep 300 & echo ready"))
        .await
        .unwrap();
    assert_eq!(first_line(&mut step).await, "ready");
    let pg = step.id().unwrap() as i32;
    step.wait().await.unwrap();

    // Act: the agent says it ended (without killing it, to see the difference), then goes.
    sup.ended(pg);
    drop(sup);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Assert: the supervisor left it alone.
    assert_eq!(members(pg).len(), 1, "the ended group was killed");
    kill_group(pg);
}

#[tokio::test]
async fn each_step_announces_its_group_itself_and_a_failed_start_is_taken_back() {
    // Arrange: a stand-in supervisor that records what the pipe carries.
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("pipe");
    let sup = Supervisor::start_program(Program {
        path: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            format!(
                "echo '{}'; cat > '{}'",
                gantry_agent::guard::READY,
                record.display()
            ),
        ],
    })
    .unwrap();

    // Act: a step that runs and ends, then one whose program does not exist.
    let mut step = sup.spawn(step_command("echo $$")).await.unwrap();
    let pid: i32 = first_line(&mut step).await.parse().unwrap();
    assert_eq!(step.id(), Some(pid as u32));
    step.wait().await.unwrap();
    sup.ended(pid);
    let mut missing = tokio::process::Command::new("/nonexistent/gantry-no-such-program");
    missing.process_group(0);
    let e = sup.spawn(missing).await.unwrap_err();
    drop(sup);

    // Assert: the step's own `+` (written before its exec), the agent's `-`; the failed
    // child's `+` was taken back by a `-`, so nothing is left to kill.
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    let lines = gantry_tests::eventually(Duration::from_secs(5), "4 lines", || {
        let record = record.clone();
        async move {
            let text = std::fs::read_to_string(&record).ok()?;
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            (lines.len() >= 4).then_some(lines)
        }
    })
    .await
    .unwrap();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(
        lines[..2],
        [format!("+{pid}"), format!("-{pid}")],
        "{lines:?}"
    );
    let failed = lines[2].strip_prefix('+').expect("a + line");
    assert_ne!(failed, pid.to_string());
    assert_eq!(lines[3], format!("-{failed}"), "{lines:?}");
}
