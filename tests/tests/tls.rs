//! TLS in the default build, with a private CA (`tls.ca_file`): the agent and the CLI over
//! `https://`, the dispatcher and the agent over `amqps://`, the dispatcher over `rediss://`
//! and PostgreSQL's `sslmode=verify-full`.
//!
//! The shared RabbitMQ and Redis have no TLS listener, and adding one to RabbitMQ needs its
//! configuration and a restart: the test puts a TLS-terminating proxy with a certificate from
//! a CA made in the test in front of each (and of the dispatcher's HTTP port). What is tested
//! is Gantry's side of TLS: the clients speak it, verify the server against `tls.ca_file`, and
//! refuse a server they cannot verify. PostgreSQL here has TLS on with Debian's `ssl-cert`
//! certificate for `localhost`, which is added to the same CA file.
//!
//! The programs are run with `tokio::process` so that the proxies, on the test's own runtime,
//! keep serving while they run.

use gantry_tests::tls::{TestCa, TlsProxy};
use gantry_tests::{AgentOpts, Stack, bin};

/// PostgreSQL's own certificate on Debian (package ssl-cert, for `localhost`).
const PG_CERT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

#[tokio::test]
async fn agents_the_cli_and_the_dispatcher_speak_tls_to_a_private_ca() {
    // Arrange: TLS fronts for RabbitMQ and Redis; the dispatcher on them, and on PostgreSQL
    // with verify-full.
    let ca = TestCa::new("gantry").unwrap();
    let pg_cert = std::fs::read_to_string(PG_CERT)
        .unwrap_or_else(|e| panic!("{PG_CERT} (PostgreSQL's TLS certificate): {e}"));
    let dir = tempfile::tempdir().unwrap();
    let bundle = ca.write_bundle(dir.path(), &[pg_cert]).unwrap();
    let bundle_s = bundle.display().to_string();
    let amqps = TlsProxy::start("127.0.0.1:5672", &ca).await.unwrap();
    let rediss = TlsProxy::start("127.0.0.1:6379", &ca).await.unwrap();
    let amqp_url = format!("amqps://guest:guest@127.0.0.1:{}/%2f", amqps.port);
    let db = format!(
        "gantry_tls_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mut stack = Stack::start_with(vec![
        ("GANTRY__AMQP__URL".into(), amqp_url.clone()),
        (
            "GANTRY__REDIS__URL".into(),
            format!("rediss://127.0.0.1:{}", rediss.port),
        ),
        (
            "GANTRY__POSTGRES__URL".into(),
            format!("postgres://root@localhost:5432/{db}?sslmode=verify-full"),
        ),
        ("GANTRY__TLS__CA_FILE".into(), bundle_s.clone()),
    ])
    .await
    .unwrap();
    let https = TlsProxy::start(&stack.http_bind, &ca).await.unwrap();
    let server = format!("https://127.0.0.1:{}", https.port);
    let tls_env = vec![
        ("GANTRY__TLS__CA_FILE".to_owned(), bundle_s.clone()),
        ("GANTRY__AMQP__URL".to_owned(), amqp_url.clone()),
    ];

    // Act: an agent registered and running over https and amqps, and a deploy from the CLI
    // over https.
    stack
        .add_agent(
            "secure",
            AgentOpts {
                server: Some(server.clone()),
                env: tls_env.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let file = dir.path().join("hello.toml");
    std::fs::write(
        &file,
        "name = \"tls\"\n[[steps]]\nname = \"s\"\nscript = \"echo over tls\"\n",
    )
    .unwrap();
    let deploy = tokio::process::Command::new(bin("gantry"))
        .args([
            "--server",
            &server,
            "--api-key",
            gantry_tests::API_KEY,
            "deploy",
        ])
        .arg(&file)
        .arg("--follow")
        .env("GANTRY__TLS__CA_FILE", &bundle)
        .output()
        .await
        .unwrap();
    let untrusted = tokio::process::Command::new(bin("gantry"))
        .args([
            "--server",
            &server,
            "--api-key",
            gantry_tests::API_KEY,
            "tasks",
        ])
        .output()
        .await
        .unwrap();
    let unregistered = tokio::process::Command::new(bin("gantry-agent"))
        .args(["--home"])
        .arg(dir.path().join("other-agent"))
        .args([
            "register",
            "--server",
            &server,
            "--api-key",
            gantry_tests::API_KEY,
            "--name",
            "x",
        ])
        .output()
        .await
        .unwrap();
    let plain_port = gantry_tests::gantry_shared::amqp::connect(
        "amqps://guest:guest@127.0.0.1:5672/%2f",
        lapin::ConnectionProperties::default(),
        Some(&ca.ca_pem),
    )
    .await;
    let pg_ssl: Vec<bool> = sqlx::query_scalar(
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid
         WHERE a.datname = $1 AND a.application_name = 'gantry-dispatcher'",
    )
    .bind(&db)
    .fetch_all(
        &sqlx::PgPool::connect(gantry_tests::PG_ADMIN_URL)
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    let health: gantry_tests::gantry_shared::api::Health = stack
        .http
        .get(format!("{}/api/health", stack.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    // Assert
    let out = String::from_utf8_lossy(&deploy.stdout);
    assert_eq!(
        deploy.status.code(),
        Some(0),
        "{out}\n{}",
        String::from_utf8_lossy(&deploy.stderr)
    );
    assert!(out.contains("over tls"), "{out}");
    let e = String::from_utf8_lossy(&untrusted.stderr);
    assert_eq!(untrusted.status.code(), Some(2), "{e}");
    assert!(
        e.contains("cannot reach") && e.contains("UnknownIssuer"),
        "no CA, no connection, and the CLI says why: {e}"
    );
    assert!(
        !unregistered.status.success(),
        "an agent without the CA does not register"
    );
    assert!(
        plain_port.is_err(),
        "amqps:// to a plain-text port fails instead of speaking plain text"
    );
    assert!(
        !pg_ssl.is_empty() && pg_ssl.iter().all(|s| *s),
        "PostgreSQL over TLS: {pg_ssl:?}"
    );
    assert!(
        health.rabbitmq && health.redis && health.postgres,
        "{health:?}"
    );
    assert!(
        amqps.handshakes() >= 2,
        "the dispatcher and the agent: {}",
        amqps.handshakes()
    );
    assert!(rediss.handshakes() >= 1, "the dispatcher's Redis");
    assert!(
        https.handshakes() >= 3,
        "registration, the agent, the CLI: {}",
        https.handshakes()
    );
    // The harness removes the database it made; this one is the test's own.
    drop(stack);
    if let Ok(admin) = sqlx::PgPool::connect(gantry_tests::PG_ADMIN_URL).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .execute(&admin)
            .await;
    }
}
