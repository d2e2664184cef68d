//! Agents draining: SIGTERM lets the running step finish and takes no new one; past the
//! shutdown grace, or at a second signal, the running steps are cancelled.

use gantry_tests::{AgentOpts, Stack};
use std::time::Duration;

#[tokio::test]
async fn sigterm_lets_the_running_step_finish_and_the_agent_exits_zero() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    // One slot: the later task waits in the queue while the first runs, whatever the timing
    // of its publication and of the signal.
    let idx = stack
        .add_agent(
            "drainer",
            AgentOpts {
                max_concurrent_steps: 1,
                ..AgentOpts::default()
            },
        )
        .await
        .unwrap();
    let task = stack
        .submit(
            "name = \"d\"\n[[steps]]\nname = \"s\"\nscript = '''\nsleep 2\necho finished\n'''\n",
        )
        .await
        .unwrap();
    stack.wait_running(task).await.unwrap();
    let queued = stack
        .submit("name = \"later\"\n[[steps]]\nname = \"s\"\nscript = \"echo later\"\n")
        .await
        .unwrap();

    // Act
    stack.agents[idx]
        .proc
        .as_ref()
        .unwrap()
        .signal(nix::sys::signal::Signal::SIGTERM);
    let status = stack.agents[idx]
        .proc
        .as_mut()
        .unwrap()
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("the agent exits");

    // Assert
    assert_eq!(status.code(), Some(0));
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.summary.state, "Success", "the running step finished");
    assert!(
        stack
            .log(task)
            .await
            .unwrap()
            .iter()
            .any(|l| l.text == "finished")
    );
    let later = stack.task(queued).await.unwrap();
    assert_eq!(
        later.steps[0].state, "Queued",
        "a draining agent takes no new step"
    );
}

#[tokio::test]
async fn a_draining_agent_cancels_its_steps_after_the_grace_or_at_a_second_signal() {
    // Arrange: one agent with a 1 s grace, one with a long grace; each runs a long step.
    let mut stack = Stack::start().await.unwrap();
    stack.add_pool("graceful").await.unwrap();
    stack.add_pool("impatient").await.unwrap();
    let short = stack
        .add_agent(
            "short-grace",
            AgentOpts {
                pools: vec!["graceful".into()],
                env: vec![("GANTRY__AGENT__SHUTDOWN_GRACE_SECS".into(), "1".into())],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let long = stack
        .add_agent(
            "long-grace",
            AgentOpts {
                pools: vec!["impatient".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for pool in ["graceful", "impatient"] {
        tasks.push(
            stack
                .submit(&format!(
                    "name = \"{pool}\"\n[[steps]]\nname = \"s\"\npool = \"{pool}\"\nscript = \"echo begun; sleep 60; echo never\"\n"
                ))
                .await
                .unwrap(),
        );
    }
    for t in &tasks {
        stack
            .wait_task_until(*t, Duration::from_secs(30), |t| {
                t.steps[0].state == "Running"
            })
            .await
            .unwrap();
    }
    use nix::sys::signal::Signal;

    // Act
    let started = std::time::Instant::now();
    stack.agents[short]
        .proc
        .as_ref()
        .unwrap()
        .signal(Signal::SIGTERM);
    stack.agents[long]
        .proc
        .as_ref()
        .unwrap()
        .signal(Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.agents[long]
        .proc
        .as_ref()
        .unwrap()
        .signal(Signal::SIGINT);
    let mut codes = Vec::new();
    for idx in [short, long] {
        let status = stack.agents[idx]
            .proc
            .as_mut()
            .unwrap()
            .wait_exit(Duration::from_secs(30))
            .await
            .expect("the agent exits");
        codes.push(status.code());
    }
    let elapsed = started.elapsed();
    let mut ends = Vec::new();
    for t in &tasks {
        ends.push(stack.wait_task(*t, Duration::from_secs(30)).await.unwrap());
    }

    // Assert
    assert_eq!(codes, vec![Some(0), Some(0)]);
    assert!(
        elapsed < Duration::from_secs(20),
        "nobody waited for the 60 s steps"
    );
    for done in &ends {
        assert_eq!(done.steps[0].state, "Cancelled", "{done:#?}");
        let log = stack.log(done.summary.id).await.unwrap();
        assert!(log.iter().any(|l| l.text == "begun"));
        assert!(!log.iter().any(|l| l.text == "never"));
    }
    assert!(
        stack.agent(short).log_text().contains("grace period over"),
        "the short grace ran out"
    );
    assert!(
        stack.agent(long).log_text().contains("second signal"),
        "the second signal cancelled at once"
    );
}
