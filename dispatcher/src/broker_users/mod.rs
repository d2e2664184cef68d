//! # Broker users: one RabbitMQ user per worker
//!
//! With `amqp.management_url` set, every registered worker gets a RabbitMQ user of its own,
//! named `<ns>.worker.<worker-id>`, created, re-permissioned and deleted by the dispatcher
//! through RabbitMQ's management HTTP API. Its permissions (on the vhost of `amqp.url`) are
//! exactly:
//!
//! | right | regex | so it may |
//! | --- | --- | --- |
//! | configure | `^$` | declare, bind, purge or delete nothing |
//! | write | `^<ns>\.x\.(results\|heartbeats)$` | publish events and heartbeats, nothing else (not the default exchange, not `<ns>.jobs` or `<ns>.control`) |
//! | read | `^<ns>\.(pool\.(<slug>\|...)\|worker\.<id>\|control\.<id>)$` | consume its pools' queues, its own queue and its own control queue |
//!
//! Read also allows purging those queues and a worker may take jobs without running them:
//! PostgreSQL and the claim stay the authority (a job gone without a claim is published
//! again, see `strays`). Each user may hold [`MAX_CONNECTIONS`] connections and
//! [`MAX_CHANNELS`] channels, so one worker cannot exhaust the broker's.
//!
//! The password is generated here, returned once with the registration and never stored:
//! PostgreSQL keeps RabbitMQ's own salted hash of it (`password_hash`), which is also what
//! creates the user, so [`BrokerUsers::reconcile`] can recreate a user the broker lost, fix
//! permissions that drifted and delete users whose worker is gone. Every change of broker users
//! (registration, deregistration, a change of pools, reconciliation) runs under one PostgreSQL
//! advisory lock, taken with [`lock`] in the caller's transaction, so two dispatcher nodes never
//! undo each other's work.
//!
//! Permission changes do not reach channels that are already open (each channel caches its
//! last checks), so after narrowing a user's rights its connections are closed: its agent
//! reconnects, reads its configuration again and consumes what it may now. Deleting a user
//! closes its connections by itself.

mod management;

pub use management::BrokerUsers;

use base64::Engine;
use gantry_shared::ids::WorkerId;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

/// The advisory lock key that serialises every change of broker users (any fixed number;
/// this one spells "gantry broker users" to whoever reads `pg_locks`).
const LOCK_KEY: i64 = 0x6761_6e74_7279_6275;

/// Connections one worker's user may hold at once: its agent's, and a reconnection while
/// the broker has not yet noticed the old one is gone. More would only serve a flood.
pub const MAX_CONNECTIONS: u32 = 4;
/// Channels one worker's user may hold at once, over all its connections (an agent uses a
/// handful: jobs, control, results, heartbeats, a queue probe).
pub const MAX_CHANNELS: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("RabbitMQ's management API cannot be reached ({0}); try again")]
    Unreachable(String),
    #[error("RabbitMQ's management API refused {what}: {status} {body}")]
    Refused {
        what: String,
        status: u16,
        body: String,
    },
}

/// The three permission regexes of one user on the vhost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
}

/// Escape the characters that mean something in a PCRE (RabbitMQ's `re`) pattern.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if r"\.^$|?*+()[]{}-/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The permissions of worker `worker`'s user in namespace `ns`, serving pools `slugs`. A
/// disabled worker reads its control queue only (it takes no new steps; the ones it runs
/// still report, and it still shows it is alive).
pub fn permissions(ns: &str, worker: WorkerId, slugs: &[String], enabled: bool) -> Permissions {
    let ns_re = escape(ns);
    let id = escape(&worker.to_string());
    let mut reads = Vec::new();
    let mut slugs: Vec<String> = slugs.iter().map(|s| escape(s)).collect();
    slugs.sort();
    slugs.dedup();
    if enabled {
        if !slugs.is_empty() {
            reads.push(format!("pool\\.({})", slugs.join("|")));
        }
        reads.push(format!("worker\\.{id}"));
    }
    reads.push(format!("control\\.{id}"));
    Permissions {
        configure: "^$".into(),
        write: format!("^{ns_re}\\.x\\.(results|heartbeats)$"),
        read: format!("^{ns_re}\\.({})$", reads.join("|")),
    }
}

/// The broker user of a worker.
pub fn user_name(ns: &str, worker: WorkerId) -> String {
    format!("{ns}.worker.{worker}")
}

/// The worker a broker user belongs to, if it is one of this namespace's worker users (spelt
/// exactly as [`user_name`] spells it).
pub fn worker_of(ns: &str, user: &str) -> Option<WorkerId> {
    let rest = user.strip_prefix(ns)?.strip_prefix(".worker.")?;
    let id = rest.parse::<Uuid>().ok()?;
    (id.hyphenated().to_string() == rest).then_some(WorkerId(id))
}

/// RabbitMQ's `rabbit_password_hashing_sha256` format: base64(salt ‖ sha256(salt ‖ password))
/// with a 4-byte salt.
pub fn password_hash(password: &str, salt: [u8; 4]) -> String {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password.as_bytes());
    let mut raw = salt.to_vec();
    raw.extend_from_slice(&h.finalize());
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// A new password (256 random bits, URL-safe) and its hash.
pub fn new_password() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let password = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let mut salt = [0u8; 4];
    rand::rng().fill_bytes(&mut salt);
    let hash = password_hash(&password, salt);
    (password, hash)
}

/// Take the lock that serialises changes of broker users, until the caller's transaction ends.
pub async fn lock(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK_KEY)
        .execute(conn)
        .await?;
    Ok(())
}

/// A worker as the broker should know it.
pub struct Wanted {
    pub worker: WorkerId,
    pub user: String,
    pub password_hash: String,
    pub slugs: Vec<String>,
    pub enabled: bool,
}

/// What a reconciliation changed, and how many of its changes failed (each is tried again at
/// the next one).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub created: usize,
    pub repermissioned: usize,
    pub deleted: usize,
    pub failed: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> WorkerId {
        WorkerId("0192f0e4-54c5-7d3e-9a41-2f0d3c5a6b7e".parse().unwrap())
    }

    #[test]
    fn permissions_name_exactly_the_workers_queues() {
        let p = permissions(
            "gantry",
            id(),
            &["win".into(), "linux".into(), "linux".into()],
            true,
        );
        assert_eq!(p.configure, "^$");
        assert_eq!(p.write, r"^gantry\.x\.(results|heartbeats)$");
        assert_eq!(
            p.read,
            r"^gantry\.(pool\.(linux|win)|worker\.0192f0e4\-54c5\-7d3e\-9a41\-2f0d3c5a6b7e|control\.0192f0e4\-54c5\-7d3e\-9a41\-2f0d3c5a6b7e)$"
        );
        let none = permissions("t-1_x", id(), &[], true);
        assert!(
            none.read.starts_with(r"^t\-1_x\.(worker\."),
            "{}",
            none.read
        );
        let disabled = permissions("gantry", id(), &["linux".into()], false);
        assert_eq!(
            disabled.read, r"^gantry\.(control\.0192f0e4\-54c5\-7d3e\-9a41\-2f0d3c5a6b7e)$",
            "a disabled worker reads its control queue only"
        );
        assert_eq!(disabled.write, p.write, "its running steps still report");
    }

    #[test]
    fn users_map_back_to_their_workers_only_in_their_namespace() {
        let u = user_name("gantry", id());
        assert_eq!(u, format!("gantry.worker.{}", id()));
        assert_eq!(worker_of("gantry", &u), Some(id()));
        assert_eq!(worker_of("gantr", &u), None);
        assert_eq!(worker_of("gantry", "guest"), None);
        assert_eq!(worker_of("gantry", "gantry.worker.not-a-uuid"), None);
        let upper = format!(
            "gantry.worker.{}",
            id().0.hyphenated().to_string().to_uppercase()
        );
        assert_eq!(worker_of("gantry", &upper), None, "one spelling only");
        let simple = format!("gantry.worker.{}", id().0.simple());
        assert_eq!(worker_of("gantry", &simple), None, "one spelling only");
        assert_eq!(
            worker_of("a", &format!("a.worker.x.worker.{}", id())),
            None,
            "a longer namespace's users are not ours"
        );
    }

    #[test]
    fn password_hashes_are_rabbitmqs_format() {
        // Checked against RabbitMQ 3.10: this password logs in with this hash.
        let h = password_hash("s3cret", [1, 2, 3, 4]);
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&h)
            .unwrap();
        assert_eq!(raw.len(), 36);
        assert_eq!(&raw[..4], &[1, 2, 3, 4]);
        let mut d = Sha256::new();
        d.update([1u8, 2, 3, 4]);
        d.update(b"s3cret");
        assert_eq!(&raw[4..], d.finalize().as_slice());
        let (pw, hash) = new_password();
        assert_eq!(pw.len(), 43);
        assert!(
            pw.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_ne!(hash, new_password().1);
    }
}
