//! The CLI's HTTP plumbing: JSON requests with the API key, errors shown as the API wrote
//! them, and a Server-Sent Events reader for `follow`.

use futures::StreamExt;
use gantry_shared::api::{API_KEY_HEADER, ErrorBody, LogEnd, LogEntry};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Local(String),
    #[error("cannot reach the dispatcher: {0}")]
    Unreachable(String),
    #[error("{status}: {message}")]
    Api { status: u16, message: String },
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    /// `ca_pem` (`tls.ca_file`) is trusted for `https://` besides the web roots.
    pub fn new(
        server: &str,
        key: Option<String>,
        ca_pem: Option<String>,
    ) -> Result<Self, CliError> {
        let mut http = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
        if let Some(pem) = ca_pem {
            http = gantry_agent::api::trust_ca(http, &pem).map_err(CliError::Local)?;
        }
        Ok(Self {
            http: http
                .build()
                .map_err(|e| CliError::Local(format!("HTTP client: {e}")))?,
            base: server.trim_end_matches('/').to_owned(),
            key,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            req = req.header(API_KEY_HEADER, k);
        }
        req
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, CliError> {
        let resp = req
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| {
                CliError::Unreachable(format!(
                    "{} ({})",
                    self.base,
                    gantry_agent::api::with_causes(&e)
                ))
            })?;
        check(resp).await
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let resp = self.send(self.request(reqwest::Method::GET, path)).await?;
        decode(resp).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, CliError> {
        let resp = self
            .send(self.request(reqwest::Method::POST, path).json(body))
            .await?;
        decode(resp).await
    }

    /// A GET whose body the caller streams: no overall timeout, since a large artifact may
    /// take longer than any fixed limit.
    pub async fn get_stream(&self, path: &str) -> Result<reqwest::Response, CliError> {
        let resp = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .map_err(|e| {
                CliError::Unreachable(format!(
                    "{} ({})",
                    self.base,
                    gantry_agent::api::with_causes(&e)
                ))
            })?;
        check(resp).await
    }

    pub async fn delete(&self, path: &str) -> Result<(), CliError> {
        self.send(self.request(reqwest::Method::DELETE, path))
            .await
            .map(|_| ())
    }

    /// Follow a task's log. Calls `on_line` for each line; returns the end event, or `None`
    /// if the stream ended without one (the connection dropped).
    pub async fn follow(
        &self,
        task: &str,
        after: Option<&str>,
        mut on_line: impl FnMut(LogEntry),
    ) -> Result<Option<LogEnd>, CliError> {
        let mut path = format!("/api/tasks/{}/log?follow=true", super::urlencode(task));
        if let Some(a) = after {
            path.push_str(&format!("&after={}", super::urlencode(a)));
        }
        let resp = self
            .request(reqwest::Method::GET, &path)
            .header("Accept", "text/event-stream")
            .send()
            .await
            .map_err(|e| {
                CliError::Unreachable(format!(
                    "{} ({})",
                    self.base,
                    gantry_agent::api::with_causes(&e)
                ))
            })?;
        let resp = check(resp).await?;
        let mut body = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut event = String::new();
        let mut data = String::new();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else {
                return Ok(None);
            };
            buf.extend_from_slice(&chunk);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let raw: Vec<u8> = buf.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\n', '\r']);
                if line.is_empty() {
                    match event.as_str() {
                        "line" => {
                            if let Ok(entry) = serde_json::from_str::<LogEntry>(&data) {
                                on_line(entry);
                            }
                        }
                        "end" => {
                            if let Ok(end) = serde_json::from_str::<LogEnd>(&data) {
                                return Ok(Some(end));
                            }
                        }
                        _ => {}
                    }
                    event.clear();
                    data.clear();
                } else if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    if !data.is_empty() {
                        data.push('\n');
                    }
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
        }
        Ok(None)
    }
}

async fn check(resp: reqwest::Response) -> Result<reqwest::Response, CliError> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    let message = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(b) => match b.field {
            Some(f) => format!("{} (field {f})", b.error),
            None => b.error,
        },
        Err(_) => text,
    };
    Err(CliError::Api { status, message })
}

async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, CliError> {
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| CliError::Unreachable(e.to_string()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| CliError::Local(format!("unexpected answer from the dispatcher: {e}")))
}
