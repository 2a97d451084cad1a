//! Service routes: a tenant cluster's Service as the tenant's network
//! carries it. Each node where the cluster's pods run gets the service's
//! virtual address (its ClusterIP) in the tenant's network namespace, and
//! each connection to one of its ports goes to one of the service's ready
//! endpoints. The control plane writes routes (from services and their
//! endpoints); only the nodes a route names read it.
//!
//! Addresses and ports are typed (`Ipv4Addr`, `u16`): what reaches a
//! node's nftables rules is never a tenant's string.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::FieldErrors;

/// The block services' addresses come from (`10.96.0.0/16`); no tenant
/// network may use it.
pub const SERVICE_NETWORK: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 16);
/// Most ports one route carries, backends per port, and nodes it names.
pub const MAX_PORTS: usize = 100;
pub const MAX_BACKENDS: usize = 256;
pub const MAX_NODES: usize = 1024;

/// Whether `ip` is a service address.
pub fn is_service_address(ip: Ipv4Addr) -> bool {
    let (net, bits) = SERVICE_NETWORK;
    let mask = u32::MAX << (32 - u32::from(bits));
    u32::from(ip) & mask == u32::from(net)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RouteProtocol {
    Tcp,
    Udp,
}

impl RouteProtocol {
    /// As nftables names it.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteProtocol::Tcp => "tcp",
            RouteProtocol::Udp => "udp",
        }
    }
}

/// One endpoint: a pod's address and the port it serves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    #[schema(value_type = String, format = "ipv4")]
    pub address: Ipv4Addr,
    pub port: u16,
}

/// One port of the service, and where its connections go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoutePort {
    pub protocol: RouteProtocol,
    pub port: u16,
    /// Ready endpoints; none: connections are refused.
    pub backends: Vec<Backend>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceRouteSpec {
    /// The tenant cluster it belongs to (its id).
    pub cluster: String,
    /// The service's virtual address, of [`SERVICE_NETWORK`].
    #[schema(value_type = String, format = "ipv4")]
    pub address: Ipv4Addr,
    pub ports: Vec<RoutePort>,
    /// The nodes whose tenant network gets the route: where the cluster's
    /// pods run.
    pub nodes: Vec<String>,
}

impl ServiceRouteSpec {
    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errors = FieldErrors::new();
        if !is_service_address(self.address) {
            errors.push("address", "must be of the service network 10.96.0.0/16");
        }
        if self.ports.len() > MAX_PORTS {
            errors.push("ports", format!("at most {MAX_PORTS}"));
        }
        for (i, p) in self.ports.iter().enumerate() {
            if p.port == 0 {
                errors.push(format!("ports[{i}].port"), "must be 1 to 65535");
            }
            if self.ports[..i]
                .iter()
                .any(|o| (o.protocol, o.port) == (p.protocol, p.port))
            {
                errors.push(format!("ports[{i}]"), "the same port twice");
            }
            if p.backends.len() > MAX_BACKENDS {
                errors.push(
                    format!("ports[{i}].backends"),
                    format!("at most {MAX_BACKENDS}"),
                );
            }
            if let Some(j) = p
                .backends
                .iter()
                .position(|b| b.port == 0 || is_service_address(b.address))
            {
                errors.push(
                    format!("ports[{i}].backends[{j}]"),
                    "must be a pod's address and a port from 1 to 65535",
                );
            }
        }
        if self.nodes.len() > MAX_NODES {
            errors.push("nodes", format!("at most {MAX_NODES}"));
        }
        errors.into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route() -> ServiceRouteSpec {
        ServiceRouteSpec {
            cluster: "clu_1".into(),
            address: Ipv4Addr::new(10, 96, 0, 7),
            ports: vec![RoutePort {
                protocol: RouteProtocol::Tcp,
                port: 80,
                backends: vec![Backend {
                    address: Ipv4Addr::new(10, 241, 0, 2),
                    port: 8080,
                }],
            }],
            nodes: vec!["n1".into()],
        }
    }

    #[test]
    fn a_route_is_a_service_address_to_pods_addresses() {
        route().validate().unwrap();
        let mut outside = route();
        outside.address = Ipv4Addr::new(10, 97, 0, 1);
        assert!(outside.validate().is_err());
        let mut looped = route();
        looped.ports[0].backends[0].address = Ipv4Addr::new(10, 96, 0, 8);
        assert!(looped.validate().is_err(), "a backend may not be a service");
        let mut twice = route();
        twice.ports.push(twice.ports[0].clone());
        assert!(twice.validate().is_err());
        let text = r#"{"cluster":"c","address":"10.96.0.1; drop","ports":[],"nodes":[]}"#;
        assert!(serde_json::from_str::<ServiceRouteSpec>(text).is_err());
    }
}
