//! # Transport security shared by every program
//!
//! Every client in Gantry speaks TLS through rustls with the `ring` provider, which
//! [`install_provider`] makes the process default (first thing in each `main`: with two
//! providers compiled in, rustls refuses to pick one). `tls.ca_file` names a private CA in PEM;
//! it is added to the built-in web roots of every client (HTTP, AMQP, Redis, PostgreSQL).
//!
//! With `production = true` no program sends a credential in plain text over the network:
//! [`refuse_plaintext`] rejects `http://`, `amqp://` and `redis://` URLs to hosts other than
//! loopback (a local service on the same machine is no wire an attacker can tap), nor a
//! `rediss://...#insecure` that skips the certificate check.

use std::net::IpAddr;
use std::path::Path;

/// Make rustls' `ring` provider the process default. Idempotent; harmless if another part
/// installed it first.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The PEM text of `tls.ca_file`, checked to hold at least one certificate.
pub fn read_ca(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(text)
}

/// True for `localhost`, `127.0.0.0/8` and `::1`: hosts whose traffic never leaves the machine.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Schemes that carry credentials in plain text, and their TLS counterparts.
const PLAIN: [(&str, &str); 3] = [("http", "https"), ("amqp", "amqps"), ("redis", "rediss")];

/// `Err` (the message) when `url` would send credentials in plain text to another machine.
/// `what` names the setting or flag, for the message.
pub fn refuse_plaintext(what: &str, url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{what}: not a URL: {e}"))?;
    if parsed.fragment() == Some("insecure") {
        // redis-rs's way of skipping the certificate check.
        return Err(format!(
            "{what} asks for no certificate check (#insecure) with production = true; use tls.ca_file for a private CA"
        ));
    }
    let Some((_, tls)) = PLAIN.iter().find(|(p, _)| *p == parsed.scheme()) else {
        return Ok(());
    };
    match parsed.host_str() {
        Some(host) if is_loopback_host(host) => Ok(()),
        host => Err(format!(
            "{what} uses {}:// to {} with production = true; use {tls}:// (with tls.ca_file for a private CA)",
            parsed.scheme(),
            host.unwrap_or("a remote host")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in ["localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]"] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "10.0.0.1",
            "rabbit",
            "example.com",
            "0.0.0.0",
            "localhost.evil.com",
            "a.localhost",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn plaintext_is_refused_only_off_the_machine() {
        assert!(refuse_plaintext("x", "http://127.0.0.1:8080").is_ok());
        assert!(refuse_plaintext("x", "amqp://guest:guest@localhost:5672/%2f").is_ok());
        assert!(refuse_plaintext("x", "https://dispatcher.example:8443").is_ok());
        assert!(refuse_plaintext("x", "amqps://u:p@rabbit:5671/%2f").is_ok());
        assert!(refuse_plaintext("x", "postgres://db/gantry").is_ok());
        let e = refuse_plaintext("--server", "http://dispatcher.example:8080").unwrap_err();
        assert!(e.contains("--server") && e.contains("https://"), "{e}");
        assert!(refuse_plaintext("amqp.url", "amqp://u:p@10.0.0.5/%2f").is_err());
        assert!(refuse_plaintext("redis.url", "redis://cache:6379").is_err());
        assert!(refuse_plaintext("redis.url", "rediss://cache:6380/#insecure").is_err());
    }
}
