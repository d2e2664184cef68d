//! Sensitive values stay hidden however output is cut: across the 64 KiB split of a long line,
//! in a sensitive output of any size, and in an output not marked sensitive that holds one.
//! Checked where they could end up: the task's log through the API, every row of the test's
//! database (`pg_dump`), and every event that crossed the broker (a queue of the test's own on
//! the namespace's results exchange).

use base64::Engine;
use gantry_tests::gantry_shared::api::Task;
use gantry_tests::{AgentOpts, Stack};
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use std::process::Command;
use std::time::Duration;

/// Everything a task left behind that a secret could leak into.
struct Traces {
    log: String,
    dump: String,
    broker: String,
}

impl Traces {
    /// Panics naming the place where `needle` is found.
    fn assert_absent(&self, needle: &str) {
        for (place, text) in [
            ("the log", &self.log),
            ("the database", &self.dump),
            ("the broker", &self.broker),
        ] {
            assert!(!text.contains(needle), "{needle:?} found in {place}");
        }
    }
}

/// A queue of the test's own that gets a copy of every event sent to the dispatcher.
async fn tap(stack: &Stack) -> (lapin::Connection, lapin::Channel, String) {
    let conn = stack.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    let q = format!("{}.tap", stack.ns);
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        q.as_str().into(),
        stack.topology().results_exchange().as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    (conn, ch, q)
}

async fn run(stack: &mut Stack, process: &str) -> (Task, Traces) {
    stack.add_agent("a", AgentOpts::default()).await.unwrap();
    let (_conn, ch, q) = tap(stack).await;
    let id = stack.submit(process).await.unwrap();
    let done = stack.wait_task(id, Duration::from_secs(60)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut broker = String::new();
    while let Some(m) = ch
        .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        broker.push_str(&String::from_utf8_lossy(&m.delivery.data));
        broker.push('\n');
    }
    let log = stack.log_texts(id).await.unwrap().join("\n");
    let out = Command::new("pg_dump")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "root",
            "--data-only",
            &stack.db_name,
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let dump = String::from_utf8_lossy(&out.stdout).into_owned();
    (done, Traces { log, dump, broker })
}

#[tokio::test]
async fn a_secret_across_the_split_of_a_long_line_is_masked() {
    // Arrange: lines longer than 64 KiB with the secret starting 1 to 17 bytes before the
    // split, so every cut through it is tried.
    let secret = "Zq9-straddle-Kx7W";
    let mut stack = Stack::start().await.unwrap();
    let process = format!(
        r#"
name = "split"
[variables]
Secret = {{ value = "{secret}", sensitive = true }}
[[steps]]
name = "s"
script = '''
for k in $(seq 1 17); do
  head -c $((65536 - k)) /dev/zero | tr '\0' a
  printf '%s tail\n' "$Secret"
done
'''
"#
    );

    // Act
    let (done, traces) = run(&mut stack, &process).await;

    // Assert
    assert_eq!(done.summary.state, "Success", "{done:?}");
    let secret_chars: Vec<char> = secret.chars().collect();
    for w in secret_chars.windows(6) {
        traces.assert_absent(&w.iter().collect::<String>());
    }
    assert_eq!(traces.log.matches("******** tail").count(), 17);
}

#[tokio::test]
async fn a_sensitive_output_of_200_kib_is_never_logged() {
    // Arrange: a random value of 200 KiB (its base64 is well over the 64 KiB line split),
    // also written to a file for the test to know it.
    let mut stack = Stack::start().await.unwrap();
    let value_file = stack.dir.path().join("value");
    let process = format!(
        r#"
name = "big"
[[steps]]
name = "s"
script = '''
value=$(head -c 160000 /dev/urandom | base64 -w0 | head -c 204800)
printf '%s' "$value" > '{}'
set_gantryvariable Big "$value" sensitive
echo done
'''
"#,
        value_file.display()
    );

    // Act
    let (done, traces) = run(&mut stack, &process).await;

    // Assert
    assert_eq!(done.summary.state, "Success", "{done:?}");
    assert_eq!(done.steps[0].outputs.get("Big").unwrap(), "********");
    assert!(
        traces.log.contains("Output variable Big set (sensitive)"),
        "{}",
        traces.log
    );
    assert!(!traces.log.contains("malformed service message"));
    let value = std::fs::read_to_string(&value_file).unwrap();
    assert_eq!(value.len(), 204_800);
    let encoded = base64::engine::general_purpose::STANDARD.encode(&value);
    // Windows all along both, and the very tails (what used to leak).
    for text in [&value, &encoded] {
        let n = text.len();
        let mut starts: Vec<usize> = (0..64).map(|i| i * (n - 24) / 63).collect();
        starts.extend([n - 24, n - 100, n - 1000]);
        for s in starts {
            traces.assert_absent(&text[s..s + 24]);
        }
    }
}

#[tokio::test]
async fn an_output_holding_a_secret_is_stored_as_sensitive() {
    // Arrange
    let token = "tok-5ecr3t-9f8e7d";
    let mut stack = Stack::start().await.unwrap();
    let process = format!(
        r#"
name = "derived"
[variables]
Token = {{ value = "{token}", sensitive = true }}
[[steps]]
name = "s"
script = '''
set_gantryvariable Url "https://deploy:$Token@example.invalid/x"
set_gantryvariable Plain "nothing to hide"
'''
[[steps]]
name = "later"
script = "echo later: #{{Steps.s.Output.Url}}"
"#
    );

    // Act
    let (done, traces) = run(&mut stack, &process).await;

    // Assert
    assert_eq!(done.summary.state, "Success", "{done:?}");
    let outputs = &done.steps[0].outputs;
    assert_eq!(outputs.get("Url").unwrap(), "********");
    assert_eq!(outputs.get("Plain").unwrap(), "nothing to hide");
    // The next step gets the value with the claim; its log hides it whole.
    assert!(traces.log.contains("later: ********"), "{}", traces.log);
    assert!(
        traces.log.contains("Output variable Url set (sensitive"),
        "{}",
        traces.log
    );
    traces.assert_absent(token);
    traces.assert_absent("deploy:tok");
}
