//! Gateways as the fleet knows them: each one's site, the address its
//! peers at other sites forward to, and what it measured of them. A
//! gateway writes its own record (as an agent writes its node's); the
//! routing itself uses each gateway's live measurements, this record is
//! what operators see (`atrium site topology`).

use serde::{Deserialize, Serialize};

use crate::FieldErrors;

/// The name a site's gateways present on their peer link and its
/// certificates are issued for: `<site>.site.atrium`. A site name is a DNS
/// label (see `name::validate_name`), so this is a valid DNS name.
pub fn site_server_name(site: &str) -> String {
    format!("{site}.site.atrium")
}

/// Most peers one record lists.
pub const MAX_PEERS: usize = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    pub site: String,
    /// `host:port` of its peer listener (mutually authenticated TLS);
    /// empty when it takes no forwarded requests.
    #[serde(default)]
    pub peer_address: String,
    /// Requests in flight at it when it last reported.
    #[serde(default)]
    pub in_flight: u64,
    /// Its measurements of the other sites' gateways.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerMeasurement>,
    /// When it last reported (RFC 3339).
    #[serde(default)]
    pub reported_at: String,
}

/// One gateway's view of one peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PeerMeasurement {
    /// The peer gateway's record name.
    pub gateway: String,
    pub site: String,
    /// Round trip of its last state probe, in microseconds (smoothed).
    pub rtt_us: u64,
    /// It answered its recent probes.
    pub healthy: bool,
    /// Its requests in flight, as it last said.
    pub in_flight: u64,
    /// Deployments with a ready replica there.
    pub ready: u64,
}

impl GatewaySpec {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::new();
        errors.check("site", crate::name::validate_name(&self.site));
        if !self.peer_address.is_empty() {
            errors.check("peer_address", validate_peer_address(&self.peer_address));
        }
        if self.peers.len() > MAX_PEERS {
            errors.push("peers", format!("lists more than {MAX_PEERS} peers"));
        }
        for (i, p) in self.peers.iter().enumerate() {
            errors.check(
                &format!("peers[{i}].site"),
                crate::name::validate_name(&p.site),
            );
            errors.check(
                &format!("peers[{i}].gateway"),
                crate::name::validate_name(&p.gateway),
            );
        }
        if self.reported_at.len() > 64 {
            errors.push("reported_at", "must be at most 64 characters");
        }
        errors.into_result()
    }
}

/// A peer address is `ip:port` (no name to resolve: peers find each other
/// by what they registered, not by a DNS answer a third party controls).
fn validate_peer_address(address: &str) -> Result<(), String> {
    match address.parse::<std::net::SocketAddr>() {
        Ok(a) if a.port() != 0 && !a.ip().is_unspecified() => Ok(()),
        _ => Err(format!(
            "{address:?} is not an address peers can reach; give ip:port, e.g. 10.0.0.2:8443"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(peer_address: &str) -> GatewaySpec {
        GatewaySpec {
            site: "eu-a".into(),
            peer_address: peer_address.into(),
            in_flight: 0,
            peers: vec![],
            reported_at: String::new(),
        }
    }

    #[test]
    fn peer_addresses_are_reachable_ip_and_port() {
        for ok in ["", "10.0.0.2:8443", "[::1]:9443"] {
            assert!(spec(ok).validate().is_ok(), "{ok}");
        }
        for bad in [
            "eu.example:443",
            "0.0.0.0:8443",
            "10.0.0.2:0",
            "10.0.0.2",
            "a\r\nb",
        ] {
            assert!(spec(bad).validate().is_err(), "{bad}");
        }
        let mut s = spec("");
        s.site = "EU A".into();
        assert!(s.validate().is_err());
    }
}
