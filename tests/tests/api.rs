//! Bad input gets a clear 4xx naming the field, never a 5xx; malformed messages end in the
//! dead-letter queue without crashing anything; configuration errors stop the programs with
//! exit code 64 naming the key; metrics report what the dispatcher does.

use gantry_tests::gantry_shared::api::{ApiKeyCreated, Pool, Worker};
use gantry_tests::{API_KEY, AgentOpts, Stack, bin, eventually};
use lapin::options::BasicPublishOptions;
use reqwest::Method;
use serde_json::json;
use std::time::Duration;

async fn post_task(stack: &Stack, body: serde_json::Value) -> (u16, serde_json::Value) {
    stack
        .request(Method::POST, "/api/tasks", Some(API_KEY), Some(body))
        .await
        .unwrap()
}

#[tokio::test]
async fn malformed_processes_get_a_400_naming_the_field() {
    // Arrange
    let stack = Stack::start().await.unwrap();
    let step = |extra: serde_json::Value| {
        let mut s = json!({ "name": "s", "script": "echo hi" });
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        json!({ "name": "p", "steps": [s] })
    };
    let cases = [
        (
            json!({ "name": "p", "steps": [{ "name": "s" }] }),
            "steps[0].script",
            "needs a script",
        ),
        (
            step(json!({ "pool": "no-such-pool" })),
            "steps[0].pool",
            "no-such-pool",
        ),
        (
            step(json!({ "script": "echo #{Nope}" })),
            "steps[0].script",
            "step s: unknown variable #{Nope}",
        ),
        (
            step(json!({ "retries": "three" })),
            "steps[0].retries",
            "invalid",
        ),
        (
            step(json!({ "scrpit": "x" })),
            "steps[0].scrpit",
            "unknown field",
        ),
        (
            step(json!({ "name": "has space" })),
            "steps[0].name",
            "step name",
        ),
        (
            json!({ "name": "p", "steps": [] }),
            "steps",
            "at least one step",
        ),
        (
            json!({ "name": "p", "variables": { "Pw": { "value": "abc", "sensitive": true } },
                    "steps": [{ "name": "s", "script": "true" }] }),
            "variables.Pw",
            "at least 4",
        ),
    ];

    // Act + Assert
    for (body, field, text) in cases {
        let (status, err) = post_task(&stack, body.clone()).await;
        assert_eq!(status, 400, "{body} -> {err}");
        assert_eq!(err["field"], field, "{body} -> {err}");
        assert!(
            err["error"].as_str().unwrap().contains(text),
            "{body} -> {err}"
        );
    }
    let resp = stack
        .http
        .post(format!("{}/api/tasks", stack.url))
        .header("X-Gantry-ApiKey", API_KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("JSON"));
    // On its own connection: the server closes it after refusing a body it did not read.
    let huge = "x".repeat(8 * 1024 * 1024 + 100);
    let resp = reqwest::Client::new()
        .post(format!("{}/api/tasks", stack.url))
        .header("X-Gantry-ApiKey", API_KEY)
        .json(&json!({ "name": "p", "steps": [{ "name": "s", "script": huge }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        413,
        "a body over the limit is refused as JSON too"
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("larger than"),
        "{body}"
    );
    let (status, body) = stack
        .request(Method::GET, "/api/tasks/not-a-uuid", Some(API_KEY), None)
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
    let (status, body) = stack
        .request(Method::GET, "/api/tasks?state=Bogus", Some(API_KEY), None)
        .await
        .unwrap();
    assert_eq!((status, body["field"].as_str()), (400, Some("state")));
    let (status, body) = stack
        .request(
            Method::GET,
            "/api/tasks/00000000-0000-0000-0000-000000000000/log?after=zz",
            Some(API_KEY),
            None,
        )
        .await
        .unwrap();
    assert_eq!((status, body["field"].as_str()), (400, Some("after")));
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&stack.db().await)
        .await
        .unwrap();
    assert_eq!(count, 0, "nothing was stored for refused submissions");
}

#[tokio::test]
async fn requests_without_a_valid_key_are_refused() {
    // Arrange
    let stack = Stack::start().await.unwrap();
    let viewer: ApiKeyCreated = stack
        .post(
            "/api/keys",
            &json!({ "name": "viewer", "permissions": ["TaskView"] }),
        )
        .await
        .unwrap();
    let process = json!({ "name": "p", "steps": [{ "name": "s", "script": "true" }] });

    // Act + Assert
    for (key, expected) in [(None, 401), (Some("API-wrong-key-000000000000"), 401)] {
        for (method, path, body) in [
            (Method::GET, "/api/tasks", None),
            (Method::POST, "/api/tasks", Some(process.clone())),
            (Method::GET, "/api/workers", None),
            (Method::GET, "/api/pools", None),
            (Method::GET, "/metrics", None),
        ] {
            let (status, err) = stack.request(method, path, key, body).await.unwrap();
            assert_eq!(status, expected, "{path} with {key:?}");
            assert!(err["error"].as_str().unwrap().contains("API key"));
        }
    }
    let (status, err) = stack
        .request(Method::POST, "/api/tasks", Some(&viewer.key), Some(process))
        .await
        .unwrap();
    assert_eq!(status, 403);
    assert!(err["error"].as_str().unwrap().contains("TaskCreate"));
    let (status, _) = stack
        .request(Method::GET, "/api/tasks", Some(&viewer.key), None)
        .await
        .unwrap();
    assert_eq!(status, 200);
    eventually(
        Duration::from_secs(10),
        "health answers without a key",
        || async {
            let (status, body) = stack
                .request(Method::GET, "/api/health", None, None)
                .await
                .ok()?;
            (status == 200 && body["status"] == "ok").then_some(())
        },
    )
    .await
    .unwrap();
    let (status, err) = stack
        .request(
            Method::POST,
            "/api/jobs/00000000-0000-0000-0000-000000000000/claim",
            None,
            Some(json!({"claim_id": uuid::Uuid::new_v4()})),
        )
        .await
        .unwrap();
    assert_eq!(status, 401, "claims need a worker credential: {err}");
}

#[tokio::test]
async fn malformed_messages_are_dead_lettered_and_nothing_crashes() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack
        .add_agent("sturdy", AgentOpts::default())
        .await
        .unwrap();
    let t = stack.topology();
    let conn = stack.amqp().await;
    let ch = conn.create_channel().await.unwrap();

    // Act: garbage, an unknown wire version, an unknown type and a `StepFinished` carrying
    // more lines than it counts (they would start before seq 0), on a pool queue (via the
    // jobs exchange) and on the results queue.
    let too_many_lines = format!(
        r#"{{"v": 1, "type": "StepFinished", "step_run_id": "{}", "attempt": 1, "job_id": "{}",
            "worker_id": "{}", "outcome": "Success", "exit_code": 0, "line_count": 1,
            "finished_at": "2026-12-02T00:00:00Z",
            "lines": [{l}, {l}, {l}]}}"#,
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        uuid::Uuid::new_v4(),
        l = r#"{"ts": "2026-12-02T00:00:00Z", "stream": "stdout", "text": "x"}"#,
    );
    let bodies: [&[u8]; 4] = [
        b"this is not json",
        br#"{"v": 2, "type": "Job"}"#,
        br#"{"v": 1, "type": "Nonsense"}"#,
        too_many_lines.as_bytes(),
    ];
    ch.confirm_select(Default::default()).await.unwrap();
    for body in bodies {
        let confirm = ch
            .basic_publish(
                t.jobs_exchange().into(),
                "pool.default-worker-pool".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            confirm.take_message().is_none(),
            "routed to the pool's queue"
        );
        ch.basic_publish(
            "".into(),
            t.results_queue().into(),
            BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let db = stack.db().await;
    let rows: Vec<(Option<String>, String)> =
        eventually(Duration::from_secs(30), "dead letters recorded", || async {
            let rows: Vec<(Option<String>, String)> =
                sqlx::query_as("SELECT queue, reason FROM dead_letters ORDER BY id")
                    .fetch_all(&db)
                    .await
                    .ok()?;
            (rows.len() >= 8).then_some(rows)
        })
        .await
        .unwrap();

    // Assert
    let from_pool = rows
        .iter()
        .filter(|(q, _)| q.as_deref() == Some(t.pool_queue("default-worker-pool").as_str()))
        .count();
    let from_results = rows
        .iter()
        .filter(|(q, _)| q.as_deref() == Some(t.results_queue().as_str()))
        .count();
    assert_eq!((from_pool, from_results), (4, 4), "{rows:?}");
    assert!(rows.iter().all(|(_, reason)| reason == "rejected"));
    // Both processes are alive and still do their work.
    let task = stack
        .submit("name = \"after\"\n[[steps]]\nname = \"s\"\nscript = \"echo still fine\"\n")
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.summary.state, "Success");
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_bad_configuration_value_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[postgres]\nmax_connections = \"lots\"\n").unwrap();
    /// Program, arguments, environment, the key the error must name.
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "gantry-dispatcher",
            vec!["serve"],
            vec![("GANTRY__HTTP__BIND", "not-an-address")],
            "http.bind",
        ),
        (
            "gantry-dispatcher",
            vec!["migrate"],
            vec![("GANTRY__POSTGRES__URL", "mysql://x/y")],
            "postgres.url",
        ),
        (
            "gantry-dispatcher",
            vec!["migrate"],
            // The first of production's refusals once a key is given (without one, whether
            // the default key file exists on this machine would decide; a missing key is
            // tested in tests/tests/secrets_at_rest.rs).
            vec![
                ("GANTRY__PRODUCTION", "true"),
                (
                    "GANTRY__SECRETS__KEY",
                    "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
                ),
            ],
            "amqp.management_url",
        ),
        (
            "gantry-agent",
            vec!["run"],
            vec![("GANTRY__AMQP__URL", "http://broker")],
            "amqp.url",
        ),
        (
            "gantry-agent",
            vec!["run"],
            vec![("GANTRY__NAMESPACE", "Bad.Name")],
            "namespace",
        ),
    ];
    for (program, args, env, key) in cases {
        let mut cmd = std::process::Command::new(bin(program));
        cmd.args(&args).current_dir(dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{program} {args:?}: {stderr}");
        assert!(stderr.contains(key), "{program}: {stderr}");
    }
    let out = std::process::Command::new(bin("gantry-dispatcher"))
        .args(["--config", file.to_str().unwrap(), "migrate"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("postgres.max_connections"));
}

#[tokio::test]
async fn metrics_report_steps_queues_durations_and_workers() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack.add_pool("metered").await.unwrap();
    stack
        .add_agent(
            "meter",
            AgentOpts {
                pools: vec!["metered".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let task = stack
        .submit(
            "name = \"m\"\n[[steps]]\nname = \"s\"\npool = \"metered\"\nscript = \"sleep 0.2\"\n",
        )
        .await
        .unwrap();
    stack
        .wait_task(task, Duration::from_secs(30))
        .await
        .unwrap();
    // A job nobody takes: its pool's only agent was killed (and is not noticed yet, as it ran
    // nothing).
    stack.add_pool("idle").await.unwrap();
    let idle = stack
        .add_agent(
            "idle",
            AgentOpts {
                pools: vec!["idle".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    stack.kill_agent(idle).await;
    stack
        .submit("name = \"w\"\n[[steps]]\nname = \"s\"\npool = \"idle\"\nscript = \"true\"\n")
        .await
        .unwrap();

    // Act: scrape until every figure is in (the second job is being published meanwhile).
    let expected = [
        "gantry_steps{state=\"Success\"} 1",
        "gantry_steps{state=\"Queued\"} 1",
        "gantry_queue_depth{pool=\"Default Worker Pool\",slug=\"default-worker-pool\"} 0",
        "gantry_queue_depth{pool=\"idle\",slug=\"idle\"} 1",
        "gantry_queue_depth{pool=\"metered\",slug=\"metered\"} 0",
        "gantry_step_duration_seconds_count 1",
        "gantry_worker_running_steps{worker=\"meter\"} 0",
        "gantry_tasks{state=\"Success\"} 1",
        "gantry_tasks{state=\"Executing\"} 1",
    ];
    let text = eventually(Duration::from_secs(20), "all figures reported", || async {
        let t = stack
            .http
            .get(format!("{}/metrics", stack.url))
            .header("X-Gantry-ApiKey", API_KEY)
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        expected.iter().all(|e| t.contains(e)).then_some(t)
    })
    .await
    .unwrap();

    // Assert
    let le1 = text
        .lines()
        .find(|l| l.starts_with("gantry_step_duration_seconds_bucket{le=\"1\"}"))
        .unwrap();
    assert!(
        le1.ends_with(" 1"),
        "a 0.2 s step falls in the 1 s bucket: {le1}"
    );
}

#[tokio::test]
async fn pools_and_workers_are_managed_with_clear_refusals() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    let linux: Pool = stack.add_pool("Linux Hosts").await.unwrap();
    assert_eq!(linux.slug, "linux-hosts");

    // Act + Assert: duplicates and the default pool are refused with reasons.
    let (status, err) = stack
        .request(
            Method::POST,
            "/api/pools",
            Some(API_KEY),
            Some(json!({ "name": "Linux Hosts" })),
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{err}");
    let pools: Vec<Pool> = stack.get("/api/pools").await.unwrap();
    let default = pools.iter().find(|p| p.is_default).unwrap();
    let (status, err) = stack
        .request(
            Method::DELETE,
            &format!("/api/pools/{}", default.id),
            Some(API_KEY),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 409);
    assert!(err["error"].as_str().unwrap().contains("default"));
    let (status, err) = stack
        .request(
            Method::POST,
            "/api/workers",
            Some(API_KEY),
            Some(json!({ "name": "w", "pools": ["nope"] })),
        )
        .await
        .unwrap();
    assert_eq!(
        (status, err["field"].as_str()),
        (400, Some("pools[0]")),
        "{err}"
    );

    let idx = stack
        .add_agent(
            "worker-1",
            AgentOpts {
                pools: vec!["Linux Hosts".into()],
                max_concurrent_steps: 3,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let (status, err) = stack
        .request(
            Method::POST,
            "/api/workers",
            Some(API_KEY),
            Some(json!({ "name": "worker-1" })),
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{err}");
    assert!(err["error"].as_str().unwrap().contains("--force"));
    let workers: Vec<Worker> = eventually(Duration::from_secs(10), "heartbeat", || async {
        let w: Vec<Worker> = stack.get("/api/workers").await.ok()?;
        (w.len() == 1 && w[0].health == "Healthy").then_some(w)
    })
    .await
    .unwrap();
    assert_eq!(workers[0].max_concurrent_steps, 3);
    assert_eq!(workers[0].pools[0].name, "Linux Hosts");
    let (status, err) = stack
        .request(
            Method::DELETE,
            &format!("/api/pools/{}", linux.id),
            Some(API_KEY),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "a pool with workers cannot be deleted: {err}");

    // Deregistering through the agent's CLI removes the worker and its queue.
    stack.kill_agent(idx).await;
    let out = std::process::Command::new(bin("gantry-agent"))
        .args([
            "--home",
            stack.agents[idx].home.to_str().unwrap(),
            "deregister",
            "--api-key",
            API_KEY,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let workers: Vec<Worker> = stack.get("/api/workers").await.unwrap();
    assert!(workers.is_empty());
    assert!(!stack.agents[idx].home.join("identity.json").exists());
    let conn = stack.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    let gone = ch
        .queue_declare(
            stack.topology().worker_queue(workers_id(&out)).into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    assert!(gone.is_err(), "the worker's queue was deleted");
    let (status, _) = stack
        .request(
            Method::DELETE,
            &format!("/api/pools/{}", linux.id),
            Some(API_KEY),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 204);
}

/// The worker id printed by `gantry-agent deregister` ("deregistered worker NAME (ID)").
fn workers_id(out: &std::process::Output) -> String {
    let s = String::from_utf8_lossy(&out.stdout);
    s.rsplit('(')
        .next()
        .unwrap()
        .trim()
        .trim_end_matches(')')
        .to_owned()
}
