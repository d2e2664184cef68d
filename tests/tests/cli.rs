//! The `gantry` CLI as a user runs it: deploy with a live log, exit codes, listings.

use gantry_tests::{API_KEY, AgentOpts, Stack, bin};
use std::process::Command;

fn gantry(stack: &Stack, args: &[&str]) -> std::process::Output {
    Command::new(bin("gantry"))
        .args(args)
        .env("GANTRY_SERVER", &stack.url)
        .env("GANTRY_API_KEY", API_KEY)
        .output()
        .unwrap()
}

#[tokio::test]
async fn deploy_follow_streams_the_log_and_exits_zero_only_on_success() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack.add_agent("cli", AgentOpts::default()).await.unwrap();
    let good = stack.dir.path().join("good.toml");
    std::fs::write(
        &good,
        r#"
name = "good"
[variables]
Who = "world"
[[steps]]
name = "greet"
script = "for i in 1 2 3; do echo hello #{Who} $i; sleep 0.2; done"
"#,
    )
    .unwrap();
    let bad = stack.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"bad\"\n[[steps]]\nname = \"fail\"\nscript = \"echo nope >&2; exit 4\"\n",
    )
    .unwrap();

    // Act
    let ok = tokio::task::spawn_blocking({
        let (url, path) = (stack.url.clone(), good.clone());
        move || {
            Command::new(bin("gantry"))
                .args(["--server", &url, "--api-key", API_KEY, "deploy"])
                .arg(&path)
                .args(["--follow", "--var", "Who=gantry"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let failed = gantry(&stack, &["deploy", bad.to_str().unwrap(), "--follow"]);

    // Assert
    let out = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{out}\n{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let greetings: Vec<&str> = out.lines().filter(|l| l.contains("hello gantry")).collect();
    assert_eq!(greetings.len(), 3, "{out}");
    assert!(greetings[0].ends_with("hello gantry 1") && greetings[2].ends_with("hello gantry 3"));
    assert!(out.contains("succeeded"));
    assert_eq!(failed.status.code(), Some(1));
    let out = String::from_utf8_lossy(&failed.stdout);
    assert!(out.contains("! nope"), "stderr lines are marked: {out}");
    assert!(String::from_utf8_lossy(&failed.stderr).contains("Failed"));
}

#[tokio::test]
async fn listings_show_tasks_steps_workers_and_pools() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack.add_pool("edge").await.unwrap();
    stack
        .add_agent(
            "lister",
            AgentOpts {
                pools: vec!["edge".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let task = stack
        .submit("name = \"listed\"\n[[steps]]\nname = \"only\"\npool = \"edge\"\nscript = \"echo listed-line\"\n")
        .await
        .unwrap();
    stack
        .wait_task(task, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    let id = task.to_string();

    // Act
    let tasks = gantry(&stack, &["tasks"]);
    let one = gantry(&stack, &["task", &id]);
    let log = gantry(&stack, &["log", &id]);
    let workers = gantry(&stack, &["workers"]);
    let pools = gantry(&stack, &["pools"]);
    let missing = gantry(&stack, &["task", "00000000-0000-0000-0000-000000000000"]);
    let unreachable = Command::new(bin("gantry"))
        .args([
            "--server",
            "http://127.0.0.1:9",
            "--api-key",
            API_KEY,
            "tasks",
        ])
        .output()
        .unwrap();

    // Assert
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(text(&tasks).contains(&id) && text(&tasks).contains("Success"));
    let one_text = text(&one);
    assert!(
        one_text.contains("only") && one_text.contains("lister") && one_text.contains("edge"),
        "{one_text}"
    );
    assert!(text(&log).contains("listed-line"));
    assert!(text(&workers).contains("lister"));
    assert!(text(&pools).contains("edge") && text(&pools).contains("Default Worker Pool"));
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));
    assert_eq!(unreachable.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach"));
}

#[tokio::test]
async fn the_sse_stream_resumes_after_the_last_event_id() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack.add_agent("sse", AgentOpts::default()).await.unwrap();
    let task = stack
        .submit("name = \"sse\"\n[[steps]]\nname = \"s\"\nscript = \"for i in 1 2 3 4 5; do echo n$i; done\"\n")
        .await
        .unwrap();
    stack
        .wait_task(task, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    let all = stack.log(task).await.unwrap();
    let third = &all[2];

    // Act
    let body = stack
        .http
        .get(format!("{}/api/tasks/{task}/log?follow=true", stack.url))
        .header("X-Gantry-ApiKey", API_KEY)
        .header("Last-Event-ID", &third.cursor)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    // Assert
    let ids: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    let expected: Vec<&str> = all[3..].iter().map(|l| l.cursor.as_str()).collect();
    assert_eq!(ids, expected, "{body}");
    assert!(
        body.contains("event: end"),
        "the stream ends with the task: {body}"
    );
    assert!(body.contains("\"state\":\"Success\""));
}
