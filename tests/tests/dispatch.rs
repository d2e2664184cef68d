//! The core dispatch path, end to end: real dispatcher and agent processes, real RabbitMQ,
//! PostgreSQL and Redis.

use gantry_tests::{AgentOpts, Stack, max_overlap};
use std::time::Duration;

type Intervals = Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)>;

/// Per attempt: every stored line has seq 0..n-1 exactly once, and n equals `lines_stored`.
async fn assert_gapless(db: &sqlx::PgPool, task: gantry_tests::gantry_shared::ids::TaskId) {
    let rows: Vec<(uuid::Uuid, i32, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT a.step_run_id, a.attempt, a.lines_stored,
                count(l.seq), COALESCE(min(l.seq), 0), COALESCE(max(l.seq), -1)
         FROM attempts a JOIN step_runs s ON s.id = a.step_run_id
         LEFT JOIN log_lines l ON l.step_run_id = a.step_run_id AND l.attempt = a.attempt AND l.seq IS NOT NULL
         WHERE s.task_id = $1 GROUP BY a.step_run_id, a.attempt, a.lines_stored",
    )
    .bind(task.0)
    .fetch_all(db)
    .await
    .unwrap();
    assert!(!rows.is_empty());
    for (step, attempt, stored, count, min, max) in rows {
        assert_eq!(count, stored, "step {step} attempt {attempt}: lines stored");
        assert!(count > 0, "every attempt logs at least its start line");
        assert_eq!(
            (min, max),
            (0, count - 1),
            "step {step}: seq range has no gap"
        );
    }
    // Task-wide positions are gapless too.
    let (n, maxpos): (i64, Option<i64>) =
        sqlx::query_as("SELECT count(*), max(pos) FROM log_lines WHERE task_id = $1")
            .bind(task.0)
            .fetch_one(db)
            .await
            .unwrap();
    assert_eq!(Some(n), maxpos, "positions 1..n without a gap");
}

#[tokio::test]
async fn three_steps_across_two_pools_run_on_their_pools_with_every_line_in_order() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack.add_pool("alpha").await.unwrap();
    stack.add_pool("beta").await.unwrap();
    stack
        .add_agent(
            "agent-alpha",
            AgentOpts {
                pools: vec!["alpha".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    stack
        .add_agent(
            "agent-beta",
            AgentOpts {
                pools: vec!["beta".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();

    // Act
    let task = stack
        .submit(
            r##"
name = "two-pools"
[variables]
Greeting = "hello"
[[steps]]
name = "build"
pool = "alpha"
script = """
for i in $(seq 1 200); do echo "build line $i"; done
echo "#{Greeting} from $Greeting" >&2
set_gantryvariable version 2.0.#{Gantry.Step.Attempt}
"""
[[steps]]
name = "package"
pool = "beta"
syntax = "python3"
script = """
import sys
for i in range(1, 301):
    print(f"package line {i}")
print("version #{Steps.build.Output.version}", file=sys.stderr)
"""
[[steps]]
name = "publish"
pool = "alpha"
syntax = "sh"
script = "echo published $Steps_build_Output_version on #{Gantry.WorkerPool.Name}"
"##,
        )
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(60))
        .await
        .unwrap();

    // Assert
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    let by_name = |n: &str| done.steps.iter().find(|s| s.name == n).unwrap();
    for (step, worker, pool) in [
        ("build", "agent-alpha", "alpha"),
        ("package", "agent-beta", "beta"),
        ("publish", "agent-alpha", "alpha"),
    ] {
        let s = by_name(step);
        assert_eq!(s.state, "Success");
        assert_eq!(
            s.worker.as_deref(),
            Some(worker),
            "{step} ran on its pool's agent"
        );
        assert_eq!(s.pool.as_deref(), Some(pool));
        assert_eq!(s.attempts.len(), 1);
        assert_eq!(s.exit_code, Some(0));
    }
    assert_eq!(by_name("build").outputs["version"], "2.0.1");

    let db = stack.db().await;
    assert_gapless(&db, task).await;
    let build: Vec<String> = sqlx::query_scalar(
        "SELECT l.text FROM log_lines l JOIN step_runs s ON s.id = l.step_run_id
         WHERE s.task_id = $1 AND s.name = 'build' AND l.stream = 1 ORDER BY l.seq",
    )
    .bind(task.0)
    .fetch_all(&db)
    .await
    .unwrap();
    let expected: Vec<String> = (1..=200).map(|i| format!("build line {i}")).collect();
    assert_eq!(build, expected);
    let log = stack.log(task).await.unwrap();
    let texts: Vec<&str> = log.iter().map(|l| l.text.as_str()).collect();
    assert!(
        texts.contains(&"hello from hello"),
        "variables substituted and exported"
    );
    assert!(
        texts.contains(&"version 2.0.1"),
        "outputs flow to later steps"
    );
    assert!(texts.contains(&"published 2.0.1 on alpha"));
    let first_package = texts.iter().position(|t| *t == "package line 1").unwrap();
    let last_build = texts.iter().position(|t| *t == "build line 200").unwrap();
    assert!(last_build < first_package, "the task log is in step order");
    let stderr = log.iter().find(|l| l.text == "hello from hello").unwrap();
    assert_eq!(stderr.stream, "stderr");
}

#[tokio::test]
async fn a_failing_step_fails_the_task_and_skips_the_rest() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack.add_agent("solo", AgentOpts::default()).await.unwrap();

    // Act
    let task = stack
        .submit(
            r##"
name = "fails"
[[steps]]
name = "ok"
script = "echo fine"
[[steps]]
name = "boom"
script = """
echo "about to fail"
echo "disk full: /var/lib/app" >&2
exit 7
"""
[[steps]]
name = "after"
script = "echo should not run"
[[steps]]
name = "cleanup"
condition = "always"
script = "echo cleaning up"
"##,
        )
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(60))
        .await
        .unwrap();

    // Assert
    assert_eq!(done.summary.state, "Failed");
    assert!(
        done.summary.error.as_deref().unwrap().contains("boom"),
        "{:?}",
        done.summary.error
    );
    let step = |n: &str| done.steps.iter().find(|s| s.name == n).unwrap().clone();
    assert_eq!(step("ok").state, "Success");
    let boom = step("boom");
    assert_eq!(boom.state, "Failed");
    assert_eq!(boom.exit_code, Some(7));
    let after = step("after");
    assert_eq!(after.state, "Skipped");
    assert!(after.attempts.is_empty(), "a skipped step never ran");
    assert!(after.reason.unwrap().contains("boom"));
    assert_eq!(step("cleanup").state, "Success", "always-steps still run");
    let log = stack.log(task).await.unwrap();
    let err = log
        .iter()
        .find(|l| l.text == "disk full: /var/lib/app")
        .expect("stderr recorded");
    assert_eq!(err.stream, "stderr");
    assert_eq!(err.step.as_deref(), Some("boom"));
    assert!(!log.iter().any(|l| l.text == "should not run"));
    assert!(log.iter().any(|l| l.text == "cleaning up"));
}

async fn intervals_by_worker(
    stack: &Stack,
    tasks: &[gantry_tests::gantry_shared::ids::TaskId],
) -> std::collections::HashMap<String, Intervals> {
    let db = stack.db().await;
    let ids: Vec<uuid::Uuid> = tasks.iter().map(|t| t.0).collect();
    let rows: Vec<(
        String,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    )> = sqlx::query_as(
        "SELECT a.worker_name, a.started_at, a.finished_at FROM attempts a
             JOIN step_runs s ON s.id = a.step_run_id WHERE s.task_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&db)
    .await
    .unwrap();
    let mut map: std::collections::HashMap<String, Intervals> = Default::default();
    for (w, a, b) in rows {
        map.entry(w).or_default().push((a, b));
    }
    map
}

/// Steps that outlast the agent's queue probe: a consumer waiting on the worker's own empty
/// queue moves to the pool's only at the next probe, up to 1 s later (`slots/consumers.rs`),
/// so with 1-second steps the overlaps asserted below were once missed under load.
const SLEEPER: &str = r##"
name = "sleeper"
[[steps]]
name = "nap"
script = "echo start; sleep 3; echo end"
"##;

#[tokio::test]
async fn an_agent_never_runs_more_than_its_limit() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack
        .add_agent(
            "limited",
            AgentOpts {
                max_concurrent_steps: 2,
                ..Default::default()
            },
        )
        .await
        .unwrap();

    // Act
    let mut tasks = Vec::new();
    for _ in 0..6 {
        tasks.push(stack.submit(SLEEPER).await.unwrap());
    }
    for t in &tasks {
        let done = stack.wait_task(*t, Duration::from_secs(60)).await.unwrap();
        assert_eq!(done.summary.state, "Success");
    }

    // Assert
    let by_worker = intervals_by_worker(&stack, &tasks).await;
    let limited = &by_worker["limited"];
    assert_eq!(limited.len(), 6);
    assert_eq!(
        max_overlap(limited),
        2,
        "two at once, never more: {limited:?}"
    );
}

#[tokio::test]
async fn two_agents_on_one_pool_share_the_work() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    for name in ["left", "right"] {
        stack
            .add_agent(
                name,
                AgentOpts {
                    max_concurrent_steps: 2,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }

    // Act
    let mut tasks = Vec::new();
    for _ in 0..6 {
        tasks.push(stack.submit(SLEEPER).await.unwrap());
    }
    for t in &tasks {
        let done = stack.wait_task(*t, Duration::from_secs(60)).await.unwrap();
        assert_eq!(done.summary.state, "Success");
    }

    // Assert
    let by_worker = intervals_by_worker(&stack, &tasks).await;
    assert_eq!(by_worker.len(), 2, "both agents ran steps: {by_worker:?}");
    for (w, iv) in &by_worker {
        assert!(max_overlap(iv) <= 2, "{w} exceeded its limit");
    }
    let all: Intervals = by_worker.values().flatten().cloned().collect();
    assert!(
        max_overlap(&all) >= 3,
        "the pool ran more than one agent's worth at once"
    );
}

#[tokio::test]
async fn a_hundred_thousand_lines_are_stored_once_and_in_order() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack
        .add_agent("chatty", AgentOpts::default())
        .await
        .unwrap();

    // Act
    let task = stack
        .submit(
            r##"
name = "chatty"
[[steps]]
name = "print"
script = "seq 0 99999 | sed 's/^/line /'"
"##,
        )
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(120))
        .await
        .unwrap();

    // Assert
    assert_eq!(done.summary.state, "Success");
    let db = stack.db().await;
    assert_gapless(&db, task).await;
    let lines: Vec<String> = sqlx::query_scalar(
        "SELECT text FROM log_lines WHERE task_id = $1 AND stream = 1 ORDER BY seq",
    )
    .bind(task.0)
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(lines.len(), 100_000);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(*l, format!("line {i}"), "line {i} out of place");
    }
    // Sent in batches, not one message per line.
    let metrics = stack
        .http
        .get(format!("{}/metrics", stack.url))
        .bearer_auth(gantry_tests::API_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counter = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
            .trim()
            .parse()
            .unwrap()
    };
    let (batches, lines) = (
        counter("gantry_log_batches_total"),
        counter("gantry_log_lines_total"),
    );
    assert!(lines >= 100_000.0);
    assert!(
        lines / batches >= 50.0,
        "{lines} lines in {batches} batches: batching is not working"
    );
}

#[tokio::test]
async fn output_streams_while_the_step_runs() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack.add_agent("live", AgentOpts::default()).await.unwrap();
    let gate = stack.dir.path().join("gate");

    // Act: the step prints, then waits for a file that the test creates only after it saw
    // the first line through the API.
    let task = stack
        .submit(&format!(
            r##"
name = "live"
[[steps]]
name = "wait"
script = """
echo first
while [ ! -e '{}' ]; do sleep 0.05; done
echo second
"""
"##,
            gate.display()
        ))
        .await
        .unwrap();
    let seen = gantry_tests::eventually(Duration::from_secs(30), "first line visible", || async {
        let log = stack.log(task).await.ok()?;
        log.iter().any(|l| l.text == "first").then_some(())
    })
    .await;

    // Assert
    let state = stack.task(task).await.unwrap().summary.state;
    std::fs::write(&gate, b"").unwrap();
    seen.unwrap();
    assert_eq!(
        state, "Executing",
        "the line arrived while the step was still running"
    );
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.summary.state, "Success");
    assert!(
        stack
            .log(task)
            .await
            .unwrap()
            .iter()
            .any(|l| l.text == "second")
    );
}

#[tokio::test]
async fn sensitive_outputs_flow_to_later_steps_masked_and_sealed() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack
        .add_agent("secretive", AgentOpts::default())
        .await
        .unwrap();

    // Act
    let task = stack
        .submit(
            r##"
name = "secret-output"
[variables]
PATH = "not-a-path"
[[steps]]
name = "mint"
script = "set_gantryvariable token tok-8c1d2e3f4a sensitive; set_gantryvariable plain visible-1"
[[steps]]
name = "use"
syntax = "python3"
script = """
import os
print("token is #{Steps.mint.Output.token}")
print("env has", os.environ["Steps_mint_Output_token"][::-1])
print("plain is #{Steps.mint.Output.plain}, PATH var #{PATH}")
"""
"##,
        )
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(60))
        .await
        .unwrap();

    // Assert
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    let mint = done.steps.iter().find(|s| s.name == "mint").unwrap();
    assert_eq!(mint.outputs["token"], "********");
    assert_eq!(mint.outputs["plain"], "visible-1");
    let texts: Vec<String> = stack.log_texts(task).await.unwrap();
    assert!(texts.contains(&"token is ********".to_owned()), "{texts:?}");
    assert!(
        texts.contains(&"env has a4f3e2d1c8-kot".to_owned()),
        "the value reached the environment"
    );
    assert!(texts.contains(&"plain is visible-1, PATH var not-a-path".to_owned()));
    assert!(
        texts
            .iter()
            .any(|t| t.contains("not exported to the environment") && t.contains("PATH")),
        "a reserved name is not exported, and the step says so: {texts:?}"
    );
    let db = stack.db().await;
    let leaks: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM log_lines WHERE text LIKE '%tok-8c1d2e3f4a%')
              + (SELECT count(*) FROM output_variables WHERE value LIKE '%tok-8c1d2e3f4a%'
                 OR position('tok-8c1d2e3f4a'::bytea in COALESCE(sealed, ''::bytea)) > 0)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(leaks, 0, "the sensitive output is nowhere in clear");
}

#[tokio::test]
async fn a_disabled_worker_takes_no_steps_until_enabled_and_limits_change_live() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack
        .add_agent(
            "switch",
            AgentOpts {
                max_concurrent_steps: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let workers: Vec<gantry_tests::gantry_shared::api::Worker> =
        stack.get("/api/workers").await.unwrap();
    let id = workers[0].id;
    let patch = |body: serde_json::Value| {
        let stack = &stack;
        async move {
            let (status, b) = stack
                .request(
                    reqwest::Method::PATCH,
                    &format!("/api/workers/{id}"),
                    Some(gantry_tests::API_KEY),
                    Some(body),
                )
                .await
                .unwrap();
            assert_eq!(status, 200, "{b}");
        }
    };

    // Act 1: disabled, a submitted step waits in the queue.
    patch(serde_json::json!({ "enabled": false })).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = stack.submit(SLEEPER).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = stack.task(waiting).await.unwrap();
    assert_eq!(
        still.steps[0].state, "Waiting",
        "a disabled worker takes nothing: {still:#?}"
    );
    assert_eq!(
        still.steps[0].waiting_for.as_deref(),
        Some("pool Default Worker Pool has no healthy worker: 1 disabled")
    );

    // Act 2: enabled with a limit of 3, four steps at once.
    patch(serde_json::json!({ "enabled": true, "max_concurrent_steps": 3 })).await;
    let mut tasks = vec![waiting];
    for _ in 0..3 {
        tasks.push(stack.submit(SLEEPER).await.unwrap());
    }
    for t in &tasks {
        let done = stack.wait_task(*t, Duration::from_secs(60)).await.unwrap();
        assert_eq!(done.summary.state, "Success");
    }

    // Assert
    let by_worker = intervals_by_worker(&stack, &tasks).await;
    let iv = &by_worker["switch"];
    assert_eq!(
        max_overlap(iv),
        3,
        "the new limit applied without a restart: {iv:?}"
    );
}
