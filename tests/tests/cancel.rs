//! Cancelling a task: nothing not yet started ever starts, running process trees are killed
//! within seconds, and mutexes are handed on at once.

use gantry_tests::{API_KEY, AgentOpts, Stack, bin, eventually, process_running};
use std::time::{Duration, Instant};

#[tokio::test]
async fn cancelling_stops_the_whole_process_tree_and_hands_the_mutex_on() {
    // Arrange: a mutex step that forks a background grandchild, and a second task waiting
    // for the same mutex.
    let mut stack = Stack::start().await.unwrap();
    stack
        .add_agent("victim", AgentOpts::default())
        .await
        .unwrap();
    let pids = stack.dir.path().join("pids");
    let started = stack.dir.path().join("started");
    let holder = stack
        .submit(&format!(
            "name = \"long\"\n[[steps]]\nname = \"hold\"\nmutex = \"c\"\nscript = '''\nsleep 300 &\necho $! >> '{p}'\necho $$ >> '{p}'\nsleep 300\n'''\n",
            p = pids.display()
        ))
        .await
        .unwrap();
    stack
        .wait_task_until(holder, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
    let waiter = stack
        .submit(&format!(
            "name = \"next\"\n[[steps]]\nname = \"go\"\nmutex = \"c\"\nscript = \"date +%s%N > '{}'\"\n",
            started.display()
        ))
        .await
        .unwrap();
    stack
        .wait_task_until(waiter, Duration::from_secs(30), |t| {
            t.steps[0].state == "Waiting"
        })
        .await
        .unwrap();
    let pid_list: Vec<i32> = eventually(Duration::from_secs(10), "pids written", || async {
        let text = std::fs::read_to_string(&pids).ok()?;
        let v: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        (v.len() == 2).then_some(v)
    })
    .await
    .unwrap();
    assert!(pid_list.iter().all(|p| process_running(*p)));

    // Act
    let cancelled_at = Instant::now();
    let out = std::process::Command::new(bin("gantry"))
        .args([
            "--server",
            &stack.url,
            "--api-key",
            API_KEY,
            "cancel",
            &holder.to_string(),
            "--wait",
        ])
        .output()
        .unwrap();

    // Assert
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Cancelled"));
    eventually(
        Duration::from_secs(5),
        "script and grandchild gone",
        || async { pid_list.iter().all(|p| !process_running(*p)).then_some(()) },
    )
    .await
    .unwrap();
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(6),
        "the tree died within 5 s"
    );
    let done = stack.task(holder).await.unwrap();
    assert_eq!(done.summary.state, "Cancelled");
    assert_eq!(done.steps[0].state, "Cancelled");
    assert_eq!(
        done.steps[0].attempts.len(),
        1,
        "a cancelled step is not retried"
    );
    let next = stack
        .wait_task(waiter, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(next.summary.state, "Success");
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(20),
        "the mutex was handed on at the cancel, not after its 30 s lease"
    );
    let (status, err) = stack
        .request(
            reqwest::Method::POST,
            &format!("/api/tasks/{holder}/cancel"),
            Some(API_KEY),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 409);
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("already ended (Cancelled)")
    );
}

#[tokio::test]
async fn steps_not_yet_started_never_start_even_with_their_job_in_a_queue() {
    // Arrange: the pool's only agent is registered and healthy but stopped (killed between
    // steps, not yet noticed), so the step's job sits in the pool's queue.
    let mut stack = Stack::start().await.unwrap();
    stack.add_pool("later").await.unwrap();
    let idx = stack
        .add_agent(
            "late",
            AgentOpts {
                pools: vec!["later".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    stack.kill_agent(idx).await;
    let marker = stack.dir.path().join("ran");
    let task = stack
        .submit(&format!(
            "name = \"queued\"\n[[steps]]\nname = \"a\"\npool = \"later\"\nscript = \"touch '{m}'\"\n[[steps]]\nname = \"b\"\npool = \"later\"\nscript = \"touch '{m}'\"\n",
            m = marker.display()
        ))
        .await
        .unwrap();
    stack
        .wait_task_until(task, Duration::from_secs(30), |t| {
            t.steps[0].state == "Queued"
        })
        .await
        .unwrap();

    // Act: cancel, then the agent comes back and takes the queued job.
    let (status, body) = stack
        .request(
            reqwest::Method::POST,
            &format!("/api/tasks/{task}/cancel"),
            Some(API_KEY),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let done = stack
        .wait_task(task, Duration::from_secs(20))
        .await
        .unwrap();
    stack.start_agent(idx).await.unwrap();
    let queue = stack.topology().pool_queue("later");
    eventually(Duration::from_secs(20), "queued job consumed", || async {
        (stack.queue_depth(&queue).await.ok()? == 0).then_some(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Assert
    assert_eq!(done.summary.state, "Cancelled");
    assert_eq!(done.steps[0].state, "Cancelled");
    assert_eq!(done.steps[1].state, "Cancelled");
    assert!(
        done.steps[1].attempts.is_empty(),
        "the second step never had an attempt"
    );
    assert!(!marker.exists(), "no script ran");
    assert!(stack.agent(idx).log_text().contains("claim refused"));
}
