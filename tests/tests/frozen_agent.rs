//! A frozen agent (SIGSTOP): with the default machine policy (heartbeats every 10 s,
//! `unavailable_after` 30 s) its worker is `Unavailable` and its step `WorkerLost` within 30 s
//! of the freeze; and a cancel of its running step ends the task within 10 s although no agent
//! answers for the attempt.

use gantry_tests::{AgentOpts, Stack, eventually};
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

/// An agent on the default policy's heartbeat interval (the harness's agents beat every
/// second unless told otherwise).
fn default_policy_agent() -> AgentOpts {
    AgentOpts {
        env: vec![("GANTRY__AGENT__HEARTBEAT_SECS".into(), "10".into())],
        ..Default::default()
    }
}

async fn running_step(stack: &Stack) -> gantry_tests::gantry_shared::ids::TaskId {
    let task = stack
        .submit("name = \"long\"\n[[steps]]\nname = \"s\"\nscript = \"sleep 300\"\n")
        .await
        .unwrap();
    stack
        .wait_task_until(task, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
    task
}

/// Cancel the task (202), and say when.
async fn cancel(stack: &Stack, task: gantry_tests::gantry_shared::ids::TaskId) -> Instant {
    let at = Instant::now();
    let (status, body) = stack
        .request(
            reqwest::Method::POST,
            &format!("/api/tasks/{task}/cancel"),
            Some(gantry_tests::API_KEY),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    at
}

#[tokio::test]
async fn a_frozen_agent_is_unavailable_and_its_step_lost_within_30_s() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    let agent = stack
        .add_agent("frozen", default_policy_agent())
        .await
        .unwrap();
    let task = running_step(&stack).await;
    // Freeze it just after a heartbeat of its arrived: the worst case is a heartbeat sent
    // right before the freeze, which this comes close to.
    let first: Option<chrono::DateTime<chrono::Utc>> =
        eventually(Duration::from_secs(15), "a heartbeat", || async {
            let ws: Vec<gantry_tests::gantry_shared::api::Worker> =
                stack.get("/api/workers").await.ok()?;
            ws.into_iter()
                .find(|w| w.name == "frozen")
                .and_then(|w| w.last_heartbeat_at)
                .map(Some)
        })
        .await
        .unwrap();
    eventually(Duration::from_secs(15), "the next heartbeat", || async {
        let ws: Vec<gantry_tests::gantry_shared::api::Worker> =
            stack.get("/api/workers").await.ok()?;
        ws.into_iter()
            .find(|w| w.name == "frozen")
            .and_then(|w| w.last_heartbeat_at)
            .filter(|t| Some(*t) != first)
            .map(|_| ())
    })
    .await
    .unwrap();

    // Act
    stack.agent(agent).signal(Signal::SIGSTOP);
    let frozen_at = Instant::now();
    let (health, step_state, attempt_state) = eventually(
        Duration::from_secs(45),
        "worker unavailable and step lost",
        || async {
            let ws: Vec<gantry_tests::gantry_shared::api::Worker> =
                stack.get("/api/workers").await.ok()?;
            let w = ws.into_iter().find(|w| w.name == "frozen")?;
            let t = stack.task(task).await.ok()?;
            let a = t.steps[0].attempts[0].state;
            (w.health == "Unavailable" && a == "WorkerLost")
                .then(|| (w.health, t.steps[0].state, a))
        },
    )
    .await
    .unwrap();
    let took = frozen_at.elapsed();
    stack.agent(agent).signal(Signal::SIGCONT);

    // Assert
    assert_eq!(health, "Unavailable");
    assert_eq!(attempt_state, "WorkerLost");
    assert_ne!(step_state, "Running");
    assert!(took <= Duration::from_secs(30), "noticed after {took:?}");
}

/// Cancel the running step of a frozen agent, the dispatcher killed and started again
/// `restart_after` into the count when given; the task must be `Cancelled` within 10 s of
/// the cancel (a count kept in a node's memory would start again after a restart).
async fn a_cancel_nobody_answers(restart_after: Option<Duration>) {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    let agent = stack
        .add_agent("mute", default_policy_agent())
        .await
        .unwrap();
    let task = running_step(&stack).await;
    stack.agent(agent).signal(Signal::SIGSTOP);

    // Act
    let cancelled_at = cancel(&stack, task).await;
    if let Some(after) = restart_after {
        tokio::time::sleep(after).await;
        stack.kill_dispatcher().await;
        stack.start_dispatcher().await.unwrap();
    }
    let done = stack.wait_task(task, Duration::from_secs(20)).await;
    let took = cancelled_at.elapsed();
    stack.agent(agent).signal(Signal::SIGCONT);

    // Assert
    let done = done.unwrap();
    assert_eq!(done.summary.state, "Cancelled", "{done:#?}");
    assert_eq!(done.steps[0].attempts[0].state, "Cancelled", "{done:#?}");
    assert!(took <= Duration::from_secs(10), "ended after {took:?}");
}

#[tokio::test]
async fn a_cancel_nobody_answers_ends_the_task_within_10_s() {
    a_cancel_nobody_answers(None).await;
}

#[tokio::test]
async fn a_dispatcher_restart_does_not_start_the_unanswered_cancel_count_again() {
    a_cancel_nobody_answers(Some(Duration::from_secs(4))).await;
}
