//! A step's processes do not outlive their agent: SIGKILL an agent (or a dispatcher node,
//! whose built-in worker runs the agent's code inside it) while a step with background
//! children runs, and within 2 s none of the step's processes is left, whoever it ran as.
//! The step's processes are found by a marker of the test's own in their command lines
//! (`/proc/<pid>/cmdline`).

use gantry_shared::ids::TaskId;
use gantry_tests::{AgentOpts, Stack, eventually};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

/// A step that leaves two background processes named `<marker>-bg` and waits, after saying
/// `READY <pid> <uid>`.
fn process(marker: &str, server: bool) -> String {
    format!(
        r#"
name = "doomed"
[[steps]]
name = "hold"
{location}script = '''
(exec -a {marker}-bg sleep 300) &
(exec -a {marker}-bg sleep 300) &
echo "READY $$ $(id -u)"
wait
'''
"#,
        location = if server {
            "location = \"server\"\n"
        } else {
            ""
        },
    )
}

/// Live processes (not zombies) whose command line holds `marker`, and the leader `pid`.
fn left(marker: &str, leader: i32) -> Vec<(i32, String)> {
    gantry_tests::procs::live()
        .into_iter()
        .filter(|p| p.pid == leader || p.cmdline.contains(marker))
        .map(|p| (p.pid, p.cmdline))
        .collect()
}

/// Wait for the step to say it is ready: its leader's pid and uid.
async fn ready(stack: &Stack, task: TaskId) -> (i32, u32) {
    let line = eventually(Duration::from_secs(30), "READY", || async {
        stack
            .log(task)
            .await
            .ok()?
            .iter()
            .find_map(|l| l.text.strip_prefix("READY ").map(str::to_owned))
    })
    .await
    .unwrap();
    let mut f = line.split_whitespace();
    (
        f.next().unwrap().parse().unwrap(),
        f.next().unwrap().parse().unwrap(),
    )
}

/// Assert the step's processes are all running (the leader and both background ones).
fn assert_running(marker: &str, leader: i32) {
    let procs = left(marker, leader);
    assert_eq!(procs.len(), 3, "{procs:?}");
}

/// How long until nothing of the step is left (at most `limit`).
fn time_to_gone(marker: &str, leader: i32, limit: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if left(marker, leader).is_empty() {
            return Ok(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("left after {limit:?}: {:?}", left(marker, leader)))
}

fn marker() -> String {
    format!("gantry-death-{}", uuid::Uuid::new_v4().simple())
}

async fn sigkill_agent_mid_step(env: Vec<(String, String)>) -> u32 {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    // Step users must get through the stack's directory (a 0700 tempdir) to the work root.
    std::fs::set_permissions(stack.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let idx = stack
        .add_agent(
            "doomed",
            AgentOpts {
                env,
                ..AgentOpts::default()
            },
        )
        .await
        .unwrap();
    let m = marker();
    let task = stack.submit(&process(&m, false)).await.unwrap();
    let (leader, uid) = ready(&stack, task).await;
    assert_running(&m, leader);

    // Act
    stack.kill_agent(idx).await;

    // Assert
    let took =
        tokio::task::spawn_blocking(move || time_to_gone(&m, leader, Duration::from_secs(2)))
            .await
            .unwrap();
    assert!(took.is_ok(), "{took:?}");
    uid
}

#[tokio::test]
async fn a_sigkilled_agent_leaves_nothing_of_its_step_running() {
    let uid = sigkill_agent_mid_step(Vec::new()).await;
    assert_eq!(uid, nix::unistd::geteuid().as_raw());
}

#[tokio::test]
async fn a_sigkilled_agent_leaves_nothing_of_a_step_that_ran_under_a_uid_of_its_own() {
    let uid = sigkill_agent_mid_step(vec![(
        "GANTRY__AGENT__STEP_UID_RANGE".into(),
        "61300-61309".into(),
    )])
    .await;
    assert!((61300..=61309).contains(&uid), "{uid}");
}

#[tokio::test]
async fn a_sigkilled_dispatcher_leaves_nothing_of_its_builtin_workers_step_running() {
    // Arrange: a server step, run by the node's built-in worker inside the dispatcher.
    let mut stack = Stack::start().await.unwrap();
    let m = marker();
    let task = stack.submit(&process(&m, true)).await.unwrap();
    let (leader, _) = ready(&stack, task).await;
    assert_running(&m, leader);

    // Act
    stack.kill_dispatcher().await;

    // Assert
    let took =
        tokio::task::spawn_blocking(move || time_to_gone(&m, leader, Duration::from_secs(2)))
            .await
            .unwrap();
    assert!(took.is_ok(), "{took:?}");
}
