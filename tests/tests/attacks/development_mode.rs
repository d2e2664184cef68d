//! Development mode: without `amqp.management_url` everything works on the shared broker
//! user, and the dispatcher says so.

use gantry_tests::gantry_shared::api::Health;
use gantry_tests::{AgentOpts, DEV_MODE, Stack};
use std::time::Duration;

#[tokio::test]
async fn without_a_management_url_agents_share_the_broker_user_and_health_says_so() {
    // Arrange
    let mut stack = Stack::start_with(vec![(DEV_MODE.0.into(), DEV_MODE.1.into())])
        .await
        .unwrap();
    let idx = stack
        .add_agent("shared", AgentOpts::default())
        .await
        .unwrap();

    // Act
    let task = stack
        .submit("name = \"dev\"\n[[steps]]\nname = \"s\"\nscript = \"echo works\"\n")
        .await
        .unwrap();
    let done = stack
        .wait_task(task, Duration::from_secs(30))
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
    let identity = std::fs::read_to_string(stack.agents[idx].home.join("identity.json")).unwrap();

    // Assert
    assert_eq!(done.summary.state, "Success");
    assert!(!health.broker_users);
    assert!(
        health
            .warnings
            .iter()
            .any(|w| w.contains("development mode")),
        "{health:?}"
    );
    assert!(
        stack
            .all_logs()
            .contains("development mode: amqp.management_url is not set")
    );
    assert!(
        stack.broker_credentials(idx).is_err(),
        "no broker user: {identity}"
    );
}
