//! The management HTTP API client: users, limits and permissions of one installation's
//! workers, on the vhost of `amqp.url`, and the reconciliation that keeps them in line with
//! PostgreSQL (see the parent module).

use super::{
    Error, MAX_CHANNELS, MAX_CONNECTIONS, Permissions, Reconciled, Wanted, new_password,
    permissions, user_name, worker_of,
};
use gantry_shared::api::BrokerCredentials;
use gantry_shared::config::{ConfigError, Settings};
use gantry_shared::ids::WorkerId;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// How long one management API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Undo the percent-encoding of a URL's user or password.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The management API client of one installation.
#[derive(Clone)]
pub struct BrokerUsers {
    http: reqwest::Client,
    base: String,
    admin: (String, String),
    vhost: String,
    ns: String,
}

#[derive(Deserialize)]
struct UserRow {
    name: String,
    #[serde(default)]
    password_hash: String,
    /// `{"max-connections": 4, "max-channels": 64}`; RabbitMQ sends `[]` when there are none.
    #[serde(default)]
    limits: serde_json::Value,
}

impl UserRow {
    fn has_limits(&self) -> bool {
        self.limits["max-connections"] == MAX_CONNECTIONS
            && self.limits["max-channels"] == MAX_CHANNELS
    }
}

#[derive(Deserialize)]
struct PermissionRow {
    user: String,
    configure: String,
    write: String,
    read: String,
}

impl BrokerUsers {
    /// `None` in development mode (no `amqp.management_url`).
    pub fn from_settings(settings: &Settings) -> Result<Option<Self>, ConfigError> {
        let Some(raw) = &settings.amqp.management_url else {
            return Ok(None);
        };
        let bad = |m: String| ConfigError {
            key: Some("amqp.management_url".into()),
            message: m,
        };
        let mut url = url::Url::parse(raw).map_err(|e| bad(format!("not a URL: {e}")))?;
        let admin = (
            percent_decode(url.username()),
            percent_decode(url.password().unwrap_or_default()),
        );
        let _ = url.set_username("");
        let _ = url.set_password(None);
        let base = url.as_str().trim_end_matches('/').to_owned();
        let vhost = settings
            .amqp
            .url
            .parse::<lapin::uri::AMQPUri>()
            .map(|u| u.vhost)
            .map_err(|e| ConfigError {
                key: Some("amqp.url".into()),
                message: e,
            })?;
        let mut http = reqwest::Client::builder()
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        if let Some(ca) = settings.ca_pem() {
            http = gantry_agent::api::trust_ca(http, &ca).map_err(|m| ConfigError {
                key: Some("tls.ca_file".into()),
                message: m,
            })?;
        }
        Ok(Some(Self {
            http: http.build().map_err(|e| bad(e.to_string()))?,
            base,
            admin,
            vhost,
            ns: settings.namespace.clone(),
        }))
    }

    pub fn namespace(&self) -> &str {
        &self.ns
    }

    fn path(&self, parts: &[&str]) -> String {
        let mut url = format!("{}/api", self.base);
        for p in parts {
            url.push('/');
            url.extend(url::form_urlencoded::byte_serialize(p.as_bytes()).map(|s| {
                // form encoding writes a space as `+`; a path needs `%20`.
                if s == "+" { "%20" } else { s }
            }));
        }
        url
    }

    async fn call(
        &self,
        what: &str,
        method: reqwest::Method,
        url: String,
        body: Option<serde_json::Value>,
        ok_missing: bool,
    ) -> Result<reqwest::Response, Error> {
        let mut req = self
            .http
            .request(method, url)
            .basic_auth(&self.admin.0, Some(&self.admin.1));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Error::Unreachable(e.to_string()))?;
        let status = resp.status();
        if status.is_success() || (ok_missing && status == reqwest::StatusCode::NOT_FOUND) {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        if status.is_server_error() {
            return Err(Error::Unreachable(format!("{status} {body}")));
        }
        Err(Error::Refused {
            what: what.to_owned(),
            status: status.as_u16(),
            body: body.chars().take(300).collect(),
        })
    }

    async fn put_user(&self, user: &str, hash: &str) -> Result<(), Error> {
        self.call(
            &format!("creating user {user}"),
            reqwest::Method::PUT,
            self.path(&["users", user]),
            Some(serde_json::json!({
                "password_hash": hash,
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": "",
            })),
            false,
        )
        .await
        .map(drop)
    }

    async fn put_limits(&self, user: &str) -> Result<(), Error> {
        for (limit, value) in [
            ("max-connections", MAX_CONNECTIONS),
            ("max-channels", MAX_CHANNELS),
        ] {
            self.call(
                &format!("limiting {user}'s {limit}"),
                reqwest::Method::PUT,
                self.path(&["user-limits", user, limit]),
                Some(serde_json::json!({ "value": value })),
                false,
            )
            .await?;
        }
        Ok(())
    }

    async fn put_permissions(&self, user: &str, p: &Permissions) -> Result<(), Error> {
        self.call(
            &format!("setting the permissions of {user}"),
            reqwest::Method::PUT,
            self.path(&["permissions", &self.vhost, user]),
            Some(serde_json::to_value(p).expect("plain strings")),
            false,
        )
        .await
        .map(drop)
    }

    async fn delete_user(&self, user: &str) -> Result<(), Error> {
        self.call(
            &format!("deleting user {user}"),
            reqwest::Method::DELETE,
            self.path(&["users", user]),
            None,
            true,
        )
        .await
        .map(drop)
    }

    /// Close every connection of `user` (its channels keep permissions they checked before).
    async fn close_connections(&self, user: &str, reason: &str) -> Result<(), Error> {
        let mut req = self
            .http
            .delete(self.path(&["connections", "username", user]))
            .basic_auth(&self.admin.0, Some(&self.admin.1));
        req = req.header("X-Reason", reason);
        let resp = req
            .send()
            .await
            .map_err(|e| Error::Unreachable(e.to_string()))?;
        let status = resp.status();
        if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
            return Ok(());
        }
        Err(Error::Refused {
            what: format!("closing the connections of {user}"),
            status: status.as_u16(),
            body: resp.text().await.unwrap_or_default(),
        })
    }

    /// Create (or replace) a worker's user with `hash` as its password and set its rights.
    pub async fn create(
        &self,
        worker: WorkerId,
        hash: &str,
        slugs: &[String],
    ) -> Result<(), Error> {
        let user = user_name(&self.ns, worker);
        self.put_user(&user, hash).await?;
        self.put_limits(&user).await?;
        self.put_permissions(&user, &permissions(&self.ns, worker, slugs, true))
            .await
    }

    /// A new user for a worker: its credentials (shown once) and the hash to store.
    pub async fn provision(
        &self,
        worker: WorkerId,
        slugs: &[String],
    ) -> Result<(BrokerCredentials, String), Error> {
        let (password, hash) = new_password();
        self.create(worker, &hash, slugs).await?;
        Ok((
            BrokerCredentials {
                user: user_name(&self.ns, worker),
                password,
            },
            hash,
        ))
    }

    /// The worker serves other pools now, or was disabled or enabled: its new rights. Call
    /// [`BrokerUsers::disconnect`] once the change is committed, so that no open channel
    /// keeps the old ones (and the agent, reconnecting, reads the new configuration).
    pub async fn repermission(
        &self,
        worker: WorkerId,
        slugs: &[String],
        enabled: bool,
    ) -> Result<(), Error> {
        let user = user_name(&self.ns, worker);
        self.put_permissions(&user, &permissions(&self.ns, worker, slugs, enabled))
            .await
    }

    /// Close a worker's broker connections (its channels keep permissions they checked
    /// before a change), trying three times over about a second.
    pub async fn disconnect(&self, worker: WorkerId, reason: &str) -> Result<(), Error> {
        let user = user_name(&self.ns, worker);
        let mut last = None;
        for i in 0..3 {
            match self.close_connections(&user, reason).await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(300 * (i + 1))).await;
        }
        Err(last.expect("three tries"))
    }

    /// Messages ready in a queue and delivered but not acked, as the management API last saw
    /// them (its statistics are a few seconds old). `None` if the queue does not exist.
    pub async fn queue_counts(&self, queue: &str) -> Result<Option<(u64, u64)>, Error> {
        #[derive(Deserialize)]
        struct Counts {
            #[serde(default)]
            messages_ready: u64,
            #[serde(default)]
            messages_unacknowledged: u64,
        }
        let resp = self
            .call(
                &format!("reading queue {queue}"),
                reqwest::Method::GET,
                self.path(&["queues", &self.vhost, queue]),
                None,
                true,
            )
            .await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let c: Counts = resp
            .json()
            .await
            .map_err(|e| Error::Unreachable(e.to_string()))?;
        Ok(Some((c.messages_ready, c.messages_unacknowledged)))
    }

    /// Delete a worker's user; RabbitMQ closes its connections at once.
    pub async fn remove(&self, worker: WorkerId) -> Result<(), Error> {
        self.delete_user(&user_name(&self.ns, worker)).await
    }

    /// Make the broker's users of this namespace match `wanted`: create missing users (from
    /// the stored hash), fix changed passwords, limits and permissions, delete users of
    /// workers that no longer exist. Users are broker-wide, but an installation is one vhost:
    /// only a user with permissions on this vhost is ever deleted (another installation with
    /// the same namespace on another vhost keeps its own). One failing user does not stop the
    /// others. The caller holds [`lock`].
    pub async fn reconcile(&self, wanted: &[Wanted]) -> Result<Reconciled, Error> {
        let users: Vec<UserRow> = self
            .call(
                "listing users",
                reqwest::Method::GET,
                self.path(&["users"]),
                None,
                false,
            )
            .await?
            .json()
            .await
            .map_err(|e| Error::Unreachable(e.to_string()))?;
        let perms: Vec<PermissionRow> = self
            .call(
                "listing permissions",
                reqwest::Method::GET,
                self.path(&["vhosts", &self.vhost, "permissions"]),
                None,
                false,
            )
            .await?
            .json()
            .await
            .map_err(|e| Error::Unreachable(e.to_string()))?;
        let existing: HashMap<String, UserRow> = users
            .into_iter()
            .filter(|u| worker_of(&self.ns, &u.name).is_some())
            .map(|u| (u.name.clone(), u))
            .collect();
        let granted: HashMap<String, Permissions> = perms
            .into_iter()
            .filter(|p| worker_of(&self.ns, &p.user).is_some())
            .map(|p| {
                (
                    p.user,
                    Permissions {
                        configure: p.configure,
                        write: p.write,
                        read: p.read,
                    },
                )
            })
            .collect();
        let mut done = Reconciled::default();
        let wanted_users: BTreeMap<&str, &Wanted> =
            wanted.iter().map(|w| (w.user.as_str(), w)).collect();
        for (user, w) in &wanted_users {
            let want = permissions(&self.ns, w.worker, &w.slugs, w.enabled);
            let r = async {
                match existing.get(*user) {
                    Some(u) if u.password_hash == w.password_hash => {
                        if !u.has_limits() {
                            self.put_limits(user).await?;
                        }
                    }
                    _ => {
                        self.put_user(user, &w.password_hash).await?;
                        self.put_limits(user).await?;
                        done.created += 1;
                    }
                }
                if granted.get(*user) != Some(&want) {
                    self.put_permissions(user, &want).await?;
                    self.close_connections(user, "the worker's permissions were corrected")
                        .await?;
                    done.repermissioned += 1;
                }
                Ok::<_, Error>(())
            }
            .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, user, "could not reconcile a worker's broker user");
                done.failed += 1;
            }
        }
        for user in existing.keys() {
            if !wanted_users.contains_key(user.as_str()) && granted.contains_key(user) {
                match self.delete_user(user).await {
                    Ok(()) => done.deleted += 1,
                    Err(e) => {
                        tracing::warn!(error = %e, user, "could not delete an orphaned broker user");
                        done.failed += 1;
                    }
                }
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_credentials_are_decoded() {
        assert_eq!(percent_decode("p%40ss%2Fw%25rd"), "p@ss/w%rd");
        assert_eq!(percent_decode("plain+x"), "plain+x");
        assert_eq!(percent_decode("bad%zz"), "bad%zz");
    }
}
