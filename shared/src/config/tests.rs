use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_reach_local_services() {
    let dir = tempdir();
    let s = Settings::load_with_env(Some(&write(&dir, "")), env(&[])).unwrap();
    assert_eq!(s.namespace, "gantry");
    assert_eq!(s.amqp.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
    assert_eq!(s.postgres.url, "postgres://root@127.0.0.1:5432/gantry");
    assert_eq!(s.redis.url, "redis://127.0.0.1:6379");
    assert_eq!(s.http_bind().to_string(), "127.0.0.1:8080");
}

#[test]
fn environment_overrides_file() {
    let dir = tempdir();
    let file = write(
        &dir,
        "namespace = \"fromfile\"\n[http]\nbind = \"0.0.0.0:9000\"\n",
    );
    let s = Settings::load_with_env(
        Some(&file),
        env(&[("GANTRY__NAMESPACE", "fromenv"), ("OTHER__X", "1")]),
    )
    .unwrap();
    assert_eq!(s.namespace, "fromenv");
    assert_eq!(s.http_bind().to_string(), "0.0.0.0:9000");
}

#[test]
fn numbers_out_of_range_name_their_key_and_approvals_default_to_allow_self() {
    let dir = tempdir();
    let file = write(&dir, "");
    let ok = Settings::load_with_env(Some(&file), env(&[])).unwrap();
    assert!(ok.approvals.allow_self);
    let off = Settings::load_with_env(
        Some(&file),
        env(&[("GANTRY__APPROVALS__ALLOW_SELF", "false")]),
    )
    .unwrap();
    assert!(!off.approvals.allow_self);
    for (var, value, key) in [
        ("GANTRY__LOCKS__LEASE_MS", "99999999", "locks.lease_ms"),
        (
            "GANTRY__DISPATCHER__SWEEP_INTERVAL_SECS",
            "18446744073709551615",
            "dispatcher.sweep_interval_secs",
        ),
        (
            "GANTRY__DISPATCHER__RETRY_BACKOFF_MS",
            "60001",
            "dispatcher.retry_backoff_ms",
        ),
        (
            "GANTRY__AGENT__SHUTDOWN_GRACE_SECS",
            "604801",
            "agent.shutdown_grace_secs",
        ),
        (
            "GANTRY__AGENT__HEARTBEAT_SECS",
            "3601",
            "agent.heartbeat_secs",
        ),
        ("GANTRY__SMTP__TIMEOUT_SECS", "100000", "smtp.timeout_secs"),
        (
            "GANTRY__DISPATCHER__TASK_CAP",
            "4000000000",
            "dispatcher.task_cap",
        ),
        (
            "GANTRY__POSTGRES__MAX_CONNECTIONS",
            "1001",
            "postgres.max_connections",
        ),
    ] {
        let e = Settings::load_with_env(Some(&file), env(&[(var, value)])).unwrap_err();
        assert_eq!(e.key.as_deref(), Some(key), "{var}={value}: {e}");
    }
}

#[test]
fn bad_values_name_their_key() {
    let dir = tempdir();
    let file = write(&dir, "");
    let cases = [
        ("GANTRY__HTTP__BIND", "not-an-address", "http.bind"),
        (
            "GANTRY__POSTGRES__MAX_CONNECTIONS",
            "many",
            "postgres.max_connections",
        ),
        ("GANTRY__AMQP__URL", "http://x", "amqp.url"),
        ("GANTRY__NAMESPACE", "Has.Dots", "namespace"),
    ];
    for (var, value, key) in cases {
        let err = Settings::load_with_env(Some(&file), env(&[(var, value)])).unwrap_err();
        assert_eq!(err.key.as_deref(), Some(key), "{var}={value}: {err}");
        assert!(err.to_string().contains(key), "{err}");
    }
}

#[test]
fn unknown_key_in_file_is_named() {
    let dir = tempdir();
    let file = write(&dir, "[amqp]\nurll = \"amqp://x\"\n");
    let err = Settings::load_with_env(Some(&file), env(&[])).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("amqp.urll"), "{err}");
    let err = Settings::load_with_env(Some(&file), env(&[("GANTRY__SECRETS__KEY", "c2hvcnQ=")]))
        .unwrap_err();
    assert_eq!(
        err.key.as_deref(),
        Some("amqp.urll"),
        "the first problem wins: {err}"
    );
    let file = write(&dir, "");
    let err = Settings::load_with_env(Some(&file), env(&[("GANTRY__SECRETS__KEY", "c2hvcnQ=")]))
        .unwrap_err();
    assert_eq!(err.key.as_deref(), Some("secrets.key"), "{err}");
}

#[test]
fn missing_explicit_file_is_an_error() {
    let err =
        Settings::load_with_env(Some(Path::new("/nonexistent/gantry.toml")), env(&[])).unwrap_err();
    assert!(err.message.contains("does not exist"));
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gantry-config-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("gantry.toml");
    std::fs::write(&path, body).unwrap();
    path
}
