//! A step's output is paced by what the dispatcher has stored (a window of lines in flight),
//! not by a fixed rate: a verbose step's lines are all stored, in order, at the speed the
//! dispatcher stores them; and only a job's own worker learns how far its log is stored.

use gantry_tests::gantry_shared::api::{ErrorBody, WORKER_TOKEN_HEADER};
use gantry_tests::gantry_shared::ids::JobId;
use gantry_tests::{AgentOpts, Stack};
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_verbose_step_is_stored_whole_and_not_throttled() {
    // Arrange: 300,000 short lines as fast as `seq` prints them. The old fixed cap
    // (2,000 lines a second) needed 150 s for them.
    const LINES: u64 = 300_000;
    let mut stack = Stack::start().await.unwrap();
    let agent = stack.add_agent("a", AgentOpts::default()).await.unwrap();
    let started = Instant::now();
    let task = stack
        .submit(&format!(
            "name = \"verbose\"\n[[steps]]\nname = \"s\"\nscript = \"seq -f 'line %.0f' 1 {LINES}\"\n"
        ))
        .await
        .unwrap();

    // Act
    let done = stack
        .wait_task(task, Duration::from_secs(120))
        .await
        .unwrap();
    let took = started.elapsed();
    let log = stack.log(task).await.unwrap();

    // Assert
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    let printed: Vec<_> = log.iter().filter(|l| l.stream == "stdout").collect();
    assert_eq!(printed.len() as u64, LINES, "every line is stored");
    for (i, l) in printed.iter().enumerate() {
        assert_eq!(l.text, format!("line {}", i + 1), "in order, none lost");
    }
    let seqs: Vec<u64> = log.iter().filter_map(|l| l.seq).collect();
    assert!(
        seqs.iter().enumerate().all(|(i, s)| *s == i as u64),
        "seq from 0 without gaps"
    );
    let rate = LINES as f64 / took.as_secs_f64();
    println!("{LINES} lines stored in {took:?}: {rate:.0} lines/s end to end");
    assert!(
        took < Duration::from_secs(60),
        "not throttled to a fixed rate: {took:?} ({rate:.0} lines/s)"
    );
    assert!(
        !stack
            .agent(agent)
            .log_text()
            .contains("output is no longer paced"),
        "the agent learned the stored position through its route"
    );
}

#[tokio::test]
async fn only_the_jobs_own_worker_learns_how_far_its_log_is_stored() {
    // Arrange: a running step of the honest agent; mallory is another registered worker.
    let mut stack = Stack::start().await.unwrap();
    stack.add_agent("a", AgentOpts::default()).await.unwrap();
    let mallory = stack.register_worker("mallory", &[]).await.unwrap();
    let task = stack
        .submit("name = \"w\"\n[[steps]]\nname = \"s\"\nscript = \"echo hi; sleep 3\"\n")
        .await
        .unwrap();
    let t = stack
        .wait_task_until(task, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
    let job = t.steps[0].attempts[0].job_id;
    let ask = |job: String, token: Option<String>| {
        let mut r = stack.http.get(format!("{}/api/jobs/{job}/log", stack.url));
        if let Some(t) = token {
            r = r.header(WORKER_TOKEN_HEADER, t);
        }
        r.send()
    };

    // Act
    let foreign = ask(job.to_string(), Some(mallory.token.clone()))
        .await
        .unwrap();
    let unknown = ask(JobId::new().to_string(), Some(mallory.token.clone()))
        .await
        .unwrap();
    let garbage = ask("not-a-uuid".into(), Some(mallory.token.clone()))
        .await
        .unwrap();
    let anonymous = ask(job.to_string(), None).await.unwrap();

    // Assert
    assert_eq!(foreign.status(), 409, "another worker's job is refused");
    let body: ErrorBody = foreign.json().await.unwrap();
    assert!(
        body.error.contains("not running on worker"),
        "{}",
        body.error
    );
    assert_eq!(unknown.status(), 404);
    let body: ErrorBody = unknown.json().await.unwrap();
    assert!(body.error.contains("no job"), "{}", body.error);
    assert_eq!(garbage.status(), 404, "not a job id: no such job");
    assert_eq!(anonymous.status(), 401);
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        done.summary.state, "Success",
        "the honest step is untouched"
    );
}
