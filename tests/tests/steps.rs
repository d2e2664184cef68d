//! What a deployment step can do: manual intervention, e-mail, outputs across interpreters,
//! parallel groups, conditions, retries and timeouts.

use gantry_tests::gantry_shared::api::Task;
use gantry_tests::{API_KEY, AgentOpts, SmtpSink, Stack, bin, eventually};
use reqwest::Method;
use serde_json::json;
use std::time::{Duration, Instant};

fn step<'a>(task: &'a Task, name: &str) -> &'a gantry_tests::gantry_shared::api::StepRun {
    task.steps.iter().find(|s| s.name == name).unwrap()
}

const GATED: &str = r##"
name = "gated"
[variables]
Environment = "staging"
[[steps]]
name = "build"
script = "echo built"
[[steps]]
name = "gate"
kind = "manual"
instructions = "Check the #{Environment} dashboards"
[[steps]]
name = "ship"
script = "echo shipped"
[[steps]]
name = "notify"
condition = "failure"
script = "echo 'someone said no'"
"##;

#[tokio::test]
async fn a_manual_step_waits_for_a_decision_and_records_who_decided_when_and_why() {
    // Arrange: no agent: script steps of the default pool run on the built-in worker.
    let stack = Stack::start().await.unwrap();
    let viewer = stack.create_key("viewer", &["TaskView"]).await.unwrap();
    let approved = stack.submit(GATED).await.unwrap();
    let rejected = stack.submit(GATED).await.unwrap();
    let cancelled = stack.submit(GATED).await.unwrap();
    let mut waiting = Vec::new();
    for t in [approved, rejected, cancelled] {
        waiting.push(
            stack
                .wait_task_until(t, Duration::from_secs(30), |t| t.summary.state == "Waiting")
                .await
                .unwrap(),
        );
    }

    // Act
    let path = |t: &str, s: &str, verb: &str| format!("/api/tasks/{t}/steps/{s}/{verb}");
    let (forbidden, _) = stack
        .request(
            Method::POST,
            &path(&approved.to_string(), "gate", "approve"),
            Some(&viewer),
            None,
        )
        .await
        .unwrap();
    let (not_manual, not_manual_body) = stack
        .request(
            Method::POST,
            &path(&approved.to_string(), "build", "approve"),
            Some(API_KEY),
            None,
        )
        .await
        .unwrap();
    let (no_step, _) = stack
        .request(
            Method::POST,
            &path(&approved.to_string(), "nope", "approve"),
            Some(API_KEY),
            None,
        )
        .await
        .unwrap();
    let cli = std::process::Command::new(bin("gantry"))
        .args(["--server", &stack.url, "--api-key", API_KEY])
        .args([
            "approve",
            &approved.to_string(),
            "gate",
            "--note",
            "dashboards are green",
        ])
        .output()
        .unwrap();
    let (again, again_body) = stack
        .request(
            Method::POST,
            &path(&approved.to_string(), "gate", "reject"),
            Some(API_KEY),
            None,
        )
        .await
        .unwrap();
    let (rejected_status, _) = stack
        .request(
            Method::POST,
            &path(&rejected.to_string(), "gate", "reject"),
            Some(API_KEY),
            Some(json!({ "note": "error rate too high" })),
        )
        .await
        .unwrap();
    let (cancel_status, _) = stack
        .request(
            Method::POST,
            &format!("/api/tasks/{cancelled}/cancel"),
            Some(API_KEY),
            None,
        )
        .await
        .unwrap();
    let approved = stack
        .wait_task(approved, Duration::from_secs(30))
        .await
        .unwrap();
    let rejected = stack
        .wait_task(rejected, Duration::from_secs(30))
        .await
        .unwrap();
    let cancelled = stack
        .wait_task(cancelled, Duration::from_secs(30))
        .await
        .unwrap();

    // Assert
    let first = &waiting[0];
    assert_eq!(step(first, "gate").state, "Waiting");
    assert_eq!(step(first, "gate").waiting_for.as_deref(), Some("approval"));
    assert_eq!(step(first, "ship").state, "Pending");
    let asked = step(first, "gate").approval.clone().unwrap();
    assert_eq!(asked.instructions, "Check the staging dashboards");
    assert!(asked.decision.is_none());
    assert!(
        step(first, "gate").attempts.is_empty(),
        "a manual step runs nothing on a worker"
    );
    assert_eq!(forbidden, 403, "deciding needs TaskCreate");
    assert_eq!(not_manual, 409, "{not_manual_body}");
    assert_eq!(no_step, 404);
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert!(String::from_utf8_lossy(&cli.stdout).contains("approved by"));
    assert_eq!(again, 409, "{again_body}");
    assert!(
        again_body["error"]
            .as_str()
            .unwrap()
            .contains("already approved")
    );

    assert_eq!(approved.summary.state, "Success", "{approved:#?}");
    let decided = step(&approved, "gate").approval.clone().unwrap();
    assert_eq!(decided.decision.as_deref(), Some("Approved"));
    assert_eq!(decided.note.as_deref(), Some("dashboards are green"));
    assert!(decided.decided_by.as_deref().is_some_and(|b| !b.is_empty()));
    assert!(decided.decided_at.unwrap() >= decided.requested_at.unwrap());
    assert_eq!(step(&approved, "ship").state, "Success");
    assert_eq!(step(&approved, "notify").state, "Skipped");
    let shown = std::process::Command::new(bin("gantry"))
        .args(["--server", &stack.url, "--api-key", API_KEY])
        .args(["task", &approved.summary.id.to_string()])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown
            .lines()
            .any(|l| l.contains("gate") && l.contains("(manual)") && l.contains("approved by")),
        "{shown}"
    );
    let log = stack.log(approved.summary.id).await.unwrap();
    assert!(log.iter().any(|l| {
        l.text
            .contains("waits for approval: Check the staging dashboards")
    }));
    assert!(
        log.iter()
            .any(|l| l.text.contains("approved by") && l.text.contains("dashboards are green"))
    );

    assert_eq!(rejected_status, 200);
    assert_eq!(rejected.summary.state, "Failed");
    let gate = step(&rejected, "gate");
    assert_eq!(gate.state, "Failed");
    assert!(
        gate.reason
            .as_deref()
            .unwrap()
            .contains("error rate too high")
    );
    assert_eq!(step(&rejected, "ship").state, "Skipped");
    assert_eq!(
        step(&rejected, "notify").state,
        "Success",
        "failure steps run after a rejection"
    );

    assert_eq!(cancel_status, 202);
    assert_eq!(cancelled.summary.state, "Cancelled");
    assert_eq!(step(&cancelled, "gate").state, "Cancelled");
}

#[tokio::test]
async fn an_email_step_is_sent_by_the_dispatcher_with_variables_and_masked_secrets() {
    // Arrange
    let dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start(dir.path()).await.unwrap();
    let stack = Stack::start_with(vec![
        ("GANTRY__SMTP__PORT".into(), sink.port.to_string()),
        ("GANTRY__SMTP__FROM".into(), "gantry@deploy.example".into()),
    ])
    .await
    .unwrap();
    let process = r##"
name = "mail"
[variables]
Environment = "staging"
Owner = "dev@example.com"
DbPassword = { value = "hunter2-very-secret", sensitive = true }
[[steps]]
name = "build"
script = "set_gantryvariable Version 1.2.3"
[[steps]]
name = "tell"
kind = "email"
to = ["ops@example.com", "#{Owner}"]
subject = "Deployed #{Steps.build.Output.Version} to #{Environment}"
body = "Task #{Gantry.Task.Name} is done. The password is #{DbPassword}."
"##;

    // Act
    let sent = stack.submit(process).await.unwrap();
    let sent = stack
        .wait_task(sent, Duration::from_secs(30))
        .await
        .unwrap();
    let mail = eventually(Duration::from_secs(10), "message arrived", || async {
        sink.messages().into_iter().next()
    })
    .await
    .unwrap();
    let broken = Stack::start_with(vec![("GANTRY__SMTP__PORT".into(), "1".into())])
        .await
        .unwrap();
    let unsent = broken.submit(process).await.unwrap();
    let unsent = broken
        .wait_task(unsent, Duration::from_secs(60))
        .await
        .unwrap();

    // Assert
    assert_eq!(sent.summary.state, "Success", "{sent:#?}");
    let tell = step(&sent, "tell");
    assert_eq!(tell.worker.as_deref(), Some("dispatcher (e-mail)"));
    assert!(
        mail.starts_with("X-Envelope-To: ops@example.com, dev@example.com\n"),
        "{mail}"
    );
    assert!(
        mail.contains("Subject: Deployed 1.2.3 to staging"),
        "{mail}"
    );
    assert!(mail.contains("From: gantry@deploy.example"), "{mail}");
    assert!(
        mail.contains("Task mail is done. The password is ********."),
        "{mail}"
    );
    assert!(!mail.contains("hunter2"), "no secret in the message");
    assert_eq!(unsent.summary.state, "Failed");
    assert!(
        step(&unsent, "tell")
            .reason
            .as_deref()
            .unwrap()
            .contains("could not send the e-mail"),
        "{unsent:#?}"
    );
}

#[tokio::test]
async fn an_output_flows_from_bash_to_python3_to_sh() {
    let stack = Stack::start().await.unwrap();
    let process = r##"
name = "relay"
[[steps]]
name = "b"
script = "set_gantryvariable Greeting hello"
[[steps]]
name = "p"
syntax = "python3"
script = '''
value = "#{Steps.b.Output.Greeting}"
print("python got", value)
set_gantryvariable("Louder", value.upper() + "!")
set_gantryvariable("Token", "py-secret-token-42", sensitive=True)
print("token is py-secret-token-42")
'''
[[steps]]
name = "s"
syntax = "sh"
script = '''
echo "sh got #{Steps.p.Output.Louder}"
echo "and the token #{Steps.p.Output.Token}"
'''
"##;
    let id = stack.submit(process).await.unwrap();
    let done = stack.wait_task(id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    let texts: Vec<String> = stack
        .log(id)
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.stream == "stdout")
        .map(|l| l.text)
        .collect();
    assert!(texts.contains(&"python got hello".to_owned()), "{texts:?}");
    assert!(texts.contains(&"sh got HELLO!".to_owned()), "{texts:?}");
    assert!(texts.contains(&"token is ********".to_owned()), "{texts:?}");
    assert!(
        texts.contains(&"and the token ********".to_owned()),
        "{texts:?}"
    );
    assert_eq!(step(&done, "p").outputs["Louder"], "HELLO!");
    assert_eq!(step(&done, "p").outputs["Token"], "********");
}

#[tokio::test]
async fn three_parallel_steps_take_as_long_as_one_and_conditions_pick_what_runs() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    stack
        .add_agent(
            "wide",
            AgentOpts {
                max_concurrent_steps: 3,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let process = r##"
name = "fan"
[[steps]]
name = "one"
script = "sleep 2"
[[steps]]
name = "two"
parallel = true
script = "sleep 2"
[[steps]]
name = "three"
parallel = true
script = "sleep 2"
[[steps]]
name = "broken"
script = "exit 3"
[[steps]]
name = "after-success"
script = "echo never"
[[steps]]
name = "cleanup"
condition = "failure"
script = "echo cleaning"
[[steps]]
name = "report"
condition = "always"
script = "echo reporting"
"##;

    // Act
    let started = Instant::now();
    let id = stack.submit(process).await.unwrap();
    let done = stack.wait_task(id, Duration::from_secs(60)).await.unwrap();
    let _ = started.elapsed();

    // Assert
    let fan: Vec<_> = ["one", "two", "three"]
        .iter()
        .map(|n| {
            let s = step(&done, n);
            (s.started_at.unwrap(), s.finished_at.unwrap())
        })
        .collect();
    let first_start = fan.iter().map(|f| f.0).min().unwrap();
    let last_end = fan.iter().map(|f| f.1).max().unwrap();
    let span = (last_end - first_start).num_milliseconds();
    assert!(
        span < 3500,
        "three 2 s steps in parallel took {span} ms, not 6 s"
    );
    assert!(
        step(&done, "broken").started_at.unwrap() >= last_end,
        "the next sequential step waited for the whole group"
    );
    assert_eq!(done.summary.state, "Failed");
    assert_eq!(step(&done, "broken").exit_code, Some(3));
    assert_eq!(step(&done, "after-success").state, "Skipped");
    assert!(
        step(&done, "after-success")
            .reason
            .as_deref()
            .unwrap()
            .contains("broken")
    );
    assert_eq!(step(&done, "cleanup").state, "Success");
    assert_eq!(step(&done, "report").state, "Success");
}

#[tokio::test]
async fn a_flaky_step_passes_on_its_third_attempt_and_each_attempt_is_recorded() {
    let stack = Stack::start().await.unwrap();
    let counter = stack.dir.path().join("tries");
    let process = format!(
        "name = \"flaky\"\n[[steps]]\nname = \"s\"\nretries = 2\nscript = '''\n\
         echo x >> '{c}'\necho \"attempt $GANTRY_STEP_ATTEMPT\"\n\
         [ $(wc -l < '{c}') -ge 3 ] || exit 7\n'''\n",
        c = counter.display()
    );
    let id = stack.submit(&process).await.unwrap();
    let done = stack.wait_task(id, Duration::from_secs(60)).await.unwrap();
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    let attempts = &done.steps[0].attempts;
    let states: Vec<(&str, Option<i32>)> = attempts
        .iter()
        .map(|a| (a.state.as_str(), a.exit_code))
        .collect();
    assert_eq!(
        states,
        vec![
            ("Failed", Some(7)),
            ("Failed", Some(7)),
            ("Success", Some(0))
        ]
    );
    let log = stack.log(id).await.unwrap();
    for n in 1..=3u32 {
        assert!(
            log.iter()
                .any(|l| l.attempt == Some(n) && l.text == format!("attempt {n}")),
            "attempt {n} has its own log section"
        );
    }
    assert!(
        attempts[1].started_at.unwrap() > attempts[0].finished_at.unwrap(),
        "a backoff between attempts"
    );
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_tree_and_keeps_the_partial_log() {
    let stack = Stack::start().await.unwrap();
    let pids = stack.dir.path().join("pids");
    let process = format!(
        "name = \"slow\"\n[[steps]]\nname = \"s\"\ntimeout_secs = 2\nscript = '''\n\
         echo before\n( sleep 300 & echo $! >> '{p}'; wait ) &\necho $! >> '{p}'\n\
         echo $$ >> '{p}'\nsleep 300\necho after\n'''\n",
        p = pids.display()
    );
    let id = stack.submit(&process).await.unwrap();
    let done = stack.wait_task(id, Duration::from_secs(60)).await.unwrap();
    let ended = done.steps[0].finished_at.unwrap();
    let began = done.steps[0].started_at.unwrap();
    assert_eq!(done.steps[0].state, "TimedOut", "{done:#?}");
    assert!(
        (ended - began).num_milliseconds() < 2000 + 5000,
        "killed within 5 s of the timeout"
    );
    let log = stack.log(id).await.unwrap();
    assert!(
        log.iter().any(|l| l.text == "before"),
        "the partial log is kept"
    );
    assert!(!log.iter().any(|l| l.text == "after"));
    let pids: Vec<i32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 3, "script, subshell and grandchild");
    eventually(Duration::from_secs(5), "process tree gone", || async {
        pids.iter()
            .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
            .then_some(())
    })
    .await
    .unwrap();
}

#[test]
fn every_example_is_a_valid_process() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let json = gantry_tests::gantry_dispatcher::cli::process_json(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let process: gantry_tests::gantry_shared::process::Process =
            serde_json::from_value(json).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        process
            .validate()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seen += 1;
    }
    assert!(seen >= 5, "the examples were found ({seen})");
}
