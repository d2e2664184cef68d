//! `production = true`: no shared broker user, no credential in plain text to another
//! machine, and no server step with the dispatcher's own rights.

use gantry_tests::gantry_shared::api::Health;
use gantry_tests::{Stack, bin};

/// A key for `secrets.key` (production needs one).
const SECRETS_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

#[test]
fn production_refuses_shared_broker_users_plain_text_and_privileged_server_steps() {
    let dir = tempfile::tempdir().unwrap();
    /// Program, arguments, environment, the text the error must hold.
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let prod = [
        ("GANTRY__PRODUCTION", "true"),
        ("GANTRY__SECRETS__KEY", SECRETS_KEY),
    ];
    let managed = (
        "GANTRY__AMQP__MANAGEMENT_URL",
        "http://guest:guest@127.0.0.1:15672",
    );
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        prod.iter().chain(extra).copied().collect()
    };
    let cases: Vec<Case<'_>> = vec![
        (
            "gantry-dispatcher",
            vec!["serve"],
            with(&[]),
            "amqp.management_url",
        ),
        (
            "gantry-dispatcher",
            vec!["serve"],
            with(&[
                managed,
                ("GANTRY__AMQP__URL", "amqp://u:p@rabbit.example:5672/%2f"),
            ]),
            "amqps://",
        ),
        (
            "gantry-dispatcher",
            vec!["serve"],
            with(&[
                managed,
                ("GANTRY__REDIS__URL", "redis://cache.example:6379"),
            ]),
            "redis.url",
        ),
        (
            "gantry-dispatcher",
            vec!["serve"],
            with(&[
                managed,
                (
                    "GANTRY__POSTGRES__URL",
                    "postgres://u@db.example/gantry?sslmode=require",
                ),
            ]),
            "verify-full",
        ),
        (
            "gantry-dispatcher",
            vec!["serve"],
            with(&[managed, ("GANTRY__BUILTIN_WORKER__USER", "root")]),
            "builtin_worker.user",
        ),
        (
            "gantry-agent",
            vec![
                "register",
                "--server",
                "http://dispatcher.example:8080",
                "--api-key",
                "k",
                "--name",
                "n",
            ],
            vec![("GANTRY__PRODUCTION", "true")],
            "https://",
        ),
        (
            "gantry",
            vec![
                "--server",
                "http://dispatcher.example:8080",
                "--api-key",
                "k",
                "tasks",
            ],
            vec![("GANTRY__PRODUCTION", "true")],
            "https://",
        ),
    ];
    for (program, args, env, needle) in cases {
        let mut cmd = std::process::Command::new(bin(program));
        cmd.args(&args).current_dir(dir.path());
        for (k, _) in std::env::vars() {
            if k.starts_with("GANTRY") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(64),
            "{program} {args:?} {env:?}: {stderr}"
        );
        assert!(stderr.contains(needle), "{program} {env:?}: {stderr}");
    }
}

#[tokio::test]
async fn in_production_server_steps_need_an_unprivileged_builtin_user() {
    // Arrange: production on loopback services, no builtin_worker.user.
    let stack = Stack::start_with(vec![
        ("GANTRY__PRODUCTION".into(), "true".into()),
        ("GANTRY__SECRETS__KEY".into(), SECRETS_KEY.into()),
    ])
    .await
    .unwrap();

    // Act
    let (status, body) = stack
        .request(
            reqwest::Method::POST,
            "/api/tasks",
            Some(gantry_tests::API_KEY),
            Some(serde_json::json!({
                "name": "on-the-server",
                "steps": [{ "name": "s", "location": "server", "script": "cat /proc/1/environ" }]
            })),
        )
        .await
        .unwrap();
    let health: Health = stack
        .http
        .get(format!("{}/api/health", stack.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    // Assert
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "steps[0].location", "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("builtin_worker.user"),
        "{body}"
    );
    assert!(health.broker_users, "{health:?}");
    assert!(
        !health
            .warnings
            .iter()
            .any(|w| w.contains("development mode")),
        "{health:?}"
    );
    assert!(
        health
            .warnings
            .iter()
            .any(|w| w.contains("builtin_worker.user")),
        "{health:?}"
    );
}
