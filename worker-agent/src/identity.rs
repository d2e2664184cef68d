//! The agent's identity, written by `register` and read by `run` and `deregister`: which
//! dispatcher it belongs to, its worker id, its credential and its own broker user. Stored as
//! JSON, created readable by the agent's user only (mode 0600 from the first byte).

use gantry_shared::api::BrokerCredentials;
use gantry_shared::ids::WorkerId;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identity {
    pub server: String,
    pub worker_id: WorkerId,
    pub name: String,
    pub token: String,
    pub namespace: String,
    /// The worker's own RabbitMQ user (absent in development mode).
    #[serde(default)]
    pub broker: Option<BrokerCredentials>,
}

pub fn path(home: &Path) -> PathBuf {
    home.join("identity.json")
}

pub fn load(home: &Path) -> anyhow::Result<Identity> {
    let p = path(home);
    let text = std::fs::read_to_string(&p).map_err(|e| {
        anyhow::anyhow!(
            "this agent is not registered ({}: {e}); run `gantry-agent register --server URL --api-key KEY --name NAME --pool POOL` first",
            p.display()
        )
    })?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{} is damaged: {e}", p.display()))
}

/// Write the identity: a new file created mode 0600 (the umask can only narrow it), never
/// widened, renamed over the old one. The home is created mode 0700 when it is new.
pub fn save(home: &Path, identity: &Identity) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(home)?;
    let p = path(home);
    let tmp = p.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(identity)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &p)?;
    Ok(())
}

pub fn remove(home: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path(home)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_identity_is_private_from_the_first_byte() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        let id = Identity {
            server: "http://127.0.0.1:1".into(),
            worker_id: WorkerId::from(uuid::Uuid::new_v4()),
            name: "w".into(),
            token: "secret-token".into(),
            namespace: "ns".into(),
            broker: None,
        };
        save(&home, &id).unwrap();
        save(&home, &id).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path(&home)), 0o600);
        assert_eq!(mode(&home), 0o700);
        assert_eq!(load(&home).unwrap().token, "secret-token");
    }
}
