//! Nodes remember credentials they have looked up (`dispatcher/src/credentials.rs`); a
//! revoked key or a deregistered worker must be refused at once all the same, on every node.

use gantry_tests::gantry_shared::api::WORKER_TOKEN_HEADER;
use gantry_tests::{API_KEY, Stack, eventually};
use std::time::Duration;

#[tokio::test]
async fn a_revoked_key_is_refused_at_once_on_every_node_though_it_was_just_used() {
    let mut stack = Stack::start().await.unwrap();
    let second = stack.start_node(vec![]).await.unwrap();
    let created: gantry_tests::gantry_shared::api::ApiKeyCreated = stack
        .post(
            "/api/keys",
            &serde_json::json!({ "name": "short-lived", "permissions": ["TaskView"] }),
        )
        .await
        .unwrap();
    let key = created.key.clone();
    let nodes = [stack.url.clone(), stack.nodes[second].url.clone()];
    let http = reqwest::Client::new();
    let status = |url: String, key: String| {
        let http = http.clone();
        async move {
            http.get(format!("{url}/api/tasks"))
                .header("X-Gantry-ApiKey", key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // Used on both nodes, so both remember it.
    for url in &nodes {
        for _ in 0..3 {
            assert_eq!(status(url.clone(), key.clone()).await, 200);
        }
    }
    let (code, _) = stack
        .request(
            reqwest::Method::DELETE,
            &format!("/api/keys/{}", created.key_info.id),
            Some(API_KEY),
            None,
        )
        .await
        .unwrap();
    assert_eq!(code, 204);
    // The notification takes milliseconds; a second is generous, and a remembered key that
    // kept working would fail here.
    for url in &nodes {
        eventually(Duration::from_secs(1), "the revoked key refused", || {
            let f = status(url.clone(), key.clone());
            async move { (f.await == 401).then_some(()) }
        })
        .await
        .unwrap();
        // And it stays refused.
        for _ in 0..5 {
            assert_eq!(status(url.clone(), key.clone()).await, 401);
        }
    }
}

#[tokio::test]
async fn a_deregistered_workers_token_is_refused_at_once() {
    let stack = Stack::start().await.unwrap();
    let registered = stack.register_worker("leaving", &[]).await.unwrap();
    let token = registered.token.clone();
    let http = reqwest::Client::new();
    let config = || {
        let http = http.clone();
        let (url, token) = (stack.url.clone(), token.clone());
        async move {
            http.get(format!("{url}/api/agent/config"))
                .header(WORKER_TOKEN_HEADER, token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(config().await, 200);
    assert_eq!(config().await, 200, "remembered now");
    let (code, _) = stack
        .request(
            reqwest::Method::DELETE,
            &format!("/api/workers/{}", registered.worker.id),
            Some(API_KEY),
            None,
        )
        .await
        .unwrap();
    assert!(code == 204 || code == 200, "deregistered: {code}");
    eventually(Duration::from_secs(1), "the token refused", || {
        let f = config();
        async move { (f.await == 401).then_some(()) }
    })
    .await
    .unwrap();
}
