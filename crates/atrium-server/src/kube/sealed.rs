//! Secrets of tenant clusters are encrypted at rest. The control plane
//! keeps one master key (`<data-dir>/kube-secrets.key`, 32 random bytes,
//! 0600, made on first start); each tenant's key is derived from it with
//! HKDF-SHA256 and the tenant's name, so no two tenants share a key. A
//! secret's `data` is stored as `encryptedData` — AES-256-GCM under the
//! tenant's key, a random nonce, and the object's cluster, namespace and
//! name as associated data, so a sealed value moved to another object (or
//! another tenant's store row) does not open. The store, its change log
//! and its backups never hold a secret's values in clear.
//!
//! What is not covered: the master key sits beside the database on the
//! control plane's disk (a KMS is the next step), and values are in clear
//! in the control plane's memory while it serves them.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf::{Salt, HKDF_SHA256};
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::{json, Value};

use atrium_kube::KubeError;

const SALT: &[u8] = b"atrium kube secrets v1";
const TOKEN_SALT: &[u8] = b"atrium kube service account tokens v1";
const VERSION: &str = "v1:";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The master key, from which each tenant's is derived.
pub struct Sealer {
    master: [u8; 32],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the secrets key {path}: {why}")]
pub struct KeyError {
    path: String,
    why: String,
}

impl Sealer {
    /// The master key in `path`, made (0600) if there is none.
    pub fn load(path: &Path) -> Result<Sealer, KeyError> {
        let fail = |why: String| KeyError {
            path: path.display().to_string(),
            why,
        };
        if !path.exists() {
            let mut key = [0u8; 32];
            SystemRandom::new()
                .fill(&mut key)
                .map_err(|_| fail("no randomness".into()))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| fail(e.to_string()))?;
            f.write_all(&key)
                .and_then(|()| f.sync_all())
                .map_err(|e| fail(e.to_string()))?;
        }
        let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        let master: [u8; 32] = bytes
            .try_into()
            .map_err(|_| fail("is not 32 bytes".into()))?;
        Ok(Sealer { master })
    }

    fn key(&self, tenant: &str) -> Result<LessSafeKey, KubeError> {
        let prk = Salt::new(HKDF_SHA256, SALT).extract(&self.master);
        let info = [tenant.as_bytes()];
        let okm = prk
            .expand(&info, &AES_256_GCM)
            .map_err(|_| KubeError::internal("cannot derive the tenant's key"))?;
        let key = UnboundKey::from(okm);
        Ok(LessSafeKey::new(key))
    }

    /// The key service account tokens are signed with: derived from the
    /// master key under a salt of its own, so it is no tenant's key.
    pub fn token_key(&self) -> Result<ring::hmac::Key, KubeError> {
        let prk = Salt::new(HKDF_SHA256, TOKEN_SALT).extract(&self.master);
        prk.expand(&[b"hmac"], ring::hmac::HMAC_SHA256)
            .map(ring::hmac::Key::from)
            .map_err(|_| KubeError::internal("cannot derive the token key"))
    }

    /// `secret` with its `data` sealed into `encryptedData`, bound to
    /// `place` (cluster, namespace and name).
    pub fn seal(&self, tenant: &str, place: &str, mut secret: Value) -> Result<Value, KubeError> {
        let Some(data) = secret.as_object_mut().and_then(|o| o.remove("data")) else {
            return Ok(secret);
        };
        let mut plain =
            serde_json::to_vec(&data).map_err(|e| KubeError::internal(e.to_string()))?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KubeError::internal("no randomness"))?;
        self.key(tenant)?
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(place.as_bytes()),
                &mut plain,
            )
            .map_err(|_| KubeError::internal("cannot seal the secret"))?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&plain);
        secret["encryptedData"] = json!(format!("{VERSION}{}", B64.encode(sealed)));
        Ok(secret)
    }

    /// `stored` with its `encryptedData` opened back into `data`.
    pub fn open(&self, tenant: &str, place: &str, mut stored: Value) -> Result<Value, KubeError> {
        let Some(Value::String(text)) = stored
            .as_object_mut()
            .and_then(|o| o.remove("encryptedData"))
        else {
            return Ok(stored);
        };
        let broken = || KubeError::internal("a stored secret does not open with its tenant's key");
        let raw = text
            .strip_prefix(VERSION)
            .and_then(|b| B64.decode(b).ok())
            .filter(|r| r.len() > NONCE_LEN)
            .ok_or_else(broken)?;
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| broken())?;
        let mut sealed = sealed.to_vec();
        let plain = self
            .key(tenant)?
            .open_in_place(nonce, Aad::from(place.as_bytes()), &mut sealed)
            .map_err(|_| broken())?;
        stored["data"] = serde_json::from_slice(plain).map_err(|_| broken())?;
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_only_for_its_tenant_and_place() {
        let dir = tempfile::tempdir().unwrap();
        let sealer = Sealer::load(&dir.path().join("k")).unwrap();
        let secret = json!({"kind": "Secret", "data": {"password": "aHVudGVyMg=="}});
        let sealed = sealer.seal("acme", "c/ns/db", secret.clone()).unwrap();
        assert!(sealed.get("data").is_none());
        assert!(!sealed.to_string().contains("aHVudGVyMg"));
        assert_eq!(
            sealer.open("acme", "c/ns/db", sealed.clone()).unwrap(),
            secret
        );
        assert!(
            sealer.open("globex", "c/ns/db", sealed.clone()).is_err(),
            "another tenant's key"
        );
        assert!(
            sealer.open("acme", "c/ns/other", sealed).is_err(),
            "moved to another object"
        );
        // The key is kept: a restarted control plane opens what it sealed.
        let again = Sealer::load(&dir.path().join("k")).unwrap();
        let sealed = sealer.seal("acme", "p", secret.clone()).unwrap();
        assert_eq!(again.open("acme", "p", sealed).unwrap(), secret);
    }
}
