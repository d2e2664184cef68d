//! The broker's users follow PostgreSQL: a worker's user the broker lost comes back with the
//! same password, an orphan of this installation goes, and a user of another installation
//! (same namespace, another vhost) is left alone. And an agent registered before broker users
//! were in force refuses to start, saying what to do.

use gantry_tests::{AgentOpts, DEV_MODE, MANAGEMENT_URL, Stack, eventually};
use std::time::Duration;

const MGMT: &str = "http://127.0.0.1:15672/api";

async fn mgmt(method: reqwest::Method, path: &str, body: Option<serde_json::Value>) -> u16 {
    let mut r = reqwest::Client::new()
        .request(method, format!("{MGMT}{path}"))
        .basic_auth("guest", Some("guest"));
    if let Some(b) = body {
        r = r.json(&b);
    }
    r.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn reconciliation_restores_lost_users_removes_orphans_and_spares_other_vhosts() {
    // Arrange
    let mut stack = Stack::start().await.unwrap();
    let reg = stack.register_worker("kept", &[]).await.unwrap();
    let creds = reg.broker.clone().unwrap();
    let orphan = format!("{}.worker.{}", stack.ns, uuid::Uuid::now_v7());
    let foreign = format!("{}.worker.{}", stack.ns, uuid::Uuid::now_v7());
    let other_vhost = format!("{}-other", stack.ns);
    let perms = serde_json::json!({"configure": "^$", "write": "^$", "read": "^$"});
    // The broker loses the worker's user; an orphan appears on our vhost; another
    // installation with our namespace has a worker on its own vhost.
    assert_eq!(
        mgmt(
            reqwest::Method::DELETE,
            &format!("/users/{}", creds.user),
            None
        )
        .await,
        204
    );
    for (user, vhost) in [(&orphan, "%2F"), (&foreign, other_vhost.as_str())] {
        if vhost != "%2F" {
            mgmt(reqwest::Method::PUT, &format!("/vhosts/{vhost}"), None).await;
        }
        let body = serde_json::json!({"password": "x", "tags": ""});
        assert!(mgmt(reqwest::Method::PUT, &format!("/users/{user}"), Some(body)).await < 300);
        assert!(
            mgmt(
                reqwest::Method::PUT,
                &format!("/permissions/{vhost}/{user}"),
                Some(perms.clone())
            )
            .await
                < 300
        );
    }
    let lost = stack.amqp_as(&creds.user, &creds.password).await;

    // Act: a restarted dispatcher reconciles at once (and every minute).
    stack.kill_dispatcher().await;
    stack.start_dispatcher().await.unwrap();
    let back = eventually(Duration::from_secs(20), "the lost user is back", || async {
        stack.amqp_as(&creds.user, &creds.password).await.ok()
    })
    .await;
    // The same pass deletes orphans after it restores the lost: wait for that too.
    let orphan_status = eventually(Duration::from_secs(20), "the orphan deleted", || async {
        let s = mgmt(reqwest::Method::GET, &format!("/users/{orphan}"), None).await;
        (s == 404).then_some(s)
    })
    .await
    .unwrap_or(200);
    let foreign_status = mgmt(reqwest::Method::GET, &format!("/users/{foreign}"), None).await;
    mgmt(reqwest::Method::DELETE, &format!("/users/{foreign}"), None).await;
    mgmt(
        reqwest::Method::DELETE,
        &format!("/vhosts/{other_vhost}"),
        None,
    )
    .await;

    // Assert
    assert!(lost.is_err(), "the user was really gone");
    let conn = back.expect("recreated from the stored hash: the same password works");
    let _ = conn.close(200, "done".into()).await;
    assert_eq!(orphan_status, 404, "this installation's orphan is deleted");
    assert_eq!(foreign_status, 200, "another vhost's user is left alone");
}

#[tokio::test]
async fn an_agent_registered_before_broker_users_refuses_to_start_and_says_why() {
    // Arrange: registered in development mode; then the dispatcher gets a management URL.
    let mut stack = Stack::start_with(vec![(DEV_MODE.0.into(), DEV_MODE.1.into())])
        .await
        .unwrap();
    let idx = stack.add_agent("old", AgentOpts::default()).await.unwrap();
    stack.kill_agent(idx).await;
    stack.kill_dispatcher().await;
    stack
        .extra_env
        .retain(|(k, _)| k != "GANTRY__AMQP__MANAGEMENT_URL");
    stack
        .extra_env
        .push(("GANTRY__AMQP__MANAGEMENT_URL".into(), MANAGEMENT_URL.into()));
    stack.start_dispatcher().await.unwrap();

    // Act
    let started = stack.start_agent(idx).await;

    // Assert
    let e = started
        .expect_err("it must not run on the shared user")
        .to_string();
    assert!(e.contains("register it again"), "{e}");
}
