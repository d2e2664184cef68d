//! Concurrency limits and exclusive execution under load and faults: named mutexes across a
//! fleet, exclusive steps on one agent, prefetch fairness, a killed lock holder, timeouts.
//!
//! Scripts record their own start and end (nanoseconds, `date +%s%N`) in a shared file: what
//! a mutex protects is the script's run, so that is what the assertions measure.

use gantry_tests::gantry_shared::ids::TaskId;
use gantry_tests::{AgentOpts, Stack, eventually};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

/// A script line that records an event with the task id.
fn mark(file: &Path, what: &str) -> String {
    format!(
        "echo \"{what} $(date +%s%N) #{{Gantry.Task.Id}}\" >> '{}'",
        file.display()
    )
}

/// Task id → (start ns, end ns) as the scripts recorded them.
fn intervals(file: &Path) -> HashMap<String, (i128, i128)> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut starts = HashMap::new();
    let mut ends = HashMap::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let (Some(kind), Some(ts), Some(task)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let ts: i128 = ts.parse().unwrap();
        match kind {
            "start" => {
                starts.insert(task.to_owned(), ts);
            }
            "end" => {
                ends.insert(task.to_owned(), ts);
            }
            _ => {}
        }
    }
    starts
        .into_iter()
        .filter_map(|(t, s)| ends.get(&t).map(|e| (t, (s, *e))))
        .collect()
}

/// The most intervals open at one instant.
fn max_overlap(iv: &[(i128, i128)]) -> usize {
    let mut points: Vec<(i128, i32)> = iv.iter().flat_map(|(a, b)| [(*a, 1), (*b, -1)]).collect();
    points.sort();
    let (mut cur, mut best) = (0, 0);
    for (_, d) in points {
        cur += d;
        best = best.max(cur);
    }
    best as usize
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test]
async fn mutex_steps_never_overlap_anywhere_while_the_rest_runs_in_parallel() {
    // Arrange: 4 agents of 4 slots; 200 one-step tasks, a quarter sharing one mutex.
    let mut stack = Stack::start().await.unwrap();
    for i in 0..4 {
        stack
            .add_agent(&format!("fleet-{i}"), AgentOpts::default())
            .await
            .unwrap();
    }
    let mutexed = stack.dir.path().join("mutexed");
    let free = stack.dir.path().join("free");
    // Free steps last long enough to overlap whatever the submission rate (the tasks are
    // submitted one after the other, a few dozen a second on a busy machine).
    let process = |file: &Path, mutex: bool| {
        format!(
            "name = \"load\"\n[[steps]]\nname = \"work\"\n{}script = '''\n{}\nsleep {}\n{}\n'''\n",
            if mutex { "mutex = \"shared-db\"\n" } else { "" },
            mark(file, "start"),
            if mutex { "0.05" } else { "0.3" },
            mark(file, "end"),
        )
    };

    // Act
    let mut tasks: Vec<TaskId> = Vec::new();
    for i in 0..200 {
        let p = if i % 4 == 0 {
            process(&mutexed, true)
        } else {
            process(&free, false)
        };
        tasks.push(stack.submit(&p).await.unwrap());
    }
    for t in &tasks {
        let done = stack.wait_task(*t, Duration::from_secs(240)).await.unwrap();
        assert_eq!(done.summary.state, "Success", "{done:#?}");
    }

    // Assert
    let m: Vec<(i128, i128)> = intervals(&mutexed).into_values().collect();
    let f: Vec<(i128, i128)> = intervals(&free).into_values().collect();
    assert_eq!(m.len(), 50);
    assert_eq!(f.len(), 150);
    assert_eq!(max_overlap(&m), 1, "two mutex steps overlapped");
    assert!(
        max_overlap(&f) > 4,
        "steps without the mutex ran in parallel across the fleet"
    );
    // Hand-over: from one holder's script end to the next one's script start.
    let mut sorted = m.clone();
    sorted.sort();
    let mut gaps: Vec<f64> = sorted
        .windows(2)
        .map(|w| (w[1].0 - w[0].1) as f64 / 1e6)
        .collect();
    gaps.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "mutex hand-over (script end to next script start): p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms over {} hand-overs",
        percentile(&gaps, 0.5),
        percentile(&gaps, 0.9),
        gaps.last().unwrap(),
        gaps.len()
    );
    let db = stack.db().await;
    let tokens: Vec<i64> = sqlx::query_scalar(
        "SELECT mutex_token FROM attempts WHERE mutex_token IS NOT NULL ORDER BY started_at",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(tokens.len(), 50);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens grow with each grant"
    );
}

#[tokio::test]
async fn an_exclusive_step_waits_for_running_steps_and_blocks_new_ones() {
    // Arrange: one agent with room for four.
    let mut stack = Stack::start().await.unwrap();
    stack.add_agent("solo", AgentOpts::default()).await.unwrap();
    let file = stack.dir.path().join("marks");
    let step = |extra: &str, secs: f64| {
        format!(
            "name = \"x\"\n[[steps]]\nname = \"s\"\n{extra}script = '''\n{}\nsleep {secs}\n{}\n'''\n",
            mark(&file, "start"),
            mark(&file, "end")
        )
    };

    // Act
    let long1 = stack.submit(&step("", 2.0)).await.unwrap();
    let long2 = stack.submit(&step("", 2.5)).await.unwrap();
    for t in [long1, long2] {
        stack
            .wait_task_until(t, Duration::from_secs(30), |t| {
                t.steps[0].state == "Running"
            })
            .await
            .unwrap();
    }
    let exclusive = stack
        .submit(&step("exclusive = true\n", 1.0))
        .await
        .unwrap();
    let waiting = stack
        .wait_task_until(exclusive, Duration::from_secs(30), |t| {
            t.steps[0].state == "Waiting"
        })
        .await
        .unwrap();
    let later = stack.submit(&step("", 0.1)).await.unwrap();
    for t in [long1, long2, exclusive, later] {
        let done = stack.wait_task(t, Duration::from_secs(60)).await.unwrap();
        assert_eq!(done.summary.state, "Success");
    }

    // Assert
    let reason = waiting.steps[0].waiting_for.clone().unwrap();
    assert!(
        reason.contains("exclusive access to worker solo: 2 other step(s)"),
        "{reason}"
    );
    let iv = intervals(&file);
    let at = |t: TaskId| iv[&t.to_string()];
    let (x_start, x_end) = at(exclusive);
    assert!(
        x_start >= at(long1).1 && x_start >= at(long2).1,
        "started after the running steps ended"
    );
    assert!(
        at(later).0 >= x_end,
        "nothing started on the agent while it ran"
    );
    let log = stack.log(exclusive).await.unwrap();
    assert!(
        log.iter()
            .any(|l| l.text.contains("waiting for exclusive access"))
    );
}

#[tokio::test]
async fn a_short_step_runs_at_once_on_the_idle_agent() {
    // Arrange: two agents of one slot each; one gets a long step.
    let mut stack = Stack::start().await.unwrap();
    for name in ["busy", "idle"] {
        stack
            .add_agent(
                name,
                AgentOpts {
                    max_concurrent_steps: 1,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    let long = stack
        .submit("name = \"long\"\n[[steps]]\nname = \"s\"\nscript = \"sleep 8\"\n")
        .await
        .unwrap();
    let running = stack
        .wait_task_until(long, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();

    // Act
    let short = stack
        .submit("name = \"short\"\n[[steps]]\nname = \"s\"\nscript = \"echo quick\"\n")
        .await
        .unwrap();
    let done = stack
        .wait_task(short, Duration::from_secs(30))
        .await
        .unwrap();

    // Assert
    assert_eq!(done.summary.state, "Success");
    assert_ne!(
        done.steps[0].worker, running.steps[0].worker,
        "it went to the idle agent"
    );
    let still = stack.task(long).await.unwrap();
    assert_eq!(
        still.steps[0].state, "Running",
        "it did not wait behind the long step"
    );
}

#[tokio::test]
async fn killing_the_mutex_holders_agent_frees_the_mutex_only_once_its_lease_expired() {
    // Arrange: a 4 s lease; the holder runs on agent "doomed", a waiter queues behind it.
    let lease_ms = 4000;
    let mut stack = Stack::start_with(vec![(
        "GANTRY__LOCKS__LEASE_MS".into(),
        lease_ms.to_string(),
    )])
    .await
    .unwrap();
    let doomed = stack
        .add_agent(
            "doomed",
            AgentOpts {
                max_concurrent_steps: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let ticks = stack.dir.path().join("ticks");
    let marks = stack.dir.path().join("marks");
    let holder = stack
        .submit(&format!(
            "name = \"holder\"\n[[steps]]\nname = \"hold\"\nmutex = \"db\"\nscript = '''\nfor i in $(seq 1 600); do echo \"tick $(date +%s%N)\" >> '{}'; sleep 0.1; done\n'''\n",
            ticks.display()
        ))
        .await
        .unwrap();
    stack
        .wait_task_until(holder, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
    stack
        .add_agent(
            "survivor",
            AgentOpts {
                max_concurrent_steps: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let waiter = stack
        .submit(&format!(
            "name = \"waiter\"\n[[steps]]\nname = \"next\"\nmutex = \"db\"\nscript = '''\n{}\n{}\n'''\n",
            mark(&marks, "start"),
            mark(&marks, "end")
        ))
        .await
        .unwrap();
    let queued = stack
        .wait_task_until(waiter, Duration::from_secs(30), |t| {
            t.steps[0]
                .waiting_for
                .as_deref()
                .is_some_and(|w| w.contains("held by task"))
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Act
    let killed_at = chrono::Utc::now();
    stack.kill_agent(doomed).await;
    let done = stack
        .wait_task(waiter, Duration::from_secs(60))
        .await
        .unwrap();
    let lost = stack
        .wait_task(holder, Duration::from_secs(30))
        .await
        .unwrap();

    // Assert
    assert!(
        queued.steps[0]
            .waiting_for
            .as_deref()
            .unwrap()
            .contains(&holder.to_string())
    );
    assert_eq!(done.summary.state, "Success");
    assert_eq!(lost.steps[0].state, "WorkerLost", "{lost:#?}");
    assert!(lost.steps[0].reason.as_deref().unwrap().contains("doomed"));
    let lost_at = lost.steps[0].attempts[0].finished_at.unwrap();
    assert!(
        (lost_at - killed_at).num_milliseconds() < 6000,
        "noticed lost within seconds of the kill"
    );
    let (start, _) = intervals(&marks)[&waiter.to_string()];
    let start = chrono::DateTime::from_timestamp_nanos(start as i64);
    assert!(
        start >= lost_at,
        "the waiter started only after the holder was marked lost"
    );
    // The holder renewed at most a third of a lease before it died.
    assert!(
        (start - killed_at).num_milliseconds() >= lease_ms * 2 / 3,
        "the waiter started only after the lease could have expired ({} ms after the kill)",
        (start - killed_at).num_milliseconds()
    );
    let last_tick: i128 = std::fs::read_to_string(&ticks)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .max()
        .unwrap();
    let last_tick = chrono::DateTime::from_timestamp_nanos(last_tick as i64);
    assert!(
        last_tick < start,
        "the dead agent's script stopped before the next holder began"
    );
    assert!(
        (last_tick - killed_at).num_milliseconds() < 1000,
        "the holder's script died with its agent"
    );
}

#[tokio::test]
async fn a_step_that_waits_too_long_for_its_mutex_fails_with_the_reason() {
    let mut stack = Stack::start().await.unwrap();
    stack.add_agent("a", AgentOpts::default()).await.unwrap();
    let holder = stack
        .submit("name = \"h\"\n[[steps]]\nname = \"s\"\nmutex = \"slow\"\nscript = \"sleep 4\"\n")
        .await
        .unwrap();
    stack
        .wait_task_until(holder, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
    let impatient = stack
        .submit("name = \"i\"\n[[steps]]\nname = \"s\"\nmutex = \"slow\"\nmutex_timeout_secs = 1\nscript = \"echo never\"\n")
        .await
        .unwrap();
    let done = stack
        .wait_task(impatient, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.summary.state, "Failed");
    let reason = done.steps[0].reason.clone().unwrap();
    assert!(
        reason.contains("mutex slow was not granted within mutex_timeout_secs = 1"),
        "{reason}"
    );
    assert!(
        reason.contains(&format!("held by task {holder}")),
        "{reason}"
    );
    assert!(
        done.steps[0].attempts[0].started_at.is_none(),
        "it never ran"
    );
    let held = stack
        .wait_task(holder, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(held.summary.state, "Success");
}

#[tokio::test]
async fn a_failed_mutex_step_hands_the_mutex_on_at_once() {
    // The default lease is 30 s: a hand-over within a few seconds shows a release, not expiry.
    let mut stack = Stack::start().await.unwrap();
    stack.add_agent("a", AgentOpts::default()).await.unwrap();
    let marks = stack.dir.path().join("marks");
    let failing = stack
        .submit(&format!(
            "name = \"f\"\n[[steps]]\nname = \"s\"\nmutex = \"m\"\nscript = '''\nsleep 1\n{}\nexit 3\n'''\n",
            mark(&marks, "end")
        ))
        .await
        .unwrap();
    stack
        .wait_task_until(failing, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
    let next = stack
        .submit(&format!(
            "name = \"n\"\n[[steps]]\nname = \"s\"\nmutex = \"m\"\nscript = '''\n{}\n{}\n'''\n",
            mark(&marks, "start"),
            mark(&marks, "end")
        ))
        .await
        .unwrap();
    let f = stack
        .wait_task(failing, Duration::from_secs(30))
        .await
        .unwrap();
    let n = stack
        .wait_task(next, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        (f.summary.state.as_str(), n.summary.state.as_str()),
        ("Failed", "Success")
    );
    let text = std::fs::read_to_string(&marks).unwrap();
    let ts = |kind: &str, task: TaskId| -> i128 {
        text.lines()
            .find(|l| l.starts_with(kind) && l.ends_with(&task.to_string()))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap()
    };
    let gap_ms = (ts("start", next) - ts("end", failing)) / 1_000_000;
    assert!(
        (0..10_000).contains(&gap_ms),
        "released at the failure, not at expiry: {gap_ms} ms"
    );
    eventually(Duration::from_secs(5), "lease gone from Redis", || async {
        let client = redis::Client::open(gantry_tests::REDIS_URL).ok()?;
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        let exists: bool = redis::cmd("EXISTS")
            .arg(format!("{}.mutex.m.holder", stack.ns))
            .query_async(&mut c)
            .await
            .ok()?;
        (!exists).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_holder_that_cannot_reach_the_dispatcher_to_renew_stops_its_step_within_half_a_lease() {
    // Arrange: the agent reaches the dispatcher's API only through a proxy the test can cut
    // (its broker connection stays up); a 4 s lease, renewed every 1.3 s, given up after 2 s.
    let mut stack = Stack::start_with(vec![("GANTRY__LOCKS__LEASE_MS".into(), "4000".into())])
        .await
        .unwrap();
    let proxy = gantry_tests::CutProxy::start(&stack.http_bind)
        .await
        .unwrap();
    stack
        .add_agent(
            "far",
            AgentOpts {
                server: Some(format!("http://127.0.0.1:{}", proxy.port)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let ticks = stack.dir.path().join("ticks");
    let task = stack
        .submit(&format!(
            "name = \"far\"\n[[steps]]\nname = \"s\"\nmutex = \"m\"\nscript = '''\nwhile true; do date +%s%N >> '{}'; sleep 0.1; done\n'''\n",
            ticks.display()
        ))
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the script ticks", || async {
        std::fs::metadata(&ticks).ok().filter(|m| m.len() > 0)
    })
    .await
    .unwrap();

    // Act
    let cut_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128;
    proxy.cut();
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();

    // Assert
    let last: i128 = std::fs::read_to_string(&ticks)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .max()
        .unwrap();
    let ran_on_ms = (last - cut_at) / 1_000_000;
    assert!(
        ran_on_ms < 3_500,
        "stopped within half a lease (2 s) of the last renewal, plus a renewal period: ran {ran_on_ms} ms after the cut"
    );
    assert_eq!(done.summary.state, "Failed", "{done:#?}");
    let error = done.steps[0].attempts[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("could not renew its lease on mutex m"),
        "{error}"
    );
}
