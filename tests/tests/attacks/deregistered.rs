//! A deregistered worker's broker user: gone at once, with its open connections.

use gantry_tests::{API_KEY, Stack, eventually};
use std::time::Duration;

#[tokio::test]
async fn a_deregistered_workers_broker_user_can_no_longer_connect() {
    // Arrange: a worker, connected with its own broker user.
    let stack = Stack::start().await.unwrap();
    let reg = stack.register_worker("leaver", &[]).await.unwrap();
    let creds = reg.broker.clone().expect("a broker user of its own");
    assert_eq!(
        reg.worker.broker_user.as_deref(),
        Some(creds.user.as_str()),
        "the worker shows its broker user"
    );
    let conn = stack.amqp_as(&creds.user, &creds.password).await.unwrap();
    assert!(conn.status().connected());

    // Act
    let (status, _) = stack
        .request(
            reqwest::Method::DELETE,
            &format!("/api/workers/{}", reg.worker.id),
            Some(API_KEY),
            None,
        )
        .await
        .unwrap();
    let closed = eventually(
        Duration::from_secs(5),
        "the open connection closed",
        || async { (!conn.status().connected()).then_some(()) },
    )
    .await;
    let again = stack.amqp_as(&creds.user, &creds.password).await;
    let users: Vec<serde_json::Value> = reqwest::Client::new()
        .get("http://127.0.0.1:15672/api/users")
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    // Assert
    assert_eq!(status, 204);
    closed.unwrap();
    let Err(e) = again else {
        panic!("a new connection is refused")
    };
    let e = e.to_string();
    assert!(e.contains("ACCESS_REFUSED") || e.contains("403"), "{e}");
    assert!(
        !users.iter().any(|u| u["name"] == creds.user.as_str()),
        "the broker user is gone"
    );
}
