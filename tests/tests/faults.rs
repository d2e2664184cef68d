//! Nothing runs twice and nothing is lost when the dispatcher restarts, a job is delivered
//! twice, or an agent's connection drops before its ack. (Agents lost mid-step are in
//! `agent_loss.rs`, agents draining in `drains.rs`.)

use gantry_tests::gantry_shared::ids::{JobId, StepRunId, TaskId};
use gantry_tests::gantry_shared::wire::{Job, Syntax};
use gantry_tests::{AgentOpts, Stack, count_lines, eventually};
use lapin::options::BasicPublishOptions;
use std::collections::BTreeMap;
use std::time::Duration;

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
    stack.wait_running(task).await.unwrap();
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
    let running = stack.wait_running(task).await.unwrap();
    let runner = running.steps[0].worker.clone().unwrap();
    let job = job_of(&stack, task, &script).await;
    let workers: Vec<gantry_tests::gantry_shared::api::Worker> =
        stack.get("/api/workers").await.unwrap();
    let other = workers.iter().find(|w| w.name != runner).unwrap();

    // Act 1: the same job, while it runs, straight into the other agent's own queue.
    publish_job(&stack, &job, &format!("worker.{}", other.id)).await;
    let other_queue = stack.topology().worker_queue(other.id);
    eventually(Duration::from_secs(20), "duplicate consumed", || async {
        (stack.queue_depth(&other_queue).await.unwrap() == 0).then_some(())
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
        || async { (stack.queue_depth(&pool_queue).await.unwrap() == 0).then_some(()) },
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
    stack.wait_running(task).await.unwrap();
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
        (stack.queue_depth(&queue).await.unwrap() == 0).then_some(())
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
