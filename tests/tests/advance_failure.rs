//! An advance that fails in the result consumer's transaction (which holds no savepoint) must
//! not lose the events of its batch: the batch is stored again without advancing, its task
//! is woken, and the task goes on once it can be advanced.

use gantry_tests::{Stack, eventually};
use std::time::Duration;

/// Set the second step's `syntax` in the database (an unknown one makes its spec unreadable).
async fn set_second_syntax(
    db: &sqlx::PgPool,
    task: gantry_tests::gantry_shared::ids::TaskId,
    syntax: &str,
) -> u64 {
    sqlx::query(
        "UPDATE step_runs SET spec = jsonb_set(spec, '{syntax}', to_jsonb($2::text))
         WHERE task_id = $1 AND idx = 1",
    )
    .bind(task.0)
    .bind(syntax)
    .execute(db)
    .await
    .unwrap()
    .rows_affected()
}

#[tokio::test]
async fn a_failing_advance_loses_no_event_and_the_task_goes_on_once_it_can() {
    // Arrange: step 1 waits for a gate; step 2's spec is made unreadable while step 1 runs,
    // so every advance of the task fails until it is mended.
    let mut stack = Stack::start().await.unwrap();
    stack.add_agent("a", Default::default()).await.unwrap();
    let go = stack.dir.path().join("go");
    let task = stack
        .submit(&format!(
            "name = \"broken\"\n[[steps]]\nname = \"wait\"\nscript = \"while [ ! -e '{}' ]; do sleep 0.1; done; echo first done\"\n[[steps]]\nname = \"after\"\nscript = \"echo second\"\n",
            go.display()
        ))
        .await
        .unwrap();
    stack.wait_running(task).await.unwrap();
    let db = stack.db().await;
    let broken = set_second_syntax(&db, task, "cobol").await;
    assert_eq!(broken, 1);

    // Act: step 1 ends; its end and its last line reach the consumer, whose advance fails.
    std::fs::write(&go, "").unwrap();
    let first_stored = eventually(Duration::from_secs(20), "step 1's end stored", || async {
        let row: Option<(String, String, i64)> = sqlx::query_as(
            "SELECT a.state, s.state, a.lines_stored FROM attempts a
             JOIN step_runs s ON s.id = a.step_run_id
             WHERE s.task_id = $1 AND s.idx = 0 AND a.attempt = 1",
        )
        .bind(task.0)
        .fetch_optional(&db)
        .await
        .ok()
        .flatten();
        row.filter(|r| r.0 == "Success")
    })
    .await;
    let logged = eventually(
        Duration::from_secs(10),
        "the failed advance logged",
        || async {
            stack
                .all_logs()
                .contains(
                    "could not advance a task after its attempt ended; storing its events again",
                )
                .then_some(())
        },
    )
    .await;
    let second_meanwhile: i64 =
        sqlx::query_scalar("SELECT count(*) FROM attempts a JOIN step_runs s ON s.id = a.step_run_id WHERE s.task_id = $1 AND s.idx = 1")
            .bind(task.0)
            .fetch_one(&db)
            .await
            .unwrap();
    let stored_lines: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM log_lines l JOIN step_runs s ON s.id = l.step_run_id
         WHERE s.task_id = $1 AND s.idx = 0 AND l.seq IS NOT NULL",
    )
    .bind(task.0)
    .fetch_one(&db)
    .await
    .unwrap();
    // Mended: the task's wake-up (or the sweep) advances it.
    assert_eq!(set_second_syntax(&db, task, "bash").await, 1);
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();

    // Assert
    let (attempt, step, lines) =
        first_stored.expect("step 1's end stored despite the failing advance");
    assert_eq!((attempt.as_str(), step.as_str()), ("Success", "Success"));
    assert_eq!(
        lines, stored_lines,
        "every line the attempt announced is stored, once"
    );
    assert!(
        logged.is_ok(),
        "the failed advance is logged:\n{}",
        stack.all_logs()
    );
    assert_eq!(
        second_meanwhile, 0,
        "nothing of the failed advance was kept"
    );
    assert_eq!(done.summary.state, "Success", "{done:?}");
    let log = stack.log_texts(task).await.unwrap();
    let first = log.iter().filter(|l| l.as_str() == "first done").count();
    assert_eq!(first, 1, "step 1's line stored once: {log:?}");
    assert!(log.iter().any(|l| l == "second"), "{log:?}");
}
