//! Tenant overlays: one tenant's network namespaces on different nodes
//! joined into one layer-2 segment, a VXLAN network of its own (one VNI per
//! tenant, never shared), so its workloads reach each other across nodes
//! and sites while no other tenant's traffic can enter it.
//!
//! Addressing is fixed by the fleet, not chosen by tenants: every tenant's
//! overlay is [`NETWORK`] (they never meet, so they may all use it), and a
//! node's namespace of any tenant has the node's address in it,
//! [`address_of`] its overlay index — unique in the fleet, so the same on
//! every tenant's overlay — with a MAC derived from the same index, so
//! agents install neighbours and forwarding entries statically and nothing
//! is flooded or learned.

use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::FieldErrors;

/// Every tenant's overlay: `100.64.0.0/10` (RFC 6598 shared space, apart
/// from the service network, the agents' `10.X.0.0/16` blocks and the
/// link-local database address).
pub const NETWORK: (Ipv4Addr, u8) = (Ipv4Addr::new(100, 64, 0, 0), 10);
/// Highest overlay index: the last host address of [`NETWORK`].
pub const MAX_INDEX: u32 = (1 << (32 - NETWORK.1)) - 2;
/// VNIs are 24 bits; 0 is never a tenant's.
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// The interface a tenant's namespace reaches its overlay through.
pub const INTERFACE: &str = "overlay0";
/// Its MTU: a 1500-byte underlay less VXLAN's 50 bytes and the seal's 37
/// (header and tag), rounded down, so a frame to another site is never
/// fragmented on the way.
pub const MTU: u32 = 1400;

/// A node's address on every tenant overlay it carries.
pub fn address_of(index: u32) -> Option<Ipv4Addr> {
    (1..=MAX_INDEX)
        .contains(&index)
        .then(|| Ipv4Addr::from(u32::from(NETWORK.0) + index))
}

/// The MAC of a node's overlay interface: locally administered, unicast,
/// its index in the low bytes.
pub fn mac_bytes_of(index: u32) -> [u8; 6] {
    let [a, b, c, d] = index.to_be_bytes();
    [0x02, 0xa7, a, b, c, d]
}

/// [`mac_bytes_of`] as `ip` and `bridge` write it.
pub fn mac_of(index: u32) -> String {
    mac_bytes_of(index).map(|b| format!("{b:02x}")).join(":")
}

/// How a node takes part in tenant overlays; absent: it carries none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeOverlay {
    /// Unique in the fleet (the control plane refuses a second node with
    /// it); the node's address on each overlay is [`address_of`] it.
    pub index: u32,
    /// VXLAN endpoint: where the node's peers in its own site send its
    /// tenants' frames, in the clear within the site.
    #[schema(value_type = String, example = "10.0.0.5:4789")]
    pub vxlan: SocketAddr,
    /// Sealed endpoint: where peers at other sites send its tenants'
    /// frames, encrypted and authenticated (ChaCha20-Poly1305 under keys
    /// agreed with X25519).
    #[schema(value_type = String, example = "10.0.0.5:4790")]
    pub sealed: SocketAddr,
    /// The node's X25519 public key, hex.
    pub public_key: String,
}

impl NodeOverlay {
    pub fn validate(&self, errors: &mut FieldErrors) {
        if address_of(self.index).is_none() {
            errors.push("overlay.index", format!("must be 1 to {MAX_INDEX}"));
        }
        for (field, at) in [
            ("overlay.vxlan", self.vxlan),
            ("overlay.sealed", self.sealed),
        ] {
            if at.port() == 0 || at.ip().is_unspecified() || !at.is_ipv4() {
                errors.push(
                    field,
                    format!("{at} is not an IPv4 address and port peers can reach"),
                );
            }
        }
        if self.public_key_bytes().is_none() {
            errors.push("overlay.public_key", "must be 64 hex digits (X25519)");
        }
    }

    pub fn public_key_bytes(&self) -> Option<[u8; 32]> {
        let bytes = hex::decode(&self.public_key).ok()?;
        bytes.try_into().ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn indexes_map_onto_the_overlay_network_and_nothing_else() {
        assert_eq!(address_of(0), None);
        assert_eq!(address_of(1), Some(Ipv4Addr::new(100, 64, 0, 1)));
        assert_eq!(address_of(258), Some(Ipv4Addr::new(100, 64, 1, 2)));
        assert_eq!(
            address_of(MAX_INDEX),
            Some(Ipv4Addr::new(100, 127, 255, 254))
        );
        assert_eq!(address_of(MAX_INDEX + 1), None);
        assert_eq!(address_of(u32::MAX), None);
        assert_eq!(mac_of(258), "02:a7:00:00:01:02");
    }

    #[test]
    fn an_endpoint_must_be_reachable_and_keyed() {
        let good = NodeOverlay {
            index: 3,
            vxlan: "10.0.0.5:4789".parse().unwrap(),
            sealed: "10.0.0.5:4790".parse().unwrap(),
            public_key: "ab".repeat(32),
        };
        let mut errors = FieldErrors::new();
        good.validate(&mut errors);
        assert!(errors.into_result().is_ok());
        let bad = NodeOverlay {
            index: 0,
            vxlan: "0.0.0.0:4789".parse().unwrap(),
            sealed: "[::1]:4790".parse().unwrap(),
            public_key: "zz".into(),
        };
        let mut errors = FieldErrors::new();
        bad.validate(&mut errors);
        let text = format!("{:?}", errors.into_result().unwrap_err());
        for field in [
            "overlay.index",
            "overlay.vxlan",
            "overlay.sealed",
            "overlay.public_key",
        ] {
            assert!(text.contains(field), "{field}: {text}");
        }
    }
}
