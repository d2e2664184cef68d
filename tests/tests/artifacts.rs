//! Artifacts end to end: files matched by `artifacts = [globs]` and named by
//! `new_gantryartifact` reach the dispatcher in chunks, are checked by sha256, listed and
//! downloaded through the API and the CLI; a failed step still uploads what it has; a 200 MiB
//! artifact round-trips with bounded memory on the agent and the dispatcher.

use gantry_shared::api::{ApiKeyCreated, Artifact};
use gantry_shared::wire::{ArtifactChunk, Event, Origin};
use gantry_tests::{API_KEY, AgentOpts, Stack, bin};
use reqwest::Method;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn gantry(stack: &Stack, args: &[&str]) -> std::process::Output {
    Command::new(bin("gantry"))
        .args(args)
        .env("GANTRY_SERVER", &stack.url)
        .env("GANTRY_API_KEY", API_KEY)
        .output()
        .unwrap()
}

/// sha256 of a file, by `sha256sum` (independent of Gantry's own hashing).
fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// Peak resident set size (VmHWM) of a process, in KiB.
fn peak_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

async fn artifacts_of(stack: &Stack, task: impl std::fmt::Display) -> Vec<Artifact> {
    stack
        .get(&format!("/api/tasks/{task}/artifacts"))
        .await
        .unwrap()
}

#[tokio::test]
async fn glob_and_named_artifacts_arrive_intact_and_a_failed_step_still_uploads() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack.add_agent("arts", AgentOpts::default()).await.unwrap();
    let keep = stack.dir.path().join("kept");
    std::fs::create_dir_all(&keep).unwrap();
    let process = format!(
        r##"
name = "arts"
[variables]
Keep = "{keep}"

[[steps]]
name = "build"
artifacts = ["dist/*.tar.gz", "nothing/*.zip"]
script = """
mkdir -p dist out
head -c 300001 /dev/urandom > dist/app.tar.gz
cp dist/app.tar.gz "#{{Keep}}/app.tar.gz"
printf 'hello notes' > out/notes.txt
cd out
new_gantryartifact notes.txt release-notes.txt
cd ..
: > empty.bin
new_gantryartifact empty.bin
new_gantryartifact does-not-exist.bin
"""

[[steps]]
name = "broken"
artifacts = ["report.txt", "missing-*.log"]
script = """
echo partial > report.txt
exit 1
"""
"##,
        keep = keep.display()
    );

    // Act
    let task = stack.submit(&process).await.unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(60))
        .await
        .unwrap();
    let list = artifacts_of(&stack, task).await;
    let log = stack.log(task).await.unwrap();
    let cli_list = gantry(&stack, &["artifacts", &task.to_string()]);

    // Assert: the task ran as its scripts said; the failed step uploaded anyway.
    assert_eq!(done.summary.state, "Failed", "{done:?}");
    assert_eq!(done.steps[0].state, "Success");
    assert_eq!(done.steps[1].state, "Failed");
    let found: Vec<(&str, &str, u64, &str)> = list
        .iter()
        .map(|a| (a.step.as_str(), a.name.as_str(), a.size, a.state.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            ("build", "release-notes.txt", 11, "Stored"),
            ("build", "empty.bin", 0, "Stored"),
            ("build", "dist/app.tar.gz", 300_001, "Stored"),
            ("broken", "report.txt", 8, "Stored"),
        ],
        "{list:?}"
    );
    let text: Vec<&str> = log.iter().map(|l| l.text.as_str()).collect();
    let all = text.join("\n");
    assert!(
        all.contains("warning: artifacts glob \"nothing/*.zip\" matched no file"),
        "{all}"
    );
    assert!(
        all.contains("warning: artifact ") && all.contains("does-not-exist.bin not collected"),
        "{all}"
    );
    assert!(all.contains("Artifact dist/app.tar.gz uploaded: 300001 bytes"));
    // The API's sums are the agent's, and match the bytes the scripts wrote.
    let app = &list[2];
    assert_eq!(
        app.sha256.as_deref(),
        Some(sha256_file(&keep.join("app.tar.gz")).as_str())
    );
    assert_eq!(
        list[1].sha256.as_deref(),
        Some("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    );
    // The CLI lists them.
    assert!(cli_list.status.success(), "{cli_list:?}");
    let listed = String::from_utf8_lossy(&cli_list.stdout);
    for a in &list {
        assert!(listed.contains(&a.id.to_string()), "{listed}");
        assert!(listed.contains(&a.name), "{listed}");
    }

    // Act + Assert: the CLI downloads each, byte for byte, checking the sha256.
    for (a, expected) in [
        (&list[0], b"hello notes".to_vec()),
        (&list[1], Vec::new()),
        (&list[2], std::fs::read(keep.join("app.tar.gz")).unwrap()),
        (&list[3], b"partial\n".to_vec()),
    ] {
        let out = stack.dir.path().join(format!("got-{}", a.id));
        let got = gantry(
            &stack,
            &[
                "artifact",
                "get",
                &a.id.to_string(),
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(got.status.success(), "{} {got:?}", a.name);
        assert!(String::from_utf8_lossy(&got.stdout).contains("verified"));
        assert_eq!(std::fs::read(&out).unwrap(), expected, "{}", a.name);
        assert_eq!(sha256_file(&out), a.sha256.clone().unwrap());
    }

    // The raw route: headers, and JSON errors.
    let resp = stack
        .http
        .get(format!("{}/api/artifacts/{}", stack.url, app.id))
        .header("X-Gantry-ApiKey", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    assert_eq!(
        h["x-gantry-sha256"].to_str().unwrap(),
        app.sha256.as_deref().unwrap()
    );
    assert_eq!(h["content-length"].to_str().unwrap(), "300001");
    assert_eq!(
        h["content-disposition"].to_str().unwrap(),
        "attachment; filename=\"app.tar.gz\""
    );
    assert_eq!(resp.bytes().await.unwrap().len(), 300_001);
    let unknown = uuid::Uuid::now_v7();
    for path in [
        format!("/api/artifacts/{unknown}"),
        "/api/artifacts/not-an-id".to_owned(),
        format!("/api/tasks/{unknown}/artifacts"),
    ] {
        let (status, body) = stack
            .request(Method::GET, &path, Some(API_KEY), None)
            .await
            .unwrap();
        assert_eq!(status, 404, "{path}");
        assert!(body["error"].is_string(), "{path}: {body}");
    }
    let creator: ApiKeyCreated = stack
        .post(
            "/api/keys",
            &json!({ "name": "creator", "permissions": ["TaskCreate"] }),
        )
        .await
        .unwrap();
    for path in [
        format!("/api/artifacts/{}", app.id),
        format!("/api/tasks/{task}/artifacts"),
    ] {
        let (status, body) = stack
            .request(Method::GET, &path, Some(&creator.key), None)
            .await
            .unwrap();
        assert_eq!(status, 403, "{path}");
        assert!(body["error"].as_str().unwrap().contains("TaskView"));
    }
    let missing = gantry(
        &stack,
        &[
            "artifact",
            "get",
            &unknown.to_string(),
            "--out",
            stack.dir.path().join("nope").to_str().unwrap(),
        ],
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(!stack.dir.path().join("nope").exists());
}

/// Publish an event as agent `idx` would: with its own broker user, to the results exchange.
async fn publish_event(stack: &Stack, idx: usize, event: &Event) {
    let creds = stack.broker_credentials(idx).unwrap();
    stack
        .publish_as(
            (&creds.user, &creds.password),
            &stack.topology().results_exchange(),
            "",
            &event.encode(),
            Some(&creds.user),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn an_artifact_whose_stored_bytes_do_not_match_is_corrupt_and_fails_the_step() {
    // Arrange: a step that is still running when a forged first chunk of its first
    // artifact arrives from its own claimant's identity; the agent's real chunk 0 is then a
    // duplicate, so the stored bytes differ from what the agent hashed.
    let mut stack = Stack::start().await.unwrap();
    stack
        .add_agent("corrupt", AgentOpts::default())
        .await
        .unwrap();
    let task = stack
        .submit(
            r#"
name = "corrupt"
[[steps]]
name = "make"
artifacts = ["out.txt"]
script = "sleep 2; echo 'the real content' > out.txt"
"#,
        )
        .await
        .unwrap();
    let running = stack
        .wait_task_until(task, Duration::from_secs(20), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
    let step = &running.steps[0];
    let a = &step.attempts[0];

    // Act
    publish_event(
        &stack,
        0,
        &Event::ArtifactChunk(ArtifactChunk {
            origin: Origin {
                step_run_id: step.id,
                attempt: a.attempt,
                job_id: a.job_id,
                worker_id: a.worker_id.unwrap(),
            },
            artifact: 0,
            name: "out.txt".into(),
            seq: 0,
            offset: 0,
            data: b"forged content!!!\n".to_vec(),
        }),
    )
    .await;
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();
    let list = artifacts_of(&stack, task).await;
    let log = stack.log(task).await.unwrap();

    // Assert
    assert_eq!(done.summary.state, "Failed", "{done:?}");
    let attempt = &done.steps[0].attempts[0];
    assert_eq!(attempt.exit_code, Some(0));
    assert!(
        attempt
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("artifact out.txt did not arrive intact"),
        "{attempt:?}"
    );
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].state, "Corrupt");
    assert!(
        log.iter()
            .any(|l| l.text.starts_with("warning: artifact out.txt is corrupt")),
        "{log:?}"
    );
    let (status, body) = stack
        .request(
            Method::GET,
            &format!("/api/artifacts/{}", list[0].id),
            Some(API_KEY),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains("Corrupt"));
}

#[tokio::test]
async fn the_example_process_uploads_its_artifacts() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack
        .add_agent("example", AgentOpts::default())
        .await
        .unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/artifacts.toml");

    // Act
    let deployed = gantry(&stack, &["deploy", example.to_str().unwrap(), "--follow"]);
    let tasks: Vec<gantry_shared::api::TaskSummary> = stack.get("/api/tasks").await.unwrap();
    let list = artifacts_of(&stack, tasks[0].id).await;

    // Assert: "test" fails on purpose, and still uploads its report.
    assert_eq!(deployed.status.code(), Some(1), "{deployed:?}");
    let names: Vec<(&str, &str, &str)> = list
        .iter()
        .map(|a| (a.step.as_str(), a.name.as_str(), a.state.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("build", "release-notes.txt", "Stored"),
            ("build", "dist/app-1.4.2.tar.gz", "Stored"),
            ("test", "reports/unit/results.xml", "Stored"),
        ]
    );
}

#[tokio::test]
async fn bad_artifact_globs_are_refused_at_submission() {
    // Arrange
    let stack = Stack::start().await.unwrap();

    // Act
    let (status, body) = stack
        .request(
            Method::POST,
            "/api/tasks",
            Some(API_KEY),
            Some(json!({
                "name": "p",
                "steps": [{ "name": "s", "script": "true", "artifacts": ["../secrets/*"] }]
            })),
        )
        .await
        .unwrap();

    // Assert
    assert_eq!(status, 400);
    assert_eq!(body["field"], "steps[0].artifacts");
}

#[tokio::test]
async fn a_200_mib_artifact_round_trips_with_bounded_memory() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    let agent = stack.add_agent("big", AgentOpts::default()).await.unwrap();
    let process = r#"
name = "big"
[[steps]]
name = "big"
timeout_secs = 900
artifacts = ["big.bin"]
script = """
head -c 209715200 /dev/urandom > big.bin
echo "expected-sha256 $(sha256sum big.bin | cut -d' ' -f1)"
"""
"#;
    let agent_before = peak_rss_kib(stack.agent(agent).pid().unwrap());
    let dispatcher_before = peak_rss_kib(stack.dispatcher.as_ref().unwrap().pid().unwrap());
    let started = Instant::now();

    // Act
    let task = stack.submit(process).await.unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(600))
        .await
        .unwrap();
    let uploaded_in = started.elapsed();
    let list = artifacts_of(&stack, task).await;
    let out = stack.dir.path().join("big.download");
    let t = Instant::now();
    let got = tokio::task::spawn_blocking({
        let (url, id, out) = (stack.url.clone(), list[0].id.to_string(), out.clone());
        move || {
            Command::new(bin("gantry"))
                .args(["--server", &url, "--api-key", API_KEY, "artifact", "get"])
                .arg(&id)
                .arg("--out")
                .arg(&out)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let downloaded_in = t.elapsed();
    let agent_peak = peak_rss_kib(stack.agent(agent).pid().unwrap());
    let dispatcher_peak = peak_rss_kib(stack.dispatcher.as_ref().unwrap().pid().unwrap());

    // Assert
    eprintln!(
        "200 MiB artifact: step and upload {uploaded_in:?}, download {downloaded_in:?}; peak RSS agent {} MiB (before: {}), dispatcher {} MiB (before: {})",
        agent_peak / 1024,
        agent_before / 1024,
        dispatcher_peak / 1024,
        dispatcher_before / 1024
    );
    assert_eq!(done.summary.state, "Success", "{done:?}");
    let log = stack.log(task).await.unwrap();
    let expected = log
        .iter()
        .find_map(|l| l.text.strip_prefix("expected-sha256 "))
        .expect("the script printed its sha256")
        .to_owned();
    assert_eq!(list.len(), 1, "{list:?}");
    let a = &list[0];
    assert_eq!((a.name.as_str(), a.state.as_str()), ("big.bin", "Stored"));
    assert_eq!(a.size, 209_715_200);
    assert_eq!(a.sha256.as_deref(), Some(expected.as_str()));
    assert!(got.status.success(), "{got:?}");
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 209_715_200);
    assert_eq!(sha256_file(&out), expected);
    assert!(
        agent_peak < 100 * 1024,
        "the agent's peak RSS was {} MiB",
        agent_peak / 1024
    );
    assert!(
        dispatcher_peak < 100 * 1024,
        "the dispatcher's peak RSS was {} MiB",
        dispatcher_peak / 1024
    );
    let _ = std::fs::remove_file(&out);
}
