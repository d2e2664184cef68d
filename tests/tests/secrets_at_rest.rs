//! Secrets at rest: no built-in key. Without `secrets.key` the dispatcher generates a key file
//! (0600) on first start and reuses it after a restart; with `production = true` a missing key
//! is exit 64; a node with another key refuses to start; a sealed value is bound to its task
//! and name, so one copied to another task's row does not open.

use gantry_tests::{AgentOpts, Stack, bin};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

/// Where the harness's dispatchers keep a generated key (the harness sets `XDG_STATE_HOME` to
/// `<stack dir>/state`; the default `secrets.key_file` is beneath it).
fn key_file(stack: &Stack) -> PathBuf {
    stack.dir.path().join("state/gantry-dispatcher/secrets.key")
}

fn all_dispatcher_logs(stack: &Stack) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(stack.dir.path()).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("dispatcher") && name.ends_with(".log") {
            text.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
        }
    }
    text
}

/// A step on pool `later` (no agent serves it yet) that writes its sensitive variable to a
/// file.
fn secret_process(name: &str, secret: &str, out: &std::path::Path) -> String {
    format!(
        r#"
name = "{name}"
[variables]
Pw = {{ value = "{secret}", sensitive = true }}

[[steps]]
name = "use"
pool = "later"
script = "printf '%s' '#{{Pw}}' > '{out}'"
"#,
        out = out.display()
    )
}

#[tokio::test]
async fn a_generated_key_file_is_private_reused_after_a_restart_and_never_logged() {
    // Arrange: no secrets.key anywhere.
    let mut stack = Stack::start().await.unwrap();
    let path = key_file(&stack);
    let first_key = std::fs::read_to_string(&path).expect("the key file was generated");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    stack.add_pool("later").await.unwrap();
    let out = stack.dir.path().join("secret.out");
    let secret = "before-restart-s3cret";
    let task = stack
        .submit(&secret_process("restart", secret, &out))
        .await
        .unwrap();

    // Act: restart the dispatcher, then let an agent run the step.
    stack.kill_dispatcher().await;
    stack.start_dispatcher().await.unwrap();
    stack
        .add_agent(
            "later",
            AgentOpts {
                pools: vec!["later".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(60))
        .await
        .unwrap();

    // Assert
    assert_eq!(mode, 0o600, "the key file is private");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        first_key,
        "the restart reused the key"
    );
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), secret);
    let logs = all_dispatcher_logs(&stack);
    assert!(
        logs.contains(&path.display().to_string()),
        "the log names the key file"
    );
    assert!(
        !logs.contains(first_key.trim()),
        "the key itself is in no log"
    );
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT value FROM task_secrets")
        .fetch_all(&stack.db().await)
        .await
        .unwrap();
    assert!(
        stored
            .iter()
            .all(|v| !v.windows(secret.len()).any(|w| w == secret.as_bytes())),
        "sealed at rest"
    );
}

#[tokio::test]
async fn a_node_with_another_key_refuses_to_start() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();

    // Act
    let other = stack
        .start_node(vec![(
            "GANTRY__SECRETS__KEY".into(),
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".into(),
        )])
        .await;

    // Assert
    let err = other
        .expect_err("a node whose key differs must not start")
        .to_string();
    assert!(
        err.contains("is not the key that sealed this database"),
        "{err}"
    );
    assert!(
        !err.contains("MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="),
        "{err}"
    );
}

#[test]
fn production_without_a_key_is_exit_64_naming_it() {
    // Arrange: an empty state directory, so there is no key file either.
    let dir = tempfile::tempdir().unwrap();

    // Act
    let out = std::process::Command::new(bin("gantry-dispatcher"))
        .arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir.path())
        .env("XDG_STATE_HOME", dir.path().join("state"))
        .env("GANTRY__PRODUCTION", "true")
        .env(
            "GANTRY__AMQP__MANAGEMENT_URL",
            "http://guest:guest@127.0.0.1:15672",
        )
        .output()
        .unwrap();

    // Assert
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("secrets.key"), "{stderr}");
    assert!(
        !dir.path()
            .join("state/gantry-dispatcher/secrets.key")
            .exists(),
        "production never generates a key"
    );
}

#[tokio::test]
async fn a_sealed_value_moved_to_another_task_does_not_open() {
    // Arrange: two tasks with a sensitive variable of the same name, waiting for an agent.
    let mut stack = Stack::start().await.unwrap();
    stack.add_pool("later").await.unwrap();
    let (out_a, out_b) = (
        stack.dir.path().join("a.out"),
        stack.dir.path().join("b.out"),
    );
    let a = stack
        .submit(&secret_process("owner", "owner-s3cret-value", &out_a))
        .await
        .unwrap();
    let b = stack
        .submit(&secret_process("thief", "thief-own-value", &out_b))
        .await
        .unwrap();

    // Act: copy a's sealed value over b's, as someone with write access to the database.
    let db = stack.db().await;
    let moved = sqlx::query(
        "UPDATE task_secrets SET value = (SELECT value FROM task_secrets WHERE task_id = $1)
         WHERE task_id = $2",
    )
    .bind(a.0)
    .bind(b.0)
    .execute(&db)
    .await
    .unwrap()
    .rows_affected();
    stack
        .add_agent(
            "later",
            AgentOpts {
                pools: vec!["later".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let done_b = stack.wait_task(b, Duration::from_secs(60)).await.unwrap();
    let done_a = stack.wait_task(a, Duration::from_secs(60)).await.unwrap();

    // Assert
    assert_eq!(moved, 1);
    assert_eq!(done_b.summary.state, "Failed", "{done_b:#?}");
    let error = done_b.steps[0].attempts[0]
        .error
        .clone()
        .unwrap_or_default();
    assert!(
        error.contains("Pw cannot be read") && error.contains("another task or name"),
        "{error}"
    );
    assert!(
        !out_b.exists(),
        "the step did not run with a foreign secret"
    );
    assert!(
        !format!("{done_b:?}").contains("owner-s3cret-value"),
        "no clear text in the task"
    );
    let log = stack.log(b).await.unwrap();
    assert!(log.iter().all(|l| !l.text.contains("owner-s3cret-value")));
    assert_eq!(done_a.summary.state, "Success", "{done_a:#?}");
    assert_eq!(
        std::fs::read_to_string(&out_a).unwrap(),
        "owner-s3cret-value"
    );
}
