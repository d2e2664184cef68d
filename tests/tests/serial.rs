//! Tests that restart or reconfigure a shared service. Their names start with `serial_`, and
//! `.config/nextest.toml` runs each of them alone.

use gantry_tests::gantry_shared::ids::TaskId;
use gantry_tests::{AgentOpts, Stack, eventually};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn mark(file: &Path, what: &str) -> String {
    format!(
        "echo \"{what} $(date +%s%N) #{{Gantry.Task.Id}}\" >> '{}'",
        file.display()
    )
}

fn intervals(file: &Path) -> Vec<(i128, i128)> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut starts = std::collections::HashMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let ts: i128 = parts[1].parse().unwrap();
        match parts[0] {
            "start" => {
                starts.insert(parts[2].to_owned(), ts);
            }
            _ => out.push((starts[parts[2]], ts)),
        }
    }
    out
}

fn max_overlap(iv: &[(i128, i128)]) -> usize {
    let mut points: Vec<(i128, i32)> = iv.iter().flat_map(|(a, b)| [(*a, 1), (*b, -1)]).collect();
    points.sort();
    let (mut cur, mut best) = (0, 0);
    for (_, d) in points {
        cur += d;
        best = best.max(cur);
    }
    best as usize
}

fn redis_up() -> bool {
    Command::new("redis-cli")
        .arg("ping")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
}

/// Start Redis the way the machine starts it (no persistence), if it is down.
fn start_redis() {
    if redis_up() {
        return;
    }
    let status = Command::new("redis-server")
        .args([
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/var/lib/redis",
            "--logfile",
            "/var/log/redis/ci.log",
        ])
        .status()
        .expect("redis-server");
    assert!(status.success());
    for _ in 0..100 {
        if redis_up() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("Redis did not come back");
}

/// Puts Redis back even if the test fails half-way.
struct RedisBack;
impl Drop for RedisBack {
    fn drop(&mut self) {
        start_redis();
    }
}

#[tokio::test]
async fn serial_restarting_redis_mid_run_keeps_mutex_steps_apart_and_everything_finishes() {
    // Arrange: a 20 s lease (renewed every 6.7 s, given up after 10 s without Redis); three
    // mutex steps of 9 s, so the first one holds the mutex across the outage and must
    // re-claim it when Redis comes back empty; free steps meanwhile.
    let _back = RedisBack;
    let mut stack = Stack::start_with(vec![("GANTRY__LOCKS__LEASE_MS".into(), "20000".into())])
        .await
        .unwrap();
    for name in ["r1", "r2"] {
        stack
            .add_agent(
                name,
                AgentOpts {
                    max_concurrent_steps: 3,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    let mutexed = stack.dir.path().join("mutexed");
    let free = stack.dir.path().join("free");
    let process = |file: &Path, mutex: bool, secs: f64| {
        format!(
            "name = \"r\"\n[[steps]]\nname = \"s\"\n{}script = '''\n{}\nsleep {secs}\n{}\n'''\n",
            if mutex { "mutex = \"stateful\"\n" } else { "" },
            mark(file, "start"),
            mark(file, "end")
        )
    };
    let mut tasks: Vec<TaskId> = Vec::new();
    for _ in 0..3 {
        tasks.push(stack.submit(&process(&mutexed, true, 9.0)).await.unwrap());
    }
    stack
        .wait_task_until(tasks[0], Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Act: Redis goes away (losing everything), steps without a mutex are submitted meanwhile,
    // and Redis comes back.
    let out = Command::new("redis-cli")
        .args(["shutdown", "nosave"])
        .output()
        .unwrap();
    assert!(!redis_up(), "redis stopped: {out:?}");
    for _ in 0..4 {
        tasks.push(stack.submit(&process(&free, false, 0.5)).await.unwrap());
    }
    let free_tasks = tasks[3..].to_vec();
    for t in &free_tasks {
        let done = stack.wait_task(*t, Duration::from_secs(30)).await.unwrap();
        assert_eq!(
            done.summary.state, "Success",
            "steps without a mutex ran while Redis was down"
        );
    }
    let said = eventually(Duration::from_secs(10), "waiting steps say why", || async {
        for t in &tasks[1..3] {
            let log = stack.log(*t).await.ok()?;
            if log.iter().any(|l| l.text.contains("Redis is unavailable")) {
                return Some(());
            }
        }
        None
    })
    .await;
    start_redis();
    for t in &tasks {
        let done = stack.wait_task(*t, Duration::from_secs(120)).await.unwrap();
        assert_eq!(done.summary.state, "Success", "{done:#?}");
    }

    // Assert
    said.unwrap();
    let logs = stack.all_logs();
    assert!(
        logs.contains("re-claimed a mutex for its holder after Redis lost its data"),
        "the running holder took its mutex back instead of being stopped"
    );
    let m = intervals(&mutexed);
    assert_eq!(m.len(), 3);
    assert_eq!(
        max_overlap(&m),
        1,
        "no two mutex steps overlapped across the restart"
    );
    let db = stack.db().await;
    let tokens: Vec<i64> = sqlx::query_scalar(
        "SELECT mutex_token FROM attempts WHERE mutex_token IS NOT NULL ORDER BY started_at",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens kept growing: {tokens:?}"
    );
    assert!(
        tokens.iter().all(|t| t >> 32 >= 2),
        "every recorded token is from the epoch set after Redis came back empty (the holder re-claimed under it): {tokens:?}"
    );
}

fn set_consumer_timeout(ms: u64) {
    let out = Command::new("rabbitmqctl")
        .args([
            "eval",
            &format!("application:set_env(rabbit, consumer_timeout, {ms})."),
        ])
        .output()
        .expect("rabbitmqctl");
    assert!(out.status.success(), "{out:?}");
}

/// Puts the broker's consumer timeout back to its default (30 minutes).
struct TimeoutBack;
impl Drop for TimeoutBack {
    fn drop(&mut self) {
        set_consumer_timeout(1_800_000);
    }
}

#[tokio::test]
async fn serial_a_step_outliving_the_consumer_timeout_finishes_once() {
    // Arrange: RabbitMQ closes channels holding a delivery unacked for 5 s (checked once a
    // minute); the agents connect after the change, so it applies to them.
    let _back = TimeoutBack;
    set_consumer_timeout(5_000);
    let mut stack = Stack::start().await.unwrap();
    stack
        .add_agent("patient", AgentOpts::default())
        .await
        .unwrap();
    stack
        .add_agent("other", AgentOpts::default())
        .await
        .unwrap();
    let counter = stack.dir.path().join("runs");

    // Act: a step longer than the timeout plus the broker's check interval.
    let task = stack
        .submit(&format!(
            "name = \"long\"\n[[steps]]\nname = \"s\"\nscript = '''\necho ran >> '{}'\nsleep 75\necho done\n'''\n",
            counter.display()
        ))
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(150))
        .await
        .unwrap();

    // Assert
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    assert_eq!(done.steps[0].attempts.len(), 1, "one attempt");
    let runs = std::fs::read_to_string(&counter).unwrap();
    assert_eq!(runs.lines().count(), 1, "the script ran once");
    assert!(
        stack
            .log(task)
            .await
            .unwrap()
            .iter()
            .any(|l| l.text == "done")
    );
}

/// A process whose steps print numbered lines slowly and count their runs in a file.
fn chatty(counter: &Path, steps: usize, lines: usize) -> String {
    let mut p = String::from("name = \"chatty\"\n");
    for i in 0..steps {
        p.push_str(&format!(
            "[[steps]]\nname = \"s{i}\"\nscript = '''\necho s{i} >> '{}'\nfor n in $(seq 1 {lines}); do echo \"s{i} line $n\"; sleep 0.05; done\n'''\n",
            counter.display()
        ));
    }
    p
}

/// Every step ran once and every line is stored once, in order, without a gap.
async fn assert_complete(
    stack: &Stack,
    tasks: &[TaskId],
    counter: &Path,
    steps: usize,
    lines: usize,
) {
    for t in tasks {
        let done = stack.wait_task(*t, Duration::from_secs(180)).await.unwrap();
        assert_eq!(done.summary.state, "Success", "{done:#?}");
        for s in &done.steps {
            assert_eq!(s.attempts.len(), 1, "{} ran in one attempt", s.name);
        }
        let log = stack.log(*t).await.unwrap();
        for i in 0..steps {
            let got: Vec<&str> = log
                .iter()
                .filter(|l| l.text.starts_with(&format!("s{i} line ")))
                .map(|l| l.text.as_str())
                .collect();
            let want: Vec<String> = (1..=lines).map(|n| format!("s{i} line {n}")).collect();
            assert_eq!(got, want, "task {t} step s{i}: every line once, in order");
        }
    }
    let runs = std::fs::read_to_string(counter).unwrap();
    assert_eq!(
        runs.lines().count(),
        tasks.len() * steps,
        "each script ran exactly once"
    );
    let db = stack.db().await;
    let (rows, distinct, stored): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (step_run_id, attempt, seq)),
                (SELECT COALESCE(sum(lines_stored), 0)::bigint FROM attempts)
         FROM log_lines WHERE seq IS NOT NULL",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        (rows, distinct),
        (stored, stored),
        "no line doubled or missing"
    );
}

async fn started(stack: &Stack, tasks: &[TaskId]) {
    for t in tasks {
        stack
            .wait_task_until(*t, Duration::from_secs(60), |t| {
                t.steps[0].state == "Running"
            })
            .await
            .unwrap();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
}

/// Puts RabbitMQ's app back even if the test fails half-way.
struct RabbitBack;
impl Drop for RabbitBack {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
    }
}

#[tokio::test]
async fn serial_restarting_rabbitmq_mid_run_loses_and_repeats_nothing() {
    // Arrange
    let _back = RabbitBack;
    let mut stack = Stack::start().await.unwrap();
    for name in ["b1", "b2"] {
        stack.add_agent(name, AgentOpts::default()).await.unwrap();
    }
    let counter = stack.dir.path().join("runs");
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(stack.submit(&chatty(&counter, 2, 60)).await.unwrap());
    }
    started(&stack, &tasks).await;

    // Act: the broker goes away mid-step for a few seconds.
    run("rabbitmqctl", &["stop_app"]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    run("rabbitmqctl", &["start_app"]);

    // Assert
    assert_complete(&stack, &tasks, &counter, 2, 60).await;
    let lost: i64 = sqlx::query_scalar("SELECT count(*) FROM attempts WHERE state = 'WorkerLost'")
        .fetch_one(&stack.db().await)
        .await
        .unwrap();
    assert_eq!(lost, 0, "agents that reconnect are not declared lost");
}

#[tokio::test]
async fn serial_restarting_postgresql_mid_run_loses_and_repeats_nothing() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    for name in ["p1", "p2"] {
        stack.add_agent(name, AgentOpts::default()).await.unwrap();
    }
    let counter = stack.dir.path().join("runs");
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(stack.submit(&chatty(&counter, 2, 60)).await.unwrap());
    }
    started(&stack, &tasks).await;

    // Act
    let version = std::fs::read_dir("/etc/postgresql")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max()
        .unwrap();
    run(
        "pg_ctlcluster",
        &["--skip-systemctl-redirect", &version, "main", "restart"],
    );

    // Assert
    assert_complete(&stack, &tasks, &counter, 2, 60).await;
}

/// Turns RabbitMQ's firehose off again even if the test fails half-way.
struct TraceOff;
impl Drop for TraceOff {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("trace_off").output();
    }
}

#[tokio::test]
async fn serial_secrets_are_masked_in_every_case_and_never_in_clear_in_postgres_or_rabbitmq() {
    // Arrange: RabbitMQ's firehose copies every message published on the vhost to
    // amq.rabbitmq.trace; a queue of ours keeps the copies.
    let _off = TraceOff;
    let mut stack = Stack::start().await.unwrap();
    stack
        .add_agent("masker", AgentOpts::default())
        .await
        .unwrap();
    run("rabbitmqctl", &["trace_on"]);
    let conn = stack.amqp().await;
    let ch = conn.create_channel().await.unwrap();
    let tap = format!("{}.tap", stack.ns);
    ch.queue_declare(
        tap.as_str().into(),
        lapin::options::QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        tap.as_str().into(),
        "amq.rabbitmq.trace".into(),
        "publish.#".into(),
        lapin::options::QueueBindOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
    let secret = "s3cr3t-Pa55w0rd";
    let process = format!(
        r##"
name = "masks"
[variables]
Secret = {{ value = "{secret}", sensitive = true }}
Multi = {{ value = "line-one-hidden\nline-two-hidden", sensitive = true }}
[[steps]]
name = "leaky"
script = '''
echo "twice: #{{Secret}} and #{{Secret}}"
echo "inside: xx#{{Secret}}yy"
printf 's3cr3t-'; sleep 0.5; printf 'Pa55w0rd split across two writes\n'
set -x
: "$Secret"
set +x
echo "#{{Multi}}"
echo "stderr: $Secret" >&2
set_gantryvariable Derived "derived-$Secret" sensitive
'''
[[steps]]
name = "later"
syntax = "python3"
script = '''
print("later: #{{Steps.leaky.Output.Derived}}")
'''
"##
    );

    // Act
    let id = stack.submit(&process).await.unwrap();
    let done = stack.wait_task(id, Duration::from_secs(60)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut copies = Vec::new();
    while let Some(m) = ch
        .basic_get(
            tap.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        copies.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
    }
    let dump = Command::new("pg_dump")
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

    // Assert
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    let lines: Vec<String> = stack.log_texts(id).await.unwrap();
    for expected in [
        "twice: ******** and ********",
        "inside: xx********yy",
        "******** split across two writes",
        "+ : ********",
        "********",
        "stderr: ********",
        "later: ********",
    ] {
        assert!(
            lines.iter().any(|l| l == expected),
            "{expected:?} in {lines:#?}"
        );
    }
    let ours: Vec<&String> = copies
        .iter()
        .filter(|c| c.contains(&id.to_string()) || c.contains("leaky"))
        .collect();
    assert!(
        !ours.is_empty(),
        "the firehose saw the task's messages ({} copies)",
        copies.len()
    );
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.contains("twice: ******** and ********"),
        "the dump has the log"
    );
    // The script itself prints the secret in two halves, so only the log may not hold them.
    assert!(
        !lines.iter().any(|l| l.contains("Pa55w0rd")),
        "a half in the log"
    );
    for needle in [
        secret,
        "line-one-hidden",
        "line-two-hidden",
        "derived-s3cr3t",
    ] {
        assert!(
            !lines.iter().any(|l| l.contains(needle)),
            "{needle} in the log"
        );
        assert!(!dump.contains(needle), "{needle} in the PostgreSQL dump");
        assert!(
            !copies.iter().any(|c| c.contains(needle)),
            "{needle} in a RabbitMQ message"
        );
    }
}
