//! API keys and worker credentials: random, high-entropy strings stored only as their
//! SHA-256 (a slow password hash buys nothing for 190-bit random secrets, and the lookup must
//! be fast on every request).

use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};

fn random(len: usize) -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// A new API key: `API-` and 32 random characters.
pub fn new_api_key() -> String {
    format!("API-{}", random(32))
}

/// A new worker credential.
pub fn new_worker_token() -> String {
    format!("WRK-{}", random(40))
}

pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.trim().as_bytes()))
}

/// The part of a key shown in listings.
pub fn prefix(secret: &str) -> String {
    secret.chars().take(8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_hashes_stable() {
        let a = new_api_key();
        assert!(a.starts_with("API-") && a.len() == 36);
        assert_ne!(a, new_api_key());
        assert_eq!(hash_secret(&a), hash_secret(&format!(" {a}\n")));
        assert_eq!(prefix(&a).len(), 8);
    }
}
