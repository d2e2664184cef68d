//! Nothing runs twice and nothing is lost when the dispatcher restarts, a job is delivered
//! twice, or an agent's connection drops before its ack.

use gantry_tests::gantry_shared::ids::{JobId, StepRunId, TaskId};
use gantry_tests::gantry_shared::wire::{Job, Syntax};
use gantry_tests::{AgentOpts, Stack, eventually};
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use std::collections::BTreeMap;
use std::time::Duration;

fn count_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Every attempt's lines are stored once: count equals `lines_stored`, seqs are distinct.
async fn assert_no_duplicates(stack: &Stack, task: TaskId) {
    let db = stack.db().await;
    let (rows, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (step_run_id, attempt, seq)) FROM log_lines
         WHERE task_id = $1 AND seq IS NOT NULL",
    )
    .bind(task.0)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(rows, distinct);
    let stored: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(a.lines_stored), 0)::bigint FROM attempts a
         JOIN step_runs s ON s.id = a.step_run_id WHERE s.task_id = $1",
    )
    .bind(task.0)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(rows, stored);
}

#[tokio::test]
async fn restarting_the_dispatcher_mid_task_loses_and_repeats_nothing() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack
        .add_agent("steady", AgentOpts::default())
        .await
        .unwrap();
    let counter = stack.dir.path().join("runs");
    let step = |name: &str| {
        format!(
            r##"
[[steps]]
name = "{name}"
script = """
echo {name} >> '{}'
for i in $(seq 1 20); do echo "{name} tick $i"; sleep 0.1; done
"""
"##,
            counter.display()
        )
    };
    let process = format!(
        "name = \"restart\"\n{}{}{}",
        step("one"),
        step("two"),
        step("three")
    );

    // Act
    let task = stack.submit(&process).await.unwrap();
    stack
        .wait_task_until(task, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
    stack.kill_dispatcher().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack.start_dispatcher().await.unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(60))
        .await
        .unwrap();

    // Assert
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    for s in &done.steps {
        assert_eq!(s.attempts.len(), 1, "{} ran once", s.name);
        assert_eq!(s.state, "Success");
    }
    let runs = std::fs::read_to_string(&counter).unwrap();
    assert_eq!(
        runs.lines().collect::<Vec<_>>(),
        vec!["one", "two", "three"]
    );
    assert_no_duplicates(&stack, task).await;
    let log = stack.log(task).await.unwrap();
    for name in ["one", "two", "three"] {
        let ticks: Vec<&str> = log
            .iter()
            .filter(|l| l.text.starts_with(&format!("{name} tick")))
            .map(|l| l.text.as_str())
            .collect();
        let expected: Vec<String> = (1..=20).map(|i| format!("{name} tick {i}")).collect();
        assert_eq!(ticks, expected, "{name}: every line once, in order");
    }
}

/// The job of a task's first step, rebuilt from the database, as a duplicate publisher
/// would send it.
async fn job_of(stack: &Stack, task: TaskId, script: &str) -> Job {
    let db = stack.db().await;
    let (step_run, attempt, job_id): (uuid::Uuid, i32, uuid::Uuid) = sqlx::query_as(
        "SELECT a.step_run_id, a.attempt, a.job_id FROM attempts a
         JOIN step_runs s ON s.id = a.step_run_id WHERE s.task_id = $1 AND s.idx = 0",
    )
    .bind(task.0)
    .fetch_one(&db)
    .await
    .unwrap();
    Job {
        job_id: JobId(job_id),
        task_id: task,
        task_name: "dup".into(),
        step_run_id: StepRunId(step_run),
        step_name: "once".into(),
        attempt: attempt as u32,
        syntax: Syntax::Bash,
        script: script.into(),
        variables: BTreeMap::new(),
        sensitive_names: vec![],
        timeout_secs: None,
        cancel_grace_secs: None,
        pool_name: None,
        exclusive: false,
        mutex: None,
        artifacts: vec![],
    }
}

async fn publish_job(stack: &Stack, job: &Job, routing_key: &str) {
    let conn = stack.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let confirm = ch
        .basic_publish(
            stack.topology().jobs_exchange().into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &job.encode(),
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    assert!(confirm.take_message().is_none(), "routed to a queue");
    let _ = conn.close(200, "done".into()).await;
}

async fn queue_depth(stack: &Stack, queue: &str) -> u32 {
    let conn = stack.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
    q.message_count()
}

#[tokio::test]
async fn a_job_published_again_by_hand_runs_once() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack
        .add_agent("first", AgentOpts::default())
        .await
        .unwrap();
    let second = stack
        .add_agent("second", AgentOpts::default())
        .await
        .unwrap();
    let counter = stack.dir.path().join("runs");
    let gate = stack.dir.path().join("gate");
    let script = format!(
        "echo ran >> '{}'\nwhile [ ! -e '{}' ]; do sleep 0.05; done",
        counter.display(),
        gate.display()
    );
    let task = stack
        .submit(&format!(
            "name = \"dup\"\n[[steps]]\nname = \"once\"\nscript = '''\n{script}\n'''\n"
        ))
        .await
        .unwrap();
    let running = stack
        .wait_task_until(task, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
    let runner = running.steps[0].worker.clone().unwrap();
    let job = job_of(&stack, task, &script).await;
    let workers: Vec<gantry_tests::gantry_shared::api::Worker> =
        stack.get("/api/workers").await.unwrap();
    let other = workers.iter().find(|w| w.name != runner).unwrap();

    // Act 1: the same job, while it runs, straight into the other agent's own queue.
    publish_job(&stack, &job, &format!("worker.{}", other.id)).await;
    let other_queue = stack.topology().worker_queue(other.id);
    eventually(Duration::from_secs(20), "duplicate consumed", || async {
        (queue_depth(&stack, &other_queue).await == 0).then_some(())
    })
    .await
    .unwrap();
    std::fs::write(&gate, b"").unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();

    // Act 2: the same job again after the attempt ended, into the pool.
    publish_job(&stack, &job, "pool.default-worker-pool").await;
    let pool_queue = stack.topology().pool_queue("default-worker-pool");
    eventually(
        Duration::from_secs(20),
        "late duplicate consumed",
        || async { (queue_depth(&stack, &pool_queue).await == 0).then_some(()) },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Assert
    assert_eq!(done.summary.state, "Success");
    assert_eq!(done.steps[0].attempts.len(), 1);
    assert_eq!(count_lines(&counter), 1, "the script ran exactly once");
    let logs = stack.all_logs();
    let refusals = logs.matches("claim refused").count();
    assert!(
        refusals >= 2,
        "both duplicates were refused by claim:\n{logs}"
    );
    assert!(
        stack.agent(second).log_text().contains("claim refused") || runner == "second",
        "the other agent refused the running job's duplicate"
    );
}

#[tokio::test]
async fn a_job_redelivered_after_the_connection_dropped_before_its_ack_runs_once() {
    // Arrange: the only agent drops its broker connection right after its first granted
    // claim, before acking; the broker then redelivers the job.
    let mut stack = Stack::start().await.unwrap();
    let flaky = stack
        .add_agent(
            "flaky",
            AgentOpts {
                env: vec![(
                    "GANTRY_AGENT_FAULT".into(),
                    "drop-connection-before-ack".into(),
                )],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let counter = stack.dir.path().join("runs");

    // Act
    let task = stack
        .submit(&format!(
            "name = \"drop\"\n[[steps]]\nname = \"once\"\nscript = '''\necho ran >> '{}'\nfor i in $(seq 1 10); do echo tick $i; sleep 0.1; done\n'''\n",
            counter.display()
        ))
        .await
        .unwrap();
    stack
        .wait_task_until(task, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
    // A second agent joins, so the redelivery may go to either.
    let steady = stack
        .add_agent("steady", AgentOpts::default())
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(60))
        .await
        .unwrap();
    let queue = stack.topology().pool_queue("default-worker-pool");
    eventually(Duration::from_secs(20), "redelivery consumed", || async {
        (queue_depth(&stack, &queue).await == 0).then_some(())
    })
    .await
    .unwrap();

    // Assert
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    assert_eq!(done.steps[0].attempts.len(), 1);
    assert_eq!(done.steps[0].worker.as_deref(), Some("flaky"));
    assert_eq!(count_lines(&counter), 1, "the script ran exactly once");
    let flaky_log = stack.agent(flaky).log_text();
    assert!(flaky_log.contains("fault injection: closing the broker connection"));
    let handled = flaky_log.contains("redelivery of a job already running here")
        || stack.agent(steady).log_text().contains("claim refused");
    assert!(
        handled,
        "the redelivered job was seen and not run:\n{}",
        stack.all_logs()
    );
    let log = stack.log(task).await.unwrap();
    let ticks = log.iter().filter(|l| l.text.starts_with("tick ")).count();
    assert_eq!(ticks, 10, "results sent after the reconnect arrived, once");
}

#[tokio::test]
async fn sigterm_lets_the_running_step_finish_and_the_agent_exits_zero() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    let idx = stack
        .add_agent("drainer", AgentOpts::default())
        .await
        .unwrap();
    let task = stack
        .submit(
            "name = \"d\"\n[[steps]]\nname = \"s\"\nscript = '''\nsleep 2\necho finished\n'''\n",
        )
        .await
        .unwrap();
    stack
        .wait_task_until(task, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
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
    stack
        .wait_task_until(task, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
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
    let running = stack
        .wait_task_until(task, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
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
    stack
        .wait_task_until(task, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
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
