//! What `production = true` asks of each program beyond [`Settings::validate`], and the
//! effective TLS settings every client derives from the configuration (see [`crate::tls`]).

use crate::config::{ConfigError, Settings};

impl Settings {
    /// What `production = true` asks of a dispatcher on top of [`Settings::validate`]:
    /// per-worker broker users, and no credential in plain text to another machine.
    pub fn check_dispatcher_production(&self) -> Result<(), ConfigError> {
        if !self.production {
            return Ok(());
        }
        let Some(management) = &self.amqp.management_url else {
            return Err(ConfigError::key(
                "amqp.management_url",
                "is required with production = true: without it every agent shares one broker user and can forge any worker's results (see docs/security.md)",
            ));
        };
        for (key, url) in [
            ("amqp.url", self.amqp.url.as_str()),
            ("amqp.management_url", management.as_str()),
            ("redis.url", self.redis.url.as_str()),
        ] {
            crate::tls::refuse_plaintext(key, url).map_err(|m| ConfigError::key(key, m))?;
        }
        let pg = url::Url::parse(&self.postgres.url)
            .map_err(|e| ConfigError::key("postgres.url", format!("not a URL: {e}")))?;
        let verified = pg
            .query_pairs()
            .any(|(k, v)| k == "sslmode" && v == "verify-full");
        // `?host=` overrides the URL's host (and may name several, or a socket directory).
        let hosts: Vec<String> = match pg.query_pairs().find(|(k, _)| k == "host") {
            Some((_, v)) => v.split(',').map(str::to_owned).collect(),
            None => pg.host_str().map(str::to_owned).into_iter().collect(),
        };
        let local = !hosts.is_empty()
            && hosts
                .iter()
                .all(|h| h.starts_with('/') || crate::tls::is_loopback_host(h));
        if !verified && !local {
            return Err(ConfigError::key(
                "postgres.url",
                "needs ?sslmode=verify-full to a host other than loopback with production = true (sslmode=require does not check the certificate)",
            ));
        }
        Ok(())
    }

    /// What `production = true` asks of an agent or the CLI: no credential in plain text to
    /// another machine, on the broker or on `server` (the dispatcher's URL or URLs).
    pub fn check_client_production(&self, what: &str, server: &str) -> Result<(), String> {
        if !self.production {
            return Ok(());
        }
        for url in server.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            crate::tls::refuse_plaintext(what, url)?;
        }
        crate::tls::refuse_plaintext("amqp.url", &self.amqp.url)
    }

    /// `postgres.url`, with `sslrootcert` pointing at `tls.ca_file` when that is set and the
    /// URL names no root certificate of its own.
    pub fn postgres_url(&self) -> String {
        let Some(ca) = &self.tls.ca_file else {
            return self.postgres.url.clone();
        };
        let Ok(mut url) = url::Url::parse(&self.postgres.url) else {
            return self.postgres.url.clone();
        };
        if url.query_pairs().any(|(k, _)| k == "sslrootcert") {
            return self.postgres.url.clone();
        }
        url.query_pairs_mut()
            .append_pair("sslrootcert", &ca.display().to_string());
        url.to_string()
    }

    /// The PEM text of `tls.ca_file`, if set (checked readable at load).
    pub fn ca_pem(&self) -> Option<String> {
        self.tls
            .ca_file
            .as_deref()
            .and_then(|p| crate::tls::read_ca(p).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn production_sees_through_a_host_override_and_insecure_redis() {
        let dir = std::env::temp_dir().join(format!("gantry-prod-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("gantry.toml");
        std::fs::write(&file, "").unwrap();
        let base = [
            ("GANTRY__PRODUCTION", "true"),
            ("GANTRY__AMQP__MANAGEMENT_URL", "http://a:b@127.0.0.1:15672"),
        ];
        let check = |extra: &[(&str, &str)]| {
            let mut e: Vec<(&str, &str)> = base.to_vec();
            e.extend_from_slice(extra);
            Settings::load_with_env(Some(&file), env(&e))
                .unwrap()
                .check_dispatcher_production()
        };
        assert!(check(&[]).is_ok(), "loopback everywhere");
        let e = check(&[(
            "GANTRY__POSTGRES__URL",
            "postgres://u@localhost/g?host=10.0.0.5",
        )])
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("postgres.url"), "{e}");
        assert!(
            check(&[(
                "GANTRY__POSTGRES__URL",
                "postgres://u@localhost/g?host=/run/postgresql"
            )])
            .is_ok()
        );
        assert!(
            check(&[(
                "GANTRY__POSTGRES__URL",
                "postgres://u@db.example/g?sslmode=verify-full"
            )])
            .is_ok()
        );
        let e = check(&[(
            "GANTRY__REDIS__URL",
            "rediss://cache.example:6380/#insecure",
        )])
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("redis.url"), "{e}");
    }
}
