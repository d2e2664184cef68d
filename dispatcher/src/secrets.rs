//! Sensitive values at rest: sealed with XChaCha20-Poly1305 under `secrets.key` (base64 of 32
//! bytes) before they reach PostgreSQL. Without a configured key a fixed development key is
//! used, with a warning at start: fine on a laptop, never in production.

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const NONCE_LEN: usize = 24;
const DEV_KEY: [u8; 32] = *b"gantry-development-key-not-safe!";

#[derive(Clone)]
pub struct SecretBox {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl SecretBox {
    /// From `secrets.key`, or the development key (with a warning) when it is not set.
    pub fn from_config(key: Option<&str>) -> anyhow::Result<Self> {
        let bytes = match key {
            Some(k) => {
                let raw = STANDARD
                    .decode(k.trim())
                    .context("secrets.key is not valid base64")?;
                if raw.len() != 32 {
                    bail!(
                        "secrets.key must be the base64 of exactly 32 bytes, not {}",
                        raw.len()
                    );
                }
                raw
            }
            None => {
                tracing::warn!(
                    "secrets.key is not set: sensitive values are encrypted with a built-in development key; set secrets.key (base64 of 32 random bytes, e.g. `openssl rand -base64 32`) in production"
                );
                DEV_KEY.to_vec()
            }
        };
        Ok(Self {
            cipher: XChaCha20Poly1305::new_from_slice(&bytes).expect("32-byte key"),
        })
    }

    pub fn seal(&self, plaintext: &str) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let mut out = nonce.to_vec();
        out.extend(
            self.cipher
                .encrypt(&nonce, plaintext.as_bytes())
                .expect("encryption cannot fail for in-memory buffers"),
        );
        out
    }

    pub fn open(&self, sealed: &[u8]) -> anyhow::Result<String> {
        if sealed.len() < NONCE_LEN {
            bail!("sealed value too short");
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(XNonce::from_slice(nonce), ct)
            .map_err(|_| {
                anyhow::anyhow!("cannot decrypt a sensitive value: was secrets.key changed?")
            })?;
        String::from_utf8(plain).context("decrypted value is not UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_hides_the_value() {
        let b = SecretBox::from_config(None).unwrap();
        let sealed = b.seal("s3cr3t-pw");
        assert!(!sealed.windows(9).any(|w| w == b"s3cr3t-pw"));
        assert_eq!(b.open(&sealed).unwrap(), "s3cr3t-pw");
        let other = SecretBox::from_config(Some(&STANDARD.encode([7u8; 32]))).unwrap();
        assert!(other.open(&sealed).is_err());
        assert!(SecretBox::from_config(Some("c2hvcnQ=")).is_err());
    }
}
