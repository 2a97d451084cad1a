//! Tenant clusters' services in a tenant's network on this node: the
//! service network (`10.96.0.0/16`) is routed inside the tenant's
//! namespace, and one nftables table there (`atrium_services`, replaced
//! whole at each change) translates each connection to a service's port
//! into one of its ready endpoints, picked at random, as kube-proxy's
//! nftables mode does. A port without endpoints, and any address or port
//! of the service network that is no service's, refuses (TCP reset, ICMP
//! port unreachable) rather than hanging.
//!
//! The rules are rendered from typed routes (`Ipv4Addr`, `u16`): no
//! tenant string reaches them. The table lives in the tenant's own
//! namespace, so it can only ever touch that tenant's traffic.

use std::fmt::Write as _;
use std::path::Path;

use atrium_core::service_route::{RouteProtocol, ServiceRouteSpec, SERVICE_NETWORK};

use super::{run, run_with_input, Host, SandboxError};

const TABLE: &str = "atrium_services";

/// The nftables script that makes the tenant's services table carry
/// `routes` (none: the table goes).
pub fn ruleset(routes: &[&ServiceRouteSpec]) -> String {
    let mut out = format!("add table ip {TABLE}\ndelete table ip {TABLE}\n");
    if routes.iter().all(|r| r.ports.is_empty()) {
        return out;
    }
    let _ = writeln!(out, "table ip {TABLE} {{\n\tchain output {{");
    out.push_str("\t\ttype nat hook output priority -100; policy accept;\n");
    for r in routes {
        for p in &r.ports {
            let proto = p.protocol.as_str();
            let matched = format!("ip daddr {} {proto} dport {}", r.address, p.port);
            let action = match p.backends.as_slice() {
                [] if p.protocol == RouteProtocol::Tcp => "reject with tcp reset".to_string(),
                [] => "reject".to_string(),
                [one] => format!("dnat ip to {}:{}", one.address, one.port),
                many => {
                    let entries: Vec<String> = many
                        .iter()
                        .enumerate()
                        .map(|(i, b)| format!("{i} : {} . {}", b.address, b.port))
                        .collect();
                    format!(
                        "dnat ip to numgen random mod {} map {{ {} }}",
                        many.len(),
                        entries.join(", ")
                    )
                }
            };
            let _ = writeln!(out, "\t\t{matched} {action}");
        }
    }
    // Any other address or port of the service network is no service:
    // refused at once, as upstream's nftables proxy refuses it.
    let (net, bits) = SERVICE_NETWORK;
    let _ = writeln!(
        out,
        "\t\tip daddr {net}/{bits} meta l4proto tcp reject with tcp reset"
    );
    let _ = writeln!(out, "\t\tip daddr {net}/{bits} reject");
    out.push_str("\t}\n}\n");
    out
}

impl Host {
    /// Whether `tenant` has a network on this node yet.
    pub fn has_network(&self, tenant: &str) -> bool {
        Path::new("/run/netns")
            .join(self.netns_name(tenant))
            .exists()
    }

    /// Installs `script` (from [`ruleset`]) in `tenant`'s namespace, with
    /// the service network routed there.
    pub fn apply_services(&self, tenant: &str, script: &str) -> Result<(), SandboxError> {
        let ns = self.netns_name(tenant);
        let (net, bits) = SERVICE_NETWORK;
        // Routed to the namespace itself: the translation happens on the
        // way out, before the packet would leave. The namespace may be
        // newer than its loopback's being up (its network is still being
        // made): the route needs it.
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &[
                "-n",
                &ns,
                "route",
                "replace",
                &format!("{net}/{bits}"),
                "dev",
                "lo",
            ],
        )?;
        run_with_input("ip", &["netns", "exec", &ns, "nft", "-f", "-"], script)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use atrium_core::service_route::{Backend, RoutePort};

    use super::*;

    fn route(ports: Vec<RoutePort>) -> ServiceRouteSpec {
        ServiceRouteSpec {
            cluster: "clu_1".into(),
            address: Ipv4Addr::new(10, 96, 0, 1),
            ports,
            nodes: vec!["n1".into()],
        }
    }

    fn backend(last: u8, port: u16) -> Backend {
        Backend {
            address: Ipv4Addr::new(10, 241, 0, last),
            port,
        }
    }

    #[test]
    fn each_port_goes_to_its_endpoints_or_is_refused() {
        let r = route(vec![
            RoutePort {
                protocol: RouteProtocol::Tcp,
                port: 80,
                backends: vec![backend(2, 8080)],
            },
            RoutePort {
                protocol: RouteProtocol::Tcp,
                port: 443,
                backends: vec![backend(2, 8443), backend(6, 8443)],
            },
            RoutePort {
                protocol: RouteProtocol::Udp,
                port: 53,
                backends: vec![],
            },
            RoutePort {
                protocol: RouteProtocol::Tcp,
                port: 81,
                backends: vec![],
            },
        ]);
        let text = ruleset(&[&r]);
        for line in [
            "add table ip atrium_services\ndelete table ip atrium_services\n",
            "type nat hook output priority -100; policy accept;",
            "ip daddr 10.96.0.1 tcp dport 80 dnat ip to 10.241.0.2:8080\n",
            "ip daddr 10.96.0.1 tcp dport 443 dnat ip to numgen random mod 2 map \
             { 0 : 10.241.0.2 . 8443, 1 : 10.241.0.6 . 8443 }\n",
            "ip daddr 10.96.0.1 udp dport 53 reject\n",
            "ip daddr 10.96.0.1 tcp dport 81 reject with tcp reset\n",
            "ip daddr 10.96.0.0/16 meta l4proto tcp reject with tcp reset\n\t\tip daddr 10.96.0.0/16 reject\n\t}\n}\n",
        ] {
            assert!(text.contains(line), "{line:?} in\n{text}");
        }
    }

    #[test]
    fn no_routes_remove_the_table() {
        assert_eq!(
            ruleset(&[]),
            "add table ip atrium_services\ndelete table ip atrium_services\n"
        );
    }
}
