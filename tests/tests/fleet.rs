//! The worker fleet: the machine policy and health checks, choosing a worker (healthy ones
//! only, the same one for a task's steps in a pool), waiting for a healthy worker, and the
//! built-in worker.

use gantry_tests::gantry_shared::api::{HealthEvent, Settings, Task, Worker};
use gantry_tests::gantry_shared::ids::TaskId;
use gantry_tests::{API_KEY, AgentOpts, Stack, bin, eventually};
use reqwest::Method;
use serde_json::json;
use std::time::Duration;

async fn worker(stack: &Stack, name: &str) -> Worker {
    let all: Vec<Worker> = stack.get("/api/workers?builtin=true").await.unwrap();
    all.into_iter()
        .find(|w| w.name == name)
        .unwrap_or_else(|| panic!("no worker {name}"))
}

async fn wait_health(stack: &Stack, name: &str, health: &str) -> Worker {
    eventually(
        Duration::from_secs(20),
        &format!("{name} {health}"),
        || async {
            let w = worker(stack, name).await;
            (w.health == health).then_some(w)
        },
    )
    .await
    .unwrap()
}

async fn put_settings(stack: &Stack, body: serde_json::Value) -> (u16, serde_json::Value) {
    stack
        .request(Method::PUT, "/api/settings", Some(API_KEY), Some(body))
        .await
        .unwrap()
}

fn one_step(pool: Option<&str>, script: &str) -> String {
    let pool = pool
        .map(|p| format!("pool = \"{p}\"\n"))
        .unwrap_or_default();
    format!("name = \"one\"\n[[steps]]\nname = \"s\"\n{pool}script = '''\n{script}\n'''\n")
}

fn worker_of(task: &Task, step: usize) -> String {
    task.steps[step]
        .attempts
        .last()
        .unwrap()
        .worker
        .clone()
        .unwrap()
}

#[tokio::test]
async fn health_checks_warn_then_fail_and_an_unhealthy_worker_gets_no_steps() {
    // Arrange: a policy whose script reads flag files beside each agent's work directory.
    let mut stack = Stack::start().await.unwrap();
    stack.add_pool("checked").await.unwrap();
    let (status, _) = stack
        .request(
            Method::POST,
            "/api/keys",
            Some(API_KEY),
            Some(json!({ "name": "viewer", "permissions": ["TaskView"] })),
        )
        .await
        .unwrap();
    assert_eq!(status, 201);
    let weak_key = stack
        .create_key("viewer2", &["TaskView", "TaskCreate"])
        .await
        .unwrap();
    let (status, body) = stack
        .request(
            Method::PUT,
            "/api/settings",
            Some(&weak_key),
            Some(json!({ "builtin_worker_enabled": false })),
        )
        .await
        .unwrap();
    assert_eq!(status, 403, "settings need ConfigureServer: {body}");
    let (status, body) = put_settings(
        &stack,
        json!({ "machine_policy": { "heartbeat_interval_secs": 20, "unavailable_after_secs": 30 } }),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "machine_policy.unavailable_after_secs");
    let (status, body) =
        put_settings(&stack, json!({ "machine_policy": { "colour": "red" } })).await;
    assert_eq!(status, 400, "unknown fields are refused: {body}");
    let script = "if [ -f ../warn ]; then echo_warning 'disk is slow'; fi\n\
                  if [ -f ../fail ]; then fail_healthcheck 'docker is not running'; fi\n\
                  echo checked";
    let (status, body) = put_settings(
        &stack,
        json!({
            "no_healthy_worker_timeout_secs": 6,
            "machine_policy": {
                "heartbeat_interval_secs": 1,
                "unavailable_after_secs": 30,
                "health_check_script": script,
                "min_free_disk_mb": 0
            }
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let settings: Settings = stack.get("/api/settings").await.unwrap();
    assert_eq!(
        settings.machine_policy.health_check_script.as_deref(),
        Some(script)
    );
    assert!(settings.builtin_worker_enabled);
    for name in ["good", "flaky"] {
        stack
            .add_agent(
                name,
                AgentOpts {
                    pools: vec!["checked".into()],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    let home = |name: &str| stack.dir.path().join(format!("agent-{name}"));
    wait_health(&stack, "flaky", "Healthy").await;

    // Act 1: a warning, then a failure.
    std::fs::write(home("flaky").join("warn"), "").unwrap();
    let warned = wait_health(&stack, "flaky", "HasWarnings").await;
    std::fs::write(home("flaky").join("fail"), "").unwrap();
    let failed = wait_health(&stack, "flaky", "Unhealthy").await;

    // Act 2: steps while one of two workers is Unhealthy.
    let mut tasks = Vec::new();
    for i in 0..6 {
        tasks.push(
            stack
                .submit(&one_step(Some("checked"), &format!("echo step {i}")))
                .await
                .unwrap(),
        );
    }
    let mut ran_on = Vec::new();
    for t in &tasks {
        let done = stack.wait_task(*t, Duration::from_secs(60)).await.unwrap();
        assert_eq!(done.summary.state, "Success", "{done:#?}");
        ran_on.push(worker_of(&done, 0));
    }

    // Act 3: both Unhealthy: a step waits, saying why, then fails.
    std::fs::write(home("good").join("fail"), "").unwrap();
    wait_health(&stack, "good", "Unhealthy").await;
    let stuck = stack
        .submit(&one_step(Some("checked"), "echo never"))
        .await
        .unwrap();
    let waiting = stack
        .wait_task_until(stuck, Duration::from_secs(20), |t| {
            t.steps[0].state == "Waiting"
        })
        .await
        .unwrap();
    let gave_up = stack
        .wait_task(stuck, Duration::from_secs(30))
        .await
        .unwrap();

    // Act 4: healthy again, steps flow again.
    std::fs::remove_file(home("flaky").join("fail")).unwrap();
    std::fs::remove_file(home("flaky").join("warn")).unwrap();
    wait_health(&stack, "flaky", "Healthy").await;
    let again = stack
        .submit(&one_step(Some("checked"), "echo again"))
        .await
        .unwrap();
    let again = stack
        .wait_task(again, Duration::from_secs(30))
        .await
        .unwrap();

    // Assert
    assert_eq!(warned.health_reason.as_deref(), Some("disk is slow"));
    assert_eq!(
        failed.health_reason.as_deref(),
        Some("disk is slow; docker is not running")
    );
    assert_eq!(ran_on, vec!["good"; 6], "an Unhealthy worker gets no steps");
    assert_eq!(
        waiting.steps[0].waiting_for.as_deref(),
        Some("pool checked has no healthy worker: 2 Unhealthy")
    );
    assert_eq!(gave_up.summary.state, "Failed");
    let error = gave_up.summary.error.unwrap_or_default();
    assert!(
        error.contains("pool checked has no healthy worker: 2 Unhealthy (waited 6 s)"),
        "{error}"
    );
    let log = stack.log(stuck).await.unwrap();
    assert!(
        log.iter()
            .any(|l| l.text.contains("waits: pool checked has no healthy worker")),
        "the wait is in the task log"
    );
    assert_eq!(again.summary.state, "Success");
    assert_eq!(worker_of(&again, 0), "flaky");
    let flaky = worker(&stack, "flaky").await;
    let history: Vec<HealthEvent> = stack
        .get(&format!("/api/workers/{}/health", flaky.id))
        .await
        .unwrap();
    let seen: Vec<(&str, Option<&str>)> = history
        .iter()
        .rev()
        .map(|e| (e.health.as_str(), e.reason.as_deref()))
        .collect();
    assert_eq!(
        seen,
        vec![
            ("Healthy", None),
            ("HasWarnings", Some("disk is slow")),
            ("Unhealthy", Some("disk is slow; docker is not running")),
            ("Healthy", None),
        ],
        "every change is recorded with its reason"
    );
}

/// Run a one-step task (in the default pool, or on the server); the worker that ran it.
async fn run_on(stack: &Stack, script: &str, location_server: bool) -> String {
    let process = if location_server {
        format!(
            "name = \"srv\"\n[[steps]]\nname = \"s\"\nlocation = \"server\"\nscript = '{script}'\n"
        )
    } else {
        one_step(None, script)
    };
    let id: TaskId = stack.submit(&process).await.unwrap();
    let done = stack.wait_task(id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    worker_of(&done, 0)
}

#[tokio::test]
async fn the_builtin_worker_runs_the_default_pool_until_an_agent_joins_and_after_it_leaves() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    // Act
    let empty_pool = run_on(&stack, "echo default", false).await;
    let server_step = run_on(&stack, "echo server", true).await;
    let idx = stack
        .add_agent("joiner", AgentOpts::default())
        .await
        .unwrap();
    let joined = run_on(&stack, "echo default", false).await;
    let server_step_still = run_on(&stack, "echo server", true).await;
    let id = worker(&stack, "joiner").await.id;
    stack.kill_agent(idx).await;
    let (status, _) = stack
        .request(
            Method::DELETE,
            &format!("/api/workers/{id}"),
            Some(API_KEY),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 204);
    let left = run_on(&stack, "echo default", false).await;
    let listed: Vec<Worker> = stack.get("/api/workers").await.unwrap();
    let all: Vec<Worker> = stack.get("/api/workers?builtin=true").await.unwrap();
    let (status, _) = put_settings(&stack, json!({ "builtin_worker_enabled": false })).await;
    assert_eq!(status, 200);
    let (refused_default, default_body) = stack
        .request(
            Method::POST,
            "/api/tasks",
            Some(API_KEY),
            Some(
                gantry_tests::gantry_dispatcher::cli::process_json(&one_step(None, "true"))
                    .unwrap(),
            ),
        )
        .await
        .unwrap();
    let (refused_server, server_body) = stack
        .request(
            Method::POST,
            "/api/tasks",
            Some(API_KEY),
            Some(
                gantry_tests::gantry_dispatcher::cli::process_json(
                    "name = \"srv\"\n[[steps]]\nname = \"s\"\nlocation = \"server\"\nscript = 'true'\n",
                )
                .unwrap(),
            ),
        )
        .await
        .unwrap();

    // Assert
    assert!(empty_pool.starts_with("built-in "), "{empty_pool}");
    assert_eq!(
        server_step, empty_pool,
        "server steps run on the built-in worker"
    );
    assert_eq!(
        joined, "joiner",
        "a registered worker replaces the built-in one"
    );
    assert_eq!(server_step_still, empty_pool);
    assert_eq!(
        left, empty_pool,
        "the built-in worker is back once the pool is empty"
    );
    assert!(
        listed.is_empty(),
        "built-in workers are not listed by default: {listed:?}"
    );
    assert!(all.iter().any(|w| w.builtin && w.name == empty_pool));
    assert_eq!(refused_default, 400, "{default_body}");
    assert!(
        default_body["error"]
            .as_str()
            .unwrap()
            .contains("the built-in worker is disabled"),
        "{default_body}"
    );
    assert_eq!(refused_server, 400, "{server_body}");
    assert_eq!(server_body["field"], "steps[0].location");
}

#[tokio::test]
async fn builtin_worker_steps_run_as_the_configured_user() {
    // Arrange: a work directory the user can reach.
    let work = std::env::temp_dir().join(format!("gantry-as-nobody-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    std::fs::set_permissions(&work, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let stack = Stack::start_with(vec![
        ("GANTRY__BUILTIN_WORKER__USER".into(), "nobody".into()),
        ("GANTRY__AGENT__WORK_DIR".into(), work.display().to_string()),
    ])
    .await
    .unwrap();

    // Act
    let id = stack
        .submit(&one_step(
            None,
            "id -un\ntouch made-here && stat -c '%U' made-here\necho \"$(cat /proc/$PPID/comm) $(stat -c %U /proc/$PPID)\"",
        ))
        .await
        .unwrap();
    let done = stack.wait_task(id, Duration::from_secs(60)).await.unwrap();
    let bad = std::process::Command::new(bin("gantry-dispatcher"))
        .arg("serve")
        .env("GANTRY__BUILTIN_WORKER__USER", "no-such-user-here")
        .env("GANTRY__HTTP__BIND", "127.0.0.1:0")
        .output()
        .unwrap();

    // Assert
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    let lines: Vec<String> = stack
        .log(id)
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.stream == "stdout")
        .map(|l| l.text)
        .collect();
    let me = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap()
        .stdout;
    let me = String::from_utf8(me).unwrap();
    assert_eq!(
        lines,
        vec![
            "nobody".to_owned(),
            "nobody".to_owned(),
            // The built-in worker starts steps itself (no guard process per step): the
            // script's parent is the dispatcher (its name cut to 15 characters by the kernel).
            format!("gantry-dispatch {}", me.trim())
        ],
        "the script runs as the user; its parent, the dispatcher, stays the dispatcher's user"
    );
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("builtin_worker.user"));
    let _ = std::fs::remove_dir_all(&work);
}

#[tokio::test]
async fn a_task_keeps_its_worker_in_a_pool_and_moves_on_when_it_dies() {
    // Arrange: three agents in one pool, and a gate pool whose step waits for a file.
    let mut stack = Stack::start().await.unwrap();
    stack.add_pool("sticky").await.unwrap();
    stack.add_pool("gate").await.unwrap();
    let mut agents = Vec::new();
    for name in ["st1", "st2", "st3"] {
        agents.push(
            stack
                .add_agent(
                    name,
                    AgentOpts {
                        pools: vec!["sticky".into()],
                        ..Default::default()
                    },
                )
                .await
                .unwrap(),
        );
    }
    stack
        .add_agent(
            "gatekeeper",
            AgentOpts {
                pools: vec!["gate".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let three = "name = \"three\"\n[[steps]]\nname = \"a\"\npool = \"sticky\"\nscript = \"sleep 0.2\"\n\
                 [[steps]]\nname = \"b\"\npool = \"sticky\"\nscript = \"sleep 0.2\"\n\
                 [[steps]]\nname = \"c\"\npool = \"sticky\"\nscript = \"sleep 0.2\"\n";
    let go = stack.dir.path().join("go");
    let counter = stack.dir.path().join("runs");
    let gated = format!(
        "name = \"gated\"\n[[steps]]\nname = \"a\"\npool = \"sticky\"\nscript = \"echo a >> '{c}'\"\n\
         [[steps]]\nname = \"gate\"\npool = \"gate\"\nscript = \"while [ ! -f '{g}' ]; do sleep 0.1; done\"\n\
         [[steps]]\nname = \"c\"\npool = \"sticky\"\nscript = \"echo c >> '{c}'\"\n",
        c = counter.display(),
        g = go.display()
    );

    // Act 1: three tasks at once, three steps each.
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(stack.submit(three).await.unwrap());
    }
    let mut per_task = Vec::new();
    for t in &tasks {
        let done = stack.wait_task(*t, Duration::from_secs(60)).await.unwrap();
        assert_eq!(done.summary.state, "Success");
        per_task.push((0..3).map(|i| worker_of(&done, i)).collect::<Vec<_>>());
    }

    // Act 2: the task's worker dies while another pool's step runs.
    let task = stack.submit(&gated).await.unwrap();
    let at_gate = stack
        .wait_task_until(task, Duration::from_secs(30), |t| {
            t.steps[1].state == "Running"
        })
        .await
        .unwrap();
    let first = worker_of(&at_gate, 0);
    let idx = ["st1", "st2", "st3"]
        .iter()
        .position(|n| *n == first)
        .unwrap();
    stack.kill_agent(agents[idx]).await;
    std::fs::write(&go, "").unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(60))
        .await
        .unwrap();

    // Assert
    for steps in &per_task {
        assert!(
            steps.iter().all(|w| *w == steps[0]),
            "a task's steps in one pool run on one worker: {per_task:?}"
        );
    }
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    let last = worker_of(&done, 2);
    assert_ne!(last, first, "the dead worker's turn went to another");
    assert!(last.starts_with("st"), "{last}");
    assert_eq!(
        done.steps[2].attempts.len(),
        1,
        "no retry needed: it never started"
    );
    let runs = std::fs::read_to_string(&counter).unwrap();
    assert_eq!(runs, "a\nc\n", "each script ran once");
    assert_eq!(worker(&stack, &first).await.health, "Unavailable");
}

#[tokio::test]
async fn registering_and_managing_workers_needs_configure_server() {
    // Arrange: a key that may run tasks but not configure the server.
    let mut stack = Stack::start().await.unwrap();
    let weak = stack
        .create_key("deployer", &["TaskView", "TaskCreate"])
        .await
        .unwrap();
    let home = stack.dir.path().join("weak-agent");
    let idx = stack
        .add_agent("managed", AgentOpts::default())
        .await
        .unwrap();
    let id = worker(&stack, "managed").await.id;

    // Act
    let cli = std::process::Command::new(bin("gantry-agent"))
        .args([
            "--home",
            home.to_str().unwrap(),
            "register",
            "--server",
            &stack.url,
        ])
        .args(["--api-key", &weak, "--name", "sneaky"])
        .output()
        .unwrap();
    let mut api = Vec::new();
    for (method, path, body) in [
        (
            Method::POST,
            "/api/workers".to_owned(),
            Some(json!({ "name": "sneaky" })),
        ),
        (
            Method::PATCH,
            format!("/api/workers/{id}"),
            Some(json!({ "enabled": false })),
        ),
        (Method::DELETE, format!("/api/workers/{id}"), None),
    ] {
        let (status, body) = stack
            .request(method.clone(), &path, Some(&weak), body)
            .await
            .unwrap();
        api.push((method, status, body));
    }
    let (disabled, _) = stack
        .request(
            Method::PATCH,
            &format!("/api/workers/{id}"),
            Some(API_KEY),
            Some(json!({ "enabled": false })),
        )
        .await
        .unwrap();
    let after = worker(&stack, "managed").await;
    stack.kill_agent(idx).await;

    // Assert
    assert!(!cli.status.success());
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(stderr.contains("ConfigureServer"), "{stderr}");
    assert!(!home.join("identity.json").exists());
    for (method, status, body) in api {
        assert_eq!(status, 403, "{method}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("ConfigureServer"),
            "{body}"
        );
    }
    assert_eq!(disabled, 200);
    assert!(!after.enabled);
    let names: Vec<String> = stack
        .get::<Vec<Worker>>("/api/workers")
        .await
        .unwrap()
        .into_iter()
        .map(|w| w.name)
        .collect();
    assert_eq!(
        names,
        vec!["managed"],
        "nothing was registered with the weak key"
    );
}
