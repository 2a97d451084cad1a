//! The peer link's listener: other sites' gateways connect here over TLS
//! with a certificate from the Atrium CA, probe this gateway's state and
//! send it the requests they forward. A request says which site it entered
//! at (`x-atrium-ingress-site`); it is believed only when the connection's
//! certificate was issued to that site, so no tenant — who can reach only
//! the public listener, where the header is ignored — and no other site can
//! claim an ingress it is not.
//!
//! A forwarded request is served here or refused: never forwarded again,
//! so no request travels in a loop or past the site its ingress chose.

use std::sync::Arc;
use std::time::Duration;

use atrium_core::gateway::site_server_name;
use rustls::pki_types::{CertificateDer, ServerName};
use std::future::Future;

use tokio::net::{TcpListener, TcpStream};

use crate::peers::{PeerState, StateQuery, STATE_PATH};
use crate::refusal::Refusal;
use crate::server::{self, Request, Response};
use crate::{proxy, Gateway, PROXIED};

/// How long a peer may take over its handshake.
const HANDSHAKE: Duration = Duration::from_secs(5);
/// Connections held at once. Anyone who can reach the port can open one
/// and sit in its handshake for `HANDSHAKE`; past this, new ones are
/// closed at once (peers pool a few connections each).
const MAX_CONNECTIONS: usize = 1024;

/// Accepts peers' connections forever; each is handshaken and served in a
/// task of its own. Until this gateway holds a certificate, connections
/// are closed at once.
pub async fn serve(listener: TcpListener, g: Arc<Gateway>) {
    accept_capped(listener, MAX_CONNECTIONS, move |tcp| {
        let g = g.clone();
        async move {
            let Some(tls) = g.peers.tls() else { return };
            let stream = match tokio::time::timeout(HANDSHAKE, tls.acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "gateway: peer handshake refused");
                    return;
                }
                Err(_) => return,
            };
            // The verifier required one, chained to the Atrium CA.
            let Some(cert) = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned())
            else {
                return;
            };
            let cert = Arc::new(cert);
            server::connection(
                stream,
                move |request| handle(g.clone(), cert.clone(), request),
                crate::body_limit,
                server::Timeouts::default(),
            )
            .await;
        }
    })
    .await
}

/// Accepts forever, running `each` on every connection in a task of its
/// own while fewer than `max` run; past that, a new one is closed at once.
async fn accept_capped<F, Fut>(listener: TcpListener, max: usize, each: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let room = Arc::new(tokio::sync::Semaphore::new(max));
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "gateway: peer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(place) = room.clone().try_acquire_owned() else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let work = each(tcp);
        tokio::spawn(async move {
            work.await;
            drop(place);
        });
    }
}

/// Whether `cert` was issued to `site`'s gateways.
fn certifies(cert: &CertificateDer<'_>, site: &str) -> bool {
    let Ok(name) = ServerName::try_from(site_server_name(site)) else {
        return false;
    };
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|c| c.verify_is_valid_for_subject_name(&name).is_ok())
}

async fn handle(g: Arc<Gateway>, cert: Arc<CertificateDer<'static>>, request: Request) -> Response {
    let ingress = request
        .head
        .ingress_site
        .clone()
        .filter(|site| certifies(&cert, site));
    let Some(ingress) = ingress else {
        return Refusal::PeerForbidden.into_response();
    };
    let path = request.head.path.as_str();
    if path == STATE_PATH {
        return state(&g, &request);
    }
    match PROXIED.iter().copied().find(|r| *r == path) {
        Some(route) => {
            let origin = proxy::Origin::Peer {
                ingress,
                request_id: request.head.request_id.clone(),
            };
            proxy::proxy(&g, route, request, origin).await
        }
        None => Refusal::NoRoute.into_response(),
    }
}

/// A probe's answer: this site, its load, and its ready set if the asker's
/// is out of date.
fn state(g: &Gateway, request: &Request) -> Response {
    let known = serde_json::from_slice::<StateQuery>(&request.body).map_or(0, |q| q.known);
    let Ok(routes) = g.routes.read() else {
        return Refusal::Internal("route table unavailable").into_response();
    };
    let (version, ready) = routes.ready_deployments(known);
    let in_flight = routes.replica_states().iter().map(|(_, n, _)| n).sum();
    Response::json(
        200,
        &PeerState {
            site: g.site.clone(),
            in_flight,
            version,
            ready,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::peer_tls;
    use atrium_api::SiteCertificate;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A CA, and a function issuing `site`'s peer-link certificate and its
    /// key from it, as the control plane does.
    fn authority() -> impl Fn(&str) -> (SiteCertificate, Vec<u8>) {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        move |site| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(vec![site_server_name(site)]).unwrap();
            params.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
            let issued = SiteCertificate {
                certificate_pem: cert.pem(),
                ca_pem: ca.pem(),
                valid_for_s: 3600,
            };
            (issued, key.serialize_der())
        }
    }

    #[test]
    fn a_certificate_proves_only_its_own_site() {
        let issue = authority();
        let (eu_b, _) = issue("eu-b");
        let der =
            rustls::pki_types::pem::PemObject::from_pem_slice(eu_b.certificate_pem.as_bytes())
                .unwrap();
        assert!(certifies(&der, "eu-b"));
        assert!(!certifies(&der, "eu-a"));
        assert!(!certifies(&der, "eu-b.site.atrium"));
        assert!(!certifies(&der, ""));
    }

    /// The server side of the link: one handshake, then echoes what the
    /// client says; `None` when the handshake was refused.
    async fn one_peer(
        acceptor: tokio_rustls::TlsAcceptor,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            match acceptor.accept(tcp).await {
                Ok(mut s) => {
                    let mut b = [0u8; 2];
                    let _ = s.read_exact(&mut b).await;
                    let _ = s.write_all(&b).await;
                    let _ = s.flush().await;
                    true
                }
                Err(_) => false,
            }
        });
        (addr, task)
    }

    #[tokio::test]
    async fn the_link_takes_only_certificates_of_its_ca_and_the_site_chosen() {
        let issue = authority();
        let (a, a_key) = issue("eu-a");
        let (b, b_key) = issue("eu-b");
        let (eu_a, eu_b) = (peer_tls(&a, &a_key).unwrap(), peer_tls(&b, &b_key).unwrap());
        let connect = |addr, tls: &crate::peers::PeerTls, site: &str| {
            let connector = tls.connector.clone();
            let name = ServerName::try_from(site_server_name(site)).unwrap();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let mut s = connector.connect(name, tcp).await.ok()?;
                s.write_all(b"hi").await.ok()?;
                s.flush().await.ok()?;
                let mut b = [0u8; 2];
                s.read_exact(&mut b).await.ok()?;
                Some(b)
            }
        };
        // eu-a reaches eu-b, proving eu-b's name and its own.
        let (addr, server) = one_peer(eu_b.acceptor.clone()).await;
        assert_eq!(connect(addr, &eu_a, "eu-b").await, Some(*b"hi"));
        assert!(server.await.unwrap());
        // A gateway that expects eu-c refuses eu-b's certificate.
        let (addr, _server) = one_peer(eu_b.acceptor.clone()).await;
        assert_eq!(connect(addr, &eu_a, "eu-c").await, None);
        // A client whose certificate another CA issued is refused.
        let rogue = authority();
        let (r, r_key) = rogue("eu-a");
        let rogue = peer_tls(&r, &r_key).unwrap();
        let (addr, server) = one_peer(eu_b.acceptor.clone()).await;
        assert_eq!(connect(addr, &rogue, "eu-b").await, None);
        assert!(!server.await.unwrap());
        // A client with no certificate at all is refused.
        let (addr, server) = one_peer(eu_b.acceptor.clone()).await;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::pem::PemObject::from_pem_slice(b.ca_pem.as_bytes()).unwrap())
            .unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let anonymous = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let anonymous = crate::peers::PeerTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(anonymous)),
            acceptor: eu_b.acceptor.clone(),
        };
        assert_eq!(connect(addr, &anonymous, "eu-b").await, None);
        assert!(!server.await.unwrap());
    }

    /// Anyone can reach the port and sit in a handshake: past the cap, new
    /// connections are closed at once, and room comes back as they end.
    #[tokio::test]
    async fn connections_past_the_cap_are_closed_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(accept_capped(
            listener,
            2,
            |mut tcp: TcpStream| async move {
                // Holds the connection until the client closes it.
                let mut b = [0u8; 1];
                let _ = tcp.read(&mut b).await;
            },
        ));
        let closed_at_once = |mut c: tokio::net::TcpStream| async move {
            let mut b = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_millis(300), c.read(&mut b)).await;
            (matches!(read, Ok(Ok(0)) | Ok(Err(_))), c)
        };
        let a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let b = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let third = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_at_once(third).await.0,
            "a third connection is closed"
        );
        let (held, a) = closed_at_once(a).await;
        assert!(!held, "the first two stay open");
        drop((a, b));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let again = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(!closed_at_once(again).await.0, "room came back");
    }
}
