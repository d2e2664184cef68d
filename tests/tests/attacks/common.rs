//! What every attack needs: a stack with a victim agent, and an attacker's registration.

use gantry_tests::gantry_shared::api::{BrokerCredentials, Task, WorkerRegistered};
use gantry_tests::gantry_shared::ids::TaskId;
use gantry_tests::{AgentOpts, Stack};
use std::path::{Path, PathBuf};

/// A stack in which the agent `victim` serves pool `prod`, and a second worker, `mallory`,
/// registered in its own pool `dev` (no agent process: the test acts for it).
pub struct Scene {
    pub stack: Stack,
    pub victim: usize,
    pub mallory: WorkerRegistered,
}

impl Scene {
    pub async fn new() -> Self {
        let mut stack = Stack::start().await.unwrap();
        stack.add_pool("prod").await.unwrap();
        stack.add_pool("dev").await.unwrap();
        let victim = stack
            .add_agent(
                "victim",
                AgentOpts {
                    pools: vec!["prod".into()],
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let mallory = stack.register_worker("mallory", &["dev"]).await.unwrap();
        Self {
            stack,
            victim,
            mallory,
        }
    }

    /// The attacker's broker user and password.
    pub fn creds(&self) -> (&str, &str) {
        let b: &BrokerCredentials = self.mallory.broker.as_ref().expect("a broker user");
        (&b.user, &b.password)
    }

    pub fn mallory_user(&self) -> &str {
        &self.mallory.broker.as_ref().expect("a broker user").user
    }

    /// Publish as mallory, with mallory's own `user_id` (what RabbitMQ lets it do).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
    ) -> Result<(), String> {
        self.stack
            .publish_as(
                self.creds(),
                exchange,
                routing_key,
                body,
                Some(self.mallory_user()),
            )
            .await
    }
}

/// A file a step waits for before it goes on.
pub fn gate(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// A one-step process on pool `prod` that prints `before`, waits for `gate`, then `script`.
pub fn gated_process(name: &str, gate: &Path, script: &str) -> String {
    format!(
        "name = \"{name}\"\n[[steps]]\nname = \"work\"\npool = \"prod\"\nscript = '''\necho before\nwhile [ ! -e '{}' ]; do sleep 0.05; done\n{script}\n'''\n",
        gate.display()
    )
}

/// Wait until the task's first step is running, and return the task as then.
pub async fn running(stack: &Stack, task: TaskId) -> Task {
    stack.wait_running(task).await.unwrap()
}

/// Stale events recorded so far: (kind, reason, sender).
pub async fn stale_events(stack: &Stack) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as("SELECT kind, reason, sender FROM stale_events ORDER BY id")
        .fetch_all(&stack.db().await)
        .await
        .unwrap()
}
