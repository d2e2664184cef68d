//! Results that arrive out of order (a redelivery can overtake later messages): lines ahead
//! of a gap wait until it closes, and a `StepFinished` whose own last lines arrive before
//! the batch in front of them ends its attempt only once every line is stored, each once and
//! in order. The events are published as the running agent itself would (its own broker
//! user).

use gantry_tests::gantry_shared::wire::{
    Event, LogBatch, LogLine, Outcome, Progress, StepFinished, Stream,
};
use gantry_tests::impersonate::HeldStep;
use gantry_tests::{Stack, eventually};
use std::time::Duration;

fn lines(texts: &[&str]) -> Vec<LogLine> {
    texts
        .iter()
        .map(|t| LogLine {
            ts: chrono::Utc::now(),
            stream: Stream::Stdout,
            text: (*t).into(),
        })
        .collect()
}

/// Lines parked for this step run.
async fn parked_count(db: &sqlx::PgPool, step_run: uuid::Uuid) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM log_lines_pending WHERE step_run_id = $1")
        .bind(step_run)
        .fetch_one(db)
        .await
}

type Numbered<'a> = Vec<(u64, &'a str)>;

/// The log's lines from seq `next` on, as (seq, text), against `texts` numbered from `next`.
fn from_seq<'a>(
    log: &'a [gantry_tests::gantry_shared::api::LogEntry],
    next: u64,
    texts: &[&'a str],
) -> (Numbered<'a>, Numbered<'a>) {
    let ours = log
        .iter()
        .filter_map(|l| l.seq.filter(|s| *s >= next).map(|s| (s, l.text.as_str())))
        .collect();
    let want = texts
        .iter()
        .enumerate()
        .map(|(i, t)| (next + i as u64, *t))
        .collect();
    (ours, want)
}

#[tokio::test]
async fn lines_ahead_of_a_gap_wait_for_it_even_when_they_end_the_step() {
    // Arrange: an agent runs a step that prints one line and waits for a gate.
    let mut stack = Stack::start().await.unwrap();
    let held = HeldStep::start(&mut stack).await;
    let (task, origin, next) = (held.task, held.origin.clone(), held.next_seq);
    let publish = |ev: Event| {
        let (stack, held) = (&stack, &held);
        async move { held.publish(stack, &ev).await }
    };

    // Act: lines next+2.. first (ahead of a gap), then the end carrying next+4 and next+5,
    // and only then the batch that closes the gap (next, next+1).
    publish(Event::LogBatch(LogBatch {
        origin: origin.clone(),
        first_seq: next + 2,
        lines: lines(&["three", "four"]),
    }))
    .await;
    publish(Event::StepFinished(StepFinished {
        origin: origin.clone(),
        outcome: Outcome::Success,
        exit_code: Some(0),
        line_count: next + 6,
        error: None,
        finished_at: chrono::Utc::now(),
        artifacts: vec![],
        lines: lines(&["five", "six"]),
    }))
    .await;
    let db = stack.db().await;
    let parked: i64 = eventually(
        Duration::from_secs(20),
        "the early lines parked",
        || async {
            let n = parked_count(&db, origin.step_run_id.0).await.ok()?;
            (n >= 4).then_some(n)
        },
    )
    .await
    .unwrap();
    let meanwhile = stack.task(task).await.unwrap();
    publish(Event::LogBatch(LogBatch {
        origin: origin.clone(),
        first_seq: next,
        lines: lines(&["one", "two"]),
    }))
    .await;
    let done = stack
        .wait_task(task, Duration::from_secs(20))
        .await
        .unwrap();
    held.release();
    let log = stack.log(task).await.unwrap();
    let left = parked_count(&db, origin.step_run_id.0).await.unwrap();

    let by_pos: Vec<i64> = sqlx::query_scalar(
        "SELECT seq FROM log_lines WHERE task_id = $1 AND seq IS NOT NULL ORDER BY pos",
    )
    .bind(task.0)
    .fetch_all(&db)
    .await
    .unwrap();

    // Assert
    assert_eq!(parked, 4, "the lines beyond the gap waited, the end's too");
    assert_eq!(
        meanwhile.steps[0].state, "Running",
        "an end whose lines are not all stored ends nothing"
    );
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    let (ours, want) = from_seq(&log, next, &["one", "two", "three", "four", "five", "six"]);
    assert_eq!(ours, want, "each line once, in seq order");
    assert!(
        by_pos.windows(2).all(|w| w[0] < w[1]),
        "in the task's log order, seqs grow: {by_pos:?}"
    );
    assert_eq!(left, 0, "nothing left parked");
}

/// The task's log bytes charged so far.
async fn log_bytes(db: &sqlx::PgPool, task: gantry_tests::gantry_shared::ids::TaskId) -> i64 {
    sqlx::query_scalar("SELECT log_bytes FROM task_log_positions WHERE task_id = $1")
        .bind(task.0)
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test]
async fn parked_lines_are_charged_to_the_quota_once_however_often_they_arrive() {
    // Arrange: a held step; its task's log bytes so far.
    let mut stack = Stack::start().await.unwrap();
    let held = HeldStep::start(&mut stack).await;
    let (task, origin, next) = (held.task, held.origin.clone(), held.next_seq);
    let db = stack.db().await;
    let before = log_bytes(&db, task).await;
    let batch = |first_seq: u64, texts: &[&str]| {
        Event::LogBatch(LogBatch {
            origin: origin.clone(),
            first_seq,
            lines: lines(texts),
        })
    };
    // A progress report after the batches: once it is stored, so are they (one queue).
    let progress = |percentage: u8| {
        Event::Progress(Progress {
            origin: origin.clone(),
            percentage,
            message: "marker".into(),
        })
    };
    let reached = |percentage: i16| {
        let db = &db;
        let step_run = origin.step_run_id.0;
        async move {
            eventually(Duration::from_secs(20), "the marker stored", || async {
                let p: Option<i16> = sqlx::query_scalar(
                    "SELECT progress_percent FROM attempts WHERE step_run_id = $1",
                )
                .bind(step_run)
                .fetch_one(db)
                .await
                .ok()?;
                (p == Some(percentage)).then_some(())
            })
            .await
            .unwrap()
        }
    };

    // Act: a batch ahead of a gap, delivered twice (as a redelivery would), then a batch that
    // closes the gap and holds one of the parked lines again.
    held.publish(&stack, &batch(next + 2, &["three", "four"]))
        .await;
    held.publish(&stack, &batch(next + 2, &["three", "four"]))
        .await;
    held.publish(&stack, &progress(10)).await;
    reached(10).await;
    let parked = log_bytes(&db, task).await - before;
    held.publish(&stack, &batch(next, &["one", "two", "three"]))
        .await;
    held.publish(&stack, &progress(20)).await;
    reached(20).await;
    let joined = log_bytes(&db, task).await - before;
    let log = stack.log(task).await.unwrap();
    let left = parked_count(&db, origin.step_run_id.0).await.unwrap();
    held.release();

    // Assert
    assert_eq!(
        parked,
        ("three".len() + "four".len()) as i64,
        "charged once"
    );
    assert_eq!(
        joined,
        ("one".len() + "two".len() + "three".len() + "four".len()) as i64,
        "each line charged once"
    );
    let (ours, want) = from_seq(&log, next, &["one", "two", "three", "four"]);
    assert_eq!(ours, want, "each line once, in seq order");
    assert_eq!(left, 0, "nothing left parked");
}
