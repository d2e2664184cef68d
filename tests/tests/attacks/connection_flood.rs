//! A worker's broker user holds a few connections at most: it cannot exhaust the broker's.

use crate::common::Scene;

#[tokio::test]
async fn a_workers_broker_user_cannot_open_connections_without_end() {
    // Arrange
    let scene = Scene::new().await;
    let (user, password) = scene.creds();

    // Act
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..10 {
        match scene.stack.amqp_as(user, password).await {
            Ok(c) => held.push(c),
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }

    // Assert
    let limit = gantry_tests::gantry_dispatcher::broker_users::MAX_CONNECTIONS as usize;
    assert_eq!(held.len(), limit, "as many as the limit, no more");
    let e = refused.expect("the next one is refused");
    assert!(e.contains("connection limit"), "{e}");
    for c in held {
        let _ = c.close(200, "done".into()).await;
    }
}
