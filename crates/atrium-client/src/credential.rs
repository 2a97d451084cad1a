//! A plane's credential as its process keeps it: a small JSON file, 0600,
//! replaced whole by rename (so a reader never sees half of one). The
//! agent keeps `<data-dir>/node.credential`, a gateway
//! `<data-dir>/gateway/gateway.credential`. Made by joining with a
//! one-time join token; rotated in place.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use atrium_api::IssuedCredential;
use atrium_core::plane::Plane;
use serde::{Deserialize, Serialize};

use crate::ClientError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialFile {
    /// The control plane it is for.
    pub server: String,
    /// The credential's id (for rotation).
    pub id: String,
    /// `atrn_…` or `atrg_…`.
    pub token: String,
    pub plane: Plane,
    /// The node's (or gateway's) name and its site.
    pub name: String,
    pub site: String,
}

impl CredentialFile {
    fn from_issued(server: &str, issued: IssuedCredential) -> CredentialFile {
        CredentialFile {
            server: server.trim_end_matches('/').to_string(),
            id: issued.credential.id,
            token: issued.secret,
            plane: issued.credential.spec.plane,
            name: issued.credential.spec.name,
            site: issued.credential.spec.site,
        }
    }

    /// The file at `path`; `None` if there is none.
    pub fn load(path: &Path) -> io::Result<Option<CredentialFile>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        }
    }

    /// Writes the file (0600) beside its final name, then renames it in.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        write_private(
            path,
            &serde_json::to_vec_pretty(self).map_err(io::Error::other)?,
        )
    }

    /// Exchanges a one-time join token for a credential.
    /// `name`: the joiner's, for a join token that names none.
    pub async fn join(
        server: &str,
        join_token: &str,
        name: Option<&str>,
    ) -> Result<CredentialFile, ClientError> {
        let body = atrium_api::JoinRequest {
            name: name.map(str::to_string),
        };
        let issued = crate::ControlPlane::new(server, join_token)
            .request(reqwest::Method::POST, "/v1/join", Some(&body))
            .await?;
        Ok(CredentialFile::from_issued(server, issued))
    }

    /// A new secret for this credential; the old one stops working.
    pub async fn rotate(&self) -> Result<CredentialFile, ClientError> {
        let path = format!("/v1/credentials/{}/rotate", self.id);
        let issued = post_as(&self.server, &self.token, &path).await?;
        Ok(CredentialFile::from_issued(&self.server, issued))
    }
}

/// Writes `bytes` to `path`, readable by its owner only (0600, whatever a
/// leftover file had), through a file beside it renamed into place once it
/// is on disk: a reader never sees half of it.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("new");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

async fn post_as(server: &str, token: &str, path: &str) -> Result<IssuedCredential, ClientError> {
    crate::ControlPlane::new(server, token)
        .request(reqwest::Method::POST, path, None::<&()>)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_saved_credential_reads_back_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/node.credential");
        assert_eq!(CredentialFile::load(&path).unwrap(), None);
        let c = CredentialFile {
            server: "http://127.0.0.1:7070".into(),
            id: "crd1".into(),
            token: "atrn_crd1_s".into(),
            plane: Plane::Node,
            name: "n1".into(),
            site: "local".into(),
        };
        c.save(&path).unwrap();
        assert_eq!(CredentialFile::load(&path).unwrap(), Some(c));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&path, "{").unwrap();
        assert!(CredentialFile::load(&path).is_err());
    }
}
