//! A non-sensitive output whose value contains one of its task's sensitive values is stored
//! sealed and shown as `********`, whatever the agent did: the event here is published with the
//! running worker's own broker credentials, bypassing its agent.

use gantry_tests::gantry_shared::wire::{Event, Origin, OutputVariable};
use gantry_tests::{AgentOpts, Stack};
use std::time::Duration;

const SECRET: &str = "hunter2-output-s3cret";

/// Tables of the test's database whose rows, as text, hold `needle` (in clear or as the hex of
/// a bytea).
async fn tables_holding(db: &sqlx::PgPool, needle: &str) -> Vec<String> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(table_name) FROM information_schema.tables
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_all(db)
    .await
    .unwrap();
    let hex: String = needle.bytes().map(|b| format!("{b:02x}")).collect();
    let mut found = Vec::new();
    for t in tables {
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {t} x WHERE x::text LIKE '%' || $1 || '%' OR x::text LIKE '%' || $2 || '%'"
        ))
        .bind(needle)
        .bind(&hex)
        .fetch_one(db)
        .await
        .unwrap();
        if n > 0 {
            found.push(t);
        }
    }
    found
}

#[tokio::test]
async fn a_plain_output_carrying_a_secret_is_sealed_and_masked() {
    // Arrange: a step that waits for a gate, and a next step that uses the output.
    let mut stack = Stack::start().await.unwrap();
    let agent = stack
        .add_agent("honest", AgentOpts::default())
        .await
        .unwrap();
    let gate = stack.dir.path().join("gate");
    let got = stack.dir.path().join("got");
    let process = format!(
        r#"
name = "leaky"
[variables]
Token = {{ value = "{SECRET}", sensitive = true }}

[[steps]]
name = "work"
script = """
set_gantryvariable plain just-a-version
while [ ! -e '{gate}' ]; do sleep 0.05; done
"""

[[steps]]
name = "next"
script = "printf '%s' '#{{Steps.work.Output.leak}}' > '{got}'"
"#,
        gate = gate.display(),
        got = got.display()
    );
    let task = stack.submit(&process).await.unwrap();
    let running = stack
        .wait_task_until(task, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
    let a = &running.steps[0].attempts[0];
    let creds = stack.broker_credentials(agent).unwrap();

    // Act: the worker itself (its broker user) publishes a plain output holding the secret.
    let leak = format!("url=https://deploy:{SECRET}@example.com");
    let ev = Event::OutputVariable(OutputVariable {
        origin: Origin {
            step_run_id: running.steps[0].id,
            attempt: a.attempt,
            job_id: a.job_id,
            worker_id: a.worker_id.unwrap(),
        },
        name: "leak".into(),
        value: Some(leak.clone()),
        sensitive: false,
    });
    stack
        .publish_as(
            (&creds.user, &creds.password),
            &stack.topology().results_exchange(),
            "",
            &ev.encode(),
            Some(&creds.user),
        )
        .await
        .unwrap();
    let db = stack.db().await;
    gantry_tests::eventually(Duration::from_secs(20), "the output stored", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM output_variables WHERE name = 'leak'")
                .fetch_one(&db)
                .await
                .ok()?;
        (n == 1).then_some(())
    })
    .await
    .unwrap();
    std::fs::write(&gate, b"").unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(60))
        .await
        .unwrap();
    let row: (Option<String>, bool, Option<Vec<u8>>) =
        sqlx::query_as("SELECT value, sensitive, sealed FROM output_variables WHERE name = 'leak'")
            .fetch_one(&db)
            .await
            .unwrap();
    let holding = tables_holding(&db, SECRET).await;

    // Assert
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    assert_eq!(
        done.steps[0].outputs.get("leak").map(String::as_str),
        Some("********"),
        "shown masked"
    );
    assert_eq!(
        done.steps[0].outputs.get("plain").map(String::as_str),
        Some("just-a-version"),
        "an output without a secret stays plain"
    );
    assert_eq!(row.0, None, "no clear value");
    assert!(row.1, "marked sensitive");
    assert!(row.2.is_some(), "stored sealed");
    assert!(holding.is_empty(), "the secret is in clear in {holding:?}");
    assert_eq!(
        std::fs::read_to_string(&got).unwrap(),
        leak,
        "the next step still gets the value"
    );
}

#[tokio::test]
async fn a_plain_output_stored_before_its_secret_is_sealed_once_the_secret_arrives() {
    // Arrange: the value is read from a file at run time, so that no spec holds it; the
    // first step sets a plain output that holds it, the second makes it sensitive.
    let mut stack = Stack::start().await.unwrap();
    stack.add_agent("a", AgentOpts::default()).await.unwrap();
    let value = format!("late-s3cret-{}", uuid::Uuid::new_v4().simple());
    let file = stack.dir.path().join("value");
    std::fs::write(&file, &value).unwrap();
    let got = stack.dir.path().join("got");
    let process = format!(
        r#"
name = "late-secret"

[[steps]]
name = "first"
script = '''set_gantryvariable url "https://deploy:$(cat '{file}')@example.com"
set_gantryvariable plain just-a-version'''

[[steps]]
name = "second"
script = '''set_gantryvariable pw "$(cat '{file}')" sensitive'''

[[steps]]
name = "third"
script = "printf '%s' '#{{Steps.first.Output.url}}' > '{got}'"
"#,
        file = file.display(),
        got = got.display()
    );

    // Act
    let task = stack.submit(&process).await.unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(60))
        .await
        .unwrap();
    let db = stack.db().await;
    let url: (Option<String>, bool, Option<Vec<u8>>) =
        sqlx::query_as("SELECT value, sensitive, sealed FROM output_variables WHERE name = 'url'")
            .fetch_one(&db)
            .await
            .unwrap();
    let holding = tables_holding(&db, &value).await;

    // Assert
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    assert_eq!(
        done.steps[0].outputs.get("url").map(String::as_str),
        Some("********"),
        "the earlier plain output is shown masked once its secret is known"
    );
    assert_eq!(
        done.steps[0].outputs.get("plain").map(String::as_str),
        Some("just-a-version"),
        "an output without the secret stays plain"
    );
    assert_eq!(url.0, None, "no clear value left");
    assert!(url.1, "marked sensitive");
    assert!(url.2.is_some(), "stored sealed");
    assert!(holding.is_empty(), "the secret is in clear in {holding:?}");
    assert_eq!(
        std::fs::read_to_string(&got).unwrap(),
        format!("https://deploy:{value}@example.com"),
        "a later step still gets the value, through its claim"
    );
}
