//! Sensitive values at rest: sealed with XChaCha20-Poly1305 before they reach PostgreSQL.
//!
//! The key is `secrets.key` (base64 of 32 bytes) or, when that is not set, the file
//! `secrets.key_file` (default [`SecretsSettings::key_file_path`]). There is no built-in key:
//! a dispatcher that finds neither generates a random key into the file on first start (mode
//! 0600, created with `create_new` and linked into place, so two nodes starting at once on one
//! machine agree on one key) and logs the file's path, never the key. With `production =
//! true` a missing key is refused at start instead (see the dispatcher's `main`).
//!
//! Every sealed value is bound to its task and its name: the AEAD's associated data is
//! [`AD_PREFIX`], the task id's 16 bytes and the name, so a sealed value copied to another row
//! or another task does not open. Sealed values start with [`MAGIC`]; values sealed by
//! earlier versions (no magic, no binding, under the old built-in development key) are refused
//! with an error that says so.
//!
//! The database remembers which key sealed it: [`verify_key`] seals a check value on the first
//! start and opens it on every later one, so a node whose key differs from its cluster's fails
//! at start, loudly, instead of failing each claim later.

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use gantry_shared::config::SecretsSettings;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use uuid::Uuid;

const NONCE_LEN: usize = 24;
/// The first bytes of every value sealed by this version.
const MAGIC: &[u8; 2] = b"G2";
/// Start of the associated data of every sealed value.
const AD_PREFIX: &[u8] = b"gantry-sealed-v2\0";
/// The name the key check value is bound to (with the nil task id).
const CHECK_NAME: &str = "secrets-key-check";

/// Where the key came from, for messages (never the key itself).
#[derive(Clone, Debug)]
pub enum KeySource {
    /// `secrets.key`.
    Setting,
    /// A key file that existed.
    File(PathBuf),
    /// A key file this start generated.
    Generated(PathBuf),
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Setting => f.write_str("secrets.key"),
            KeySource::File(p) | KeySource::Generated(p) => {
                write!(f, "secrets.key_file {}", p.display())
            }
        }
    }
}

#[derive(Clone)]
pub struct SecretBox {
    cipher: XChaCha20Poly1305,
    source: KeySource,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBox({})", self.source)
    }
}

fn decode_key(text: &str, what: &str) -> anyhow::Result<Vec<u8>> {
    let raw = STANDARD
        .decode(text.trim())
        .with_context(|| format!("{what} is not valid base64"))?;
    if raw.len() != 32 {
        bail!(
            "{what} must be the base64 of exactly 32 bytes, not {}",
            raw.len()
        );
    }
    Ok(raw)
}

/// Read a key file, refusing one that others than its owner may read.
fn read_key_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("secrets.key_file {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "secrets.key_file {} has mode {mode:o}: only its owner may read it (chmod 600)",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading secrets.key_file {}", path.display()))?;
    decode_key(&text, &format!("secrets.key_file {}", path.display()))
}

/// Write a new random key to `path` atomically: into a private temporary file (0600,
/// `create_new`), then hard-linked into place, which fails if the file appeared meanwhile (then
/// the other writer's key is read instead). Returns the key and whether this call made it.
fn generate_key_file(path: &Path) -> anyhow::Result<(Vec<u8>, bool)> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| {
                format!(
                    "creating the directory of secrets.key_file {}",
                    path.display()
                )
            })?;
    }
    let key = XChaCha20Poly1305::generate_key(&mut OsRng).to_vec();
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "secrets.key".into()),
        Uuid::new_v4().simple()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{}\n", STANDARD.encode(&key)).as_bytes())?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing secrets.key_file {}", path.display()));
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok((key, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok((read_key_file(path)?, false))
        }
        Err(e) => Err(e).with_context(|| format!("creating secrets.key_file {}", path.display())),
    }
}

fn associated_data(task: Uuid, name: &str) -> Vec<u8> {
    let mut ad = Vec::with_capacity(AD_PREFIX.len() + 16 + name.len());
    ad.extend_from_slice(AD_PREFIX);
    ad.extend_from_slice(task.as_bytes());
    ad.extend_from_slice(name.as_bytes());
    ad
}

impl SecretBox {
    /// The key of `secrets.key`, or of `secrets.key_file`, generating that file when it does not
    /// exist and `may_generate` (false with `production = true`).
    pub fn load(settings: &SecretsSettings, may_generate: bool) -> anyhow::Result<Self> {
        if let Some(k) = &settings.key {
            return Self::from_key(&decode_key(k, "secrets.key")?, KeySource::Setting);
        }
        let path = settings.key_file_path();
        if path.exists() {
            let key = read_key_file(&path)?;
            tracing::info!(key_file = %path.display(), "secrets key read from secrets.key_file");
            return Self::from_key(&key, KeySource::File(path));
        }
        if !may_generate {
            bail!(
                "secrets.key: must be set when production = true (or secrets.key_file must name an existing key file; {} does not exist)",
                path.display()
            );
        }
        let (key, made) = generate_key_file(&path)?;
        if made {
            tracing::warn!(key_file = %path.display(), "secrets.key is not set: generated a new secrets key into secrets.key_file; back it up, and give every node of this cluster the same file (or the same secrets.key)");
            Self::from_key(&key, KeySource::Generated(path))
        } else {
            tracing::info!(key_file = %path.display(), "secrets key read from secrets.key_file");
            Self::from_key(&key, KeySource::File(path))
        }
    }

    fn from_key(key: &[u8], source: KeySource) -> anyhow::Result<Self> {
        let cipher = XChaCha20Poly1305::new_from_slice(key)
            .map_err(|_| anyhow::anyhow!("the secrets key must be 32 bytes"))?;
        Ok(Self { cipher, source })
    }

    /// Where this key came from (for messages).
    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// Seal a value of `task` named `name` (a variable's name, or
    /// `Steps.<step>.Output.<name>` for a step's output).
    pub fn seal(&self, task: Uuid, name: &str, plaintext: &str) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ad = associated_data(task, name);
        let ct = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: &ad,
                },
            )
            .unwrap_or_default();
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + ct.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend(ct);
        out
    }

    /// Open a value sealed for `task` and `name`; fails for any other task or name.
    pub fn open(&self, task: Uuid, name: &str, sealed: &[u8]) -> anyhow::Result<String> {
        let Some(rest) = sealed.strip_prefix(MAGIC.as_slice()) else {
            bail!(
                "it was sealed by an earlier Gantry version (before values were bound to their task, under the old built-in key) and cannot be opened any more; submit the task again"
            );
        };
        if rest.len() < NONCE_LEN {
            bail!("sealed value too short");
        }
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let ad = associated_data(task, name);
        let plain = self
            .cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: &ad })
            .map_err(|_| {
                anyhow::anyhow!(
                    "cannot decrypt it with {}: it was sealed for another task or name, or under another key",
                    self.source
                )
            })?;
        String::from_utf8(plain).context("decrypted value is not UTF-8")
    }
}

/// Make sure this node's key is the one that sealed the database's values: seal a check value
/// on the first start, open it on every later one. A node with another key fails here.
pub async fn verify_key(db: &sqlx::PgPool, secrets: &SecretBox) -> anyhow::Result<()> {
    let fresh = secrets.seal(Uuid::nil(), CHECK_NAME, CHECK_NAME);
    sqlx::query("INSERT INTO secrets_key_check (id, sealed) VALUES (1, $1) ON CONFLICT DO NOTHING")
        .bind(&fresh)
        .execute(db)
        .await?;
    let stored: Vec<u8> = sqlx::query_scalar("SELECT sealed FROM secrets_key_check WHERE id = 1")
        .fetch_one(db)
        .await?;
    match secrets.open(Uuid::nil(), CHECK_NAME, &stored) {
        Ok(v) if v == CHECK_NAME => Ok(()),
        _ => bail!(
            "the secrets key ({}) is not the key that sealed this database's sensitive values: every dispatcher node of one installation must use the same secrets.key, or a copy of the same secrets.key_file",
            secrets.source
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(key: Option<String>, file: Option<PathBuf>) -> SecretsSettings {
        SecretsSettings {
            key,
            key_file: file,
        }
    }

    #[test]
    fn round_trips_bound_to_task_and_name() {
        let b = SecretBox::load(&settings(Some(STANDARD.encode([3u8; 32])), None), false).unwrap();
        let (t1, t2) = (Uuid::new_v4(), Uuid::new_v4());
        let sealed = b.seal(t1, "pw", "s3cr3t-pw");
        assert!(!sealed.windows(9).any(|w| w == b"s3cr3t-pw"));
        assert_eq!(b.open(t1, "pw", &sealed).unwrap(), "s3cr3t-pw");
        assert!(b.open(t2, "pw", &sealed).is_err());
        assert!(b.open(t1, "other", &sealed).is_err());
        assert!(
            b.open(t1, "pw", &sealed[2..]).is_err(),
            "old format refused"
        );
        assert!(b.open(t1, "pw", b"G2").is_err());
        let other =
            SecretBox::load(&settings(Some(STANDARD.encode([7u8; 32])), None), false).unwrap();
        assert!(other.open(t1, "pw", &sealed).is_err());
        assert!(SecretBox::load(&settings(Some("c2hvcnQ=".into()), None), false).is_err());
    }

    #[test]
    fn generates_a_private_key_file_once() {
        let dir = std::env::temp_dir().join(format!("gantry-key-{}", Uuid::new_v4().simple()));
        let path = dir.join("state/secrets.key");
        let s = settings(None, Some(path.clone()));
        assert!(
            SecretBox::load(&s, false).is_err(),
            "no generation when forbidden"
        );
        assert!(!path.exists());
        let a = SecretBox::load(&s, true).unwrap();
        assert!(matches!(a.source(), KeySource::Generated(_)));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = SecretBox::load(&s, true).unwrap();
        assert!(matches!(b.source(), KeySource::File(_)));
        let t = Uuid::new_v4();
        assert_eq!(b.open(t, "x", &a.seal(t, "x", "value")).unwrap(), "value");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            SecretBox::load(&s, true).is_err(),
            "a readable key file is refused"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
