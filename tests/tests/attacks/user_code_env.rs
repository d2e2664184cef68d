//! User code sees no configuration: before, a health-check script (sent in a forged
//! `SetPolicy`) and a server step read the dispatcher's environment, its secrets key and its
//! bootstrap key, and used the latter to make themselves a `ConfigureServer` key.

use gantry_tests::gantry_shared::api::Worker;
use gantry_tests::{API_KEY, AgentOpts, Stack, eventually};
use std::time::Duration;

const SECRETS_KEY: &str = "c2VjcmV0cy1rZXktdGhhdC1uby1zY3JpcHQtc2VlcyE=";

#[tokio::test]
async fn scripts_health_checks_and_server_steps_find_no_configuration() {
    // Arrange: production, server steps as `nobody`, a secrets key and a bootstrap key in the
    // dispatcher's environment, and a health check that looks for them.
    let mut stack = Stack::start_with(vec![
        ("GANTRY__PRODUCTION".into(), "true".into()),
        ("GANTRY__SECRETS__KEY".into(), SECRETS_KEY.into()),
        ("GANTRY__BUILTIN_WORKER__USER".into(), "nobody".into()),
    ])
    .await
    .unwrap();
    let agent = stack
        .add_agent("plain", AgentOpts::default())
        .await
        .unwrap();
    let broker_password = stack.broker_credentials(agent).unwrap().password;
    let dispatcher_pid = stack.dispatcher.as_ref().unwrap().pid().unwrap();
    let leaks = [
        "GANTRY__",
        SECRETS_KEY,
        API_KEY,
        "guest:guest",
        broker_password.as_str(),
    ];
    let grep: String = leaks.iter().map(|l| format!(" -e '{l}'")).collect();
    let check = format!(
        "if env | grep -q -F{grep}; then echo_error leaked; else echo_warning \"clean as $(id -un)\"; fi"
    );
    let (status, body) = stack
        .request(
            reqwest::Method::PUT,
            "/api/settings",
            Some(API_KEY),
            Some(serde_json::json!({ "machine_policy": { "health_check_script": check } })),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let probe = format!(
        "env | sort\ncat /proc/{dispatcher_pid}/environ >/dev/null 2>&1 && echo READ-THE-DISPATCHER || echo CANNOT-READ-THE-DISPATCHER\ncat /proc/$PPID/environ >/dev/null 2>&1 && echo READ-THE-PARENT || echo CANNOT-READ-THE-PARENT\necho \"as $(id -un)\""
    );

    // Act
    let task = stack
        .submit(&format!(
            "name = \"probe\"\n[[steps]]\nname = \"agent\"\nscript = '''\n{probe}\n'''\n[[steps]]\nname = \"server\"\nlocation = \"server\"\nscript = '''\n{probe}\n'''\n"
        ))
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(60))
        .await
        .unwrap();
    let log = stack.log(task).await.unwrap();
    let verdicts = eventually(
        Duration::from_secs(30),
        "both health checks ran",
        || async {
            let all: Vec<Worker> = stack.get("/api/workers?builtin=true").await.ok()?;
            let reasons: Vec<String> = all
                .iter()
                .filter_map(|w| w.health_reason.clone())
                .filter(|r| r.contains("clean as") || r.contains("leaked"))
                .collect();
            (reasons.len() == 2).then_some(reasons)
        },
    )
    .await
    .unwrap();

    // Assert
    assert_eq!(done.summary.state, "Success", "{done:#?}");
    let lines = |step: &str| -> Vec<String> {
        log.iter()
            .filter(|l| l.step.as_deref() == Some(step) && l.stream == "stdout")
            .map(|l| l.text.clone())
            .collect()
    };
    for step in ["agent", "server"] {
        let out = lines(step);
        assert!(
            out.iter().any(|l| l.starts_with("PATH=")),
            "{step}: {out:?}"
        );
        for leak in leaks {
            assert!(
                !out.iter().any(|l| l.contains(leak)),
                "{step} saw {leak}: {out:?}"
            );
        }
    }
    let server = lines("server");
    assert!(server.contains(&"as nobody".to_owned()), "{server:?}");
    assert!(
        server.contains(&"CANNOT-READ-THE-DISPATCHER".to_owned()),
        "{server:?}"
    );
    assert!(
        server.contains(&"CANNOT-READ-THE-PARENT".to_owned()),
        "{server:?}"
    );
    assert!(
        verdicts.iter().all(|r| r.starts_with("clean as")),
        "no health check saw the configuration: {verdicts:?}"
    );
    assert!(
        verdicts.contains(&"clean as nobody".to_owned()),
        "the built-in worker's health check ran as its step user: {verdicts:?}"
    );
}
