//! Where the agent keeps its TLS material: `<data_dir>/tls/` — `ca.pem`
//! (the cluster CA's certificate), `ca.key` (its key, voters only),
//! `node.pem` and `node.key` (this node's) — and the first admin token,
//! `<data_dir>/admin.token`. Keys and tokens are written mode 0600 through
//! a temporary file and a rename, so a crash never leaves half a key.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::pki::{CaMaterial, NodeMaterial};

#[derive(Debug, Clone)]
pub struct TlsFiles {
    dir: PathBuf,
}

fn write_private(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_opt(path: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl TlsFiles {
    pub fn new(data_dir: &Path) -> TlsFiles {
        TlsFiles { dir: data_dir.join("tls") }
    }

    fn ensure_dir(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
    }

    pub fn ca_pem(&self) -> std::io::Result<Option<String>> {
        read_opt(&self.dir.join("ca.pem"))
    }

    pub fn ca_key(&self) -> std::io::Result<Option<CaMaterial>> {
        let (Some(cert_pem), Some(key_pem)) =
            (read_opt(&self.dir.join("ca.pem"))?, read_opt(&self.dir.join("ca.key"))?)
        else {
            return Ok(None);
        };
        Ok(Some(CaMaterial { cert_pem, key_pem }))
    }

    pub fn node(&self) -> std::io::Result<Option<NodeMaterial>> {
        let (Some(cert_pem), Some(key_pem)) =
            (read_opt(&self.dir.join("node.pem"))?, read_opt(&self.dir.join("node.key"))?)
        else {
            return Ok(None);
        };
        Ok(Some(NodeMaterial { cert_pem, key_pem }))
    }

    pub fn save_ca_cert(&self, ca_pem: &str) -> std::io::Result<()> {
        self.ensure_dir()?;
        write_private(&self.dir.join("ca.pem"), ca_pem, 0o644)
    }

    pub fn save_ca_key(&self, ca: &CaMaterial) -> std::io::Result<()> {
        self.save_ca_cert(&ca.cert_pem)?;
        write_private(&self.dir.join("ca.key"), &ca.key_pem, 0o600)
    }

    /// A voter that lost its vote keeps no CA key.
    pub fn drop_ca_key(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.dir.join("ca.key")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    pub fn save_node(&self, node: &NodeMaterial) -> std::io::Result<()> {
        self.ensure_dir()?;
        write_private(&self.dir.join("node.key"), &node.key_pem, 0o600)?;
        write_private(&self.dir.join("node.pem"), &node.cert_pem, 0o644)
    }

    /// Everything, when the node leaves its cluster.
    pub fn wipe(&self) -> std::io::Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Writes the first admin token beside the data, mode 0600.
pub fn save_admin_token(data_dir: &Path, token: &str) -> std::io::Result<PathBuf> {
    let path = data_dir.join("admin.token");
    write_private(&path, &format!("{token}\n"), 0o600)?;
    Ok(path)
}
