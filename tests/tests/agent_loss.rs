//! Agents lost mid-step: frozen without a word, killed, or cut off from RabbitMQ. Each is
//! noticed, its step runs again elsewhere once, and what the lost attempt sends late changes
//! nothing.

use gantry_tests::{AgentOpts, Stack, eventually};
use std::time::Duration;

/// A step that records each attempt's start and end, and lingers on its first attempt.
fn lingering_step(runs: &std::path::Path, pids: &std::path::Path) -> String {
    format!(
        "name = \"linger\"\n[[steps]]\nname = \"s\"\nretries = 1\nscript = '''\n\
         echo \"start $GANTRY_STEP_ATTEMPT\" >> '{r}'\n\
         echo $$ > '{p}'.$GANTRY_STEP_ATTEMPT\n\
         if [ \"$GANTRY_STEP_ATTEMPT\" = 1 ]; then sleep 60; fi\n\
         echo \"end $GANTRY_STEP_ATTEMPT\" >> '{r}'\n'''\n",
        r = runs.display(),
        p = pids.display()
    )
}

fn alive(pid_file: &std::path::Path) -> bool {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn a_silently_stuck_agent_is_lost_its_step_retried_and_its_late_results_kept_apart() {
    // Arrange: the step allows one retry; the first agent will freeze (SIGSTOP) mid-step.
    let mut stack = Stack::start().await.unwrap();
    let frozen = stack
        .add_agent("frozen", AgentOpts::default())
        .await
        .unwrap();
    let task = stack
        .submit("name = \"stuck\"\n[[steps]]\nname = \"s\"\nretries = 1\nscript = '''\necho \"attempt $GANTRY_STEP_ATTEMPT\"\nsleep 3\necho \"done $GANTRY_STEP_ATTEMPT\"\n'''\n")
        .await
        .unwrap();
    stack.wait_running(task).await.unwrap();
    let healthy = stack
        .add_agent("healthy", AgentOpts::default())
        .await
        .unwrap();

    // Act: freeze the agent; its connections stay open and say nothing.
    let frozen_at = std::time::Instant::now();
    stack
        .agent(frozen)
        .signal(nix::sys::signal::Signal::SIGSTOP);
    let done = stack
        .wait_task(task, Duration::from_secs(90))
        .await
        .unwrap();
    let noticed = frozen_at.elapsed();
    stack
        .agent(frozen)
        .signal(nix::sys::signal::Signal::SIGCONT);
    let db = stack.db().await;
    let stale = eventually(Duration::from_secs(20), "late results arrive", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM stale_events")
            .fetch_one(&db)
            .await
            .ok()?;
        (n > 0).then_some(n)
    })
    .await;

    // Assert
    assert_eq!(done.summary.state, "Success");
    let s = &done.steps[0];
    assert_eq!(s.attempts.len(), 2);
    assert_eq!(s.attempts[0].state, "WorkerLost");
    assert_eq!(s.attempts[0].worker.as_deref(), Some("frozen"));
    assert_eq!(s.attempts[1].state, "Success");
    assert_eq!(s.attempts[1].worker.as_deref(), Some("healthy"));
    assert!(
        noticed < Duration::from_secs(60),
        "noticed within the heartbeat limit ({noticed:?})"
    );
    stale.unwrap();
    let after = stack.task(task).await.unwrap();
    assert_eq!(
        after.steps[0].attempts[0].state, "WorkerLost",
        "late results changed nothing"
    );
    let log = stack.log(task).await.unwrap();
    assert!(
        !log.iter().any(|l| l.text == "done 1"),
        "the lost attempt's late lines are not in the log"
    );
    let _ = healthy;
}

#[tokio::test]
async fn an_agent_killed_mid_step_is_lost_within_5_s_and_its_step_runs_again_elsewhere_once() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    let mut agents = Vec::new();
    for name in ["k1", "k2"] {
        agents.push(stack.add_agent(name, AgentOpts::default()).await.unwrap());
    }
    let runs = stack.dir.path().join("runs");
    let pids = stack.dir.path().join("pid");
    let task = stack.submit(&lingering_step(&runs, &pids)).await.unwrap();
    let running = stack.wait_running(task).await.unwrap();
    let victim = running.steps[0].worker.clone().unwrap();
    eventually(Duration::from_secs(10), "script started", || async {
        pids.with_extension("1").exists().then_some(())
    })
    .await
    .unwrap();

    // Act
    let killed_at = chrono::Utc::now();
    stack
        .kill_agent(if victim == "k1" { agents[0] } else { agents[1] })
        .await;
    let done = stack
        .wait_task(task, Duration::from_secs(60))
        .await
        .unwrap();

    // Assert
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    let attempts = &done.steps[0].attempts;
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].state, "WorkerLost");
    assert_eq!(attempts[0].worker.as_deref(), Some(victim.as_str()));
    let noticed = attempts[0].finished_at.unwrap() - killed_at;
    assert!(
        noticed.num_milliseconds() < 5000,
        "noticed within 5 s, took {noticed}"
    );
    assert!(
        attempts[0]
            .error
            .as_deref()
            .unwrap()
            .contains(&format!("worker {victim} was lost")),
        "{attempts:#?}"
    );
    assert_eq!(attempts[1].state, "Success");
    assert_ne!(attempts[1].worker.as_deref(), Some(victim.as_str()));
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "start 1\nstart 2\nend 2\n",
        "each attempt's script ran once; the lost one never finished"
    );
    assert!(
        !alive(&pids.with_extension("1")),
        "the lost attempt's script died with its agent"
    );
    let log = stack.log(task).await.unwrap();
    assert!(
        log.iter().any(|l| l.text.contains("was lost")),
        "the reason is in the task's log"
    );
}

#[tokio::test]
async fn an_agent_cut_off_from_rabbitmq_stops_its_own_steps_after_unavailable_after() {
    // Arrange: a short policy; agent `cut` reaches RabbitMQ only through a proxy.
    let mut stack = Stack::start().await.unwrap();
    let (status, body) = stack
        .request(
            reqwest::Method::PUT,
            "/api/settings",
            Some(gantry_tests::API_KEY),
            Some(serde_json::json!({
                "machine_policy": { "heartbeat_interval_secs": 1, "unavailable_after_secs": 6 }
            })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let proxy = gantry_tests::CutProxy::start("127.0.0.1:5672")
        .await
        .unwrap();
    stack
        .add_agent(
            "cut",
            AgentOpts {
                env: vec![(
                    "GANTRY__AMQP__URL".into(),
                    format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port),
                )],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let runs = stack.dir.path().join("runs");
    let pids = stack.dir.path().join("pid");
    let task = stack.submit(&lingering_step(&runs, &pids)).await.unwrap();
    stack.wait_running(task).await.unwrap();
    eventually(Duration::from_secs(10), "script started", || async {
        pids.with_extension("1").exists().then_some(())
    })
    .await
    .unwrap();

    // Act: cut it off; a second agent joins to take the retry.
    let cut_at = std::time::Instant::now();
    proxy.cut();
    let lost = stack
        .wait_task_until(task, Duration::from_secs(30), |t| {
            t.steps[0].attempts[0].state == "WorkerLost"
        })
        .await
        .unwrap();
    stack
        .add_agent("other", AgentOpts::default())
        .await
        .unwrap();
    let stopped = eventually(
        Duration::from_secs(20),
        "cut-off script stopped",
        || async { (!alive(&pids.with_extension("1"))).then(|| cut_at.elapsed()) },
    )
    .await
    .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(60))
        .await
        .unwrap();
    proxy.restore();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = stack.task(task).await.unwrap();

    // Assert
    assert!(
        lost.steps[0].attempts[0]
            .error
            .as_deref()
            .unwrap()
            .contains("was lost"),
        "{lost:#?}"
    );
    assert!(
        stopped >= Duration::from_secs(5),
        "stopped only once unavailable_after had passed ({stopped:?})"
    );
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    assert_eq!(done.steps[0].attempts[1].worker.as_deref(), Some("other"));
    assert_eq!(
        std::fs::read_to_string(&runs).unwrap(),
        "start 1\nstart 2\nend 2\n",
        "the cut-off attempt never finished its script"
    );
    assert_eq!(
        after.steps[0].attempts[0].state, "WorkerLost",
        "its late results changed nothing"
    );
    assert!(
        stack
            .agent(0)
            .log_text()
            .contains("no RabbitMQ for the policy's unavailable_after"),
        "the agent says why it stopped the step"
    );
}
