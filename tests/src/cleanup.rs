//! What dropping a [`Stack`] does: kill its processes, print their logs if the test failed,
//! and remove its database, queues, exchanges, broker users and Redis keys.

use crate::{AMQP_URL, PG_ADMIN_URL, REDIS_URL, Stack};
use lapin::{Connection, ConnectionProperties};
use std::time::Duration;

/// What is left to remove once a test is over.
struct Leftovers {
    ns: String,
    db_name: String,
    db_url: String,
}

impl Leftovers {
    /// Names of the queues the stack may have created.
    async fn queue_names(&self) -> Vec<String> {
        let t = gantry_shared::topology::Topology::new(&self.ns);
        let mut names = vec![
            t.results_queue(),
            t.server_queue(),
            t.dead_queue(),
            t.heartbeats_queue(),
        ];
        if let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&self.db_url)
            .await
        {
            let slugs: Vec<String> = sqlx::query_scalar("SELECT slug FROM pools")
                .fetch_all(&pool)
                .await
                .unwrap_or_default();
            names.extend(slugs.iter().map(|s| t.pool_queue(s)));
            let workers: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM workers")
                .fetch_all(&pool)
                .await
                .unwrap_or_default();
            names.extend(workers.iter().map(|w| t.worker_queue(w)));
            names.extend(workers.iter().map(|w| t.control_queue(w)));
            pool.close().await;
        }
        names
    }

    /// Delete the broker users the stack's dispatcher created (`<ns>.worker.*`), and every
    /// queue and exchange of its namespace that the broker lists (whatever database the test
    /// pointed the dispatcher at, and whatever it declared after the first cleanup pass).
    async fn remove_broker_leftovers(&self) {
        let http = reqwest::Client::new();
        let list = |what: &'static str| {
            let http = http.clone();
            async move {
                let resp = http
                    .get(format!("http://127.0.0.1:15672/api/{what}"))
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await
                    .ok()?;
                resp.json::<Vec<serde_json::Value>>().await.ok()
            }
        };
        let names = |rows: Option<Vec<serde_json::Value>>, prefix: &str| -> Vec<String> {
            rows.unwrap_or_default()
                .iter()
                .filter_map(|r| r["name"].as_str())
                .filter(|n| n.starts_with(prefix))
                .map(str::to_owned)
                .collect()
        };
        let users = names(list("users").await, &format!("{}.worker.", self.ns));
        let queues = names(list("queues/%2F").await, &format!("{}.", self.ns));
        let exchanges = names(list("exchanges/%2F").await, &format!("{}.", self.ns));
        for (kind, items) in [
            ("users", users),
            ("queues/%2F", queues),
            ("exchanges/%2F", exchanges),
        ] {
            for name in items {
                let _ = http
                    .delete(format!("http://127.0.0.1:15672/api/{kind}/{name}"))
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await;
            }
        }
    }

    async fn remove(self) {
        let queues = self.queue_names().await;
        if let Ok(conn) = Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
            let t = gantry_shared::topology::Topology::new(&self.ns);
            for q in queues {
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch
                        .queue_delete(q.into(), lapin::options::QueueDeleteOptions::default())
                        .await;
                }
            }
            for ex in [
                t.jobs_exchange(),
                t.control_exchange(),
                t.dead_exchange(),
                t.results_exchange(),
                t.heartbeats_exchange(),
            ] {
                if let Ok(ch) = conn.create_channel().await {
                    let _ = ch
                        .exchange_delete(
                            ex.into(),
                            lapin::options::ExchangeDeleteOptions::default(),
                        )
                        .await;
                }
            }
            let _ = conn.close(200, "test cleanup".into()).await;
        }
        self.remove_broker_leftovers().await;
        if let Ok(client) = redis::Client::open(REDIS_URL)
            && let Ok(mut c) = client.get_multiplexed_async_connection().await
        {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}.*", self.ns))
                .query_async(&mut c)
                .await
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> =
                    redis::cmd("DEL").arg(keys).query_async(&mut c).await;
            }
        }
        if let Ok(admin) = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(PG_ADMIN_URL)
            .await
        {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.db_name
            ))
            .execute(&admin)
            .await;
            admin.close().await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.all_logs();
            let lines: Vec<&str> = logs.lines().collect();
            let start = lines.len().saturating_sub(400);
            eprintln!(
                "---- logs of stack {} (last 400 lines) ----\n{}",
                self.ns,
                lines[start..].join("\n")
            );
        }
        // Kill synchronously: a tokio child can only be awaited on the runtime that spawned
        // it, and that runtime is blocked in this Drop. The runtime reaps them later.
        let procs = self
            .dispatcher
            .iter()
            .chain(self.nodes.iter().filter_map(|n| n.proc.as_ref()))
            .chain(self.agents.iter().filter_map(|a| a.proc.as_ref()));
        for p in procs {
            p.signal(nix::sys::signal::Signal::SIGKILL);
        }
        if std::env::var_os("GANTRY_TEST_KEEP").is_some() {
            // Keep everything for a post-mortem: the logs, the database, the queues.
            let dir = std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("a placeholder tempdir"),
            );
            eprintln!(
                "GANTRY_TEST_KEEP: kept {} and database {}",
                dir.keep().display(),
                self.db_name
            );
            return;
        }
        let left = Leftovers {
            ns: self.ns.clone(),
            db_name: self.db_name.clone(),
            db_url: self.db_url.clone(),
        };
        // Drop cannot await, and the test's runtime may be shutting down: clean up on a
        // thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(left.remove());
        })
        .join();
    }
}
