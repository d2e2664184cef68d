//! The generated bootstrap API key is printed to the terminal once, never into the log.

use gantry_tests::Stack;
use reqwest::Method;
use std::time::Duration;

const PRINTED: &str = "gantry-dispatcher: generated bootstrap API key: ";

#[tokio::test]
async fn the_generated_bootstrap_key_is_on_the_terminal_and_nowhere_in_the_log() {
    // Arrange: no api.bootstrap_key (an empty variable is unset), and JSON logs, so every
    // line tracing wrote is one JSON object and anything else was printed directly.
    let stack = Stack::start_with(vec![
        ("GANTRY__API__BOOTSTRAP_KEY".into(), String::new()),
        ("GANTRY__LOG__FORMAT".into(), "json".into()),
    ])
    .await
    .unwrap();

    // Act: the key works; then a restart (the key exists now, nothing is generated).
    let output = stack.dispatcher.as_ref().unwrap().log_text();
    let key = output
        .lines()
        .find_map(|l| l.strip_prefix(PRINTED))
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|| panic!("no generated key on the terminal:\n{output}"));
    let (with_key, body) = stack
        .request(Method::GET, "/api/pools", Some(&key), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let output = stack.dispatcher.as_ref().unwrap().log_text();

    // Assert
    assert_eq!(with_key, 200, "{body}");
    assert!(key.len() >= 16, "{key}");
    let tracing_lines: Vec<&str> = output
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        .collect();
    assert!(
        tracing_lines.iter().any(|l| l.contains("bootstrap")),
        "the log says a key was generated (without it):\n{output}"
    );
    for line in output.lines() {
        if line.contains(&key) {
            assert!(
                line.starts_with(PRINTED),
                "the key appears outside its one terminal line: {line}"
            );
        }
    }
    assert_eq!(
        output.matches(key.as_str()).count(),
        1,
        "printed once:\n{output}"
    );
}
