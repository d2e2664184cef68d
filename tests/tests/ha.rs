//! High availability of dispatcher nodes: two `gantry-dispatcher serve` processes on one
//! database, broker and Redis. Each task is orchestrated by exactly one node (a lease in
//! PostgreSQL); a node killed mid-task has its tasks taken over by the other, which finishes
//! them; `dispatcher.task_cap` bounds how many tasks one node orchestrates.

use gantry_tests::gantry_shared::ids::TaskId;
use gantry_tests::{AgentOpts, Stack, eventually};
use std::time::{Duration, Instant};

/// A step that records its run in `counter`, then prints `ticks` numbered lines, 0.1 s apart.
fn step(name: &str, counter: &std::path::Path, ticks: u32) -> String {
    format!(
        r##"
[[steps]]
name = "{name}"
script = """
echo {name} >> '{}'
for i in $(seq 1 {ticks}); do echo "{name} tick $i"; sleep 0.1; done
"""
"##,
        counter.display()
    )
}

/// The name (`host@address`) of the node that owns the task now, if any.
async fn owner(stack: &Stack, task: TaskId) -> Option<String> {
    sqlx::query_scalar(
        "SELECT n.name FROM tasks t JOIN dispatcher_nodes n ON n.id = t.owner_node
         WHERE t.id = $1",
    )
    .bind(task.0)
    .fetch_optional(&stack.db().await)
    .await
    .unwrap()
}

fn addr_of(url: &str) -> &str {
    url.trim_start_matches("http://")
}

#[tokio::test]
async fn two_nodes_kill_the_owner_mid_task_and_the_other_finishes_it() {
    // Arrange: two nodes, two agents that know both.
    let mut stack = Stack::start().await.unwrap();
    stack.start_node(Vec::new()).await.unwrap();
    let servers = format!("{},{}", stack.url, stack.nodes[0].url);
    for name in ["ha-a", "ha-b"] {
        stack
            .add_agent(
                name,
                AgentOpts {
                    server: Some(servers.clone()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    let counter = stack.dir.path().join("runs");
    let process = format!(
        "name = \"ha\"\n{}{}{}",
        step("one", &counter, 15),
        step("two", &counter, 40),
        step("three", &counter, 15)
    );

    // Act: submitted through the first node, which takes it; kill that node while step two
    // runs.
    let task = stack.submit(&process).await.unwrap();
    stack
        .wait_task_until(task, Duration::from_secs(60), |t| {
            t.steps[1].state == "Running"
        })
        .await
        .unwrap();
    let first_owner = owner(&stack, task).await.expect("the task has an owner");
    let killed_primary = first_owner.ends_with(&format!("@{}", addr_of(&stack.url)));
    if killed_primary {
        stack.kill_dispatcher().await;
        stack.url = stack.nodes[0].url.clone();
    } else {
        assert!(
            first_owner.ends_with(&format!("@{}", addr_of(&stack.nodes[0].url))),
            "owner {first_owner} is one of the two nodes"
        );
        stack.kill_node(0).await;
    }
    let killed_at = Instant::now();
    let survivor = addr_of(&stack.url).to_owned();
    let new_owner = eventually(
        Duration::from_secs(30),
        "takeover by the other node",
        || {
            let stack = &stack;
            async move {
                let db = stack.db().await;
                let took: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM log_lines WHERE task_id = $1
                                AND text LIKE 'Dispatcher node % took over this task%')",
                )
                .bind(task.0)
                .fetch_one(&db)
                .await
                .ok()?;
                if !took {
                    return None;
                }
                owner(stack, task).await
            }
        },
    )
    .await;
    let took_over_within = killed_at.elapsed();
    let done = stack
        .wait_task(task, Duration::from_secs(90))
        .await
        .unwrap();

    // Assert
    let new_owner = new_owner.unwrap_or_else(|e| panic!("{e}\n{}", stack.all_logs()));
    assert!(
        new_owner.ends_with(&format!("@{survivor}")),
        "the survivor {survivor} owns the task, not {new_owner}"
    );
    assert!(
        took_over_within <= Duration::from_secs(30),
        "taken over within 30 s (took {took_over_within:?})"
    );
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    for s in &done.steps {
        assert_eq!(s.state, "Success", "{}", s.name);
        assert_eq!(s.attempts.len(), 1, "{} ran as one attempt", s.name);
    }
    let runs = std::fs::read_to_string(&counter).unwrap();
    assert_eq!(
        runs.lines().collect::<Vec<_>>(),
        vec!["one", "two", "three"],
        "every step's script ran exactly once"
    );
    let log = stack.log(task).await.unwrap();
    for (name, ticks) in [("one", 15), ("two", 40), ("three", 15)] {
        let seen: Vec<&str> = log
            .iter()
            .filter(|l| l.text.starts_with(&format!("{name} tick ")))
            .map(|l| l.text.as_str())
            .collect();
        let expected: Vec<String> = (1..=ticks).map(|i| format!("{name} tick {i}")).collect();
        assert_eq!(seen, expected, "{name}: every line once, in order");
    }
    let position = |needle: &str| {
        log.iter()
            .position(|l| l.text.contains(needle))
            .unwrap_or_else(|| panic!("no log line with {needle:?}"))
    };
    assert!(position("one tick 15") < position("two tick 1"));
    assert!(position("two tick 40") < position("three tick 1"));
    let takeover = &log[position("took over this task")];
    assert!(
        takeover.text.contains(&survivor) && takeover.text.contains(&first_owner),
        "the takeover line names both nodes: {}",
        takeover.text
    );
    assert!(
        log.last().unwrap().text.contains("succeeded"),
        "the log ends with the task's end: {:?}",
        log.last()
    );
    // Ended tasks have no owner: they no longer count against a node's cap.
    assert_eq!(owner(&stack, task).await, None);
}

/// A node at its task cap leaves further tasks queued until it has room again.
#[tokio::test]
async fn a_node_at_its_task_cap_starts_the_next_task_only_when_one_ends() {
    // Arrange
    let mut stack = Stack::start_with(vec![("GANTRY__DISPATCHER__TASK_CAP".into(), "1".into())])
        .await
        .unwrap();
    stack
        .add_agent("capped", AgentOpts::default())
        .await
        .unwrap();
    let counter = stack.dir.path().join("runs");
    let process = |name: &str| format!("name = \"{name}\"\n{}", step(name, &counter, 20));

    // Act
    let first = stack.submit(&process("first")).await.unwrap();
    stack
        .wait_task_until(first, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .unwrap();
    let second = stack.submit(&process("second")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second_meanwhile = stack.task(second).await.unwrap();
    let a = stack
        .wait_task(first, Duration::from_secs(60))
        .await
        .unwrap();
    let b = stack
        .wait_task(second, Duration::from_secs(60))
        .await
        .unwrap();

    // Assert
    assert_eq!(second_meanwhile.summary.state, "Queued");
    assert_eq!(a.summary.state, "Success");
    assert_eq!(b.summary.state, "Success");
    assert!(
        b.summary.started_at.unwrap() >= a.summary.finished_at.unwrap(),
        "the second task started only after the first ended: {a:?} {b:?}"
    );
    let runs = std::fs::read_to_string(&counter).unwrap();
    assert_eq!(runs.lines().collect::<Vec<_>>(), vec!["first", "second"]);
}

/// Two nodes with a cap of one each: two tasks run at once, one on each node.
#[tokio::test]
async fn two_capped_nodes_share_the_tasks() {
    // Arrange
    let cap = vec![("GANTRY__DISPATCHER__TASK_CAP".to_owned(), "1".to_owned())];
    let mut stack = Stack::start_with(cap.clone()).await.unwrap();
    stack.start_node(cap).await.unwrap();
    stack
        .add_agent(
            "shared",
            AgentOpts {
                server: Some(format!("{},{}", stack.url, stack.nodes[0].url)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // Each step holds until the test lets it go, so "at the same time" does not depend on
    // how fast the machine is.
    let release = stack.dir.path().join("release");
    let process = |name: &str| {
        format!(
            "name = \"{name}\"\n[[steps]]\nname = \"{name}\"\nscript = \"while [ ! -f '{}' ]; do sleep 0.1; done\"\n",
            release.display()
        )
    };

    // Act: both submitted through the first node.
    let first = stack.submit(&process("first")).await.unwrap();
    let second = stack.submit(&process("second")).await.unwrap();
    let owners = eventually(Duration::from_secs(30), "both tasks owned", || {
        let stack = &stack;
        async move {
            let a = owner(stack, first).await?;
            let b = owner(stack, second).await?;
            Some((a, b))
        }
    })
    .await
    .unwrap();
    let both_running = stack
        .wait_task_until(second, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
        .is_ok()
        && stack.task(first).await.unwrap().steps[0].state == "Running";
    std::fs::write(&release, "").unwrap();
    let a = stack
        .wait_task(first, Duration::from_secs(60))
        .await
        .unwrap();
    let b = stack
        .wait_task(second, Duration::from_secs(60))
        .await
        .unwrap();

    // Assert
    assert_ne!(owners.0, owners.1, "one task per node");
    assert!(both_running, "the two tasks ran at the same time");
    assert_eq!(a.summary.state, "Success");
    assert_eq!(b.summary.state, "Success");
}

/// Both nodes run the mutex service: mutex steps of tasks submitted through either node never
/// overlap, and no step loses its lease to the other node's service (each runs once, as one
/// attempt, and succeeds).
#[tokio::test]
async fn mutex_steps_submitted_through_two_nodes_never_overlap_and_keep_their_leases() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack.start_node(Vec::new()).await.unwrap();
    let servers = format!("{},{}", stack.url, stack.nodes[0].url);
    for name in ["mx-a", "mx-b"] {
        stack
            .add_agent(
                name,
                AgentOpts {
                    server: Some(servers.clone()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }
    let dir = stack.dir.path().to_owned();
    let process = format!(
        r#"name = "mx"
[[steps]]
name = "migrate"
mutex = "ha-db"
script = '''
mkdir '{d}/held' 2>/dev/null || echo overlap >> '{d}/overlaps'
echo run >> '{d}/runs'
sleep 0.2
rmdir '{d}/held'
'''
"#,
        d = dir.display()
    );

    // Act: twelve tasks, alternately through each node.
    let first_url = stack.url.clone();
    let mut tasks = Vec::new();
    for i in 0..12 {
        stack.url = if i % 2 == 0 {
            first_url.clone()
        } else {
            stack.nodes[0].url.clone()
        };
        tasks.push(stack.submit(&process).await.unwrap());
    }
    stack.url = first_url;
    let mut done = Vec::new();
    for t in &tasks {
        done.push(stack.wait_task(*t, Duration::from_secs(120)).await.unwrap());
    }

    // Assert
    for t in &done {
        assert_eq!(t.summary.state, "Success", "{t:#?}");
        assert_eq!(t.steps[0].attempts.len(), 1, "{t:#?}");
    }
    assert!(!dir.join("overlaps").exists(), "two mutex steps overlapped");
    let runs = std::fs::read_to_string(dir.join("runs")).unwrap();
    assert_eq!(runs.lines().count(), 12, "each step ran once");
    let db = stack.db().await;
    let tokens: Vec<i64> = sqlx::query_scalar(
        "SELECT mutex_token FROM attempts WHERE mutex_token IS NOT NULL ORDER BY started_at",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(tokens.len(), 12);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens grow with each grant"
    );
}
