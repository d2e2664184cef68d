//! Events PostgreSQL cannot store: a NUL in a log line is stored as U+FFFD, and an event
//! that can never be stored fails its attempt with the reason instead of leaving the task
//! `Executing` for ever with later events stuck behind it. The events are published as the
//! running agent itself would (its own broker user), bypassing whatever the agent cleans.

use gantry_tests::gantry_shared::wire::{Event, LogBatch, LogLine, Origin, Stream};
use gantry_tests::impersonate::HeldStep;
use gantry_tests::{Stack, eventually};
use std::time::Duration;

fn batch(origin: &Origin, first_seq: u64, ts: chrono::DateTime<chrono::Utc>, text: &str) -> Event {
    Event::LogBatch(LogBatch {
        origin: origin.clone(),
        first_seq,
        lines: vec![LogLine {
            ts,
            stream: Stream::Stdout,
            text: text.into(),
        }],
    })
}

#[tokio::test]
async fn an_unstorable_log_batch_fails_its_attempt_and_blocks_nothing() {
    // Arrange: an agent runs a step that prints one line and waits for a gate.
    let mut stack = Stack::start().await.unwrap();
    let held = HeldStep::start(&mut stack).await;
    let (task, origin, next) = (held.task, held.origin.clone(), held.next_seq);
    // A time PostgreSQL cannot hold (before 4713 BC): the batch can never be stored.
    let ancient = chrono::DateTime::parse_from_rfc3339("-10000-01-01T00:00:00Z")
        .map(|d| d.with_timezone(&chrono::Utc))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);

    // Act: a line with a NUL, then a batch that cannot be stored, then one more batch.
    let now = chrono::Utc::now();
    held.publish(&stack, &batch(&origin, next, now, "a\0b"))
        .await;
    held.publish(&stack, &batch(&origin, next + 1, ancient, "old"))
        .await;
    let ended = stack.wait_task(task, Duration::from_secs(20)).await;
    held.publish(&stack, &batch(&origin, next + 2, now, "late"))
        .await;
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
    held.release();

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
