//! A tenant's overlay interface in its namespace on this node, and the
//! firewall on the node's VXLAN port.
//!
//! The interface is made in the agent's own namespace (where its UDP
//! socket stays: the underlay) and moved into the tenant's, so the tenant
//! sees only `overlay0`, with its node's overlay address and MAC; its
//! peers' neighbours and forwarding entries are installed statically
//! (nothing learned, nothing flooded: a frame for an address no peer has
//! goes nowhere). A tenant's uid holds no capability in its namespace and
//! can change none of it. Another tenant's interfaces carry other VNIs,
//! in other namespaces: no frame of theirs is delivered to this one.
//!
//! Every value reaching `ip`, `bridge` and `nft` is typed (addresses,
//! ports, MACs made from indexes, names the agent made).

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use atrium_core::overlay::{address_of, mac_bytes_of, mac_of, INTERFACE, MTU, NETWORK};

use super::{
    input_chain, replacing_table, run, run_capturing, run_with_input, Host, SandboxError,
    TenantSlot,
};
use crate::overlay::netlink::{self, Vxlan};

/// Where frames for one peer node go: its own VXLAN endpoint (same site)
/// or this node's sealer, which seals them for the peer's site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerRoute {
    pub index: u32,
    pub dst: Ipv4Addr,
    pub port: u16,
}

/// This node's end of a tenant's overlay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayLink {
    pub vni: u32,
    pub index: u32,
    pub local: Ipv4Addr,
    pub port: u16,
}

/// Whether `ip -d link show` output describes `link`'s interface.
fn is_link(shown: &str, link: OverlayLink) -> bool {
    let words: Vec<&str> = shown.split_whitespace().collect();
    let after = |key: &str| words.windows(2).find(|w| w[0] == key).map(|w| w[1]);
    after("link/ether") == Some(mac_of(link.index).as_str())
        && after("id") == Some(link.vni.to_string().as_str())
        && after("dstport") == Some(link.port.to_string().as_str())
        && after("local") == Some(link.local.to_string().as_str())
}

impl Host {
    fn overlay_staging_name(&self, slot: u32) -> String {
        format!("at{}o{slot}", self.octet())
    }

    pub(crate) fn overlay_table(&self) -> String {
        format!("atrium_{}_overlay", self.octet())
    }

    /// The inode of `tenant`'s namespace here, if it has one.
    pub fn network_inode(&self, tenant: &str) -> Option<u64> {
        use std::os::unix::fs::MetadataExt as _;
        let path = std::path::Path::new("/run/netns").join(self.netns_name(tenant));
        std::fs::metadata(path).ok().map(|m| m.ino())
    }

    /// Makes `tenant`'s overlay interface unless its namespace has it as
    /// `link` describes (one made for another link is replaced).
    pub fn ensure_overlay(&self, t: &TenantSlot, link: OverlayLink) -> Result<(), SandboxError> {
        let ns = self.netns_name(&t.tenant);
        if let Ok(shown) = run_capturing("ip", &["-n", &ns, "-d", "link", "show", INTERFACE], "") {
            if is_link(&shown, link) {
                return self.overlay_source(&ns);
            }
            // Made for another VNI, index or port (the node joined anew):
            // it would answer for an address that is no longer this node's.
            run("ip", &["-n", &ns, "link", "del", INTERFACE])?;
        }
        let address = address_of(link.index)
            .ok_or_else(|| refused!("overlay index {} is out of range", link.index))?;
        let staging = self.overlay_staging_name(t.slot);
        // Left in the agent's namespace by a crash between two steps.
        let _ = run("ip", &["link", "del", &staging]);
        netlink::create(&Vxlan {
            name: staging.clone(),
            vni: link.vni,
            local: link.local,
            port: link.port,
            mac: mac_bytes_of(link.index),
            mtu: MTU,
        })
        .map_err(|e| refused!("cannot make VXLAN {} (VNI {}): {e}", staging, link.vni))?;
        let made = run("ip", &["link", "set", &staging, "netns", &ns])
            .and_then(|()| {
                run(
                    "ip",
                    &["-n", &ns, "link", "set", &staging, "name", INTERFACE],
                )
            })
            .and_then(|()| {
                let cidr = format!("{address}/{}", NETWORK.1);
                run("ip", &["-n", &ns, "addr", "add", &cidr, "dev", INTERFACE])
            })
            .and_then(|()| run("ip", &["-n", &ns, "link", "set", INTERFACE, "up"]));
        if let Err(why) = made {
            let _ = run("ip", &["link", "del", &staging]);
            let _ = run("ip", &["-n", &ns, "link", "del", INTERFACE]);
            return Err(why);
        }
        self.overlay_source(&ns)
    }

    /// What leaves the namespace on its overlay leaves from its overlay
    /// address. A connection to a service address was given its source
    /// before its destination became a pod's overlay address (the service
    /// network is routed to the namespace itself, whose first address is
    /// its veth's), and no peer could answer that one. The table is in the
    /// tenant's namespace: it touches only the tenant's own traffic.
    fn overlay_source(&self, ns: &str) -> Result<(), SandboxError> {
        let (net, bits) = NETWORK;
        let table = replacing_table(
            "ip",
            "atrium_overlay",
            &format!(
                "chain postrouting {{\n\
                 type nat hook postrouting priority 100; policy accept;\n\
                 oifname \"{INTERFACE}\" ip saddr != {net}/{bits} masquerade\n\
                 }}\n"
            ),
        );
        run_with_input("ip", &["netns", "exec", ns, "nft", "-f", "-"], &table)
    }

    /// Makes `tenant`'s overlay reach exactly `routes`: each peer's
    /// neighbour entry and forwarding entry installed, any other peer's
    /// removed.
    pub fn apply_overlay_routes(
        &self,
        tenant: &str,
        routes: &[PeerRoute],
    ) -> Result<(), SandboxError> {
        let ns = self.netns_name(tenant);
        let wanted: std::collections::BTreeSet<String> =
            routes.iter().map(|r| mac_of(r.index)).collect();
        let fdb = run_capturing(
            "ip",
            &[
                "netns", "exec", &ns, "bridge", "fdb", "show", "dev", INTERFACE,
            ],
            "",
        )?;
        for mac in fdb.lines().filter_map(|l| l.split_whitespace().next()) {
            if mac.starts_with("02:a7:") && !wanted.contains(mac) {
                let _ = run(
                    "ip",
                    &[
                        "netns", "exec", &ns, "bridge", "fdb", "del", mac, "dev", INTERFACE, "self",
                    ],
                );
            }
        }
        let neigh = run_capturing("ip", &["-n", &ns, "neigh", "show", "dev", INTERFACE], "")?;
        let wanted_ips: std::collections::BTreeSet<String> = routes
            .iter()
            .filter_map(|r| address_of(r.index))
            .map(|a| a.to_string())
            .collect();
        for ip in neigh.lines().filter_map(|l| l.split_whitespace().next()) {
            if !wanted_ips.contains(ip) {
                let _ = run("ip", &["-n", &ns, "neigh", "del", ip, "dev", INTERFACE]);
            }
        }
        for r in routes {
            let Some(address) = address_of(r.index) else {
                continue;
            };
            let (mac, dst, port) = (mac_of(r.index), r.dst.to_string(), r.port.to_string());
            run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &ns,
                    "bridge",
                    "fdb",
                    "replace",
                    &mac,
                    "dev",
                    INTERFACE,
                    "dst",
                    &dst,
                    "port",
                    &port,
                    "self",
                    "permanent",
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "neigh",
                    "replace",
                    &address.to_string(),
                    "lladdr",
                    &mac,
                    "dev",
                    INTERFACE,
                    "nud",
                    "permanent",
                ],
            )?;
        }
        Ok(())
    }

    /// The node's VXLAN port takes frames only from `from`: its own sealer
    /// (on loopback) and its site's peers. Anyone else on the underlay —
    /// another site, or a host that is no node — is dropped (and counted)
    /// before a frame could reach a tenant's interface. Replaced whole.
    pub fn apply_overlay_firewall(&self, port: u16, from: &[Ipv4Addr]) -> Result<(), SandboxError> {
        let table = self.overlay_table();
        let mut allowed = String::from("127.0.0.1");
        for ip in from {
            let _ = write!(allowed, ", {ip}");
        }
        let rules = replacing_table(
            "inet",
            &table,
            &input_chain(&format!(
                "udp dport {port} ip saddr {{ {allowed} }} accept\n\
                 udp dport {port} counter drop\n"
            )),
        );
        run_with_input("nft", &["-f", "-"], &rules)
    }

    pub(super) fn remove_overlay_firewall(&self) {
        let _ = run("nft", &["delete", "table", "inet", &self.overlay_table()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_is_kept_only_if_it_is_the_one_wanted() {
        let shown = "7: overlay0@if7: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500\n    \
                     link/ether 02:a7:00:00:00:03 brd ff:ff:ff:ff:ff:ff link-netnsid 0\n    \
                     vxlan id 12 local 10.0.0.5 srcport 0 0 dstport 4789 nolearning ttl auto";
        let link = OverlayLink {
            vni: 12,
            index: 3,
            local: Ipv4Addr::new(10, 0, 0, 5),
            port: 4789,
        };
        assert!(is_link(shown, link));
        assert!(!is_link(shown, OverlayLink { index: 1, ..link }));
        assert!(!is_link(shown, OverlayLink { vni: 13, ..link }));
        assert!(!is_link(shown, OverlayLink { port: 4790, ..link }));
        assert!(!is_link(
            shown,
            OverlayLink {
                local: Ipv4Addr::new(10, 0, 0, 6),
                ..link
            }
        ));
    }
}
