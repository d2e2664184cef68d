//! A step's interpreter is the agent's own child, leading the step's process group: its exit
//! code is reported as a shell would (128 + N when killed by signal N, 127 when it cannot be
//! run, as when a guard process stood between them), and what it leaves running in its
//! group is killed when it ends, so the step ends at once.

use gantry_tests::{AgentOpts, Stack, eventually};
use std::time::Duration;

#[tokio::test]
async fn a_script_killed_by_a_signal_ends_with_128_plus_its_number() {
    // Arrange
    let stack = Stack::start().await.unwrap();
    let mut runs = Vec::new();
    for (sig, code) in [("KILL", 137), ("TERM", 143)] {
        let id = stack
            .submit(&format!(
                "name = \"sig\"\n[[steps]]\nname = \"s\"\nscript = 'echo before; kill -{sig} $$; echo after'\n"
            ))
            .await
            .unwrap();
        runs.push((id, code));
    }

    for (id, code) in runs {
        // Act
        let done = stack.wait_task(id, Duration::from_secs(60)).await.unwrap();

        // Assert
        let step = &done.steps[0];
        assert_eq!(done.summary.state, "Failed", "{done:#?}");
        assert_eq!(step.attempts[0].exit_code, Some(code), "{done:#?}");
        let log: Vec<String> = stack.log_texts(id).await.unwrap();
        assert!(log.iter().any(|l| l == "before"), "{log:?}");
        assert!(!log.iter().any(|l| l == "after"), "{log:?}");
    }
}

#[tokio::test]
async fn what_a_script_leaves_running_in_its_group_is_killed_when_it_ends() {
    // Arrange: a background process that would hold the step's output open for 300 s.
    let stack = Stack::start().await.unwrap();
    let marker = format!("gantry-left-{}", uuid::Uuid::new_v4().simple());
    let id = stack
        .submit(&format!(
            "name = \"bg\"\n[[steps]]\nname = \"s\"\nscript = '(exec -a {marker} sleep 300) & echo started'\n"
        ))
        .await
        .unwrap();

    // Act
    let done = stack.wait_task(id, Duration::from_secs(30)).await.unwrap();

    // Assert: the step succeeded without waiting for it, and it is gone.
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    let left = eventually(Duration::from_secs(2), "no process left", || async {
        let found = gantry_tests::procs::live()
            .iter()
            .filter(|p| p.cmdline.contains(&marker))
            .count();
        (found == 0).then_some(())
    })
    .await;
    assert!(left.is_ok(), "{left:?}");
}

#[tokio::test]
async fn an_interpreter_that_cannot_be_run_ends_the_step_with_127() {
    // Arrange: an agent whose PATH (which its steps inherit) holds no bash.
    let mut stack = Stack::start().await.unwrap();
    stack
        .add_agent(
            "no-bash",
            AgentOpts {
                env: vec![("PATH".into(), "/nonexistent".into())],
                ..AgentOpts::default()
            },
        )
        .await
        .unwrap();

    // Act
    let id = stack
        .submit("name = \"nobash\"\n[[steps]]\nname = \"s\"\nscript = 'echo never'\n")
        .await
        .unwrap();
    let done = stack.wait_task(id, Duration::from_secs(60)).await.unwrap();

    // Assert
    assert_eq!(done.summary.state, "Failed", "{done:#?}");
    assert_eq!(done.steps[0].attempts[0].exit_code, Some(127), "{done:#?}");
    let log: Vec<String> = stack.log_texts(id).await.unwrap();
    assert!(
        log.iter().any(|l| l.starts_with("cannot start bash: ")),
        "{log:?}"
    );
}
