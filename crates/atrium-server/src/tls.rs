//! The control plane over TLS, for clients that send credentials only
//! over TLS (kubectl and every client-go program among them). An Atrium
//! CA is made on first start (`<data-dir>/tls/ca.pem`, its key beside it,
//! 0600); each start issues the listener a certificate from it for
//! `localhost`, `127.0.0.1`, `::1` and any names it is told. Clients trust
//! the CA: a kubeconfig carries it.
//!
//! The same router serves both listeners; TLS handshakes run in tasks of
//! their own, so a client that never finishes one holds up no other.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client may take over its handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// The CA's distinguished name: the same at every start, so the
/// certificate issued from the kept key chains to the `ca.pem` clients
/// hold.
const CA_NAME: &str = "Atrium control plane CA";

#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

fn err(what: impl std::fmt::Display) -> TlsError {
    TlsError(what.to_string())
}

/// The CA and the listener's certificate.
pub struct Material {
    /// PEM of the CA certificate clients trust.
    pub ca_pem: String,
    config: Arc<rustls::ServerConfig>,
}

fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2045, 1, 1);
    Ok(params)
}

fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| err(format!("{}: {e}", path.display())))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| err(format!("{}: {e}", path.display())))
}

/// The Atrium CA: made on first use in `<data-dir>/tls` (its key 0600),
/// it issues the TLS listener's certificate and the sites' peer-link
/// certificates. Servers sharing a store must share these two files.
pub struct Authority {
    key: KeyPair,
    issuer: rcgen::Certificate,
    /// PEM of the CA certificate clients and peers trust.
    pub ca_pem: String,
}

/// How long a site certificate is valid; gateways renew at half of it, so
/// a revoked gateway credential stops working on the peer link within
/// this time at most.
pub const SITE_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Public key data a gateway sent: an uncompressed P-256 point.
struct P256PublicKey(Vec<u8>);

impl rcgen::PublicKeyData for P256PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl Authority {
    pub fn load(dir: &Path) -> Result<Authority, TlsError> {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
        let (key_path, ca_path): (PathBuf, PathBuf) = (dir.join("ca.key"), dir.join("ca.pem"));
        if !key_path.exists() {
            let key = KeyPair::generate().map_err(err)?;
            let ca = ca_params()?.self_signed(&key).map_err(err)?;
            write_private(&key_path, &key.serialize_pem())?;
            write_private(&ca_path, &ca.pem())?;
        }
        let read =
            |p: &Path| std::fs::read_to_string(p).map_err(|e| err(format!("{}: {e}", p.display())));
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(err)?;
        let ca_pem = read(&ca_path)?;
        let issuer = ca_params()?.self_signed(&key).map_err(err)?;
        Ok(Authority {
            key,
            issuer,
            ca_pem,
        })
    }

    /// A certificate for `site`'s peer link (server and client), for the
    /// public key in `public_key_hex`. The name in it is `site`'s, from
    /// the caller's credential: what the key's holder asks for plays no
    /// part.
    pub fn issue_site(&self, site: &str, public_key_hex: &str) -> Result<String, String> {
        let point = hex::decode(public_key_hex.trim())
            .ok()
            .filter(|p| p.len() == 65 && p[0] == 0x04)
            .ok_or("public_key must be an uncompressed P-256 point (65 bytes) in hex")?;
        let name = atrium_core::gateway::site_server_name(site);
        let mut params = CertificateParams::new(vec![name.clone()]).map_err(|e| e.to_string())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        // An hour back: peers' clocks may lag the control plane's.
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + SITE_CERTIFICATE_LIFETIME;
        let cert = params
            .signed_by(&P256PublicKey(point), &self.issuer, &self.key)
            .map_err(|e| e.to_string())?;
        Ok(cert.pem())
    }
}

/// The CA in `dir`, made on first use, and a certificate for the
/// listener naming `names` besides the loopback ones.
pub fn load(dir: &Path, names: &[String]) -> Result<Material, TlsError> {
    let authority = Authority::load(dir)?;
    let (ca_key, issuer, ca_pem) = (&authority.key, &authority.issuer, authority.ca_pem.clone());
    let mut sans = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    sans.extend(names.iter().cloned());
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    params.subject_alt_names = sans
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().map(SanType::DnsName).map_err(err),
        })
        .collect::<Result<_, _>>()?;
    params
        .distinguished_name
        .push(DnType::CommonName, "atrium control plane");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().map_err(err)?;
    let cert = params.signed_by(&key, issuer, ca_key).map_err(err)?;

    let chain = vec![cert.der().clone()];
    let private = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).map_err(err)?;
    // ring rather than aws-lc-rs (rustls' default, with post-quantum key
    // exchange): aws-lc-rs builds a C library with cmake, doubling this
    // crate's build. Its classical suites are what kubectl negotiates.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(err)?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(err)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Material {
        ca_pem,
        config: Arc::new(config),
    })
}

/// A listener of finished TLS connections, for `axum::serve`.
pub struct TlsListener {
    addr: SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    /// Accepts on `tcp`, handshaking each connection in a task of its own.
    pub fn new(tcp: TcpListener, material: &Material) -> std::io::Result<TlsListener> {
        let addr = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(material.config.clone());
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "tls accept");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (acceptor, done) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = done.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "tls handshake failed"),
                        Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(TlsListener { addr, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task ended (it never does while we hold the
            // receiver): wait forever rather than spin.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_kept_and_each_start_issues_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = load(dir.path(), &[]).unwrap();
        let second = load(dir.path(), &["cp.example".into()]).unwrap();
        assert_eq!(first.ca_pem, second.ca_pem, "clients keep trusting one CA");
        assert!(first.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_site_certificate_names_the_site_and_chains_to_the_ca() {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::load(dir.path()).unwrap();
        let key = KeyPair::generate().unwrap();
        let pem = authority
            .issue_site("eu-a", &hex::encode(key.public_key_raw()))
            .unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let ca = CertificateDer::from_pem_slice(authority.ca_pem.as_bytes()).unwrap();
        let anchor = webpki::anchor_from_trusted_cert(&ca).unwrap();
        let cert = webpki::EndEntityCert::try_from(&der).unwrap();
        let now = UnixTime::now();
        #[allow(deprecated)]
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        for usage in [
            webpki::KeyUsage::server_auth(),
            webpki::KeyUsage::client_auth(),
        ] {
            cert.verify_for_usage(
                algs.all,
                std::slice::from_ref(&anchor),
                &[],
                now,
                usage,
                None,
                None,
            )
            .unwrap();
        }
        let name = |s: &str| ServerName::try_from(s.to_string()).unwrap();
        assert!(cert
            .verify_is_valid_for_subject_name(&name("eu-a.site.atrium"))
            .is_ok());
        assert!(cert
            .verify_is_valid_for_subject_name(&name("eu-b.site.atrium"))
            .is_err());
        // Not a P-256 point: refused, nothing issued.
        for bad in [
            "",
            "04",
            "zz",
            &"ab".repeat(65),
            &format!("02{}", "ab".repeat(64)),
        ] {
            assert!(authority.issue_site("eu-a", bad).is_err(), "{bad}");
        }
    }
}
