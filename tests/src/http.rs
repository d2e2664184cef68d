//! The stack's API as a test calls it: requests with the test key, pools, tasks and their
//! logs.

use crate::{API_KEY, Stack, eventually};
use anyhow::{Result, bail};
use gantry_shared::api::{API_KEY_HEADER, ErrorBody, LogPage, Pool, PoolCreate, Task, TaskCreated};
use gantry_shared::ids::TaskId;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::Path;
use std::time::{Duration, Instant};

impl Stack {
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(k) = key {
            req = req.header(API_KEY_HEADER, k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let json = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
        };
        Ok((status, json))
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let (status, body) = self
            .request(reqwest::Method::GET, path, Some(API_KEY), None)
            .await?;
        if status != 200 {
            bail!("GET {path}: {status} {body}");
        }
        Ok(serde_json::from_value(body)?)
    }

    /// Create an API key with these permissions (`"TaskView"`, ...); the key itself.
    pub async fn create_key(&self, name: &str, permissions: &[&str]) -> Result<String> {
        let created: gantry_shared::api::ApiKeyCreated = self
            .post(
                "/api/keys",
                &serde_json::json!({ "name": name, "permissions": permissions }),
            )
            .await?;
        Ok(created.key)
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        let (status, body) = self
            .request(
                reqwest::Method::POST,
                path,
                Some(API_KEY),
                Some(serde_json::to_value(body)?),
            )
            .await?;
        if !(200..300).contains(&status) {
            let err: Option<ErrorBody> = serde_json::from_value(body.clone()).ok();
            bail!("POST {path}: {status} {err:?} {body}");
        }
        Ok(serde_json::from_value(body)?)
    }

    pub async fn add_pool(&self, name: &str) -> Result<Pool> {
        self.post(
            "/api/pools",
            &PoolCreate {
                name: name.into(),
                description: None,
                is_default: false,
            },
        )
        .await
    }

    /// Submit a process given as TOML.
    pub async fn submit(&self, process_toml: &str) -> Result<TaskId> {
        let body =
            gantry_dispatcher::cli::process_json(process_toml).map_err(anyhow::Error::msg)?;
        let created: TaskCreated = self.post("/api/tasks", &body).await?;
        Ok(created.id)
    }

    pub async fn task(&self, id: TaskId) -> Result<Task> {
        self.get(&format!("/api/tasks/{id}")).await
    }

    /// Wait until the task has ended.
    pub async fn wait_task(&self, id: TaskId, limit: Duration) -> Result<Task> {
        let deadline = Instant::now() + limit;
        loop {
            let t = self.task(id).await;
            if let Ok(t) = &t
                && matches!(t.summary.state.as_str(), "Success" | "Failed" | "Cancelled")
            {
                return Ok(t.clone());
            }
            if Instant::now() > deadline {
                bail!("task {id} did not end within {limit:?}: {t:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until `check` holds for the task.
    pub async fn wait_task_until(
        &self,
        id: TaskId,
        limit: Duration,
        check: impl Fn(&Task) -> bool,
    ) -> Result<Task> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(t) = self.task(id).await
                && check(&t)
            {
                return Ok(t);
            }
            if Instant::now() > deadline {
                bail!("condition on task {id} not met within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every line of a task's log through the API, in order.
    pub async fn log(&self, id: TaskId) -> Result<Vec<gantry_shared::api::LogEntry>> {
        let mut all = Vec::new();
        let mut after = String::new();
        loop {
            let page: LogPage = self
                .get(&format!("/api/tasks/{id}/log?after={after}&limit=100000"))
                .await?;
            if page.lines.is_empty() {
                return Ok(all);
            }
            after = page.next.clone();
            all.extend(page.lines);
        }
    }

    /// The text of every line of a task's log, in order.
    pub async fn log_texts(&self, id: TaskId) -> Result<Vec<String>> {
        Ok(self.log(id).await?.into_iter().map(|l| l.text).collect())
    }

    /// Wait until the task's first step is `Running` (for at most 30 s); the task as then.
    pub async fn wait_running(&self, id: TaskId) -> Result<Task> {
        self.wait_task_until(id, Duration::from_secs(30), |t| {
            t.steps[0].state == "Running"
        })
        .await
    }

    /// The text of every line of a task's log, one a line.
    pub async fn task_log_text(&self, id: TaskId) -> Result<String> {
        Ok(self
            .log(id)
            .await?
            .iter()
            .map(|l| l.text.clone())
            .collect::<Vec<_>>()
            .join("\n"))
    }

    /// Wait (at most 30 s) for the first line of the task's log that starts with `prefix`;
    /// the rest of that line.
    pub async fn wait_task_line(&self, id: TaskId, prefix: &str) -> Result<String> {
        eventually(Duration::from_secs(30), prefix, || async {
            self.log(id)
                .await
                .ok()?
                .iter()
                .find_map(|l| l.text.strip_prefix(prefix).map(str::to_owned))
        })
        .await
    }

    /// Send `body` as it is, with the test key and `headers`: the status, the content type,
    /// and the answer as JSON if it is JSON (else as a string).
    pub async fn send_bytes(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<(u16, Option<String>, serde_json::Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .header(API_KEY_HEADER, API_KEY);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.body(body).send().await?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = resp.text().await?;
        Ok((
            status,
            content_type,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        ))
    }

    /// Send each `(method, path, body, want)` as JSON with the test key; for each, what was
    /// sent (`"METHOD path body"`), `want`, the status and the answer.
    pub async fn send_cases<'a>(
        &self,
        cases: &'a [(reqwest::Method, String, serde_json::Value, &'a str)],
    ) -> Result<Vec<(String, &'a str, u16, serde_json::Value)>> {
        let mut answers = Vec::new();
        for (method, path, body, want) in cases {
            let (status, answer) = self
                .request(method.clone(), path, Some(API_KEY), Some(body.clone()))
                .await?;
            answers.push((format!("{method} {path} {body}"), *want, status, answer));
        }
        Ok(answers)
    }

    /// Submit a one-step task named `blocker` (on `pool`, or the default pool) that waits
    /// for the file `release`, and wait until it runs: it holds one slot of whichever agent
    /// took it until the test writes that file.
    pub async fn start_blocker(&self, pool: Option<&str>, release: &Path) -> Result<TaskId> {
        let pool = pool
            .map(|p| format!("pool = \"{p}\"\n"))
            .unwrap_or_default();
        let task = self
            .submit(&format!(
                "name = \"blocker\"\n[[steps]]\nname = \"b\"\n{pool}script = \"while [ ! -e '{}' ]; do sleep 0.05; done\"\n",
                release.display()
            ))
            .await?;
        self.wait_running(task).await?;
        Ok(task)
    }
}
