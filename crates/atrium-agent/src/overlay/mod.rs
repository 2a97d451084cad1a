//! Tenant overlays on this node (`atrium_core::overlay`): VXLAN, one VNI
//! per tenant, in the kernel — and, between sites, sealed by this agent.
//!
//! Why VXLAN and not WireGuard between nodes: a tenant needs its own
//! network across nodes, and a VNI per tenant gives exactly that in the
//! kernel — frames of one VNI reach only that tenant's interfaces — with
//! no per-packet work in userspace inside a site. Between sites the
//! underlay is not the provider's to trust, and this kernel has neither
//! WireGuard nor IPsec, so frames for another site's nodes go through the
//! agent's sealer (`sealer`, `seal`): authenticated encryption under keys
//! agreed between the two nodes, refusing forgeries and replays.
//!
//! The agent registers its overlay endpoint (an index unique in the
//! fleet, its VXLAN and sealed endpoints, its public key) with its node;
//! every few seconds it reads the other nodes' and keeps each of its
//! tenants' namespaces joined to all of them (`sandbox::overlay`).

pub mod netlink;
pub mod seal;
mod sealer;

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use atrium_api::Node;
use atrium_client::Api;
use atrium_core::overlay::NodeOverlay;

use crate::sandbox::overlay::{OverlayLink, PeerRoute};
use crate::sandbox::TenantSlot;
use crate::supervisor::Shared;
use crate::AgentError;
use sealer::{RemotePeer, Sealer};

/// How often the peers are read and the tenants' overlays checked.
const EVERY: Duration = Duration::from_secs(2);

/// Where this node takes part in overlays (`--overlay-address`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayConfig {
    /// The node's address its peers reach (the underlay).
    pub address: Ipv4Addr,
    pub vxlan_port: u16,
    pub sealed_port: u16,
}

/// This node's overlay key and the session of this start.
pub struct Identity {
    secret: [u8; 32],
    pub public: [u8; 32],
    /// Greater than every earlier start's: peers refuse datagrams of
    /// older sessions.
    pub session: u64,
}

/// What the agent holds for its overlays from its start: its identity,
/// and its sealed endpoint, bound before it registers (a port taken is an
/// error at start, not a silent overlay that never works).
pub struct Prepared {
    pub identity: Identity,
    sealed: std::net::UdpSocket,
}

/// Loads the node's key (made on first start, 0600) and begins a session.
pub fn load_identity(dir: &Path) -> std::io::Result<Identity> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(dir)?;
    let key_path = dir.join("overlay.key");
    let secret: [u8; 32] = match std::fs::read(&key_path) {
        Ok(bytes) => bytes.try_into().map_err(|_| {
            std::io::Error::other(format!("{} is not a 32-byte key", key_path.display()))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut secret = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
                .map_err(|_| std::io::Error::other("no randomness for the overlay key"))?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&key_path)?;
            file.write_all(&secret)?;
            file.sync_all()?;
            secret
        }
        Err(e) => return Err(e),
    };
    let session_path = dir.join("overlay.session");
    let last: u64 = std::fs::read_to_string(&session_path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let session = now.max(last.saturating_add(1));
    std::fs::write(&session_path, session.to_string())?;
    let public = seal::Keys::from_secret(secret).public;
    Ok(Identity {
        secret,
        public,
        session,
    })
}

/// This node's overlay identity, or why it cannot carry overlays: they
/// need root (interfaces in tenants' namespaces) and the firewall (without
/// it, the VXLAN port would take frames from anyone on the underlay).
pub(crate) fn prepare(
    config: &crate::AgentConfig,
    host: &crate::sandbox::Host,
    at: &OverlayConfig,
) -> Result<Prepared, AgentError> {
    if !host.root || host.netns.is_err() {
        return Err(AgentError::Overlay(
            "--overlay-address needs the agent to run as root with network namespaces".into(),
        ));
    }
    if let Err(why) = &host.firewall {
        return Err(AgentError::Overlay(format!(
            "--overlay-address needs the firewall ({why}): install nftables"
        )));
    }
    if at.vxlan_port == at.sealed_port {
        return Err(AgentError::Overlay(
            "--overlay-port and --overlay-sealed-port must differ".into(),
        ));
    }
    let identity = load_identity(&config.state_dir()).map_err(|e| {
        AgentError::Overlay(format!("key in {}: {e}", config.state_dir().display()))
    })?;
    let at = SocketAddr::from((at.address, at.sealed_port));
    let sealed = std::net::UdpSocket::bind(at)
        .and_then(|s| s.set_nonblocking(true).map(|()| s))
        .map_err(|e| AgentError::Overlay(format!("cannot bind the sealed endpoint {at}: {e}")))?;
    Ok(Prepared { identity, sealed })
}

/// The index this node registers with: the one it has, else one above
/// the highest any node has (the control plane refuses a taken one, and
/// registration is retried).
pub fn choose_index<'a>(nodes: impl IntoIterator<Item = (&'a str, Option<u32>)>, own: &str) -> u32 {
    let mut highest = 0;
    for (name, index) in nodes {
        match index {
            Some(i) if name == own => return i,
            Some(i) => highest = highest.max(i),
            None => {}
        }
    }
    highest.saturating_add(1)
}

/// The endpoint this node registers.
pub fn endpoint(config: &OverlayConfig, identity: &Identity, index: u32) -> NodeOverlay {
    NodeOverlay {
        index,
        vxlan: SocketAddr::from((config.address, config.vxlan_port)),
        sealed: SocketAddr::from((config.address, config.sealed_port)),
        public_key: hex::encode(identity.public),
    }
}

/// A node's overlay as this one reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub site: String,
    pub overlay: NodeOverlay,
}

/// Where each peer's frames go: same-site peers' own VXLAN endpoints;
/// other sites' through the sealer's loopback port for them (`sealed`; a
/// peer without one yet is left out).
pub fn routes(own_site: &str, peers: &[Peer], sealed: &HashMap<u32, u16>) -> Vec<PeerRoute> {
    let mut out: Vec<PeerRoute> = peers
        .iter()
        .filter_map(|p| {
            if p.site == own_site {
                let SocketAddr::V4(v) = p.overlay.vxlan else {
                    return None;
                };
                Some(PeerRoute {
                    index: p.overlay.index,
                    dst: *v.ip(),
                    port: v.port(),
                })
            } else {
                sealed.get(&p.overlay.index).map(|port| PeerRoute {
                    index: p.overlay.index,
                    dst: Ipv4Addr::LOCALHOST,
                    port: *port,
                })
            }
        })
        .collect();
    out.sort();
    out
}

/// The addresses the node's VXLAN port takes frames from besides its
/// sealer: its own site's peers.
fn site_neighbours(own_site: &str, peers: &[Peer]) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = peers
        .iter()
        .filter(|p| p.site == own_site)
        .filter_map(|p| match p.overlay.vxlan {
            SocketAddr::V4(v) => Some(*v.ip()),
            SocketAddr::V6(_) => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Runs this node's overlays until dropped: once the node is registered
/// with `index`, keeps the sealer's links and every tenant namespace's
/// overlay joined to the other nodes.
pub async fn run(shared: Arc<Shared>, config: OverlayConfig, prepared: Prepared, index: u32) {
    let Prepared { identity, sealed } = prepared;
    let keys = seal::Keys::from_secret(identity.secret);
    let sealer = match Sealer::start(
        keys,
        index,
        identity.session,
        sealed,
        config.address,
        config.vxlan_port,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "overlay: cannot start the sealer; tenants' overlays stay down");
            return;
        }
    };
    let own_site = shared.config.credential.site.clone();
    let own_name = shared.config.node_name().to_string();
    let mut joined = Joined::new();
    let mut firewall: Option<Vec<Ipv4Addr>> = None;
    loop {
        match Api::<Node>::all(&shared.cp).list().await {
            Ok(nodes) => {
                let peers: Vec<Peer> = nodes
                    .0
                    .into_iter()
                    .filter(|n| n.name != own_name)
                    .filter_map(|n| {
                        let overlay = n.spec.overlay?;
                        (overlay.index != index).then_some(Peer {
                            site: n.spec.site,
                            overlay,
                        })
                    })
                    .collect();
                let remote: Vec<RemotePeer> = peers
                    .iter()
                    .filter(|p| p.site != own_site)
                    .filter_map(|p| {
                        Some(RemotePeer {
                            index: p.overlay.index,
                            public_key: p.overlay.public_key_bytes()?,
                            sealed: p.overlay.sealed,
                        })
                    })
                    .collect();
                let ports = sealer.set_peers(&remote).await;
                let routes = routes(&own_site, &peers, &ports);
                let neighbours = site_neighbours(&own_site, &peers);
                if firewall.as_ref() != Some(&neighbours) {
                    let (host, from) = (shared.host.clone(), neighbours.clone());
                    let port = config.vxlan_port;
                    match tokio::task::spawn_blocking(move || {
                        host.apply_overlay_firewall(port, &from)
                    })
                    .await
                    {
                        Ok(Ok(())) => firewall = Some(neighbours),
                        Ok(Err(why)) => tracing::warn!(%why, "overlay: firewall not applied"),
                        Err(e) => tracing::warn!(error = %e, "overlay: firewall task failed"),
                    }
                }
                join_tenants(&shared, &config, index, &routes, &mut joined).await;
            }
            Err(e) => tracing::debug!(error = %e, "overlay: cannot read the nodes; retrying"),
        }
        tokio::time::sleep(EVERY).await;
    }
}

/// The tenants with a namespace on this node and an overlay: their slot
/// and VNI.
fn tenants_here(shared: &Shared) -> BTreeMap<String, (u32, u32)> {
    shared.state.read(|s| {
        s.assigned
            .values()
            .filter_map(|a| {
                let vni = a.spec.overlay_vni?;
                let slot = *s.tenant_slots.get(&a.tenant)?;
                Some((a.tenant.clone(), (slot, vni)))
            })
            .collect()
    })
}

/// What a tenant's namespace was last joined to: the namespace (its
/// inode: one made anew after its last workload left is another) and
/// its routes.
type Joined = HashMap<String, (u64, Vec<PeerRoute>)>;

/// Joins every tenant namespace here to `routes`, skipping those joined
/// to them already.
async fn join_tenants(
    shared: &Arc<Shared>,
    config: &OverlayConfig,
    index: u32,
    routes: &[PeerRoute],
    joined: &mut Joined,
) {
    let here = tenants_here(shared);
    joined.retain(|t, _| here.contains_key(t));
    for (tenant, (slot, vni)) in here {
        let Some(namespace) = shared.host.network_inode(&tenant) else {
            joined.remove(&tenant);
            continue;
        };
        let current = (namespace, routes.to_vec());
        if joined.get(&tenant) == Some(&current) {
            continue;
        }
        let link = OverlayLink {
            vni,
            index,
            local: config.address,
            port: config.vxlan_port,
        };
        let (host, t, routes_now) = (shared.host.clone(), tenant.clone(), routes.to_vec());
        let result = tokio::task::spawn_blocking(move || {
            host.ensure_overlay(
                &TenantSlot {
                    tenant: t.clone(),
                    slot,
                },
                link,
            )?;
            host.apply_overlay_routes(&t, &routes_now)
        })
        .await;
        match result {
            Ok(Ok(())) => {
                tracing::info!(%tenant, vni, index, peers = routes.len(), "overlay: tenant joined to its peers");
                joined.insert(tenant, current);
            }
            Ok(Err(why)) => {
                joined.remove(&tenant);
                tracing::warn!(%tenant, %why, "overlay: cannot join the tenant's network");
            }
            Err(e) => tracing::warn!(error = %e, "overlay: task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_node_keeps_its_index_or_takes_one_above_the_highest() {
        let nodes = [("a", Some(3)), ("b", None), ("c", Some(7))];
        assert_eq!(choose_index(nodes, "a"), 3);
        assert_eq!(choose_index(nodes, "b"), 8);
        assert_eq!(choose_index(nodes, "new"), 8);
        assert_eq!(choose_index([], "first"), 1);
    }

    #[test]
    fn peers_at_other_sites_go_through_the_sealer_only() {
        let peer = |site: &str, index: u32| Peer {
            site: site.into(),
            overlay: NodeOverlay {
                index,
                vxlan: format!("10.0.0.{index}:4789").parse().unwrap(),
                sealed: format!("10.0.0.{index}:4790").parse().unwrap(),
                public_key: "ab".repeat(32),
            },
        };
        let peers = [peer("eu", 2), peer("us", 3), peer("us", 4)];
        let sealed = HashMap::from([(3, 40001)]);
        let r = routes("eu", &peers, &sealed);
        assert_eq!(
            r,
            vec![
                PeerRoute {
                    index: 2,
                    dst: Ipv4Addr::new(10, 0, 0, 2),
                    port: 4789
                },
                PeerRoute {
                    index: 3,
                    dst: Ipv4Addr::LOCALHOST,
                    port: 40001
                },
            ],
            "the US peer without a sealer port yet gets no route, never a clear one"
        );
    }

    #[test]
    fn the_key_persists_and_sessions_only_grow() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_identity(dir.path()).unwrap();
        let second = load_identity(dir.path()).unwrap();
        assert_eq!(first.public, second.public);
        assert!(second.session > first.session);
        // A clock set back does not take the session back.
        std::fs::write(dir.path().join("overlay.session"), u64::MAX.to_string()).unwrap();
        assert_eq!(load_identity(dir.path()).unwrap().session, u64::MAX);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("overlay.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
