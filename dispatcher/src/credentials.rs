//! # Credentials: API keys and worker tokens, remembered between requests
//!
//! Every request names a credential, and looking it up was a statement (and, outside a
//! transaction, a commit) of its own on every call. This node remembers what it has looked up,
//! keyed by the credential's hash, and forgets everything at once whenever PostgreSQL says a
//! credential may have changed: triggers on `api_keys` and `workers` (migration
//! `20261201000004`) send `NOTIFY gantry_credentials` for any deletion and any new hash or
//! permission, so a revoked key or a deregistered worker is refused as soon as the
//! notification arrives (on the node that made the change, at once: it forgets before it
//! answers). Only what does not change under a credential is remembered: a key's id and
//! permissions, a token's worker; a worker's `enabled` and health are read fresh where they
//! decide anything (the claim reads them in its own transaction).
//!
//! The memory is trusted only while the node's `LISTEN` connection (`notify.rs`) has been up
//! without a break
//! since the entry was stored (a generation number, bumped on every notification and every
//! reconnect): with the listener down, nothing is remembered and every request reads the
//! database, as before.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The channel the triggers notify.
pub const CHANNEL: &str = "gantry_credentials";

/// Entries kept at most (a flood of distinct wrong keys must not grow memory): beyond it the
/// memory is cleared.
const MAX_ENTRIES: usize = 10_000;

/// How often a key's `last_used_at` is written, at most.
pub const TOUCH_EVERY: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Credentials {
    live: AtomicBool,
    generation: AtomicU64,
    keys: Mutex<HashMap<String, KeyEntry>>,
    workers: Mutex<HashMap<String, WorkerEntry>>,
}

/// An API key as looked up: its id, its permissions, when this node last recorded its use.
#[derive(Clone, Debug)]
pub struct KeyEntry {
    pub id: uuid::Uuid,
    pub permissions: Vec<String>,
    pub touched: Option<Instant>,
}

/// A worker as looked up by its token: only who it is. What may change (enabled, health) is
/// never remembered: the claim reads it in its own transaction.
#[derive(Clone, Debug)]
pub struct WorkerEntry {
    pub id: uuid::Uuid,
}

/// Read before a database lookup; [`Credentials::remember_key`] stores the result only if
/// nothing was invalidated meanwhile.
#[derive(Clone, Copy, Debug)]
pub struct Generation(u64);

impl Credentials {
    pub fn generation(&self) -> Generation {
        Generation(self.generation.load(Ordering::SeqCst))
    }

    /// Forget everything (a notification, or the listener's state changed).
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.keys.lock().expect("lock").clear();
        self.workers.lock().expect("lock").clear();
    }

    /// The listener is (or is no longer) connected; either way the memory starts afresh.
    pub fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::SeqCst);
        self.invalidate();
    }

    pub fn key(&self, hash: &str) -> Option<KeyEntry> {
        if !self.live.load(Ordering::SeqCst) {
            return None;
        }
        self.keys.lock().expect("lock").get(hash).cloned()
    }

    pub fn remember_key(&self, hash: &str, entry: KeyEntry, seen: Generation) {
        let mut keys = self.keys.lock().expect("lock");
        if !self.live.load(Ordering::SeqCst) || self.generation.load(Ordering::SeqCst) != seen.0 {
            return;
        }
        if keys.len() >= MAX_ENTRIES {
            keys.clear();
        }
        keys.insert(hash.to_owned(), entry);
    }

    /// Whether this node should record the key's use now (at most every [`TOUCH_EVERY`]);
    /// marks it recorded.
    pub fn touch_due(&self, hash: &str) -> bool {
        let mut keys = self.keys.lock().expect("lock");
        match keys.get_mut(hash) {
            Some(e) if e.touched.is_some_and(|t| t.elapsed() < TOUCH_EVERY) => false,
            Some(e) => {
                e.touched = Some(Instant::now());
                true
            }
            None => true,
        }
    }

    pub fn worker(&self, hash: &str) -> Option<WorkerEntry> {
        if !self.live.load(Ordering::SeqCst) {
            return None;
        }
        self.workers.lock().expect("lock").get(hash).cloned()
    }

    pub fn remember_worker(&self, hash: &str, entry: WorkerEntry, seen: Generation) {
        let mut workers = self.workers.lock().expect("lock");
        if !self.live.load(Ordering::SeqCst) || self.generation.load(Ordering::SeqCst) != seen.0 {
            return;
        }
        if workers.len() >= MAX_ENTRIES {
            workers.clear();
        }
        workers.insert(hash.to_owned(), entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> KeyEntry {
        KeyEntry {
            id: uuid::Uuid::new_v4(),
            permissions: vec!["TaskView".into()],
            touched: None,
        }
    }

    #[test]
    fn nothing_is_remembered_without_a_live_listener() {
        let c = Credentials::default();
        c.remember_key("h", key(), c.generation());
        assert!(c.key("h").is_none());
        c.set_live(true);
        c.remember_key("h", key(), c.generation());
        assert!(c.key("h").is_some());
        c.set_live(false);
        assert!(c.key("h").is_none(), "a lost listener forgets everything");
    }

    #[test]
    fn a_lookup_that_raced_an_invalidation_is_not_remembered() {
        let c = Credentials::default();
        c.set_live(true);
        let seen = c.generation();
        c.invalidate(); // a key was revoked while the lookup ran
        c.remember_key("h", key(), seen);
        assert!(c.key("h").is_none());
    }

    #[test]
    fn use_is_recorded_at_most_once_a_minute() {
        let c = Credentials::default();
        c.set_live(true);
        c.remember_key("h", key(), c.generation());
        assert!(c.touch_due("h"));
        assert!(!c.touch_due("h"));
    }
}
