//! A step's output never holds up its end: odd bytes are stored, and a script printing as
//! fast as it can is still stopped on time by its timeout, a cancel or the loss of its mutex
//! lease; a timeout too large for any clock does not hurt the agent.

use gantry_tests::gantry_shared::api::Task;
use gantry_tests::{API_KEY, AgentOpts, Stack, eventually, process_running};
use std::time::{Duration, Instant};

async fn running(stack: &Stack, task: gantry_tests::gantry_shared::ids::TaskId) -> Task {
    stack.wait_running(task).await.unwrap()
}

#[tokio::test]
async fn a_nul_byte_in_output_is_stored_as_a_replacement_character() {
    // Arrange: NUL in a log line, in an output value (raw service message) and in a progress
    // message.
    let mut stack = Stack::start().await.unwrap();
    stack.add_agent("a", AgentOpts::default()).await.unwrap();
    let script = r#"printf 'bin\0ary\n'
printf '##gantry[setVariable name=%s value=%s]\n' "'$(printf Out | base64)'" "'$(printf 'x\0y' | base64)'"
printf '##gantry[progress percentage=%s message=%s]\n' "'$(printf 50 | base64)'" "'$(printf 'half\0way' | base64)'"
echo after
"#;
    let task = stack
        .submit(&format!(
            "name = \"nul\"\n[[steps]]\nname = \"s\"\nscript = '''\n{script}'''\n"
        ))
        .await
        .unwrap();

    // Act
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();

    // Assert
    assert_eq!(done.summary.state, "Success", "{done:?}");
    let log = stack.log(task).await.unwrap();
    let texts: Vec<&str> = log.iter().map(|l| l.text.as_str()).collect();
    assert!(texts.contains(&"bin\u{FFFD}ary"), "{texts:?}");
    assert!(texts.contains(&"after"), "{texts:?}");
    assert_eq!(done.steps[0].outputs.get("Out").unwrap(), "x\u{FFFD}y");
    let db = stack.db().await;
    let progress: Option<String> =
        sqlx::query_scalar("SELECT progress_message FROM attempts WHERE job_id = $1")
            .bind(done.steps[0].attempts[0].job_id.0)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(progress.as_deref(), Some("half\u{FFFD}way"));
}

#[tokio::test]
async fn a_flooding_step_times_out_on_time() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack.add_agent("a", AgentOpts::default()).await.unwrap();
    let task = stack
        .submit("name = \"flood\"\n[[steps]]\nname = \"s\"\ntimeout_secs = 3\nscript = \"yes\"\n")
        .await
        .unwrap();

    // Act: measured from the moment the test first sees the step Running (polled every
    // 50 ms, so at most that much after it started).
    running(&stack, task).await;
    let seen_running = Instant::now();
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();
    let took = seen_running.elapsed();

    // Assert
    assert_eq!(done.steps[0].state, "TimedOut", "{done:?}");
    assert!(
        took < Duration::from_secs(4),
        "TimedOut recorded {took:?} after the step was seen running"
    );
    let log = stack.log(task).await.unwrap();
    assert!(
        log.iter()
            .any(|l| l.text.starts_with("Step exceeded timeout_secs = 3")),
        "the log says why"
    );
    let a = &done.steps[0].attempts[0];
    assert!(
        a.line_count > 1000,
        "the flood was logged: {}",
        a.line_count
    );
}

#[tokio::test]
async fn a_flooding_step_is_cancelled_within_two_seconds() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack.add_agent("a", AgentOpts::default()).await.unwrap();
    let task = stack
        .submit("name = \"flood\"\n[[steps]]\nname = \"s\"\nscript = \"yes\"\n")
        .await
        .unwrap();
    running(&stack, task).await;
    // Let the flood fill every buffer first.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Act
    let asked = Instant::now();
    stack
        .request(
            reqwest::Method::POST,
            &format!("/api/tasks/{task}/cancel"),
            Some(API_KEY),
            None,
        )
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();
    let took = asked.elapsed();

    // Assert
    assert_eq!(done.summary.state, "Cancelled", "{done:?}");
    assert!(took < Duration::from_secs(2), "cancelled after {took:?}");
}

#[tokio::test]
async fn a_flooding_mutex_holder_is_killed_within_a_second_of_losing_its_lease() {
    // Arrange: a 1.5 s lease, renewed every 0.5 s; the holder floods its output.
    let mut stack = Stack::start_with(vec![("GANTRY__LOCKS__LEASE_MS".into(), "1500".into())])
        .await
        .unwrap();
    stack.add_agent("a", AgentOpts::default()).await.unwrap();
    let pid_file = stack.dir.path().join("pid");
    let task = stack
        .submit(&format!(
            "name = \"m\"\n[[steps]]\nname = \"s\"\nmutex = \"m\"\nscript = '''\necho $$ > '{}'\nexec yes\n'''\n",
            pid_file.display()
        ))
        .await
        .unwrap();
    running(&stack, task).await;
    let pid: i32 = eventually(Duration::from_secs(10), "pid written", || async {
        std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        process_running(pid),
        "the flood runs while the lease is renewed"
    );

    // Act: the lease disappears from Redis.
    let client = redis::Client::open(gantry_tests::REDIS_URL).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let lost_at = Instant::now();
    let _: () = redis::cmd("DEL")
        .arg(format!("{}.mutex.m.holder", stack.ns))
        .query_async(&mut c)
        .await
        .unwrap();
    while process_running(pid) && lost_at.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let killed_after = lost_at.elapsed();

    // Assert
    assert!(
        killed_after < Duration::from_secs(1),
        "the holder ran on for {killed_after:?} without its lease"
    );
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.steps[0].state, "Failed", "{done:?}");
}

#[tokio::test]
async fn a_timeout_too_large_for_any_clock_leaves_the_agent_serving() {
    // Arrange: one slot. The second step's timeout is set to 2^64 - 1 in the database while
    // the first runs, before its job is built, so this holds whatever the API accepts.
    let mut stack = Stack::start().await.unwrap();
    let agent = stack
        .add_agent(
            "a",
            AgentOpts {
                max_concurrent_steps: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let go = stack.dir.path().join("go");
    let task = stack
        .submit(&format!(
            "name = \"huge\"\n[[steps]]\nname = \"wait\"\nscript = \"while [ ! -e '{}' ]; do sleep 0.1; done\"\n[[steps]]\nname = \"huge\"\ntimeout_secs = 60\nscript = \"echo still here\"\n",
            go.display()
        ))
        .await
        .unwrap();
    running(&stack, task).await;
    let db = stack.db().await;
    let changed = sqlx::query(
        "UPDATE step_runs SET spec = jsonb_set(spec, '{timeout_secs}', '18446744073709551615'::jsonb)
         WHERE task_id = $1 AND idx = 1",
    )
    .bind(task.0)
    .execute(&db)
    .await
    .unwrap();
    assert_eq!(changed.rows_affected(), 1);
    std::fs::write(&go, "").unwrap();

    // Act
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();
    let next = stack
        .submit("name = \"next\"\n[[steps]]\nname = \"s\"\nscript = \"echo next\"\n")
        .await
        .unwrap();
    let after = stack
        .wait_task(next, Duration::from_secs(30))
        .await
        .unwrap();

    // Assert
    assert_eq!(done.summary.state, "Success", "{done:?}");
    assert_eq!(after.summary.state, "Success", "{after:?}");
    assert_eq!(after.steps[0].worker.as_deref(), Some("a"));
    assert!(
        stack.agent(agent).pid().is_some_and(process_running),
        "the agent lives"
    );
    assert!(!stack.agent(agent).log_text().contains("panicked"));
}
