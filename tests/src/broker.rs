//! The broker as a test sees it: connections and publishes as a worker's own broker user
//! (what an attacker holding a registration has), and that worker's credentials.

use crate::{AMQP_URL, Stack};
use anyhow::{Context, Result};
use lapin::{Connection, ConnectionProperties};

impl Stack {
    /// A connection as another broker user (a worker's, from its registration).
    pub async fn amqp_as(&self, user: &str, password: &str) -> Result<Connection> {
        let url = gantry_shared::amqp::with_credentials(AMQP_URL, user, password)
            .map_err(anyhow::Error::msg)?;
        Ok(Connection::connect(&url, ConnectionProperties::default()).await?)
    }

    /// Publish `body` as broker user `user` (confirmed, mandatory), with `user_id` set as
    /// given (an agent sets its own). `Ok` once the broker confirmed it and routed it
    /// somewhere; `Err` with the broker's reason when it refused it (a 403 on the exchange, a
    /// 406 for a foreign `user_id`) or routed it nowhere.
    pub async fn publish_as(
        &self,
        (user, password): (&str, &str),
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        user_id: Option<&str>,
    ) -> Result<(), String> {
        let conn = self
            .amqp_as(user, password)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let r = async {
            let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
            ch.confirm_select(Default::default())
                .await
                .map_err(|e| e.to_string())?;
            let mut props = lapin::BasicProperties::default().with_delivery_mode(2);
            if let Some(u) = user_id {
                props = props.with_user_id(u.into());
            }
            let confirm = ch
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    lapin::options::BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    props,
                )
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            if !confirm.is_ack() {
                return Err("nacked".to_owned());
            }
            if confirm.take_message().is_some() {
                return Err("returned: routed to no queue".to_owned());
            }
            Ok(())
        }
        .await;
        let _ = conn.close(200, "done".into()).await;
        r
    }

    /// The broker user and password of a registered agent, from its identity file.
    pub fn broker_credentials(&self, idx: usize) -> Result<gantry_shared::api::BrokerCredentials> {
        let path = self.agents[idx].home.join("identity.json");
        let text = std::fs::read_to_string(&path)?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        serde_json::from_value(v["broker"].clone())
            .with_context(|| format!("{} holds no broker credentials", path.display()))
    }

    /// Register a worker through the API only (no agent process): what an attacker holding a
    /// registration would have.
    pub async fn register_worker(
        &self,
        name: &str,
        pools: &[&str],
    ) -> Result<gantry_shared::api::WorkerRegistered> {
        self.post(
            "/api/workers",
            &serde_json::json!({ "name": name, "pools": pools }),
        )
        .await
    }
}
