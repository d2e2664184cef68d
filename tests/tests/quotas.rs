//! Per-task quotas: a step whose log goes past `limits.task_log_bytes`, or whose artifacts go
//! past `limits.artifact_bytes`, fails saying which limit, and what it sends beyond the limit
//! is not stored.

use gantry_tests::gantry_shared::ids::TaskId;
use gantry_tests::{AgentOpts, Stack};
use std::time::Duration;

const LOG_LIMIT: i64 = 100_000;
const ARTIFACT_LIMIT: i64 = 200_000;

/// Bytes of the agent's log lines stored for a task (Gantry's own lines left out).
async fn stored_log_bytes(db: &sqlx::PgPool, task: TaskId) -> i64 {
    sqlx::query_scalar(
        "SELECT COALESCE(SUM(octet_length(text)), 0)::bigint FROM log_lines
         WHERE task_id = $1 AND seq IS NOT NULL",
    )
    .bind(task.0)
    .fetch_one(db)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_step_past_the_log_or_artifact_quota_fails_naming_the_limit() {
    // Arrange
    let mut stack = Stack::start_with(vec![
        (
            "GANTRY__LIMITS__TASK_LOG_BYTES".into(),
            LOG_LIMIT.to_string(),
        ),
        (
            "GANTRY__LIMITS__ARTIFACT_BYTES".into(),
            ARTIFACT_LIMIT.to_string(),
        ),
    ])
    .await
    .unwrap();
    stack
        .add_agent("quota", AgentOpts::default())
        .await
        .unwrap();
    // 4000 lines of 100 bytes: 400 kB of text, four times the log quota; then a marker.
    let chatty = r#"
name = "chatty"
[[steps]]
name = "talk"
script = """
i=0
while [ $i -lt 4000 ]; do
  printf 'line %06d %s\n' $i 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'
  i=$((i+1))
done
echo AFTER-THE-FLOOD
sleep 5
"""
"#;
    // A 600 kB artifact against a 200 kB quota.
    let bulky = r#"
name = "bulky"
[[steps]]
name = "upload"
artifacts = ["big.bin"]
script = """
head -c 600000 /dev/urandom > big.bin
echo uploaded
"""
"#;
    // 120 kB in one burst, then a clean exit: a step this short sends its lines with its
    // `StepFinished`, and the quota holds there too.
    let burst = r#"
name = "burst"
[[steps]]
name = "blurt"
script = """
yes "$(printf '%0200d' 0)" | head -n 600
"""
"#;
    // Within both quotas: the honest path still works.
    let modest = r#"
name = "modest"
[[steps]]
name = "small"
artifacts = ["small.bin"]
script = """
head -c 1000 /dev/urandom > small.bin
echo small and fine
"""
"#;

    // Act
    let t_log = stack.submit(chatty).await.unwrap();
    let t_art = stack.submit(bulky).await.unwrap();
    let t_ok = stack.submit(modest).await.unwrap();
    let t_burst = stack.submit(burst).await.unwrap();
    let log_done = stack
        .wait_task(t_log, Duration::from_secs(90))
        .await
        .unwrap();
    let art_done = stack
        .wait_task(t_art, Duration::from_secs(90))
        .await
        .unwrap();
    let ok_done = stack
        .wait_task(t_ok, Duration::from_secs(90))
        .await
        .unwrap();
    let burst_done = stack
        .wait_task(t_burst, Duration::from_secs(90))
        .await
        .unwrap();
    let log_lines = stack.log(t_log).await.unwrap();
    let art_log = stack.log(t_art).await.unwrap();
    let db = stack.db().await;
    let stored_text = stored_log_bytes(&db, t_log).await;
    let stored_art: i64 = sqlx::query_scalar(
        "SELECT COALESCE(SUM(octet_length(k.data)), 0)::bigint FROM artifact_chunks k
         JOIN artifacts a ON a.id = k.artifact_id WHERE a.task_id = $1",
    )
    .bind(t_art.0)
    .fetch_one(&db)
    .await
    .unwrap();

    // Assert: the log quota.
    assert_eq!(log_done.summary.state, "Failed", "{log_done:#?}");
    let err = log_done.steps[0].attempts[0]
        .error
        .clone()
        .unwrap_or_default();
    assert!(err.contains("limits.task_log_bytes"), "{err}");
    assert!(
        log_lines
            .iter()
            .any(|l| l.step.is_some() && l.text.contains("limits.task_log_bytes")),
        "the step's log says which limit"
    );
    assert!(stored_text <= LOG_LIMIT, "{stored_text} bytes stored");
    assert!(stored_text > 0, "what fit is kept");
    assert!(
        !log_lines.iter().any(|l| l.text.contains("AFTER-THE-FLOOD")),
        "nothing past the limit is stored"
    );

    // Assert: the artifact quota.
    assert_eq!(art_done.summary.state, "Failed", "{art_done:#?}");
    let err = art_done.steps[0].attempts[0]
        .error
        .clone()
        .unwrap_or_default();
    assert!(err.contains("limits.artifact_bytes"), "{err}");
    assert!(
        art_log
            .iter()
            .any(|l| l.text.contains("limits.artifact_bytes")),
        "the step's log says which limit"
    );
    assert!(stored_art <= ARTIFACT_LIMIT, "{stored_art} bytes stored");

    // Assert: the log quota, for lines that came with the step's end.
    assert_eq!(burst_done.summary.state, "Failed", "{burst_done:#?}");
    let err = burst_done.steps[0].attempts[0]
        .error
        .clone()
        .unwrap_or_default();
    assert!(err.contains("limits.task_log_bytes"), "{err}");
    let burst_text = stored_log_bytes(&db, t_burst).await;
    assert!(burst_text <= LOG_LIMIT, "{burst_text} bytes stored");

    // Assert: within quota, nothing changes.
    assert_eq!(ok_done.summary.state, "Success", "{ok_done:#?}");
}
