//! The node's sealer: the relay between its tenants' VXLAN interfaces and
//! its peers at other sites.
//!
//! For each such peer it holds a socket on loopback; the tenants'
//! forwarding entries send that peer's frames there, and the sealer sends
//! them on sealed (`seal`) to the peer's sealed endpoint. What arrives on
//! the node's own sealed endpoint is opened with the link of the sender it
//! names and handed, in the clear, to the node's VXLAN port on loopback —
//! which the overlay firewall opens to loopback and the site's peers only.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use super::seal::{self, Keys, Link};

/// Largest datagram relayed: a VXLAN frame of a 9000-byte jumbo MTU with
/// its headers, sealed.
const MAX_DATAGRAM: usize = 9216;

/// A peer at another site, as the node record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemotePeer {
    pub index: u32,
    pub public_key: [u8; 32],
    pub sealed: SocketAddr,
}

struct PeerLink {
    /// The key the link was agreed with: a new one needs a new link.
    public_key: [u8; 32],
    link: Arc<Mutex<Outbound>>,
    /// Where its frames come from the tenants' interfaces.
    local_port: u16,
    outbound: JoinHandle<()>,
}

/// A peer's link and where its sealed datagrams go (moved by `set_peers`
/// when the peer moves): one lock for each frame sealed.
struct Outbound {
    link: Link,
    to: SocketAddr,
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        self.outbound.abort();
    }
}

pub struct Sealer {
    keys: Keys,
    index: u32,
    session: u64,
    /// The node's underlay address: what its VXLAN interfaces send from.
    local: Ipv4Addr,
    public: Arc<UdpSocket>,
    links: Arc<Mutex<HashMap<u32, PeerLink>>>,
    inbound: JoinHandle<()>,
}

impl Drop for Sealer {
    fn drop(&mut self) {
        self.inbound.abort();
    }
}

impl Sealer {
    /// Starts opening what arrives on the sealed endpoint (bound at the
    /// agent's start, non-blocking).
    pub async fn start(
        keys: Keys,
        index: u32,
        session: u64,
        sealed: std::net::UdpSocket,
        local: Ipv4Addr,
        vxlan_port: u16,
    ) -> std::io::Result<Sealer> {
        let public = Arc::new(UdpSocket::from_std(sealed)?);
        let inject = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        inject.connect((Ipv4Addr::LOCALHOST, vxlan_port)).await?;
        let links: Arc<Mutex<HashMap<u32, PeerLink>>> = Arc::default();
        let inbound = tokio::spawn(open_arriving(public.clone(), links.clone(), inject));
        Ok(Sealer {
            keys,
            index,
            session,
            local,
            public,
            links,
            inbound,
        })
    }

    /// Keeps a link to exactly `peers`; returns the loopback port each
    /// peer's frames go to. A peer whose key changed gets a new link; one
    /// that only moved keeps its link (and its counters).
    pub async fn set_peers(&self, peers: &[RemotePeer]) -> HashMap<u32, u16> {
        let mut kept = HashMap::new();
        let mut fresh = Vec::new();
        {
            let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
            links.retain(|index, l| {
                peers
                    .iter()
                    .any(|p| p.index == *index && p.public_key == l.public_key)
            });
            for p in peers {
                match links.get_mut(&p.index) {
                    Some(l) => {
                        l.link.lock().unwrap_or_else(|p| p.into_inner()).to = p.sealed;
                        kept.insert(p.index, l.local_port);
                    }
                    None => fresh.push(*p),
                }
            }
        }
        for p in fresh {
            let Some(link) = Link::new(&self.keys, self.index, self.session, p.public_key) else {
                tracing::warn!(
                    peer = p.index,
                    "overlay: peer's key agrees no secret; skipped"
                );
                continue;
            };
            let socket = match UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "overlay: cannot open a sealer port");
                    continue;
                }
            };
            let Ok(local_port) = socket.local_addr().map(|a| a.port()) else {
                continue;
            };
            let link = Arc::new(Mutex::new(Outbound { link, to: p.sealed }));
            let outbound = tokio::spawn(seal_leaving(
                socket,
                self.local,
                link.clone(),
                self.public.clone(),
            ));
            let entry = PeerLink {
                public_key: p.public_key,
                link,
                local_port,
                outbound,
            };
            self.links
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(p.index, entry);
            kept.insert(p.index, local_port);
        }
        kept
    }
}

/// Seals each frame the tenants' interfaces send for one peer and sends
/// it to the peer's sealed endpoint (as last recorded).
async fn seal_leaving(
    socket: UdpSocket,
    local: Ipv4Addr,
    link: Arc<Mutex<Outbound>>,
    public: Arc<UdpSocket>,
) {
    let (mut buf, mut sealed) = (vec![0u8; MAX_DATAGRAM], Vec::with_capacity(MAX_DATAGRAM));
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        // Only the node's own VXLAN interfaces send from its address.
        if from.ip() != std::net::IpAddr::V4(local) {
            continue;
        }
        let to = {
            let mut out = link.lock().unwrap_or_else(|p| p.into_inner());
            out.link.seal(&buf[..n], &mut sealed);
            out.to
        };
        let _ = public.send_to(&sealed, to).await;
    }
}

/// Opens what arrives on the sealed endpoint and hands it to the VXLAN
/// port; drops whatever no link opens.
async fn open_arriving(
    public: Arc<UdpSocket>,
    links: Arc<Mutex<HashMap<u32, PeerLink>>>,
    inject: UdpSocket,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut refused: u64 = 0;
    loop {
        let Ok((n, from)) = public.recv_from(&mut buf).await else {
            continue;
        };
        let datagram = &mut buf[..n];
        let link = seal::sender_of(datagram).and_then(|sender| {
            links
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&sender)
                .map(|l| l.link.clone())
        });
        let frame = link.and_then(|link| {
            let mut out = link.lock().unwrap_or_else(|p| p.into_inner());
            out.link.open(datagram).ok().map(<[u8]>::len)
        });
        match frame {
            // Opened in place, after the header.
            Some(len) => {
                let _ = inject.send(&buf[seal::HEADER..seal::HEADER + len]).await;
            }
            None => {
                refused += 1;
                // Logged sparingly: a flood of forgeries must not flood
                // the log too.
                if refused.is_power_of_two() {
                    tracing::warn!(%from, refused, "overlay: sealed datagrams refused");
                }
            }
        }
    }
}
