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

pub fn save(home: &Path, identity: &Identity) -> anyhow::Result<()> {
    std::fs::create_dir_all(home)?;
    let p = path(home);
    let tmp = p.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(identity)?)?;
        f.sync_all()?;
    }
    // A umask can only narrow the mode; make sure of it anyway.
    set_private(&tmp)?;
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

fn set_private(p: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))
}
