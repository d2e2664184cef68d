//! Events PostgreSQL cannot store: a NUL in a log line is stored as U+FFFD, and an event
//! that can never be stored fails its attempt with the reason instead of leaving the task
//! `Executing` for ever with later events stuck behind it. The events are published as the
//! running agent itself would (its own broker user), bypassing whatever the agent cleans.

use gantry_tests::gantry_shared::wire::{Event, LogBatch, LogLine, Origin, Stream};
use gantry_tests::{AgentOpts, Stack, eventually};
use std::time::Duration;

fn batch(
    origin: &Origin,
    first_seq: u64,
    ts: chrono::DateTime<chrono::Utc>,
    text: &str,
) -> Vec<u8> {
    Event::LogBatch(LogBatch {
        origin: origin.clone(),
        first_seq,
        lines: vec![LogLine {
            ts,
            stream: Stream::Stdout,
            text: text.into(),
        }],
    })
    .encode()
}

#[tokio::test]
async fn an_unstorable_log_batch_fails_its_attempt_and_blocks_nothing() {
    // Arrange: an agent runs a step that prints one line and waits for a gate.
    let mut stack = Stack::start().await.unwrap();
    let agent = stack.add_agent("a1", AgentOpts::default()).await.unwrap();
    let gate = stack.dir.path().join("gate");
    let task = stack
        .submit(&format!(
            "name = \"t\"\n[[steps]]\nname = \"work\"\nscript = '''\necho before\nwhile [ ! -e '{}' ]; do sleep 0.05; done\necho after\n'''\n",
            gate.display()
        ))
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "the first line stored", || async {
        let log = stack.log(task).await.ok()?;
        log.iter().any(|l| l.text == "before").then_some(())
    })
    .await
    .unwrap();
    // The agent's lines so far (its own first line included): ours continue them.
    let next: u64 = stack
        .log(task)
        .await
        .unwrap()
        .iter()
        .filter_map(|l| l.seq)
        .max()
        .map_or(0, |s| s + 1);
    let t = stack.task(task).await.unwrap();
    let a = t.steps[0].attempts[0].clone();
    let origin = Origin {
        step_run_id: t.steps[0].id,
        attempt: a.attempt,
        job_id: a.job_id,
        worker_id: a.worker_id.unwrap(),
    };
    let creds = stack.broker_credentials(agent).unwrap();
    let as_agent = (creds.user.as_str(), creds.password.as_str());
    let x = stack.topology().results_exchange();
    // A time PostgreSQL cannot hold (before 4713 BC): the batch can never be stored.
    let ancient = chrono::DateTime::parse_from_rfc3339("-10000-01-01T00:00:00Z")
        .map(|d| d.with_timezone(&chrono::Utc))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);

    // Act: a line with a NUL, then a batch that cannot be stored, then one more batch.
    let now = chrono::Utc::now();
    stack
        .publish_as(
            as_agent,
            &x,
            "",
            &batch(&origin, next, now, "a\0b"),
            Some(&creds.user),
        )
        .await
        .unwrap();
    stack
        .publish_as(
            as_agent,
            &x,
            "",
            &batch(&origin, next + 1, ancient, "old"),
            Some(&creds.user),
        )
        .await
        .unwrap();
    let ended = stack.wait_task(task, Duration::from_secs(20)).await;
    stack
        .publish_as(
            as_agent,
            &x,
            "",
            &batch(&origin, next + 2, now, "late"),
            Some(&creds.user),
        )
        .await
        .unwrap();
    let db = stack.db().await;
    let late = eventually(
        Duration::from_secs(10),
        "the late batch handled",
        || async {
            let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM stale_events WHERE kind = 'LogBatch' AND reason LIKE '%ended%'",
        )
        .fetch_one(&db)
        .await
        .ok()?;
            (n >= 1).then_some(n)
        },
    )
    .await;
    let log = stack.log(task).await.unwrap();
    std::fs::write(&gate, b"").unwrap();

    // Assert
    let ended = ended.unwrap();
    assert_eq!(ended.summary.state, "Failed", "{ended:#?}");
    let err = ended.steps[0].attempts[0].error.clone().unwrap_or_default();
    assert!(err.contains("could not be stored"), "{err}");
    assert!(
        err.contains("22008"),
        "the reason names PostgreSQL's: {err}"
    );
    let texts: Vec<&str> = log.iter().map(|l| l.text.as_str()).collect();
    assert!(
        texts.contains(&"a\u{FFFD}b"),
        "the NUL stored as U+FFFD: {texts:?}"
    );
    assert!(!texts.contains(&"late"), "{texts:?}");
    late.expect("the batch after the unstorable one is handled, not stuck behind it");
    let logs = stack.all_logs();
    assert!(!logs.contains("panicked"), "a program panicked:\n{logs}");
}
